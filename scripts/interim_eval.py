"""Validation and test metrics of a classical cell that is still training: its best model so far (RecBole's
best-model file in the cell's checkpoint folder) evaluated on the cell's own data. A lower bound on the converged
cell, not a cell: nothing is recorded, and the README quotes such numbers as "evaluated by hand".

    python scripts/interim_eval.py --model GRU4Rec --dataset online-retail \
        --checkpoints runs/or-gru4rec-iid/checkpoints/5da21da148d01f8a \
        -p source=../shared/datasets/online_retail_uci/online_retail.csv.gz -p split=iid -p seed=2020

Give the settings the cell trains with (its `compare` --param / --config-files, split and seed); `compare <same
args> --report-only` names the cell's folder under `<out>/checkpoints/` and where its run stands. The newest
best-model file there is copied first (the running job may replace it) and read with causalrec's checkpoint loader.
Prints JSON: the file, the run's progress, validation and test metrics.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile

from causalrec.cli.common import add_config_options, parse_params
from causalrec.recbole.classical_trainer import SUFFIX, run_progress


def best_model_file(checkpoints: str) -> str:
    """The newest RecBole best-model file in ``checkpoints`` (not a last-epoch checkpoint)."""
    files = [p for p in glob.glob(os.path.join(glob.escape(checkpoints), "*.pth")) if not p.endswith(SUFFIX)]
    if not files:
        raise SystemExit(f"{checkpoints}: no best-model file (*.pth other than *{SUFFIX}) yet")
    return max(files, key=os.path.getmtime)


def interim_metrics(model: str, dataset: str, checkpoints: str, config_files=None, params=None) -> dict:
    import torch

    from causalrec.recbole.checkpoints import load_recbole_checkpoint
    from causalrec.recbole.quick_start import build

    source = best_model_file(checkpoints)
    with tempfile.TemporaryDirectory(prefix="interim-eval-") as tmp:
        copy = shutil.copy(source, os.path.join(tmp, "best.pth"))
        state = load_recbole_checkpoint(torch.load, copy, map_location="cpu")
        settings = {**(params or {}), "checkpoint_dir": os.path.join(tmp, "run"), "show_progress": False}
        _, trainer, (_, valid, test) = build(model, dataset, config_files, settings)
        trainer.model.load_state_dict(state["state_dict"])
        trainer.model.load_other_parameter(state.get("other_parameter"))
        return {
            "file": source,
            "progress": run_progress(checkpoints),
            "valid": dict(trainer.evaluate(valid, load_best_model=False)),
            "test": dict(trainer.evaluate(test, load_best_model=False)),
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--checkpoints", required=True, help="the cell's folder under <compare --out>/checkpoints/")
    add_config_options(parser)
    args = parser.parse_args(argv)
    found = interim_metrics(args.model, args.dataset, args.checkpoints, args.config_files, parse_params(args.param))
    print(json.dumps(found, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
