"""Sources: Online Retail I/II (.csv, .csv.gz, .xlsx), csv by column mapping, ml-100k, k-core, bad input."""

from __future__ import annotations

import gzip
import time

import numpy as np
import pandas as pd
import pytest

from causalrec.data import DataSpec, describe, format_stats, load_frame
from causalrec.data.frame import canonicalize, k_core
from causalrec.errors import ConfigError, DataError

UCI1 = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country"]
UCI2 = ["Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price", "Customer ID", "Country"]
# 15 rows; the comment says what cleaning does with each (counted by hand).
RETAIL_ROWS = [
    (
        "536365",
        "85123A",
        "WHITE HANGING HEART T-LIGHT HOLDER",
        6,
        "2010-12-01 08:26:00",
        2.55,
        "17850.0",
        "United Kingdom",
    ),
    ("536365", "71053", "WHITE METAL LANTERN", 6, "2010-12-01 08:26:00", 3.39, "17850.0", "United Kingdom"),
    (
        "536366",
        "85123A",
        "WHITE HANGING HEART T-LIGHT HOLDER ",
        2,
        "2010-12-02 09:00:00",
        2.55,
        "17850.0",
        "United Kingdom",
    ),
    ("536367", "85123a", "CREAM HANGING HEART T-LIGHT HOLDER", 1, "2010-12-03 10:00:00", 2.55, "12583.0", "France"),
    ("536367", "POST", "POSTAGE", 1, "2010-12-03 10:00:00", 18.0, "12583.0", "France"),  # non-product
    (
        "C536368",
        "71053",
        "WHITE METAL LANTERN",
        -1,
        "2010-12-04 10:00:00",
        3.39,
        "17850.0",
        "United Kingdom",
    ),  # cancellation
    ("536369", "71053", "WHITE METAL LANTERN", 4, "2010-12-05 10:00:00", 3.39, None, "United Kingdom"),  # no customer
    ("536370", "71053", "WHITE METAL LANTERN", 0, "2010-12-06 10:00:00", 3.39, "12583.0", "France"),  # quantity 0
    ("536371", "22728", None, 5, "2010-12-07 10:00:00", 1.0, "12583.0", "France"),  # no description
    (
        "536372",
        "gift_0001_20",
        "Dotcomgiftshop Gift Voucher £20.00",
        1,
        "2010-12-08 10:00:00",
        17.0,
        "12583.0",
        "France",
    ),  # voucher
    ("536373", "71053", "WHITE METAL LANTERN", 2, "2010-12-09 10:00:00", 3.39, "12583.0", "Germany"),
    ("536373", "71053", "WHITE METAL LANTERN", 3, "2010-12-09 10:00:00", 3.39, "12583.0", "Germany"),  # duplicate
    ("536374", "22728", "ALARM CLOCK BAKELIKE PINK", 24, "2010-12-10 10:00:00", 3.75, "12583.0", "France"),
    ("536375", "M", "Manual", 1, "2010-12-10 11:00:00", 1.0, "17850.0", "United Kingdom"),  # non-product
    (
        "536376",
        "BANK CHARGES",
        "Bank Charges",
        1,
        "2010-12-10 12:00:00",
        15.0,
        "17850.0",
        "United Kingdom",
    ),  # non-product
]
EXPECTED_COUNTS = {
    "rows_read": 15,
    "dropped_no_customer": 1,
    "dropped_cancellation": 1,
    "dropped_non_positive_quantity": 1,
    "dropped_non_product": 4,
    "dropped_no_description": 1,
    "dropped_duplicate": 1,
    "rows_clean": 6,
}
T = {
    d: int(pd.Timestamp(d, tz="UTC").timestamp())
    for d in (
        "2010-12-01 08:26:00",
        "2010-12-02 09:00:00",
        "2010-12-03 10:00:00",
        "2010-12-09 10:00:00",
        "2010-12-10 10:00:00",
    )
}
HEART = "WHITE HANGING HEART T-LIGHT HOLDER"
EXPECTED_ROWS = sorted(
    [
        ("17850", "85123A", T["2010-12-01 08:26:00"], "United Kingdom", HEART),
        ("17850", "71053", T["2010-12-01 08:26:00"], "United Kingdom", "WHITE METAL LANTERN"),
        ("17850", "85123A", T["2010-12-02 09:00:00"], "United Kingdom", HEART),
        # 12583 bought twice in France and once in Germany: the user's region is France
        ("12583", "85123A", T["2010-12-03 10:00:00"], "France", HEART),
        ("12583", "71053", T["2010-12-09 10:00:00"], "France", "WHITE METAL LANTERN"),
        ("12583", "22728", T["2010-12-10 10:00:00"], "France", "ALARM CLOCK BAKELIKE PINK"),
    ]
)


