"""Reading user tables (.csv, .csv.gz, .tsv, .xlsx) and parsing their dates, with clear errors."""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import logging
import lzma
import re
import zipfile
import zoneinfo
from datetime import datetime
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pandas as pd

from causalrec.errors import DataError

_log = logging.getLogger(__name__)

EXCEL_SUFFIXES = (".xlsx", ".xlsm", ".xls")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".txt", ".gz", ".bz2", ".xz", ".zip", *EXCEL_SUFFIXES)


def check_file(path: str | Path, *, what: str) -> Path:
    """``path`` expanded, when it names an existing file; else ``DataError`` saying it is missing or a directory
    (listing a few table files inside, the likely intended source)."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
        shown = ", ".join(inside[:5]) + (f", ... ({len(inside) - 5} more)" if len(inside) > 5 else "")
        raise DataError(
            f"{what} source {str(path)!r} is a directory, not a file; pass the path of the table file "
            f"itself" + (f" (it holds {shown})" if inside else "")
        )
    if not path.is_file():
        raise DataError(f"{what} file not found: {str(path)!r}; pass the path of an existing file as source")
    return path


def permission_error(path: str | Path, what: str, err: OSError) -> DataError:
    """The ``DataError`` for a file this process may not read."""
    return DataError(
        f"{what} file {str(path)!r} cannot be opened: permission denied ({err.strerror or err}); make it "
        f"readable by this user (e.g. chmod u+r {str(path)!r}) or copy it to a folder you can read"
    )


def read_table(
    path: str | Path,
    *,
    what: str,
    sep: str | None = None,
    dtype: dict | type | None = str,
    encoding: str = "utf-8",
    encoding_key: str | None = "csv_encoding",
) -> pd.DataFrame:
    """Read a table; every sheet of an Excel workbook is concatenated (Online Retail II has two).

    ``encoding`` decodes delimited files (``encoding_key``: the config key that sets it, named in the hint when
    the file does not decode; None: the source has no such key).
    Raises ``DataError`` for a missing, empty, unreadable or undecodable file and for duplicate column names,
    naming the file and the problem.
    """
    path = check_file(path, what=what)
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes and suffixes[-1] in EXCEL_SUFFIXES:
            header = pd.read_excel(path, sheet_name=None, header=None, nrows=1, dtype=str)
            for sheet, first in header.items():
                _check_header(first, path, what, f" (sheet {sheet!r})" if len(header) > 1 else "")
            sheets = pd.read_excel(path, sheet_name=None, dtype=dtype)
            frames = [df for df in sheets.values() if len(df.columns)]
            if not frames:
                raise DataError(f"{what} file {str(path)!r} has no non-empty sheet")
            table = pd.concat(frames, ignore_index=True)
        else:
            if sep is None:
                sep = "\t" if {".tsv", ".tab"} & set(suffixes) else ","
            first = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, compression="infer", encoding=encoding)
            _check_header(first, path, what, "")
            table = pd.read_csv(path, sep=sep, dtype=dtype, compression="infer", low_memory=False, encoding=encoding)
    except DataError:
        raise
    except PermissionError as err:
        raise permission_error(path, what, err) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{what} file {str(path)!r} is empty") from None
    except UnicodeError as err:
        raise _decode_error(path, what, encoding, encoding_key, err) from None
    except (pd.errors.ParserError, gzip.BadGzipFile, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{what} file {str(path)!r} cannot be read as a "
            f"{'spreadsheet' if suffixes and suffixes[-1] in EXCEL_SUFFIXES else 'delimited table'}: "
            f"{first}. Is it corrupt, truncated or of another format?"
        ) from None
    if table.empty:
        raise DataError(f"{what} file {str(path)!r} has a header but no rows")
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _check_header(first: pd.DataFrame, path: Path, what: str, where: str) -> None:
    """Refuse duplicate column names (after stripping spaces) in a table's raw header row: pandas would rename
    the second ``sku`` to ``sku.1``, and which one a mapping reads would be an accident."""
    if first.empty:
        return
    names = [str(v).strip() for v in first.iloc[0].tolist() if not pd.isna(v) and str(v).strip()]
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    dupes = [name for name, n in seen.items() if n > 1]
    if dupes:
        listed = ", ".join(f"{name!r} ({seen[name]} times)" for name in dupes)
        raise DataError(
            f"{what} file {str(path)!r}{where} has duplicate column names: {listed}; rename or drop the "
            f"extra column(s) in the header row so that every column name is unique"
        )


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_CHUNK = 1 << 20


@contextlib.contextmanager
def _open_decompressed(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes as pandas' ``compression="infer"`` sees them (by suffix); LookupError for the
    compressions it does not unpack (then no offset is given)."""
    suffix = path.suffix.lower()
    if suffix in (".zst", ".tar") or path.name.lower().endswith((".tar.gz", ".tar.bz2", ".tar.xz")):
        raise LookupError(suffix)
    if suffix == ".zip":
        with zipfile.ZipFile(path) as archive, archive.open(archive.namelist()[0]) as member:
            yield member
        return
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)
    with opener(path, "rb") as handle:
        yield handle


