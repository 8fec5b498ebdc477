"""``csv``: any interaction table, by column mapping, so users bring their own retail data.

``csv_user``, ``csv_item``, ``csv_time`` name the columns (defaults: user_id, item_id, timestamp);
``csv_region`` is optional (else every user is in region ``all``); ``csv_text`` lists the item-text
columns, joined with a space (else the item id is the text). ``csv_items_path`` names an item-side
table joined on the item column; text columns may live there. Rows with a missing user or item
are dropped and counted; items matching ``csv_exclude_items`` are dropped and counted; exact duplicate
(user, item, time) rows are dropped and counted. ``csv_encoding`` decodes both tables; ``csv_timezone``
chooses the clock months and seasons are read from (``tables.parse_times``). Online Retail's non-product
codes (``exclude_stock_codes``) are not applied here: a shop's SKU may well be ``M`` or ``S``.
"""

from __future__ import annotations

import fnmatch
import re

import numpy as np
import pandas as pd

from causalrec.data.frame import by_unique
from causalrec.data.sources.tables import parse_times, read_table, require_columns
from causalrec.data.spec import DataSpec
from causalrec.errors import DataError


def load(spec: DataSpec) -> tuple[pd.DataFrame, dict]:
    """The source interface: (frame, cleaning counts)."""
    what = f"csv file {spec.source!r}"
    table = read_table(spec.source, what="csv", sep=spec.csv_sep, encoding=spec.csv_encoding)
    roles = {
        "user (csv_user)": (spec.csv_user,),
        "item (csv_item)": (spec.csv_item,),
        "time (csv_time)": (spec.csv_time,),
    }
    if spec.csv_region:
        roles["region (csv_region)"] = (spec.csv_region,)
    require_columns(table, roles, what=what)
    text_cols = list(spec.csv_text or ())
    items = None
    if spec.csv_items_path:
        items = read_table(spec.csv_items_path, what="csv item table", sep=spec.csv_sep, encoding=spec.csv_encoding)
        require_columns(items, {"item (csv_item)": (spec.csv_item,)}, what=f"csv item table {spec.csv_items_path!r}")
    missing_text = [c for c in text_cols if c not in table.columns and (items is None or c not in items.columns)]
    if missing_text:
        present = list(table.columns) + ([f"(item table) {c}" for c in items.columns] if items is not None else [])
        raise DataError(
            f"{what}: text column(s) {missing_text} (csv_text) are in neither the interaction table "
            f"nor the item table; columns present: {present}"
        )
    counts = {"rows_read": len(table)}
    blank = (
        table[[spec.csv_user, spec.csv_item]].isna().any(axis=1)
        | (table[spec.csv_user].astype(str).str.strip() == "")
        | (table[spec.csv_item].astype(str).str.strip() == "")
    )
    counts["dropped_no_user_or_item"] = int(blank.sum())
    table = table[~blank.to_numpy()]
    if table.empty:
        raise DataError(f"{what}: every row lacks a user or an item")
    if spec.csv_exclude_items:
        regex = re.compile("|".join(fnmatch.translate(p) for p in spec.csv_exclude_items))  # case-sensitive
        excluded = by_unique(table[spec.csv_item], lambda u: u.astype(str).str.strip().str.fullmatch(regex)).astype(
            bool
        )
        counts["dropped_excluded_item"] = int(excluded.sum())
        table = table[~excluded.to_numpy()]
        if table.empty:
            raise DataError(f"{what}: csv_exclude_items {list(spec.csv_exclude_items)} drops every row")
    else:
        counts["dropped_excluded_item"] = 0
    _check_epoch_numbers(table[spec.csv_time], column=spec.csv_time, what=what, time_format=spec.csv_time_format)
    frame = pd.DataFrame(
        {
            "user_id": table[spec.csv_user].astype(str).str.strip().to_numpy(),
            "item_id": table[spec.csv_item].astype(str).str.strip().to_numpy(),
            "timestamp": parse_times(
                table[spec.csv_time],
                column=spec.csv_time,
                what=what,
                time_format=spec.csv_time_format,
                timezone=spec.csv_timezone,
            ),
            "region": table[spec.csv_region].fillna("unknown").astype(str).str.strip().to_numpy()
            if spec.csv_region
            else "all",
        }
    )
    side = None
    if items is not None:
        side = items.assign(_key=items[spec.csv_item].astype(str).str.strip()).drop_duplicates("_key").set_index("_key")
    text = pd.Series("", index=frame.index)
    for column in text_cols:
        part = table[column].to_numpy() if column in table.columns else frame["item_id"].map(side[column]).to_numpy()
        part = pd.Series(part, index=frame.index).fillna("").astype(str).str.strip()
        text = (text + " " + part).str.strip()
    frame["item_text"] = text if text_cols else frame["item_id"]
    before = len(frame)
    frame = frame.drop_duplicates(["user_id", "item_id", "timestamp"]).reset_index(drop=True)
    counts["dropped_duplicate"] = before - len(frame)
    counts["rows_clean"] = len(frame)
    return frame, counts


def _check_epoch_numbers(values: pd.Series, *, column: str, what: str, time_format: str | None) -> None:
    """A time column of epoch numbers with a few bad cells (``inf``, ``1e400``, ``yesterday``): name the first
    bad cell. Without this, one non-number sends the whole column to date parsing, which then blames a good
    number. Columns that are mostly dates, and empty cells, are left to ``parse_times``."""
    if time_format not in (None, "unix", "unix_ms"):
        return
    missing = values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy()
    numbers = pd.to_numeric(values.astype(str).str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(numbers) | missing
    numeric_like = ~np.isnan(numbers)  # inf and 1e400 look like numbers too
    if finite.all() or (time_format is None and numeric_like[~missing].mean() < 0.5):
        return
    position = int(np.flatnonzero(~finite)[0])
    label = values.index[position]
    row = int(label) + 1 if isinstance(label, (int, np.integer)) else position + 1
    raise DataError(
        f"{what}: column {column!r} holds epoch-second numbers, but {int((~finite).sum())} value(s) are "
        f"not finite numbers; first: {values.iloc[position]!r} at data row {row}. Fix them, or set "
        f"csv_time_format if the column holds dates"
    )
