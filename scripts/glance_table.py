"""The README's "at a glance" table, from published cells: for each data set, split and information class, the
classical row and the LLM row that validate best, and their test NDCG@10.

    python scripts/glance_table.py            # the table
    python scripts/glance_table.py --all      # and every candidate row with its validation and test
    python scripts/glance_table.py --write README.md   # replace the table in README.md with this one

Both sides are picked the same way, on validation only: among the candidate rows below (published `causalrec
compare` folders), the one whose mean validation NDCG@10 over its seeds is highest; the test is read after. A row
with fewer seeds competes with its mean over the seeds it has (the table says how many); a row published in several
folders (a first seed, then more) is one row over all its seeds. "history": the model is
given the customer's history only; "+ copy": every model also mixes in the customer's own purchase shares, with
its weight chosen on validation (`repeat_mix: auto`). The classes nest: a row given the history only competes in
"+ copy" too (weight 0 is one of `auto`'s choices; the label says "no copy"), so a configuration that was not run
with the copy cannot make the other side look better than the history alone shows; the "not run" column still
names the classical models without a cell of the class itself. The last columns compare the two picks: the ratio of test
means and, where they share three or more seeds, the seed-level paired t-test (causalrec.experiments.statistics).
Every published configuration of the class is a candidate, tuned and opt-in rows included, except: rows given the
case's season (CausalDPO's default and every "+ season" row: another information class); the fixed-weight copy
study (`repeat_mix: <w>`, superseded by `auto`; with it the picks are the same); and Online Retail's capped SASRec
cells, which predate cell files (README).
"""

from __future__ import annotations

import argparse
import glob
import sys
from dataclasses import dataclass

import numpy as np
from arm_table import METRIC, finished_cells

from causalrec.experiments.statistics import paired_seed_test
from causalrec.io import write_atomic

RS, TUNED = "docs/results/retail-sim-items", "docs/results/retail-sim-tuned"
OR, OR_FAST = "docs/results/online-retail-items", "docs/results/online-retail-fast"
SPLITS = ("iid", "seasonal", "regional")
INFO = ("history", "+ copy")  # information classes, each given all that the ones before it are
CLASSICAL = ("Pop", "ItemKNN", "BPR", "LightGCN", "GRU4Rec", "SASRec")  # the grid: a missing one is "not run"
MIN_SEEDS_FOR_TEST = 3


@dataclass(frozen=True)
class Arm:
    data: str
    info: str  # "history" or "+ copy"
    side: str  # "classical" or "LLM"
    label: str
    folder: str
    model: str


def _arms(data, info, side, rows):
    return [Arm(data, info, side, label, folder, model) for label, folder, model in rows]