def retail_table(columns=UCI1) -> pd.DataFrame:
    return pd.DataFrame(RETAIL_ROWS, columns=columns)


def retail_spec(path, **kw) -> DataSpec:
    return DataSpec(dataset="online-retail", source=str(path), min_user_inter=1, min_item_inter=1, **kw)


def rows_of(frame: pd.DataFrame) -> list[tuple]:
    return sorted(map(tuple, frame[["user_id", "item_id", "timestamp", "region", "item_text"]].to_numpy().tolist()))


@pytest.mark.parametrize("kind", ["csv-I", "csv.gz-II", "xlsx-II-two-sheets"])
def test_online_retail_cleaning(tmp_path, kind):
    if kind == "csv-I":
        path = tmp_path / "online_retail.csv"
        retail_table(UCI1).to_csv(path, index=False)
    elif kind == "csv.gz-II":
        path = tmp_path / "online_retail_II.csv.gz"
        retail_table(UCI2).to_csv(path, index=False, compression="gzip")
    else:
        pytest.importorskip("openpyxl")
        path = tmp_path / "online_retail_II.xlsx"
        table = retail_table(UCI2)
        table["InvoiceDate"] = pd.to_datetime(table["InvoiceDate"])
        table["Customer ID"] = pd.to_numeric(table["Customer ID"])
        with pd.ExcelWriter(path, engine="openpyxl") as writer:
            table.iloc[:8].to_excel(writer, sheet_name="Year 2009-2010", index=False)
            table.iloc[8:].to_excel(writer, sheet_name="Year 2010-2011", index=False)
    frame = load_frame(retail_spec(path))
    assert rows_of(frame) == EXPECTED_ROWS
    cleaning = frame.attrs["cleaning"]
    assert {k: cleaning[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
    assert frame["timestamp"].dtype == np.int64


def test_online_retail_exclusion_list_is_configurable(tmp_path):
    path = tmp_path / "r.csv"
    retail_table().to_csv(path, index=False)
    frame = load_frame(retail_spec(path, exclude_stock_codes=["GIFT_*"]))
    assert set(frame["item_id"]) == {"85123A", "71053", "22728", "POST", "M", "BANK_CHARGES"}
    assert frame.attrs["cleaning"]["dropped_non_product"] == 1


def test_online_retail_missing_column(tmp_path):
    path = tmp_path / "r.csv"
    retail_table().drop(columns=["Country"]).rename(columns={"CustomerID": "Client"}).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_frame(retail_spec(path))
    message = str(err.value)
    assert "customer ('CustomerID' or 'Customer ID')" in message and "country ('Country')" in message
    assert "'Client'" in message and "'StockCode'" in message  # the columns present are listed


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["is empty"]),
        (",".join(UCI1).encode() + b"\n", ["header but no rows"]),
    ],
)
def test_online_retail_empty_files(tmp_path, content, words):
    path = tmp_path / "r.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_frame(retail_spec(path))
    assert all(w in str(err.value) for w in words) and "r.csv" in str(err.value)


