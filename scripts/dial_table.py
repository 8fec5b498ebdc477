"""The confounding dial's table (docs/causaldpo.md, issue 22 point 3) from published compare cells.

    python scripts/dial_table.py docs/results/retail-sim-dial docs/results/retail-sim-items/llm \
        docs/results/retail-sim-items/genrec-season docs/results/retail-sim-items/context

Reads every ``cells/*.json`` under the given folders, keeps retail-sim seasonal cells of the model seeds asked for
(``--model-seeds``, default 2020) whose settings are the defaults but for ``sim_confounding``, ``data_seed`` and the
information class (``prompt_environment: season`` + ``environment_inference: observed`` -> "GenRec + season";
``context_rerank: season`` -> "BPR + season"; CausalDPO with ``environment_inference: marginal`` -> "CausalDPO
marginal", the backdoor sum for every case, given no context; LightGCN with ``stopping_step: 300`` -> "LightGCN,
patience 300"), and prints test NDCG@10 per confounding level: the mean over data seeds (± std where there are
several) and the relative changes of ``COMPARISONS`` (each within one information class, and CausalDPO's default
against SDPORec across classes), averaged over the data seeds that have both; then the trend of each relative change
over the confounding level (least squares over the (level, data seed) points, scipy's ``linregress``: slope and
two-sided p).
``--plot PATH`` also draws both (matplotlib). ``--with KEY=VALUE`` keeps only the cells run with that setting (and
reads them as if it were a default): ``--with repeat_mix=auto`` gives the dial with the copy distribution.

With several model seeds (``--model-seeds 2020,2021,2022``) a shop's value for a column is the mean over those
seeds, and only the columns holding every one of them count: each (level, data seed) point then averages three
training runs instead of resting on one.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = (
    "GenRec",
    "SDPORec",
    "CausalDPO marginal",
    "LightGCN",
    "LightGCN, patience 300",
    "BPR",
    "SASRec",
    "CausalDPO",
    "GenRec + season",
    "BPR + season",
)
# the relative changes shown and fitted, (model, baseline): the first two within one information class; the third
# across classes (the default's test-time season), which on the seasonal split measures what the first does
COMPARISONS = (("CausalDPO marginal", "SDPORec"), ("CausalDPO", "GenRec + season"), ("CausalDPO", "SDPORec"))
# settings that do not change what a cell measures (its bookkeeping), or that this table reads itself
IGNORED = {"metrics", "topk", "valid_metric", "num_threads", "show_progress", "stage_cache_dir", "resume"}
IGNORED |= {"split", "seed", "sim_confounding", "data_seed"}
# settings passed explicitly to cells run before they became the model's causalrec default
NOW_DEFAULT = {("LightGCN", "epochs", 3000)}  # properties/model/LightGCN.yaml
CLASSES = {
    (): "",
    (("environment_inference", "observed"), ("prompt_environment", "season")): " + season",
    (("context_rerank", "season"),): " + season",
    (("environment_inference", "marginal"),): " marginal",  # CausalDPO's backdoor sum for every case: no context
    # LightGCN's validation can dip for 100+ epochs before it climbs (shop 1.0 / 2022): its default patience of 100
    # stopped it in the trough, so the dial also shows it with patience 300 (the same protocol on every shop)
    (("stopping_step", 300),): ", patience 300",
}


def column(cell: dict, model_seeds: tuple[int, ...] = (2020,), required: dict | None = None) -> str | None:
    """The table column of a cell, or None when it is not a default-settings dial cell of those model seeds (with
    every setting of ``required``, which is then read as a default)."""
    params = dict(cell["params"])
    for key, value in (required or {}).items():
        if str(params.pop(key, None)) != str(value):
            return None
    extra = tuple(
        sorted((k, v) for k, v in params.items() if k not in IGNORED and (cell["model"], k, v) not in NOW_DEFAULT)
    )
    if extra not in CLASSES or cell["split"] != "seasonal" or cell["seed"] not in model_seeds or cell["status"] != "ok":
        return None
    name = cell["model"] + CLASSES[extra]
    return name if name in COLUMNS else None


def collect(
    folders: list[str], model_seeds: tuple[int, ...] = (2020,), required: dict | None = None
) -> dict[tuple[float, int], dict[str, float]]:
    """{(sim_confounding, data_seed): {column: test NDCG@10, the mean over ``model_seeds``}}, keeping the columns
    that hold every one of those seeds; the first folder holding a cell wins."""
    runs: dict[tuple[float, int], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for folder in folders:
        for path in sorted(Path(folder).rglob("cells/*.json")):
            cell = json.loads(path.read_text())
            name = column(cell, model_seeds, required)
            if name is None:
                continue
            key = (float(cell["params"].get("sim_confounding", 0.8)), int(cell["params"].get("data_seed", 2020)))
            runs[key][name].setdefault(int(cell["seed"]), cell["result"]["test_result"]["ndcg@10"])
    table = {
        key: {
            name: statistics.mean(by_seed.values())
            for name, by_seed in cols.items()
            if len(by_seed) == len(model_seeds)
        }
        for key, cols in runs.items()
    }
    return {key: cols for key, cols in table.items() if cols}


def _mean(values: list[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _cell(rows: list[dict[str, float]], seeds: list[int], name: str) -> str:
    """The column's mean over the row's data seeds, naming the seeds it has where it lacks some."""
    have = [s for s, r in zip(seeds, rows) if name in r]
    text = _mean([r[name] for r in rows if name in r])
    return text if len(have) in (0, len(seeds)) else f"{text} (data seed {', '.join(map(str, have))})"


def _change(rows: list[dict[str, float]], model: str, baseline: str) -> str:
    changes = [r[model] / r[baseline] - 1 for r in rows if model in r and baseline in r]
    if not changes:
        return ""
    text = f"{100 * statistics.mean(changes):+.1f} %"
    return text + (
        f" (n={len(changes)}: " + ", ".join(f"{100 * c:+.1f}" for c in changes) + ")" if len(changes) > 1 else ""
    )


def markdown(table: dict[tuple[float, int], dict[str, float]]) -> str:
    levels = sorted({c for c, _ in table})
    lines = [
        "| sim_confounding | data seeds | " + " | ".join(COLUMNS + tuple(f"{m} vs {b}" for m, b in COMPARISONS)) + " |",
        "|" + "---|" * (len(COLUMNS) + len(COMPARISONS) + 2),
    ]
    for level in levels:
        seeds = sorted(s for c, s in table if c == level)
        rows = [table[(level, s)] for s in seeds]
        cells = [_cell(rows, seeds, name) for name in COLUMNS]
        cells += [_change(rows, m, b) for m, b in COMPARISONS]
        lines.append(f"| {level:.1f} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def changes(table, model: str, baseline: str) -> list[tuple[float, float]]:
    """(level, model / baseline - 1) of every (level, data seed) that has both."""
    return [(c, r[model] / r[baseline] - 1) for (c, _), r in sorted(table.items()) if model in r and baseline in r]


def trends(table) -> str:
    from scipy.stats import linregress

    lines = []
    for model, baseline in COMPARISONS:
        points = changes(table, model, baseline)
        if len({c for c, _ in points}) < 2 or len(points) < 3:
            lines.append(f"{model} vs {baseline}: {len(points)} (level, data seed) points, too few for a trend")
            continue
        fit = linregress([c for c, _ in points], [100 * d for _, d in points])
        lines.append(
            f"{model} vs {baseline}: slope {fit.slope:+.1f} points of relative change per unit of confounding "
            f"(p = {fit.pvalue:.2g}, {len(points)} (level, data seed) points); "
            f"{sum(d > 0 for _, d in points)} of {len(points)} changes positive"
        )
    return "\n".join(lines)


def plot(table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    levels = sorted({c for c, _ in table})
    styles = {
        "BPR": "s--",
        "LightGCN, patience 300": "d--",
        "SASRec": "x--",
        "GenRec + season": "^-",
        "SDPORec": "v-",
        "CausalDPO": "o-",
        "CausalDPO marginal": "o:",
    }
    for name, style in styles.items():
        # a level's mean only where the column has every data seed of that level; a gap breaks the line (NaN)
        means = [
            statistics.mean([table[k][name] for k in table if k[0] == c])
            if all(name in table[k] for k in table if k[0] == c)
            else float("nan")
            for c in levels
        ]
        if any(m == m for m in means):
            left.plot(levels, means, style, label=name)
    left.set(xlabel="sim_confounding", ylabel="test NDCG@10 (mean over data seeds)", title="retail-sim seasonal")
    left.legend(fontsize=8)
    for (model, baseline), marker in zip(COMPARISONS, ("o", "^", "v")):
        points = changes(table, model, baseline)
        label = f"{model} vs {baseline}"
        right.scatter([c for c, _ in points], [100 * d for _, d in points], marker=marker, label=label)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set(xlabel="sim_confounding", ylabel="relative change (%)", title="one point per data seed")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    args = sys.argv[1:]
    target, seeds, required = None, (2020,), {}
    if "--plot" in args:
        i = args.index("--plot")
        target, args = args[i + 1], args[:i] + args[i + 2 :]
    if "--model-seeds" in args:
        i = args.index("--model-seeds")
        seeds, args = tuple(int(x) for x in args[i + 1].split(",")), args[:i] + args[i + 2 :]
    while "--with" in args:
        i = args.index("--with")
        key, _, value = args[i + 1].partition("=")
        required[key], args = value, args[:i] + args[i + 2 :]
    found = collect(args, seeds, required)
    print(markdown(found))
    print()
    print(trends(found))
    if target:
        plot(found, target)
