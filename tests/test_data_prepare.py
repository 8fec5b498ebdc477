"""prepare(): the files of docs/contracts.md, counted against the split, cached by input hash, atomic."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from causalrec.data import DataSpec, PreparedDataset, load_frame, prepare, split_frame, store
from causalrec.data.store import FILE_SUFFIXES
from causalrec.errors import ConfigError, DataError

INTER_HEADER = ["user_id:token", "item_id:token", "timestamp:float", "season:token", "region:token"]
SEQ_HEADER = [
    "user_id:token",
    "item_id_list:token_seq",
    "item_id:token",
    "timestamp:float",
    "season:token",
    "region:token",
]


def small(tmp_path, **kw) -> DataSpec:
    base = dict(
        sim_users=150,
        sim_items=60,
        sim_categories=8,
        sim_inter_per_user=15.0,
        seed=3,
        data_cache_dir=str(tmp_path / "cache"),
    )
    return DataSpec(**{**base, **kw})


def read_atomic(path: Path) -> pd.DataFrame:
    """Parse a RecBole atomic file the way RecBole does (tab separated, typed header)."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    spec = small(tmp, split="seasonal")
    return spec, prepare(spec, show_progress=False)


def test_layout_and_headers(prepared):
    spec, out = prepared
    assert isinstance(out, PreparedDataset) and out.dataset == "retail-sim" and not out.reused
    data_path = Path(out.data_path)
    assert data_path.parent == spec.cache_dir() / "retail-sim" and len(data_path.name) == 16
    assert out.directory == data_path / "retail-sim"
    assert sorted(p.name for p in out.directory.iterdir()) == sorted(f"retail-sim.{s}" for s in FILE_SUFFIXES)
    assert set(out.files) == set(FILE_SUFFIXES) and out.meta_file == out.directory / "retail-sim.meta.json"
    for suffix in ("train", "valid", "test"):
        assert list(read_atomic(out.file(f"{suffix}.inter")).columns) == INTER_HEADER
        assert list(read_atomic(out.file(f"seq_{suffix}.inter")).columns) == SEQ_HEADER
    assert list(read_atomic(out.file("item")).columns) == ["item_id:token"]
    assert list(pd.read_csv(out.items_file, sep="\t").columns) == ["item_id", "item_text", "category"]


def test_row_counts_match_the_split(prepared):
    spec, out = prepared
    frame = load_frame(spec)
    split = split_frame(frame, spec)  # computed independently of the files
    for part in ("train", "valid", "test"):
        rows = read_atomic(out.file(f"{part}.inter"))
        expected = getattr(split, part)
        assert len(rows) == len(expected)
        assert sorted(zip(rows["user_id:token"], rows["item_id:token"], rows["timestamp:float"].astype(int))) == sorted(
            zip(expected["user_id"], expected["item_id"], expected["timestamp"])
        )
    seq_train = read_atomic(out.file("seq_train.inter"))
    users_whose_first_row_trains = (split.train["position"] == 0).sum()
    assert len(seq_train) == len(split.train) - users_whose_first_row_trains
    assert len(read_atomic(out.file("seq_valid.inter"))) == len(split.valid)
    assert len(read_atomic(out.file("seq_test.inter"))) == len(split.test)
    assert len(read_atomic(out.file("item"))) == frame["item_id"].nunique() == out.n_items
    valid = read_atomic(out.file("valid.inter"))
    assert valid["user_id:token"].is_unique
    assert out.meta["parts"]["train"] == len(split.train)


