"""GenRec / SDPORec / CausalDPO with item tokens (item_repr id, title+id) end to end through RecBole."""

from __future__ import annotations

import dataclasses
import glob

import pytest
import torch
from test_models_llm import TINY, _rebuild, _run_saved

import causalrec
from causalrec.errors import CausalRecError


@pytest.fixture(scope="module")
def id_run(tmp_path_factory):
    return _run_saved(tmp_path_factory.mktemp("genrec_id"), dict(TINY, item_repr="id"))


def test_id_model_ranks_by_one_forward_equal_to_brute_force(id_run, in_tmp):
    from causalrec.llm.items import item_token
    from causalrec.llm.ranking import naive_scores

    result, checkpoint = id_run
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    config, model, fresh, _, valid, _ = _rebuild(checkpoint)
    assert model.trie is None and len(model.item_token_ids) == len(model.titles) - 1
    batch = next(iter(valid))[0][:5]
    prompts = model.prompts(batch)
    # the history is item tokens, oldest first, as long as MAX_ITEM_LIST_LENGTH allows
    seq, n = batch[model.ITEM_SEQ][0].tolist(), int(batch[model.ITEM_SEQ_LEN][0])
    assert " ".join(item_token(j) for j in seq[:n]) in prompts[0]
    assert model.prompt_format.max_history_items == config["MAX_ITEM_LIST_LENGTH"]
    scores = model.full_sort_predict(batch)
    assert scores.shape == (5, len(model.titles)) and torch.isneginf(scores[:, 0]).all()
    brute = naive_scores(model.llm, model.prompt_ids(batch), [[t] for t in model.item_token_ids])
    torch.testing.assert_close(scores[:, 1:], brute, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.predict(batch), scores[torch.arange(5), batch[model.ITEM_ID]], atol=1e-5, rtol=0)


