"""Data sources: each turns its input into the canonical frame (docs/contracts.md).

A source module has ``load(spec) -> (frame, cleaning_counts)``; ``load_frame`` then normalises the
frame (``frame.canonicalize``) and applies k-core filtering, the same for every source.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from causalrec.data.frame import canonicalize, cap_titles, k_core
from causalrec.data.sources import csv_table, movielens, retail_sim, uci_retail
from causalrec.data.spec import DataSpec

_log = logging.getLogger(__name__)

LOADERS = {
    "retail-sim": retail_sim.load,
    "online-retail": uci_retail.load,
    "ml-100k": movielens.load,
    "csv": csv_table.load,
}


def input_files(spec: DataSpec) -> list[Path]:
    """The files a spec reads (their identity is part of the prepared data's cache key)."""
    if spec.dataset == "retail-sim":
        return []
    if spec.dataset == "ml-100k":
        return movielens.source_files(spec)
    files = [Path(spec.source).expanduser()] if spec.source else []
    if spec.dataset == "csv" and spec.csv_items_path:
        files.append(Path(spec.csv_items_path).expanduser())
    return files


def load_frame(spec: DataSpec) -> pd.DataFrame:
    """The canonical frame of ``spec``'s dataset after cleaning and k-core filtering.

    ``frame.attrs["cleaning"]`` holds the row counts of each cleaning step, before and after k-core.
    """
    if spec.dataset == "retail-sim" and spec.source:
        _log.warning("retail-sim is simulated; source %r is ignored", spec.source)
    raw, counts = LOADERS[spec.dataset](spec)
    frame = canonicalize(raw, spec.dataset)
    frame, cut = cap_titles(frame, spec.max_title_chars)
    if cut:
        counts = {**counts, "titles_cut": cut}
        _log.warning(
            "%s: %d item title(s) are longer than max_title_chars=%d characters and were cut to it; a text "
            "that long is usually a description: choose the title column(s) with csv_text, or raise "
            "max_title_chars (at most 131072)",
            spec.dataset,
            cut,
            spec.max_title_chars,
        )
    filtered = k_core(frame, spec.min_user_inter, spec.min_item_inter)
    counts = {
        **counts,
        "rows_before_k_core": len(frame),
        "users_before_k_core": int(frame["user_id"].nunique()),
        "items_before_k_core": int(frame["item_id"].nunique()),
        "rows_after_k_core": len(filtered),
    }
    filtered.attrs["cleaning"] = counts
    _log.info(
        "%s: %d interactions, %d users, %d items after cleaning and k-core",
        spec.dataset,
        len(filtered),
        filtered["user_id"].nunique(),
        filtered["item_id"].nunique(),
    )
    return filtered