def test_histories_brute_force(prepared):
    spec, out = prepared
    frame = load_frame(spec)
    ordered = frame.assign(row=range(len(frame))).sort_values(["user_id", "timestamp", "row"])
    bought = {u: list(g["item_id"]) for u, g in ordered.groupby("user_id")}
    times = {u: list(g["timestamp"]) for u, g in ordered.groupby("user_id")}
    for part in ("seq_train", "seq_valid", "seq_test"):
        rows = read_atomic(out.file(f"{part}.inter"))
        for user, hist, item, ts in zip(
            rows["user_id:token"],
            rows["item_id_list:token_seq"],
            rows["item_id:token"],
            rows["timestamp:float"].astype(int),
        ):
            k = times[user].index(ts)  # simulated times are unique per user
            assert bought[user][k] == item
            assert hist.split(" ") == bought[user][:k][-spec.max_history :]


def test_max_history_truncates(tmp_path):
    spec = small(tmp_path, split="iid", max_history=3)
    out = prepare(spec, show_progress=False)
    lengths = read_atomic(out.file("seq_test.inter"))["item_id_list:token_seq"].str.split(" ").str.len()
    assert lengths.max() == 3 and lengths.min() >= 1


def test_meta(prepared):
    spec, out = prepared
    meta = json.loads(out.meta_file.read_text())
    assert meta == out.meta
    assert meta["dataset"] == "retail-sim" and meta["split"] == "seasonal" and len(meta["input_hash"]) == 64
    assert DataSpec(**meta["spec"]) == spec
    assert meta["stats"]["users"] == load_frame(spec)["user_id"].nunique()
    assert {"valid", "test", "iid_control"} <= set(meta["shift_evidence"])
    train = read_atomic(out.file("train.inter"))
    assert sum(meta["environments"]["season"].values()) == len(train)
    assert meta["environments"]["season"] == train["season:token"].value_counts().sort_index().to_dict()
    assert meta["environments"]["region"] == train["region:token"].value_counts().sort_index().to_dict()
    assert set(meta["environments"]["season"]) <= {"winter", "spring", "summer"}  # Jan-Aug train


def test_reuse_and_force(tmp_path, caplog):
    spec = small(tmp_path, split="iid")
    first = prepare(spec, show_progress=False)
    stamp = first.file("train.inter").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="causalrec.data.store"):
        again = prepare(spec, show_progress=False)
    assert again.reused and again.directory == first.directory
    assert "reusing prepared data at" in caplog.text
    assert again.file("train.inter").stat().st_mtime_ns == stamp
    forced = prepare(spec, force=True, show_progress=False)
    assert not forced.reused and forced.directory == first.directory
    assert forced.file("train.inter").read_bytes() == first.file("train.inter").read_bytes()
    assert [p.name for p in (tmp_path / "cache" / "retail-sim").iterdir() if not p.name.startswith(".")] == [
        Path(first.data_path).name
    ]


def test_cache_key_follows_inputs(tmp_path):
    path = tmp_path / "t.csv"
    rows = [(u, f"i{(u * 7 + k) % 9}", 1_700_000_000 + 86_400 * k) for u in range(12) for k in range(8)]
    table = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    table.to_csv(path, index=False)
    spec = DataSpec(
        dataset="csv",
        source=str(path),
        split="iid",
        data_cache_dir=str(tmp_path / "cache"),
        min_user_inter=2,
        min_item_inter=2,
    )
    a = prepare(spec, show_progress=False)
    # a changed file at the same path: a new key (its content is hashed, not its name or mtime)
    assert prepare(spec, show_progress=False).reused
    table.iloc[:-1].to_csv(path, index=False)
    b = prepare(spec, show_progress=False)
    assert b.data_path != a.data_path and not b.reused
    assert len(read_atomic(b.file("train.inter"))) == len(read_atomic(a.file("train.inter"))) - 1
    # a parameter of the split changes the key; one the split does not read does not
    assert prepare(DataSpec(**{**spec.to_dict(), "split": "temporal"}), show_progress=False).data_path != b.data_path
    assert prepare(DataSpec(**{**spec.to_dict(), "tail_ratio": 0.3}), show_progress=False).data_path == b.data_path


