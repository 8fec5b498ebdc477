"""Bad input fails before the work (issue #21, data): encodings, time zones, duplicate columns, huge titles,
shop SKUs that look like Online Retail fee codes, folders and unreadable files given as a source.

Every test writes its own small files into ``tmp_path``; nothing is downloaded.
"""

from __future__ import annotations

import builtins
import csv
import logging
import os
from pathlib import Path

import pandas as pd
import pytest

from causalrec.data import DataSpec, load_frame, prepare
from causalrec.data.frame import months_of, season_of
from causalrec.errors import ConfigError, DataError


def csv_spec(path, **kw) -> DataSpec:
    return DataSpec(dataset="csv", source=str(path), **{"min_user_inter": 1, "min_item_inter": 1, **kw})


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# ---------------------------------------------------------------- 1. csv_encoding

CP1252_TABLE = (
    "user_id,item_id,timestamp,title\n"
    "a,x,2024-01-01,Plain mug\n"
    "a,y,2024-01-02,Café crème cup\n"
    "b,x,2024-01-03,Plain mug\n"
)


def test_undecodable_file_names_file_offset_and_the_key_to_set(tmp_path):
    path = write(tmp_path / "shop.csv", CP1252_TABLE, "cp1252")
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(DataError) as err:
        load_frame(csv_spec(path, csv_text=["title"]))
    message = str(err.value)
    assert "shop.csv" in message
    assert f"byte offset {offset}" in message and "line 3" in message
    assert "csv_encoding: cp1252" in message
    frame = load_frame(csv_spec(path, csv_text=["title"], csv_encoding="cp1252"))
    assert sorted(frame["item_text"].unique()) == ["Café crème cup", "Plain mug"]


def test_utf16_file_is_detected(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes(CP1252_TABLE.encode("utf-16"))  # with a byte-order mark, as Excel's "Unicode text" writes
    with pytest.raises(DataError) as err:
        load_frame(csv_spec(path, csv_text=["title"]))
    assert "csv_encoding: utf-16" in str(err.value) and "export.csv" in str(err.value)
    frame = load_frame(csv_spec(path, csv_text=["title"], csv_encoding="utf-16"))
    assert "Café crème cup" in set(frame["item_text"])


def test_unknown_encoding_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="csv_encoding"):
        csv_spec(tmp_path / "t.csv", csv_encoding="klingon-8")
    with pytest.raises(ConfigError, match="csv_encoding"):
        csv_spec(tmp_path / "t.csv", csv_encoding="base64")  # a codec, but not a text encoding


# ---------------------------------------------------------------- 2. csv_timezone


def tz_table(tmp_path, times) -> Path:
    rows = [("a", f"i{k}", t) for k, t in enumerate(times)]
    path = tmp_path / "tz.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(path, index=False)
    return path


def wall(frame, item) -> pd.Timestamp:
    return pd.Timestamp(int(frame.loc[frame["item_id"] == item, "timestamp"].iloc[0]), unit="s")


# New-Year's-Eve purchase in New York (UTC-05:00): 04:30 on 1 January in UTC. The 30 November one is in autumn
# locally and in winter in UTC. Other rows carry other offsets, so the column mixes offsets.
TZ_TIMES = [
    "2011-12-31 23:30:00-05:00",
    "2011-11-30 22:00:00-05:00",
    "2011-06-01 12:00:00+01:00",
    "2011-06-02 12:00:00+00:00",
]


def test_default_keeps_each_timestamps_wall_clock(tmp_path):
    frame = load_frame(csv_spec(tz_table(tmp_path, TZ_TIMES)))
    months = dict(zip(frame["item_id"], months_of(frame["timestamp"])))
    seasons = dict(zip(frame["item_id"], season_of(frame["timestamp"])))
    assert months["i0"] == 12 and seasons["i0"] == "winter"
    assert months["i1"] == 11 and seasons["i1"] == "autumn"
    assert wall(frame, "i0") == pd.Timestamp("2011-12-31 23:30")
    assert wall(frame, "i2") == pd.Timestamp("2011-06-01 12:00")


