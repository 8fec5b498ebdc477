"""``causalrec run``: train and evaluate one model; ``causalrec keys``: every config key."""

from __future__ import annotations

from causalrec.cli.common import add_config_options, parse_params
from causalrec.io import write_json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="train and evaluate one model (RecBole config driven)")
    p.add_argument("--model", "-m", default="CausalDPO")
    p.add_argument("--dataset", "-d", default="retail-sim")
    add_config_options(p)
    p.add_argument("--no-save", action="store_true", help="do not save checkpoints (evaluate the last model)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (use it on the first run too): LLM models write step "
        "checkpoints and continue an interrupted training stage from its last one (finished stages "
        "are reused anyway); RecBole's classical models write a checkpoint after every epoch and "
        "continue at the next one",
    )
    p.add_argument("--output", "-o", help="also write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the config key show_progress: false)")
    p.set_defaults(func=_cmd)


def add_keys_parser(subparsers) -> None:
    p = subparsers.add_parser("keys", help="list every config key causalrec and RecBole accept")
    p.set_defaults(func=_cmd_keys)


def _cmd(args) -> int:
    from causalrec.recbole.preflight import read_config_files
    from causalrec.recbole.quick_start import run

    params = {**read_config_files(args.config_files), **parse_params(args.param)}
    if args.no_progress:
        params["show_progress"] = False
    result = run(
        args.model, args.dataset, config_dict=params, saved=not args.no_save, resume=args.resume, output=args.output
    )
    if result is None:  # not the main process of a multi-process launch: it prints and writes nothing
        return 0
    print(f"protocol: {result['protocol']}")
    print("test: " + "  ".join(f"{k}={v:.4f}" for k, v in result["test_result"].items()))
    for stage in result.get("stages") or ():
        how = "reused" if stage["reused"] else f"trained {stage['train_seconds']:.1f}s"
        score = f"  valid={stage['valid_score']:.4f}" if stage.get("valid_score") is not None else ""
        print(f"stage {stage['stage']} ({how}){score}")
    for field, by_label in (result.get("test_env_result") or {}).items():
        for label, metrics in by_label.items():
            shown = {k: v for k, v in metrics.items() if k != "cases"}
            print(f"test[{field}={label}]: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    if args.output:
        write_json(args.output, result)
    return 0


def _cmd_keys(args) -> int:
    from causalrec.recbole.preflight import known_config_keys

    print("\n".join(sorted(known_config_keys())))
    return 0
