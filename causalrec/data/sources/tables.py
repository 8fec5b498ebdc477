"""Reading user tables (.csv, .csv.gz, .tsv, .xlsx) and parsing their dates, with clear errors."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from causalrec.errors import DataError

EXCEL_SUFFIXES = (".xlsx", ".xlsm", ".xls")


def read_table(path: str | Path, *, what: str, sep: str | None = None,
               dtype: dict | type | None = str) -> pd.DataFrame:
    """Read a table; every sheet of an Excel workbook is concatenated (Online Retail II has two).

    Raises ``DataError`` for a missing, empty or unreadable file, naming the file and the problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} file not found: {str(path)!r}; pass the path of an existing file as source")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes and suffixes[-1] in EXCEL_SUFFIXES:
            sheets = pd.read_excel(path, sheet_name=None, dtype=dtype)
            frames = [df for df in sheets.values() if len(df.columns)]
            if not frames:
                raise DataError(f"{what} file {str(path)!r} has no non-empty sheet")
            table = pd.concat(frames, ignore_index=True)
        else:
            if sep is None:
                sep = "\t" if {".tsv", ".tab"} & set(suffixes) else ","
            table = pd.read_csv(path, sep=sep, dtype=dtype, compression="infer", low_memory=False)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{what} file {str(path)!r} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, gzip.BadGzipFile, EOFError, zipfile.BadZipFile,
            OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{what} file {str(path)!r} cannot be read as a "
                        f"{'spreadsheet' if suffixes and suffixes[-1] in EXCEL_SUFFIXES else 'delimited table'}: "
                        f"{first}. Is it corrupt, truncated or of another format?") from None
    if table.empty:
        raise DataError(f"{what} file {str(path)!r} has a header but no rows")
    table.columns = [str(c).strip() for c in table.columns]
    return table


def require_columns(table: pd.DataFrame, columns: dict[str, tuple[str, ...]], *, what: str) -> dict[str, str]:
    """Map each wanted role to the first present column among its accepted names.

    Raises ``DataError`` naming the missing role(s), the names accepted and the columns present.
    """
    found, missing = {}, []
    for role, names in columns.items():
        match = next((n for n in names if n in table.columns), None)
        if match is None:
            missing.append(f"{role} (" + " or ".join(repr(n) for n in names) + ")")
        else:
            found[role] = match
    if missing:
        raise DataError(f"{what} has no column for {', '.join(missing)}; columns present: {list(table.columns)}")
    return found


def parse_times(values: pd.Series, *, column: str, what: str, time_format: str | None = None) -> np.ndarray:
    """Epoch seconds (int64, UTC) from dates or epoch numbers.

    ``time_format``: a strftime format, ``unix`` (epoch seconds), ``unix_ms`` (epoch milliseconds) or None
    (numbers are epoch seconds; strings and datetimes are parsed by pandas). Naive times are taken as UTC.
    Raises ``DataError`` with the first bad value and its data row (1 = first row after the header; the
    index of ``values`` is taken as the 0-based row position in the file).
    """
    # parse each distinct value once (a shop's 500k rows have ~20k distinct invoice times)
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    u = pd.Series(uniques, dtype=object)
    missing = (u.isna() | (u.astype(str).str.strip() == "")).to_numpy()[codes]
    if missing.any():
        raise DataError(f"{what}: column {column!r} is empty in {int(missing.sum())} rows (first at data row "
                        f"{_row_number(values, missing)}); every interaction needs a time")
    numeric = pd.to_numeric(u, errors="coerce") if time_format in (None, "unix", "unix_ms") else None
    if time_format in ("unix", "unix_ms") or (numeric is not None and numeric.notna().all()):
        bad = numeric.isna().to_numpy()[codes]
        if bad.any():
            _bad_time(values, bad, column, what, "an epoch number")
        scale = 1000 if time_format == "unix_ms" else 1
        return (numeric.to_numpy(dtype=np.float64) // scale).astype(np.int64)[codes]
    try:  # one format, inferred from the first value unless given: day/month order never flips mid-file
        parsed = pd.to_datetime(u, format=time_format, errors="coerce", utc=True)
    except (ValueError, TypeError):
        parsed = pd.Series(pd.NaT, index=u.index, dtype="datetime64[ns, UTC]")
    bad = parsed.isna().to_numpy()[codes]
    if bad.any():
        _bad_time(values, bad, column, what, f"a date{' in format ' + repr(time_format) if time_format else ''}")
    seconds = ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    return seconds[codes]


def _bad_time(raw: pd.Series, bad: np.ndarray, column: str, what: str, expected: str):
    position = int(np.flatnonzero(bad)[0])
    raise DataError(f"{what}: column {column!r} holds {int(bad.sum())} value(s) that are not {expected}; first: "
                    f"{raw.iloc[position]!r} at data row {_row_number(raw, bad)}. Fix the values or set csv_time_format "
                    f"(a strftime format such as '%d/%m/%Y %H:%M', or unix / unix_ms)")


def _row_number(values: pd.Series, mask: np.ndarray) -> int:
    """1-based data row of the first masked value: the index label when it is the file's row position."""
    position = int(np.flatnonzero(mask)[0])
    label = values.index[position]
    return int(label) + 1 if isinstance(label, (int, np.integer)) else position + 1
