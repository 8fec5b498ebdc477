"""Item tokens (item_repr id / title+id): tokenisation, one-forward full-catalog scores against brute force,
and S-DPO against the whole catalog against a hand computation."""

from __future__ import annotations

import os
from copy import deepcopy

import pytest
import torch
from test_llm_ranking import _gqa_llama, _sharpen  # random init is near-uniform; sharper weights make the tests bite

from causalrec.data.frame import text_sharing, warn_if_texts_tie
from causalrec.data.prompts import PromptFormat, completion_text
from causalrec.errors import ConfigError, DataError
from causalrec.llm.backbone import BackboneConfig, apply_lora, load_backbone
from causalrec.llm.items import (
    MASKED_LOGIT,
    item_token,
    item_token_ids,
    resize_for_items,
    score_item_tokens,
)
from causalrec.llm.ranking import marginalize_environments, naive_scores, score_catalog
from causalrec.llm.trie import TitleTrie

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_ITEMS = 12  # RecBole items 1..12
ITEMS = list(range(1, N_ITEMS + 1))
FMT = PromptFormat(separator=" ", max_history_items=50)
HISTORIES = [[3], [1, 5, 7, 7, 2, 12], [9, 9, 4], list(range(1, 13)) * 2]


def _prompt(history, env=None, fmt=FMT):
    return fmt.prompt([item_token(j) for j in history], env)


@pytest.fixture(scope="module")
def setup():
    cfg = BackboneConfig(tiny_hidden_size=32, tiny_heads=4, tiny_layers=2)
    model, tok = load_backbone(cfg, [FMT.template, "season winter summer"], items=ITEMS)
    _sharpen(model)
    ids = item_token_ids(tok, ITEMS)
    prompts = [tok(_prompt(h)).input_ids for h in HISTORIES]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: padding is exercised
    return model, tok, ids, prompts


def _brute_force(model, prompts, ids):
    """Independent reference: one unpadded forward of prompt + item token per (prompt, item)."""
    return naive_scores(model, prompts, [[t] for t in ids], batch_size=5)


def test_item_tokens_are_single_tokens_after_the_prompt(setup):
    _, tok, ids, _ = setup
    assert len(tok) >= N_ITEMS and len(set(ids)) == N_ITEMS
    prompt = _prompt([3, 11])
    base = tok(prompt).input_ids
    for j, t in zip(ITEMS, ids):
        full = tok(prompt + completion_text(item_token(j)) + tok.eos_token).input_ids
        assert full == base + [t, tok.eos_token_id]  # one token, the space absorbed, prompt unchanged
    # the history's tokens appear in the prompt, not lower-cased or split by the tiny tokenizer's normaliser
    assert base.count(ids[2]) == 1 and base.count(ids[10]) == 1


def test_one_forward_equals_brute_force(setup):
    model, _, ids, prompts = setup
    # float64: the claim is the same computation; float32 kernels picked by batch shape differ by ~1e-5 here
    # (1.1e-5 seen on one CPU) on these sharpened log-probabilities
    model = deepcopy(model).double()
    naive = _brute_force(model, prompts, ids)
    assert naive.std() > 1.0  # far from uniform: equality means something
    for batch_size in (1, 3, 64):
        torch.testing.assert_close(
            score_item_tokens(model, prompts, ids, batch_size=batch_size), naive, atol=1e-5, rtol=0
        )


def test_scores_are_a_normalised_distribution_part(setup):
    model, _, ids, prompts = setup
    mass = score_item_tokens(model, prompts, ids).exp().sum(1)
    assert (mass <= 1 + 1e-5).all() and (mass > 0).all()


def test_same_scores_as_the_trie_over_one_token_items(setup):
    """The trie walk and the one-forward path compute the same quantity for one-token items."""
    model, _, ids, prompts = setup
    trie = TitleTrie.from_token_ids([[t] for t in ids])
    torch.testing.assert_close(
        score_catalog(model, prompts, trie, batch_size=2), score_item_tokens(model, prompts, ids), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_query_attention_equals_brute_force(setup, attn):
    _, tok, ids, prompts = setup
    gqa = _gqa_llama(len(tok), attn)
    torch.testing.assert_close(
        score_item_tokens(gqa, prompts, ids, batch_size=4), _brute_force(gqa, prompts, ids), atol=1e-5, rtol=0
    )


def test_gpt2_learned_positions_equal_brute_force(setup):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok, ids, prompts = setup
    gpt = _sharpen(
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128)), seed=2
    )
    torch.testing.assert_close(
        score_item_tokens(gpt, prompts, ids, batch_size=4), _brute_force(gpt, prompts, ids), atol=1e-5, rtol=0
    )


