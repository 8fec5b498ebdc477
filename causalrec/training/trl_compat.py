"""Every coupling of causalrec's training layer to TRL/transformers internals, in one place.

``SDPOTrainer`` overrides the private ``DPOTrainer._compute_loss(model, inputs, return_outputs)`` and
``_prepare_dataset`` of TRL 1.16 and reuses its helpers (``use_adapter``, ``pad``, the fused LM head that
``DPOTrainer.__init__`` installs). ``tests/test_training_preference.py`` pins those signatures, so a TRL
upgrade that moves them fails loudly there instead of silently training the wrong loss.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
from accelerate.utils import is_peft_model
from trl.data_utils import _tokenize, common_prefix_length
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import utils as trl_utils
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import pad, use_adapter

__all__ = [
    "COMPUTE_LOSS_PARAMS",
    "PREPARE_DATASET_PARAMS",
    "backbone_module",
    "capture_last_hidden_state",
    "common_prefix_length",
    "device_defaults",
    "disable_gradient_checkpointing",
    "is_peft_model",
    "labelled_positions_only",
    "pad",
    "reference_context",
    "resolve_device_defaults",
    "sequence_logps",
    "tokenize_text",
    "training_defaults",
    "trl_signature",
    "use_adapter",
]

# The private TRL methods we override, with the parameters we rely on (checked by a test).
COMPUTE_LOSS_PARAMS = ("self", "model", "inputs", "return_outputs")
PREPARE_DATASET_PARAMS = ("self", "dataset", "processing_class", "args", "dataset_name")


def trl_signature(name: str) -> tuple[str, ...]:
    """Parameter names of ``DPOTrainer.<name>`` in the installed TRL (for the pin test)."""
    return tuple(inspect.signature(getattr(DPOTrainer, name)).parameters)


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Token ids of a plain (non-chat) text exactly as TRL's preprocessing tokenises it."""
    return list(_tokenize(tokenizer, text)["input_ids"])


def _gpu_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_defaults() -> dict[str, Any]:
    """causalrec's defaults for any TRL config: safe on a CPU-only box, no trackers, resumable."""
    return {
        "report_to": "none",
        "save_strategy": "epoch",  # a killed run resumes from the last epoch
        "save_total_limit": 1,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }


def device_defaults(
    bf16: bool | None, fp16: bool, gradient_checkpointing: bool | None, activation_checkpointing: bool | None
) -> tuple[bool, bool]:
    """``(bf16, activation_checkpointing)`` for the hardware at hand; explicit (non-None) values are kept.

    TRL defaults ``bf16=True``, which raises on a CPU-only machine, and gradient checkpointing on, which only
    slows a CPU run down. Unset values become: bf16 only on a GPU that supports it, checkpointing only on a GPU.
    ``gradient_checkpointing`` is transformers 5's deprecated alias of ``activation_checkpointing``.
    """
    if bf16 is None:
        bf16 = (not fp16) and _gpu_bf16()
    if activation_checkpointing is None:
        legacy = gradient_checkpointing
        activation_checkpointing = torch.cuda.is_available() if legacy is None else bool(legacy)
    return bool(bf16), bool(activation_checkpointing)


def resolve_device_defaults(args) -> None:
    """Apply ``device_defaults`` to a config in place; call before ``TrainingArguments.__post_init__``.

    The deprecated alias is folded into ``activation_checkpointing`` and cleared, so no warning is raised
    (``TrainingArguments`` mirrors the value back into it).
    """
    args.bf16, args.activation_checkpointing = device_defaults(
        args.bf16, args.fp16, args.gradient_checkpointing, args.activation_checkpointing
    )
    args.gradient_checkpointing = None


def backbone_module(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack whose output has ``last_hidden_state`` (what TRL's fused LM head calls)."""
    if is_peft_model(model):
        model = model.get_base_model()
    return model.base_model


# Device types whose eager kernels take any tile shape: projecting only the labelled positions costs no recompilation.
_EAGER_DEVICES = ("cpu", "mps")


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[None]:
    """Inside the block, TRL's fused LM head projects only the positions that carry a label, on every eager device.

    TRL 1.16 does so ("compact") only where it runs its Triton kernel (CUDA, XPU) and projects every position
    elsewhere, so that compiled backends (Neuron, XLA) keep one tile shape. On a CPU that means the S-DPO step
    projects each row's prompt too (~55 positions per row with item tokens, of which 2 carry labels) and allocates
    a ``[positions, 32768]`` scratch tile per forward. The result is the same quantity either way: positions
    without a label score exactly zero. Only the forward reads the switch (the backward reuses its saved tensors).
    """
    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: original(device) or device.type in _EAGER_DEVICES
    try:
        yield
    finally:
        trl_utils._use_triton = original


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """Sum of log-probabilities of the completion tokens of each row, through TRL's fused LM head.

    Prompt and padding positions have label -100 and contribute exactly zero; only the labelled positions are
    projected onto the vocabulary (``labelled_positions_only``). Returns ``(logps [N], outputs)``.
    """
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    with labelled_positions_only():
        outputs = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, fused_lm_head=True
        )
    seq_len = completion_mask.size(1) - 1
    # Prompt-learning PEFT prepends virtual tokens; keep the positions of the real tokens (as TRL does)
    per_token = outputs.log_probs[:, -seq_len:]
    return per_token.sum(dim=1), outputs


@contextlib.contextmanager
def reference_context(trainer) -> Iterator[torch.nn.Module]:
    """No-grad context yielding the module that computes reference log-probs, exactly as TRL 1.16 chooses it.

    An explicit ``ref_model`` wins; otherwise a PEFT policy with its adapters disabled (or the frozen ``"ref"``
    adapter TRL adds when it is given an already trained adapter).
    """
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        if trainer.ref_model is not None:
            yield trainer.ref_model
        elif is_peft_model(trainer.model):
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                yield trainer.model
        else:  # pragma: no cover - SDPOTrainer always provides a reference
            raise RuntimeError("no reference model: pass ref_model or a peft_config")


@contextlib.contextmanager
def capture_last_hidden_state(module: torch.nn.Module):
    """Record the ``last_hidden_state`` of ``module``'s first forward inside the block (``store["hidden"]``)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        if "hidden" not in store:
            store["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        return None  # returning a tensor would replace the module's output and break TRL's fused LM head

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
