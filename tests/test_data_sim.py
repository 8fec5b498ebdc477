"""retail-sim: determinism, size, speed, and the planted confounding visible in the data."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pandas as pd
import pytest

from causalrec.data import DataSpec, describe, load_frame, simulate, split_frame
from causalrec.data.frame import COLUMNS, months_of
from causalrec.data.sources.retail_sim import CATEGORIES
from causalrec.errors import ConfigError

WINTER = ["winter accessories", "christmas decorations"]


@pytest.fixture(scope="module")
def confounded():
    return simulate(DataSpec(sim_confounding=0.8, seed=1))


@pytest.fixture(scope="module")
def unconfounded():
    return simulate(DataSpec(sim_confounding=0.0, seed=1))


def test_default_size_and_speed():
    start = time.perf_counter()
    frame = load_frame(DataSpec())
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    stats = describe(frame)
    assert 1000 <= stats["users"] <= 1500
    assert 300 <= stats["items"] <= 500
    assert 20 <= stats["inter_per_user"]["mean"] <= 40
    assert stats["regions"] == 4 and stats["months"] == 12
    assert stats["date_min"].startswith("2023-01") and stats["date_max"].startswith("2023-12")


def test_frame_is_canonical(confounded):
    frame = confounded.frame
    assert list(frame.columns[:5]) == list(COLUMNS) and "category" in frame.columns
    assert frame["timestamp"].dtype == np.int64
    assert (frame["item_text"].str.len() > 0).all()
    # the frame agrees with the ground truth tables
    assert (frame["category"].to_numpy() == confounded.item_category[frame["item_id"]].to_numpy()).all()
    assert (frame["region"].to_numpy() == confounded.user_region[frame["user_id"]].to_numpy()).all()
    assert np.allclose(confounded.user_taste.sum(axis=1), 1.0)


def test_titles_unique_and_readable(confounded):
    titles = confounded.item_title
    assert titles.is_unique
    assert titles.str.fullmatch(r"[A-Z][A-Z\- ]+").all()
    # the product noun says the category: every title ends with one of its category's nouns
    nouns = {c.name: c.nouns for c in CATEGORIES}
    for item, title in titles.items():
        assert title.endswith(nouns[confounded.item_category[item]]), title


def test_same_seed_same_data_other_seed_other_data():
    a, b = simulate(DataSpec(seed=5)).frame, simulate(DataSpec(seed=5)).frame
    pd.testing.assert_frame_equal(a, b)
    c = simulate(DataSpec(seed=6)).frame
    assert not (len(a) == len(c) and (a.to_numpy() == c.to_numpy()).all())


def _winter_share(result, month):
    frame = result.frame
    in_month = months_of(frame["timestamp"]) == month
    return frame.loc[in_month, "category"].isin(WINTER).mean()


def test_planted_seasonal_confounding(confounded, unconfounded):
    """Season drives exposure: winter/Christmas goods are a far larger share of December's purchases than
    of July's; without confounding the share does not depend on the month (taste is invariant)."""
    dec, jul = _winter_share(confounded, 12), _winter_share(confounded, 7)
    assert dec > 4 * jul
    dec0, jul0 = _winter_share(unconfounded, 12), _winter_share(unconfounded, 7)
    assert abs(dec0 - jul0) < 0.03


def _home_share(result):
    frame = result.frame
    home = result.item_home_region[frame["item_id"]].to_numpy()
    regional = home != ""
    return (frame["region"].to_numpy()[regional] == home[regional]).mean()


def test_planted_regional_assortment(confounded, unconfounded):
    """Regional goods sell mostly in their home region (1 of 4 equally sized regions): ~25 % without
    confounding, most of it with."""
    assert _home_share(confounded) > 0.75
    assert abs(_home_share(unconfounded) - 0.25) < 0.05
    stock = confounded.item_stock
    frame = confounded.frame
    stocked = stock.to_numpy()[stock.index.get_indexer(frame["item_id"]), stock.columns.get_indexer(frame["region"])]
    assert stocked.mean() > 0.95 and stock.to_numpy().mean() < 0.8


