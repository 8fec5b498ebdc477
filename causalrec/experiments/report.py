"""Tables, significance tests and plots of a comparison's long results table.

Everything here is a function of ``results.csv`` (columns model, split, seed, environment, metric, value) and,
for the per-user test, of the per-case metric values stored in the cell records, so a report can be rebuilt
from the files alone.

* mean ± std: over seeds, ``std`` the sample standard deviation (ddof = 1);
* OOD drop: ``(mean on the split - mean on iid) / mean on iid`` in %;
* significance of each model against the baseline, per split and metric: a Wilcoxon signed-rank test over
  (seed, user) pairs pooled across the seeds both models finished (scipy's default ``zero_method="wilcox"``
  drops zero differences: ``n_pairs`` counts all pairs), and a paired t-test over the per-seed test metrics.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

_log = logging.getLogger(__name__)

SIGNIFICANCE_COLUMNS = ["split", "metric", "model", "baseline", "mean", "baseline_mean", "diff", "n_seeds",
                        "ttest_stat", "ttest_p", "n_pairs", "wilcoxon_stat", "wilcoxon_p"]


def summary(results, metric: str, environment: str = "all"):
    """Mean, sample std and seed count per (model, split) of one metric in one environment."""
    part = results[(results["metric"] == metric) & (results["environment"] == environment)]
    grouped = part.groupby(["model", "split"], sort=False)["value"]
    return grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f} ± n/a"


def metric_table(results, metric: str, models: Sequence[str], splits: Sequence[str], n_seeds: int,
                 environment: str = "all", drops: bool = True, not_run: Collection[tuple[str, str]] = ()) -> str:
    """A markdown table: models x splits of mean ± std, the best mean of each column in bold, and the drop
    from ``iid`` of every other split in % (when ``iid`` is among the splits). A (model, split) without a
    value reads "not run" when it is in ``not_run``, else "failed"."""
    from causalrec.evaluation import smaller_is_better

    stats = {(r.model, r.split): r for r in summary(results, metric, environment).itertuples()}
    smaller = smaller_is_better(metric)
    ood = [s for s in splits if s != "iid"] if drops and "iid" in splits else []
    header = ["model", *splits, *(f"{s} vs iid" for s in ood)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {}
    for split in splits:
        means = [stats[(m, split)].mean for m in models if (m, split) in stats]
        if means:
            best[split] = min(means) if smaller else max(means)
    for model in models:
        row = [model]
        for split in splits:
            r = stats.get((model, split))
            if r is None:
                row.append("not run" if (model, split) in not_run else "failed")
                continue
            text = _fmt(r.mean, r.std)
            if r.n < n_seeds:
                text += f" ({r.n}/{n_seeds} seeds)"
            if split in best and r.mean == best[split]:
                text = f"**{text}**"
            row.append(text)
        for split in ood:
            a, b = stats.get((model, split)), stats.get((model, "iid"))
            if a is None or b is None or b.mean == 0:
                row.append("n/a")
            else:
                row.append(f"{(a.mean - b.mean) / b.mean * 100:+.1f} %")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- significance
def empty_significance():
    import pandas as pd

    return pd.DataFrame(columns=SIGNIFICANCE_COLUMNS)


def _case_values(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, int], dict[str, dict[str, float]]]:
    """(model, split, seed) -> metric -> user -> value, from the cells' stored per-case values."""
    out = {}
    for rec in records:
        cases = rec.get("cases") if rec.get("status") == "ok" else None
        if not cases:
            continue
        users = cases["user"]
        out[(rec["model"], rec["split"], int(rec["seed"]))] = {
            metric: dict(zip(users, values)) for metric, values in cases["metrics"].items()
        }
    return out


CASE_COLUMNS = ["model", "split", "seed", "user", "metric", "value"]