def test_rank_orders_ranks_by_the_mixture_over_orders_equal_to_brute_force(id_run, in_tmp):
    """``rank_orders: K``: each case is ranked by ``log (1/(K+1)) sum_o p(y | x_o)`` over its time-ordered history
    and K random orders of the same shown items; equal to brute force over those prompts, the same whatever batch
    the case is ranked in, and ``predict`` reads the same scores."""
    from causalrec.llm.ranking import naive_scores

    _, checkpoint = id_run
    _, model, _, _, valid, _ = _rebuild(checkpoint)
    batch = next(iter(valid))[0][:4]
    time_order = model.full_sort_predict(batch)
    model.rank_orders = 2
    copies = [model.reordered(batch, c) for c in range(2)]
    lengths = batch[model.ITEM_SEQ_LEN].tolist()
    moved = 0
    for copy in copies:
        for r, n in enumerate(lengths):
            before, after = batch[model.ITEM_SEQ][r].tolist(), copy[model.ITEM_SEQ][r].tolist()
            start = max(0, n - model.prompt_format.max_history_items)
            assert sorted(after[start:n]) == sorted(before[start:n]) and after[n:] == before[n:]
            assert after[:start] == before[:start]
            moved += after != before
    assert moved > 0
    prompts = [model.prompt_ids(x) for x in (batch, *copies)]
    tokens = [[t] for t in model.item_token_ids]
    stacked = torch.stack([naive_scores(model.llm, p, tokens).double() for p in prompts])
    brute = torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(3.0, dtype=torch.float64))
    mixed = model.full_sort_predict(batch)
    torch.testing.assert_close(mixed[:, 1:].double(), brute, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed, time_order)
    torch.testing.assert_close(model.full_sort_predict(batch[2:4]), mixed[2:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.predict(batch), mixed[torch.arange(4), batch[model.ITEM_ID]], atol=1e-5, rtol=0)


def test_repeat_mix_is_the_mixture_with_the_shown_historys_purchase_shares(id_run, in_tmp):
    """``repeat_mix`` w: ``log((1 - w) p(y | x) + w c_y / n)`` with p renormalised over the catalog and c_y the
    times item y occurs among the n history items the prompt shows; checked against a per-row loop over brute-force
    item probabilities, with repeated items in the history, and ``predict`` reads the same scores."""
    from causalrec.llm.ranking import naive_scores

    _, checkpoint = id_run
    _, model, _, _, valid, _ = _rebuild(checkpoint)
    batch = next(iter(valid))[0][:6]
    seq, lengths = batch[model.ITEM_SEQ].clone(), batch[model.ITEM_SEQ_LEN].tolist()
    n0 = lengths[0]
    assert n0 >= 2 and max(lengths) > 3
    seq[0, n0 - 1] = seq[0, n0 - 2]  # a repeat purchase among the first row's shown items
    batch.interaction[model.ITEM_SEQ] = seq
    model.prompt_format = dataclasses.replace(model.prompt_format, max_history_items=3)  # shown, and counted
    brute = naive_scores(model.llm, model.prompt_ids(batch), [[t] for t in model.item_token_ids]).double()
    p = torch.softmax(brute, dim=1)
    model.repeat_mix = 0.3
    mixed = model.full_sort_predict(batch)
    for r, n in enumerate(lengths):
        shown = seq[r, max(0, n - 3) : n].tolist()
        share = torch.tensor([shown.count(i) / len(shown) for i in range(1, len(model.titles))], dtype=torch.float64)
        expected = torch.log(0.7 * p[r] + 0.3 * share)
        torch.testing.assert_close(mixed[r, 1:].double(), expected, atol=1e-5, rtol=0)
        older = set(seq[r, : max(0, n - 3)].tolist()) - set(shown) - {0}
        assert all(mixed[r, i] < torch.log(torch.tensor(0.7)) + 1e-6 for i in older)  # not shown: no share
    assert torch.isneginf(mixed[:, 0]).all()
    torch.testing.assert_close(model.predict(batch), mixed[torch.arange(6), batch[model.ITEM_ID]], atol=1e-5, rtol=0)
    model.repeat_mix = 0.0
    torch.testing.assert_close(model.full_sort_predict(batch)[:, 1:].double(), brute, atol=1e-5, rtol=0)


def test_repeat_mix_auto_reuses_the_stages_trained_without_it_and_tests_as_a_run_fixed_at_its_choice(
    in_tmp, monkeypatch
):
    """``repeat_mix: auto`` trains as a run without the mixture (the same stage keys, so the stages are reused),
    then validates every candidate weight, scoring each case once; the test equals a run trained and validated at
    the chosen weight."""
    from causalrec.recbole.models.llm_recommender import LLMRecommender
    from causalrec.recbole.repeat_mix import AUTO_WEIGHTS

    config = dict(TINY, item_repr="id")
    plain = causalrec.run("GenRec", "retail-sim", config_dict=config)
    calls = {"full_sort_scores": 0, "full_sort_predict": 0}
    for name in calls:
        method = getattr(LLMRecommender, name)
        monkeypatch.setattr(
            LLMRecommender, name, lambda m, x, f=method, n=name: calls.__setitem__(n, calls[n] + 1) or f(m, x)
        )
    auto = causalrec.run("GenRec", "retail-sim", config_dict={**config, "repeat_mix": "auto"})
    # validation is one batch here: the sweep mixes at ten weights and scores it once
    assert calls["full_sort_predict"] - calls["full_sort_scores"] == len(AUTO_WEIGHTS) - 1
    assert [s["key"] for s in auto["stages"]] == [s["key"] for s in plain["stages"]]
    assert all(s["reused"] for s in auto["stages"])
    by_weight = auto["repeat_mix"]["valid_score_by_weight"]
    assert by_weight["0.0"] == pytest.approx(plain["best_valid_score"], abs=1e-9)
    chosen = auto["repeat_mix"]["weight"]
    assert chosen > 0 and auto["best_valid_score"] == max(by_weight.values()) > by_weight["0.0"]
    fixed = causalrec.run("GenRec", "retail-sim", config_dict={**config, "repeat_mix": chosen})
    assert not fixed["stages"][0]["reused"]  # its SFT validated with the mixture: another stage key
    assert fixed["best_valid_score"] == pytest.approx(auto["best_valid_score"], abs=1e-6)
    assert fixed["test_result"] == pytest.approx(auto["test_result"], abs=1e-6)


@pytest.mark.parametrize(
    "model,extra",
    [
        ("SDPORec", {"num_negatives": "all", "lora_r": 4}),
        ("CausalDPO", {"num_negatives": "all"}),
        ("CausalDPO", {"item_repr": "title+id", "num_negatives": 2, "env_source": "latent", "n_environments": 2}),
    ],
)
def test_preference_models_with_item_tokens(in_tmp, model, extra):
    config = {**TINY, "item_repr": "id", **extra}
    result = causalrec.run(model, "retail-sim", config_dict=config)
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    (checkpoint,) = glob.glob(str(in_tmp / "saved" / f"{model}-*.pth"))
    _, reloaded, fresh, *_ = _rebuild(checkpoint)
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(fresh[k], v)]
    assert changed
    if extra.get("lora_r"):  # LoRA weights and the embeddings peft trains beside them, nothing else
        assert all("lora_" in k or "modules_to_save" in k for k in changed)
        assert any("modules_to_save" in k for k in changed)