def test_lora_model_with_trained_item_rows_equals_brute_force(setup):
    _, tok, ids, prompts = setup
    cfg = BackboneConfig(tiny_hidden_size=32, tiny_heads=4, lora_r=4)
    lora, tok2 = load_backbone(cfg, [FMT.template, "season winter summer"], items=ITEMS)
    assert item_token_ids(tok2, ITEMS) == ids
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable)
    # peft trains the input embedding beside the adapters (the item tokens' rows), and the tied output layer
    # reads that same trained copy (what TRL's fused LM head reads as lm_head.weight)
    assert [n for n in trainable if "modules_to_save" in n] == [
        "base_model.model.model.embed_tokens.modules_to_save.default.weight"
    ]
    assert lora.get_output_embeddings().weight.data_ptr() == lora.get_input_embeddings().weight.data_ptr()
    assert (
        lora.get_output_embeddings().weight.data_ptr()
        != lora.base_model.model.model.embed_tokens.original_module.weight.data_ptr()
    )
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.5)
    naive = _brute_force(lora, prompts, ids)
    torch.testing.assert_close(score_item_tokens(lora, prompts, ids, batch_size=3), naive, atol=1e-5, rtol=0)
    with lora.disable_adapter():
        assert (_brute_force(lora, prompts, ids) - naive).abs().max() > 1e-2  # the adapter is in play


def test_environments_in_the_prompt_and_the_backdoor_sum_equal_brute_force(setup):
    model, tok, ids, _ = setup
    fmt = PromptFormat(separator=" ", max_history_items=50, environment="season")
    seasons = ["winter", "summer"]
    prompts = [tok(_prompt(h, e, fmt)).input_ids for h in HISTORIES for e in seasons]
    naive = _brute_force(model, prompts, ids).view(len(HISTORIES), len(seasons), -1)
    fast = score_item_tokens(model, prompts, ids, batch_size=3).view(len(HISTORIES), len(seasons), -1)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
    prior = torch.tensor([0.7, 0.3]).log()
    by_hand = torch.log(0.7 * naive[:, 0].double().exp() + 0.3 * naive[:, 1].double().exp()).float()
    torch.testing.assert_close(marginalize_environments(fast, prior), by_hand, atol=1e-5, rtol=0)


def test_empty_prompt_is_an_error(setup):
    model, _, ids, _ = setup
    from causalrec.errors import BackboneError

    with pytest.raises(BackboneError, match="empty prompt"):
        score_item_tokens(model, [[]], ids)


