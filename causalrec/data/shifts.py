"""Shift splits: the canonical frame -> training rows, one valid and one test target per user, environment
labels and the evidence that the shift is real.

Every split is a pure function of (frame, spec). Rows are ordered per user by time, ties by their order
in the frame; the history of any row is every earlier row of its user. Each row gets one ``part``:

* ``train``: a training interaction;
* ``valid`` / ``test``: an evaluation target, at most one per user per part, always with >= 1 earlier row;
* ``other``: neither (e.g. the rest of an evaluation period); it still appears in later rows' histories.

Splits (``n`` = the user's number of rows, ``pos`` = a row's 0-based position in its user's sequence):

* ``iid`` (control): leave-one-out; last row test, second-last valid, the rest train.
* ``temporal``: per user, the latest ``round(test_ratio n)`` rows (>= 1) are the test period and the
  ``round(valid_ratio n)`` rows (>= 1) before them the valid period; the first row of each period is the
  target, rows before the valid period train. Users with no row left for training only train.
* ``seasonal``: the split year is the 12 calendar months ending with the data's last month. Train = rows
  in ``train_months`` before the first valid-or-test-month row of the split year (so training never
  sees the future or a test season); the valid (test) target of a user is their first row in the split
  year's ``valid_months`` (``test_months``). Rows in valid/test months before the split year (Dec 2010 in
  Online Retail) are ``other``: history only.
* ``regional``: users are partitioned by region. Train-region users: every row trains. Valid/test-region
  users: their last row is the target and the rows before it train, so every model sees the same rows.
  Defaults: train = the largest regions holding >= 50 % of users, test = the other regions, valid = a
  seeded ``valid_user_ratio`` share of each test region's users (or ``valid_regions`` when given). Users of
  regions named in none of the three lists (when both train and test regions are given) are left out.
* ``popularity``: the head is the most popular items (over all rows) that make ``1 - tail_ratio`` of the
  interactions; a user's test target is their last tail row, the valid target their last tail row before
  it; train = the rows before the valid (else test) target. Users without tail rows only train.
* ``mixed``: ``temporal``'s periods with targets from the tail: the first tail row of each period; the head
  is computed on the training rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from causalrec.data.frame import months_of, season_of
from causalrec.data.spec import SPLIT_PARAMS, DataSpec
from causalrec.errors import DataError

_log = logging.getLogger(__name__)

PARTS = ("train", "valid", "test", "other")
TOP_K = 100
HEAD_SHARE = 0.8  # the "head" used by the evidence: items making 80 % of training rows
TRAIN_REGION_SHARE = 0.5  # regional default: the largest regions holding >= 50 % of users train


@dataclass
class Split:
    """A split of the canonical frame.

    Attributes:
        name: the split (``iid``, ``seasonal``, ...).
        frame: every row of the input, ordered by user then time, with columns ``position`` (0-based
            within the user), ``season`` and ``part`` (train | valid | test | other).
        train, valid, test: the rows of each part (views of ``frame``'s rows, same columns).
        params: the split's parameters as resolved (defaults filled in, e.g. the regions chosen).
        evidence: shift evidence (see ``shift_evidence``).
    """

    name: str
    frame: pd.DataFrame
    params: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)
    train: pd.DataFrame = field(init=False, repr=False)
    valid: pd.DataFrame = field(init=False, repr=False)
    test: pd.DataFrame = field(init=False, repr=False)

    def __post_init__(self):
        part = self.frame["part"]
        self.train, self.valid, self.test = (self.frame[part == p] for p in ("train", "valid", "test"))

    @property
    def env_labels(self) -> pd.DataFrame:
        """The environment labels of the training rows: ``season`` and ``region``."""
        return self.train[["season", "region"]]

    def counts(self) -> dict[str, int]:
        return {p: int((self.frame["part"] == p).sum()) for p in PARTS}


def order_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by user, then time, then their order in ``frame``; adds ``position`` and ``season``."""
    out = frame.reset_index(drop=True).copy()
    out["_row"] = np.arange(len(out))
    out = out.sort_values(["user_id", "timestamp", "_row"]).drop(columns="_row").reset_index(drop=True)
    out["position"] = out.groupby("user_id", sort=False).cumcount().to_numpy()
    out["season"] = season_of(out["timestamp"])
    return out


def _user_n(f: pd.DataFrame) -> np.ndarray:
    return f.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()


def _first_per_user(f: pd.DataFrame, mask: np.ndarray, last: bool = False) -> np.ndarray:
    """Index of the first (last) masked row of each user (``f`` is ordered by user and time)."""
    rows = f[mask]
    return rows.drop_duplicates("user_id", keep="last" if last else "first").index.to_numpy()


def _round(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5).astype(np.int64)  # half up, unlike numpy's half-to-even


def _parts(n_rows: int, train: np.ndarray, valid_idx: np.ndarray, test_idx: np.ndarray) -> np.ndarray:
    part = np.where(train, "train", "other").astype(object)
    part[valid_idx] = "valid"
    part[test_idx] = "test"
    return part


def _split_iid(f: pd.DataFrame, spec, rng) -> tuple[np.ndarray, dict]:
    n, pos = _user_n(f), f["position"].to_numpy()
    test = np.flatnonzero((pos == n - 1) & (n >= 2))
    valid = np.flatnonzero((pos == n - 2) & (n >= 3))
    return _parts(len(f), pos < np.where(n >= 3, n - 2, np.where(n == 2, 1, n)), valid, test), {}


def _periods(f: pd.DataFrame, spec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: its position, the user's train end (first valid-period position), test start, eligibility."""
    n, pos = _user_n(f), f["position"].to_numpy()
    n_test = np.maximum(1, _round(spec.test_ratio * n))
    n_valid = np.maximum(1, _round(spec.valid_ratio * n))
    train_end = n - n_test - n_valid
    return pos, train_end, n - n_test, train_end >= 1


def _split_temporal(f: pd.DataFrame, spec, rng) -> tuple[np.ndarray, dict]:
    pos, train_end, test_start, ok = _periods(f, spec)
    valid = np.flatnonzero(ok & (pos == train_end))
    test = np.flatnonzero(ok & (pos == test_start))
    return _parts(len(f), ~ok | (pos < train_end), valid, test), {"users_too_short": int((~ok & (pos == 0)).sum())}


def _split_seasonal(f: pd.DataFrame, spec, rng) -> tuple[np.ndarray, dict]:
    when = pd.to_datetime(f["timestamp"].to_numpy(), unit="s")
    month = months_of(f["timestamp"])
    ym = when.year.to_numpy() * 12 + month - 1
    last = int(ym.max())
    in_year = ym > last - 12
    year_from, year_to = f"{(last - 11) // 12}-{(last - 11) % 12 + 1:02d}", f"{last // 12}-{last % 12 + 1:02d}"
    where = f"in the split year {year_from}..{year_to}"
    is_valid = in_year & np.isin(month, spec.valid_months)
    is_test = in_year & np.isin(month, spec.test_months)
    for key, mask in (("valid_months", is_valid), ("test_months", is_test)):
        if not mask.any():
            raise DataError(
                f"seasonal split: {key}={list(getattr(spec, key))} hold no interactions {where}; "
                f"months with data: {sorted(set(month[in_year].tolist()))}. Choose other months"
            )
    if not np.isin(month, spec.train_months).any():
        raise DataError(
            f"seasonal split: train_months={list(spec.train_months)} hold no interactions; months with "
            f"data: {sorted(set(month.tolist()))}"
        )
    ts = f["timestamp"].to_numpy()
    cut = int(min(ts[is_valid].min(), ts[is_test].min()))
    train = np.isin(month, spec.train_months) & (ts < cut)
    pos = f["position"].to_numpy()
    valid = _first_per_user(f, is_valid & (pos >= 1))
    test = _first_per_user(f, is_test & (pos >= 1))
    params = {"split_year": [year_from, year_to], "train_before": str(pd.to_datetime(cut, unit="s"))}
    return _parts(len(f), train, valid, test), params


def _region_lists(f: pd.DataFrame, spec) -> tuple[list[str], list[str], list[str] | None, pd.Series]:
    user_region = f.drop_duplicates("user_id").set_index("user_id")["region"]
    users = user_region.value_counts()
    users = users.sort_index().sort_values(ascending=False, kind="stable")  # by size, ties by name
    present = list(users.index)
    for key in ("train_regions", "valid_regions", "test_regions"):
        missing = [r for r in (getattr(spec, key) or ()) if r not in users.index]
        if missing:
            raise DataError(
                f"regional split: {key} names region(s) {missing} that have no users; regions present "
                f"(users): {', '.join(f'{r} ({users[r]})' for r in present)}"
            )
    valid = list(spec.valid_regions) if spec.valid_regions else None
    taken = set(valid or ())
    if spec.train_regions:
        train = list(spec.train_regions)
    else:
        pool = [r for r in present if r not in taken and r not in (spec.test_regions or ())]
        share = users[pool].cumsum() / users.sum()
        train = pool[: int(np.searchsorted(share.to_numpy(), TRAIN_REGION_SHARE)) + 1]
    test = list(spec.test_regions) if spec.test_regions else [r for r in present if r not in set(train) | taken]
    if not test:
        raise DataError(
            f"regional split: no region is left for testing (train_regions={train}, valid_regions="
            f"{valid}); regions present: {present}. Name test_regions or fewer train_regions"
        )
    return train, test, valid, user_region


def _split_regional(f: pd.DataFrame, spec, rng) -> tuple[np.ndarray, dict]:
    train_r, test_r, valid_r, user_region = _region_lists(f, spec)
    if valid_r is None:
        valid_users = []
        for region in test_r:
            members = np.sort(user_region.index[user_region == region].to_numpy())
            k = int(_round(np.array(spec.valid_user_ratio * len(members))))
            valid_users.extend(rng.permutation(members)[:k].tolist())
        valid_users = set(valid_users)
    else:
        valid_users = set(user_region.index[user_region.isin(valid_r)])
    test_users = set(user_region.index[user_region.isin(test_r)]) - valid_users
    n, pos = _user_n(f), f["position"].to_numpy()
    user = f["user_id"]
    in_train_region = f["region"].isin(train_r).to_numpy()
    is_valid_user, is_test_user = user.isin(valid_users).to_numpy(), user.isin(test_users).to_numpy()
    last = (pos == n - 1) & (n >= 2)
    train = in_train_region | ((is_valid_user | is_test_user) & ~last)
    params = {
        "train_regions": train_r,
        "test_regions": test_r,
        "valid_regions": valid_r,
        "valid_users": len(valid_users),
        "test_users": len(test_users),
        "train_region_users": int(user_region.isin(train_r).sum()),
    }
    return _parts(len(f), train, np.flatnonzero(is_valid_user & last), np.flatnonzero(is_test_user & last)), params


def head_items(items: pd.Series, share: float) -> set[str]:
    """The most popular items (ties by id) that together make at least ``share`` of the rows."""
    counts = items.value_counts()
    counts = counts.sort_index().sort_values(ascending=False, kind="stable")
    cum = counts.cumsum().to_numpy() / counts.sum()
    return set(counts.index[: int(np.searchsorted(cum, share - 1e-12)) + 1])


def _split_popularity(f: pd.DataFrame, spec, rng) -> tuple[np.ndarray, dict]:
    head = head_items(f["item_id"], 1 - spec.tail_ratio)
    pos = f["position"].to_numpy()
    candidate = ~f["item_id"].isin(head).to_numpy() & (pos >= 1)
    test = _first_per_user(f, candidate, last=True)
    test_pos = pd.Series(pos[test], index=f["user_id"].to_numpy()[test])
    user_test_pos = f["user_id"].map(test_pos).to_numpy(dtype=np.float64)  # NaN: no target
    valid = _first_per_user(f, candidate & (pos < user_test_pos), last=True)
    valid_pos = pd.Series(pos[valid], index=f["user_id"].to_numpy()[valid])
    cutoff = f["user_id"].map(valid_pos).to_numpy(dtype=np.float64)
    cutoff = np.where(np.isnan(cutoff), user_test_pos, cutoff)
    train = np.isnan(cutoff) | (pos < cutoff)
    return _parts(len(f), train, valid, test), {
        "head_items": len(head),
        "tail_items": int(f["item_id"].nunique() - len(head)),
    }


def _split_mixed(f: pd.DataFrame, spec, rng) -> tuple[np.ndarray, dict]:
    pos, train_end, test_start, ok = _periods(f, spec)
    train = ~ok | (pos < train_end)
    head = head_items(f["item_id"][train], 1 - spec.tail_ratio)
    tail = ~f["item_id"].isin(head).to_numpy()
    valid = _first_per_user(f, ok & tail & (pos >= train_end) & (pos < test_start))
    test = _first_per_user(f, ok & tail & (pos >= test_start))
    return _parts(len(f), train, valid, test), {
        "head_items": len(head),
        "tail_items": int(f["item_id"].nunique() - len(head)),
    }


SPLITTERS: dict[str, Callable] = {
    "iid": _split_iid,
    "temporal": _split_temporal,
    "seasonal": _split_seasonal,
    "regional": _split_regional,
    "popularity": _split_popularity,
    "mixed": _split_mixed,
}


def split_frame(frame: pd.DataFrame, spec: DataSpec) -> Split:
    """Split the canonical frame as ``spec.split`` says (pure; randomness only from ``spec.seed``)."""
    f = order_frame(frame)
    rng = np.random.default_rng(spec.seed)
    part, params = SPLITTERS[spec.split](f, spec, rng)
    f["part"] = part
    split = Split(spec.split, f, {**{k: _plain(getattr(spec, k)) for k in SPLIT_PARAMS[spec.split]}, **params})
    given = ", ".join(f"{k}={_plain(getattr(spec, k))}" for k in SPLIT_PARAMS[spec.split]) or "no parameters"
    for name in ("train", "valid", "test"):
        if getattr(split, name).empty:
            raise DataError(
                f"{spec.split} split ({given}) leaves the {name} part empty for a dataset of "
                f"{len(f)} interactions and {f['user_id'].nunique()} users; choose other split "
                f"parameters or lower min_user_inter"
            )
    split.evidence = shift_evidence(split, seed=spec.seed)
    _log.info("%s split: %s", spec.split, split.counts())
    return split


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- shift evidence


def js_divergence(p: pd.Series, q: pd.Series) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) between two count vectors indexed by category."""
    keys = p.index.union(q.index)
    p = p.reindex(keys, fill_value=0).to_numpy(dtype=np.float64)
    q = q.reindex(keys, fill_value=0).to_numpy(dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


def top_k_jaccard(a: pd.Series, b: pd.Series, k: int = TOP_K) -> float:
    """Jaccard overlap of the ``k`` most frequent values of ``a`` and of ``b`` (ties by value)."""

    def top(s):
        counts = s.value_counts()
        return set(counts.sort_index().sort_values(ascending=False, kind="stable").index[:k])

    ta, tb = top(a), top(b)
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


def compare(reference: pd.DataFrame, targets: pd.DataFrame) -> dict[str, Any]:
    """How far the targets' item distribution is from the reference (training) rows (only ``rows`` when
    either side is empty)."""
    if reference.empty or targets.empty:
        return {"rows": int(len(targets))}
    head = head_items(reference["item_id"], HEAD_SHARE)
    out = {
        "rows": int(len(targets)),
        f"top{TOP_K}_jaccard": top_k_jaccard(reference["item_id"], targets["item_id"]),
        "item_js": js_divergence(reference["item_id"].value_counts(), targets["item_id"].value_counts()),
        "head_share": float(targets["item_id"].isin(head).mean()),
        "unseen_item_share": float((~targets["item_id"].isin(set(reference["item_id"]))).mean()),
    }
    if "category" in reference.columns:
        out["category_js"] = js_divergence(reference["category"].value_counts(), targets["category"].value_counts())
    return out


def shift_evidence(split: Split, seed: int = 0) -> dict[str, Any]:
    """Distances between the training rows and each part's targets, next to an IID control.

    ``top100_jaccard`` (overlap of the 100 most bought items; 1 = same), ``item_js`` and ``category_js``
    (Jensen-Shannon divergence in bits; 0 = same), ``head_share`` (share of targets among the items making
    80 % of training rows), ``unseen_item_share``. ``iid_control`` computes the same for a random sample of
    training rows, one per user, of the test part's size against the remaining training rows: the value
    the statistics take with no shift at that sample size. A regional split has few targets (one per
    test-region user), so it also compares whole purchase histories: ``test_region_rows`` (all rows of
    the test users vs the rows of train-region users) next to ``region_rows_control`` (as many random
    train-region users vs the other train-region users).
    """
    train = split.train
    rng = np.random.default_rng(seed)
    out = {name: compare(train, getattr(split, name)) for name in ("valid", "test")}
    per_user = train.iloc[rng.permutation(len(train))].drop_duplicates("user_id")
    sample = per_user.iloc[: len(split.test)]
    out["iid_control"] = compare(train.drop(index=sample.index), sample)
    if split.name == "regional":
        out.update(_region_rows_evidence(split, rng))
    for name in ("train", "test"):
        rows = getattr(split, name)
        out[f"{name}_seasons"] = {str(k): int(v) for k, v in rows["season"].value_counts().sort_index().items()}
        regions = rows["region"].value_counts()
        out[f"{name}_regions"] = {str(k): int(v) for k, v in regions.head(10).items()}
    return out


def _region_rows_evidence(split: Split, rng: np.random.Generator) -> dict[str, Any]:
    f = split.frame
    home = f[f["region"].isin(split.params["train_regions"])]
    test_users = set(split.test["user_id"])
    home_users = np.sort(home["user_id"].unique())
    picked = set(rng.permutation(home_users)[: len(test_users)])
    in_picked = home["user_id"].isin(picked)
    return {
        "test_region_rows": compare(home, f[f["user_id"].isin(test_users)]),
        "region_rows_control": compare(home[~in_picked], home[in_picked]),
    }
