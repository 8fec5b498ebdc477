"""Shift splits against counted truth: hand-built frames with known parts, brute-force checks on retail-sim."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from causalrec.data import SPLITS, DataSpec, load_frame, split_frame
from causalrec.data.shifts import js_divergence, top_k_jaccard
from causalrec.errors import DataError

SEASON = {
    12: "winter",
    1: "winter",
    2: "winter",
    3: "spring",
    4: "spring",
    5: "spring",
    6: "summer",
    7: "summer",
    8: "summer",
    9: "autumn",
    10: "autumn",
    11: "autumn",
}


def hand_frame(users: dict[str, list[tuple[str, str]]], regions: dict[str, str] | None = None) -> pd.DataFrame:
    rows = [
        (u, item, int(pd.Timestamp(day, tz="UTC").timestamp()), (regions or {}).get(u, "all"), item.upper())
        for u, events in users.items()
        for item, day in events
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "region", "item_text"])


def parts_by_item(split, user):
    rows = split.frame[split.frame["user_id"] == user]
    return dict(zip(rows["item_id"], rows["part"]))


@pytest.fixture(scope="module")
def sim():
    spec = DataSpec(sim_users=400, sim_items=150, seed=11)
    return load_frame(spec)


def spec_for(split, **kw):
    return DataSpec(sim_users=400, sim_items=150, seed=11, split=split, **kw)


# ---------------------------------------------------------------- exact parts on hand-built frames


def test_iid_leave_one_out():
    frame = hand_frame(
        {
            "a": [(f"a{k}", f"2023-01-0{k}") for k in range(1, 6)],
            "b": [("b1", "2023-01-01"), ("b2", "2023-01-02")],
            "c": [("c1", "2023-01-01")],
        }
    )
    split = split_frame(frame, DataSpec(split="iid"))
    assert parts_by_item(split, "a") == {"a1": "train", "a2": "train", "a3": "train", "a4": "valid", "a5": "test"}
    assert parts_by_item(split, "b") == {"b1": "train", "b2": "test"}
    assert parts_by_item(split, "c") == {"c1": "train"}


def test_temporal_periods():
    frame = hand_frame(
        {
            "ten": [(f"t{k}", f"2023-01-{k + 1:02d}") for k in range(10)],
            "five": [(f"f{k}", f"2023-01-{k + 1:02d}") for k in range(5)],
            "two": [("w0", "2023-01-01"), ("w1", "2023-01-02")],
        }
    )
    split = split_frame(frame, DataSpec(split="temporal", test_ratio=0.2, valid_ratio=0.1))
    # 10 rows: test period = last 2 (t8, t9), valid period = 1 row before (t7); targets open each period
    assert parts_by_item(split, "ten") == {
        **{f"t{k}": "train" for k in range(7)},
        "t7": "valid",
        "t8": "test",
        "t9": "other",
    }
    # 5 rows: round(1.0) = 1 test row, round(0.5) = 1 valid row (half up)
    assert parts_by_item(split, "five") == {"f0": "train", "f1": "train", "f2": "train", "f3": "valid", "f4": "test"}
    assert parts_by_item(split, "two") == {"w0": "train", "w1": "train"}  # too short: only trains


def test_seasonal_hand_frame():
    frame = hand_frame(
        {
            "u": [
                ("dec10", "2010-12-05"),
                ("jan", "2011-01-10"),
                ("may", "2011-05-01"),
                ("sep3", "2011-09-03"),
                ("sep20", "2011-09-20"),
                ("oct", "2011-10-02"),
                ("nov", "2011-11-11"),
                ("dec11", "2011-12-01"),
            ],
            "v": [("v_oct5", "2011-10-05"), ("v_oct6", "2011-10-06")],
            "w": [("w_feb", "2011-02-01"), ("w_aug", "2011-08-31")],
        }
    )
    split = split_frame(frame, DataSpec(dataset="online-retail", source="x", split="seasonal"))
    # Dec 2010 is a test-season month before the split year (Jan-Dec 2011): history only
    assert parts_by_item(split, "u") == {
        "dec10": "other",
        "jan": "train",
        "may": "train",
        "sep3": "valid",
        "sep20": "other",
        "oct": "test",
        "nov": "other",
        "dec11": "other",
    }
    # v's first October row has no history, so the target is the next one
    assert parts_by_item(split, "v") == {"v_oct5": "other", "v_oct6": "test"}
    assert parts_by_item(split, "w") == {"w_feb": "train", "w_aug": "train"}
    assert split.params["split_year"] == ["2011-01", "2011-12"]
    # a December in train_months trains only before the first valid/test row (Dec 2010, not Dec 2011)
    split = split_frame(
        frame,
        DataSpec(
            dataset="online-retail",
            source="x",
            split="seasonal",
            train_months=[1, 2, 3, 4, 5, 6, 7, 8, 12],
            test_months=[10, 11],
        ),
    )
    assert parts_by_item(split, "u")["dec10"] == "train" and parts_by_item(split, "u")["dec11"] == "other"


def test_regional_hand_frame():
    users = {u: [(f"{u}{k}", f"2023-0{k + 1}-01") for k in range(3)] for u in ("a", "b", "c", "d", "e")}
    regions = {"a": "UK", "b": "UK", "c": "UK", "d": "FR", "e": "DE"}
    split = split_frame(
        hand_frame(users, regions), DataSpec(split="regional", train_regions=["UK"], valid_regions=["FR"])
    )
    assert split.params["test_regions"] == ["DE"]
    for u in "abc":
        assert set(parts_by_item(split, u).values()) == {"train"}
    assert parts_by_item(split, "d") == {"d0": "train", "d1": "train", "d2": "valid"}
    assert parts_by_item(split, "e") == {"e0": "train", "e1": "train", "e2": "test"}


def test_popularity_hand_frame():
    # x: 6 of 10 rows, y: 3, z: 1; with tail_ratio 0.5 the head is {x} (60 % >= 50 %), the tail {y, z}
    frame = hand_frame(
        {
            "a": [("x", "2023-01-01"), ("y", "2023-01-02"), ("z", "2023-01-03"), ("x", "2023-01-04")],
            "b": [
                ("x", "2023-01-01"),
                ("y", "2023-01-02"),
                ("x", "2023-01-03"),
                ("y", "2023-01-04"),
                ("x", "2023-01-05"),
                ("x", "2023-01-06"),
            ],
        }
    )
    split = split_frame(frame, DataSpec(split="popularity", tail_ratio=0.5))
    a = split.frame[split.frame["user_id"] == "a"]["part"].tolist()
    b = split.frame[split.frame["user_id"] == "b"]["part"].tolist()
    # a: last tail row is z (pos 2) -> test; the last tail row before it is y (pos 1) -> valid; x (pos 0) trains
    assert a == ["train", "valid", "test", "other"]
    # b: tail rows y at pos 1 and 3: test = pos 3, valid = pos 1
    assert b == ["train", "valid", "other", "test", "other", "other"]
    assert split.params["head_items"] == 1


# ---------------------------------------------------------------- properties on simulated data


@pytest.mark.parametrize("name", SPLITS)
def test_rows_conserved_one_target_per_user_with_history(sim, name):
    split = split_frame(sim, spec_for(name))
    f = split.frame
    assert len(f) == len(sim)
    assert sorted(map(tuple, f[["user_id", "item_id", "timestamp"]].to_numpy().tolist())) == sorted(
        map(tuple, sim[["user_id", "item_id", "timestamp"]].to_numpy().tolist())
    )
    counts = split.counts()
    assert sum(counts.values()) == len(sim)
    assert (len(split.train), len(split.valid), len(split.test)) == (counts["train"], counts["valid"], counts["test"])
    for part in (split.valid, split.test):
        assert part["user_id"].is_unique and len(part) > 0
        assert (part["position"] >= 1).all()
    # env labels: meteorological season of the timestamp, region of the user
    months = pd.to_datetime(split.train["timestamp"], unit="s").dt.month
    assert (split.env_labels["season"].to_numpy() == months.map(SEASON).to_numpy()).all()
    assert (split.env_labels["region"].to_numpy() == split.train["region"].to_numpy()).all()


@pytest.mark.parametrize("name", SPLITS)
def test_training_rows_never_follow_a_users_target_in_time_based_splits(sim, name):
    """No training row of a user comes after their valid target (so no future leaks into training), except in
    regional, where a target is the user's last row anyway."""
    split = split_frame(sim, spec_for(name))
    f = split.frame
    first_target = f[f["part"].isin(["valid", "test"])].groupby("user_id")["position"].min()
    last_train = split.train.groupby("user_id")["position"].max()
    both = first_target.index.intersection(last_train.index)
    assert (last_train[both] < first_target[both]).all()


