"""Exact full-catalog ranking over the title trie, checked against brute-force per-item scoring."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from causalrec.data.prompts import PromptFormat
from causalrec.errors import DataError
from causalrec.llm.backbone import BackboneConfig, apply_lora, load_backbone
from causalrec.llm.ranking import naive_scores, score_candidates, score_catalog, score_pairs
from causalrec.llm.trie import TitleTrie, title_token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# prefixes of others with EOS ("tea" / "tea pot", "red scarf" / "red scarf wool"), shared
# prefixes ("red ..."), a duplicate ("red scarf" twice), a one-word title
TITLES = [
    "red scarf",
    "red scarf wool",
    "red mug",
    "blue mug",
    "red scarf",
    "green tea pot large",
    "tea",
    "tea pot",
    "pot",
]
FMT = PromptFormat()
HISTORIES = [["red mug"], ["tea", "blue mug", "red scarf wool", "pot", "green tea pot large"], ["pot", "pot"]]


def _sharpen(model, scale=4.0, seed=0):
    """Random init gives near-uniform next-token distributions; sharper ones make the test bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale / max(p.shape[-1], 1) ** 0.5)
    return model


def _gqa_llama(vocab_size: int, attn: str, seed: int = 3):
    """A sharpened 2-layer Llama whose 4 query heads share 2 KV heads, with the given attention implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cfg._attn_implementation = attn
    return _sharpen(LlamaForCausalLM(cfg), seed=seed)


@pytest.fixture(scope="module")
def setup():
    model, tok = load_backbone(
        BackboneConfig(tiny_hidden_size=32, tiny_heads=4, tiny_layers=2), TITLES + [FMT.prompt([])]
    )
    _sharpen(model)
    ids = title_token_ids(tok, TITLES)
    prompts = [tok(FMT.prompt(h)).input_ids for h in HISTORIES]
    assert len({len(p) for p in prompts}) == 3  # different prompt lengths
    return model, tok, TitleTrie.from_token_ids(ids), prompts


def _one_by_one(model, prompt, item):
    """Independent reference: one unpadded forward of prompt + item, log-softmax by hand."""
    ids = torch.tensor([list(prompt) + list(item)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = logits.log_softmax(-1)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(item))


# ------------------------------------------------------------------------------------------ trie


def test_trie_levels_match_a_hand_count():
    seqs = [[1, 2, 9], [1, 2, 3, 9], [1, 4, 9], [5, 9], [1, 2, 9]]
    trie = TitleTrie.from_token_ids(seqs)
    # level 0: 1, 5 | level 1: 1-2, 1-4, 5-9 | level 2: 1-2-9, 1-2-3, 1-4-9 | level 3: 1-2-3-9
    assert [lv.token.tolist() for lv in trie.levels] == [[1, 5], [2, 4, 9], [3, 9, 9], [9]]
    assert [lv.parent_row.tolist() for lv in trie.levels] == [[0, 0], [0, 0, 1], [0, 0, 1], [0]]
    assert [lv.expanded.tolist() for lv in trie.levels] == [[0, 1], [0, 1], [0], []]
    assert [lv.child_ptr.tolist() for lv in trie.levels] == [[0, 2, 3], [0, 2, 3], [0, 1], [0]]
    assert trie.n_nodes == 9 and trie.depth == 4 and len(trie) == 5
    assert trie.item_node[0] == trie.item_node[4]  # duplicate titles share a leaf
    assert len(set(trie.item_node.tolist())) == 4


def test_empty_catalog_and_empty_items_are_errors():
    with pytest.raises(DataError, match="empty"):
        TitleTrie.from_token_ids([])
    with pytest.raises(DataError, match="item 1"):
        TitleTrie.from_token_ids([[1, 2], []])


def test_title_token_ids_end_with_eos_and_follow_the_prompt(setup):
    _, tok, trie, _ = setup
    for title, ids in zip(TITLES, trie.item_tokens):
        assert ids[-1] == tok.eos_token_id
        assert list(ids) == tok(" " + title, add_special_tokens=False).input_ids + [tok.eos_token_id]


# ------------------------------------------------------------------------------------ exactness


def test_naive_reference_equals_one_by_one_forward(setup):
    model, _, trie, prompts = setup
    naive = naive_scores(model, prompts, trie, batch_size=4)  # batched with right padding
    for u, prompt in enumerate(prompts):
        for i in (0, 1, 5, 8):
            assert naive[u, i].item() == pytest.approx(_one_by_one(model, prompt, trie.item_tokens[i]), abs=1e-4)


@pytest.mark.parametrize("method", ["prefix", "rows"])
@pytest.mark.parametrize("batch_size, node_chunk", [(1, 2048), (3, 2048), (1, 2), (2, 3)])
def test_trie_scores_equal_brute_force(setup, method, batch_size, node_chunk):
    model, _, trie, prompts = setup
    naive = naive_scores(model, prompts, trie)
    scores = score_catalog(model, prompts, trie, batch_size=batch_size, node_chunk=node_chunk, method=method)
    assert scores.shape == (len(prompts), len(TITLES))
    assert naive.std() > 1.0  # the model is far from uniform, so equality means something
    torch.testing.assert_close(scores, naive, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores[:, 0], scores[:, 4])  # duplicate titles: same score


def test_items_ending_inside_the_trie_are_scored_exactly(setup):
    """Token sequences without EOS, one a prefix of another: an item may end at an inner node."""
    model, _, _, prompts = setup
    seqs = [[5, 6], [5, 6, 7, 8], [5], [9, 6, 5], [9, 6, 5, 2]]
    trie = TitleTrie.from_token_ids(seqs)
    torch.testing.assert_close(
        score_catalog(model, prompts, trie), naive_scores(model, prompts, seqs), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_query_attention_model_scores_equal_brute_force(setup, attn):
    """4 query heads sharing 2 KV heads, loaded with either attention implementation."""
    _, tok, trie, prompts = setup
    gqa = _gqa_llama(len(tok), attn)
    naive = naive_scores(gqa, prompts, trie)
    for method in ("prefix", "rows"):
        torch.testing.assert_close(
            score_catalog(gqa, prompts, trie, batch_size=2, method=method), naive, atol=1e-4, rtol=0
        )
    assert gqa.config._attn_implementation == attn  # the prefix method switched it back


def test_prefix_method_needs_a_switchable_attention(setup, monkeypatch):
    from causalrec.errors import BackboneError
    from causalrec.llm import ranking

    model, _, trie, prompts = setup
    monkeypatch.setattr(ranking, "supports_prefix_attention", lambda m: False)  # the name the walk looks up
    with pytest.raises(BackboneError, match="method='rows'"):
        score_catalog(model, prompts, trie, method="prefix")
    torch.testing.assert_close(
        score_catalog(model, prompts, trie), naive_scores(model, prompts, trie), atol=1e-4, rtol=0
    )  # auto -> rows
    with pytest.raises(ValueError, match="unknown ranking method"):
        score_catalog(model, prompts, trie, method="fast")


def test_lora_model_scores_equal_brute_force(setup):
    model, tok, trie, prompts = setup
    lora = apply_lora(
        _sharpen(
            load_backbone(BackboneConfig(tiny_hidden_size=32, tiny_heads=4), TITLES + [FMT.prompt([])])[0], seed=1
        ),
        BackboneConfig(lora_r=4),
    )
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    naive = naive_scores(lora, prompts, trie)
    for method in ("prefix", "rows"):
        torch.testing.assert_close(
            score_catalog(lora, prompts, trie, batch_size=2, method=method), naive, atol=1e-4, rtol=0
        )
    with lora.disable_adapter():
        assert (naive_scores(lora, prompts, trie) - naive).abs().max() > 1e-2  # the adapter is in play


def test_gpt2_scores_equal_brute_force(setup):
    """Any HF causal LM: GPT-2 has learned absolute positions and another attention module."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok, trie, prompts = setup
    gpt = _sharpen(
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128)), seed=2
    )
    naive = naive_scores(gpt, prompts, trie)
    for method in ("prefix", "rows"):
        torch.testing.assert_close(
            score_catalog(gpt, prompts, trie, batch_size=3, method=method), naive, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("head_block", [1, 4, 0])
def test_output_layer_blocks_give_the_brute_force_scores(setup, head_block):
    """Blocks of 1 or 4 (user, node) rows split chunks between users and between a parent's children; 0 = no tap."""
    model, _, trie, prompts = setup
    naive = naive_scores(model, prompts, trie)
    for batch_size, node_chunk in ((1, 2048), (3, 5), (2, 3)):
        scores = score_catalog(
            model, prompts, trie, batch_size=batch_size, node_chunk=node_chunk, head_block=head_block
        )
        torch.testing.assert_close(scores, naive, atol=1e-4, rtol=0)


def _lm_head_rows(model, monkeypatch):
    """Rows the output layer projects per call, and the verdicts of the tap's exactness check."""
    from causalrec.llm.kv_cache import OutputTap

    rows, verdicts = [], []
    verify = OutputTap.verify
    monkeypatch.setattr(OutputTap, "verify", lambda self, logits: verdicts.append(verify(self, logits)) or verdicts[-1])
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: rows.append(out.shape[:-1].numel())
    )
    return rows, verdicts, handle


