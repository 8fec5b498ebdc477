"""The whole pipeline through RecBole with ``backbone: <a local Hugging Face directory>``.

The directory holds what a user's Qwen2.5 or Llama 3 download holds, at toy size: a random ``Qwen2ForCausalLM``
(grouped-query attention, untied output layer, a vocabulary padded past the tokenizer's size) or ``LlamaForCausalLM``
(tied, BOS added to every text), and a byte-level BPE tokenizer (``tokenizer.json``, trained with ``tokenizers``)
saved with ``save_pretrained`` without a pad token. Built offline in a temporary directory; nothing downloads.
"""

from __future__ import annotations

import glob
import json
import re

import pytest
import torch
from test_llm_bpe import random_model, train_bpe, wrap
from test_models_llm import TINY, _rebuild

import causalrec
from causalrec.data.prompts import DEFAULT_TEMPLATE, ITEM_TOKEN_TEMPLATE, PromptFormat, completion_text
from causalrec.data.sources.retail_sim import ADJECTIVES, CATEGORIES, MATERIALS, REGION_NAMES
from causalrec.llm.items import item_token

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # each run takes seconds: not marked slow

FAST = {
    **TINY,
    "lora_r": 4,
    "sft_args": {**TINY["sft_args"], "max_steps": 4, "gradient_accumulation_steps": 1},
    "dpo_args": {**TINY["dpo_args"], "max_steps": 2, "gradient_accumulation_steps": 1},
    "dpo_max_samples": 32,
    "sft_patience": 1,
}


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def backbone_dir(request, tmp_path_factory):
    """A model directory as a user downloads it: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json. ``qwen2``: Qwen2ForCausalLM, no BOS, eos ``<|im_end|>`` (transformers loads a qwen2
    directory's tokenizer as ``Qwen2Tokenizer``, whose pad is ``<|endoftext|>``); ``llama3``: LlamaForCausalLM (tied),
    ``<|begin_of_text|>`` before every text and no pad token at all, like Llama 3."""
    words = [f"{a} {m} {noun}" for a in ADJECTIVES for m in MATERIALS[:3] for c in CATEGORIES for noun in c.nouns[:2]]
    text = [
        PromptFormat().prompt(words[:3]),
        ITEM_TOKEN_TEMPLATE,
        DEFAULT_TEMPLATE,
        "season winter spring summer autumn region " + " ".join(REGION_NAMES),
    ]
    style = "qwen" if request.param == "qwen2" else "llama"
    tok = wrap(train_bpe(words + text, vocab_size=800), style, pad=False)
    model = random_model(tok, style, seed=0, sharpen=False)
    where = tmp_path_factory.mktemp("models") / request.param
    model.save_pretrained(where)
    tok.save_pretrained(where)
    assert json.loads((where / "tokenizer_config.json").read_text()).get("pad_token") is None
    arch = "Qwen2ForCausalLM" if style == "qwen" else "LlamaForCausalLM"
    assert json.loads((where / "config.json").read_text())["architectures"] == [arch]
    return where


def _run(model_name: str, where, config: dict):
    """Train and evaluate through RecBole; metrics in [0, 1]; the checkpoint loads strictly into a fresh model built
    from the directory (only LoRA and the trained embedding copies differ) and reproduces the test metrics."""
    from recbole.trainer import Trainer

    result = causalrec.run(model_name, "retail-sim", config_dict=config)
    for name in ("best_valid_result", "test_result"):
        assert result[name] and all(0.0 <= v <= 1.0 for v in result[name].values()), result[name]
    (checkpoint,) = glob.glob(str(where / "saved" / f"{model_name}-*.pth"))
    config, model, fresh, _, valid, test = _rebuild(checkpoint)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(fresh[k], v)]
    assert changed and all("lora_" in k or "modules_to_save" in k for k in changed), changed[:5]
    again = Trainer(config, model).evaluate(test, load_best_model=False)
    for key, value in result["test_result"].items():
        assert again[key] == pytest.approx(value, abs=1e-4), key
    return result, model, valid