def test_seasonal_no_test_season_in_train(sim):
    split = split_frame(sim, spec_for("seasonal"))
    train_months = pd.to_datetime(split.train["timestamp"], unit="s").dt.month
    assert train_months.isin(range(1, 9)).all()
    assert split.train["timestamp"].max() < min(split.valid["timestamp"].min(), split.test["timestamp"].min())
    # brute force: each target is its user's first row (with history) in the target months
    f = split.frame
    month = pd.to_datetime(f["timestamp"], unit="s").dt.month
    for part, months in (("valid", [9]), ("test", [10, 11, 12])):
        eligible = f[month.isin(months) & (f["position"] >= 1)]
        expected = eligible.loc[eligible.groupby("user_id")["timestamp"].idxmin()]
        got = getattr(split, part)
        assert sorted(zip(got["user_id"], got["timestamp"])) == sorted(zip(expected["user_id"], expected["timestamp"]))


def test_regional_no_region_overlap(sim):
    split = split_frame(sim, spec_for("regional"))
    p = split.params
    train_r, test_r = set(p["train_regions"]), set(p["test_regions"])
    assert not train_r & test_r and train_r | test_r == set(sim["region"])
    users_per_region = sim.drop_duplicates("user_id")["region"].value_counts()
    assert users_per_region[list(train_r)].sum() >= users_per_region.sum() / 2  # the >= 50 % default
    assert not set(split.valid["region"]) & train_r and not set(split.test["region"]) & train_r
    assert not set(split.valid["user_id"]) & set(split.test["user_id"])
    # every user of a test region is a valid or a test user, with their last row as target
    test_region_users = set(sim.loc[sim["region"].isin(test_r), "user_id"])
    assert set(split.valid["user_id"]) | set(split.test["user_id"]) == test_region_users
    n = split.frame.groupby("user_id").size()
    for part in (split.valid, split.test):
        assert (part["position"].to_numpy() == n[part["user_id"]].to_numpy() - 1).all()
    assert len(split.train) == len(sim) - len(split.valid) - len(split.test)
    assert abs(len(split.valid) - len(split.test)) <= len(test_r)  # valid_user_ratio 0.5, per region
    other_seed = split_frame(sim, DataSpec(sim_users=400, sim_items=150, seed=12, split="regional"))
    assert set(other_seed.valid["user_id"]) != set(split.valid["user_id"])


