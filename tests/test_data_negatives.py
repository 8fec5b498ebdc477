"""Rejected items for the preference stage: ``causalrec.data.prompts.sample_negatives``."""

from __future__ import annotations

import numpy as np
import pytest

from causalrec.data.prompts import sample_negatives
from causalrec.errors import ConfigError

N_ITEMS = 7  # ids 1..6 are items, 0 is RecBole's padding


def _shares(negatives: np.ndarray) -> np.ndarray:
    counts = np.bincount(negatives.ravel(), minlength=N_ITEMS).astype(float)
    return counts / counts.sum()


def test_uniform_negatives_are_distinct_never_the_target_nor_padding():
    targets = np.array([1, 3, 6] * 200)
    neg = sample_negatives(targets, N_ITEMS, 3, "uniform", rng=np.random.default_rng(0))
    assert neg.shape == (600, 3) and neg.dtype == np.int64
    assert (neg >= 1).all() and (neg < N_ITEMS).all()
    assert not (neg == targets[:, None]).any()
    assert all(len(set(row)) == 3 for row in neg.tolist())


def test_popularity_negatives_follow_counts_plus_one():
    popularity = np.array([0, 99, 0, 0, 0, 0, 0])  # item 1 has weight 100, items 2..6 weight 1 each
    targets = np.full(4000, 6)  # never item 6
    neg = sample_negatives(targets, N_ITEMS, 1, "popularity", rng=np.random.default_rng(1), popularity=popularity)
    # one draw from weights (100, 1, 1, 1, 1) over items 1..5
    assert _shares(neg)[1] == pytest.approx(100 / 104, abs=0.01)
    assert _shares(neg)[6] == 0


def test_environment_negatives_come_from_the_rows_own_environment():
    popularity = np.zeros((2, N_ITEMS))
    popularity[0, 2] = 999  # environment 0 buys item 2
    popularity[1, 5] = 999  # environment 1 buys item 5
    groups = np.array([0, 1] * 1000)
    targets = np.full(2000, 1)
    neg = sample_negatives(
        targets, N_ITEMS, 1, "season_popularity", rng=np.random.default_rng(2), popularity=popularity, groups=groups
    )
    weight = 1000 / (1000 + 4)  # the environment's item, against the other four items at weight 1
    assert _shares(neg[groups == 0])[2] == pytest.approx(weight, abs=0.01)
    assert _shares(neg[groups == 1])[5] == pytest.approx(weight, abs=0.01)
    with pytest.raises(ConfigError, match="per environment"):
        sample_negatives(targets, N_ITEMS, 1, "region_popularity", popularity=popularity[0], groups=groups)


def test_hard_negatives_are_the_top_scored_other_items():
    scores = np.array([[9.0, 1, 5, 4, 3, 2, 0], [9.0, 6, 5, 4, 3, 2, 1]])
    neg = sample_negatives(np.array([2, 1]), N_ITEMS, 2, "hard", scorer=lambda rows: scores[rows])
    assert neg.tolist() == [[3, 4], [2, 3]]  # padding (0) and the target never, however high they score


def test_bad_requests_are_config_errors():
    with pytest.raises(ConfigError, match="negative_strategy"):
        sample_negatives(np.array([1]), N_ITEMS, 1, "random")
    with pytest.raises(ConfigError, match="num_negatives"):
        sample_negatives(np.array([1]), N_ITEMS, 6, "uniform")  # 6 items, one of them the target
    with pytest.raises(ConfigError, match="scoring model"):
        sample_negatives(np.array([1]), N_ITEMS, 1, "hard")