def test_title_init_gives_each_item_the_mean_of_its_title_rows():
    """A pretrained backbone's new item rows start at the mean embedding of the item's title tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from causalrec.llm.backbone import build_tokenizer
    from causalrec.llm.items import add_item_tokens

    titles = ["red mug", "blue scarf wool"]
    tok = build_tokenizer(titles)
    n_old = len(tok)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=n_old,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    )
    ids = add_item_tokens(tok, [1, 2])
    resize_for_items(model, tok, ids, titles)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == len(tok) == n_old + 2
    for title, t in zip(titles, ids):
        pieces = tok(title, add_special_tokens=False).input_ids
        torch.testing.assert_close(emb[t], emb[pieces].mean(0))
        torch.testing.assert_close(out[t], out[pieces].mean(0))


def test_text_sharing_counts_and_warns(caplog):
    texts = ["Red mug", "red  mug", "tea", "pot", "pot", "pot", "cup"]
    stats = text_sharing(texts)
    assert stats == {"items": 7, "distinct_texts": 4, "items_sharing": 5, "largest_group": 3, "share": 5 / 7}
    with caplog.at_level("WARNING"):
        warn_if_texts_tie(texts, "shop")
    assert "5 of 7 items share" in caplog.text and "item_repr: id" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_if_texts_tie(["a", "b", "c"], "shop")
    assert caplog.text == ""


# ------------------------------------------------------------------------ S-DPO over the catalog


def _trainer(model, tok, ids, rows, num_negatives="all", cls=None, **kw):
    from causalrec.training import SDPOConfig, SDPOTrainer
    from causalrec.training.sdpo_trainer import make_preference_dataset

    prompts = [_prompt(h) for h, _ in rows]
    chosen = [completion_text(item_token(t)) for _, t in rows]
    rejected = (
        None
        if num_negatives == "all"
        else [[completion_text(item_token(j)) for j in neg] for neg in kw.pop("negatives")]
    )
    ds = make_preference_dataset(prompts, chosen, rejected, season=kw.pop("season", None))
    cls = cls or SDPOTrainer
    config_cls = kw.pop("config_cls", SDPOConfig)
    args = config_cls(
        output_dir="unused",
        num_negatives=num_negatives,
        beta=0.5,
        per_device_train_batch_size=len(rows),
        report_to="none",
        save_strategy="no",
        **kw,
    )
    return cls(model, args=args, train_dataset=ds, processing_class=tok, item_token_ids=ids)


def test_all_negatives_loss_equals_the_hand_computation(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok, ids, _ = setup
    rows = [([3], 4), ([1, 5, 7], 7), ([9, 9, 4], 1)]
    ref_model = _sharpen(
        load_backbone(
            BackboneConfig(tiny_hidden_size=32, tiny_heads=4, tiny_layers=2),
            [FMT.template, "season winter summer"],
            items=ITEMS,
        )[0],
        seed=5,
    )
    trainer = _trainer(model, tok, ids, rows)
    trainer.ref_model = ref_model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    loss = trainer.compute_loss(model.eval(), batch)
    # by hand: log-ratios of every item from brute-force scores, S-DPO over all other items
    prompts = [tok(_prompt(h)).input_ids for h, _ in rows]
    ratio = (_brute_force(model, prompts, ids) - _brute_force(ref_model, prompts, ids)).double()
    expected = []
    for r, (_, target) in enumerate(rows):
        c = target - 1
        z = torch.stack([0.5 * (ratio[r, j] - ratio[r, c]) for j in range(N_ITEMS) if j != c])
        expected.append(-torch.nn.functional.logsigmoid(-torch.logsumexp(z, 0)))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)
    assert batch["chosen_item"].tolist() == [3, 6, 0]


def test_all_negatives_gradients_match_the_brute_force_loss(setup, tmp_path, monkeypatch):
    """The loss through the trainer's single forward back-propagates like the brute-force per-item loss."""
    monkeypatch.chdir(tmp_path)
    _, tok, ids, _ = setup
    policy = _sharpen(
        load_backbone(
            BackboneConfig(tiny_hidden_size=32, tiny_heads=4, tiny_layers=1),
            [FMT.template, "season winter summer"],
            items=ITEMS,
        )[0],
        seed=7,
    )
    rows = [([3, 2], 4), ([8], 8)]
    trainer = _trainer(policy, tok, ids, rows)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    policy.eval()
    trainer.compute_loss(policy, batch).backward()
    fast = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    ref = trainer.ref_model
    prompts = [tok(_prompt(h)).input_ids for h, _ in rows]
    losses = []
    for r, (_h, target) in enumerate(rows):
        p = torch.tensor([prompts[r]])
        lp = torch.log_softmax(policy(input_ids=p).logits[0, -1], -1)[ids]
        with torch.no_grad():
            lr = torch.log_softmax(ref(input_ids=p).logits[0, -1], -1)[ids]
        ratio = lp - lr
        c = target - 1
        z = torch.stack([0.5 * (ratio[j] - ratio[c]) for j in range(N_ITEMS) if j != c])
        losses.append(torch.nn.functional.softplus(torch.logsumexp(z, 0)))
    torch.stack(losses).mean().backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-5, rtol=1e-4)


def test_all_negatives_needs_item_tokens_and_one_token_answers(setup, tmp_path, monkeypatch):
    from causalrec.training import SDPOConfig, SDPOTrainer
    from causalrec.training.sdpo_trainer import make_preference_dataset

    monkeypatch.chdir(tmp_path)
    model, tok, ids, _ = setup
    ds = make_preference_dataset([_prompt([1])], [" season"], None)
    args = SDPOConfig(output_dir="unused", num_negatives="all", report_to="none", save_strategy="no")
    with pytest.raises(ConfigError, match="item tokens"):
        SDPOTrainer(model, args=args, train_dataset=ds, processing_class=tok)
    with pytest.raises(DataError, match="one item token"):
        SDPOTrainer(model, args=args, train_dataset=ds, processing_class=tok, item_token_ids=ids)
    with pytest.raises(ConfigError, match="'all'"):
        SDPOConfig(output_dir="unused", num_negatives=0)


