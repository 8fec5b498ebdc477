"""Context re-ranking (context_rerank): every model gets the case's environment at test time, checked against
hand counts and a brute-force season-popularity ranking."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import causalrec
from causalrec.data import DataSpec, prepare
from causalrec.errors import CausalRecError
from causalrec.recbole.context_rerank import context_log_ratio

SIM = {"sim_users": 300, "split": "regional", "epochs": 1, "show_progress": False, "topk": [10]}


class _Feat(dict):
    @property
    def columns(self):
        return list(self)


def test_log_ratio_equals_hand_counts():
    # items 1..3 (0 is padding); labels: 1 = winter, 2 = summer, 3 = autumn (never in training)
    feat = _Feat(item_id=torch.tensor([1, 1, 2, 3, 3, 3]), season=torch.tensor([1, 1, 1, 2, 2, 1]))
    dataset = SimpleNamespace(
        inter_feat=feat,
        item_num=4,
        iid_field="item_id",
        dataset_name="toy",
        field2id_token={"season": np.array(["[PAD]", "winter", "summer", "autumn"])},
    )
    table, rows = context_log_ratio(dataset, "season", alpha=1.0)
    assert rows == {"winter": 1, "summer": 2}
    # P(i): (counts 2, 1, 3) + 1 over 6 + 3; P(i | winter): (2, 1, 1) + 1 over 4 + 3; P(i | summer): (0, 0, 2) + 1 over 2 + 3
    p = np.array([3, 2, 4]) / 9
    winter = np.log(np.array([3, 2, 2]) / 7) - np.log(p)
    summer = np.log(np.array([1, 1, 3]) / 5) - np.log(p)
    np.testing.assert_allclose(table[1, 1:].numpy(), winter, rtol=1e-6)
    np.testing.assert_allclose(table[2, 1:].numpy(), summer, rtol=1e-6)
    assert table[3].abs().sum() == 0 and table[:, 0].abs().sum() == 0  # unseen label, padding item


def _season_pop_hits(prepared) -> tuple[float, float]:
    """HR@10 bounds (ties) of ranking by popularity within the test case's season, counted on training rows."""
    read = lambda suffix: pd.read_csv(prepared.file(suffix), sep="\t", dtype=str)  # noqa: E731
    train, test = read("train.inter"), read("test.inter")
    catalog = read("item").iloc[:, 0]
    season = [c for c in train.columns if c.startswith("season")][0]
    item = train.columns[1]
    best, worst = [], []
    for target, label in zip(test.iloc[:, 1], test[season]):
        counts = train[train[season] == label][item].value_counts().reindex(catalog, fill_value=0).astype(float)
        above = int((counts > counts[target]).sum())
        tied = int((counts == counts[target]).sum()) - 1
        best.append(above < 10)
        worst.append(above + tied < 10)
    return float(np.mean(worst)), float(np.mean(best))


def test_pop_with_season_context_is_popularity_within_the_season(in_tmp):
    """On the regional split every test season occurs in training: Pop + context = per-season popularity."""
    prepared = prepare(DataSpec.from_mapping(SIM), show_progress=False)
    plain = causalrec.run("Pop", "retail-sim", config_dict=SIM, saved=False)
    context = causalrec.run("Pop", "retail-sim", config_dict={**SIM, "context_rerank": "season"}, saved=False)
    low, high = _season_pop_hits(prepared)
    assert low - 1e-4 <= context["test_result"]["hit@10"] <= high + 1e-4
    assert context["test_result"]["hit@10"] != plain["test_result"]["hit@10"]


def test_sequential_models_get_the_same_context(in_tmp):
    """A sequential model's scores move by exactly the training table's row of each case's season, and its
    evaluation runs through the re-ranking."""
    from causalrec.recbole.quick_start import build

    config = {**SIM, "hidden_size": 16, "inner_size": 32, "n_layers": 1}
    _, plain, (train, _, test) = build("SASRec", "retail-sim", config_dict=config)
    _, ctx, _ = build("SASRec", "retail-sim", config_dict={**config, "context_rerank": "season"})
    ctx.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(test))
    plain.tot_item_num = test._dataset.item_num  # what RecBole's evaluate sets before scoring batches
    plain.model.eval()
    with torch.no_grad():
        interaction, base, _, _ = plain._full_sort_batch_eval(batch)
    table, rows = context_log_ratio(train._dataset, "season")
    labels = [str(test._dataset.field2id_token["season"][i]) for i in interaction["season"].tolist()]
    assert set(labels) <= set(rows)  # regional split: every test season is seen in training
    expected = base + table[[rows[v] for v in labels]]
    torch.testing.assert_close(ctx.context_rerank.adjust(base, test, interaction), expected)
    assert ctx.evaluate(test, load_best_model=False) != plain.evaluate(test, load_best_model=False)


def test_unknown_context_names_the_choices(in_tmp):
    with pytest.raises(CausalRecError, match="region"):
        causalrec.run("Pop", "retail-sim", config_dict={**SIM, "context_rerank": "weather"}, saved=False)
