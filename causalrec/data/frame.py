"""The canonical interaction frame: checks, k-core filtering, environment labels and statistics.

Columns (docs/contracts.md): ``user_id`` str, ``item_id`` str, ``timestamp`` int64 seconds since 1970-01-01
00:00 of the clock months and seasons are read from (UTC for epoch inputs; for dates, each date's own wall clock
unless ``csv_timezone`` says otherwise: ``sources.tables.parse_times``), ``region`` str, ``item_text`` str
(non-empty, at most ``max_title_chars`` characters), plus optional extras such as ``category``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from causalrec.errors import DataError

_log = logging.getLogger(__name__)

COLUMNS = ("user_id", "item_id", "timestamp", "region", "item_text")
SEASONS = ("winter", "spring", "summer", "autumn")
# Meteorological seasons: Dec-Feb winter, Mar-May spring, Jun-Aug summer, Sep-Nov autumn.
_MONTH_SEASON = np.array(
    [
        None,
        "winter",
        "winter",
        "spring",
        "spring",
        "spring",
        "summer",
        "summer",
        "summer",
        "autumn",
        "autumn",
        "autumn",
        "winter",
    ],
    dtype=object,
)


def months_of(timestamp: pd.Series | np.ndarray) -> np.ndarray:
    """Calendar month (1-12) of the frame's timestamps (read as UTC, i.e. the clock ``parse_times`` chose)."""
    return pd.to_datetime(np.asarray(timestamp, dtype=np.int64), unit="s").month.to_numpy()


def season_of(timestamp: pd.Series | np.ndarray) -> np.ndarray:
    """Meteorological season name of each epoch-second timestamp (the ``season`` environment label)."""
    return _MONTH_SEASON[months_of(timestamp)]


def by_unique(values: pd.Series, fn: Callable[[pd.Series], pd.Series]) -> pd.Series:
    """``fn`` (a vectorised string transform) applied to each distinct value once: ids and titles repeat
    across hundreds of thousands of rows, and pandas string methods run per element."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    mapped = fn(pd.Series(uniques, dtype=object)).to_numpy()
    return pd.Series(mapped[codes], index=values.index)


def _token(values: pd.Series, what: str) -> pd.Series:
    """Ids become RecBole tokens: no whitespace (token_seq uses spaces) and no quote characters."""
    values = by_unique(values, lambda u: u.astype(str))
    clean = by_unique(
        values, lambda u: u.str.strip().str.replace(r"\s+", "_", regex=True).str.replace('"', "'", regex=False)
    )
    if (clean == "").any():
        raise DataError(f"{what} is empty in {(clean == '').sum()} rows; every interaction needs a {what}")
    changed = values != clean
    if changed.any():
        raw = pd.DataFrame({"raw": values[changed], "clean": clean[changed]}).drop_duplicates()
        untouched = set(values[~changed])
        clash = raw[raw["clean"].isin(untouched) | raw["clean"].duplicated(keep=False)]
        if len(clash):
            row = clash.iloc[0]
            raise DataError(
                f"{what} {row['raw']!r} becomes {row['clean']!r} once whitespace and quotes are "
                f"removed (RecBole tokens cannot hold them), which clashes with another {what}; "
                f"make the ids distinct without whitespace"
            )
    return clean


def _label(values: pd.Series) -> pd.Series:
    return by_unique(values, lambda u: u.astype(str).str.replace(r'[\t\r\n"]+', " ", regex=True).str.strip())


def canonicalize(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Check and normalise a source's frame: dtypes, RecBole-safe ids, one region per user.

    A user seen in several regions gets the most frequent one (ties: the alphabetically first), so
    the ``region`` environment label is a property of the user, as the regional split needs.
    """
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"source {source!r} produced no column(s) {missing}; columns present: {list(frame.columns)}")
    if frame.empty:
        raise DataError(f"source {source!r} has no interactions left after cleaning")
    out = frame.reset_index(drop=True).copy()
    out["user_id"] = _token(out["user_id"], "user_id")
    out["item_id"] = _token(out["item_id"], "item_id")
    out["timestamp"] = out["timestamp"].astype(np.int64)
    out["item_text"] = by_unique(
        out["item_text"].fillna(""), lambda u: u.astype(str).str.replace(r"\s+", " ", regex=True).str.strip()
    )
    empty_text = out["item_text"] == ""
    out.loc[empty_text, "item_text"] = out.loc[empty_text, "item_id"]
    out["region"] = _label(out["region"].fillna("unknown"))
    out.loc[out["region"] == "", "region"] = "unknown"
    counts = out.groupby(["user_id", "region"], sort=False).size().rename("n").reset_index()
    counts = counts.sort_values(["user_id", "n", "region"], ascending=[True, False, True], kind="stable")
    user_region = counts.drop_duplicates("user_id").set_index("user_id")["region"]
    moved = int((out["region"] != out["user_id"].map(user_region)).sum())
    if moved:
        _log.info("%d rows of users seen in several regions take the user's most frequent region", moved)
    out["region"] = out["user_id"].map(user_region)
    # one title per item: the most frequent text (ties: alphabetically first)
    texts = out.groupby(["item_id", "item_text"], sort=False).size().rename("n").reset_index()
    texts = texts.sort_values(["item_id", "n", "item_text"], ascending=[True, False, True], kind="stable")
    out["item_text"] = out["item_id"].map(texts.drop_duplicates("item_id").set_index("item_id")["item_text"])
    if "category" in out.columns:
        out["category"] = _label(out["category"].fillna("unknown"))
    return out