def test_regional_named_regions(sim):
    with pytest.raises(DataError) as err:
        split_frame(sim, spec_for("regional", test_regions=["atlantis"]))
    assert "test_regions" in str(err.value) and "atlantis" in str(err.value) and "north" in str(err.value)
    with pytest.raises(DataError, match="no region is left for testing"):
        split_frame(sim, spec_for("regional", train_regions=["north", "south", "east", "west"]))
    split = split_frame(sim, spec_for("regional", train_regions=["north"], valid_regions=["south"]))
    assert set(split.valid["region"]) == {"south"} and set(split.test["region"]) == {"east", "west"}


def _brute_head(items: pd.Series, share: float) -> set:
    counts = sorted(items.value_counts().items(), key=lambda kv: (-kv[1], kv[0]))
    head, total, running = set(), len(items), 0
    for item, count in counts:
        if running >= share * total:
            break
        head.add(item)
        running += count
    return head


def test_popularity_targets_from_the_tail(sim):
    split = split_frame(sim, spec_for("popularity", tail_ratio=0.2))
    head = _brute_head(sim["item_id"], 0.8)
    assert split.params["head_items"] == len(head)
    assert not split.valid["item_id"].isin(head).any() and not split.test["item_id"].isin(head).any()
    f = split.frame
    tail_rows = f[~f["item_id"].isin(head) & (f["position"] >= 1)]
    expected = tail_rows.groupby("user_id")["position"].max()
    assert (split.test.set_index("user_id")["position"].sort_index() == expected.sort_index()).all()
    assert split.evidence["test"]["head_share"] < 0.1 < split.evidence["iid_control"]["head_share"]


