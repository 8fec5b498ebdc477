"""Chat templates: an instruct backbone sees its prompts the way it was tuned, as a user turn then the assistant's.

``chat_wrapping(tokenizer)`` renders the tokenizer's template around a placeholder user message with the generation
prompt (``apply_chat_template(..., add_generation_prompt=True)``) and returns the text before and after it. Every
prompt (SFT, DPO, ranking) is then ``prefix + prompt + suffix`` (``PromptFormat.prefix`` / ``suffix``) and the
answer follows as before (`` TITLE`` + EOS, or `` <item_j>``), so SFT's completion-only loss, the preference rows
and the ranking's prompt/answer boundary all see the same text, and the trie's exactness holds unchanged
(``tests/test_llm_bpe.py``). A leading BOS in the rendered text is dropped when the tokenizer adds BOS itself
(Llama 3), so a prompt starts with one BOS, not two.
"""

from __future__ import annotations

from causalrec.errors import ConfigError

CHAT_CHOICES = ("auto", "true", "false")
_PLACEHOLDER = "\u2063causalrec_Prompt\u2063"  # invisible separators: no template writes this itself


def chat_mode(value) -> str:
    """``use_chat_template`` as one of ``CHAT_CHOICES`` (YAML may give a bool)."""
    text = {True: "true", False: "false", None: "auto"}.get(value, value)
    text = str(text).lower()
    if text not in CHAT_CHOICES:
        from causalrec.errors import UnknownNameError

        raise UnknownNameError("use_chat_template", value, CHAT_CHOICES)
    return text


def chat_wrapping(tokenizer, mode: str = "auto") -> tuple[str, str]:
    """``(prefix, suffix)`` of the tokenizer's chat template around one user message; ``("", "")`` when the
    template is off (``false``) or missing (``auto``). ``true`` without a template is a ConfigError."""
    mode = chat_mode(mode)
    template = getattr(tokenizer, "chat_template", None)
    if mode == "false" or (mode == "auto" and not template):
        return "", ""
    if not template:
        raise ConfigError(
            "use_chat_template: true, but the backbone's tokenizer has no chat template "
            "(the tiny backbone never has one); use auto or false"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True, tokenize=False
    )
    if rendered.count(_PLACEHOLDER) != 1:
        raise ConfigError(
            "the tokenizer's chat template does not write a user message verbatim; set use_chat_template: false"
        )
    prefix, suffix = rendered.split(_PLACEHOLDER)
    bos = tokenizer.bos_token
    if bos and prefix.startswith(bos):
        adds_bos = tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
        if adds_bos:
            prefix = prefix[len(bos) :]
    return prefix, suffix