def test_csv_timezone_utc_converts(tmp_path):
    frame = load_frame(csv_spec(tz_table(tmp_path, TZ_TIMES), csv_timezone="UTC"))
    months = dict(zip(frame["item_id"], months_of(frame["timestamp"])))
    assert months["i0"] == 1 and season_of(frame.loc[frame["item_id"] == "i1", "timestamp"])[0] == "winter"
    assert wall(frame, "i0") == pd.Timestamp("2012-01-01 04:30")
    assert wall(frame, "i2") == pd.Timestamp("2011-06-01 11:00")


def test_csv_timezone_iana_converts_aware_and_localizes_naive(tmp_path, caplog):
    path = tz_table(tmp_path, ["2011-06-01 12:00:00+01:00", "2011-06-01 09:15:00", "2011-12-31 23:30:00-05:00"])
    with caplog.at_level(logging.WARNING):
        frame = load_frame(csv_spec(path, csv_timezone="Europe/London"))
    assert wall(frame, "i0") == pd.Timestamp("2011-06-01 12:00")  # BST is +01:00 in June
    assert wall(frame, "i1") == pd.Timestamp("2011-06-01 09:15")  # naive: already London wall clock
    assert wall(frame, "i2") == pd.Timestamp("2012-01-01 04:30")  # GMT in winter
    assert "offset" in caplog.text  # the naive/aware mix is reported, not refused


def test_naive_and_aware_mix_is_read_not_called_not_a_date(tmp_path):
    for times in (
        ["2011-12-31 23:30:00-05:00", "2011-06-01 10:00:00"],
        ["2011-06-01 10:00:00", "2011-12-31 23:30:00Z"],
    ):
        frame = load_frame(csv_spec(tz_table(tmp_path, times)))
        assert wall(frame, "i0") == pd.Timestamp(times[0][:19].replace("T", " "))
        assert wall(frame, "i1") == pd.Timestamp(times[1][:19].replace("T", " "))


def test_epoch_numbers_stay_utc_unless_a_zone_is_set(tmp_path):
    path = tz_table(tmp_path, [1325374200])  # 2011-12-31 23:30 UTC
    assert wall(load_frame(csv_spec(path)), "i0") == pd.Timestamp("2011-12-31 23:30")
    frame = load_frame(csv_spec(path, csv_timezone="America/New_York"))
    assert wall(frame, "i0") == pd.Timestamp("2011-12-31 18:30")


def test_invalid_zone_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="csv_timezone"):
        csv_spec(tmp_path / "t.csv", csv_timezone="Mars/Olympus_Mons")
    assert csv_spec(tmp_path / "t.csv", csv_timezone="utc").csv_timezone == "UTC"


# ---------------------------------------------------------------- 3. duplicate columns


@pytest.mark.parametrize("header", ["user_id,item_id,timestamp,item_id", "user_id,item_id,timestamp, item_id "])
def test_duplicate_column_names_are_refused(tmp_path, header):
    path = write(tmp_path / "dup.csv", header + "\na,x,2024-01-01,y\nb,x,2024-01-02,z\n")
    with pytest.raises(DataError) as err:
        load_frame(csv_spec(path))
    assert "'item_id'" in str(err.value) and "dup.csv" in str(err.value) and "duplicate" in str(err.value)


def test_duplicate_column_names_in_the_item_table_are_refused(tmp_path):
    write(tmp_path / "p.csv", "user_id,item_id,timestamp\na,x,2024-01-01\n")
    items = write(tmp_path / "items.csv", "item_id,title,title\nx,Mug,Cup\n")
    with pytest.raises(DataError, match="'title'"):
        load_frame(csv_spec(tmp_path / "p.csv", csv_items_path=str(items), csv_text=["title"]))


# ---------------------------------------------------------------- 4. title cap


def test_huge_title_is_cut_and_the_prepared_files_read_back(tmp_path, caplog):
    huge = "WORD " * 40_000  # 200,000 characters
    rows = [
        (u, item, f"2024-{m:02d}-01", huge if item == "x" else f"title {item}")
        for u in ("a", "b", "c")
        for m, item in enumerate(["x", "y", "z", "w", "v"], start=1)
    ]
    path = tmp_path / "long.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "title"]).to_csv(path, index=False)
    spec = csv_spec(path, csv_text=["title"], data_cache_dir=str(tmp_path / "cache"))
    assert spec.max_title_chars == 1000
    with caplog.at_level(logging.WARNING):
        prepared = prepare(spec, show_progress=False)
    assert "1 item title" in caplog.text and "max_title_chars" in caplog.text
    with open(prepared.items_file, encoding="utf-8", newline="") as fh:  # as RecBole / read_titles read it
        titles = {row["item_id"]: row["item_text"] for row in csv.DictReader(fh, delimiter="\t")}
    assert len(titles["x"]) <= 1000 and titles["x"].startswith("WORD WORD") and titles["y"] == "title y"
    assert prepared.meta["stats"]["cleaning"]["titles_cut"] == 1
    assert (
        len(
            load_frame(csv_spec(path, csv_text=["title"], max_title_chars=20))
            .query("item_id == 'x'")["item_text"]
            .iloc[0]
        )
        <= 20
    )