def test_user_taste_is_in_the_purchases(confounded):
    frame = confounded.frame
    empirical = pd.crosstab(frame["user_id"], frame["category"], normalize="index")
    truth = confounded.user_taste.loc[empirical.index, empirical.columns]
    corr = np.corrcoef(empirical.to_numpy().ravel(), truth.to_numpy().ravel())[0, 1]
    shuffled = truth.sample(frac=1.0, random_state=0).to_numpy()
    assert corr > 0.5 > np.corrcoef(empirical.to_numpy().ravel(), shuffled.ravel())[0, 1] + 0.4


def test_seasonal_split_sees_the_planted_shift():
    """The seasonal split's evidence reflects the simulator's confounding: category divergence of test
    targets far above the IID control with confounding, near it without."""
    evidence = {}
    for c in (0.0, 0.8):
        spec = DataSpec(sim_confounding=c, seed=3, split="seasonal")
        evidence[c] = split_frame(load_frame(spec), spec).evidence
    assert evidence[0.8]["test"]["category_js"] > 20 * evidence[0.8]["iid_control"]["category_js"]
    assert evidence[0.0]["test"]["category_js"] < 0.01
    assert evidence[0.8]["test"]["top100_jaccard"] < evidence[0.8]["iid_control"]["top100_jaccard"]


def test_repeat_purchases_follow_sim_repeat():
    def repeat_share(p):
        frame = simulate(DataSpec(sim_repeat=p, seed=2)).frame
        return frame.duplicated(["user_id", "item_id"]).mean()

    assert repeat_share(0.0) < repeat_share(0.4) - 0.2


def test_size_parameters():
    result = simulate(DataSpec(sim_users=50, sim_items=40, sim_regions=2, sim_categories=4, sim_inter_per_user=8))
    assert result.frame["user_id"].nunique() == 50
    assert len(result.item_title) == 40 and result.regions == ("north", "south")
    assert result.categories == tuple(c.name for c in CATEGORIES[:4])
    assert result.frame.groupby("user_id").size().min() >= 5
    with pytest.raises(ConfigError, match="sim_categories"):
        simulate(DataSpec(sim_categories=len(CATEGORIES) + 1))
    with pytest.raises(ConfigError, match="sim_items"):
        simulate(DataSpec(sim_items=3, sim_categories=4))


def test_season_exclusive_lines_sell_only_in_their_peak_months_and_are_never_trained_on():
    """sim_season_exclusive: a seasonal category's items are bought (repeats included) only in its peak months,
    so on the seasonal split (train Jan-Aug, test Oct-Dec) Halloween and Christmas items never train yet are test
    targets; the default draw is untouched (the same frame as without the key)."""
    spec = DataSpec(split="seasonal", seed=4, sim_season_exclusive=True)
    result = simulate(spec)
    frame = result.frame
    months = months_of(frame["timestamp"])
    peaks = frame["category"].map(lambda name: dict((c.name, c.months) for c in CATEGORIES)[name])
    in_peak = np.array([not peak or month in peak for peak, month in zip(peaks, months)])
    assert in_peak.all() and (frame.duplicated(["user_id", "item_id"])).mean() > 0.1  # repeats still happen
    on_sale = result.item_on_sale.to_numpy()[result.item_on_sale.index.get_indexer(frame["item_id"]), months - 1]
    assert on_sale.all()
    split = split_frame(load_frame(spec), spec)
    lines = set(result.item_category.index[result.item_category.isin(["halloween", "christmas decorations"])])
    assert not lines & set(split.train["item_id"]) and not lines & set(split.valid["item_id"])
    assert split.test["item_id"].isin(lines).mean() > 0.1
    # the default draw is the one measured before the key existed (its digest then), and keeps its cache key
    default = simulate(DataSpec(split="seasonal", seed=4)).frame
    assert hashlib.sha256(default.to_csv(index=False).encode()).hexdigest()[:16] == "246d6bd9862acd19"
    assert "sim_season_exclusive" not in DataSpec(sim_season_exclusive=False).key_fields()
    assert DataSpec(sim_season_exclusive=True).key_fields()["sim_season_exclusive"] is True
    with pytest.raises(ConfigError, match="sim_season_exclusive must be true or false"):
        DataSpec(sim_season_exclusive="yes")