def test_identical_output_for_the_same_seed(tmp_path):
    one = prepare(small(tmp_path / "1", split="regional"), show_progress=False)
    two = prepare(small(tmp_path / "2", split="regional"), show_progress=False)
    for suffix in FILE_SUFFIXES:
        if suffix != "meta.json":
            assert one.file(suffix).read_bytes() == two.file(suffix).read_bytes(), suffix
    other = prepare(small(tmp_path / "1", split="regional", seed=4), show_progress=False)
    assert other.file("train.inter").read_bytes() != one.file("train.inter").read_bytes()


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


def test_failed_split_leaves_nothing(tmp_path):
    path = tmp_path / "t.csv"
    rows = [(f"u{u}", f"i{k}", f"2024-0{1 + k % 3}-1{k}") for u in range(4) for k in range(6)]  # Jan-Mar only
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(path, index=False)
    spec = DataSpec(
        dataset="csv",
        source=str(path),
        split="seasonal",
        data_cache_dir=str(tmp_path / "cache"),
        min_user_inter=1,
        min_item_inter=1,
    )
    with pytest.raises(DataError, match=r"valid_months=\[9\] hold no interactions"):
        prepare(spec, show_progress=False)
    assert _leftovers(tmp_path / "cache" / "csv") == []


def test_error_while_writing_leaves_nothing(tmp_path, monkeypatch):
    real = store.write_split

    def write_then_fail(split, frame, spec, directory, **kw):
        real(split, frame, spec, directory, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_split", write_then_fail)
    spec = small(tmp_path, split="iid")
    with pytest.raises(OSError, match="disk full"):
        prepare(spec, show_progress=False)
    assert _leftovers(tmp_path / "cache" / "retail-sim") == []
    monkeypatch.setattr(store, "write_split", real)
    assert not prepare(spec, show_progress=False).reused


def test_concurrent_prepares_build_once(tmp_path, monkeypatch):
    builds = []
    real = store.load_frame

    def slow_load(spec):
        builds.append(1)
        time.sleep(0.3)  # widen the window in which the others arrive
        return real(spec)

    monkeypatch.setattr(store, "load_frame", slow_load)
    spec = small(tmp_path, split="temporal")
    results, errors = [], []

    def run():
        try:
            results.append(prepare(spec, show_progress=False))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(builds) == 1
    assert len({r.directory for r in results}) == 1 and sum(not r.reused for r in results) == 1
    assert _leftovers(tmp_path / "cache" / "retail-sim") == [Path(results[0].data_path).name]


def test_items_tsv_round_trips_awkward_titles(tmp_path):
    path = tmp_path / "t.csv"
    titles = ['12" PIZZA PLATE', "MUG, BLUE", "TAB\tSEPARATED", "PLAIN"]
    rows = [(f"u{u}", f"i{k}", 1_700_000_000 + 3_600 * (u * 4 + k), titles[k]) for u in range(5) for k in range(4)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "title"]).to_csv(path, index=False)
    spec = DataSpec(
        dataset="csv",
        source=str(path),
        csv_text=["title"],
        split="iid",
        data_cache_dir=str(tmp_path / "cache"),
        min_user_inter=1,
        min_item_inter=1,
    )
    items = pd.read_csv(prepare(spec, show_progress=False).items_file, sep="\t", keep_default_na=False)
    assert dict(zip(items["item_id"], items["item_text"])) == {
        "i0": '12" PIZZA PLATE',
        "i1": "MUG, BLUE",
        "i2": "TAB SEPARATED",
        "i3": "PLAIN",
    }
    assert set(items["category"]) == {""}