@pytest.mark.parametrize("item_repr", ["id", "title+id"])
def test_causal_dpo_with_item_tokens_on_a_pretrained_directory(in_tmp, backbone_dir, item_repr):
    from causalrec.llm.ranking import naive_scores

    result, model, valid = _run("CausalDPO", in_tmp, {**FAST, "backbone": str(backbone_dir), "item_repr": item_repr})
    tok = model.tokenizer
    if backbone_dir.name == "llama3":
        assert type(model.llm.get_base_model()).__name__ == "LlamaForCausalLM"
        assert tok.pad_token == "<|causalrec_pad|>" != tok.eos_token  # the saved tokenizer had none: a real one added
    else:
        assert type(model.llm.get_base_model()).__name__ == "Qwen2ForCausalLM"
        assert tok.pad_token == "<|endoftext|>" != tok.eos_token
    batch = next(iter(valid))[0][:4]
    prompts = model.prompt_ids(batch)
    items = set(model.item_token_ids)
    for text, ids in zip(model.prompts(batch), prompts):
        names = re.findall(r"<item_\d+>", text)  # the history: one token per item, in order
        assert names and [tok.convert_ids_to_tokens(t) for t in ids if t in items] == names
        # the answer is one token right after the prompt's own tokens
        full = tok(text + completion_text(item_token(1)) + tok.eos_token).input_ids
        assert full == ids + [model.item_token_ids[0], tok.eos_token_id]
    scores = model.full_sort_predict(batch)
    assert scores.shape == (4, len(model.titles)) and torch.isneginf(scores[:, 0]).all()
    # with prompt_environment (CausalDPO's default: season) each case sums its environments' prompts; check the
    # per-prompt scores the sum is built from, and the sum against the per-prompt brute force
    per_prompt = model.score_prompts(prompts)[:, 1:]
    brute = naive_scores(model.llm, prompts, [[t] for t in model.item_token_ids], batch_size=64)
    torch.testing.assert_close(per_prompt, brute, atol=1e-5, rtol=0)
    combined = model._combine(torch.cat([torch.full((len(prompts), 1), float("-inf")), brute], 1), batch)
    torch.testing.assert_close(scores, combined, atol=1e-5, rtol=0)
    assert model.llm.get_input_embeddings().weight.shape[0] >= len(tok)


def test_genrec_with_titles_on_a_pretrained_directory(in_tmp, backbone_dir):
    from causalrec.llm.ranking import naive_scores

    result, model, valid = _run("GenRec", in_tmp, {**FAST, "backbone": str(backbone_dir), "item_repr": "title"})
    tok = model.tokenizer
    # titles keep their case: each title's tokens decode back to " " + the title, upper case as in the catalog
    for title, ids in list(zip(model.titles[1:], model.title_tokens))[:20]:
        assert title.isupper() and tok.decode(ids[:-1]) == completion_text(title) and ids[-1] == tok.eos_token_id
    batch = next(iter(valid))[0][:3]
    prompts = model.prompt_ids(batch)
    scores = model.full_sort_predict(batch)
    brute = naive_scores(model.llm, prompts, model.trie, batch_size=64)
    torch.testing.assert_close(scores[:, 1:], brute, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.predict(batch), scores[torch.arange(3), batch[model.ITEM_ID]], atol=1e-4, rtol=0)


def test_genrec_with_semantic_ids_on_a_pretrained_directory(in_tmp, backbone_dir):
    """Code tokens are added to a byte-level BPE tokenizer as whole tokens, train beside LoRA, and rank exactly."""
    from causalrec.llm.ranking import naive_scores
    from causalrec.llm.semantic_ids import code_texts

    config = {**FAST, "backbone": str(backbone_dir), "item_repr": "semantic", "semantic_levels": 2}
    result, model, valid = _run("GenRec", in_tmp, {**config, "semantic_codebook": 4})
    tok = model.tokenizer
    for text, ids in list(zip(code_texts(model.semantic_codes), model.title_tokens))[:20]:
        assert tok.convert_ids_to_tokens(ids[:-1]) == text.split() and ids[-1] == tok.eos_token_id
    batch = next(iter(valid))[0][:3]
    scores = model.full_sort_predict(batch)
    brute = naive_scores(model.llm, model.prompt_ids(batch), model.trie, batch_size=64)
    torch.testing.assert_close(scores[:, 1:], brute, atol=1e-4, rtol=0)