def test_all_negatives_with_titles_is_refused_before_training(in_tmp):
    with pytest.raises(CausalRecError, match="item tokens"):
        causalrec.run("SDPORec", "retail-sim", config_dict=dict(TINY, num_negatives="all"))


def test_unknown_item_repr_names_the_choices(in_tmp):
    with pytest.raises(CausalRecError, match="title\\+id"):
        causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="ids"))


@pytest.mark.parametrize("position", [None, "first"])
def test_backdoor_sum_with_item_tokens_and_the_environment_after_or_before_the_history(in_tmp, position):
    """CausalDPO's default prompts with item tokens: the season after the history (``environment_position: first``:
    before it), ranking = sum_e P(e) p(y|x,e); the key counts in a compare cell's identity only when set."""
    from causalrec.experiments.compare import _config_identity
    from causalrec.llm.ranking import naive_scores

    extra = {} if position is None else {"environment_position": position}
    causalrec.run(
        "GenRec", "retail-sim", config_dict={**TINY, "item_repr": "id", "prompt_environment": "season", **extra}
    )
    (checkpoint,) = glob.glob(str(in_tmp / "saved" / "GenRec-*.pth"))
    _, model, _, _, valid, _ = _rebuild(checkpoint)
    assert model.prompt_format.environment_last == (position is None) and model.sft_positions == "all"
    assert ("environment_position" in _config_identity("GenRec", "retail-sim", extra)) == (position is not None)
    batch = next(iter(valid))[0][:3]
    histories = model.history_texts(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    prior = model.env_log_prior.exp().double()
    brute = torch.zeros(3, len(model.titles) - 1, dtype=torch.float64)
    for e, p_e in zip(model.environments, prior.tolist()):
        prompts = [model.prompt_format.prompt(h, e) for h in histories]
        if position is None:
            assert all(p.endswith(f"season {e}.") for p in prompts)
        else:
            assert all(p.startswith(f"season {e}. A customer bought") for p in prompts)
        brute += (
            p_e
            * naive_scores(model.llm, model.encode_prompts(prompts), [[t] for t in model.item_token_ids]).double().exp()
        )
    torch.testing.assert_close(model.full_sort_predict(batch)[:, 1:].double(), brute.log(), atol=1e-5, rtol=0)


def test_sequence_sft_validates_every_epoch_and_keeps_the_best(in_tmp):
    config = {
        **TINY,
        "item_repr": "id",
        "sft_args": {
            "num_train_epochs": 4,
            "learning_rate": 3e-3,
            "per_device_train_batch_size": 32,
            "save_strategy": "no",
        },
        "sft_patience": 1,
    }
    result = causalrec.run("GenRec", "retail-sim", config_dict=config)
    (sft,) = result["stages"]
    scores = sft["epoch_valid_scores"]
    assert 1 <= len(scores) <= 4 and sft["best_epoch"] == 1 + max(range(len(scores)), key=scores.__getitem__)
    # the model kept is the best epoch's: its validation equals that epoch's score
    assert result["best_valid_score"] == pytest.approx(max(scores), abs=1e-6)
    if len(scores) < 4:  # stopped early: patience 1 after the best
        assert len(scores) - sft["best_epoch"] == 1


def _stage_meta(result, name):
    import json
    from pathlib import Path

    (stage,) = [s for s in result["stages"] if s["stage"] == name]
    return json.loads((Path(stage["directory"]) / "stage.json").read_text())


def test_history_shuffles_add_reordered_copies_of_every_sft_row(in_tmp):
    """``history_shuffles: 2``: the SFT stage trains on 3x the rows (each window and two random orders of it), under
    its own stage key; at 0 (the default) a compare cell's identity does not contain the key."""

    def sft_meta(**extra):
        return _stage_meta(
            causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id", **extra)), "sft"
        )

    plain, shuffled = sft_meta(), sft_meta(history_shuffles=2)
    assert shuffled["inputs"]["rows"] == 3 * plain["inputs"]["rows"]
    assert shuffled["inputs"]["records"] != plain["inputs"]["records"]
    from causalrec.experiments.compare import _config_identity

    assert "history_shuffles" not in _config_identity("GenRec", "retail-sim", {})
    assert _config_identity("GenRec", "retail-sim", {"history_shuffles": 2})["history_shuffles"] == 2
    with pytest.raises(CausalRecError, match="history_shuffles"):
        causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id", history_shuffles=-1))


def test_sft_vrex_trains_its_own_sft_stage_with_the_penalty_over_the_rows_regions(in_tmp, monkeypatch):
    """``sft_vrex`` > 0: sequence SFT through ``InvariantSFTTrainer`` with one environment per region of the rows,
    under its own stage key (another model); at 0 the plain stage is reused and a compare cell's identity does not
    contain the keys."""
    import causalrec.training.sft as sft
    from causalrec.experiments.compare import _config_identity

    seen = {}
    original = sft.InvariantSFTTrainer.__init__

    def spy(self, *args, n_environments, lambda_inv, **kwargs):
        seen.update(n=n_environments, weight=lambda_inv, labels=sorted(set(kwargs["train_dataset"]["environment"])))
        original(self, *args, n_environments=n_environments, lambda_inv=lambda_inv, **kwargs)

    monkeypatch.setattr(sft.InvariantSFTTrainer, "__init__", spy)
    plain = causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id"))
    zero = causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id", sft_vrex=0.0))
    assert zero["stages"][0]["reused"] and not seen
    vrex = causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id", sft_vrex=5.0))
    sim_regions = 4  # retail-sim's default sim_regions
    assert seen == {"n": sim_regions, "weight": 5.0, "labels": list(range(sim_regions))}
    assert not vrex["stages"][0]["reused"] and vrex["stages"][0]["key"] != plain["stages"][0]["key"]
    assert vrex["test_result"] != plain["test_result"]
    assert "sft_vrex" not in _config_identity("GenRec", "retail-sim", {"sft_vrex": 0.0})
    assert _config_identity("GenRec", "retail-sim", {"sft_vrex": 5.0})["sft_vrex"] == 5.0
    with pytest.raises(CausalRecError, match="sft_vrex"):
        causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id", sft_vrex=-1.0))


def test_environment_position_without_an_environment_reuses_the_same_sft_stage(in_tmp):
    # the position only places an environment; with none in the prompt it must not split the stage cache (a tuning
    # space crossing it with prompt_environment: null would otherwise train the same SFT model twice)
    plain = causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id"))
    first = causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id", environment_position="first"))
    assert first["stages"][0]["key"] == plain["stages"][0]["key"] and first["stages"][0]["reused"]


def test_user_token_model_ranks_each_case_with_its_own_customer_token(in_tmp, monkeypatch):
    """``user_token: true``: every user of the data set has one added token; a case's prompts start with its own
    customer's token, training rows too, and the one-forward ranking still equals brute force; the key counts in a
    compare cell's identity only when set."""
    import causalrec.training as training
    from causalrec.experiments.compare import _config_identity
    from causalrec.llm.items import user_token
    from causalrec.llm.ranking import naive_scores

    seen = []  # the preference stage's rows: its prompts must carry the user too (the rejected items are added)
    real = training.preference_dataset
    monkeypatch.setattr(training, "preference_dataset", lambda records, fmt: seen.extend(records) or real(records, fmt))
    causalrec.run(
        "CausalDPO", "retail-sim", config_dict={**TINY, "item_repr": "id", "num_negatives": 2, "user_token": True}
    )
    assert seen and all(r.user and len(r.negatives) == 2 for r in seen)
    (checkpoint,) = glob.glob(str(in_tmp / "saved" / "CausalDPO-*.pth"))
    config, model, *_, valid, _ = _rebuild(checkpoint)
    n_users = valid._dataset.num(config["USER_ID_FIELD"])
    assert len(model.user_token_ids) == n_users - 1 > TINY["sim_users"] // 2  # RecBole's user 0 pads
    batch = next(iter(valid))[0][:4]
    prompts = model.prompts(batch)  # CausalDPO: one per (case, training season)
    pairs, _ = model._environment_rows(batch)
    users = batch[model.USER_ID].tolist()
    assert all(p.startswith(user_token(users[r]) + " A customer bought") for p, (r, _) in zip(prompts, pairs))
    brute = naive_scores(model.llm, model.prompt_ids(batch), [[t] for t in model.item_token_ids])
    torch.testing.assert_close(model.score_prompts(model.prompt_ids(batch))[:, 1:], brute, atol=1e-5, rtol=0)
    assert "user_token" not in _config_identity("GenRec", "retail-sim", {})
    assert _config_identity("GenRec", "retail-sim", {"user_token": True})["user_token"] is True


def test_environment_each_puts_every_history_items_own_season_before_it(in_tmp):
    """``environment_position: each``: the data is prepared with each history item's season, every prompt writes
    it before the item's token and the answer's season last; the ranking is the backdoor sum over the answer's
    season (the history's seasons are observed facts), equal to brute force; titles are refused."""
    from causalrec.llm.items import item_token
    from causalrec.llm.ranking import naive_scores

    config = {**TINY, "item_repr": "id", "prompt_environment": "season", "environment_position": "each"}
    result = causalrec.run("GenRec", "retail-sim", config_dict=config)
    assert _stage_meta(result, "sft")["inputs"]["prompt"]["environment_each"] is True
    (checkpoint,) = glob.glob(str(in_tmp / "saved" / "GenRec-*.pth"))
    _, model, _, _, valid, _ = _rebuild(checkpoint)
    batch = next(iter(valid))[0][:3]
    seasons = valid._dataset.field2id_token["season_list"]
    prior = model.env_log_prior.exp().double()
    brute = torch.zeros(3, len(model.titles) - 1, dtype=torch.float64)
    for e, p_e in zip(model.environments, prior.tolist()):
        prompts = []
        for r in range(3):
            n = int(batch[model.ITEM_SEQ_LEN][r])
            items, labels = batch[model.ITEM_SEQ][r][:n].tolist(), batch["season_list"][r][:n].tolist()
            pairs = " ".join(f"{seasons[s]} {item_token(i)}" for i, s in zip(items, labels))
            prompts.append(f"A customer bought, in order: {pairs} {e}".replace(":  ", ": "))
        assert prompts == [
            p
            for p, (_, k) in zip(model.prompts(batch), model._environment_rows(batch)[0])
            if k == model.environments.index(e)
        ]
        brute += (
            p_e
            * naive_scores(model.llm, model.encode_prompts(prompts), [[t] for t in model.item_token_ids]).double().exp()
        )
    torch.testing.assert_close(model.full_sort_predict(batch)[:, 1:].double(), brute.log(), atol=1e-5, rtol=0)
    # rank_orders reorders each item with its own season
    reordered = model.reordered(batch, 0)
    for r in range(3):
        n = int(batch[model.ITEM_SEQ_LEN][r])
        pairs = [(batch[f][r][:n].tolist(), reordered[f][r][:n].tolist()) for f in (model.ITEM_SEQ, "season_list")]
        assert sorted(zip(pairs[0][0], pairs[1][0])) == sorted(zip(pairs[0][1], pairs[1][1]))
    with pytest.raises(CausalRecError, match="item_repr: id"):
        causalrec.run("GenRec", "retail-sim", config_dict={**config, "item_repr": "title"})


def test_sft_stage_key_holds_how_its_epoch_validation_ranks(in_tmp):
    """Sequence SFT keeps its best validation epoch, so what the validation ranking depends on is part of the SFT
    stage's key: ranking settings that change a validation case's weights train (and cache) another stage, and
    ones that do not reuse it. The seasonal split validates on September, whose autumn never trains, so
    ``observed`` weighs those cases by P(e) as ``marginal`` does; the regional split's validation seasons train."""

    def sft(split, **extra):
        config = dict(TINY, item_repr="id", prompt_environment="season", split=split, **extra)
        (stage,) = causalrec.run("GenRec", "retail-sim", config_dict=config)["stages"]
        return stage, _stage_meta({"stages": [stage]}, "sft")["inputs"]["early_stopping"]

    observed, kept = sft("seasonal", environment_inference="observed")
    assert set(kept) == {"patience", "metric", "valid"}  # the ranking every earlier stage key assumed
    marginal, _ = sft("seasonal", environment_inference="marginal")
    assert marginal["key"] == observed["key"] and marginal["reused"]
    uniform, kept = sft("seasonal", environment_inference="observed", environment_prior="uniform")
    assert uniform["key"] != observed["key"] and not uniform["reused"] and "environment_weights" in kept
    regional_observed, _ = sft("regional", environment_inference="observed")
    regional_marginal, kept = sft("regional", environment_inference="marginal")
    assert regional_marginal["key"] != regional_observed["key"] and not regional_marginal["reused"]
    assert "environment_weights" in kept
    reranked, kept = sft("regional", environment_inference="observed", context_rerank="region")
    assert reranked["key"] != regional_observed["key"] and kept["context_rerank"] == ["region", 1.0]
    reordered, kept = sft("regional", environment_inference="observed", rank_orders=2)
    assert reordered["key"] != regional_observed["key"] and kept["rank_orders"] == 2
    copied, kept = sft("regional", environment_inference="observed", repeat_mix=0.2)
    assert copied["key"] != regional_observed["key"] and kept["repeat_mix"] == 0.2
    from causalrec.experiments.compare import _config_identity

    identity = _config_identity("GenRec", "retail-sim", {})
    assert "rank_orders" not in identity and "repeat_mix" not in identity  # cells keyed before them stay valid
    with pytest.raises(CausalRecError, match="rank_orders"):
        causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id", rank_orders=-1))
    with pytest.raises(CausalRecError, match="repeat_mix"):
        causalrec.run("GenRec", "retail-sim", config_dict=dict(TINY, item_repr="id", repeat_mix=1.0))
