"""Tables, significance tests and plots of a comparison's long results table.

Everything here is a function of ``results.csv`` (columns model, split, seed, environment, metric, value) and,
for the bootstrap and the per-user test, of the per-case metric values stored in the cell records
(``cases.csv.gz``), so a report can be rebuilt from the files alone.

* mean ± std: over seeds, ``std`` the sample standard deviation (ddof = 1);
* OOD drop: ``(mean on the split - mean on iid) / mean on iid`` in %;
* significance of each model against the baseline, per split and metric, with the training run (seed) as the
  unit of replication (``causalrec.experiments.statistics``): a paired t-test over the seeds both models
  finished, its 95 % t interval of the mean difference and Cohen's d_z, the relative change of the means with a
  hierarchical-bootstrap 95 % interval (seeds, then users within seed), and Holm's correction over every row of
  the table; a Wilcoxon signed-rank test over (seed, user) pairs pooled across seeds (scipy's default
  ``zero_method="wilcox"`` drops zero differences: ``n_pairs`` counts all pairs) is a secondary figure only, as
  it treats the users of different runs as independent replicates.

Why this module is long: every table and plot reads the same long results table with the same grouping and statistics helpers; the statistics themselves are in ``statistics.py``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

_log = logging.getLogger(__name__)

SIGNIFICANCE_COLUMNS = [
    "split",
    "metric",
    "model",
    "baseline",
    "n_seeds",
    "mean",
    "baseline_mean",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
    "rel_change",
    "rel_ci_low",
    "rel_ci_high",
    "ttest_stat",
    "ttest_p",
    "holm_p",
    "cohens_dz",
    "n_pairs",
    "wilcoxon_stat",
    "wilcoxon_p",
]
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


def summary(results, metric: str, environment: str = "all"):
    """Mean, sample std and seed count per (model, split) of one metric in one environment."""
    part = results[(results["metric"] == metric) & (results["environment"] == environment)]
    grouped = part.groupby(["model", "split"], sort=False)["value"]
    return grouped.agg(mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f} ± n/a"


def metric_table(
    results,
    metric: str,
    models: Sequence[str],
    splits: Sequence[str],
    n_seeds: int,
    environment: str = "all",
    drops: bool = True,
    not_run: Collection[tuple[str, str]] = (),
) -> str:
    """A markdown table: models x splits of mean ± std, the best mean of each column in bold, and the drop
    from ``iid`` of every other split in % (when ``iid`` is among the splits). A (model, split) without a
    value reads "not run" when it is in ``not_run``, else "failed"."""
    from causalrec.recbole.evaluation import smaller_is_better

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
                frames.append(
                    pd.DataFrame(
                        {
                            "model": model,
                            "split": split,
                            "seed": seed,
                            "user": list(values),
                            "metric": metric,
                            "value": list(values.values()),
                        }
                    )
                )
    if not frames:
        return pd.DataFrame(columns=CASE_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values(CASE_COLUMNS[:5], kind="stable", ignore_index=True)


def paired_cases(cases, model: str, baseline: str, split: str, metric: str, seeds: Sequence[int]):
    """seed -> ``(x, y)``: the model's and the baseline's values on the users both were tested on, for each of
    ``seeds`` where both cells kept their per-case values."""
    out = {}
    for seed in seeds:
        a = cases.get((model, split, seed), {}).get(metric)
        b = cases.get((baseline, split, seed), {}).get(metric)
        if a is None or b is None:
            continue
        users = sorted(set(a) & set(b))
        if not users:
            continue
        out[seed] = (
            np.array([a[u] for u in users], dtype=np.float64),
            np.array([b[u] for u in users], dtype=np.float64),
        )
    return out


def paired_users(cases, model: str, baseline: str, split: str, metric: str, seeds: Sequence[int]):
    """``(x, y)``: the model's and the baseline's values on every (seed, user) both were tested on."""
    pairs = paired_cases(cases, model, baseline, split, metric, seeds)
    if not pairs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([x for x, _ in pairs.values()]), np.concatenate([y for _, y in pairs.values()])


def compare_pair(a, b, pairs, n_boot: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """One row of the significance table (without its names and Holm p) from the per-seed metrics ``a``
    (model) and ``b`` (baseline), paired by position, and ``pairs`` (seed -> per-user values; the bootstrap
    runs only when it covers every seed of ``a``, so that both figures speak of the same runs)."""
    from causalrec.experiments.statistics import hierarchical_bootstrap, paired_seed_test, pooled_wilcoxon

    test = paired_seed_test(a, b)
    boot_low = boot_high = float("nan")
    if len(pairs) == test.n_seeds >= 2:
        boot = hierarchical_bootstrap(pairs, n_boot=n_boot, seed=seed)
        boot_low, boot_high = boot.low, boot.high
    x = np.concatenate([v[0] for v in pairs.values()]) if pairs else np.zeros(0)
    y = np.concatenate([v[1] for v in pairs.values()]) if pairs else np.zeros(0)
    w_stat, w_p = pooled_wilcoxon(x, y)
    return {
        "n_seeds": test.n_seeds,
        "mean": test.mean,
        "baseline_mean": test.baseline_mean,
        "diff": test.diff,
        "diff_ci_low": test.diff_low,
        "diff_ci_high": test.diff_high,
        "rel_change": test.rel_change,
        "rel_ci_low": boot_low,
        "rel_ci_high": boot_high,
        "ttest_stat": test.t,
        "ttest_p": test.p,
        "cohens_dz": test.dz,
        "n_pairs": int(len(x)),
        "wilcoxon_stat": w_stat,
        "wilcoxon_p": w_p,
    }


def significance(
    results,
    records: Sequence[Mapping[str, Any]],
    baseline: str,
    metrics: Sequence[str],
    n_boot: int = BOOTSTRAP_REPLICATES,
):
    """Each model against ``baseline`` per split and metric (columns ``SIGNIFICANCE_COLUMNS``), on the seeds
    both finished; a split where they share none has no row. ``holm_p`` adjusts ``ttest_p`` over every row."""
    import pandas as pd

    from causalrec.experiments.statistics import holm

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
                pairs = paired_cases(cases, model, baseline, split, metric, seeds)
                row = compare_pair(mine.loc[seeds].to_numpy(float), base.loc[seeds].to_numpy(float), pairs, n_boot)
                rows.append({"split": split, "metric": metric, "model": model, "baseline": baseline, **row})
    frame = pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)
    frame["holm_p"] = holm(frame["ttest_p"].to_numpy(float)) if len(frame) else []
    return frame


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def _interval(low: float, high: float, fmt: str) -> str:
    return "" if math.isnan(low) or math.isnan(high) else f" [{low:{fmt}}, {high:{fmt}}]"


def significance_table(table) -> str:
    """The markdown table of ``significance``'s frame: the seed-level columns first, the pooled Wilcoxon last."""
    header = [
        "metric",
        "split",
        "model",
        "n seeds",
        "Δ mean [95 % t CI]",
        "rel. change [95 % bootstrap CI]",
        "paired t p",
        "Holm p",
        "d_z",
        "secondary: pooled (seed, user) Wilcoxon p (n pairs)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples():
        diff = f"{r.diff:+.4f}{_interval(r.diff_ci_low, r.diff_ci_high, '+.4f')}"
        rel = (
            "n/a"
            if math.isnan(r.rel_change)
            else f"{r.rel_change * 100:+.1f} %{_interval(r.rel_ci_low * 100, r.rel_ci_high * 100, '+.1f')}"
        )
        dz = "n/a" if math.isnan(r.cohens_dz) else f"{r.cohens_dz:+.2f}"
        lines.append(
            f"| {r.metric} | {r.split} | {r.model} | {r.n_seeds} | {diff} | {rel} | {_p(r.ttest_p)} | "
            f"{_p(r.holm_p)} | {dz} | {_p(r.wilcoxon_p)} ({r.n_pairs}) |"
        )
    return "\n".join(lines)


def significance_text(table, n_boot: int = BOOTSTRAP_REPLICATES) -> str:
    """What the columns of ``significance_table`` mean (the family size of the Holm correction included)."""
    family = int(table["ttest_p"].notna().sum()) if len(table) else 0
    return (
        "The unit of replication is the training run (seed): tests and intervals are over the seeds both models "
        "finished (n seeds). Δ mean: mean over seeds of model - baseline, with its 95 % t interval. "
        "rel. change: mean over seeds of the model / that of the baseline - 1, with a 95 % percentile interval "
        f"from a hierarchical bootstrap ({n_boot} replicates: seeds resampled with replacement, then users with "
        "replacement within each drawn seed, the same users for both models; blank under 2 seeds or when a seed's "
        "per-case values were not kept; with 3-5 seeds it is too narrow, so read it with the t test). "
        "paired t p: paired t-test over seeds; Holm p: Holm-Bonferroni adjusted over the "
        f"{family} tests of this table (splits x metrics x models); d_z: Cohen's d_z, mean / sd of the seeds' "
        "differences. Secondary, for reference only: a Wilcoxon signed-rank test over (seed, user) pairs pooled "
        "across seeds, which treats the users of different runs as independent replicates and so overstates "
        "the evidence."
    )


# ----------------------------------------------------------------------------------------- markdown
def validation_choices(records: Sequence[Mapping[str, Any]]) -> str:
    """A table of what each cell chose on validation after training (``repeat_mix: auto``'s weight), per model and
    split with one value per seed; "" when no cell chose anything."""
    chosen: dict[tuple[str, str], list[str]] = {}
    for r in sorted(records, key=lambda r: (str(r.get("model")), str(r.get("split")), int(r.get("seed", 0)))):
        choice = (r.get("result") or {}).get("repeat_mix") if r.get("status") == "ok" else None
        if choice is not None:
            chosen.setdefault((r["model"], r["split"]), []).append(f"{choice['weight']:g} ({r['seed']})")
    if not chosen:
        return ""
    rows = [f"| {model} | {split} | {', '.join(values)} |" for (model, split), values in chosen.items()]
    return "\n".join(["| model | split | `repeat_mix` chosen (seed) |", "|---|---|---|", *rows])


def markdown(
    results,
    failures,
    significance_frame,
    config,
    protocol: str | None = None,
    not_run: Sequence[tuple[str, str, int]] = (),
    significance_notes: Sequence[str] = (),
    choices: str = "",
    capped: Sequence[tuple[str, str, int, Mapping[str, int]]] = (),
) -> str:
    """The whole ``report.md`` of a comparison; ``not_run``: (model, split, seed) of cells with no record;
    ``capped``: (model, split, seed, ``epoch_cap``) of cells that ran out of epochs before early stopping;
    ``significance_notes``: lines printed above the significance table (e.g. per-case values not published);
    ``choices``: ``validation_choices``' table."""
    seeds = config.seed_list()
    models, splits = list(config.models), list(config.splits)
    n_cells = len(models) * len(splits) * len(seeds)
    missing = f", {len(not_run)} not run" if not_run else ""
    parts = [
        f"# Comparison on {config.dataset}",
        "",
        f"{n_cells - len(failures) - len(not_run)} of {n_cells} cells finished{missing} ({len(models)} models x "
        f"{len(splits)} splits x {len(seeds)} seeds: {', '.join(map(str, seeds))}). Test metrics, mean ± sample "
        'std over seeds; bold: best per column; "vs iid": change of the mean from the iid split.',
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
            parts += [
                "",
                f"### {metric}, worst {env_field}",
                "",
                f"The {env_field} group with the lowest value in each cell among the groups with at least "
                f"{config.min_env_cases} test cases (group sizes: the per-environment plots).",
                "",
                metric_table(
                    results,
                    metric,
                    models,
                    splits,
                    len(seeds),
                    environment=f"{env_field}=<worst>",
                    drops=False,
                    not_run=unrun,
                ),
            ]
    if choices:
        parts += [
            "",
            "## Chosen on validation",
            "",
            "Test metrics above are at these values, each chosen on its own cell's validation split (RecBole models "
            "with the epoch, the LLM models after training).",
            "",
            choices,
        ]
    if config.baseline:
        parts += ["", f"## Significance against {config.baseline}", "", significance_text(significance_frame), ""]
        for note in significance_notes:
            parts += [note, ""]
        parts += [significance_table(significance_frame) if len(significance_frame) else "no pairs to test"]
    if capped:
        parts += [
            "",
            "## Stopped by the epoch cap",
            "",
            "These cells ran all their epochs before early stopping fired: they may still have been improving (not "
            "converged); raise `epochs` and run them again.",
            "",
            "| model | split | seed | epochs | stopping_step | evaluations since the best |",
            "|---|---|---|---|---|---|",
        ]
        parts += [
            f"| {m} | {split} | {seed} | {c['epochs']} | {c['stopping_step']} | {c['evaluations_since_best']} |"
            for m, split, seed, c in capped
        ]
    if len(failures):
        parts += ["", "## Failed cells", "", "| model | split | seed | error |", "|---|---|---|---|"]
        for r in failures.itertuples():
            error = " ".join(str(r.error).split())[:300].replace("|", "\\|")
            parts.append(f"| {r.model} | {r.split} | {r.seed} | {error} |")
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------- plots
def _spread(stds, counts) -> np.ndarray:
    """Which points get an error bar: a finite std over at least 2 seeds."""
    stds, counts = np.asarray(stds, dtype=float), np.asarray(counts, dtype=float)
    return np.isfinite(stds) & (np.nan_to_num(counts) >= 2)


def _bars(ax, groups: Sequence[str], series: Mapping[str, tuple[list[float], list[float], list[int]]]) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series (mean, std, seeds); the std is an
    error bar only where at least 2 seeds give one."""
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (name, (means, stds, counts)) in enumerate(series.items()):
        at, means, stds = x - 0.4 + width * (i + 0.5), np.asarray(means, dtype=float), np.asarray(stds, dtype=float)
        ax.bar(at, means, width, label=name, color=f"C{i % 10}")
        err = _spread(stds, counts)
        if err.any():
            ax.errorbar(at[err], means[err], yerr=stds[err], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    tilt = len(groups) > 4
    ax.set_xticks(x, groups, rotation=30 if tilt else 0, ha="right" if tilt else "center")


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


def shown_groups(
    labels: Sequence[str], cases: Mapping[tuple[str, str], int] | None, split: str, env_field: str, min_cases: int
) -> tuple[list[str], int]:
    """The environment labels a plot shows (those with at least ``min_cases`` test cases; all of them when none
    has, or when the counts are unknown) and how many it leaves out."""
    big = [lb for lb in labels if not cases or cases.get((split, f"{env_field}={lb}"), 0) >= min_cases]
    return (big, len(labels) - len(big)) if big else (list(labels), 0)


def _env_stats(part, env_field: str):
    """Mean, sample std and seed count per (model, environment) of one environment field's rows."""
    mine = part[part["environment"].str.startswith(f"{env_field}=")]
    return mine.groupby(["model", "environment"])["value"].agg(mean="mean", std=lambda v: v.std(ddof=1), n="count")


def sorts_by_effect(stats, env_field: str, labels: Sequence[str], models: Sequence[str], baseline: str | None) -> bool:
    """Whether ``environment_order`` sorts by the effect against ``baseline`` (it has a value, and others exist)."""
    return (
        baseline is not None
        and any(m != baseline for m in models)
        and any((baseline, f"{env_field}={lb}") in stats.index for lb in labels)
    )


def environment_order(
    stats, env_field: str, labels: Sequence[str], models: Sequence[str], baseline: str | None = None
) -> list[str]:
    """``labels`` sorted ascending (the plot's top row is the last) by the mean over ``models`` of their mean
    value, or, when ``baseline`` has values, by the mean effect of the other models against it; environments
    without a value come first (at the bottom)."""
    means = stats["mean"]

    def value(model, label):
        return means.get((model, f"{env_field}={label}"), np.nan)

    others = [m for m in models if m != baseline]
    by_effect = sorts_by_effect(stats, env_field, labels, models, baseline)

    def key(label):
        if by_effect:
            values = [value(m, label) - value(baseline, label) for m in others]
        else:
            values = [value(m, label) for m in models]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else -np.inf

    return sorted(labels, key=key)


def _dots(
    ax, stats, env_field: str, labels: Sequence[str], names: Sequence[str], models: Sequence[str], baseline: str | None
) -> None:
    """One row per environment (``names``: its tick labels), one dot per model, dodged vertically; a horizontal
    std bar only where at least 2 seeds give one."""
    y = np.arange(len(labels), dtype=float)
    step = min(0.8 / max(len(models), 1), 0.25)
    for i, model in enumerate(models):
        keys = [(model, f"{env_field}={label}") for label in labels]
        mean, std, n = (np.array([stats[c].get(k, np.nan) for k in keys], dtype=float) for c in ("mean", "std", "n"))
        at = y + (i - (len(models) - 1) / 2) * step
        err, shown = _spread(std, n), np.isfinite(mean)
        style = {"color": f"C{i % 10}", "marker": "D" if model == baseline else "o", "markersize": 4}
        if (err & shown).any():
            ax.errorbar(
                mean[err & shown],
                at[err & shown],
                xerr=std[err & shown],
                linestyle="none",
                elinewidth=1,
                capsize=0,
                label=model,
                **style,
            )
        if (~err & shown).any():
            ax.plot(
                mean[~err & shown],
                at[~err & shown],
                linestyle="none",
                label=None if (err & shown).any() else model,
                **style,
            )
    ax.set_yticks(y, names, fontsize="small")
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.grid(axis="x", alpha=0.3)


def environment_figure(
    part,
    split: str,
    metric: str,
    models: Sequence[str],
    cases: Mapping[tuple[str, str], int] | None = None,
    min_cases: int = 1,
    baseline: str | None = None,
):
    """A horizontal dot plot of one split's per-environment test values of one metric (``part``: its rows of
    the results table), one panel per environment field, environments on the y axis sorted by
    ``environment_order``, mean over seeds with a std bar where at least 2 seeds give one; the figure grows with
    the number of environments, so labels never overlap. None when the split has no per-environment rows."""
    from matplotlib.figure import Figure

    at = part[
        (part["split"] == split)
        & (part["metric"] == metric)
        & part["environment"].str.contains("=")
        & ~part["environment"].str.endswith("=<worst>")
    ]
    if at.empty:
        return None
    models = [m for m in models if m in set(at["model"])]
    panels = []
    for env_field in sorted({e.split("=", 1)[0] for e in at["environment"]}):
        stats = _env_stats(at, env_field)
        labels = sorted({e.split("=", 1)[1] for e in at["environment"] if e.startswith(f"{env_field}=")})
        labels, dropped = shown_groups(labels, cases, split, env_field, min_cases)
        panels.append((env_field, stats, environment_order(stats, env_field, labels, models, baseline), dropped))
    row = 0.2 + 0.04 * len(models)  # inches per environment: dots of every model and one line of small text
    heights = [len(labels) * row + 0.9 for _, _, labels, _ in panels]
    fig = Figure(figsize=(8, sum(heights) + 0.6 + 0.25 * math.ceil(len(models) / 5)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    n_seeds = at.groupby("model")["seed"].nunique().max()
    for ax, (env_field, stats, labels, dropped) in zip(axes, panels):
        names = [
            f"{lb} (n={cases[(split, f'{env_field}={lb}')]})" if cases and (split, f"{env_field}={lb}") in cases else lb
            for lb in labels
        ]
        _dots(ax, stats, env_field, labels, names, models, baseline)
        order = f"effect vs {baseline}" if sorts_by_effect(stats, env_field, labels, models, baseline) else metric
        small = f"; {dropped} with < {min_cases} test cases not shown" if dropped else ""
        spread = "mean ± std over seeds" if n_seeds >= 2 else "1 seed, no error bars"
        ax.set_title(f"{split}: test {metric} per {env_field} ({spread}; sorted by {order}{small})", fontsize="medium")
        ax.set_xlabel(metric)
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(
        list(handles.values()), list(handles), loc="outside lower center", fontsize="small", ncols=min(len(handles), 5)
    )
    return fig


def plots(
    results,
    metrics: Sequence[str],
    folder: Path,
    cases: Mapping[tuple[str, str], int] | None = None,
    min_cases: int = 1,
    baseline: str | None = None,
) -> list[str]:
    """``<metric>_by_split.png`` (bars: mean per model and split, ± std where 2 or more seeds) and
    ``<metric>_<split>_environments.png`` (``environment_figure``: per-environment dots for each split, labelled
    with their test cases when ``cases`` is given; groups with fewer than ``min_cases`` are left out, as in the
    worst-environment rows). Returns the written paths."""
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
            series[model] = tuple([rows[c].get(s, np.nan) for s in splits] for c in ("mean", "std", "n"))
        _bars(ax, splits, series)
        ax.set_ylabel(metric)
        spread = "mean ± std over seeds" if stats["n"].max() >= 2 else "1 seed, no error bars"
        ax.set_title(f"test {metric} per split ({spread})")
        fig.legend(loc="outside lower center", fontsize="small", ncols=min(len(models), 5))  # off the bars
        path = folder / f"{_safe(metric)}_by_split.png"
        fig.savefig(path, dpi=120)
        written.append(str(path))
        for split in splits:
            fig = environment_figure(part, split, metric, models, cases, min_cases, baseline)
            if fig is None:
                continue
            path = folder / f"{_safe(metric)}_{split}_environments.png"
            fig.savefig(path, dpi=120)
            written.append(str(path))
    return written


def _safe(name: str) -> str:
    return name.replace("@", "_at_").replace("/", "_")