def test_causal_dpo_runs_on_the_whole_catalog_with_environments(setup, tmp_path, monkeypatch):
    """Environments, backdoor weights and the penalties work unchanged on all-catalog S-DPO losses; with one
    environment and no penalty the loss is S-DPO's."""
    from causalrec.training import CausalDPOConfig, CausalDPOTrainer

    monkeypatch.chdir(tmp_path)
    model, tok, ids, _ = setup
    rows = [([3], 4), ([1, 5, 7], 7), ([9, 9, 4], 1), ([2], 2)]
    seasons = ["winter", "summer", "winter", "summer"]
    plain = _trainer(model, tok, ids, rows)
    batch = plain.data_collator([plain.train_dataset[i] for i in range(len(rows))])
    sdpo = plain.compute_loss(model.eval(), batch).item()
    one = _trainer(
        model,
        tok,
        ids,
        rows,
        cls=CausalDPOTrainer,
        config_cls=CausalDPOConfig,
        season=["all"] * 4,
        env_source="season",
        lambda_inv=0.0,
    )
    b1 = one.data_collator([one.train_dataset[i] for i in range(len(rows))])
    assert one.compute_loss(model.eval(), b1).item() == pytest.approx(sdpo, abs=1e-6)
    for invariance in ("mmd", "vrex", "irm"):
        causal = _trainer(
            model,
            tok,
            ids,
            rows,
            cls=CausalDPOTrainer,
            config_cls=CausalDPOConfig,
            season=seasons,
            env_source="season",
            invariance=invariance,
            lambda_inv=1.0,
            inv_warmup_steps=0,
        )
        b = causal.data_collator([causal.train_dataset[i] for i in range(len(rows))])
        loss = causal.compute_loss(model.eval(), b)
        assert torch.isfinite(loss) and loss.item() >= 0
    latent = _trainer(
        model,
        tok,
        ids,
        rows,
        cls=CausalDPOTrainer,
        config_cls=CausalDPOConfig,
        season=seasons,
        env_source="latent",
        n_environments=2,
        env_init_samples=4,
    )
    b = latent.data_collator([latent.train_dataset[i] for i in range(len(rows))])
    assert torch.isfinite(latent.compute_loss(model.eval(), b))


def test_masked_logit_contributes_exactly_nothing():
    z = torch.tensor([[0.3, MASKED_LOGIT, -1.2]])
    assert torch.logsumexp(z, -1).item() == pytest.approx(torch.logsumexp(torch.tensor([0.3, -1.2]), -1).item(), abs=0)
    assert (torch.softmax(z, -1) * z)[0, 1].item() == 0.0


def test_reference_copy_of_a_trl_patched_model_runs_its_own_weights(setup):
    """SFT's TRL trainer patches model.forward with a closure over the original's forward: a deep copy that kept
    it would compute the policy's numbers as the 'reference' (the catalog path calls forward plainly)."""
    from trl.trainer.utils import add_fused_lm_head

    from causalrec.training.sdpo_trainer import _frozen_copy

    _, tok, ids, prompts = setup
    policy = load_backbone(
        BackboneConfig(tiny_hidden_size=16, tiny_heads=2, tiny_layers=1),
        [FMT.template, "season winter summer"],
        items=ITEMS,
    )[0]
    add_fused_lm_head(policy)
    ref = _frozen_copy(policy)
    x = torch.tensor([prompts[1]])
    before = ref(input_ids=x).logits.detach().clone()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    torch.testing.assert_close(ref(input_ids=x).logits, before)


