"""GenRec / SDPORec / CausalDPO end to end through RecBole's entry points, on a tiny retail-sim."""

from __future__ import annotations

import glob
import os

import pytest
import torch

import causalrec
from causalrec.errors import CausalRecError

TINY = {
    "item_repr": "title",  # the title trie path; item tokens: tests/test_models_item_tokens.py
    "sim_users": 120,
    "sim_items": 60,
    "sim_inter_per_user": 8.0,
    "split": "seasonal",
    "epochs": 1,
    "show_progress": False,
    "tiny_hidden_size": 32,
    "sft_args": {
        "num_train_epochs": 1,
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 32,
        "save_strategy": "no",
    },
    "dpo_args": {
        "num_train_epochs": 1,
        "learning_rate": 5e-4,
        "per_device_train_batch_size": 32,
        "save_strategy": "no",
    },
    "dpo_max_samples": 64,
    "eval_batch_size": 256,
    "rank_batch_size": 32,
}


def _rebuild(checkpoint_file: str):
    """A fresh model instance with the checkpoint's weights, and the run's valid/test loaders."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model

    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    config = checkpoint["config"]
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train._dataset)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(checkpoint["state_dict"])
    return config, model, fresh, train, valid, test


def _run_saved(where, config_dict: dict, model: str = "GenRec"):
    """``causalrec.run`` in the folder ``where`` (RecBole writes ./saved, ./log there): its result and checkpoint."""
    import contextlib

    with contextlib.chdir(where):
        result = causalrec.run(model, "retail-sim", config_dict=config_dict)
    (checkpoint,) = glob.glob(str(where / "saved" / f"{model}-*.pth"))
    return result, checkpoint


@pytest.fixture(scope="module")
def genrec_run(tmp_path_factory):
    from recbole.quick_start import run_recbole

    where = tmp_path_factory.mktemp("genrec")
    old = os.getcwd()
    os.chdir(where)
    try:
        result = run_recbole(model="GenRec", dataset="retail-sim", config_dict=dict(TINY))
        checkpoints = glob.glob(str(where / "saved" / "GenRec-*.pth"))
    finally:
        os.chdir(old)
    assert len(checkpoints) == 1
    return result, checkpoints[0]


def test_genrec_trains_and_evaluates(genrec_run):
    result, _ = genrec_run
    for name in ("best_valid_result", "test_result"):
        metrics = result[name]
        assert {"recall@10", "ndcg@10", "hit@20", "mrr@10", "precision@20"} <= set(metrics)
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
        # Hit equals Recall with one target per case; precision@k = hit@k / k.
        assert metrics["hit@10"] == pytest.approx(metrics["recall@10"])
        assert metrics["precision@10"] == pytest.approx(metrics["hit@10"] / 10, abs=1e-4)
    assert result["best_valid_score"] == pytest.approx(result["best_valid_result"]["ndcg@10"])
    import datasets

    assert not datasets.are_progress_bars_disabled()  # show_progress: false turned them off for the run only


def test_full_sort_predict_matches_brute_force_and_checkpoint_reloads(genrec_run, in_tmp):
    from recbole.data.interaction import Interaction
    from recbole.trainer import Trainer

    from causalrec.llm.ranking import naive_scores

    result, checkpoint = genrec_run
    config, model, fresh, _, valid, _ = _rebuild(checkpoint)
    # The checkpoint holds trained weights, not the fresh initialisation.
    assert any(not torch.equal(fresh[k], v) for k, v in model.state_dict().items())

    batch = next(iter(valid))[0][:4]
    scores = model.full_sort_predict(batch)
    assert scores.shape == (4, len(model.titles)) and scores.dtype == torch.float32
    assert torch.isneginf(scores[:, 0]).all()
    brute = naive_scores(model.llm, model.prompt_ids(batch), model.trie)
    torch.testing.assert_close(scores[:, 1:], brute, atol=1e-4, rtol=0)
    # The prompt is built from the history only: changing the target changes nothing.
    moved = Interaction({k: v.clone() for k, v in batch.interaction.items()})
    moved[model.ITEM_ID] = (batch[model.ITEM_ID] % (len(model.titles) - 1)) + 1
    assert model.prompt_ids(moved) == model.prompt_ids(batch)
    # predict (sampled candidates) gives the same numbers as the full ranking.
    pair = model.predict(batch)
    torch.testing.assert_close(pair, scores[torch.arange(4), batch[model.ITEM_ID]], atol=1e-4, rtol=0)

    # The reloaded model reproduces the validation metrics the trained model had.
    trainer = Trainer(config, model)
    valid_result = trainer.evaluate(valid, load_best_model=False)
    for key, value in result["best_valid_result"].items():
        assert valid_result[key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.parametrize("model,env_source", [("SDPORec", None), ("CausalDPO", "season"), ("CausalDPO", "latent")])
def test_preference_models_end_to_end(in_tmp, model, env_source):
    config = dict(TINY)
    if model == "SDPORec":  # the LoRA path: TRL's reference adapter must not end up in the checkpoint
        config.update(lora_r=4, negative_strategy="popularity")
    if env_source is not None:
        config.update(env_source=env_source, n_environments=2)
    result = causalrec.run(model, "retail-sim", config_dict=config)
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    env = result["test_env_result"]
    assert set(env) == {"season", "region"}
    # Per-environment cases add up to the test cases, and the worst environment is a minimum.
    seasons = {k: v for k, v in env["season"].items() if k != "<worst>"}
    regions = {k: v for k, v in env["region"].items() if k != "<worst>"}
    assert sum(v["cases"] for v in seasons.values()) == sum(v["cases"] for v in regions.values()) > 0
    assert env["region"]["<worst>"]["ndcg@10"] == min(v["ndcg@10"] for v in regions.values())
    overall = sum(v["hit@10"] * v["cases"] for v in regions.values()) / sum(v["cases"] for v in regions.values())
    assert overall == pytest.approx(result["test_result"]["hit@10"], abs=1e-3)
    stage = "sdpo" if model == "SDPORec" else "causal_dpo"
    assert len(glob.glob(str(in_tmp / "saved" / "stages" / f"{stage}-*" / "model.safetensors"))) == 1
    recovery = result["stages"][-1].get("environment_recovery")  # latent environments vs the labels
    if env_source == "latent":
        assert set(recovery) == {f"{m}/{c}" for m in ("nmi", "ari", "probe", "chance") for c in ("season", "region")}
        assert all(0.0 <= recovery[k] <= 1.0 for k in recovery if not k.startswith("ari"))
    else:
        assert recovery is None
    (checkpoint,) = glob.glob(str(in_tmp / "saved" / f"{model}-*.pth"))
    _, reloaded, fresh, *_ = _rebuild(checkpoint)  # strict load_state_dict into a fresh instance
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(fresh[k], v)]
    assert changed and (model != "SDPORec" or all("lora_" in k for k in changed))


def test_unknown_dpo_key_is_a_config_error(in_tmp):
    config = dict(TINY, dpo_args={"num_train_epochs": 1, "not_a_field": 3})
    with pytest.raises(CausalRecError, match="not_a_field"):
        causalrec.run("SDPORec", "retail-sim", config_dict=config)
    assert not (in_tmp / "saved" / "stages").exists()  # failed before the SFT stage


def test_missing_prepared_dir_is_a_clear_error(in_tmp):
    from recbole.data import create_dataset
    from recbole.utils import get_model

    from causalrec.recbole.quick_start import make_config

    config = make_config("GenRec", "retail-sim", config_dict=dict(TINY))
    dataset = create_dataset(config)
    config["prepared_dir"] = None
    with pytest.raises(CausalRecError, match="prepared_dir"):
        get_model("GenRec")(config, dataset)


def test_user_stage_args_update_the_yaml_defaults_instead_of_replacing_them():
    import yaml

    from causalrec.recbole.models.genrec import GenRec
    from causalrec.recbole.plugin import properties_dir
    from causalrec.recbole.stage_args import stage_defaults

    defaults = yaml.safe_load((properties_dir() / "model" / "LLMRecommender.yaml").read_text())["sft_args"]
    merged = stage_defaults(GenRec, "sft_args", "tiny", {"num_train_epochs": 7})
    assert merged["num_train_epochs"] == 7
    assert merged["learning_rate"] == defaults["learning_rate"]


def test_validate_last_stage_only(in_tmp):
    calls = []
    result = causalrec.run(
        "SDPORec",
        "retail-sim",
        config_dict=dict(TINY, validate_stages="last"),
        callback_fn=lambda stage, score: calls.append((stage, score)),
    )
    sft, sdpo = result["stages"]
    assert "valid_score" not in sft and sdpo["valid_score"] == pytest.approx(result["best_valid_score"])
    assert calls == [(1, pytest.approx(result["best_valid_score"]))]
    with pytest.raises(CausalRecError, match="validate_stages"):
        causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, validate_stages="first"))


def test_validate_best_stage_keeps_the_sft_model_when_the_preference_stage_validates_worse(in_tmp):
    """validate_stages: best with a preference stage that lowers validation (learning rate 2e-2 on this tiny shop):
    the run reports the SFT stage's validation and tests the SFT model, the same ranking GenRec's run gets from the
    same (cached) SFT stage; with validate_stages: all the same preference stage is tested instead."""
    harsh = dict(TINY, dpo_args=dict(TINY["dpo_args"], learning_rate=2e-2))
    best = causalrec.run("SDPORec", "retail-sim", config_dict=dict(harsh, validate_stages="best"))
    sft, sdpo = best["stages"]
    assert sdpo["valid_score"] < sft["valid_score"]
    assert sft["selected"] and "selected" not in sdpo
    assert best["best_valid_score"] == pytest.approx(sft["valid_score"])
    genrec = causalrec.run("GenRec", "retail-sim", config_dict=TINY)
    assert genrec["stages"][0]["reused"] and genrec["best_valid_score"] == pytest.approx(sft["valid_score"])
    assert best["test_result"] == pytest.approx(genrec["test_result"])
    last = causalrec.run("SDPORec", "retail-sim", config_dict=dict(harsh, validate_stages="all"))
    assert [s["reused"] for s in last["stages"]] == [True, True]
    assert last["best_valid_score"] == pytest.approx(sdpo["valid_score"])
    assert last["test_result"] != pytest.approx(best["test_result"])
    with pytest.raises(CausalRecError, match="validate_stages: best reloads.*stage_cache: true"):
        causalrec.run("SDPORec", "retail-sim", config_dict=dict(harsh, validate_stages="best", stage_cache=False))
