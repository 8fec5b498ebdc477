"""``causalrec tune``: an Optuna study on the OOD validation metric (``causalrec.experiments.tune``)."""

from __future__ import annotations

from pathlib import Path

from causalrec.cli.common import add_config_options, parse_params
from causalrec.experiments.tune import OBJECTIVES, PRUNERS, tune


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="Optuna study on the OOD validation metric (pruning, resumable storage, best YAML)",
        description="Tune a model's hyper-parameters for out-of-distribution validation accuracy.",
    )
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--dataset", "-d", default="retail-sim")
    p.add_argument("--split", "-s", default="seasonal", help="the shift split whose validation part is scored")
    p.add_argument("--space", help="search-space YAML (or a name in tuning/); default tuning/<model>.yaml")
    p.add_argument("--trials", "-n", type=int, default=20, help="trials this process runs")
    p.add_argument("--max-trials", type=int, help="stop once the study holds this many finished trials (all workers)")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--storage", help="sqlite:///PATH, any Optuna RDB URL, or journal:PATH (default: SQLite in --out)")
    p.add_argument("--study-name", help="default <model>-<dataset>-<split>-<objective>")
    p.add_argument("--resume", action="store_true", help="continue a stored study (also: join it as a worker)")
    p.add_argument("--metric", default="ndcg@10", help="validation metric (default ndcg@10)")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="mean",
        help="mean: all validation cases; worst: the worst validation environment",
    )
    p.add_argument(
        "--env-field",
        action="append",
        choices=("season", "region"),
        help="environments of the worst objective (repeatable; default both)",
    )
    p.add_argument("--min-env-cases", type=int, default=1, help="worst objective: ignore smaller environments")
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument("--pruner-startup-trials", type=int, default=5, help="median pruner: trials before pruning")
    p.add_argument("--pruner-warmup-steps", type=int, default=0, help="median pruner: epochs before pruning")
    p.add_argument("--sampler-seed", type=int, help="TPE seed (leave unset when several workers share a study)")
    add_config_options(p)
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--no-test", action="store_true", help="do not evaluate finished trials on the test split")
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep each trial's model checkpoint under OUT/trials"
    )
    p.add_argument("--progress", action="store_true", help="Optuna's progress bar over trials")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    study = tune(
        args.model,
        args.dataset,
        split=args.split,
        space=args.space,
        trials=args.trials,
        max_trials=args.max_trials,
        timeout=args.timeout,
        storage=args.storage,
        study_name=args.study_name,
        resume=args.resume,
        metric=args.metric,
        objective=args.objective,
        env_fields=tuple(args.env_field or ("season", "region")),
        min_env_cases=args.min_env_cases,
        pruner=args.pruner,
        pruner_startup_trials=args.pruner_startup_trials,
        pruner_warmup_steps=args.pruner_warmup_steps,
        sampler_seed=args.sampler_seed,
        config_files=args.config_files,
        params=parse_params(args.param),
        out=args.out,
        test=not args.no_test,
        keep_checkpoints=args.keep_checkpoints,
        show_progress=args.progress,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    return 0 if any(t.state.name == "COMPLETE" for t in study.trials) else 1
