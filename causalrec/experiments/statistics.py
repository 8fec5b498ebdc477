"""Paired statistics over training runs: seed-level t-test, effect size, hierarchical bootstrap, Holm.

The unit of replication of a comparison is the training run (the seed): users of one run are not independent
replicates of the model's quality, so tests and intervals are taken over seeds, and users enter only through a
hierarchical bootstrap (seeds resampled, then users within each resampled seed). Pure numpy/scipy.

* ``paired_seed_test``: paired t-test over seeds, the 95 % t interval of the mean difference, Cohen's d_z and
  the relative change ``mean(model) / mean(baseline) - 1``;
* ``hierarchical_bootstrap``: percentile interval of that relative change;
* ``customer_bootstrap``: the same interval from one run's customers alone (secondary: single-seed comparisons);
* ``pooled_wilcoxon``: the per-user signed-rank test over pooled (seed, user) pairs (secondary column);
* ``holm``: Holm-Bonferroni adjusted p-values over a family of tests.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

NAN = float("nan")
_CHUNK = 1 << 18  # user draws per vectorised block of the bootstrap (memory bound, not a result setting)


@dataclass(frozen=True)
class SeedTest:
    """A paired comparison over seeds (``diff``: mean of model - baseline; ``rel_change``: ratio of means - 1)."""

    n_seeds: int
    mean: float
    baseline_mean: float
    diff: float
    diff_low: float
    diff_high: float
    rel_change: float
    t: float
    p: float
    dz: float


@dataclass(frozen=True)
class BootstrapInterval:
    """A bootstrap point estimate and percentile interval (``low``/``high`` NaN when none can be drawn)."""

    estimate: float
    low: float
    high: float
    n_seeds: int
    n_boot: int


def _paired(model_by_seed, base_by_seed) -> tuple[np.ndarray, np.ndarray]:
    """Two float arrays paired by seed: mappings are paired on their shared seeds, sequences by position."""
    if isinstance(model_by_seed, Mapping) or isinstance(base_by_seed, Mapping):
        if not (isinstance(model_by_seed, Mapping) and isinstance(base_by_seed, Mapping)):
            raise TypeError("give both values by seed as mappings, or both as sequences")
        seeds = sorted(set(model_by_seed) & set(base_by_seed))
        model_by_seed = [model_by_seed[s] for s in seeds]
        base_by_seed = [base_by_seed[s] for s in seeds]
    a = np.asarray(model_by_seed, dtype=np.float64).ravel()
    b = np.asarray(base_by_seed, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {len(a)} model vs {len(b)} baseline")
    return a, b


def _ratio(model_mean, base_mean):
    """``model_mean / base_mean - 1`` (inf or NaN, without a warning, where the baseline's mean is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(model_mean, dtype=np.float64) / np.asarray(base_mean, dtype=np.float64) - 1.0


def cohens_dz(diffs: Sequence[float]) -> float:
    """Cohen's d_z: mean / sample sd (ddof 1) of paired differences; NaN under 2 values, ±inf when the sd is 0."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return NAN
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(d.mean() / d.std(ddof=1))


def mean_interval(diffs: Sequence[float], ci: float = 0.95) -> tuple[float, float]:
    """The ``ci`` interval of the mean of ``diffs`` from the t distribution (n - 1 df); NaN under 2 values."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return NAN, NAN
    half = stats.t.ppf(0.5 + ci / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def paired_seed_test(model_by_seed, base_by_seed, ci: float = 0.95) -> SeedTest:
    """Paired t-test over seeds (``scipy.stats.ttest_rel``) of a model's per-seed metric against the baseline's.

    Values are mappings seed -> value (paired on shared seeds) or equal-length sequences (paired by position).
    Under 2 seeds t, p, the interval and d_z are NaN; the means, ``diff`` and ``rel_change`` are still given.
    """
    from scipy import stats

    a, b = _paired(model_by_seed, base_by_seed)
    n = len(a)
    mean, base = (float(a.mean()), float(b.mean())) if n else (NAN, NAN)
    t = p = NAN
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # identical values: scipy warns and gives NaN
            res = stats.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    low, high = mean_interval(a - b, ci)
    return SeedTest(
        n_seeds=n,
        mean=mean,
        baseline_mean=base,
        diff=float((a - b).mean()) if n else NAN,
        diff_low=low,
        diff_high=high,
        rel_change=float(_ratio(mean, base)),
        t=t,
        p=p,
        dz=cohens_dz(a - b),
    )


def _case_pairs(cases: Mapping) -> list[np.ndarray]:
    """Each seed's (n_users, 2) array of (model, baseline) values, in sorted seed order."""
    out = []
    for seed in sorted(cases):
        model, base = cases[seed]
        a, b = np.asarray(model, dtype=np.float64).ravel(), np.asarray(base, dtype=np.float64).ravel()
        if a.shape != b.shape or not len(a):
            raise ValueError(
                f"seed {seed}: model and baseline need the same, non-zero number of users; got {len(a)} and {len(b)}"
            )
        out.append(np.stack([a, b], axis=1))
    return out


def _slot_means(pairs: list[np.ndarray], picks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(model, baseline) user means of each resampled seed slot: ``picks`` names each slot's seed; each slot
    draws its own users with replacement, one block of draws per seed (slots in row-major order)."""
    means = np.empty((picks.size, 2))
    flat = picks.ravel()
    for s, values in enumerate(pairs):
        model, base = np.ascontiguousarray(values[:, 0]), np.ascontiguousarray(values[:, 1])
        slots = np.flatnonzero(flat == s)
        n = len(values)
        step = max(1, _CHUNK // n)
        for start in range(0, len(slots), step):
            part = slots[start : start + step]
            users = rng.integers(0, n, size=(len(part), n))
            means[part, 0] = model[users].mean(axis=1)
            means[part, 1] = base[users].mean(axis=1)
    return means.reshape(*picks.shape, 2)


def hierarchical_bootstrap(cases: Mapping, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> BootstrapInterval:
    """Percentile interval of the relative change of a model over its baseline, resampling seeds, then users.

    ``cases`` maps seed -> (model values per user, baseline values per user), paired arrays. The statistic is
    ``M / B - 1`` with ``M`` (``B``) the mean over seeds of the model's (baseline's) per-seed user mean: every
    seed weighs the same whatever its number of users, and with equal user counts it is the ratio of the pooled
    sums. The point estimate is that statistic on the data; each of ``n_boot`` replicates draws as many seeds as
    there are, with replacement, and within each drawn seed as many users as it has, with replacement, the same
    users for model and baseline. Under 2 seeds there is no interval (``low``/``high`` NaN): resampling users of
    one run says nothing about another run.
    """
    pairs = _case_pairs(cases)
    if not pairs:
        return BootstrapInterval(NAN, NAN, NAN, 0, 0)
    seed_means = np.array([p.mean(axis=0) for p in pairs])
    estimate = float(_ratio(*seed_means.mean(axis=0)))
    if len(pairs) < 2 or n_boot < 1:
        return BootstrapInterval(estimate, NAN, NAN, len(pairs), 0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pairs), size=(n_boot, len(pairs)))
    grand = _slot_means(pairs, picks, rng).mean(axis=1)  # (n_boot, 2)
    return _percentile_interval(estimate, grand, len(pairs), ci)


def _percentile_interval(estimate: float, means: np.ndarray, n_seeds: int, ci: float) -> BootstrapInterval:
    """The interval of the replicates' ``model / baseline - 1`` from their (n_boot, 2) means (none where a
    replicate's baseline mean is 0)."""
    replicates = _ratio(means[:, 0], means[:, 1])
    if np.isnan(replicates).any():
        return BootstrapInterval(estimate, NAN, NAN, n_seeds, len(means))
    low, high = np.quantile(replicates, [(1 - ci) / 2, (1 + ci) / 2])
    return BootstrapInterval(estimate, float(low), float(high), n_seeds, len(means))


def customer_bootstrap(
    model: Sequence[float], base: Sequence[float], n_boot: int = 2000, seed: int = 0, ci: float = 0.95
) -> BootstrapInterval:
    """Percentile interval of ``mean(model) / mean(base) - 1`` over the customers of one training run each
    (paired per-customer values), resampling customers only. It measures how far the test set's customers alone
    move the comparison, not another training run: a secondary figure for comparisons where a model has a single
    seed, which ``hierarchical_bootstrap`` leaves without an interval."""
    pairs = _case_pairs({0: (model, base)})
    estimate = float(_ratio(*pairs[0].mean(axis=0)))
    if n_boot < 1:
        return BootstrapInterval(estimate, NAN, NAN, 1, 0)
    rng = np.random.default_rng(seed)
    means = _slot_means(pairs, np.zeros((n_boot, 1), dtype=np.int64), rng)[:, 0]
    return _percentile_interval(estimate, means, 1, ci)


def pooled_wilcoxon(x, y) -> tuple[float, float]:
    """Wilcoxon signed-rank over pooled (seed, user) pairs: (statistic, p); (0, 1) when every pair ties.

    Secondary only: pooling a user's seeds treats one run's users as replicates (see the module doc)."""
    from scipy import stats

    if not len(x):
        return float("nan"), float("nan")
    if not np.any(x != y):
        return 0.0, 1.0  # every pair tied: no evidence of a difference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w = stats.wilcoxon(x, y)
    return float(w.statistic), float(w.pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone in the raw p, capped at 1), in input order.

    NaN entries stay NaN and are not counted in the family.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, NAN)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


__all__ = [
    "SeedTest",
    "BootstrapInterval",
    "paired_seed_test",
    "hierarchical_bootstrap",
    "customer_bootstrap",
    "holm",
    "cohens_dz",
    "mean_interval",
]