def test_output_tap_projects_blocks_outside_the_model_and_is_removed_after(setup, monkeypatch):
    model, _, trie, prompts = setup
    rows, verdicts, handle = _lm_head_rows(model, monkeypatch)
    score_catalog(model, prompts, trie, batch_size=3, head_block=4)
    handle.remove()
    assert verdicts == [True]  # one prompt pass, the tap is exact for a plain Llama
    # prompt pass (3 rows: logits_to_keep=1) and its check, then one row per model forward (the cut) or <= 4
    internal = sum(len(lv.expanded) for lv in trie.levels)
    assert rows[:2] == [3, 3] and max(rows[2:]) <= 4 and 1 in rows[2:]
    assert sum(r for r in rows[2:] if r != 1) == 3 * internal  # every (user, fed node) projected exactly once
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_output_tap_is_removed_when_the_walk_fails(setup, monkeypatch):
    from causalrec.llm import ranking

    model, _, trie, prompts = setup

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ranking, "_edges", boom)
    with pytest.raises(RuntimeError, match="boom"):
        score_catalog(model, prompts, trie)
    assert not model.get_output_embeddings()._forward_pre_hooks
    monkeypatch.undo()
    torch.testing.assert_close(
        score_catalog(model, prompts, trie), naive_scores(model, prompts, trie), atol=1e-4, rtol=0
    )


