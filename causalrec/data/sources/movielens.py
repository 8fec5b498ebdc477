"""``ml-100k``: MovieLens-100k as RecBole ships it (``recbole/dataset_example/ml-100k``).

Region = the first digit of the user's US zip code (``zip0`` ... ``zip9``, the US postal zones running
east to west; ``other`` for non-numeric codes), item text = "title (year)", category = first genre.
``source`` may name another folder holding ``ml-100k.inter``, ``.item`` and ``.user`` atomic files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from causalrec.data.sources.tables import parse_times, permission_error
from causalrec.data.spec import DataSpec
from causalrec.errors import DataError


def bundled_dir() -> Path:
    """RecBole's bundled copy, found without importing RecBole (a data file, not an API)."""
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise DataError(
            "ml-100k without a source needs RecBole's bundled copy, and RecBole is not installed; "
            "set source to a folder with ml-100k.inter, .item and .user"
        )
    return Path(spec.origin).parent / "dataset_example" / "ml-100k"


def _read_atomic(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(
            f"ml-100k file not found: {str(path)!r}; source must be a folder with ml-100k.inter, "
            f"ml-100k.item and ml-100k.user (RecBole atomic files), or unset for RecBole's bundled copy"
        )
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, quoting=3)
    except PermissionError as err:
        raise permission_error(path, "ml-100k", err) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"ml-100k file {str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None
    table.columns = [c.split(":")[0] for c in table.columns]
    return table


def source_files(spec: DataSpec) -> list[Path]:
    folder = Path(spec.source).expanduser() if spec.source else bundled_dir()
    return [folder / f"ml-100k.{suffix}" for suffix in ("inter", "item", "user")]


def load(spec: DataSpec) -> tuple[pd.DataFrame, dict]:
    """The source interface: (frame, cleaning counts)."""
    inter_path, item_path, user_path = source_files(spec)
    inter, items, users = _read_atomic(inter_path), _read_atomic(item_path), _read_atomic(user_path)
    for table, path, needed in (
        (inter, inter_path, ("user_id", "item_id", "timestamp")),
        (items, item_path, ("item_id", "movie_title")),
        (users, user_path, ("user_id", "zip_code")),
    ):
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise DataError(
                f"ml-100k file {str(path)!r} lacks column(s) {missing}; columns present: {list(table.columns)}"
            )
    zip_code = users.set_index("user_id")["zip_code"].fillna("").str.strip()
    region = np.where(zip_code.str.match(r"^\d"), "zip" + zip_code.str[:1], "other")
    year = items.get("release_year", pd.Series("", index=items.index)).fillna("").str.strip()
    title = items["movie_title"].fillna("").str.strip()
    text = np.where(year != "", title + " (" + year + ")", title)
    genre = items.get("class", pd.Series("", index=items.index)).fillna("").str.split().str[0].fillna("unknown")
    frame = pd.DataFrame(
        {
            "user_id": inter["user_id"].str.strip(),
            "item_id": inter["item_id"].str.strip(),
            "timestamp": parse_times(
                inter["timestamp"], column="timestamp", what=f"ml-100k file {str(inter_path)!r}", time_format="unix"
            ),
        }
    )
    frame["region"] = frame["user_id"].map(pd.Series(region, index=zip_code.index)).fillna("other")
    frame["item_text"] = frame["item_id"].map(pd.Series(text, index=items["item_id"].str.strip())).fillna("")
    frame["category"] = frame["item_id"].map(pd.Series(genre.to_numpy(), index=items["item_id"].str.strip()))
    return frame, {"rows_read": len(inter)}
