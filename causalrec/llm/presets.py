"""Backbone presets: the defaults that suit what the backbone is.

The model YAMLs' defaults are the ``tiny`` preset: a ~150k-parameter Llama built from scratch, trained in full at
high learning rates in float32. Those settings would damage a pretrained model, so a Hugging Face directory or
hub id gets the ``pretrained`` preset: LoRA (r 16, alpha 32, dropout 0.05, every linear layer), SFT at 1e-4 and
DPO at 5e-6, bf16 weights where the GPU supports it, and per-device batches of 8 with gradient accumulation 4
(32 rows per optimizer step, as the tiny preset) that fit a 24 GB GPU for 0.5-1.5B-parameter models with
activation checkpointing (on by default on a GPU). docs/scale.md has the table.

Precedence, lowest first: the model YAML, the preset, the user's own value (config files, ``--param``, a
``config_dict``). A YAML key whose default is ``~`` takes the preset's value; ``sft_args`` / ``dpo_args`` fields
are overlaid one by one, so a user who sets only ``num_train_epochs`` keeps the preset's learning rate.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_BACKBONE = "tiny"

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "lora_r": 0,
        "lora_alpha": 16,
        "dtype": "float32",
        "sft_args": {},
        "dpo_args": {},
    },
    "pretrained": {
        "lora_r": 16,
        "lora_alpha": 32,
        "dtype": "auto-bf16",  # bfloat16 on a GPU that supports it, else float32 (resolve_dtype)
        "sft_args": {"learning_rate": 1e-4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4},
        "dpo_args": {"learning_rate": 5e-6, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4},
    },
}
# The keys a preset sets outside sft_args / dpo_args (their YAML defaults are ``~``).
BACKBONE_KEYS = ("lora_r", "lora_alpha", "dtype")


def preset_name(backbone: str | None) -> str:
    """``tiny`` for the built-from-scratch default, ``pretrained`` for anything loaded from a directory or hub."""
    return "tiny" if backbone in (None, TINY_BACKBONE) else "pretrained"


def resolve_dtype(value: str) -> str:
    """``auto-bf16``: bfloat16 where a CUDA device supports it, else float32; other values unchanged."""
    if value != "auto-bf16":
        return value
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def backbone_settings(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a run's config) with every unset (None) ``BACKBONE_KEYS`` entry taken from its preset."""
    preset = PRESETS[preset_name(values.get("backbone"))]
    out = dict(values)
    for key in BACKBONE_KEYS:
        if out.get(key) is None:
            out[key] = preset[key]
    out["dtype"] = resolve_dtype(out["dtype"])
    return out


def stage_overlay(backbone: str | None, key: str) -> dict[str, Any]:
    """The preset's ``sft_args`` / ``dpo_args`` fields for ``backbone`` (laid over the YAML's, under the user's)."""
    return dict(PRESETS[preset_name(backbone)].get(key, {}))
