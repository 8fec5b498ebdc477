"""Chat templates: prompts wrapped as a user turn then the assistant's, the same in training and ranking."""

from __future__ import annotations

import glob

import pytest
import torch

from causalrec.data.prompts import PromptFormat
from causalrec.errors import CausalRecError, ConfigError
from causalrec.llm.backbone import build_tokenizer
from causalrec.llm.chat import chat_wrapping

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer(template=TEMPLATE):
    tok = build_tokenizer(["a customer bought in order next the buys red mug tea"])
    tok.chat_template = template
    return tok


def test_wrapping_is_the_rendered_template_around_the_prompt():
    tok = _tokenizer()
    prefix, suffix = chat_wrapping(tok, "auto")
    # the tokenizer adds BOS itself, so the template's BOS is dropped (one BOS per prompt, not two)
    assert (prefix, suffix) == ("<|user|> ", " <|end|> <|assistant|>")
    fmt = PromptFormat(prefix=prefix, suffix=suffix)
    text = fmt.prompt(["red mug"])
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": PromptFormat().prompt(["red mug"])}], add_generation_prompt=True, tokenize=False
    )
    assert tok.bos_token + text == rendered
    assert tok(text).input_ids.count(tok.bos_token_id) == 1


def test_modes():
    tok = _tokenizer()
    assert chat_wrapping(tok, "false") == ("", "") and chat_wrapping(tok, False) == ("", "")
    plain = build_tokenizer(["a b"])
    assert chat_wrapping(plain, "auto") == ("", "")
    with pytest.raises(ConfigError, match="no chat template"):
        chat_wrapping(plain, True)
    with pytest.raises(CausalRecError, match="use_chat_template"):
        chat_wrapping(tok, "sometimes")
    with pytest.raises(ConfigError, match="verbatim"):
        chat_wrapping(_tokenizer("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"), "auto")


@pytest.mark.parametrize("item_repr", ["id", "title"])
def test_a_backbone_with_a_chat_template_trains_and_ranks_through_it(in_tmp, tmp_path, item_repr):
    from test_llm_presets import _random_llama_dir
    from test_models_llm import TINY, _rebuild

    import causalrec
    from causalrec.llm.ranking import naive_scores

    directory = _random_llama_dir(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(directory)
    config = {**TINY, "backbone": str(directory), "item_repr": item_repr, "lora_r": 2}
    causalrec.run("GenRec", "retail-sim", config_dict=config)
    (checkpoint,) = glob.glob(str(in_tmp / "saved" / "GenRec-*.pth"))
    _, model, _, _, valid, _ = _rebuild(checkpoint)
    batch = next(iter(valid))[0][:3]
    prompts = model.prompts(batch)
    assert all(p.startswith("<|user|> ") and p.endswith(" <|end|> <|assistant|>") for p in prompts)
    items = [[t] for t in model.item_token_ids] if item_repr == "id" else model.trie
    brute = naive_scores(model.llm, model.prompt_ids(batch), items)
    torch.testing.assert_close(model.full_sort_predict(batch)[:, 1:], brute, atol=1e-4, rtol=0)