def test_data_preparation_reports_and_warns_about_shared_texts(tmp_path, caplog):
    """A csv catalog where 4 of 6 items share two texts: the prepared meta counts them and a warning names id."""
    import pandas as pd

    from causalrec.data import prepare
    from causalrec.data.spec import DataSpec

    rows = []
    texts = {"A": "milk 1l", "B": "Milk  1L", "C": "bread", "D": "bread", "E": "eggs", "F": "tea"}
    for u in range(40):
        for k, item in enumerate("ABCDEF"[u % 3 :] + "ABC"):
            rows.append({"user": f"u{u}", "item": item, "ts": f"2020-{1 + (u + k) % 12:02d}-10", "text": texts[item]})
    source = tmp_path / "shop.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    spec = DataSpec.from_mapping(
        {
            "dataset": "csv",
            "source": str(source),
            "csv_user": "user",
            "csv_item": "item",
            "csv_time": "ts",
            "csv_text": "text",
            "split": "iid",
            "data_cache_dir": str(tmp_path / "c"),
            "min_user_inter": 1,
            "min_item_inter": 1,
        }
    )
    with caplog.at_level("WARNING"):
        prepared = prepare(spec, show_progress=False)
    stats = prepared.meta["stats"]["item_texts"]
    assert stats["items"] == 6 and stats["distinct_texts"] == 4 and stats["items_sharing"] == 4
    assert "4 of 6 items share" in caplog.text and "item_repr: id" in caplog.text


# ------------------------------------------------------------------------------------- sequence SFT


def test_environment_after_the_history_for_item_tokens():
    fmt = PromptFormat(
        template="A customer bought, in order: {history}", separator=" ", environment="season", environment_last=True
    )
    assert (
        fmt.prompt(["<item_1>", "<item_2>"], "winter")
        == "A customer bought, in order: <item_1> <item_2> season winter."
    )
    assert PromptFormat(environment="season").prompt(["tea"], "winter").startswith("season winter. ")


def test_sequence_sft_rows_target_every_item_after_the_first(setup):
    from causalrec.data.prompts import ITEM_TOKEN_TEMPLATE
    from causalrec.training import PreferenceRecord
    from causalrec.training.records import sft_sequence_dataset

    _, tok, ids, _ = setup
    for env in (None, "winter"):
        fmt = PromptFormat(
            template=ITEM_TOKEN_TEMPLATE,
            separator=" ",
            max_history_items=50,
            environment=env and "season",
            environment_last=True,
        )
        rec = PreferenceRecord(history=[item_token(j) for j in (3, 5, 5)], target=item_token(9), season=env or "all")
        row = sft_sequence_dataset([rec], fmt, tok, ids)[0]
        tokens, mask = row["input_ids"], row["completion_mask"]
        assert tokens == tok(fmt.prompt(rec.history, env) + completion_text(rec.target) + tok.eos_token).input_ids
        targets = [t for t, m in zip(tokens, mask) if m]
        # the 2nd and 3rd history items, the answer and EOS; never the first item or a template word
        assert targets == [ids[4], ids[4], ids[8], tok.eos_token_id]
        assert sum(mask) == 4


def test_sequence_windows_tile_each_users_training_sequence():
    """Rows kept: each user's last row, then every max_history_items-th row before it (time order)."""
    from types import SimpleNamespace

    from causalrec.recbole.trainer import LLMTrainer

    users = torch.tensor([7, 7, 7, 7, 7, 7, 7, 3, 3])
    times = torch.tensor([10, 11, 12, 13, 14, 15, 16, 5, 1])  # user 3's rows out of time order
    lengths = torch.tensor([1, 2, 3, 3, 3, 3, 3, 2, 1])
    data = {"user_id": users, "timestamp": times, "item_length": lengths}

    class Feat(dict):  # what the method reads of RecBole's Interaction: columns and field tensors
        columns = list(data)

    trainer = LLMTrainer.__new__(LLMTrainer)
    trainer.config = {"USER_ID_FIELD": "user_id", "ITEM_LIST_LENGTH_FIELD": "item_length", "TIME_FIELD": "timestamp"}
    trainer.model = SimpleNamespace(prompt_format=PromptFormat(max_history_items=3))
    keep = trainer._sequence_windows(SimpleNamespace(inter_feat=Feat(data)))
    # user 7: rows 6, 3, 0 (every 3rd from the last); user 3: its last row in time is row 7
    assert keep.tolist() == [0, 3, 6, 7]


