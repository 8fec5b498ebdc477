"""repeat_mix for RecBole's models: the model's distribution mixed with the customer's own purchase shares, checked
against a brute-force ranking from the prepared files and against the formula on a sequential model's histories."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import causalrec
from causalrec.data import DataSpec, prepare
from causalrec.errors import CausalRecError
from causalrec.recbole.repeat_mix import mix

SIM = {"sim_users": 300, "split": "seasonal", "epochs": 1, "show_progress": False, "topk": [10]}
WEIGHT = 0.4


def _pop_with_repeats_hits(prepared, weight: float) -> tuple[float, float]:
    """HR@10 bounds (ties) of ranking each test case by (1 - w) (the item's share of training purchases) + w (its
    share of the customer's training and validation purchases), counted from the prepared files."""
    read = lambda suffix: pd.read_csv(prepared.file(suffix), sep="\t", dtype=str)  # noqa: E731
    train, valid, test = read("train.inter"), read("valid.inter"), read("test.inter")
    user, item = train.columns[0], train.columns[1]
    catalog = read("item").iloc[:, 0]
    popularity = train[item].value_counts().reindex(catalog, fill_value=0).astype(float)
    popularity /= popularity.sum()
    history = pd.concat([train, valid])
    worst, best = [], []
    for customer, target in zip(test[user], test[item]):
        own = history[history[user] == customer][item].value_counts().reindex(catalog, fill_value=0).astype(float)
        score = (1 - weight) * popularity + weight * own / max(own.sum(), 1)
        above = int((score > score[target] + 1e-12).sum())
        tied = int((abs(score - score[target]) <= 1e-12).sum()) - 1
        best.append(above < 10)
        worst.append(above + tied < 10)
    return float(np.mean(worst)), float(np.mean(best))


def test_pop_with_repeats_is_the_mixture_of_popularity_and_the_customers_own_shares(in_tmp):
    prepared = prepare(DataSpec.from_mapping(SIM), show_progress=False)
    plain = causalrec.run("Pop", "retail-sim", config_dict=SIM, saved=False)
    mixed = causalrec.run("Pop", "retail-sim", config_dict={**SIM, "repeat_mix": WEIGHT}, saved=False)
    low, high = _pop_with_repeats_hits(prepared, WEIGHT)
    assert low - 1e-4 <= mixed["test_result"]["hit@10"] <= high + 1e-4
    assert mixed["test_result"]["hit@10"] > plain["test_result"]["hit@10"]  # retail-sim's customers buy again


def test_a_sequential_model_mixes_in_the_shares_of_its_item_sequence(in_tmp):
    from causalrec.recbole.quick_start import build

    config = {**SIM, "hidden_size": 16, "inner_size": 32, "n_layers": 1}
    _, plain, (_, _, test) = build("SASRec", "retail-sim", config_dict=config)
    _, mixed, _ = build("SASRec", "retail-sim", config_dict={**config, "repeat_mix": WEIGHT})
    mixed.model.load_state_dict(plain.model.state_dict())
    batch = next(iter(test))
    for trainer in (plain, mixed):
        trainer.tot_item_num = test._dataset.item_num  # what RecBole's evaluate sets before scoring batches
        trainer.model.eval()
    with torch.no_grad():
        interaction, base, _, _ = plain._full_sort_batch_eval(batch)
        _, adjusted, _, _ = mixed._full_sort_batch_eval(batch)
    seq, lengths = interaction["item_id_list"], interaction["item_length"]
    for row in range(len(base)):
        items = seq[row, : int(lengths[row])].tolist()
        share = torch.tensor([items.count(i) / len(items) if i else 0.0 for i in range(base.shape[1])])
        p = torch.softmax(torch.cat([torch.tensor([-math.inf]), base[row, 1:]]), dim=0)
        expected = torch.log((1 - WEIGHT) * p + WEIGHT * share)
        torch.testing.assert_close(adjusted[row, 1:], expected[1:], atol=1e-5, rtol=1e-5)


def test_mix_is_the_log_of_the_mixture_and_refuses_weights_outside_0_1():
    log_p = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    shares = torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(mix(log_p, shares, 0.25), torch.log(torch.tensor([[0.375, 0.475, 0.15]])))
    with pytest.raises(CausalRecError, match="repeat_mix"):
        mix(log_p, shares, 1.0)
    with pytest.raises(CausalRecError, match="repeat_mix"):
        causalrec.run("Pop", "retail-sim", config_dict={**SIM, "repeat_mix": 1.5}, saved=False)


def test_auto_keeps_the_weight_that_validates_best_and_tests_as_a_run_fixed_at_it(in_tmp):
    """``repeat_mix: auto`` ranks validation at every candidate weight after training and keeps the best (Pop's
    training does not depend on the weight, so each candidate's validation is what a run fixed at it scores)."""
    from causalrec.recbole.repeat_mix import AUTO_WEIGHTS

    auto = causalrec.run("Pop", "retail-sim", config_dict={**SIM, "repeat_mix": "auto"})
    by_weight = {float(w): s for w, s in auto["repeat_mix"]["valid_score_by_weight"].items()}
    assert list(by_weight) == list(AUTO_WEIGHTS)
    chosen = auto["repeat_mix"]["weight"]
    assert chosen == min(w for w, s in by_weight.items() if s == max(by_weight.values()))
    assert chosen > 0  # retail-sim's customers buy again
    assert auto["best_valid_score"] == by_weight[chosen]
    for weight in (0.0, 0.3, chosen):
        fixed = causalrec.run("Pop", "retail-sim", config_dict={**SIM, "repeat_mix": weight})
        assert fixed["best_valid_score"] == pytest.approx(by_weight[weight], abs=1e-9)
    assert fixed["test_result"] == pytest.approx(auto["test_result"], abs=1e-9)


@pytest.mark.parametrize("value", ["sometimes", -0.1, 1.0])
def test_repeat_mix_outside_a_weight_or_auto_is_refused_before_any_work(in_tmp, value):
    with pytest.raises(CausalRecError, match="repeat_mix.*auto"):
        causalrec.run("Pop", "retail-sim", config_dict={**SIM, "repeat_mix": value})


def test_auto_early_stops_a_recbole_model_on_each_epochs_best_weight(in_tmp):
    """Each validation of the epoch loop is the best of the weights' validations (each from a trainer fixed at that
    weight holding the same model), and a resumable run still records its best epoch."""
    from recbole.utils import calculate_valid_score

    from causalrec.recbole.quick_start import build
    from causalrec.recbole.repeat_mix import AUTO_WEIGHTS

    config = {**SIM, "epochs": 2, "learning_rate": 0.01, "valid_metric": "NDCG@10"}
    _, auto, (train, valid, _) = build("BPR", "retail-sim", config_dict={**config, "repeat_mix": "auto"})
    for epoch in range(15):  # a model whose weights rank differently
        auto._train_epoch(train, epoch)
    score, _ = auto._valid_epoch(valid)
    fixed = {}
    for weight in AUTO_WEIGHTS:
        _, trainer, (_, valid_w, _) = build("BPR", "retail-sim", config_dict={**config, "repeat_mix": weight})
        trainer.model.load_state_dict(auto.model.state_dict())
        fixed[weight] = calculate_valid_score(trainer.evaluate(valid_w, load_best_model=False), "ndcg@10")
    assert score == pytest.approx(max(fixed.values()), abs=1e-9)
    assert auto.repeat_mix_sweep[0] == min(w for w, s in fixed.items() if s == max(fixed.values()))
    assert len(set(fixed.values())) > 2 and fixed[0.0] < score
    result = causalrec.run("BPR", "retail-sim", config_dict={**config, "repeat_mix": "auto", "resume": True})
    assert result["epochs"]["best"] in (0, 1) and result["repeat_mix"]["weight"] in AUTO_WEIGHTS


@pytest.mark.parametrize("keep_bytes", [None, 0, "one batch"])
def test_a_sweep_runs_the_model_once_per_batch_and_scores_as_one_that_runs_it_at_every_weight(
    in_tmp, monkeypatch, keep_bytes
):
    """Only the mixture depends on the weight: a validation at ten weights runs the model's forward once per
    batch (the other nine read its scores back), and ranks exactly as a sweep that keeps nothing and runs it at
    every weight; past ``SWEEP_CACHE_BYTES`` the batches not kept are run again."""
    from causalrec.recbole import repeat_mix
    from causalrec.recbole.quick_start import build

    config = {**SIM, "epochs": 1, "learning_rate": 0.01, "valid_metric": "NDCG@10"}
    _, trainer, (train, valid, _) = build("BPR", "retail-sim", config_dict={**config, "repeat_mix": "auto"})
    for epoch in range(5):
        trainer._train_epoch(train, epoch)
    batches = len(list(valid))
    assert batches > 2
    calls = []
    forward = type(trainer.model).full_sort_predict
    monkeypatch.setattr(type(trainer.model), "full_sort_predict", lambda m, x: calls.append(1) or forward(m, x))
    monkeypatch.setattr(repeat_mix, "SWEEP_CACHE_BYTES", 0)
    every_weight, _ = trainer._valid_epoch(valid)
    assert len(calls) == batches * len(repeat_mix.AUTO_WEIGHTS)
    by_weight = dict(trainer.repeat_mix_sweep[1])
    if keep_bytes is not None:
        with torch.no_grad():
            first = forward(trainer.model, next(iter(valid))[0])
        one_batch = first.numel() * first.element_size()
        limit = one_batch if keep_bytes == "one batch" else 2 * 1024**3
        monkeypatch.setattr(repeat_mix, "SWEEP_CACHE_BYTES", limit)
        calls.clear()
        score, _ = trainer._valid_epoch(valid)
        kept = 1 if keep_bytes == "one batch" else batches
        assert len(calls) == batches + (batches - kept) * (len(repeat_mix.AUTO_WEIGHTS) - 1)
        assert score == every_weight and trainer.repeat_mix_sweep[1] == by_weight
    assert "full_sort_predict" not in vars(trainer.model)  # the model's own method again after the sweep


def test_dense_rows_equal_scipys_row_indexing():
    from scipy.sparse import coo_matrix

    from causalrec.recbole.repeat_mix import dense_rows

    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 200), rng.integers(0, 50, 200)
    table = coo_matrix((rng.random(200).astype(np.float32), (users, items)), shape=(40, 50)).tocsr()  # rows 30-39 empty
    for picked in (np.array([3]), np.array([35]), np.array([0, 39, 0, 7, 12]), np.arange(40)):
        np.testing.assert_array_equal(dense_rows(table, picked), table[picked].toarray())
