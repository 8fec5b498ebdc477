"""torch's thread count on a quiet and on a busy machine: torch's default (one thread per core), ``num_threads: 1``
and ``num_threads: auto`` (causalrec.recbole.threads: one per core free at start).

Each measurement is a child process (torch reads its thread settings once) that trains the main command's tiny
Llama (hidden 64, 2 layers, 4 heads, MLP 256, batch 32 x 56 tokens; full fine-tuning with AdamW, as its SFT stage)
for ``seconds`` and reports steps per second. Conditions: ``quiet`` (nothing started by the benchmark) and
``busy`` (one single-threaded CPU-bound process at nice 19 beside it, in its own session, as another terminal's or
user's job: with Linux's scheduler autogroups, on by default, a process in another session gets an equal share of a
core whatever its nice value, so ``nice`` does not keep it out of the run's way). Variants run interleaved, rounds
rotated; medians and ratios to torch's default within each condition. The ``quiet`` rows are only quiet if the
machine is: the load average is recorded.
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
CONDITIONS = ("quiet", "busy")
GOAL_QUIET = 0.9  # auto / torch default on a quiet machine: auto must not cost a quiet machine its speed
GOAL_BUSY = 2.0  # auto / torch default beside one busy core

_BUSY_CODE = (
    "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a = torch.tanh(a @ a)\n"
)


@dataclass
class Options:
    seconds: float = 8.0  # of training per measurement, after the warm-up steps
    rounds: int = 5
    batch: int = 32  # rows of 56 tokens per step (the main command's SFT batch)
    warmup: int = 5
    judged: bool = True

    @classmethod
    def quick(cls) -> "Options":
        return cls(seconds=1.0, rounds=1, batch=8, warmup=1, judged=False)


def child(variant: str, seconds: float, batch_rows: int = 32, warmup: int = 5) -> dict[str, Any]:
    """In a fresh process: set the variant's threads, train the tiny Llama for ``seconds``, return steps/s."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from causalrec.recbole.threads import resolve_num_threads

    if variant != "torch default":
        torch.set_num_threads(resolve_num_threads("auto" if variant == "auto" else int(variant)))
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

    for _ in range(warmup):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return {"steps_per_s": steps / (time.perf_counter() - start), "threads": torch.get_num_threads()}


def _measure(variant: str, opts: Options) -> dict[str, Any]:
    env = child_env()
    env.pop("OMP_NUM_THREADS", None)  # torch's default and auto decide for themselves, as in a user's shell
    call = f"child({variant!r}, {opts.seconds!r}, {opts.batch!r}, {opts.warmup!r})"
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
        try:
            if busy is not None:
                time.sleep(1.0)  # let it take its core before auto looks
            values: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
            for r in range(opts.rounds):
                order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
                for variant in order:
                    log_progress("threads: %s, %s, round %d", condition, variant, r + 1)
                    values[variant].append(_measure(variant, opts))
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
        ],
        "results": results,
        "notes": [
            "each value is one child process; 'quiet' means nothing the benchmark started, check the load average",
            "threads: the count each child ran with (auto decides from the load it sees at start)",
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