@pytest.mark.parametrize("name", ["r.csv.gz", "r.xlsx"])
def test_corrupt_files(tmp_path, name):
    path = tmp_path / name
    good = gzip.compress(retail_table().to_csv(index=False).encode())
    path.write_bytes(good[: len(good) // 2] if name.endswith(".gz") else b"PK\x03\x04 this is no workbook")
    with pytest.raises(DataError) as err:
        load_frame(retail_spec(path))
    assert "cannot be read" in str(err.value) and name in str(err.value)


def test_unparseable_date_names_value_and_row(tmp_path):
    table = retail_table()
    table.loc[12, "InvoiceDate"] = "tenth of December"
    path = tmp_path / "r.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_frame(retail_spec(path))
    assert "'tenth of December'" in str(err.value) and "data row 13" in str(err.value)
    assert "'InvoiceDate'" in str(err.value)


def test_online_retail_needs_a_source(tmp_path):
    with pytest.raises(ConfigError, match="archive.ics.uci.edu"):
        load_frame(DataSpec(dataset="online-retail"))
    with pytest.raises(DataError, match="not found"):
        load_frame(retail_spec(tmp_path / "nope.csv"))


# ---------------------------------------------------------------- csv


@pytest.fixture
def shop_csv(tmp_path):
    purchases = pd.DataFrame(
        {
            "customer": ["ann", "ann", "bob", "bob", "bob", "cy z"],
            "sku": ["m1", "p2", "m1", "m1", "k3", "p2"],
            "when": ["03/01/2024", "15/02/2024", "28/02/2024", "01/03/2024", "01/03/2024", "31/12/2023"],
            "store": ["Leeds", "Leeds", "York", "York", "York", "Leeds"],
        }
    )
    items = pd.DataFrame(
        {"sku": ["m1", "p2", "k3"], "colour": ["red", "blue", None], "name": ["mug", "plate", "kettle"]}
    )
    purchases.to_csv(tmp_path / "purchases.csv", index=False)
    items.to_csv(tmp_path / "items.tsv", sep="\t", index=False)
    return tmp_path


def csv_spec(folder, **kw) -> DataSpec:
    base = dict(
        dataset="csv",
        source=str(folder / "purchases.csv"),
        csv_user="customer",
        csv_item="sku",
        csv_time="when",
        csv_time_format="%d/%m/%Y",
        min_user_inter=1,
        min_item_inter=1,
    )
    return DataSpec(**{**base, **kw})


def test_csv_mapping_with_item_table(shop_csv):
    spec = csv_spec(
        shop_csv, csv_region="store", csv_text=["colour", "name"], csv_items_path=str(shop_csv / "items.tsv")
    )
    frame = load_frame(spec)
    day = lambda d: int(pd.Timestamp(d, tz="UTC").timestamp())  # noqa: E731
    assert rows_of(frame) == sorted(
        [
            ("ann", "m1", day("2024-01-03"), "Leeds", "red mug"),
            ("ann", "p2", day("2024-02-15"), "Leeds", "blue plate"),
            ("bob", "m1", day("2024-02-28"), "York", "red mug"),
            ("bob", "m1", day("2024-03-01"), "York", "red mug"),
            ("bob", "k3", day("2024-03-01"), "York", "kettle"),
            ("cy_z", "p2", day("2023-12-31"), "Leeds", "blue plate"),
        ]
    )


def test_csv_defaults_region_all_and_id_as_text(shop_csv):
    frame = load_frame(csv_spec(shop_csv))
    assert set(frame["region"]) == {"all"}
    assert (frame["item_text"] == frame["item_id"]).all()


def test_csv_unix_times(tmp_path):
    pd.DataFrame({"user_id": ["a", "a"], "item_id": ["x", "y"], "timestamp": [1700000000, 1700000500]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    frame = load_frame(DataSpec(dataset="csv", source=str(tmp_path / "t.csv"), min_user_inter=1, min_item_inter=1))
    assert sorted(frame["timestamp"]) == [1700000000, 1700000500]
    ms = load_frame(
        DataSpec(
            dataset="csv", source=str(tmp_path / "t.csv"), csv_time_format="unix_ms", min_user_inter=1, min_item_inter=1
        )
    )
    assert sorted(ms["timestamp"]) == [1700000, 1700000]


def test_csv_missing_column_lists_present(shop_csv):
    with pytest.raises(DataError) as err:
        load_frame(csv_spec(shop_csv, csv_user="client"))
    assert "user (csv_user) ('client')" in str(err.value)
    assert "['customer', 'sku', 'when', 'store']" in str(err.value)
    with pytest.raises(DataError, match="'title'"):
        load_frame(csv_spec(shop_csv, csv_text=["title"]))


def test_csv_bad_date(shop_csv):
    with pytest.raises(DataError) as err:
        load_frame(csv_spec(shop_csv, csv_time_format="%Y-%m-%d"))
    assert "'03/01/2024'" in str(err.value) and "data row 1" in str(err.value) and "'%Y-%m-%d'" in str(err.value)


def test_csv_empty_time_cell(tmp_path):
    pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": ["2024-01-01", None]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    with pytest.raises(DataError, match="empty in 1 rows .*data row 2"):
        load_frame(DataSpec(dataset="csv", source=str(tmp_path / "t.csv"), min_user_inter=1, min_item_inter=1))


# ---------------------------------------------------------------- ml-100k


def test_ml100k_bundled():
    frame = load_frame(DataSpec(dataset="ml-100k", min_user_inter=1, min_item_inter=1))
    assert frame.attrs["cleaning"]["rows_read"] == 100_000 and len(frame) == 100_000
    assert frame["user_id"].nunique() == 943 and frame["item_id"].nunique() == 1682
    first = frame[frame["user_id"] == "1"].iloc[0]
    assert first["region"] == "zip8"  # user 1's zip code is 85711
    toy = frame[frame["item_id"] == "1"].iloc[0]
    assert toy["item_text"] == "Toy Story (1995)" and toy["category"] == "Animation"
    assert frame["timestamp"].between(874_700_000, 893_300_000).all()  # Sep 1997 - Apr 1998


def test_ml100k_missing_folder(tmp_path):
    with pytest.raises(DataError, match="ml-100k.inter"):
        load_frame(DataSpec(dataset="ml-100k", source=str(tmp_path)))


# ---------------------------------------------------------------- frame helpers


def _frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "region", "item_text"])


def test_k_core_iterates_to_a_fixed_point():
    # one pass drops z (1 row), which leaves C with 1 row; only a second pass drops C's x row
    frame = _frame(
        [
            ("A", "x", 1, "r", "X"),
            ("A", "y", 2, "r", "Y"),
            ("B", "x", 1, "r", "X"),
            ("B", "y", 2, "r", "Y"),
            ("C", "x", 1, "r", "X"),
            ("C", "z", 2, "r", "Z"),
        ]
    )
    out = k_core(frame, 2, 2)
    assert sorted(out["user_id"]) == ["A", "A", "B", "B"]
    with pytest.raises(DataError, match="min_user_inter=3"):
        k_core(frame, 3, 2)


def test_canonicalize_ids_and_clashes():
    out = canonicalize(_frame([("u 1", "i\t1", 5, None, ""), ("u 1", 'i"2', 6, "a\tb", "T")]), "test")
    assert list(out["user_id"]) == ["u_1", "u_1"] and list(out["item_id"]) == ["i_1", "i'2"]
    assert list(out["item_text"]) == ["i_1", "T"]  # empty text falls back to the id
    # one region per user: "unknown" (missing) and "a b" tie at one row each; the alphabetically first wins
    assert set(out["region"]) == {"a b"}
    with pytest.raises(DataError, match="'u 1' becomes 'u_1'"):
        canonicalize(_frame([("u 1", "i", 5, "r", "t"), ("u_1", "i", 6, "r", "t")]), "test")


def test_describe_and_format_stats():
    frame = _frame([("a", "x", 0, "r1", "X"), ("a", "x", 86400 * 40, "r1", "X"), ("b", "y", 0, "r2", "Y")])
    stats = describe(frame)
    assert (stats["users"], stats["items"], stats["interactions"], stats["user_item_pairs"]) == (2, 2, 3, 2)
    assert stats["sparsity"] == pytest.approx(0.5) and stats["months"] == 2 and stats["regions"] == 2
    text = format_stats(stats)
    for word in ("users", "items", "interactions", "regions", "months", "sparsity", "1970-01-01"):
        assert word in text


# ---------------------------------------------------------------- the real Online Retail file


@pytest.mark.shared_data
def test_real_online_retail(online_retail_path):
    spec = DataSpec(dataset="online-retail", source=str(online_retail_path))
    start = time.perf_counter()
    frame = load_frame(spec)
    elapsed = time.perf_counter() - start
    counts = frame.attrs["cleaning"]
    # published/verified facts of the file (shared/datasets/README.md)
    assert counts["rows_read"] == 541_909
    assert counts["dropped_no_customer"] == 135_080
    purchases = (
        counts["rows_read"]
        - counts["dropped_no_customer"]
        - counts["dropped_cancellation"]
        - counts["dropped_non_positive_quantity"]
    )
    assert purchases == 397_924
    assert frame["user_id"].nunique() <= 4_339 and frame["item_id"].nunique() <= 3_665
    assert not frame["item_id"].isin(["POST", "DOT", "M", "C2", "D", "BANK_CHARGES", "AMAZONFEE", "CRUK"]).any()
    assert not frame["item_id"].str.startswith("GIFT_0001").any()
    assert frame["region"].value_counts().index[0] == "United Kingdom"
    assert frame.groupby("user_id")["region"].nunique().max() == 1
    assert frame.groupby("item_id")["item_text"].nunique().max() == 1
    assert elapsed < 15, f"loading took {elapsed:.1f} s"