def _first_bad_byte(path: Path, encoding: str) -> tuple[int, bytes, int | None, bytes, bytes] | None:
    """(offset, the bytes that do not decode, line number or None, the file's first bytes, the bytes around the
    error) of the first decoding error, or None when the whole file decodes. Scans once, in chunks; only called
    after a failure."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    first, offset, newlines = b"", 0, 0
    ascii_lines = codecs.lookup(encoding).name not in {
        "utf-16",
        "utf-16-le",
        "utf-16-be",
        "utf-32",
        "utf-32-le",
        "utf-32-be",
    }
    with _open_decompressed(path) as handle:
        while True:
            chunk = handle.read(_CHUNK)
            if not first:
                first = chunk[:4096]
            pending = decoder.getstate()[0]  # bytes of an unfinished character held back from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                data = err.object if isinstance(err.object, (bytes, bytearray)) else pending + chunk
                line = newlines + chunk[: max(err.start - len(pending), 0)].count(b"\n") + 1 if ascii_lines else None
                window = bytes(data[max(err.start - 2048, 0) : err.start + 2048])
                return offset - len(pending) + err.start, bytes(data[err.start : err.end]), line, first, window
            if not chunk:
                return None
            newlines += chunk.count(b"\n")
            offset += len(chunk)


def guess_encoding(first: bytes, window: bytes, failed: str) -> str | None:
    """A cheap guess at the text encoding of a file other than ``failed``, from its first bytes (a byte-order
    mark; UTF-16's NUL bytes) and the bytes around the first undecodable one (the first of utf-8, cp1252,
    latin-1 that decodes them; latin-1 decodes anything, so it is the fallback for the five bytes cp1252 leaves
    undefined). None when nothing but ``failed`` fits."""
    failed = codecs.lookup(failed).name
    candidates: list[str] = []
    for bom, name in _BOMS:
        if first.startswith(bom):
            candidates.append(name)
            break
    else:
        if first and first.count(0) > len(first) // 4:  # UTF-16 without a byte-order mark: every other byte NUL
            candidates.append("utf-16-le" if first[1::2].count(0) > first[0::2].count(0) else "utf-16-be")
    for name in candidates:
        if codecs.lookup(name).name != failed:
            return name
    if candidates:
        return None
    for name in ("utf-8", "cp1252", "latin-1"):
        if codecs.lookup(name).name == failed:
            continue
        text = window.lstrip(bytes(range(0x80, 0xC0))) if name == "utf-8" else window  # may start mid-character
        try:
            codecs.getincrementaldecoder(name)("strict").decode(text, final=False)
            return name
        except UnicodeDecodeError:
            continue
    return None


def _decode_error(path: Path, what: str, encoding: str, key: str | None, err: UnicodeError) -> DataError:
    """A ``DataError`` naming the file, the byte offset of the first undecodable byte and, when a guess is cheap,
    the encoding to set."""
    try:
        found = _first_bad_byte(path, encoding)
    except (OSError, EOFError, zipfile.BadZipFile, LookupError):
        found = None
    if found is None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return DataError(
            f"{what} file {str(path)!r} cannot be decoded as {encoding}: {first}"
            + (f"; set {key} to the file's encoding (e.g. {key}: cp1252)" if key else "")
        )
    offset, bad, line, first, window = found
    compressed = path.suffix.lower() in (".gz", ".bz2", ".xz", ".zip")
    where = (
        f"byte offset {offset}"
        + (" of the uncompressed content" if compressed else "")
        + (f" (line {line})" if line is not None else "")
    )
    guess = guess_encoding(first, window, encoding)
    if key:
        todo = (
            f"it looks like {guess}: set {key}: {guess}"
            if guess
            else f"set {key} to the file's encoding (e.g. {key}: cp1252)"
        ) + ", or save the file as UTF-8"
    else:
        todo = (f"it looks like {guess}; " if guess else "") + f"save the file as {encoding}"
    shown = " ".join(f"0x{b:02x}" for b in bad[:4]) or "a byte"
    return DataError(f"{what} file {str(path)!r} is not valid {encoding}: {shown} at {where} cannot be decoded; {todo}")


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


# A UTC offset at the end of a date-time string, after its time of day: Z, UTC, GMT, +02:00, -0500, +05, UTC+01:00.
_OFFSET = re.compile(
    r"^(?P<body>.*?\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:\s*[AaPp]\.?[Mm]\.?)?)\s*"
    r"(?:(?P<zulu>[Zz]|UTC|GMT)|(?:UTC|GMT)?(?P<sign>[+-])(?P<hh>\d{2}):?(?P<mm>\d{2})?)$"
)
_EPOCH = pd.Timestamp(0)


def parse_times(
    values: pd.Series, *, column: str, what: str, time_format: str | None = None, timezone: str | None = None
) -> np.ndarray:
    """Seconds since 1970-01-01 00:00 (int64) of each time's clock reading, from dates or epoch numbers.

    ``time_format``: a strftime format, ``unix`` (epoch seconds), ``unix_ms`` (epoch milliseconds) or None
    (numbers are epoch seconds; strings and datetimes are parsed by pandas, one format inferred from the first).
    ``timezone`` (``csv_timezone``) chooses the clock, so that months and seasons are those of the shop:
    None: each time's own wall clock (``23:30-05:00`` stays 23:30; a UTC offset is dropped, not applied);
    ``UTC``: offsets are applied; an IANA zone name: times with an offset become that zone's wall-clock time.
    Epoch numbers are UTC instants (converted only for an IANA zone); times without an offset are wall-clock
    times in every mode, also when the column mixes them with times that carry one (a warning counts both).
    Raises ``DataError`` with the first bad value and its data row (1 = first row after the header; the
    index of ``values`` is taken as the 0-based row position in the file).
    """
    # parse each distinct value once (a shop's 500k rows have ~20k distinct invoice times)
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    u = pd.Series(uniques, dtype=object)
    missing = (u.isna() | (u.astype(str).str.strip() == "")).to_numpy()[codes]
    if missing.any():
        raise DataError(
            f"{what}: column {column!r} is empty in {int(missing.sum())} rows (first at data row "
            f"{_row_number(values, missing)}); every interaction needs a time"
        )
    zone = zoneinfo.ZoneInfo(timezone) if timezone not in (None, "UTC") else None
    numeric = pd.to_numeric(u, errors="coerce") if time_format in (None, "unix", "unix_ms") else None
    if time_format in ("unix", "unix_ms") or (numeric is not None and numeric.notna().all()):
        bad = numeric.isna().to_numpy()[codes]
        if bad.any():
            _bad_time(values, bad, column, what, "an epoch number")
        scale = 1000 if time_format == "unix_ms" else 1
        seconds = (numeric.to_numpy(dtype=np.float64) // scale).astype(np.int64)
        if zone is not None:
            seconds = _wall_seconds(pd.to_datetime(seconds, unit="s", utc=True).tz_convert(zone).tz_localize(None))
        return seconds[codes]
    strings = bool(u.map(lambda v: isinstance(v, str)).all())
    offset = np.full(len(u), np.nan)  # seconds east of UTC of each value that carries an offset
    if strings and time_format is not None and "%z" in time_format:
        wall = pd.Series(pd.NaT, index=u.index, dtype="datetime64[ns]")
        for i, text in enumerate(u.tolist()):
            try:
                moment = datetime.strptime(text.strip(), time_format)
                wall.iloc[i] = pd.Timestamp(moment.replace(tzinfo=None))
            except ValueError:  # not in the format, or out of pandas' range: NaT, reported below
                continue
            if moment.utcoffset() is not None:
                offset[i] = moment.utcoffset().total_seconds()
        parsed = wall.dt.tz_localize("UTC")
    else:
        body = u
        if strings and time_format is None:
            parts = u.str.strip().str.extract(_OFFSET)
            has = parts["body"].notna().to_numpy()
            body = u.where(~has, parts["body"])
            sign = np.where(parts["sign"].to_numpy() == "-", -1.0, 1.0)
            hours, mins = (parts[g].astype(float).fillna(0).to_numpy() for g in ("hh", "mm"))
            minutes = hours * 60 + mins
            offset = np.where(has, sign * minutes * 60, np.nan)
        try:  # one format, inferred from the first value unless given: day/month order never flips mid-file
            parsed = pd.to_datetime(body, format=time_format, errors="coerce", utc=True)
        except (ValueError, TypeError):
            parsed = pd.Series(pd.NaT, index=u.index, dtype="datetime64[ns, UTC]")
    bad = parsed.isna().to_numpy()[codes]
    if bad.any():
        _bad_time(values, bad, column, what, f"a date{' in format ' + repr(time_format) if time_format else ''}")
    seconds = ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
    aware = ~np.isnan(offset)
    if aware.any():
        if not aware.all():
            first_naive = u[~aware].iloc[0]
            _log.warning(
                "%s: column %r mixes times with a UTC offset (%d distinct values) and times without one (%d, "
                "e.g. %r); those without are read as wall-clock time%s",
                what,
                column,
                int(aware.sum()),
                int((~aware).sum()),
                first_naive,
                f" in {timezone}" if timezone else "",
            )
        if timezone == "UTC":
            seconds = np.where(aware, seconds - offset, seconds).astype(np.int64)
        elif zone is not None:
            instants = pd.to_datetime((seconds - offset)[aware].astype(np.int64), unit="s", utc=True)
            seconds = seconds.copy()
            seconds[aware] = _wall_seconds(instants.tz_convert(zone).tz_localize(None))
        else:
            _log.info(
                "%s: column %r carries UTC offsets; months and seasons are read from each time's own wall "
                "clock (csv_timezone: UTC or a zone name converts them)",
                what,
                column,
            )
    return seconds[codes]


def _wall_seconds(naive: pd.DatetimeIndex) -> np.ndarray:
    return ((naive - _EPOCH) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _bad_time(raw: pd.Series, bad: np.ndarray, column: str, what: str, expected: str):
    position = int(np.flatnonzero(bad)[0])
    raise DataError(
        f"{what}: column {column!r} holds {int(bad.sum())} value(s) that are not {expected}; first: "
        f"{raw.iloc[position]!r} at data row {_row_number(raw, bad)}. Fix the values or set csv_time_format "
        f"(a strftime format such as '%d/%m/%Y %H:%M', or unix / unix_ms)"
    )


def _row_number(values: pd.Series, mask: np.ndarray) -> int:
    """1-based data row of the first masked value: the index label when it is the file's row position."""
    position = int(np.flatnonzero(mask)[0])
    label = values.index[position]
    return int(label) + 1 if isinstance(label, (int, np.integer)) else position + 1