def test_models_that_transform_logits_after_the_output_layer_are_not_tapped(setup, monkeypatch):
    """The exactness check, not a list of model names, keeps such models on the plain path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from causalrec.llm.kv_cache import OutputTap

    class ScaledLogits(LlamaForCausalLM):  # e.g. a logit scale applied in forward, with no config key saying so
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5 + 1.0
            return out

    _, tok, trie, prompts = setup
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    scaled = _sharpen(ScaledLogits(cfg), seed=4)
    rows, verdicts, handle = _lm_head_rows(scaled, monkeypatch)
    scores = score_catalog(scaled, prompts, trie, batch_size=2)
    handle.remove()
    assert verdicts == [False, False] and max(rows[2:]) > 4  # two walks (2 + 1 users); the model projects whole chunks
    naive = naive_scores(scaled, prompts, trie)
    torch.testing.assert_close(scores, naive, atol=1e-4, rtol=0)
    assert (
        naive_scores(scaled, prompts, trie) - naive_scores(_sharpen(LlamaForCausalLM(cfg), seed=4), prompts, trie)
    ).abs().max() > 0.1
    cfg.final_logit_softcapping = 30.0  # known post-processing keys switch the tap off without a check
    assert OutputTap(LlamaForCausalLM(cfg)).head is None


def test_probabilities_of_a_complete_catalog_sum_to_at_most_one(setup):
    """Independent sanity check: exp(scores) over distinct titles is a part of one distribution."""
    model, _, trie, prompts = setup
    scores = score_catalog(model, prompts, trie)
    distinct = [i for i, t in enumerate(TITLES) if TITLES.index(t) == i]
    total = scores[:, distinct].exp().sum(1)
    assert bool((total <= 1.0 + 1e-5).all()) and bool((total > 0).all())


# ----------------------------------------------------------------------------------- candidates


def test_candidates_and_pairs_equal_catalog_scores(setup):
    model, _, trie, prompts = setup
    full = score_catalog(model, prompts, trie)
    cand = torch.tensor([[0, 2, 4], [1, 1, 7], [8, 5, 6]])
    torch.testing.assert_close(score_candidates(model, prompts, trie, cand), full.gather(1, cand), atol=1e-4, rtol=0)
    rows_p = [prompts[2], prompts[0], prompts[2], prompts[1]]
    rows_i = [3, 3, 7, 0]
    want = torch.stack([full[2, 3], full[0, 3], full[2, 7], full[1, 0]])
    torch.testing.assert_close(score_pairs(model, rows_p, rows_i, trie), want, atol=1e-4, rtol=0)


def test_scoring_restores_the_training_mode_and_needs_no_grad(setup):
    model, _, trie, prompts = setup
    model.train()
    scores = score_catalog(model, prompts[:1], trie)
    assert model.training and not scores.requires_grad
    model.eval()
    scores[:, 0] = float("-inf")  # RecBole masks the padding item in place


def test_progress_bar_can_be_shown(setup, capsys):
    model, _, trie, prompts = setup
    score_catalog(model, prompts, trie, show_progress=True)
    assert "ranking catalog" in capsys.readouterr().err
    score_catalog(model, prompts, trie, show_progress=False)
    assert "ranking catalog" not in capsys.readouterr().err


def test_empty_prompt_is_an_error(setup):
    model, _, trie, _ = setup
    with pytest.raises(DataError, match="prompt"):
        score_catalog(model, [[]], trie)


# ---------------------------------------------------------------------------------------- speed


def test_speedup_over_naive_at_1000_items():
    """Timing print only (CPU noise makes it no assertion); the scores must still agree."""
    rng = random.Random(0)
    colours = ["red", "blue", "green", "white", "pink", "ivory", "silver", "gold"]
    nouns = [f"n{i}" for i in range(150)]
    extras = [f"x{i}" for i in range(100)]
    titles = [
        " ".join(
            ([rng.choice(colours)] if rng.random() < 0.7 else [])
            + [rng.choice(nouns)]
            + rng.sample(extras, rng.randint(0, 3))
        )
        for _ in range(1000)
    ]
    model, tok = load_backbone(BackboneConfig(), titles + [FMT.prompt([])])
    trie = TitleTrie.from_token_ids(title_token_ids(tok, titles))
    prompts = [tok(FMT.prompt(rng.sample(titles, 10))).input_ids for _ in range(4)]
    score_catalog(model, prompts[:1], trie)  # warm-up
    t0 = time.perf_counter()
    fast = score_catalog(model, prompts, trie, method="prefix")
    t_trie = (time.perf_counter() - t0) / len(prompts)
    t0 = time.perf_counter()
    rows = score_catalog(model, prompts, trie, method="rows")
    t_rows = (time.perf_counter() - t0) / len(prompts)
    t0 = time.perf_counter()
    slow = naive_scores(model, prompts[:1], trie, batch_size=250)
    t_naive = time.perf_counter() - t0
    internal = sum(len(lv.expanded) for lv in trie.levels)
    print(
        f"\n1000 items, {trie.n_nodes} trie nodes ({internal} evaluated), prompt ~{len(prompts[0])} tokens: "
        f"trie {t_trie * 1000:.0f} ms/user (rows method {t_rows * 1000:.0f}), naive {t_naive * 1000:.0f} ms/user, "
        f"speed-up {t_naive / t_trie:.0f}x"
    )
    torch.testing.assert_close(fast[:1], slow, atol=1e-4, rtol=0)
    torch.testing.assert_close(rows, fast, atol=1e-4, rtol=0)
