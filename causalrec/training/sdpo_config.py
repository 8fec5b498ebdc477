"""``SDPOConfig``: the settings of S-DPO (multi-negative DPO) on TRL's ``DPOConfig``; the method is in
``sdpo_trainer``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from trl import DPOConfig

from causalrec.errors import ConfigError
from causalrec.training.trl_compat import (
    resolve_device_defaults,
)

logger = logging.getLogger(__name__)

ENV_COLUMNS = ("season", "region")
ALL_NEGATIVES = "all"
CHOSEN_ITEM = "chosen_item"  # column of the chosen item's index in item_token_ids (num_negatives="all")


def env_id_column(name: str) -> str:
    """Integer column/batch key holding the index of environment column ``name`` in its vocabulary."""
    return f"{name}_id"


def require_numbers(config, integers: Sequence[str] = (), numbers: Sequence[str] = ()) -> None:
    """A ConfigError naming each field that is not an integer (``integers``) or a number (``numbers``), so a
    value such as ``beta="high"`` fails with what it must be instead of a TypeError inside a comparison."""
    wrong = [
        f"{name} must be an integer; got {getattr(config, name)!r}"
        for name in integers
        if isinstance(getattr(config, name), bool) or not isinstance(getattr(config, name), int)
    ]
    wrong += [
        f"{name} must be a number; got {getattr(config, name)!r}"
        for name in numbers
        if isinstance(getattr(config, name), bool) or not isinstance(getattr(config, name), (int, float))
    ]
    if wrong:
        raise ConfigError(f"invalid {type(config).__name__}: " + "; ".join(wrong))


@dataclass
class SDPOConfig(DPOConfig):
    r"""
    Configuration class for [`SDPOTrainer`]: S-DPO, DPO with several rejected completions per prompt.

    Only the parameters specific to S-DPO are listed; every [`~trl.DPOConfig`] and
    [`~transformers.TrainingArguments`] field is accepted. Only the sigmoid path of DPO is implemented: `loss_type`
    must stay `["sigmoid"]`, `f_divergence_type` `"reverse_kl"`, `ld_alpha` unset, `use_weighting` and
    `precompute_ref_log_probs` off.

    Parameters:
        num_negatives (`int` or `"all"`, *optional*, defaults to `3`):
            Number J of rejected completions per prompt; every row's `rejected` list must have this length. With
            `1` the loss is TRL's sigmoid DPO loss. `"all"`: every other catalog item (item-token answers; the
            trainer needs `item_token_ids`).

    > Defaults that differ from [`~trl.DPOConfig`]:
    > - `bf16` and `gradient_checkpointing`: on only on a GPU (bf16 only where the GPU supports it), so the same
    >   config runs on a CPU-only machine.
    > - `report_to="none"`, `save_strategy="epoch"`, `save_total_limit=1`, `dataloader_pin_memory` only with CUDA.
    """

    # Fields added to this config or CausalDPOConfig from now on, with the default that trains as before they
    # existed: a stage key holds such a field only away from that default, so the stages cached before it stay
    # found (causalrec.training.stage_cache.training_args_key). Empty: every field so far is in the keys of the
    # stages cached since (CausalDPO's tau_final, invariance_target, mmd_estimator and env_prior came before it).
    KEYED_AWAY_FROM_DEFAULT: ClassVar[dict[str, Any]] = {}

    beta: float = field(
        default=1.0,
        metadata={
            "help": "DPO temperature; 1.0 stays near the SFT model (0.1, TRL's default, lost ~25 % NDCG@10 on "
            "retail-sim)."
        },
    )
    num_negatives: int | str = field(
        default=3,
        metadata={
            "help": "Number J of rejected completions per prompt (1 gives TRL's sigmoid DPO loss), or 'all' "
            "(every other catalog item; item-token answers only)."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Activation checkpointing; unset means on only on a GPU."},
    )
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Integrations to report results and logs to ('none' for none)."}
    )
    save_strategy: str = field(
        default="epoch", metadata={"help": "When to save checkpoints: 'no', 'epoch', 'steps' or 'best'."}
    )
    save_total_limit: int | None = field(default=1, metadata={"help": "How many checkpoints to keep."})
    dataloader_pin_memory: bool = field(
        default_factory=torch.cuda.is_available, metadata={"help": "Pin dataloader memory (default: only with CUDA)."}
    )

    def __post_init__(self):
        resolve_device_defaults(self)
        require_numbers(self, integers=() if self.all_negatives else ("num_negatives",), numbers=("beta",))
        if not self.all_negatives and self.num_negatives < 1:
            raise ConfigError(f"num_negatives must be >= 1 or 'all'; got {self.num_negatives}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0; got {self.beta}")
        loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unsupported = {
            "loss_type": loss_type != ["sigmoid"],
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
            "ld_alpha": self.ld_alpha is not None,
            "use_weighting": self.use_weighting,
            "precompute_ref_log_probs": self.precompute_ref_log_probs,
            "truncation_mode": self.truncation_mode != "keep_start",
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ConfigError(
                f"S-DPO implements only TRL's sigmoid DPO path; unsupported setting(s): {', '.join(bad)}. "
                "Use the DPOConfig defaults for them."
            )
        super().__post_init__()

    @property
    def all_negatives(self) -> bool:
        """Whether every other catalog item is a negative (``num_negatives="all"``)."""
        return self.num_negatives == ALL_NEGATIVES

    @property
    def rows_per_prompt(self) -> int:
        """Sequences one prompt puts through a forward: the chosen one and its J rejected ones (1 with "all")."""
        return 1 if self.all_negatives else 1 + int(self.num_negatives)
