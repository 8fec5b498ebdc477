"""Environment-conditioned prompts and the backdoor ranking p(y | do(x)) = sum_e P(e) p(y | x, e)."""

from __future__ import annotations

import contextlib
import glob
import math

import pandas as pd
import pytest
import torch
from test_models_llm import TINY, _rebuild

import causalrec
from causalrec.data.prompts import PromptFormat
from causalrec.errors import CausalRecError, ConfigError
from causalrec.llm.ranking import marginalize_environments, naive_scores
from causalrec.training import PreferenceRecord, preference_dataset, sft_dataset


def test_environment_is_written_before_the_template():
    fmt = PromptFormat(environment="season", max_history_items=2)
    assert (
        fmt.prompt(["A", "B", "C"], "summer")
        == "season summer. A customer bought, in order: B; C. Next the customer buys:"
    )
    assert PromptFormat().prompt(["A"]) == "A customer bought, in order: A. Next the customer buys:"
    with pytest.raises(ConfigError, match="season"):
        fmt.prompt(["A"])  # an environment-conditioned prompt without its environment
    with pytest.raises(ConfigError, match="prompt_environment"):
        PromptFormat(environment="weather")
    with pytest.raises(ConfigError, match="value"):
        PromptFormat(environment="region", environment_template="somewhere. ")


def test_training_rows_carry_their_own_environment():
    fmt = PromptFormat(environment="region", environment_template="[{name}={value}] ")
    records = [
        PreferenceRecord(["A"], "B", ["C"], season="winter", region="north"),
        PreferenceRecord(["B"], "C", ["A"], season="summer", region="south"),
    ]
    prompts = sft_dataset(records, fmt)["prompt"]
    assert [p.split("]")[0] for p in prompts] == ["[region=north", "[region=south"]
    assert preference_dataset(records, fmt)["prompt"] == prompts


def test_marginalisation_is_the_mixture_of_environment_likelihoods():
    p = torch.tensor([[[0.2, 0.1], [0.5, 0.05]]])  # 1 case, K=2 environments, 2 items
    prior = torch.tensor([0.25, 0.75])
    out = marginalize_environments(p.log(), prior.log())
    expected = torch.tensor([[math.log(0.25 * 0.2 + 0.75 * 0.5), math.log(0.25 * 0.1 + 0.75 * 0.05)]])
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="K = 3"):
        marginalize_environments(p.log(), torch.zeros(3))


@pytest.fixture(scope="module")
def backdoor_run(tmp_path_factory):
    where = tmp_path_factory.mktemp("backdoor")
    with contextlib.chdir(where):  # RecBole writes ./saved, ./log
        result = causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, prompt_environment="season"))
    (checkpoint,) = glob.glob(str(where / "saved" / "GenRec-*.pth"))
    return result, checkpoint


def test_ranking_is_the_backdoor_sum_over_training_seasons(backdoor_run):
    result, checkpoint = backdoor_run
    config, model, _, train, valid, _ = _rebuild(checkpoint)
    # P(e): season frequencies of the training rows, counted from the benchmark file RecBole read.
    path = f"{config['data_path']}/{config['dataset']}.{config['benchmark_filename'][0]}.inter"
    seasons = pd.read_csv(path, sep="\t", usecols=["season:token"])["season:token"].value_counts(normalize=True)
    assert set(model.environments) == set(seasons.index)
    prior = torch.tensor([seasons[e] for e in model.environments])
    torch.testing.assert_close(model.env_log_prior.exp().double(), prior.double(), atol=1e-6, rtol=0)

    batch = next(iter(valid))[0][:3]
    scores = model.full_sort_predict(batch)
    assert scores.shape == (3, len(model.titles)) and torch.isneginf(scores[:, 0]).all()
    histories = model.history_texts(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    brute = torch.zeros(3, len(model.titles) - 1, dtype=torch.float64)
    for e, p_e in zip(model.environments, prior.tolist()):
        ids = model.encode_prompts([model.prompt_format.prompt(h, e) for h in histories])
        brute += p_e * naive_scores(model.llm, ids, model.trie).double().exp()
    torch.testing.assert_close(scores[:, 1:].double(), brute.log(), atol=1e-4, rtol=0)
    # predict (sampled candidates) marginalises the same way
    pair = model.predict(batch)
    torch.testing.assert_close(pair, scores[torch.arange(3), batch[model.ITEM_ID]], atol=1e-4, rtol=0)
    # the validation season (autumn) is unseen in training: the row's own label plays no part in its ranking
    assert "autumn" not in model.environments
    assert result["test_result"]["ndcg@10"] > 0


def test_observed_inference_conditions_on_a_known_environment(backdoor_run):
    _, checkpoint = backdoor_run
    config, model, _, _, _, test = _rebuild(checkpoint)
    model.environment_inference = "observed"
    batch = next(iter(test))[0]
    labels = [str(test._dataset.field2id_token["season"][i]) for i in batch["season"].tolist()]
    rows = [labels.index("winter"), labels.index("autumn")]  # December (seen in Jan-Feb) and Oct/Nov (unseen)
    batch = batch[torch.tensor(rows)]
    weights = model.environment_weights(batch)
    winter = model.environments.index("winter")
    assert weights[0].exp().tolist() == [1.0 if e == winter else 0.0 for e in range(len(model.environments))]
    torch.testing.assert_close(weights[1], model.env_log_prior)
    assert len(model.prompts(batch)) == 1 + len(model.environments)  # one prompt for the known row, K otherwise
    scores = model.full_sort_predict(batch)
    history = model.history_texts(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])[0]
    own = naive_scores(model.llm, model.encode_prompts([model.prompt_format.prompt(history, "winter")]), model.trie)
    torch.testing.assert_close(scores[0, 1:], own[0], atol=1e-4, rtol=0)
    model.environment_inference = "marginal"
    torch.testing.assert_close(scores[1], model.full_sort_predict(batch)[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "key,value",
    [
        ("prompt_environment", "weather"),
        ("environment_prior", "flat"),
        ("environment_inference", "oracle"),
        ("negative_strategy", "seasonal"),
        ("validate_stages", "none"),
    ],
)
def test_unknown_choices_fail_before_training(in_tmp, key, value):
    with pytest.raises(CausalRecError, match=f"unknown {key} '{value}'"):
        causalrec.run("SDPORec", "retail-sim", config_dict=dict(TINY, **{key: value}))
    assert not (in_tmp / "saved" / "stages").exists()
