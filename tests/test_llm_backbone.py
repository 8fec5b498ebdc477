"""Backbone: the offline tiny Llama and its tokenizer, loading HF directories, LoRA, clear errors."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from causalrec.data.prompts import PromptFormat, completion_text
from causalrec.errors import BackboneError, ConfigError
from causalrec.llm.backbone import BackboneConfig, build_tiny_llama, build_tokenizer, load_backbone, save_backbone
from causalrec.llm.trie import title_token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TITLES = ["WHITE HANGING HEART T-LIGHT HOLDER", "Red scarf", "Red scarf; wool", "SET OF 12 PENCILS", "tea", "tea pot"]
CORPUS = TITLES + [PromptFormat().prompt([])]
SMALL = dict(tiny_hidden_size=32, tiny_heads=2, tiny_intermediate_size=64)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneConfig(**SMALL), CORPUS)


def _logits(model, tokenizer, text="a customer bought: red scarf"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_vocabulary_is_exactly_the_corpus_words():
    tok = build_tokenizer(["Red scarf", "Blue mug: large", "red MUG"])
    # lower-cased words and single punctuation marks: red scarf blue mug : large -> 6, plus 4 specials
    assert len(tok) == 10
    assert set(tok.get_vocab()) == {"<pad>", "<s>", "</s>", "<unk>", "red", "scarf", "blue", "mug", ":", "large"}
    assert tok.convert_ids_to_tokens(tok("order: scarf;").input_ids) == ["<s>", "<unk>", ":", "scarf", "<unk>"]


def test_punctuation_is_split_and_only_bos_is_added():
    tok = build_tokenizer(CORPUS)
    ids = tok("in order: Red scarf; wool").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "in", "order", ":", "red", "scarf", ";", "wool"]
    assert tok.eos_token_id not in ids
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_prompt_plus_completion_tokenises_as_concatenation():
    """TRL tokenises prompt and prompt + completion + eos separately; the split must be clean."""
    tok = build_tokenizer(CORPUS)
    fmt = PromptFormat()
    ids = title_token_ids(tok, TITLES)
    for n, title in enumerate(TITLES):
        prompt = fmt.prompt(TITLES[:n] or [TITLES[-1]])
        p = tok(prompt).input_ids
        full = tok(prompt + completion_text(title) + tok.eos_token).input_ids
        tail = tok(completion_text(title), add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert full == p + tail
        assert ids[n] == tail
        assert tok.unk_token_id not in full


def test_empty_corpus_is_a_clear_error():
    with pytest.raises(BackboneError, match="empty"):
        build_tokenizer(["", "   "])
    with pytest.raises(BackboneError, match="empty"):
        load_backbone(BackboneConfig(**SMALL), [])


# ---------------------------------------------------------------------------------- tiny model


def test_tiny_llama_has_the_configured_size_and_is_seeded():
    tok = build_tokenizer(["Red scarf", "Blue mug: large", "red MUG"])  # 10 tokens
    cfg = BackboneConfig(tiny_hidden_size=32, tiny_heads=2, tiny_layers=2, tiny_intermediate_size=128)
    model = build_tiny_llama(tok, cfg)
    V, H, I, L = 10, 32, 128, 2
    # tied embedding + per layer (q, k, v, o; gate, up, down; two RMSNorms) + final norm
    expected = V * H + L * (4 * H * H + 3 * H * I + 2 * H) + H
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    same = build_tiny_llama(tok, cfg)
    other = build_tiny_llama(tok, BackboneConfig(tiny_hidden_size=32, tiny_heads=2, tiny_intermediate_size=128, seed=1))
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, same.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(w, other.model.layers[0].self_attn.q_proj.weight)


def test_tiny_dropout_acts_only_in_training_and_leaves_the_weights_and_the_stage_key_of_no_dropout():
    from causalrec.training.stage_cache import backbone_identity

    tok = build_tokenizer(["Red scarf", "Blue mug: large", "red MUG"])
    plain = build_tiny_llama(tok, BackboneConfig(tiny_hidden_size=16, tiny_heads=2, tiny_layers=1))
    dropped = build_tiny_llama(tok, BackboneConfig(tiny_hidden_size=16, tiny_heads=2, tiny_layers=1, tiny_dropout=0.5))
    assert dropped.config.attention_dropout == 0.5
    ids = torch.tensor([[1, 4, 5, 6, 7, 2]])
    for a, b in zip(plain.parameters(), dropped.parameters(), strict=True):
        assert torch.equal(a, b)  # dropout draws nothing at init
    dropped.eval()
    torch.testing.assert_close(dropped(ids).logits, plain.eval()(ids).logits, atol=0, rtol=0)
    dropped.train()
    torch.manual_seed(0)
    first = dropped(ids).logits
    assert not torch.equal(first, dropped(ids).logits)  # a new mask each forward
    # half the embedding entries zeroed, the rest scaled by 2: the hook's output in training mode
    embedded = dropped.get_input_embeddings()(ids)
    zero = embedded == 0
    assert 0.3 < zero.float().mean() < 0.7
    torch.testing.assert_close(embedded[~zero], 2 * plain.get_input_embeddings()(ids)[~zero])
    # at its default the key leaves it out (stages trained before it keep their keys); set, it is in the key
    assert "tiny_dropout" not in backbone_identity(BackboneConfig())
    assert backbone_identity(BackboneConfig(tiny_dropout=0.2))["tiny_dropout"] == 0.2


def test_a_pretrained_backbone_ignores_the_tiny_settings_says_so_and_keeps_them_out_of_its_stage_key(
    tiny, tmp_path, caplog
):
    from causalrec.training.stage_cache import backbone_identity

    save_backbone(*tiny, tmp_path)
    moved = BackboneConfig(backbone=str(tmp_path), tiny_hidden_size=128, tiny_dropout=0.1, lora_r=0)
    assert moved.ignored_tiny_settings() == ["tiny_hidden_size", "tiny_dropout"]
    assert BackboneConfig(tiny_hidden_size=128).ignored_tiny_settings() == []  # they shape the tiny Llama
    assert backbone_identity(moved) == backbone_identity(BackboneConfig(backbone=str(tmp_path), lora_r=0))
    assert "tiny_layers" in backbone_identity(BackboneConfig())
    with caplog.at_level("WARNING", logger="causalrec.llm.backbone"):
        model, _ = load_backbone(moved)
    assert model.config.hidden_size == 32  # the saved model's, not tiny_hidden_size
    assert "tiny_hidden_size, tiny_dropout shape the tiny Llama only: ignored with backbone" in caplog.text


def test_load_backbone_tiny_returns_model_on_cpu(tiny):
    model, tok = tiny
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).device.type == "cpu"
    assert model.config.vocab_size == len(tok)
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------- loading from a path


def test_saved_tiny_model_loads_by_path_with_identical_outputs(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_backbone(BackboneConfig(backbone=str(tmp_path / "m")))
    assert ltok("tea pot").input_ids == tok("tea pot").input_ids
    assert ltok.eos_token_id == tok.eos_token_id and ltok.pad_token_id == tok.pad_token_id
    assert torch.allclose(_logits(loaded, ltok), _logits(model, tok), atol=1e-6)
    assert any(p.name.endswith(".safetensors") for p in (tmp_path / "m").iterdir())


def test_gpt2_directory_loads_as_a_causal_lm(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer(CORPUS)
    gpt = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128, eos_token_id=tok.eos_token_id)
    )
    gpt.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, ltok = load_backbone(BackboneConfig(backbone=str(tmp_path)))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert torch.allclose(_logits(model, ltok), _logits(gpt.eval(), tok), atol=1e-6)


def test_missing_pad_gets_a_real_token_and_missing_eos_is_an_error(tiny, tmp_path):
    from causalrec.llm.backbone import ADDED_PAD

    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok2 = build_tokenizer(CORPUS)
    tok2.pad_token = None
    tok2.save_pretrained(tmp_path)
    llm, loaded = load_backbone(BackboneConfig(backbone=str(tmp_path), lora_r=0))
    assert loaded.pad_token == ADDED_PAD and loaded.pad_token_id != loaded.eos_token_id
    emb = llm.get_input_embeddings().weight
    assert emb.shape[0] == len(loaded) == len(tok) + 1  # one new row: the exact mean of the old ones
    torch.testing.assert_close(emb[loaded.pad_token_id], emb[:-1].mean(0))

    tok2.eos_token = None
    tok2.save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="eos_token"):
        load_backbone(BackboneConfig(backbone=str(tmp_path)))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(BackboneConfig(backbone=str(tmp_path / "no" / "such" / "model")))
    with pytest.raises(BackboneError, match="config.json"):
        load_backbone(BackboneConfig(backbone=str(tmp_path)))  # a directory, but no model in it


def test_hub_id_not_on_disk_fails_offline_without_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="cannot load backbone"):
        load_backbone(BackboneConfig(backbone="causalrec-test/no-such-model"))


def test_non_causal_model_directory_names_its_architecture(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="BertForMaskedLM.*not a causal language model"):
        load_backbone(BackboneConfig(backbone=str(tmp_path)))


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_freezes_the_base_and_trains_only_adapters():
    model, _ = load_backbone(BackboneConfig(lora_r=4, lora_alpha=8, **SMALL), CORPUS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert frozen and not any("lora_" in n for n in frozen)
    assert not any("lm_head" in n for n in trainable)
    # "all-linear": q, k, v, o, gate, up, down in each of the 2 layers, A and B each
    assert len(trainable) == 2 * 7 * 2


def test_lora_adapters_start_from_the_configs_seed_whatever_ran_before():
    # peft draws lora_A from torch's global generator; apply_lora seeds it by cfg.seed and leaves the caller's RNG
    # as it was (unseeded, two runs of one config trained different adapters, which looked like an accumulation bug)
    def adapters(seed, draws_before):
        torch.manual_seed(123)
        torch.rand(draws_before)
        state = torch.get_rng_state()
        model, _ = load_backbone(BackboneConfig(lora_r=4, **{**SMALL, "seed": seed}), CORPUS)
        assert torch.equal(torch.get_rng_state(), state)
        return torch.cat([p.detach().flatten() for n, p in sorted(model.named_parameters()) if "lora_A" in n])

    first = adapters(0, 1)
    assert torch.equal(first, adapters(0, 1000)) and first.abs().sum() > 0
    assert not torch.equal(first, adapters(1, 1))


def test_lora_on_lm_head_is_refused():
    with pytest.raises(ConfigError, match="lm_head"):
        BackboneConfig(lora_r=4, target_modules=["q_proj", "lm_head"])
    assert BackboneConfig(target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]


def test_lora_model_saves_and_reloads_with_same_outputs(tmp_path):
    model, tok = load_backbone(BackboneConfig(lora_r=4, target_modules=["q_proj", "v_proj"], **SMALL), CORPUS)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    save_backbone(model, tok, tmp_path / "lora")
    loaded, ltok = load_backbone(BackboneConfig(backbone=str(tmp_path / "lora")))
    assert hasattr(loaded, "peft_config")
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    assert torch.allclose(_logits(loaded.eval(), ltok), _logits(model, tok), atol=1e-5)
    with loaded.disable_adapter():  # the adapter changes the outputs, so it really was reloaded
        assert not torch.allclose(_logits(loaded, ltok), _logits(model, tok), atol=1e-3)


# ------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="float8"), "dtype"),
        (dict(tiny_hidden_size=30, tiny_heads=4), "divide"),
        (dict(lora_r=-1), "lora_r"),
        (dict(lora_dropout=1.5), "lora_dropout"),
        (dict(tiny_dropout=1.0), "tiny_dropout"),
        (dict(tiny_dropout=-0.1), "tiny_dropout"),
        (dict(backbone=""), "backbone"),
        (dict(load_in_4bit=True, load_in_8bit=True, backbone="x/y"), "one of"),
    ],
)
def test_bad_config_values_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BackboneConfig(**kwargs)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_quantisation_without_bitsandbytes_is_a_clear_error(tiny, tmp_path):
    model, tok = tiny
    save_backbone(model, tok, tmp_path)
    with pytest.raises(BackboneError, match="bitsandbytes"):
        load_backbone(BackboneConfig(backbone=str(tmp_path), load_in_4bit=True))


def test_from_dict_ignores_foreign_keys():
    cfg = BackboneConfig.from_dict({"backbone": "tiny", "lora_r": 8, "learning_rate": 1e-3, "epochs": 2})
    assert cfg.lora_r == 8 and cfg.backbone == "tiny"
