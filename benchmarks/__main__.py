"""``python -m benchmarks [--quick] [--only ranking,dpo_step,...] [--out DIR]``: run, write JSON + summary.md.

Each benchmark writes ``<out>/<name>.json`` (its configuration, results, goals and the machine) and the run
writes ``<out>/summary.md`` with one table per benchmark. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import SCHEMA_VERSION, machine_info, set_threads, write_json

BENCHMARKS = (
    "ranking",
    "dpo_step",
    "grounding",
    "e2e",
    "prepare",
    "allocator",
    "item_tokens",
    "pretrained",
    "threads",
    "repeat_sweep",
)
_log = logging.getLogger("benchmarks")


def _module(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def _options(name: str, quick: bool, args) -> Any:
    mod = _module(name)
    opts = mod.Options.quick() if quick else mod.Options()
    if name == "e2e" and args.param:
        opts.params = list(opts.params) + list(args.param)
    if name == "e2e" and args.e2e_timeout:
        opts.timeout_s = args.e2e_timeout
    if name == "e2e" and args.e2e_threads:
        opts.threads = args.e2e_threads
    if name == "e2e":
        opts.model = args.e2e_model or opts.model
        opts.dataset = args.e2e_dataset or opts.dataset
        opts.source = args.e2e_source or opts.source
    return opts


def run_benchmark(name: str, quick: bool = False, opts: Any = None) -> dict[str, Any]:
    """Run one benchmark in this process; returns its JSON payload (with machine facts and timing)."""
    mod = _module(name)
    opts = opts if opts is not None else (mod.Options.quick() if quick else mod.Options())
    started = time.time()
    machine = machine_info()
    t0 = time.perf_counter()
    result = mod.run(opts)
    result.update(
        {
            "schema_version": SCHEMA_VERSION,
            "quick": quick,
            "machine": machine,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": time.perf_counter() - t0,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        }
    )
    return result


def render_summary(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# Benchmark summary", "", f"Command: `{command}`", ""]
    if results:
        m = results[0]["machine"]
        lines += [
            f"Machine: {m['cpu'] or 'unknown CPU'}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, "
            f"nice {m['nice']}, load average at start {m['load_avg']}; "
            f"torch {m['versions'].get('torch', '?')}, transformers {m['versions'].get('transformers', '?')}, "
            f"trl {m['versions'].get('trl', '?')}, faiss {m['versions'].get('faiss-cpu', '?')}.",
            "",
        ]
        lines += [
            "## Goals",
            "",
            "(met –: measured at other sizes than the goal's, e.g. with --quick: reported, not judged)",
            "",
            "| benchmark | goal | target | measured | met |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            for g in r.get("goals", []):
                met = {True: "yes", False: "**no**", None: "–"}[g.get("passed")]
                measured = g.get("measured")
                shown = (
                    f"{measured:.3g}" if isinstance(measured, float) else ("–" if measured is None else str(measured))
                )
                lines.append(f"| {r['benchmark']} | {g['name']} | {g['target']} | {shown} | {met} |")
        lines.append("")
    for r in results:
        mod = _module(r["benchmark"])
        lines += [f"## {r['benchmark']}", "", f"({r['wall_s']:.0f} s; load average after {r['load_avg_after']})", ""]
        if r.get("skipped"):
            lines += [f"Skipped: {r['skipped']}", ""]
            continue
        lines += mod.summary(r) + [""]
        for note in r.get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about 1-2 minutes")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    parser.add_argument("--out", default="benchmarks/results", help="output folder (JSON per benchmark, summary.md)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/faiss intra-op threads in this process (default 1: on a shared 2-core machine "
        "more threads than free cores slows tiny models down badly; e2e/prepare children "
        "use their own defaults)",
    )
    parser.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e2e: extra --param for `causalrec run` (repeatable)",
    )
    parser.add_argument("--e2e-timeout", type=float, default=None, help="e2e: kill the run after this many seconds")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only write DIR/summary.md again from the JSON files in DIR (no benchmark runs)",
    )
    parser.add_argument(
        "--e2e-threads",
        type=int,
        default=None,
        help="e2e: torch threads of the child (default: the run's num_threads, auto)",
    )
    parser.add_argument("--e2e-model", default=None, help="e2e: the model (default CausalDPO, the main command's)")
    parser.add_argument("--e2e-dataset", default=None, help="e2e: the dataset (default retail-sim)")
    parser.add_argument(
        "--e2e-source", default=None, help="e2e: the dataset's file (e.g. ../shared/.../online_retail.csv.gz)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHMARKS)}")
    set_threads(args.threads)
    out = Path(args.out)
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.render:
        import json

        found = [json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").is_file()]
        commands = sorted({r.get("command", "?") for r in found})
        (out / "summary.md").write_text(render_summary(found, " ; ".join(commands)) + "\n")
        _log.info("wrote %s from %d result files", out / "summary.md", len(found))
        return 0
    results, failed = [], []
    for name in names:
        _log.info("benchmark %s%s", name, " (quick)" if args.quick else "")
        try:
            result = run_benchmark(name, args.quick, _options(name, args.quick, args))
        except Exception:  # one broken benchmark must not hide the others' numbers, but it fails the run
            _log.error("benchmark %s failed:\n%s", name, traceback.format_exc())
            failed.append(name)
            continue
        result["command"] = command
        write_json(out / f"{name}.json", result)
        results.append(result)
    (out / "summary.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(render_summary(results, command) + "\n")
    _log.info("wrote %s", out / "summary.md")
    if failed:
        _log.error("failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
