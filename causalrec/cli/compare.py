"""``causalrec compare``: models x splits x seeds through ``causalrec run`` (``causalrec.experiments.compare``)."""

from __future__ import annotations

from pathlib import Path

from causalrec.cli.common import add_config_options, parse_params
from causalrec.errors import ConfigError
from causalrec.experiments.compare import (
    DEFAULT_MIN_ENV_CASES,
    DEFAULT_MODELS,
    DEFAULT_REPORT_METRICS,
    DEFAULT_SEEDS,
    DEFAULT_SPLITS,
    compare,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="models x splits x seeds -> results.csv, mean ± std tables, significance, plots",
        description="Train and test every model on every split with every seed through causalrec run "
        "(same data, evaluator and protocol), caching finished cells under --out.",
    )
    p.add_argument("--dataset", "-d", help="default retail-sim (--report-only over stored cells: theirs)")
    p.add_argument("--models", "-m", help=f"comma-separated model names (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--splits", "-s", help=f"comma-separated splits (default {','.join(DEFAULT_SPLITS)})")
    p.add_argument(
        "--seeds", help=f"a count N (seeds 2020..2020+N-1) or a comma-separated list (default {DEFAULT_SEEDS})"
    )
    add_config_options(p)
    p.add_argument("--out", "-o", required=True, help="output folder (cells are cached here)")
    p.add_argument("--baseline", help="model every other model is tested against (e.g. SDPORec)")
    p.add_argument(
        "--report-metrics", help=f"metrics of the tables, tests and plots (default {','.join(DEFAULT_REPORT_METRICS)})"
    )
    p.add_argument(
        "--min-env-cases",
        type=int,
        help="worst-environment rows: only groups with at least this many test cases (default "
        f"{DEFAULT_MIN_ENV_CASES})",
    )
    p.add_argument("--no-retry-failed", action="store_true", help="keep failed cells as they are")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the cells already cached under --out (the others: not run); on a "
        "published --out, or with --from, from the stored cells alone (no data preparation)",
    )
    p.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="DIR",
        help="with --report-only: pool the cells of this compare --out or published folder "
        "(repeatable; the first holding a cell wins) and report them under --out",
    )
    p.add_argument(
        "--publish",
        metavar="DIR",
        help="also write every recorded cell without per-user values to DIR/cells, with DIR/compare.json "
        "and a report from those cells (a folder to commit, e.g. docs/results/<name>)",
    )
    p.add_argument(
        "--publish-cases",
        action="store_true",
        help="with --publish, on a simulated dataset (retail-sim): also publish each cell's per-case test values "
        "beside it (cells/<cell>.cases.csv.gz), so the bootstrap can be recomputed from the published folder",
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=1,
        help="train up to N cells at once, each in its own process with cores // N torch threads (default 1)",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each cell's model checkpoint")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots (plots/*.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)


def _parse_seeds(text: str | None) -> int | list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects a count or a comma-separated list of integers; got {text!r}") from None
    if len(values) == 1 and "," not in str(text):
        return values[0]
    return values


def _cmd(args) -> int:
    frame = compare(
        args.models,
        args.dataset,
        splits=args.splits,
        seeds=_parse_seeds(args.seeds),
        out=args.out,
        config_files=args.config_files,
        params=parse_params(args.param),
        baseline=args.baseline,
        report_metrics=args.report_metrics.split(",") if args.report_metrics else None,
        min_env_cases=args.min_env_cases,
        retry_failed=not args.no_retry_failed,
        report_only=args.report_only,
        keep_checkpoints=args.keep_checkpoints,
        plots=not args.no_plots,
        show_progress=not args.no_progress,
        publish=args.publish,
        sources=args.sources,
        jobs=args.jobs,
        publish_cases=args.publish_cases,
    )
    files = frame.attrs["files"]
    print(Path(files["report"]).read_text(encoding="utf-8"))
    print(
        f"results: {files['results']}  ({len(frame)} rows; {frame.attrs['trained']} cells run now, "
        f"{len(frame.attrs['failures'])} failed)"
    )
    if frame.attrs.get("published"):
        print(f"published: {Path(frame.attrs['published']['report']).parent}")
    return 1 if len(frame.attrs["failures"]) else 0
