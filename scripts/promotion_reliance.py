"""How much a model follows retail-sim's planted promotion: the share of its top-10 that is the case's region's
promoted line, on the validation (or test) cases, beside the same share among the true next purchases. In a shop
without promotions (``sim_promotion: 0``) the lines are the ones that would be promoted: the reference.

    python scripts/promotion_reliance.py runs/promo-1.0 runs/promo-1.0-sftvrex3 --models GenRec,SDPORec

Each finished cell of each ``compare`` folder is rebuilt from its params with the folder's stage cache, so the
trained stages are loaded, not trained again (a model whose every stage is cached: GenRec, SDPORec, CausalDPO);
its ranking is RecBole's full-catalog one (history items masked). Prints one line per cell and a mean per folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

LLM_MODELS = {"GenRec", "SDPORec", "CausalDPO"}


def promoted_items(config) -> dict[str, set[str]]:
    """Per region, the raw ids of its promoted line's items (the simulation's truth)."""
    from causalrec.data.sources.retail_sim import simulate
    from causalrec.data.spec import DataSpec

    truth = simulate(DataSpec.from_mapping(dict(config.final_config_dict)))
    category = truth.item_category.to_dict()
    line = truth.region_promotion["category"].to_dict()
    return {r: {i for i, c in category.items() if c == line[r]} for r in line}


def reliance(cell: dict, split: str = "valid", k: int = 10) -> dict[str, float]:
    """The cell's model rebuilt from its stage cache, measured by ``shares``."""
    from causalrec.recbole.quick_start import build

    with tempfile.TemporaryDirectory(prefix="reliance-") as tmp:
        config, trainer, (train, valid, test) = build(
            cell["model"],
            "retail-sim",
            config_dict={**cell["params"], "checkpoint_dir": tmp, "show_progress": False},
            saved=False,
        )
        trainer.fit(train, valid, saved=False, show_progress=False)
        model = trainer.model.eval()
        promoted = promoted_items(config)
        return shares(
            lambda batch: model.full_sort_predict(batch.to(model.device)),
            valid if split == "valid" else test,
            promoted,
            k,
        )


def shares(score, data, promoted: dict[str, set[str]], k: int = 10) -> dict[str, float]:
    """``{"top": share of top-k slots on the case's region's promoted line, "truth": share of the cases' targets on
    it, "cases": n}`` over a RecBole full-sort loader; ``score(interaction)`` gives ``[cases, items]`` scores, and the
    padding item and each case's history are masked as RecBole's evaluation masks them."""
    dataset = data._dataset
    top_hits, true_hits, cases = 0, 0, 0
    with torch.no_grad():
        for interaction, history_index, _, _ in data:
            scores = score(interaction).view(len(interaction), -1).clone()
            scores[:, 0] = -np.inf
            if history_index is not None:
                scores[history_index] = -np.inf
            top = scores.topk(k, dim=1).indices.cpu().numpy()
            regions = dataset.id2token("region", interaction["region"].cpu().numpy())
            targets = dataset.id2token("item_id", interaction["item_id"].cpu().numpy())
            for row, region in enumerate(regions):
                line = promoted[region]
                top_hits += sum(item in line for item in dataset.id2token("item_id", top[row]))
                true_hits += targets[row] in line
                cases += 1
    return {"top": top_hits / (k * cases), "truth": true_hits / cases, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="compare --out folders")
    parser.add_argument("--models", default="GenRec,SDPORec,CausalDPO", help="comma-separated; LLM models only")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    args = parser.parse_args(argv)
    models = set(args.models.split(","))
    if models - LLM_MODELS:  # a classical model is not in the stage cache: rebuilding it would train it again
        parser.error(f"--models takes {sorted(LLM_MODELS)}; got {sorted(models - LLM_MODELS)}")
    for folder in args.folders:
        tops = []
        for path in sorted((folder / "cells").glob("*.json")):
            cell = json.loads(path.read_text())
            if cell.get("status") != "ok" or cell["model"] not in models:
                continue
            found = reliance(cell, args.split)
            tops.append(found["top"])
            print(
                f"{folder} {cell['model']} seed {cell['seed']}: top-10 on the promoted line {found['top']:.3f}, "
                f"true next purchases {found['truth']:.3f} ({found['cases']} {args.split} cases)",
                flush=True,
            )
        if tops:
            print(f"{folder}: mean {statistics.mean(tops):.3f} over {len(tops)} cells", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