def test_title_cap_range(tmp_path):
    for bad in (0, 131_073, "long"):
        with pytest.raises(ConfigError, match="max_title_chars"):
            csv_spec(tmp_path / "t.csv", max_title_chars=bad)


# ---------------------------------------------------------------- 5. Online Retail's fee codes are not csv SKUs


def test_csv_keeps_item_m_and_csv_exclude_items_drops(tmp_path):
    rows = [(u, item, f"2024-01-0{d}") for u in ("a", "b") for d, item in enumerate(["M", "S", "SAMPLE-1", "mug"], 1)]
    path = tmp_path / "shop.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(path, index=False)
    assert set(load_frame(csv_spec(path))["item_id"]) == {"M", "S", "SAMPLE-1", "mug"}
    frame = load_frame(csv_spec(path, csv_exclude_items=["M", "SAMPLE*"]))
    assert set(frame["item_id"]) == {"S", "mug"}
    assert frame.attrs["cleaning"]["dropped_excluded_item"] == 4
    assert set(load_frame(csv_spec(path, csv_exclude_items="m"))["item_id"]) >= {"M"}  # ids are case-sensitive


# ---------------------------------------------------------------- 6. folders and unreadable files


def test_a_folder_as_source_says_it_is_a_folder(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "sales.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataError) as err:
        load_frame(csv_spec(folder))
    assert "is a directory" in str(err.value) and "sales.csv" in str(err.value)
    assert "not found" not in str(err.value)
    with pytest.raises(DataError, match="is a directory"):
        prepare(csv_spec(folder, data_cache_dir=str(tmp_path / "cache")), show_progress=False)


def _make_unreadable(path: Path, monkeypatch) -> None:
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = builtins.open  # root (or Windows) reads it anyway: refuse where Python opens the file

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == path.resolve():
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)


def test_unreadable_file_is_a_data_error_naming_the_permission(tmp_path, monkeypatch):
    path = write(tmp_path / "locked.csv", "user_id,item_id,timestamp\na,x,2024-01-01\n")
    _make_unreadable(path, monkeypatch)
    try:
        for action in (
            lambda: load_frame(csv_spec(path)),
            lambda: prepare(csv_spec(path, data_cache_dir=str(tmp_path / "cache")), show_progress=False),
        ):
            with pytest.raises(DataError) as err:
                action()
            message = str(err.value)
            assert "locked.csv" in message and "permission" in message.lower()
            assert "corrupt" not in message
    finally:
        path.chmod(0o644)


def test_new_keys_are_yaml_documented_and_stay_out_of_the_cache_key_at_default(tmp_path):
    import yaml

    props = Path(__file__).resolve().parents[1] / "properties" / "dataset"
    loaded = yaml.safe_load((props / "csv.yaml").read_text())
    assert {"csv_encoding", "csv_timezone", "csv_exclude_items", "max_title_chars"} <= set(loaded)
    base = csv_spec(tmp_path / "t.csv")
    assert not {"csv_encoding", "csv_timezone", "csv_exclude_items", "max_title_chars"} & set(base.key_fields())
    for key, value in (
        ("csv_encoding", "cp1252"),
        ("csv_timezone", "UTC"),
        ("csv_exclude_items", ["M"]),
        ("max_title_chars", 200),
    ):
        assert csv_spec(tmp_path / "t.csv", **{key: value}).key_fields()[key] == value
        assert csv_spec(tmp_path / "t.csv", **{key: value}).key_fields() != base.key_fields()
    assert csv_spec(tmp_path / "t.csv", csv_encoding="UTF8").csv_encoding == "utf-8"
