"""One markdown row per arm (a model in a `causalrec compare` folder): mean ± std over seeds of validation and test
NDCG@10, and for CausalDPO with latent environments what its clusters found (NMI / ARI of the hard assignments
against the labelled environment, and a linear probe's held-out accuracy beside the majority rate).

    python scripts/arm_table.py --split seasonal --label region \
        "S-DPO=docs/results/retail-sim-promotion/promo-1.0:SDPORec" \
        "latent=docs/results/retail-sim-promotion/promo-1.0-latent:CausalDPO"

Reads FOLDER/cells/*.json as `compare --out FOLDER` (or `--publish FOLDER`) writes them (`publish.read_cell`: a
published cell's per-case values come back from its `--publish-cases` file); seed_pairs.py pairs two arms from
their per-case values.
"""

from __future__ import annotations

import argparse
import glob
import sys

import numpy as np

from causalrec.experiments.publish import read_cell

METRIC = "ndcg@10"


def finished_cells(folder: str, model: str, split: str) -> dict[int, dict]:
    """The folder's finished cells of ``model`` on ``split`` by seed (published cells included)."""
    out = {}
    for path in glob.glob(f"{folder}/cells/{model}-{split}-seed*.json"):
        cell = read_cell(path)
        if cell and cell.get("status") == "ok":
            out[cell["seed"]] = cell
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def row(name: str, folder: str, model: str, split: str, label: str) -> str:
    cells = finished_cells(folder, model, split)
    seeds = sorted(cells)
    valid = [cells[s]["result"]["best_valid_result"][METRIC] for s in seeds]
    test = [cells[s]["result"]["test_result"][METRIC] for s in seeds]
    found = [(cells[s]["result"].get("stages") or [{}])[-1].get("environment_recovery") or {} for s in seeds]
    found = [f for f in found if f]
    recovery = "–"
    if found:
        keys = ("nmi", "ari", "probe", "chance")
        means = {k: np.mean([f[f"{k}/{label}"] for f in found if f"{k}/{label}" in f]) for k in keys}
        recovery = " / ".join(f"{means[k]:.3f}" for k in keys)
    return f"| {name} | {len(seeds)} | {mean_std(valid)} | {mean_std(test)} | {recovery} |"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arms", nargs="+", help="NAME=FOLDER:MODEL")
    parser.add_argument("--split", default="seasonal")
    parser.add_argument("--label", default="region", help="the labelled environment the clusters are scored on")
    args = parser.parse_args(argv)
    print(f"| arm | seeds | valid {METRIC} | test {METRIC} | NMI / ARI / probe / chance vs {args.label} |")
    print("|---|---|---|---|---|")
    for arm in args.arms:
        name, _, where = arm.partition("=")
        folder, _, model = where.rpartition(":")
        print(row(name, folder, model, args.split, args.label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
