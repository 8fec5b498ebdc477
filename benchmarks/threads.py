"""torch's thread count on a quiet and on a busy machine: torch's default (one thread per core), ``num_threads: 1``
and ``num_threads: auto`` (causalrec.recbole.threads: one per core free at start, then adjusted by its
``ThreadGovernor`` after optimizer steps when other work starts or stops).

Each measurement is a child process (torch reads its thread settings once) that trains the main command's tiny
Llama (hidden 64, 2 layers, 4 heads, MLP 256, batch 32 x 56 tokens; full fine-tuning with AdamW, as its SFT stage)
for ``seconds`` and reports steps per second. Conditions: ``quiet`` (nothing started by the benchmark) and
``busy`` (one single-threaded CPU-bound process at nice 19 beside it, in its own session, as another terminal's or
user's job: with Linux's scheduler autogroups, on by default, a process in another session gets an equal share of a
core whatever its nice value, so ``nice`` does not keep it out of the run's way) and ``busy later`` (the machine
quiet when the run starts, so ``auto`` starts with one thread per core; the child starts the busy process itself
after ``quiet_s`` seconds of training and is measured once ``react_s`` seconds later; variant ``auto, start only``
is ``auto`` without the governor, as before 2026-12-06). The governor looks every ``interval_s`` seconds here
(10 s in a run) so that the benchmark stays short. Variants run interleaved, rounds rotated; medians and ratios to
torch's default within each condition. The ``quiet`` rows are only quiet if the machine is: the load average is
recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.common import child_env, fmt, log_progress, md_table, median, ratio

NAME = "threads"
VARIANTS = ("torch default", "1", "auto")
LATER_VARIANTS = ("torch default", "auto, start only", "auto")
CONDITIONS = ("quiet", "busy", "busy later")
GOAL_QUIET = 0.9  # auto / torch default on a quiet machine: auto must not cost a quiet machine its speed
GOAL_BUSY = 2.0  # auto / torch default beside one busy core, there at start or started later

_BUSY_CODE = (
    "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a = torch.tanh(a @ a)\n"
)


@dataclass
class Options:
    seconds: float = 8.0  # of training per measurement, after the warm-up steps
    rounds: int = 5
    batch: int = 32  # rows of 56 tokens per step (the main command's SFT batch)
    warmup: int = 5
    quiet_s: float = 3.0  # busy later: training before the busy process starts
    react_s: float = 8.0  # busy later: training after it starts, before the measurement
    interval_s: float = 1.0  # busy later: the governor's interval (a run's: 10 s)
    judged: bool = True

    @classmethod
    def quick(cls) -> "Options":
        return cls(seconds=1.0, rounds=1, batch=8, warmup=1, quiet_s=0.5, react_s=1.0, judged=False)


def child(
    variant: str,
    seconds: float,
    batch_rows: int = 32,
    warmup: int = 5,
    later: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """In a fresh process: set the variant's threads, train the tiny Llama for ``seconds``, return steps/s.
    ``later``: (quiet_s, react_s, interval_s) of the ``busy later`` condition (module docstring)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from causalrec.recbole.threads import govern_threads, resolve_num_threads

    if variant != "torch default":
        threads = 1 if variant == "1" else resolve_num_threads("auto")  # "auto-start": auto without the governor
        torch.set_num_threads(threads)
        if variant == "auto":
            governor = govern_threads(threads)
            if later is not None:
                governor.interval_s = later[2]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=600,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, config.vocab_size, (batch_rows, 56))

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def train_for(phase_s: float) -> float:
        """Train for ``phase_s`` seconds; steps per second."""
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < phase_s:
            step()
            steps += 1
        return steps / (time.perf_counter() - start)

    for _ in range(warmup):
        step()
    busy = None
    if later is not None:
        quiet_s, react_s, _ = later
        train_for(quiet_s)
        busy = _busy_process()
        train_for(react_s)  # the governor's looks happen here
    try:
        return {"steps_per_s": train_for(seconds), "threads": torch.get_num_threads()}
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def _measure(variant: str, opts: Options, later: bool = False) -> dict[str, Any]:
    env = child_env()
    env.pop("OMP_NUM_THREADS", None)  # torch's default and auto decide for themselves, as in a user's shell
    phases = (opts.quiet_s, opts.react_s, opts.interval_s) if later else None
    name = "auto-start" if variant == "auto, start only" else variant
    call = f"child({name!r}, {opts.seconds!r}, {opts.batch!r}, {opts.warmup!r}, {phases!r})"
    code = f"import json; from benchmarks.threads import child; print(json.dumps({call}))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600 + 100 * opts.seconds
    )
    if done.returncode != 0:
        raise RuntimeError(f"threads child {variant!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _busy_process() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _BUSY_CODE],
        env={**child_env(), "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: os.nice(19),
        start_new_session=True,  # its own session and autogroup, as another terminal's job (module docstring)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(opts: Options | None = None) -> dict[str, Any]:
    opts = opts or Options()
    results: dict[str, dict[str, Any]] = {}
    for condition in CONDITIONS:
        busy = _busy_process() if condition == "busy" else None
        variants = LATER_VARIANTS if condition == "busy later" else VARIANTS
        try:
            if busy is not None:
                time.sleep(1.0)  # let it take its core before auto looks
            values: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for r in range(opts.rounds):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for variant in order:
                    log_progress("threads: %s, %s, round %d", condition, variant, r + 1)
                    values[variant].append(_measure(variant, opts, later=condition == "busy later"))
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        rows = {
            v: {
                "steps_per_s": median([m["steps_per_s"] for m in ms]),
                "threads": sorted({m["threads"] for m in ms}),
                "values": [round(m["steps_per_s"], 3) for m in ms],
            }
            for v, ms in values.items()
        }
        base = rows["torch default"]["steps_per_s"]
        for row in rows.values():
            row["vs_torch_default"] = ratio(row["steps_per_s"], base)
        results[condition] = {"variants": rows, "load_avg": [round(x, 2) for x in os.getloadavg()]}
    quiet_ratio = results["quiet"]["variants"]["auto"]["vs_torch_default"]
    busy_ratio = results["busy"]["variants"]["auto"]["vs_torch_default"]
    later_ratio = results["busy later"]["variants"]["auto"]["vs_torch_default"]
    return {
        "benchmark": NAME,
        "config": {**opts.__dict__, "cores": len(os.sched_getaffinity(0))},
        "goals": [
            {
                "name": "tiny-Llama training steps/s, num_threads auto / torch default, quiet machine",
                "target": f">= {GOAL_QUIET}x",
                "measured": quiet_ratio,
                "passed": (quiet_ratio is not None and quiet_ratio >= GOAL_QUIET) if opts.judged else None,
            },
            {
                "name": "the same beside one busy single-threaded process (nice 19)",
                "target": f">= {GOAL_BUSY}x",
                "measured": busy_ratio,
                "passed": (busy_ratio is not None and busy_ratio >= GOAL_BUSY) if opts.judged else None,
            },
            {
                "name": "the same when that process starts after the run (busy later; the governor)",
                "target": f">= {GOAL_BUSY}x",
                "measured": later_ratio,
                "passed": (later_ratio is not None and later_ratio >= GOAL_BUSY) if opts.judged else None,
            },
        ],
        "results": results,
        "notes": [
            "each value is one child process; 'quiet' means nothing the benchmark started, check the load average",
            "threads: the count each child ran with at the end of its measurement (auto decides from the load it "
            "sees at start; its governor moves it later)",
            "busy later: the governor looks every interval_s seconds (a run's: 10 s), the measurement starts react_s "
            "seconds after the busy process",
        ],
    }


def summary(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    lines = [
        f"The main command's tiny Llama, training steps per second (median of {cfg['rounds']} children, "
        f"{fmt(cfg['seconds'])} s each, batch {cfg['batch']} x 56 tokens), {cfg['cores']} cores.",
        "",
    ]
    rows = []
    for condition, res in result["results"].items():
        for variant, row in res["variants"].items():
            threads = ",".join(map(str, row["threads"]))
            rows.append([condition, variant, threads, row["steps_per_s"], row["vs_torch_default"]])
    lines += md_table(["machine", "num_threads", "threads used", "steps/s", "x torch default"], rows)
    return lines