ARMS = [
    *_arms(
        "retail-sim",
        "history",
        "classical",
        [
            ("Pop", f"{RS}/classical", "Pop"),
            ("ItemKNN", f"{RS}/classical", "ItemKNN"),
            ("BPR", f"{RS}/classical", "BPR"),
            ("BPR, tuned", f"{TUNED}/bpr", "BPR"),
            ("LightGCN", f"{RS}/lightgcn-5-seeds", "LightGCN"),
            ("LightGCN, tuned", f"{TUNED}/lightgcn", "LightGCN"),
            ("GRU4Rec", f"{RS}/gru4rec-converged", "GRU4Rec"),
            ("GRU4Rec", f"{RS}/gru4rec-regional-seeds", "GRU4Rec"),
            ("GRU4Rec", f"{RS}/gru4rec-iid-seeds", "GRU4Rec"),
            ("SASRec", f"{RS}/sasrec-converged", "SASRec"),
            ("SASRec", f"{RS}/sequential-graph", "SASRec"),
        ],
    ),
    *_arms(
        "retail-sim",
        "history",
        "LLM",
        [
            ("GenRec", f"{RS}/llm", "GenRec"),
            ("SDPORec", f"{RS}/llm", "SDPORec"),
            ("CausalDPO, backdoor sum", f"{RS}/causaldpo-marginal", "CausalDPO"),
            ("GenRec, `history_shuffles: 2`", f"{RS}/genrec-shuffles", "GenRec"),
            ("GenRec, `rank_orders: 3`", f"{RS}/genrec-rank-orders-3", "GenRec"),
            ("GenRec, `history_shuffles: 2`, `rank_orders: 3`", f"{RS}/genrec-shuffles-rank-orders-3", "GenRec"),
            ("GenRec, tuned", f"{TUNED}/genrec", "GenRec"),
            ("GenRec, tuned, `rank_orders: 3`", f"{TUNED}/genrec-rank-orders-3", "GenRec"),
            ("GenRec, tuned, `rank_orders: 15`", f"{TUNED}/genrec-rank-orders-15", "GenRec"),
            ("GenRec, tuned with `rank_orders` in the space", f"{TUNED}/genrec-orders", "GenRec"),
            ("GenRec, tuned with the size in the space", f"{TUNED}/genrec-size", "GenRec"),
            (
                "GenRec, tuned with the size in the space, `rank_orders: 3`",
                f"{TUNED}/genrec-size-rank-orders-3",
                "GenRec",
            ),
            ("SDPORec, tuned", f"{TUNED}/sdporec", "SDPORec"),
            ("GenRec, semantic ids", f"{RS}/semantic", "GenRec"),
            ("SDPORec, semantic ids", f"{RS}/semantic", "SDPORec"),
            ("CausalDPO, semantic ids, backdoor sum", f"{RS}/semantic", "CausalDPO"),
        ],
    ),
    *_arms(
        "retail-sim",
        "+ copy",
        "classical",
        [
            *((m, f"{RS}/repeat-mix-auto-classical", m) for m in ("Pop", "ItemKNN", "BPR", "LightGCN")),
            ("GRU4Rec", f"{RS}/repeat-mix-auto-gru4rec", "GRU4Rec"),
            ("GRU4Rec", f"{RS}/repeat-mix-auto-gru4rec-regional-seeds", "GRU4Rec"),
            ("SASRec", f"{RS}/repeat-mix-auto-sasrec", "SASRec"),
        ],
    ),
    *_arms(
        "retail-sim",
        "+ copy",
        "LLM",
        [
            ("GenRec", f"{RS}/repeat-mix-auto-llm", "GenRec"),
            ("SDPORec", f"{RS}/repeat-mix-auto-llm", "SDPORec"),
            ("CausalDPO, backdoor sum", f"{RS}/repeat-mix-auto-llm", "CausalDPO"),
            ("GenRec, tuned, `rank_orders: 3`", f"{TUNED}/genrec-repeat-mix-auto", "GenRec"),
        ],
    ),
    *_arms(
        "Online Retail",
        "history",
        "classical",
        [
            *((m, OR_FAST, m) for m in ("Pop", "ItemKNN", "BPR")),
            ("LightGCN", f"{OR}/lightgcn-converged", "LightGCN"),
            ("LightGCN", f"{OR}/lightgcn-converged-regional", "LightGCN"),
            ("LightGCN", f"{OR}/lightgcn-converged-iid", "LightGCN"),
            ("GRU4Rec", f"{OR}/gru4rec-converged", "GRU4Rec"),
            ("GRU4Rec", f"{OR}/gru4rec-converged-regional", "GRU4Rec"),
        ],
    ),
    *_arms(
        "Online Retail",
        "history",
        "LLM",
        [
            ("GenRec", OR, "GenRec"),
            ("SDPORec", OR, "SDPORec"),
            ("CausalDPO, backdoor sum", f"{OR}/causaldpo-marginal", "CausalDPO"),
            ("CausalDPO, season first, backdoor sum", f"{OR}/envfirst-marginal", "CausalDPO"),
            ("CausalDPO, season first, backdoor sum, 128 x 1", f"{OR}/envfirst-marginal-128x1", "CausalDPO"),
            ("GenRec, 128 x 1", f"{OR}/genrec-size-128x1", "GenRec"),
            ("SDPORec, 128 x 1", f"{OR}/genrec-size-128x1", "SDPORec"),
            ("GenRec, 128 x 1", f"{OR}/genrec-size-128x1-iid", "GenRec"),
            ("SDPORec, 128 x 1", f"{OR}/genrec-size-128x1-iid", "SDPORec"),
            ("GenRec, 128 x 2", f"{OR}/genrec-size-128x2-iid", "GenRec"),
            ("GenRec, 128 x 2, `tiny_dropout: 0.1`", f"{OR}/genrec-128x2-drop01-iid", "GenRec"),
            ("SDPORec, 128 x 2, `tiny_dropout: 0.1`", f"{OR}/genrec-128x2-drop01-iid", "SDPORec"),
            ("GenRec, 128 x 2, `tiny_dropout: 0.1`", f"{OR}/genrec-128x2-drop01-regional", "GenRec"),
            ("SDPORec, 128 x 2, `tiny_dropout: 0.1`", f"{OR}/genrec-128x2-drop01-regional", "SDPORec"),
            ("GenRec, 128 x 2", f"{OR}/genrec-size-128x2", "GenRec"),
            ("GenRec, 64 x 4", f"{OR}/genrec-size-64x4", "GenRec"),
            ("GenRec, 256 x 1", f"{OR}/genrec-size-256x1", "GenRec"),
            ("GenRec, 128 x 1, SFT weight decay 0.1", f"{OR}/genrec-128x1-wd01", "GenRec"),
            ("GenRec, 128 x 1, `tiny_dropout: 0.1`", f"{OR}/genrec-128x1-drop01", "GenRec"),
            ("GenRec, 128 x 1, `tiny_dropout: 0.3`", f"{OR}/genrec-128x1-drop03", "GenRec"),
            ("GenRec, V-REx over seasons in SFT", f"{OR}/sftvrex3", "GenRec"),
            ("GenRec, semantic ids, 128 x 1", f"{OR}/semantic-128x1", "GenRec"),
            ("GenRec, semantic ids, 64 codes a level, 128 x 1", f"{OR}/semantic-k64-128x1", "GenRec"),
            ("GenRec, semantic ids, 64 codes a level", f"{OR}/semantic-k64", "GenRec"),
            ("GenRec, semantic ids from a sentence encoder, 128 x 1", f"{OR}/semantic-sentence-k64-128x1", "GenRec"),
        ],
    ),
    *_arms(
        "Online Retail",
        "+ copy",
        "classical",
        [
            *((m, f"{OR}/repeat-mix-auto-fast", m) for m in ("Pop", "ItemKNN")),
            ("BPR", f"{OR}/repeat-mix-auto-bpr", "BPR"),
            ("GRU4Rec", f"{OR}/repeat-mix-auto-gru4rec", "GRU4Rec"),
        ],
    ),
    *_arms(
        "Online Retail",
        "+ copy",
        "LLM",
        [
            ("GenRec", f"{OR}/repeat-mix-auto-genrec", "GenRec"),
            ("SDPORec", f"{OR}/repeat-mix-auto-genrec", "SDPORec"),
            ("CausalDPO, season first, backdoor sum", f"{OR}/repeat-mix-auto-envfirst-marginal", "CausalDPO"),
        ],
    ),
]
# GenRec at its defaults, the fixed reference column: (data, info) -> folder
DEFAULTS = {
    ("retail-sim", "history"): f"{RS}/llm",
    ("retail-sim", "+ copy"): f"{RS}/repeat-mix-auto-llm",
    ("Online Retail", "history"): OR,
    ("Online Retail", "+ copy"): f"{OR}/repeat-mix-auto-genrec",
}


