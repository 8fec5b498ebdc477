"""Seed-level comparisons between cells of different `causalrec compare` folders (e.g. two information classes).

    python scripts/seed_pairs.py "runs/a CausalDPO runs/b GenRec seasonal" "runs/a CausalDPO runs/b GenRec regional"

Each argument is "FOLDER_A MODEL_A FOLDER_B MODEL_B SPLIT": the cells of both for the seeds they share are paired
(test NDCG@10): paired t-test over seeds, hierarchical bootstrap of the relative change from the cells' per-case
values (seeds, then users within seed; only where every paired cell kept them), Holm over all arguments, Cohen's d_z
(causalrec.experiments.statistics). Where the folders share one seed (a classical model converged once) there is
no seed-level test; the line below it gives a bootstrap over that run's customers and their Wilcoxon test, which
speak of the test set's sampling only. Reads FOLDER/cells/*.json as `compare --out FOLDER` writes them, or a published
folder (with per-case values only where published with `compare --publish-cases`, simulated data only).
"""

from __future__ import annotations

import sys

import arm_table
import numpy as np
from arm_table import METRIC

from causalrec.experiments.statistics import (
    customer_bootstrap,
    hierarchical_bootstrap,
    holm,
    paired_seed_test,
    pooled_wilcoxon,
)


def finished_cells(folder: str, model: str, split: str) -> dict[int, dict]:
    """The folder's finished cells by seed; those of a run's folder, or of a folder published with
    ``--publish-cases``, hold their per-case values (``cell["cases"]``)."""
    return arm_table.finished_cells(folder, model, split)


def per_user(cell: dict) -> dict[str, float]:
    return dict(zip(cell["cases"]["user"], cell["cases"]["metrics"][METRIC]))


def compare(folder_a: str, model_a: str, folder_b: str, model_b: str, split: str) -> dict:
    a, b = finished_cells(folder_a, model_a, split), finished_cells(folder_b, model_b, split)
    seeds = sorted(set(a) & set(b))
    test = paired_seed_test(
        {s: a[s]["result"]["test_result"][METRIC] for s in seeds},
        {s: b[s]["result"]["test_result"][METRIC] for s in seeds},
    )
    cases = {}
    if not all("cases" in a[s] and "cases" in b[s] for s in seeds):
        seeds = []  # a published real data set keeps no per-case values: the t-test alone, no interval
    for s in seeds:
        ua, ub = per_user(a[s]), per_user(b[s])
        users = sorted(set(ua) & set(ub))
        cases[s] = (np.array([ua[u] for u in users]), np.array([ub[u] for u in users]))
    row = {
        "name": f"{model_a} ({folder_a}) vs {model_b} ({folder_b})",
        "split": split,
        "test": test,
        "boot": hierarchical_bootstrap(cases),
    }
    if len(cases) == 1:  # one run each: no seed-level test; how far its customers alone move the comparison
        ((a_values, b_values),) = cases.values()
        row["customers"] = customer_bootstrap(a_values, b_values)
        row["wilcoxon_p"] = pooled_wilcoxon(a_values, b_values)[1]
    return row


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    for arg in argv:
        if len(arg.split()) != 5:
            raise SystemExit(
                f'seed_pairs.py: "{arg}" is {len(arg.split())} words; each argument is one quoted string of five: '
                '"FOLDER_A MODEL_A FOLDER_B MODEL_B SPLIT"'
            )
    rows = [compare(*arg.split()) for arg in argv]
    adjusted = holm([r["test"].p for r in rows])
    for r, p_holm in zip(rows, adjusted):
        t, b = r["test"], r["boot"]
        interval = (
            "[no per-case values]" if np.isnan(b.low) else f"[{b.low * 100:+.1f}, {b.high * 100:+.1f}]"
        )  # published real-data cells keep none (customer ids)
        print(
            f"{r['name']}  {r['split']}  n={t.n_seeds}  {t.mean:.4f} vs {t.baseline_mean:.4f}  "
            f"rel {t.rel_change * 100:+.1f}% {interval}  t p={t.p:.3g}  "
            f"Holm p={p_holm:.3g}  d_z={t.dz:+.2f}"
        )
        if "customers" in r:
            c = r["customers"]
            print(
                f"    one seed each: customers resampled (not training runs) [{c.low * 100:+.1f}, {c.high * 100:+.1f}]  "
                f"per-customer Wilcoxon p={r['wilcoxon_p']:.3g}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