def _item_prompts(n_items: int) -> list[str]:
    fmt = PromptFormat(template=ITEM_TOKEN_TEMPLATE, separator=" ", max_history_items=50)
    return [fmt.prompt([item_token(j) for j in h]) for h in ([3], [1, 5, n_items, 5], list(range(1, n_items + 1)))]


def test_load_backbone_gives_item_tokens_real_rows_and_saves_and_reloads(backbone_dir, tmp_path):
    """``load_backbone`` on the directory: every item row starts at the mean of the real token rows (also those that
    land in the spare rows of qwen2's padded vocabulary), title init gives the mean of the title's rows, and a
    LoRA model saved with ``save_backbone`` reloads with the same one-token items and the same scores."""
    from causalrec.llm.backbone import BackboneConfig, load_backbone, save_backbone
    from causalrec.llm.items import item_token_ids, score_item_tokens
    from causalrec.llm.ranking import naive_scores
    from causalrec.llm.trie import title_token_ids

    n_items = 80
    items = list(range(1, n_items + 1))
    cfg = BackboneConfig(backbone=str(backbone_dir), device="cpu")
    plain, tok = load_backbone(cfg, items=items)
    ids = item_token_ids(tok, items)
    emb = plain.get_input_embeddings().weight
    real = sorted(i for i in tok.get_vocab().values() if i not in set(ids) and i < min(ids))
    torch.testing.assert_close(emb[ids], emb[real].mean(0).expand(len(ids), -1), atol=1e-5, rtol=0)
    if backbone_dir.name == "qwen2":  # padded vocabulary: some item tokens took spare rows, the rest were added
        assert min(ids) < json.loads((backbone_dir / "config.json").read_text())["vocab_size"] < max(ids)
    titles = [f"{a} WOOL MUG" for a in ADJECTIVES] * 4
    titled, tok2 = load_backbone(cfg, items=items, item_init_texts=titles)
    for t, seq in zip(item_token_ids(tok2, items), title_token_ids(tok2, titles)):
        rows = titled.get_input_embeddings().weight
        torch.testing.assert_close(rows[t], rows[seq[:-1]].mean(0), atol=1e-5, rtol=0)

    lora, tok = load_backbone(BackboneConfig(backbone=str(backbone_dir), device="cpu", lora_r=4), items=items)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    prompts = [tok(p).input_ids for p in _item_prompts(n_items)]
    before = score_item_tokens(lora, prompts, ids, pad_token_id=tok.pad_token_id)
    torch.testing.assert_close(before, naive_scores(lora, prompts, [[t] for t in ids]), atol=1e-5, rtol=0)
    save_backbone(lora, tok, tmp_path / "saved")
    again, tok3 = load_backbone(BackboneConfig(backbone=str(tmp_path / "saved"), device="cpu", lora_r=4), items=items)
    assert item_token_ids(tok3, items) == ids
    for text in _item_prompts(n_items):
        full = tok3(text + completion_text(item_token(7)) + tok3.eos_token).input_ids
        assert full == tok(text).input_ids + [ids[6], tok3.eos_token_id]
    torch.testing.assert_close(
        score_item_tokens(again, prompts, ids, pad_token_id=tok3.pad_token_id), before, atol=1e-5, rtol=0
    )
    # the base weights came back too (the DPO reference is the model with adapters disabled), not only the adapter
    with lora.disable_adapter(), again.disable_adapter():
        base_before = score_item_tokens(lora, prompts, ids, pad_token_id=tok.pad_token_id)
        torch.testing.assert_close(
            score_item_tokens(again, prompts, ids, pad_token_id=tok3.pad_token_id), base_before, atol=1e-5, rtol=0
        )
    assert (base_before - before).abs().max() > 1e-2