def cap_titles(frame: pd.DataFrame, max_chars: int) -> tuple[pd.DataFrame, int]:
    """``frame`` with every ``item_text`` longer than ``max_chars`` cut to its first ``max_chars`` characters
    (trailing space removed); also the number of items cut. Python's csv reader, which RecBole and
    ``read_titles`` use, refuses fields over 131,072 characters, and a title that long is a description."""
    lengths = by_unique(frame["item_text"], lambda u: u.astype(str).str.len())
    long = (lengths > max_chars).to_numpy()
    if not long.any():
        return frame, 0
    out = frame.copy()
    out.loc[long, "item_text"] = by_unique(out.loc[long, "item_text"], lambda u: u.str.slice(0, max_chars).str.rstrip())
    return out, int(out.loc[long, "item_id"].nunique())


def k_core(frame: pd.DataFrame, min_user_inter: int, min_item_inter: int) -> pd.DataFrame:
    """Drop users with fewer than ``min_user_inter`` and items with fewer than ``min_item_inter``
    interactions, repeatedly, until both hold for every remaining row (a fixed point)."""
    out = frame
    while True:
        user_n = out["user_id"].map(out["user_id"].value_counts())
        item_n = out["item_id"].map(out["item_id"].value_counts())
        keep = (user_n >= min_user_inter) & (item_n >= min_item_inter)
        if keep.all():
            break
        out = out[keep.to_numpy()]
    if out.empty:
        raise DataError(
            f"k-core filtering (min_user_inter={min_user_inter}, min_item_inter={min_item_inter}) "
            f"left no interactions out of {len(frame)}; lower min_user_inter / min_item_inter"
        )
    return out.reset_index(drop=True)


# Above this share of items whose text is not unique, ranking by title ties too many items to be trusted.
TIE_WARNING_SHARE = 0.05


def text_sharing(texts: Sequence[str]) -> dict[str, Any]:
    """How many items share their text (compared case- and whitespace-insensitively) with another item:
    ``items``, ``distinct_texts``, ``items_sharing`` (items whose text is not unique), ``largest_group`` and
    ``share`` (items_sharing / items)."""
    counts: dict[str, int] = {}
    for t in texts:
        key = " ".join(str(t).lower().split())
        counts[key] = counts.get(key, 0) + 1
    sharing = sum(c for c in counts.values() if c > 1)
    return {
        "items": len(texts),
        "distinct_texts": len(counts),
        "items_sharing": sharing,
        "largest_group": max(counts.values(), default=0),
        "share": sharing / len(texts) if texts else 0.0,
    }


