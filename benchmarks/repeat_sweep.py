"""``repeat_mix: auto``'s validation sweep: the model's scores kept for the ten weights vs its forward at each.

Only the mixture depends on the weight, so a sweep runs the model once per validation batch and mixes its kept
scores at each weight (``causalrec.recbole.repeat_mix._RawScores``, up to ``SWEEP_CACHE_BYTES``); the variant
``forward at every weight`` sets that limit to 0, as before 2026-12-06. One validation of retail-sim's seasonal
split per round (``Trainer._valid_epoch``, the call RecBole's epoch loop makes), interleaved, on one untrained
model per row (its cost, not its accuracy, is compared; ``tests/test_repeat_mix.py`` checks that both variants
score alike): LightGCN (a matrix product per batch), SASRec (a transformer over 50 items) and the item-token
GenRec of the main command (a tiny Llama forward over each prompt). Also the chosen weight and score of each
variant, which must agree.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import fmt, interleaved, log_progress, md_table, median, ratio

NAME = "repeat_sweep"
MODELS = ("LightGCN", "SASRec", "GenRec")
GOAL_LLM_RATIO = 3.0  # GenRec's validation, forward at every weight / scores kept


@dataclass
class Options:
    config: dict[str, Any] = field(default_factory=dict)  # extra RecBole keys (smaller data for --quick)
    models: tuple[str, ...] = MODELS
    repeats: int = 3
    warmup: int = 1
    judged: bool = True

    @classmethod
    def quick(cls) -> "Options":
        return cls(config={"sim_users": 300, "sim_items": 120}, repeats=1, warmup=0, judged=False)


def _trainer(model: str, tmp: str, config: dict[str, Any]):
    from causalrec.recbole import repeat_mix
    from causalrec.recbole.quick_start import build

    settings = {"show_progress": False, "checkpoint_dir": tmp, "repeat_mix": "auto", "split": "seasonal", **config}
    _, trainer, (_train, valid, test) = build(model, "retail-sim", config_dict=settings)
    if getattr(trainer.model, "ranks_repeats_itself", False):  # the LLM models' sweep is installed after training
        repeat_mix.choose_weight_per_validation(trainer, test)
    return trainer, valid


def run(opts: Options | None = None) -> dict[str, Any]:
    from causalrec.recbole import repeat_mix

    opts = opts or Options()
    kept_limit = repeat_mix.SWEEP_CACHE_BYTES
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-repeat-sweep-") as tmp:
        for model in opts.models:
            trainer, valid = _trainer(model, tmp, opts.config)
            chosen: dict[str, tuple[float, float]] = {}

            def validate(variant: str, limit: int, trainer=trainer, valid=valid, chosen=chosen) -> None:
                repeat_mix.SWEEP_CACHE_BYTES = limit
                try:
                    score, _ = trainer._valid_epoch(valid, show_progress=False)
                finally:
                    repeat_mix.SWEEP_CACHE_BYTES = kept_limit
                chosen[variant] = (trainer.repeat_mix_sweep[0], float(score))

            variants = {
                "forward at every weight": lambda v=validate: v("forward at every weight", 0),
                "scores kept": lambda v=validate: v("scores kept", kept_limit),
            }
            log_progress("repeat_sweep: %s, %d validations per variant", model, opts.repeats)
            wall, cpu = interleaved(variants, opts.repeats, warmup=opts.warmup)
            rows[model] = {
                "cases": int(valid.sample_size),  # validation cases (customers for LightGCN, rows for the others)
                "items": int(trainer.model.n_items),
                "every_weight_s": median(wall["forward at every weight"]),
                "kept_s": median(wall["scores kept"]),
                "every_weight_cpu_s": median(cpu["forward at every weight"]),
                "kept_cpu_s": median(cpu["scores kept"]),
                "wall_values_s": wall,
                "chosen": {k: list(v) for k, v in chosen.items()},
                "same_choice": chosen["forward at every weight"] == chosen["scores kept"],
            }
            rows[model]["ratio"] = ratio(rows[model]["every_weight_s"], rows[model]["kept_s"])
    llm = rows.get("GenRec", {}).get("ratio")
    return {
        "benchmark": NAME,
        "config": {**opts.__dict__, "models": list(opts.models)},
        "goals": [
            {
                "name": "GenRec validation with repeat_mix auto, forward at every weight / scores kept",
                "target": f">= {GOAL_LLM_RATIO}x",
                "measured": llm,
                "passed": (llm is not None and llm >= GOAL_LLM_RATIO) if opts.judged else None,
            },
            {
                "name": "same weight and validation score either way",
                "target": "all models",
                "measured": all(r["same_choice"] for r in rows.values()),
                "passed": all(r["same_choice"] for r in rows.values()),
            },
        ],
        "results": {"models": rows},
        "notes": ["Untrained models: the cost of a validation, not its score, is compared; one torch thread."],
    }


def summary(result: dict[str, Any]) -> list[str]:
    rows = [
        [name, r["items"], r["every_weight_s"], r["kept_s"], r["ratio"], "yes" if r["same_choice"] else "NO"]
        for name, r in result["results"]["models"].items()
    ]
    lines = ["One validation of retail-sim's seasonal split at the ten weights of `repeat_mix: auto`; medians.", ""]
    lines += md_table(["model", "items", "forward at every weight s", "scores kept s", "ratio", "same choice"], rows)
    return lines + ["", f"GenRec: {fmt(result['results']['models'].get('GenRec', {}).get('ratio'))}x."]