def test_epoch_validation_keeps_the_best_epoch_and_stops_after_patience():
    from types import SimpleNamespace

    from causalrec.recbole.trainer import _epoch_validation

    scores = iter([0.1, 0.3, 0.2, 0.25, 0.29, 0.5])
    model = torch.nn.Linear(1, 1, bias=False)
    stop = _epoch_validation(lambda: next(scores), patience=3, bigger=True)
    control = SimpleNamespace(should_training_stop=False)
    weights = []
    for epoch in range(5):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        weights.append(epoch)
        stop.on_epoch_end(None, None, control, model=model)
        if control.should_training_stop:
            break
    assert epoch == 4 and stop.scores == [0.1, 0.3, 0.2, 0.25, 0.29] and stop.best_epoch == 1
    stop.restore_best(model)
    assert model.weight.item() == 1.0  # the weights of the best epoch, not the last


def test_lora_on_an_untied_model_trains_both_item_row_tables(setup):
    """Untied input and output embeddings: both are trained copies, and the output layer's weight (what TRL's
    fused LM head reads) is the trained one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok, ids, prompts = setup
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    )
    lora = apply_lora(model, BackboneConfig(lora_r=2), trainable_tokens=ids)
    trained = sorted(n for n, p in lora.named_parameters() if p.requires_grad and "modules_to_save" in n)
    assert [n.split(".")[-4] for n in trained] == ["lm_head", "embed_tokens"]
    with torch.no_grad():
        lora.get_output_embeddings().weight[ids[0]] += 3.0
    assert not torch.equal(lora.get_output_embeddings().weight, lora.base_model.model.lm_head.original_module.weight)
    torch.testing.assert_close(
        score_item_tokens(lora, prompts, ids), _brute_force(lora, prompts, ids), atol=1e-5, rtol=0
    )


def test_shuffled_records_reorder_each_basket_and_map_the_answer():
    """Order augmentation (``history_shuffles``): every copy holds the record's items (history + target) in some
    order, the last one written as an answer; season and region kept; seeded; title+id texts mapped both ways."""
    from causalrec.errors import DataError
    from causalrec.training import PreferenceRecord
    from causalrec.training.records import shuffled_records

    history_text = {f"<item_{j}>": f"mug {j} <item_{j}>" for j in range(8)}  # title+id: history "title token"
    answer = {v: k for k, v in history_text.items()}
    records = [
        PreferenceRecord([history_text[f"<item_{j}>"] for j in range(6)], "<item_6>", season="winter", region="north"),
        PreferenceRecord([history_text["<item_7>"]], "<item_0>", season="summer"),
    ]
    out = shuffled_records(records, 3, 0, answer, history_text)
    assert len(out) == 8 and out[:2] == records  # the records, then 3 copies of each
    for original, copies in ((records[0], out[2:5]), (records[1], out[5:8])):
        basket = sorted([*original.history, history_text[original.target]])
        for copy in copies:
            assert sorted([*copy.history, history_text[copy.target]]) == basket
            assert copy.target in answer.values() and (copy.season, copy.region) == (original.season, original.region)
    assert len({tuple(c.history) for c in out[2:5]}) > 1  # not one order three times
    assert out == shuffled_records(records, 3, 0, answer, history_text)
    assert out != shuffled_records(records, 3, 1, answer, history_text)
    only = shuffled_records(records, 2, 0, answer, history_text, keep_ordered=False)
    assert len(only) == 4 and records[0] not in only
    assert shuffled_records(records, 0, 0, answer, history_text) == records
    with pytest.raises(DataError, match="history_shuffles"):
        shuffled_records(records, -1, 0, answer, history_text)


def test_user_token_goes_first_and_is_never_a_target(setup):
    """``user_token``: the customer's token starts the prompt (before an environment written first), tokenises as
    one token of its own, and sequence SFT never trains on it (it is context, not an item)."""
    from causalrec.data.prompts import ITEM_TOKEN_TEMPLATE
    from causalrec.llm.backbone import build_tokenizer
    from causalrec.llm.items import add_item_tokens, add_user_tokens, user_token, user_token_ids
    from causalrec.training import PreferenceRecord
    from causalrec.training.records import sft_sequence_dataset

    for last, expected in (
        (True, "<user_7> A customer bought, in order: <item_1> <item_2> season winter."),
        (False, "<user_7> season winter. A customer bought, in order: <item_1> <item_2>"),
    ):
        fmt = PromptFormat(template=ITEM_TOKEN_TEMPLATE, separator=" ", environment="season", environment_last=last)
        assert fmt.prompt(["<item_1>", "<item_2>"], "winter", user=user_token(7)) == expected
    tok = build_tokenizer([ITEM_TOKEN_TEMPLATE])
    ids = add_item_tokens(tok, ITEMS)
    users = add_user_tokens(tok, [1, 2, 7])
    assert user_token_ids(tok, [7]) == [users[2]] and len(set(users) | set(ids)) == N_ITEMS + 3
    fmt = PromptFormat(template=ITEM_TOKEN_TEMPLATE, separator=" ", max_history_items=50)
    rec = PreferenceRecord(history=[item_token(j) for j in (3, 5)], target=item_token(9), user=user_token(7))
    row = sft_sequence_dataset([rec], fmt, tok, ids)[0]
    assert row["input_ids"][:2] == [tok.bos_token_id, users[2]]  # one token, right after BOS
    assert [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m] == [ids[4], ids[8], tok.eos_token_id]
    with pytest.raises(Exception, match="user token"):
        add_user_tokens(tok, [7])
    with pytest.raises(Exception, match="lacks user token"):
        user_token_ids(tok, [99])


def test_pretrained_backbone_user_rows_start_at_the_mean_row():
    """Added user tokens of a pretrained backbone start at the mean row of the tokenizer's own tokens (no text), the
    item tokens beside them at their titles' means."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from causalrec.llm.backbone import build_tokenizer
    from causalrec.llm.items import add_item_tokens, add_user_tokens

    titles = ["red mug", "blue scarf wool"]
    tok = build_tokenizer(titles)
    n_old = len(tok)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=n_old, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    own = model.get_input_embeddings().weight[:n_old].detach().clone()
    items, users = add_item_tokens(tok, [1, 2]), add_user_tokens(tok, [1, 2, 3])
    resize_for_items(model, tok, items + users, titles + [None, None, None])
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n_old + 5
    for t in users:
        torch.testing.assert_close(emb[t], own.mean(0))
    pieces = tok(titles[1], add_special_tokens=False).input_ids
    torch.testing.assert_close(emb[items[1]], own[pieces].mean(0))