def test_promotion_plants_a_regional_line_in_training_histories_that_stops_afterwards():
    """sim_promotion: region r of R promotes its own evergreen category Jan-Aug with log boost 3 s (r + 1) / R;
    each region's share of its promoted line rises with the boost in the promotion months and falls back after
    them (repeats keep a little of it); the draw without the key is the default one (no extra random draw)."""
    spec = DataSpec(split="seasonal", seed=2020, sim_promotion=1.0)
    result = simulate(spec)
    table = result.region_promotion
    assert list(table.index) == list(result.regions) and table["category"].is_unique
    assert table["boost"].tolist() == pytest.approx([0.75, 1.5, 2.25, 3.0])
    assert all(not c.months and not c.regional for c in CATEGORIES if c.name in set(table["category"]))
    frame = result.frame
    months = months_of(frame["timestamp"])
    promoted = frame["category"].to_numpy() == frame["region"].map(table["category"]).to_numpy()
    base = simulate(DataSpec(split="seasonal", seed=2020)).frame
    base_promoted = base["category"].to_numpy() == base["region"].map(table["category"]).to_numpy()
    base_months = months_of(base["timestamp"])
    during, after = [], []
    for region in result.regions:
        mine = frame["region"].to_numpy() == region
        mine_base = base["region"].to_numpy() == region
        during.append(promoted[mine & (months <= 8)].mean() - base_promoted[mine_base & (base_months <= 8)].mean())
        after.append(promoted[mine & (months >= 9)].mean())
        assert promoted[mine & (months <= 8)].mean() > promoted[mine & (months >= 9)].mean() + 0.04
    assert np.all(np.diff(during) > 0) and during[0] > 0.03  # a stronger promotion, a larger lift
    assert max(after) < 0.2
    # without promotions: the same frame as before the key existed, and the same cache key
    assert simulate(DataSpec(split="seasonal", seed=2020, sim_promotion=0)).frame.equals(base)
    assert "sim_promotion" not in DataSpec(sim_promotion=0).key_fields()
    assert DataSpec(sim_promotion=0.5).key_fields()["sim_promotion"] == 0.5
    with pytest.raises(ConfigError, match=r"sim_promotion must be a number in \[0, 1\]"):
        DataSpec(sim_promotion=1.5)


def test_promotion_months_confine_the_promotion_to_those_months():
    """sim_promotion_months [6, 7, 8]: the promoted lines rise in summer only, so the training months disagree about
    them; the default months stay out of the cache key, other months are in it, and bad months are refused."""
    spec = DataSpec(split="seasonal", seed=2020, sim_promotion=1.0, sim_promotion_months=["jun", 7, 8])
    assert spec.sim_promotion_months == (6, 7, 8)
    result, base = simulate(spec), simulate(DataSpec(split="seasonal", seed=2020))
    table = result.region_promotion

    def promoted_share(frame, months):
        own = frame["category"].to_numpy() == frame["region"].map(table["category"]).to_numpy()
        return own[np.isin(months_of(frame["timestamp"]), months)].mean()

    summer, spring = (6, 7, 8), (1, 2, 3, 4, 5)
    assert promoted_share(result.frame, summer) - promoted_share(base.frame, summer) > 0.1
    assert abs(promoted_share(result.frame, spring) - promoted_share(base.frame, spring)) < 0.01
    assert "sim_promotion_months" not in DataSpec(sim_promotion=1.0).key_fields()
    assert spec.key_fields()["sim_promotion_months"] == [6, 7, 8]
    for bad in ([13], []):
        with pytest.raises(ConfigError, match="sim_promotion_months"):
            DataSpec(sim_promotion=1.0, sim_promotion_months=bad)
