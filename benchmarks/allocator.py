"""RecBole training with glibc's default malloc vs causalrec's heap allocator (compat B15), on SASRec.

One RecBole ``SASRec`` trainer on ``retail-sim``; each round trains one epoch (``Trainer._train_epoch``) with
glibc's defaults and one inside ``compat.heap_allocator()``, interleaved, on the same model (which keeps
training: timing, not accuracy, is compared; ``tests/test_compat_allocator.py`` checks that the weights are
bitwise the same either way). Reported per epoch: wall and CPU seconds of this process and its minor page
faults (each one a zeroed page the kernel had to map). The heap context is entered per epoch, so every heap
epoch starts with a trimmed heap: ``Trainer.fit`` enters it once for all epochs, so this is the cautious side.
"""

from __future__ import annotations

import contextlib
import resource
import tempfile
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import fmt, interleaved, log_progress, md_table, median, ratio, skipped

NAME = "allocator"
GOAL_CPU_RATIO = 1.3  # glibc default CPU s / heap CPU s per epoch, at the default (full retail-sim) size


@dataclass
class Options:
    config: dict[str, Any] = field(default_factory=dict)  # extra RecBole keys (smaller data / model for --quick)
    repeats: int = 3
    warmup: int = 1
    judged: bool = True  # the goal is stated for retail-sim's defaults and SASRec's own defaults

    @classmethod
    def quick(cls) -> "Options":
        return cls(config={"sim_users": 300, "sim_items": 120}, repeats=2, warmup=0, judged=False)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run(opts: Options | None = None) -> dict[str, Any]:
    import causalrec
    from causalrec import allocator as compat

    opts = opts or Options()
    if compat._glibc() is None:
        message = "not glibc, or malloc tuned by the user (CAUSALREC_MALLOC_TUNING=0, GLIBC_TUNABLES, ...): B15 is off"
        return skipped(NAME, message, {**opts.__dict__})
    with tempfile.TemporaryDirectory(prefix="bench-allocator-") as tmp:
        config, trainer, (train, _valid, _test) = causalrec.recbole.quick_start.build(
            "SASRec", "retail-sim", config_dict={"show_progress": False, "checkpoint_dir": tmp, **opts.config}
        )
        faults: dict[str, list[int]] = {"glibc_default": [], "heap_b15": []}
        epoch = [0]

        def one_epoch(name: str, context) -> None:
            before = _faults()
            with context():
                trainer._train_epoch(train, epoch[0], show_progress=False)
            faults[name].append(_faults() - before)
            epoch[0] += 1

        variants = {
            "glibc_default": lambda: one_epoch("glibc_default", contextlib.nullcontext),
            "heap_b15": lambda: one_epoch("heap_b15", compat.heap_allocator),
        }
        log_progress("allocator: SASRec on retail-sim, %d timed epochs per variant", opts.repeats)
        wall, cpu = interleaved(variants, opts.repeats, warmup=opts.warmup)
        timed = {name: values[opts.warmup :] for name, values in faults.items()}  # the warm-up rounds come first
        rows = {
            name: {
                "wall_s": median(wall[name]),
                "cpu_s": median(cpu[name]),
                "minor_faults": median(timed[name]),
                "wall_values_s": wall[name],
                "cpu_values_s": cpu[name],
            }
            for name in variants
        }
        sizes = {
            "interactions": int(train.dataset.inter_num),
            "batch": int(config["train_batch_size"]),
            "hidden_size": int(config["hidden_size"]),
            "max_len": int(config["MAX_ITEM_LIST_LENGTH"]),
        }
    cpu_ratio = ratio(rows["glibc_default"]["cpu_s"], rows["heap_b15"]["cpu_s"])
    return {
        "benchmark": NAME,
        "config": {**opts.__dict__, **sizes},
        "goals": [
            {
                "name": "SASRec epoch, CPU s glibc default / heap allocator",
                "target": f">= {GOAL_CPU_RATIO}x",
                "measured": cpu_ratio,
                "passed": (cpu_ratio is not None and cpu_ratio >= GOAL_CPU_RATIO) if opts.judged else None,
            }
        ],
        "results": {
            "variants": rows,
            "cpu_ratio": cpu_ratio,
            "wall_ratio": ratio(rows["glibc_default"]["wall_s"], rows["heap_b15"]["wall_s"]),
        },
        "notes": [
            "CPU s include the kernel's time mapping and zeroing pages (what the heap allocator removes); "
            "torch threads as set by --threads."
        ],
    }


def summary(result: dict[str, Any]) -> list[str]:
    res, cfg = result["results"], result["config"]
    rows = [[name, v["wall_s"], v["cpu_s"], v["minor_faults"]] for name, v in res["variants"].items()]
    lines = [
        f"SASRec, {fmt(cfg.get('interactions'))} training interactions, batch {cfg.get('batch')}, "
        f"hidden {cfg.get('hidden_size')}, max length {cfg.get('max_len')}; medians per epoch.",
        "",
    ]
    lines += md_table(["malloc", "wall s", "CPU s", "minor page faults"], rows)
    lines += ["", f"glibc default / heap: CPU {fmt(res['cpu_ratio'])}x, wall {fmt(res['wall_ratio'])}x."]
    return lines