def test_records_digest_counts_the_user_only_when_prompts_show_it():
    from causalrec.training import PreferenceRecord
    from causalrec.training.stage_cache import digest, records_digest

    plain = PreferenceRecord(history=["a", "b"], target="c", season="winter")
    # the formula every stage key before user tokens was computed with: those stages stay reusable
    assert records_digest([plain]) == digest([[["a", "b"], "c", "winter", "all"]])
    assert records_digest([PreferenceRecord(history=["a", "b"], target="c", season="winter", user="<user_1>")]) not in (
        records_digest([plain]),
        records_digest([PreferenceRecord(history=["a", "b"], target="c", season="winter", user="<user_2>")]),
    )


def test_environment_each_writes_every_history_items_label_before_it():
    from causalrec.data.prompts import ITEM_TOKEN_TEMPLATE

    fmt = PromptFormat(
        template=ITEM_TOKEN_TEMPLATE, separator=" ", max_history_items=2, environment="season", environment_each=True
    )
    history, labels = ["<item_1>", "<item_2>", "<item_3>"], ["winter", "spring", "summer"]
    # the last two items, each after its own season, then the answer's season
    assert fmt.prompt(history, "autumn", history_environments=labels) == (
        "A customer bought, in order: spring <item_2> summer <item_3> autumn"
    )
    assert fmt.prompt([], "autumn") == "A customer bought, in order: autumn"
    with pytest.raises(ConfigError, match="every history item"):
        fmt.prompt(history, "autumn", history_environments=labels[:2])


def test_shuffled_records_keep_each_item_with_its_own_label():
    from causalrec.training import PreferenceRecord
    from causalrec.training.records import shuffled_records

    record = PreferenceRecord(
        history=("a", "b", "c"), target="d", season="autumn", history_environments=("winter", "spring", "summer")
    )
    label_of = {"a": "winter", "b": "spring", "c": "summer", "d": "autumn"}
    same = {k: k for k in "abcd"}
    copies = shuffled_records([record], 6, 0, same, same, environment="season")[1:]
    assert len(copies) == 6 and len({(c.history, c.target) for c in copies}) > 1
    for c in copies:
        assert sorted(c.history + (c.target,)) == ["a", "b", "c", "d"]
        assert list(c.history_environments) == [label_of[h] for h in c.history] and c.season == label_of[c.target]
    with pytest.raises(DataError, match="environment"):
        shuffled_records([record], 1, 0, same, same)