@pytest.mark.shared_data
def test_real_online_retail_seasonal(online_retail_path, tmp_path):
    spec = DataSpec(
        dataset="online-retail",
        source=str(online_retail_path),
        split="seasonal",
        data_cache_dir=str(tmp_path / "cache"),
    )
    start = time.perf_counter()
    out = prepare(spec, show_progress=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"prepare took {elapsed:.1f} s"
    train = read_atomic(out.file("train.inter"))
    months = pd.to_datetime(train["timestamp:float"].astype(float), unit="s").dt.month
    assert (
        months.isin(range(1, 9)).all()
        and train["timestamp:float"].astype(float).max() < pd.Timestamp("2011-09-01", tz="UTC").timestamp()
    )
    test = read_atomic(out.file("test.inter"))
    assert test["user_id:token"].is_unique
    assert pd.to_datetime(test["timestamp:float"].astype(float), unit="s").dt.month.isin([10, 11, 12]).all()
    evidence = out.meta["shift_evidence"]
    assert evidence["test"]["top100_jaccard"] < evidence["iid_control"]["top100_jaccard"] - 0.2
    assert evidence["test"]["item_js"] > evidence["iid_control"]["item_js"] + 0.1
    assert out.meta["stats"]["cleaning"]["rows_read"] == 541_909


@pytest.mark.parametrize("model, prefix", [("BPR", ""), ("SASRec", "seq_")])
def test_recbole_loads_every_row(in_tmp, model, prefix):
    """RecBole's own loader (through causalrec's config hooks) reads the benchmark files without losing rows."""
    from recbole.config import Config
    from recbole.data import create_dataset

    params = {
        "sim_users": 150,
        "sim_items": 60,
        "sim_categories": 8,
        "sim_inter_per_user": 15.0,
        "seed": 3,
        "split": "seasonal",
        "show_progress": False,
        "save_dataset": False,
    }
    config = Config(model=model, dataset="retail-sim", config_dict=params)
    out = prepare(DataSpec.from_mapping(config.final_config_dict), show_progress=False)
    assert out.reused  # the config hook prepared the very same files
    dataset = create_dataset(config)
    train, valid, test = dataset.build()
    for part, built in zip(("train", "valid", "test"), (train, valid, test)):
        assert len(built) == len(read_atomic(out.file(f"{prefix}{part}.inter")))
    assert dataset.item_num == out.n_items + 1  # + RecBole's padding id


def test_history_environments_brute_force(tmp_path):
    """``history_environments``: the sequence files also hold each history item's season and region, aligned with
    ``item_id_list`` (checked against the frame's own rows); the flag joins the data key only when set."""
    plain = small(tmp_path, split="regional")
    spec = small(tmp_path, split="regional", history_environments=True)
    assert "history_environments" not in plain.key_fields() and spec.key_fields()["history_environments"] is True
    out = prepare(spec, show_progress=False)
    assert out.data_path != prepare(plain, show_progress=False).data_path
    frame = split_frame(load_frame(spec), spec).frame  # the labels the split derives (season from the month)
    ordered = frame.assign(row=range(len(frame))).sort_values(["user_id", "timestamp", "row"])
    groups = {u: g for u, g in ordered.groupby("user_id")}
    checked = 0
    for part in ("seq_train", "seq_valid", "seq_test"):
        rows = read_atomic(out.file(f"{part}.inter"))
        assert list(rows.columns) == SEQ_HEADER + ["season_list:token_seq", "region_list:token_seq"]
        for user, hist, ts, seasons, regions in zip(
            rows["user_id:token"],
            rows["item_id_list:token_seq"],
            rows["timestamp:float"].astype(int),
            rows["season_list:token_seq"],
            rows["region_list:token_seq"],
        ):
            g = groups[user]
            k = list(g["timestamp"]).index(ts)
            earlier = g.iloc[:k].tail(spec.max_history)
            assert hist.split(" ") == list(earlier["item_id"])
            assert seasons.split(" ") == [str(s).replace(" ", "_") for s in earlier["season"]]
            assert regions.split(" ") == [str(r).replace(" ", "_") for r in earlier["region"]]
            checked += 1
    assert checked > 100
    with pytest.raises(ConfigError, match="history_environments"):
        small(tmp_path, history_environments="yes")