@dataclass
class Scores:
    label: str
    model: str
    valid: dict[int, float]
    test: dict[int, float]

    def mean(self, which: str) -> float:
        return float(np.mean(list(getattr(self, which).values())))

    def value(self) -> str:
        """Test mean ± std (seeds)."""
        test = list(self.test.values())
        spread = f" ± {np.std(test, ddof=1):.4f}" if len(test) > 1 else ""
        seeds = f"{len(test)} seeds" if len(test) > 1 else f"seed {next(iter(self.test))}"
        return f"{np.mean(test):.4f}{spread} ({seeds})"

    def text(self) -> str:
        return f"{self.label}: {self.value()}"


def scores(label: str, folder: str, model: str, split: str) -> Scores | None:
    cells = finished_cells(folder, model, split)
    if not cells:
        return None
    files = glob.glob(f"{folder}/cells/{model}-{split}-seed*.json")
    if len(files) > len(cells):  # two configurations of one seed (or a failed cell): which one is the row?
        raise SystemExit(f"{folder}: {len(files)} cells of {model} on {split} for {len(cells)} finished seeds")
    return Scores(
        label,
        model,
        {s: c["result"]["best_valid_result"][METRIC] for s, c in cells.items()},
        {s: c["result"]["test_result"][METRIC] for s, c in cells.items()},
    )


def pooled(rows: list[Scores | None]) -> list[Scores]:
    """One row per configuration: rows of one label and model from several folders (a first seed published with
    one run, more seeds with a later one) are one row over the union of their seeds; a seed whose values differ
    between two folders is two configurations under one label, refused."""
    by_name: dict[tuple[str, str], Scores] = {}
    for row in filter(None, rows):
        first = by_name.setdefault((row.label, row.model), Scores(row.label, row.model, {}, {}))
        for seed in row.test:
            if seed in first.test and (first.valid[seed], first.test[seed]) != (row.valid[seed], row.test[seed]):
                raise SystemExit(f"{row.label} ({row.model}): seed {seed} has two different cells under one label")
            first.valid[seed], first.test[seed] = row.valid[seed], row.test[seed]
    return list(by_name.values())