def warn_if_texts_tie(texts: Sequence[str], where: str) -> dict[str, Any]:
    """Log a warning naming ``item_repr: id`` / ``title+id`` when many items share a text; returns the counts."""
    stats = text_sharing(texts)
    if stats["share"] > TIE_WARNING_SHARE:
        _log.warning(
            "%s: %d of %d items share their text with another item (%d distinct texts, up to %d items per text); "
            "an LLM model with item_repr: title scores items with the same text identically, so its ranking ties "
            "them: use item_repr: id or title+id",
            where,
            stats["items_sharing"],
            stats["items"],
            stats["distinct_texts"],
            stats["largest_group"],
        )
    return stats


def describe(frame: pd.DataFrame) -> dict[str, Any]:
    """Users, items, interactions, regions, months, sparsity, date range, interactions per user."""
    users, items, n = frame["user_id"].nunique(), frame["item_id"].nunique(), len(frame)
    pairs = len(frame[["user_id", "item_id"]].drop_duplicates())
    when = pd.to_datetime(frame["timestamp"].to_numpy(dtype=np.int64), unit="s")
    per_user = frame["user_id"].value_counts()
    regions = frame["region"].value_counts()
    out = {
        "users": int(users),
        "items": int(items),
        "interactions": int(n),
        "user_item_pairs": int(pairs),
        "sparsity": float(1 - pairs / (users * items)) if users and items else 1.0,
        "regions": int(len(regions)),
        "months": int(when.to_period("M").nunique()) if n else 0,
        "date_min": str(when.min()) if n else None,
        "date_max": str(when.max()) if n else None,
        "inter_per_user": {
            "mean": float(per_user.mean()),
            "median": float(per_user.median()),
            "min": int(per_user.min()),
            "max": int(per_user.max()),
        }
        if n
        else {},
        "inter_per_item": float(n / items) if items else 0.0,
        "users_per_region": {
            str(k): int(v) for k, v in frame.drop_duplicates("user_id")["region"].value_counts().items()
        },
        "interactions_per_month": {str(k): int(v) for k, v in when.to_period("M").value_counts().sort_index().items()},
    }
    if "item_text" in frame.columns and n:
        out["item_texts"] = text_sharing(frame.drop_duplicates("item_id")["item_text"].tolist())
    if "cleaning" in frame.attrs:
        out["cleaning"] = dict(frame.attrs["cleaning"])
    return out


def format_stats(stats: dict[str, Any]) -> str:
    """``describe``'s dict as the text ``causalrec data stats`` prints."""
    ipu = stats.get("inter_per_user") or {}
    lines = [
        f"users         {stats['users']:>10,}",
        f"items         {stats['items']:>10,}",
        f"interactions  {stats['interactions']:>10,}  ({stats['user_item_pairs']:,} distinct user-item pairs)",
        f"regions       {stats['regions']:>10,}",
        f"months        {stats['months']:>10,}  ({stats['date_min']} .. {stats['date_max']})",
        f"sparsity      {stats['sparsity']:>10.4%}",
    ]
    if ipu:
        lines.append(
            f"per user      mean {ipu['mean']:.1f}, median {ipu['median']:.0f}, min {ipu['min']}, max {ipu['max']}"
        )
    lines.append(f"per item      mean {stats['inter_per_item']:.1f}")
    regions = stats.get("users_per_region") or {}
    if regions:
        shown = list(regions.items())[:8]
        more = f", ... ({len(regions) - len(shown)} more)" if len(regions) > len(shown) else ""
        lines.append("users/region  " + ", ".join(f"{k} {v:,}" for k, v in shown) + more)
    months = stats.get("interactions_per_month") or {}
    if months:
        lines.append("rows/month    " + ", ".join(f"{k} {v:,}" for k, v in months.items()))
    texts = stats.get("item_texts")
    if texts:
        lines.append(
            f"item texts    {texts['distinct_texts']:>10,}  distinct; {texts['items_sharing']:,} items share "
            f"theirs with another (up to {texts['largest_group']} per text)"
        )
    cleaning = stats.get("cleaning") or {}
    if cleaning:
        lines.append(
            "cleaning      "
            + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in cleaning.items())
        )
    return "\n".join(lines)
