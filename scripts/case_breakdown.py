"""Where models win and lose on retail-sim: per-case test NDCG@10 broken down by what the test target is.

    python scripts/case_breakdown.py --split seasonal \
        "BPR=docs/results/retail-sim-items/classical:BPR" "CausalDPO=docs/results/retail-sim-items/llm:CausalDPO"

Each argument is NAME=FOLDER:MODEL, a `causalrec compare` folder whose cells kept their per-case values (a run's
`--out`, or a folder published with `--publish-cases`); a case's value is its mean over the seeds found. The
groups come from the prepared data (the default retail-sim, `data_seed` 2020): whether the target is a repeat
purchase (the customer bought it in the training or validation rows), whether its category is a seasonal line,
the tercile of its training popularity, and the test month. Prints one table per grouping, with case counts.
"""

from __future__ import annotations

import argparse
import glob
import sys

import pandas as pd

from causalrec.data import DataSpec, prepare
from causalrec.experiments.publish import read_cell

METRIC = "ndcg@10"
# retail-sim's categories with a selling season (causalrec.data.sources.retail_sim's seasonal lines)
SEASONAL_LINES = {
    "christmas decorations",
    "halloween",
    "winter accessories",
    "back to school",
    "easter",
    "swimwear and beach",
    "garden",
}


def targets(split: str) -> pd.DataFrame:
    """The test cases of ``split`` (one per user) with their groups."""
    prepared = prepare(DataSpec(dataset="retail-sim", split=split))
    read = lambda suffix: pd.read_csv(prepared.file(suffix), sep="\t")  # noqa: E731
    train, valid, test = read("train.inter"), read("valid.inter"), read("test.inter")
    items = pd.read_csv(prepared.file("items.tsv"), sep="\t").set_index("item_id")
    user, item = "user_id:token", "item_id:token"
    bought = pd.concat([train, valid]).groupby(user)[item].apply(set)
    frame = test.set_index(user)
    frame["repeat"] = [i in bought.get(u, set()) for u, i in zip(frame.index, frame[item])]
    frame["seasonal_line"] = items.loc[frame[item], "category"].isin(SEASONAL_LINES).to_numpy()
    popularity = train[item].value_counts().reindex(frame[item]).fillna(0).to_numpy()
    frame["popularity"] = pd.qcut(pd.Series(popularity).rank(method="first"), 3, labels=["tail", "mid", "head"]).values
    frame["month"] = pd.to_datetime(frame["timestamp:float"], unit="s").dt.month
    return frame


def case_means(folder: str, model: str, split: str) -> tuple[pd.Series, int]:
    """Per-user ``METRIC`` averaged over the seeds whose cells kept per-case values, and how many seeds."""
    seeds = []
    for path in glob.glob(f"{folder}/cells/{model}-{split}-seed*.json"):
        cell = read_cell(path)
        if cell and cell.get("status") == "ok" and cell.get("cases"):
            seeds.append(pd.Series(cell["cases"]["metrics"][METRIC], index=cell["cases"]["user"]))
    if not seeds:
        raise SystemExit(f"{folder}: no {model} {split} cell with per-case values")
    return pd.concat(seeds, axis=1).mean(axis=1), len(seeds)


def breakdown(split: str, arms: list[str]) -> tuple[dict[str, pd.DataFrame], pd.Series]:
    """Mean per-case ``METRIC`` of each arm (``NAME=FOLDER:MODEL``) by group: ``({grouping: table}, overall)``."""
    frame = targets(split)
    names = []
    for arm in arms:
        name, rest = arm.split("=", 1)
        folder, model = rest.rsplit(":", 1)
        values, n = case_means(folder, model, split)
        names.append(f"{name} ({n} seeds)")
        frame[names[-1]] = values.reindex(frame.index)
    tables = {}
    for group in ("repeat", "seasonal_line", "popularity", "month"):
        tables[group] = frame.groupby(group, observed=True)[names].mean()
        tables[group]["cases"] = frame.groupby(group, observed=True).size()
    return tables, frame[names].mean()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="seasonal")
    parser.add_argument("arms", nargs="+", metavar="NAME=FOLDER:MODEL")
    args = parser.parse_args(argv)
    tables, overall = breakdown(args.split, args.arms)
    for group, table in tables.items():
        print(f"\n{METRIC} by {group}\n{table.round(4).to_markdown()}")
    print("\nall cases: " + ", ".join(f"{name} {value:.4f}" for name, value in overall.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
