"""Data preparation of UCI Online Retail (../shared/datasets; 541,909 rows): cold ``causalrec data prepare``.

Each repeat is a child process with an empty data cache (nothing reused): read the .csv.gz, clean, k-core,
seasonal split, write the RecBole files. Reported: wall time and peak RSS of the child (``os.wait4``), and the
in-process build seconds ``prepare`` records in the dataset's meta.json (wall minus interpreter start and imports).
The file is used where it lies, never copied. Skipped, with a message, when ../shared is absent.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ONLINE_RETAIL, child_env, fmt, log_progress, md_table, median, mib, run_child, skipped

NAME = "prepare"
GOAL_SECONDS = 30.0


@dataclass
class Options:
    source: str = str(ONLINE_RETAIL)
    split: str = "seasonal"
    repeats: int = 3
    timeout_s: float = 600.0

    @classmethod
    def quick(cls) -> "Options":
        return cls(repeats=1)


def _one(opts: Options) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp_name:
        tmp = Path(tmp_name)
        cmd = [
            sys.executable,
            "-m",
            "causalrec",
            "data",
            "prepare",
            "--dataset",
            "online-retail",
            "--source",
            opts.source,
            "--split",
            opts.split,
            "--param",
            f"data_cache_dir={tmp / 'cache'}",
        ]
        child = run_child(cmd, env=child_env(CAUSALREC_CACHE=str(tmp / "cache")), cwd=tmp, timeout=opts.timeout_s)
        meta = {}
        found = re.search(r"prepared online-retail at (\S+)", child.output)
        if found and (Path(found.group(1)) / "online-retail.meta.json").is_file():
            meta = json.loads((Path(found.group(1)) / "online-retail.meta.json").read_text())
    return {
        "returncode": child.returncode,
        "wall_s": child.wall_s,
        "cpu_s": child.cpu_s,
        "peak_rss_bytes": child.peak_rss_bytes,
        "build_s": meta.get("build_seconds"),
        "rows_read": (meta.get("stats") or {}).get("interactions"),
        "parts": meta.get("parts"),
        "output_tail": child.output[-2000:] if child.returncode else "",
    }


def run(opts: Options | None = None) -> dict[str, Any]:
    opts = opts or Options()
    if not Path(opts.source).is_file():
        message = f"Online Retail not found at {opts.source} (../shared/datasets is absent); nothing measured"
        return skipped(NAME, message, {**opts.__dict__})
    runs = []
    for i in range(opts.repeats):
        log_progress("prepare: cold run %d/%d", i + 1, opts.repeats)
        runs.append(_one(opts))
    ok = [r for r in runs if r["returncode"] == 0]
    wall = median([r["wall_s"] for r in ok]) if ok else None
    return {
        "benchmark": NAME,
        "config": {
            **opts.__dict__,
            "command": f"causalrec data prepare --dataset online-retail --source {opts.source} "
            f"--split {opts.split} (empty cache)",
        },
        "goals": [
            {
                "name": "Online Retail cold prepare (median wall)",
                "target": f"< {GOAL_SECONDS:g} s",
                "measured": wall,
                "passed": (wall is not None and wall < GOAL_SECONDS and len(ok) == len(runs)),
            }
        ],
        "results": {
            "runs": runs,
            "median_wall_s": wall,
            "median_build_s": median([r["build_s"] for r in ok if r["build_s"] is not None]) if ok else None,
            "max_peak_rss_bytes": max((r["peak_rss_bytes"] for r in ok), default=None),
        },
        "notes": [
            "wall = whole child process (interpreter start, imports, prepare); build = prepare() itself "
            "(meta.json build_seconds)."
        ],
    }


def summary(result: dict[str, Any]) -> list[str]:
    res = result["results"]
    rows = [
        [i + 1, r["returncode"], r["wall_s"], r.get("cpu_s"), r["build_s"], mib(r["peak_rss_bytes"])]
        for i, r in enumerate(res["runs"])
    ]
    lines = md_table(["run", "exit", "wall s", "CPU s", "prepare() s", "peak RSS MiB"], rows)
    first = next((r for r in res["runs"] if r.get("parts")), None)
    if first:
        lines += ["", "Split sizes: " + ", ".join(f"{k} {fmt(v)}" for k, v in first["parts"].items())]
    return lines