def case_frame(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]):
    """Every finished cell's per-case test values of ``metrics`` (columns ``CASE_COLUMNS``, one row per
    (model, split, seed, user, metric)): what the Wilcoxon tests pair, kept beside the report so that cells run
    in other folders or on other machines can be pooled later without their cell cache."""
    import pandas as pd

    frames = []
    for (model, split, seed), by_metric in _case_values(records).items():
        for metric in metrics:
            values = by_metric.get(metric)
            if values:
                frames.append(pd.DataFrame({"model": model, "split": split, "seed": seed, "user": list(values),
                                            "metric": metric, "value": list(values.values())}))
    if not frames:
        return pd.DataFrame(columns=CASE_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values(CASE_COLUMNS[:5], kind="stable", ignore_index=True)


def paired_users(cases, model: str, baseline: str, split: str, metric: str, seeds: Sequence[int]):
    """``(x, y)``: the model's and the baseline's values on every (seed, user) both were tested on."""
    x, y = [], []
    for seed in seeds:
        a = cases.get((model, split, seed), {}).get(metric)
        b = cases.get((baseline, split, seed), {}).get(metric)
        if a is None or b is None:
            continue
        for user in sorted(set(a) & set(b)):
            x.append(a[user])
            y.append(b[user])
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def significance(results, records: Sequence[Mapping[str, Any]], baseline: str, metrics: Sequence[str]):
    """Each model against ``baseline`` per split and metric (columns ``SIGNIFICANCE_COLUMNS``), on the seeds
    both finished; a split where they share none has no row."""
    import pandas as pd
    from scipy import stats

    cases = _case_values(records)
    overall = results[results["environment"] == "all"]
    rows = []
    for metric in metrics:
        part = overall[overall["metric"] == metric]
        for split in part["split"].unique():
            at = part[part["split"] == split]
            base = at[at["model"] == baseline].set_index("seed")["value"]
            for model in at["model"].unique():
                if model == baseline:
                    continue
                mine = at[at["model"] == model].set_index("seed")["value"]
                seeds = sorted(set(mine.index) & set(base.index))
                if not seeds:  # the baseline has no finished cell on this split: nothing to pair
                    continue
                a, b = mine.loc[seeds].to_numpy(float), base.loc[seeds].to_numpy(float)
                t_stat = t_p = w_stat = w_p = float("nan")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # identical values: scipy warns, gives nan
                    if len(seeds) >= 2:
                        t = stats.ttest_rel(a, b)
                        t_stat, t_p = float(t.statistic), float(t.pvalue)
                    x, y = paired_users(cases, model, baseline, split, metric, seeds)
                    if len(x) and np.any(x != y):
                        w = stats.wilcoxon(x, y)
                        w_stat, w_p = float(w.statistic), float(w.pvalue)
                    elif len(x):
                        w_stat, w_p = 0.0, 1.0  # every pair tied: no evidence of a difference
                rows.append({
                    "split": split, "metric": metric, "model": model, "baseline": baseline,
                    "mean": float(a.mean()) if len(a) else float("nan"),
                    "baseline_mean": float(b.mean()) if len(b) else float("nan"),
                    "diff": float((a - b).mean()) if len(a) else float("nan"),
                    "n_seeds": len(seeds), "ttest_stat": t_stat, "ttest_p": t_p,
                    "n_pairs": int(len(x)), "wilcoxon_stat": w_stat, "wilcoxon_p": w_p,
                })
    return pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def significance_table(table) -> str:
    header = ["metric", "split", "model", "Δ mean", "Wilcoxon p (n pairs)", "paired t p (n seeds)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        lines.append(f"| {r.metric} | {r.split} | {r.model} | {r.diff:+.4f} | {_p(r.wilcoxon_p)} ({r.n_pairs}) | "
                     f"{_p(r.ttest_p)} ({r.n_seeds}) |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- markdown
def markdown(results, failures, significance_frame, config, protocol: str | None = None,
             not_run: Sequence[tuple[str, str, int]] = ()) -> str:
    """The whole ``report.md`` of a comparison; ``not_run``: (model, split, seed) of cells with no record."""
    seeds = config.seed_list()
    models, splits = list(config.models), list(config.splits)
    n_cells = len(models) * len(splits) * len(seeds)
    missing = f", {len(not_run)} not run" if not_run else ""
    parts = [
        f"# Comparison on {config.dataset}",
        "",
        f"{n_cells - len(failures) - len(not_run)} of {n_cells} cells finished{missing} ({len(models)} models x "
        f"{len(splits)} splits x {len(seeds)} seeds: {', '.join(map(str, seeds))}). Test metrics, mean ± sample "
        "std over seeds; bold: best per column; \"vs iid\": change of the mean from the iid split.",
    ]
    if protocol:
        parts += ["", f"Protocol: {protocol}."]
    unrun = {(model, split) for model, split, _ in not_run}
    env_fields = sorted({e.split("=", 1)[0] for e in results["environment"].unique() if "=" in e})
    for metric in config.report_metrics:
        if results.empty or metric not in set(results["metric"]):
            parts += ["", f"## {metric}", "", "no finished cell reports this metric"]
            continue
        parts += ["", f"## {metric}", "", metric_table(results, metric, models, splits, len(seeds), not_run=unrun)]
        for env_field in env_fields:
            parts += ["", f"### {metric}, worst {env_field}", "",
                      f"The {env_field} group with the lowest value in each cell among the groups with at least "
                      f"{config.min_env_cases} test cases (group sizes: the per-environment plots).", "",
                      metric_table(results, metric, models, splits, len(seeds), environment=f"{env_field}=<worst>",
                                   drops=False, not_run=unrun)]
    if config.baseline:
        parts += ["", f"## Significance against {config.baseline}", "",
                  "Wilcoxon signed-rank over (seed, user) pairs pooled across seeds; paired t-test over seeds.", "",
                  significance_table(significance_frame) if len(significance_frame) else "no pairs to test"]
    if len(failures):
        parts += ["", "## Failed cells", "", "| model | split | seed | error |", "|---|---|---|---|"]
        for r in failures.itertuples():
            error = " ".join(str(r.error).split())[:300].replace("|", "\\|")
            parts.append(f"| {r.model} | {r.split} | {r.seed} | {error} |")
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------- plots
def _bars(ax, groups: Sequence[str], series: Mapping[str, tuple[list[float], list[float]]]) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series (mean, std), std as error bar."""
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, (means, stds)) in enumerate(series.items()):
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=np.nan_to_num(stds), capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 4 else 0)


def environment_cases(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """(split, ``<field>=<label>``) -> test cases in that environment (the same for every model and seed)."""
    out: dict[tuple[str, str], int] = {}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        for env_field, by_label in (rec["result"].get("test_env_result") or {}).items():
            for label, metrics in by_label.items():
                if "cases" in metrics:
                    out.setdefault((rec["split"], f"{env_field}={label}"), int(metrics["cases"]))
    return out


def shown_groups(labels: Sequence[str], cases: Mapping[tuple[str, str], int] | None, split: str, env_field: str,
                 min_cases: int) -> tuple[list[str], int]:
    """The environment labels a plot shows (those with at least ``min_cases`` test cases; all of them when none
    has, or when the counts are unknown) and how many it leaves out."""
    big = [lb for lb in labels if not cases or cases.get((split, f"{env_field}={lb}"), 0) >= min_cases]
    return (big, len(labels) - len(big)) if big else (list(labels), 0)


def plots(results, metrics: Sequence[str], folder: Path,
          cases: Mapping[tuple[str, str], int] | None = None, min_cases: int = 1) -> list[str]:
    """``<metric>_by_split.png`` (mean ± std per model and split) and ``<metric>_<split>_environments.png``
    (per-environment bars for each split, labelled with their test cases when ``cases`` is given; groups with
    fewer than ``min_cases`` are left out, as in the worst-environment rows). Returns the written paths."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if results.empty:
        _log.info("no finished cell: no plots")
        return written
    models = list(dict.fromkeys(results["model"]))
    splits = list(dict.fromkeys(results["split"]))
    for metric in metrics:
        part = results[results["metric"] == metric]
        if part.empty:
            continue
        stats = summary(results, metric)
        fig = Figure(figsize=(max(6, 1.2 * len(splits) * max(1, len(models) / 3)), 4), layout="constrained")
        ax = fig.subplots()
        series = {}
        for model in models:
            rows = stats[stats["model"] == model].set_index("split")
            series[model] = ([rows["mean"].get(s, np.nan) for s in splits], [rows["std"].get(s, np.nan) for s in splits])
        _bars(ax, splits, series)
        ax.set_ylabel(metric)
        ax.set_title(f"test {metric} per split (mean ± std over seeds)")
        fig.legend(loc="outside lower center", fontsize="small", ncols=min(len(models), 5))  # off the bars
        path = folder / f"{_safe(metric)}_by_split.png"
        fig.savefig(path, dpi=120)
        written.append(str(path))
        for split in splits:
            at = part[(part["split"] == split) & part["environment"].str.contains("=")
                      & ~part["environment"].str.endswith("=<worst>")]
            if at.empty:
                continue
            env_fields = sorted({e.split("=", 1)[0] for e in at["environment"]})
            fig = Figure(figsize=(6 * len(env_fields), 4), layout="constrained")
            axes = np.atleast_1d(fig.subplots(1, len(env_fields)))
            for ax, env_field in zip(axes, env_fields):
                mine = at[at["environment"].str.startswith(f"{env_field}=")]
                labels = sorted({e.split("=", 1)[1] for e in mine["environment"]})
                labels, dropped = shown_groups(labels, cases, split, env_field, min_cases)
                agg = mine.groupby(["model", "environment"])["value"].agg(["mean", lambda v: v.std(ddof=1)])
                agg.columns = ["mean", "std"]
                series = {}
                for model in models:
                    keys = [(model, f"{env_field}={label}") for label in labels]
                    series[model] = ([agg["mean"].get(k, np.nan) for k in keys], [agg["std"].get(k, np.nan) for k in keys])
                shown = [f"{label}\n(n={cases[(split, f'{env_field}={label}')]})"
                         if cases and (split, f"{env_field}={label}") in cases else label for label in labels]
                _bars(ax, shown, series)
                small = f"\n({dropped} with < {min_cases} test cases not shown)" if dropped else ""
                ax.set_title(f"{split}: test {metric} per {env_field}{small}")
                ax.set_ylabel(metric)
            fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize="small",
                       ncols=min(len(models), 5))
            path = folder / f"{_safe(metric)}_{split}_environments.png"
            fig.savefig(path, dpi=120)
            written.append(str(path))
    return written


def _safe(name: str) -> str:
    return name.replace("@", "_at_").replace("/", "_")
