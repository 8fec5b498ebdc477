"""One evaluation protocol for general and sequential models, checked against brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import causalrec
from causalrec.data import DataSpec, prepare

SIM = {"sim_users": 300, "split": "seasonal", "epochs": 1, "show_progress": False, "topk": [10]}


def _pop_hit_bounds(prepared, mask_history: bool) -> tuple[float, float]:
    """HR@10 of popularity ranking over the whole catalog, optimistic and pessimistic about ties."""
    read = lambda suffix: pd.read_csv(prepared.file(suffix), sep="\t", dtype=str)  # noqa: E731
    train, test = read("train.inter"), read("test.inter")
    catalog = read("item").iloc[:, 0]
    counts = train.iloc[:, 1].value_counts().reindex(catalog, fill_value=0)
    history = train.groupby(train.columns[0])[train.columns[1]].apply(set)
    best, worst = [], []
    for user, target in zip(test.iloc[:, 0], test.iloc[:, 1]):
        scores = counts.copy().astype(float)
        if mask_history:
            seen = history.get(user, set()) - {target}
            scores[list(seen)] = -np.inf
        above = int((scores > scores[target]).sum())
        tied = int((scores == scores[target]).sum()) - 1
        best.append(above < 10)
        worst.append(above + tied < 10)
    return float(np.mean(worst)), float(np.mean(best))


@pytest.mark.parametrize("mask_history", [False, True])
def test_pop_matches_brute_force_under_either_history_rule(mask_history, in_tmp):
    prepared = prepare(DataSpec.from_mapping(SIM), show_progress=False)
    result = causalrec.run("Pop", "retail-sim", config_dict={**SIM, "mask_history": mask_history}, saved=False)
    low, high = _pop_hit_bounds(prepared, mask_history)
    assert low - 1e-4 <= result["test_result"]["hit@10"] <= high + 1e-4  # RecBole rounds to 4 places
    assert ("not masked" in result["protocol"]) == (not mask_history)


def test_general_and_sequential_models_evaluate_the_same_cases(in_tmp):
    pop = causalrec.run("Pop", "retail-sim", config_dict=SIM, saved=False)
    sasrec = causalrec.run(
        "SASRec", "retail-sim", config_dict={**SIM, "hidden_size": 16, "inner_size": 32, "n_layers": 1}, saved=False
    )
    cases = lambda r: sum(v["cases"] for k, v in r["test_env_result"]["season"].items() if k != "<worst>")  # noqa: E731
    prepared = prepare(DataSpec.from_mapping(SIM), show_progress=False)
    n_test = len(pd.read_csv(prepared.file("test.inter"), sep="\t"))
    assert cases(pop) == cases(sasrec) == n_test


@pytest.mark.parametrize("split", ["iid", "temporal", "seasonal", "regional", "popularity", "mixed"])
@pytest.mark.parametrize("model", ["BPR", "GRU4Rec"])
def test_classical_models_train_on_every_split(model, split, in_tmp):
    config = {
        "sim_users": 200,
        "split": split,
        "epochs": 1,
        "show_progress": False,
        "embedding_size": 16,
        "hidden_size": 16,
    }
    result = causalrec.run(model, "retail-sim", config_dict=config, saved=True)
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    assert result["test_env_result"]["season"]["<worst>"]["ndcg@10"] <= result["test_result"]["ndcg@10"] + 1e-4


@pytest.mark.parametrize("mask_history", [False, True])
def test_a_general_model_ranks_many_customers_per_batch_with_the_same_metrics(mask_history, in_tmp):
    """RecBole's default ``eval_batch_size`` ranks one customer a batch on a large catalog; unless set, a general
    model ranks ``CUSTOMERS_PER_EVAL_BATCH`` a batch, with every metric as with the batch set small by hand (BPR,
    whose scores rarely tie, and Pop, whose counts tie a lot). A sequential model keeps its batch of cases."""
    from causalrec.recbole.evaluation import CUSTOMERS_PER_EVAL_BATCH
    from causalrec.recbole.quick_start import build

    config = {**SIM, "mask_history": mask_history, "topk": [5, 10, 20], "valid_metric": "NDCG@10"}
    _, _, (_, valid, test) = build("BPR", "retail-sim", config_dict=config, saved=False)
    assert valid.step == test.step == CUSTOMERS_PER_EVAL_BATCH
    _, _, (_, one, _) = build("BPR", "retail-sim", config_dict={**config, "eval_batch_size": 1}, saved=False)
    assert one.step == 1  # a value that is set is kept
    _, _, (_, sequential, _) = build("SASRec", "retail-sim", config_dict=config, saved=False)
    assert sequential.step == 4096  # RecBole's default: cases per batch
    for model in ("BPR", "Pop"):
        wide = causalrec.run(model, "retail-sim", config_dict=config, saved=False)
        narrow = causalrec.run(model, "retail-sim", config_dict={**config, "eval_batch_size": 1}, saved=False)
        assert wide["test_result"] == narrow["test_result"] and wide["best_valid_result"] == narrow["best_valid_result"]
