"""Tiny offline language models for the training-layer tests (no test functions here).

A 2-layer, hidden-32 ``LlamaForCausalLM`` and a ``PreTrainedTokenizerFast`` over a WordLevel vocabulary with a
Whitespace pre-tokenizer, built from the words of the prompts and titles below. Nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from causalrec.data.prompts import DEFAULT_TEMPLATE

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine thread contention makes a
# training step ~30x slower (measured: 15 S-DPO steps 18 s with default threads, 0.5 s with one).
torch.set_num_threads(1)

TITLES = [
    "red mug",
    "blue cup",
    "green tea pot",
    "paper star",
    "wool scarf",
    "garden gnome",
    "sun hat",
    "beach towel",
    "candle set",
    "snow globe",
    "rain coat",
    "lunch box",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _words() -> list[str]:
    text = DEFAULT_TEMPLATE.replace("{history}", " ; ".join(TITLES))
    return sorted({word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + _words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """Brute force: Σ log p(completion tokens + EOS | prompt) from one plain forward of that sequence alone."""
    prompt_ids = tokenizer(prompt).input_ids
    full_ids = tokenizer(prompt + completion + tokenizer.eos_token).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logprobs[t - 1, full_ids[t]].item() for t in range(len(prompt_ids), len(full_ids)))
