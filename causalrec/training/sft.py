"""Supervised fine-tuning stage (GenRec): TRL's SFTTrainer on prompt/completion pairs, loss on the completion only.

Example::

    ds = make_sft_dataset(prompts, completions)
    args = build_sft_config("runs/sft", num_train_epochs=3, learning_rate=1e-3)
    trainer = run_sft(model, tokenizer, ds, args)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Sequence

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from causalrec.errors import ConfigError, DataError, TrainingError, UnknownNameError
from causalrec.training.stage_cache import check_resume_checkpoint, last_checkpoint
from causalrec.training.trl_compat import device_defaults, training_defaults
from datasets import Dataset

logger = logging.getLogger(__name__)


def make_sft_dataset(
    prompts: Sequence[str],
    completions: Sequence[str],
    season: Sequence[str] | None = None,
    region: Sequence[str] | None = None,
) -> Dataset:
    """A prompt/completion ``Dataset`` (plus optional ``season``/``region`` environment columns)."""
    if len(prompts) != len(completions):
        raise DataError(f"{len(prompts)} prompts but {len(completions)} completions; they must pair up")
    if not prompts:
        raise DataError("the SFT dataset is empty; the training split has no rows with a history")
    columns = {"prompt": list(prompts), "completion": list(completions)}
    for name, values in (("season", season), ("region", region)):
        if values is not None:
            if len(values) != len(prompts):
                raise DataError(f"{len(values)} {name} labels for {len(prompts)} prompts")
            columns[name] = [str(v) for v in values]
    return Dataset.from_dict(columns)


def _valid_fields(config_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls) if f.init]


def build_sft_config(output_dir: str, **hf_args) -> SFTConfig:
    """An ``SFTConfig`` with causalrec's defaults; any ``SFTConfig`` field may be overridden by keyword.

    Defaults: loss on completion tokens only, bf16 only on a GPU that supports it, activation checkpointing only
    on a GPU, no experiment trackers, a checkpoint per epoch (one kept) so a killed run resumes.

    Raises:
        UnknownNameError: a keyword that is not an ``SFTConfig`` field.
    """
    valid = _valid_fields(SFTConfig)
    for key in hf_args:
        if key not in valid:
            raise UnknownNameError("SFT argument", key, valid, more="; see trl.SFTConfig")
    kwargs = {**training_defaults(), "completion_only_loss": True, **hf_args}
    # Resolve hardware-dependent defaults before TrainingArguments validates them (bf16 raises on CPU).
    kwargs["bf16"], kwargs["activation_checkpointing"] = device_defaults(
        kwargs.get("bf16"),
        kwargs.get("fp16", False),
        kwargs.pop("gradient_checkpointing", None),
        kwargs.get("activation_checkpointing"),
    )
    try:
        return SFTConfig(output_dir=str(output_dir), **kwargs)
    except ValueError as err:
        raise ConfigError(f"invalid SFT arguments: {err}") from err


def run_sft(
    model,
    tokenizer,
    train_dataset: Dataset,
    args: SFTConfig,
    eval_dataset: Dataset | None = None,
    callbacks: Iterable[TrainerCallback] = (),
    resume_from_checkpoint: str | bool | None = None,
    peft_config=None,
) -> SFTTrainer:
    """Train ``model`` on ``train_dataset`` (prompt/completion) and return the trained ``SFTTrainer``.

    ``trainer.model`` is the trained model (a ``PeftModel`` when ``peft_config`` is given).

    Raises:
        ConfigError: ``args`` is not an ``SFTConfig``.
        CheckpointError: the checkpoint to resume from has a damaged file (checked before training starts).
        TrainingError: the training loss is not finite.
    """
    if not isinstance(args, SFTConfig):
        raise ConfigError(f"run_sft needs an SFTConfig (see build_sft_config); got {type(args).__name__}")
    missing = {"prompt", "completion"} - set(train_dataset.column_names)
    if missing:
        raise DataError(f"SFT dataset lacks column(s) {sorted(missing)}; build it with make_sft_dataset")
    if resume_from_checkpoint is True:  # the newest complete checkpoint; none: transformers says so
        resume_from_checkpoint = last_checkpoint(args.output_dir) or True
    elif resume_from_checkpoint:
        check_resume_checkpoint(resume_from_checkpoint)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if not math.isfinite(result.training_loss):
        raise TrainingError(
            f"SFT diverged (training loss {result.training_loss}); lower learning_rate or enable gradient clipping"
        )
    logger.info("SFT finished: %d steps, training loss %.4f", trainer.state.global_step, result.training_loss)
    return trainer


# ------------------------------------------------------------------------------ invariance in SFT
ENVIRONMENT_COLUMN = "environment"


class InvariantSFTTrainer(SFTTrainer):
    """TRL's SFT with a V-REx penalty: ``loss = SFT loss + lambda_inv * Var_e(R_e)``, where ``R_e`` is the mean, over
    the batch's rows of environment ``e``, of each row's mean target-token NLL, and the variance runs over the
    environments present in the batch (``causalrec.training.environments``).

    The train dataset carries an integer ``environment`` column (0..n_environments-1); the collator passes it
    through and the loss consumes it. The SFT loss itself is TRL's, computed by TRL's own forward (recorded, not
    repeated), so ``lambda_inv = 0`` trains exactly as ``SFTTrainer``. Rows are needed one per sequence: packing
    and padding-free batches are refused."""

    def __init__(self, *args, n_environments: int, lambda_inv: float, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.packing or self.args.padding_free:
            raise ConfigError("sft_vrex needs one row per sequence: turn off packing and padding_free in sft_args")
        if self.label_smoother is not None or self.compute_loss_func is not None:
            # those paths score the rows without the per-token log-probabilities the penalty is built from
            raise ConfigError("sft_vrex needs TRL's own SFT loss: unset label_smoothing_factor in sft_args")
        if ENVIRONMENT_COLUMN not in self.train_dataset.column_names:
            raise DataError(f"InvariantSFTTrainer's train dataset needs an integer {ENVIRONMENT_COLUMN!r} column")
        self.n_environments, self.lambda_inv = int(n_environments), float(lambda_inv)
        self.data_collator = _KeepEnvironment(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if ENVIRONMENT_COLUMN not in self._signature_columns:  # else Trainer drops the column as unused
            self._signature_columns = [*self._signature_columns, ENVIRONMENT_COLUMN]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from causalrec.training.environments import active_environments, environment_risks, label_assign, vrex_penalty

        labels = inputs.pop(ENVIRONMENT_COLUMN, None)
        if labels is None:  # rows without labels (an evaluation set): plain SFT loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        recorder = _FirstOutputs(model)
        result = super().compute_loss(recorder, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        out = recorder.outputs
        tokens = out.label_mask.sum(dim=-1)
        rows = tokens > 0
        per_row = -out.log_probs.sum(dim=-1)[rows] / tokens[rows]
        q = label_assign(labels.to(per_row.device)[rows], self.n_environments)
        penalty = vrex_penalty(environment_risks(per_row, q), active_environments(q))
        if num_items_in_batch is not None:  # TRL's loss is then a share of the accumulated batch: so is this
            penalty = penalty / self.current_gradient_accumulation_steps
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["vrex_penalty"].append(float(penalty.detach()))
        loss = loss + self.lambda_inv * penalty
        return (loss, result[1]) if return_outputs else loss


class _FirstOutputs:
    """Calls the model and keeps the outputs of its first call (TRL's fused forward, with per-token log-probs)."""

    def __init__(self, model):
        self.model, self.outputs = model, None

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if self.outputs is None:
            self.outputs = out
        return out

    def __getattr__(self, name: str) -> Any:  # anything else TRL asks of the model
        return getattr(self.model, name)


class _KeepEnvironment:
    """TRL's collator, plus the rows' ``environment`` labels as a tensor (TRL's collator keeps only its fields)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        labels = [int(e[ENVIRONMENT_COLUMN]) for e in examples]
        batch = self.collator([{k: v for k, v in e.items() if k != ENVIRONMENT_COLUMN} for e in examples])
        batch[ENVIRONMENT_COLUMN] = torch.tensor(labels, dtype=torch.long)
        return batch