def test_mixed_targets_tail_and_late(sim):
    split = split_frame(sim, spec_for("mixed"))
    head = _brute_head(split.train["item_id"], 0.8)
    assert not split.test["item_id"].isin(head).any() and not split.valid["item_id"].isin(head).any()
    n = split.frame.groupby("user_id").size()
    test_start = n - np.maximum(1, np.floor(0.2 * n + 0.5)).astype(int)
    assert (split.test["position"].to_numpy() >= test_start[split.test["user_id"]].to_numpy()).all()
    assert (split.valid["position"].to_numpy() < test_start[split.valid["user_id"]].to_numpy()).all()


@pytest.mark.parametrize("name", ["seasonal", "regional", "popularity"])
def test_same_seed_same_split(sim, name):
    a, b = split_frame(sim, spec_for(name)), split_frame(sim.sample(frac=1.0, random_state=1), spec_for(name))
    cols = ["user_id", "item_id", "timestamp", "part"]
    # row order of the input only matters for ties; simulated timestamps have none
    pd.testing.assert_frame_equal(a.frame[cols], b.frame[cols])
    assert a.evidence == b.evidence


def test_empty_parts_are_errors(sim):
    with pytest.raises(DataError) as err:
        split_frame(sim[pd.to_datetime(sim["timestamp"], unit="s").dt.month != 9], spec_for("seasonal"))
    assert "valid_months=[9]" in str(err.value) and "hold no interactions" in str(err.value)
    one_each = sim.drop_duplicates("user_id")
    with pytest.raises(DataError, match=r"iid split \(no parameters\) leaves the valid part empty"):
        split_frame(one_each, spec_for("iid"))


# ---------------------------------------------------------------- evidence statistics


def test_js_divergence_hand_values():
    assert js_divergence(pd.Series({"a": 1}), pd.Series({"b": 5})) == pytest.approx(1.0)
    assert js_divergence(pd.Series({"a": 2, "b": 2}), pd.Series({"a": 1, "b": 1})) == pytest.approx(0.0)
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4)
    expected = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert js_divergence(pd.Series({"a": 1, "b": 1}), pd.Series({"a": 3})) == pytest.approx(expected)


def test_top_k_jaccard_hand_values():
    a = pd.Series(list("aaabbc"))
    b = pd.Series(list("ccbd"))
    assert top_k_jaccard(a, b, k=2) == pytest.approx(1 / 3)  # {a, b} vs {c, b}
    assert top_k_jaccard(a, a, k=2) == 1.0


def test_evidence_shows_seasonal_shift(sim):
    evidence = split_frame(sim, spec_for("seasonal")).evidence
    assert {"valid", "test", "iid_control", "train_seasons", "test_seasons"} <= set(evidence)
    assert set(evidence["test_seasons"]) == {"autumn", "winter"}
    assert evidence["test"]["category_js"] > 5 * evidence["iid_control"]["category_js"]
    regional = split_frame(sim, spec_for("regional")).evidence
    assert regional["test_region_rows"]["item_js"] > 2 * regional["region_rows_control"]["item_js"]