def own_rows(arms: list[Arm], data: str, info: str, side: str, split: str) -> list[Scores]:
    """The rows of the class ``info`` itself."""
    return pooled(
        [scores(a.label, a.folder, a.model, split) for a in arms if (a.data, a.info, a.side) == (data, info, side)]
    )


def candidates(arms: list[Arm], data: str, info: str, side: str, split: str) -> list[Scores]:
    """The rows of ``info``, then those of every class given less (labelled with what they lack: a tie of validation
    goes to the class's own row); none where the class has no row of its own."""
    own = own_rows(arms, data, info, side, split)
    if not own:
        return []
    less = [
        scores(f"{a.label}, no copy", a.folder, a.model, split)
        for a in arms
        if (a.data, a.side) == (data, side) and INFO.index(a.info) < INFO.index(info)
    ]
    return own + pooled(less)


def comparison(llm: Scores, classical: Scores) -> str:
    ratio = llm.mean("test") / classical.mean("test")
    text = f"{ratio:.1f}x" if ratio >= 2 else f"{100 * (ratio - 1):+.1f} %"
    shared = sorted(set(llm.test) & set(classical.test))
    if len(shared) < MIN_SEEDS_FOR_TEST:
        return text
    test = paired_seed_test({s: llm.test[s] for s in shared}, {s: classical.test[s] for s in shared})
    return f"{text} (t p = {test.p:.2g}, {len(shared)} seeds)"


def glance(arms: list[Arm] = ARMS, defaults: dict = DEFAULTS, show_all: bool = False) -> list[str]:
    """The table's markdown lines (with ``show_all``, then every candidate's line)."""
    lines = [
        "| data, split | given | classical row that validates best | GenRec (defaults) | LLM row that validates best "
        "| LLM vs classical (test) | best on test, where another | classical models not run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    listing = [
        "| data, split | given | side | row | seeds | valid NDCG@10 | test NDCG@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for data in dict.fromkeys(a.data for a in arms):
        for info in dict.fromkeys(a.info for a in arms):
            for split in SPLITS:
                sides = {side: candidates(arms, data, info, side, split) for side in ("classical", "LLM")}
                if not all(sides.values()):
                    continue
                picks = {side: max(rows, key=lambda r: r.mean("valid")) for side, rows in sides.items()}
                on_test = {side: max(rows, key=lambda r: r.mean("test")) for side, rows in sides.items()}
                other = "; ".join(
                    f"{side}: {on_test[side].text()}" for side in sides if on_test[side] is not picks[side]
                )
                default = scores("GenRec", defaults[(data, info)], "GenRec", split)
                own = own_rows(arms, data, info, "classical", split)
                missing = ", ".join(m for m in CLASSICAL if m not in {r.model for r in own})
                lines.append(
                    f"| {data} {split} | {info} | {picks['classical'].text()} | "
                    f"{default.value() if default else 'not run'} | {picks['LLM'].text()} | "
                    f"{comparison(picks['LLM'], picks['classical'])} | {other or '–'} | {missing or '–'} |"
                )
                for side, rows in sides.items():
                    for r in sorted(rows, key=lambda r: -r.mean("valid")):
                        listing.append(
                            f"| {data} {split} | {info} | {side} | {r.label} | {len(r.test)} | "
                            f"{r.mean('valid'):.4f} | {r.mean('test'):.4f} |"
                        )
    return lines + ([""] + listing if show_all else [])


def replace_table(text: str, table: list[str]) -> str:
    """``text`` with its glance table (the lines from the header row up to the first line that is not a table
    row) replaced by ``table``; a ValueError where ``text`` holds no such table or holds it twice."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line == table[0]]
    if len(starts) != 1:
        raise ValueError(f"expected one glance table header, found {len(starts)}")
    end = starts[0]
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join([*lines[: starts[0]], *table, *lines[end:]])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also list every candidate row")
    parser.add_argument(
        "--write", metavar="FILE", help="replace the table in FILE (e.g. README.md) instead of printing"
    )
    args = parser.parse_args(argv)
    if args.write and args.all:
        parser.error("--write replaces the table only; leave out --all")
    table = glance(show_all=args.all)
    if not args.write:
        print("\n".join(table))
        return 0
    with open(args.write, encoding="utf-8") as f:
        text = f.read()
    try:
        new = replace_table(text, table)
    except ValueError as err:
        parser.error(f"{args.write}: {err}")
    write_atomic(args.write, new)  # an interrupted write never leaves a half README
    print(f"{args.write}: glance table {'updated' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
