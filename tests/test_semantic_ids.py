"""Semantic ids (``item_repr: semantic``): residual k-means codes, and the LLM models ranking items by them."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_models_llm import TINY, _rebuild, _run_saved

import causalrec
from causalrec.errors import CausalRecError
from causalrec.llm import semantic_ids as sid

SEMANTIC = dict(TINY, item_repr="semantic", semantic_levels=2, semantic_codebook=4)


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 far-apart groups, each of the same 4 tight subgroups (offsets from the group's centre) of 5 points: rows,
    group and subgroup of each row."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(4), 20)
    sub = np.tile(np.repeat(np.arange(4), 5), 4)
    centres = 100.0 * np.eye(4)
    offsets = 10.0 * np.eye(4)
    rows = centres[group] + offsets[sub] + rng.normal(scale=0.1, size=(80, 4))
    return rows, group, sub


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_level_zero_finds_the_groups_and_level_one_the_subgroups_in_what_is_left():
    rows, group, sub = _planted()
    codes = sid.residual_kmeans(rows, levels=2, codebook_size=4, seed=0)
    assert _same_partition(codes[:, 0], group)
    # level 1 clusters what the group centroids leave: the subgroup offsets, the same in every group
    assert _same_partition(codes[:, 1], sub)
    # the 5 points of a subgroup share both codes: a collision level ranks them 0..4 in row order
    assert codes.shape == (80, 3)
    for g in range(4):
        for s in range(4):
            members = np.flatnonzero((group == g) & (sub == s))
            assert codes[members, 2].tolist() == [0, 1, 2, 3, 4]
    assert len({tuple(r) for r in codes.tolist()}) == 80


def test_no_collision_level_where_the_codes_already_tell_every_row_apart(caplog):
    rows = np.eye(4)
    codes = sid.residual_kmeans(rows, levels=1, codebook_size=4)
    assert codes.shape == (4, 1) and sorted(codes[:, 0].tolist()) == [0, 1, 2, 3]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("tied,warned", [(2, False), (3, True)])
def test_a_warning_names_the_codebook_when_most_items_are_told_apart_only_by_the_collision_level(caplog, tied, warned):
    # 5 rows: ``tied`` of them the same point (they collide), the rest apart; one level of 4 codes
    rows = np.array([[0.0, 0.0]] * tied + [[10.0, 0.0], [0.0, 10.0], [10.0, 10.0]][: 5 - tied])
    codes = sid.residual_kmeans(rows, levels=1, codebook_size=4)
    assert codes[:tied, 1].tolist() == list(range(tied))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warnings) is warned  # 2 of 5 share their code: below half; 3 of 5: above
    assert all(f"{tied} of 5 items" in w and "semantic_codebook" in w for w in warnings)


def test_codes_are_the_same_on_every_call_and_written_as_one_token_per_level():
    rows, *_ = _planted(1)
    a = sid.residual_kmeans(rows, 2, 4, seed=3)
    assert np.array_equal(a, sid.residual_kmeans(rows, 2, 4, seed=3))
    texts = sid.code_texts(a[:2])
    assert texts[0] == " ".join(f"<c{level}_{c}>" for level, c in enumerate(a[0]))
    vocab = sid.code_vocabulary(a)
    assert len(vocab) == sum(len(set(a[:, level])) for level in range(a.shape[1]))
    assert all(tok in vocab for text in sid.code_texts(a) for tok in text.split())


def test_interaction_embeddings_are_the_scaled_columns_svd():
    # users x items; items 0 and 1 are bought by the same customers, item 3 by nobody
    m = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0]], dtype=float))
    x = sid.interaction_embeddings(m, dim=2)
    assert x.shape == (4, 2)
    np.testing.assert_allclose(x[0], x[1], atol=1e-9)
    np.testing.assert_allclose(x[3], 0.0)
    np.testing.assert_allclose(np.linalg.norm(x[:3], axis=1), 1.0)
    # against a hand computation: the scaled item-user matrix's top-2 SVD reproduces its item Gram matrix
    d = m.toarray()
    scaled = d / np.sqrt(np.outer(d.sum(1), np.maximum(d.sum(0), 1)))
    u, s, vt = np.linalg.svd(scaled.T, full_matrices=False)
    top = u[:, :2] * s[:2]
    top = top / np.where(np.linalg.norm(top, axis=1, keepdims=True) > 0, np.linalg.norm(top, axis=1, keepdims=True), 1)
    np.testing.assert_allclose(x @ x.T, top @ top.T, atol=1e-6)


def test_title_embeddings_put_titles_that_share_words_together():
    titles = ["red wool hat", "red wool scarf", "blue glass vase", "blue glass bowl"]
    x = sid.title_embeddings(titles, dim=2)
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[1, 3]


def test_bad_settings_are_named():
    with pytest.raises(CausalRecError, match="semantic_codebook"):
        sid.residual_kmeans(np.eye(3), levels=1, codebook_size=1)
    with pytest.raises(CausalRecError, match="at least 2 items"):
        sid.title_embeddings(["one"])


def test_sequence_sft_rows_target_every_code_of_every_item_after_the_first():
    from causalrec.data.prompts import DEFAULT_TEMPLATE, PromptFormat, completion_text
    from causalrec.llm.backbone import build_tokenizer
    from causalrec.llm.items import add_code_tokens
    from causalrec.training import PreferenceRecord
    from causalrec.training.records import sft_sequence_dataset

    codes = np.array([[0, 1], [1, 0], [1, 1]])
    texts = sid.code_texts(codes)
    fmt = PromptFormat(template=DEFAULT_TEMPLATE, separator="; ", max_history_items=20)
    tok = build_tokenizer([fmt.prompt([])], max_length=128)
    ids = add_code_tokens(tok, sid.code_vocabulary(codes))
    c = dict(zip(sid.code_vocabulary(codes), ids))  # "<c0_1>" -> its id
    rec = PreferenceRecord(history=[texts[0], texts[1], texts[1]], target=texts[2])
    row = sft_sequence_dataset([rec], fmt, tok, ids, tokens_per_item=2)[0]
    tokens, mask = row["input_ids"], row["completion_mask"]
    assert tokens == tok(fmt.prompt(rec.history) + completion_text(rec.target) + tok.eos_token).input_ids
    targets = [t for t, m in zip(tokens, mask) if m]
    # items 2 and 3 of the history (both codes each), the answer's codes and EOS; never item 1, ';' or a template word
    assert targets == [c["<c0_1>"], c["<c1_0>"], c["<c0_1>"], c["<c1_0>"], c["<c0_1>"], c["<c1_1>"], tok.eos_token_id]
    with pytest.raises(CausalRecError, match="items of 3 token"):
        sft_sequence_dataset([rec], fmt, tok, ids, tokens_per_item=3)


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory):
    return _run_saved(tmp_path_factory.mktemp("genrec_semantic"), dict(SEMANTIC))


def test_semantic_model_ranks_the_catalog_by_its_codes_equal_to_brute_force(semantic_run, in_tmp):
    from causalrec.llm.ranking import naive_scores

    result, checkpoint = semantic_run
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    config, model, fresh, _, valid, _ = _rebuild(checkpoint)
    codes = model.semantic_codes
    assert len(codes) == len(model.titles) - 1 and len({tuple(r) for r in codes.tolist()}) == len(codes)
    # each item is its codes: one added token per code, then EOS, and the history writes items the same way
    assert all(len(t) == codes.shape[1] + 1 for t in model.title_tokens)
    tokens = model.tokenizer.convert_ids_to_tokens(model.title_tokens[0][:-1])
    assert tokens == [f"<c{level}_{c}>" for level, c in enumerate(codes[0])]
    batch = next(iter(valid))[0][:4]
    seq, n = batch[model.ITEM_SEQ][0].tolist(), int(batch[model.ITEM_SEQ_LEN][0])
    assert "; ".join(model.item_texts[j] for j in seq[:n][-20:]) in model.prompts(batch)[0]
    scores = model.full_sort_predict(batch)
    assert scores.shape == (4, len(model.titles)) and torch.isneginf(scores[:, 0]).all()
    brute = naive_scores(model.llm, model.prompt_ids(batch), model.title_tokens)
    torch.testing.assert_close(scores[:, 1:], brute, atol=1e-4, rtol=0)
    # the checkpoint's model rebuilt its codes and reproduces the run's validation
    from recbole.trainer import Trainer

    valid_result = Trainer(config, model).evaluate(valid, load_best_model=False)
    for key, value in result["best_valid_result"].items():
        assert valid_result[key] == pytest.approx(value, abs=1e-4), key


def test_codes_from_titles_differ_from_codes_from_interactions(in_tmp):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model

    from causalrec.recbole.quick_start import make_config

    GenRec = get_model("GenRec")

    config = make_config("GenRec", "retail-sim", config_dict=dict(SEMANTIC, semantic_source="title"))
    train, *_ = data_preparation(config, create_dataset(config))
    by_title = GenRec(config, train._dataset).semantic_codes
    config["semantic_source"] = "interactions"
    by_buyers = GenRec(config, train._dataset).semantic_codes
    assert not np.array_equal(by_title[:, :2], by_buyers[:, :2])


def _random_encoder_dir(folder, texts):
    """A random BERT sentence encoder saved as a local directory, with a word-level tokenizer over ``texts``."""
    from transformers import BertConfig, BertModel

    from causalrec.llm.backbone import build_tokenizer

    tok = build_tokenizer(texts)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_codes_from_a_sentence_encoder_are_the_codes_of_its_title_embeddings(in_tmp):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model

    from causalrec.llm.grounding import SentenceEmbedder
    from causalrec.recbole.quick_start import make_config

    config = make_config("GenRec", "retail-sim", config_dict=SEMANTIC)
    train, *_ = data_preparation(config, create_dataset(config))
    titles = get_model("GenRec")(config, train._dataset).titles[1:]
    encoder = _random_encoder_dir(in_tmp / "encoder", titles)
    config["semantic_source"], config["semantic_encoder"] = "sentence", str(encoder)
    codes = get_model("GenRec")(config, train._dataset).semantic_codes
    by_hand = sid.residual_kmeans(SentenceEmbedder(encoder)(titles).astype(np.float64), 2, 4, seed=config["seed"])
    np.testing.assert_array_equal(codes, by_hand)
    assert len({tuple(r) for r in codes.tolist()}) == len(titles)


def test_a_missing_sentence_encoder_is_refused_before_the_data_is_prepared(in_tmp, monkeypatch):
    monkeypatch.setenv("CAUSALREC_CACHE", str(in_tmp / "cache"))
    extra = dict(SEMANTIC, semantic_source="sentence", semantic_encoder=str(in_tmp / "no-such-encoder"))
    with pytest.raises(CausalRecError, match=r"sentence encoder .*no-such-encoder.*no config.json") as err:
        causalrec.run("GenRec", "retail-sim", config_dict=extra)
    assert err.value.exit_code == 2 and not (in_tmp / "cache").exists()


def test_sdporec_trains_on_semantic_ids_with_sampled_negatives(in_tmp):
    result = causalrec.run("SDPORec", "retail-sim", config_dict=dict(SEMANTIC, num_negatives=2))
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"num_negatives": "all"}, "item tokens"),
        ({"prompt_environment": "season", "environment_position": "each"}, "item_repr: id"),
        ({"semantic_source": "text"}, "interactions"),
    ],
)
def test_what_semantic_ids_cannot_do_is_refused_before_training(in_tmp, extra, match):
    model = "SDPORec" if "num_negatives" in extra else "GenRec"
    with pytest.raises(CausalRecError, match=match):
        causalrec.run(model, "retail-sim", config_dict=dict(SEMANTIC, **extra))
