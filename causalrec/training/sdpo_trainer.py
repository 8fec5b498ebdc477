"""S-DPO (multi-negative DPO) on TRL's ``DPOTrainer``: ``SDPOConfig`` + ``SDPOTrainer``.

Data: a ``Dataset`` with ``prompt`` (str), ``chosen`` (str), ``rejected`` (list of ``num_negatives`` str; a plain
str is read as a list of one) and optional ``season``/``region`` (str) environment columns. One training step
runs ONE policy forward over the ``(1 + J) B`` rows ``[chosen(B); rejected_1(B); ...; rejected_J(B)]`` and ONE
no-grad reference forward over the same rows, then

    l_i = -log σ(-log Σ_j exp(β [(π_ij - ref_ij) - (π_ic - ref_ic)]))

with π/ref the summed log-probabilities of the completion tokens only (never prompt or padding). With J = 1
this is TRL's sigmoid DPO loss. The batch reduction is ``reduce_losses`` (the mean here), which
``CausalDPOTrainer`` overrides.

``num_negatives="all"`` (item tokens, ``causalrec.llm.items``): every other catalog item is a negative. The
answer is one item token, so ONE policy forward over the B prompt+chosen rows gives, at each prompt's last
position, ``log π(item | prompt)`` for every item (``trainer(..., item_token_ids=...)``), and one reference
forward the same; the loss above then runs over all N - 1 other items (no ``rejected`` column needed).

Reference model: an explicit ``ref_model``; else, under LoRA (``peft_config``), the policy with adapters
disabled; else a frozen copy of ``model`` made at construction (the SFT model).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOTrainer
from trl.data_utils import is_conversational

from causalrec.errors import ConfigError, DataError, TrainingError
from causalrec.llm.items import MASKED_LOGIT, item_logps_at
from causalrec.training.losses import sdpo_logits, sdpo_loss_from_logits
from causalrec.training.sdpo_config import CHOSEN_ITEM, ENV_COLUMNS, SDPOConfig, env_id_column
from causalrec.training.trl_compat import (
    backbone_module,
    capture_last_hidden_state,
    common_prefix_length,
    is_peft_model,
    pad,
    reference_context,
    sequence_logps,
    tokenize_text,
)
from datasets import Dataset, IterableDataset

logger = logging.getLogger(__name__)


@dataclass
class DataCollatorForMultiPreference(DataCollatorMixin):
    """Pads ``prompt_ids``/``chosen_ids``/``rejected_ids`` (a list of J id lists) into one ``(1 + J) B`` batch.

    Rows are ordered ``[chosen(B); rejected_1(B); ...; rejected_J(B)]`` (TRL's order for J = 1). Returns
    ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on completion tokens only), ``prompt_lengths [B]``
    and, when present in the examples, the integer columns ``[B]`` ``int_columns`` (environments such as
    ``season_id``, and ``chosen_item``). With no rejected completions (``num_negatives="all"``) the batch is the
    B chosen rows.
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    env_columns: tuple[str, ...] = tuple(env_id_column(c) for c in ENV_COLUMNS) + (CHOSEN_ITEM,)
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        n_rejected = {len(ex["rejected_ids"]) for ex in examples}
        if len(n_rejected) != 1:
            raise DataError(f"every row needs the same number of rejected completions; got {sorted(n_rejected)}")
        groups = [[ex["chosen_ids"] for ex in examples]]
        groups += [[ex["rejected_ids"][j] for ex in examples] for j in range(n_rejected.pop())]
        ids, masks = [], []
        for group in groups:
            for ex, completion in zip(examples, group):
                row = ex["prompt_ids"] + completion
                mask = [0] * len(ex["prompt_ids"]) + [1] * len(completion)
                if self.max_length is not None:
                    row, mask = row[: self.max_length], mask[: self.max_length]
                ids.append(torch.tensor(row, dtype=torch.long))
                masks.append(torch.tensor(mask, dtype=torch.long))
        kw = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        out = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, **kw),
            "attention_mask": pad([torch.ones_like(m) for m in masks], padding_value=0, **kw),
            "completion_mask": pad(masks, padding_value=0, **kw),
            "prompt_lengths": torch.tensor([len(ex["prompt_ids"]) for ex in examples], dtype=torch.long),
        }
        for col in self.env_columns:
            if col in examples[0]:
                out[col] = torch.tensor([ex[col] for ex in examples], dtype=torch.long)
        return out


@dataclass
class PreferenceBatch:
    """What one S-DPO forward produced, for ``reduce_losses`` and metrics.

    Attributes:
        chosen_logratios: ``[B]`` policy minus reference summed log-prob of the chosen completion.
        rejected_logratios: ``[B, J]`` the same for each rejected completion (``[B, N]`` over the catalog with
            ``num_negatives="all"``, where ``rejected_mask`` marks the negatives).
        logits: ``[B, J]`` S-DPO logits ``β (rejected - chosen)`` (``MASKED_LOGIT`` where not a negative).
        policy_chosen_logps / policy_rejected_logps: ``[B]`` / ``[B, J]`` policy summed log-probs.
        env: integer environment labels by column (``season_id`` ... ``[B]``), -1 for an unseen value.
        extras: whatever the policy forward captured (``CausalDPOTrainer``: ``prompt_states [B, H]``).
    """

    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    logits: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    env: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]
    rejected_mask: torch.Tensor | None = None

    def rejected_mean(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean of ``[B, J]`` values over each row's negatives."""
        if self.rejected_mask is None:
            return values.mean(dim=1)
        m = self.rejected_mask.to(values.dtype)
        return (values.masked_fill(~self.rejected_mask, 0.0) * m).sum(1) / m.sum(1)

    def rejected_max(self, values: torch.Tensor) -> torch.Tensor:
        """``[B]`` max of ``[B, J]`` values over each row's negatives."""
        if self.rejected_mask is None:
            return values.max(dim=1).values
        return values.masked_fill(~self.rejected_mask, float("-inf")).max(dim=1).values


def environment_vocabularies(dataset) -> dict[str, list[str]]:
    """Sorted distinct values of each environment column present in ``dataset``."""
    return {c: sorted({str(v) for v in dataset[c]}) for c in ENV_COLUMNS if c in dataset.column_names}


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model)
    # TRL's trainers (SFT first) patch ``model.forward`` with a closure over the ORIGINAL model's forward; the
    # copy's patched forward would run the policy's weights whenever it is called without ``fused_lm_head``.
    # Drop it: the copy gets its class forward, and DPOTrainer patches the copy itself.
    if "forward" in vars(ref):
        del ref.forward
    ref.eval()
    ref.requires_grad_(False)
    return ref


class SDPOTrainer(DPOTrainer):
    """S-DPO on TRL's ``DPOTrainer``: one policy and one reference forward per step over all 1 + J completions.

    Args:
        model: the policy (the SFT model), a ``PreTrainedModel`` or ``PeftModel``.
        ref_model: frozen reference; default: adapters disabled under ``peft_config``, else a frozen copy of ``model``.
        args: an ``SDPOConfig``.
        train_dataset / eval_dataset: see the module docstring (``make_preference_dataset`` builds them).
        processing_class: the tokenizer (required: nothing is downloaded).
        data_collator, callbacks, optimizers, peft_config: as for ``DPOTrainer``.
        item_token_ids: the catalog's item-token ids (``num_negatives="all"``: the answer of every row is one of
            them and all the others are its negatives).

    Example::

        trainer = SDPOTrainer(model, args=SDPOConfig("runs/sdpo", num_negatives=3), train_dataset=ds,
                              processing_class=tokenizer, peft_config=LoraConfig(r=8, target_modules="all-linear"))
        trainer.train()
    """

    _tag_names = ["trl", "dpo", "s-dpo", "causalrec"]
    _name = "S-DPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: SDPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        item_token_ids=None,
    ):
        if not isinstance(args, SDPOConfig):
            raise ConfigError(f"{type(self).__name__} needs an SDPOConfig; got {type(args).__name__}")
        if isinstance(model, str):
            raise ConfigError("pass a loaded model (causalrec.llm.backbone.load_backbone), not a model name")
        if processing_class is None:
            raise ConfigError(f"{type(self).__name__} needs processing_class=<tokenizer>")
        if train_dataset is None or isinstance(train_dataset, IterableDataset) or len(train_dataset) == 0:
            raise DataError("the preference training set is missing or empty (a map-style Dataset is required)")
        self.env_vocabs = environment_vocabularies(train_dataset)
        self.item_token_ids = None
        if args.all_negatives:
            if not item_token_ids or len(item_token_ids) < 2:
                raise ConfigError(
                    "num_negatives: all needs item tokens (item_repr: id or title+id) and a catalog of "
                    "at least 2 items: with titles, use a number of sampled negatives"
                )
            self.item_token_ids = torch.as_tensor(list(item_token_ids), dtype=torch.long)
            self._item_column = {int(t): c for c, t in enumerate(self.item_token_ids.tolist())}
        if ref_model is None and peft_config is None and not is_peft_model(model):
            ref_model = _frozen_copy(model)  # the reference is the model as it is now: the SFT model
        if data_collator is None:
            pad_id = processing_class.pad_token_id
            pad_id = processing_class.eos_token_id if pad_id is None else pad_id
            data_collator = DataCollatorForMultiPreference(
                pad_token_id=pad_id, max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of
            )
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )

    # ----------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Tokenise prompt, prompt+chosen and prompt+each rejected (EOS appended) like TRL, keep env columns."""
        if isinstance(dataset, IterableDataset):
            raise DataError(f"{dataset_name}: S-DPO needs a map-style datasets.Dataset")
        if "prompt_ids" in dataset.column_names:  # already prepared
            return dataset
        required = {"prompt", "chosen"} | (set() if args.all_negatives else {"rejected"})
        missing = required - set(dataset.column_names)
        if missing:
            raise DataError(f"{dataset_name} preference dataset lacks column(s) {sorted(missing)}")
        if len(dataset) and is_conversational(dataset[0]):
            raise DataError(f"{dataset_name}: conversational preference data is not supported; use plain text")
        tokenizer = self._tokenizer
        eos, n_neg = tokenizer.eos_token, args.num_negatives

        def tokenize(example):
            if args.all_negatives:
                return self._tokenize_catalog_row(example, dataset_name)
            rejected = example["rejected"]
            rejected = [rejected] if isinstance(rejected, str) else list(rejected)
            if len(rejected) != n_neg:
                raise DataError(
                    f"{dataset_name}: a row has {len(rejected)} rejected completions but num_negatives={n_neg}"
                )
            prompt_ids = tokenize_text(tokenizer, example["prompt"])
            full = [
                tokenize_text(tokenizer, example["prompt"] + (c if c.endswith(eos) else c + eos))
                for c in [example["chosen"], *rejected]
            ]
            # The completion starts where prompt and prompt+completion diverge (tokens may merge at the boundary)
            n_prompt = min(common_prefix_length(prompt_ids, ids) for ids in full)
            out = {
                "prompt_ids": prompt_ids[:n_prompt],
                "chosen_ids": full[0][n_prompt:],
                "rejected_ids": [ids[n_prompt:] for ids in full[1:]],
            }
            return {**out, **self._environment_ids(example)}

        dataset = dataset.map(tokenize, num_proc=args.dataset_num_proc, desc=f"Tokenizing {dataset_name} dataset")
        if args.max_length is not None:  # keep_start truncation would leave no completion token
            before = len(dataset)
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
            if len(dataset) < before:
                logger.warning(
                    "%s: dropped %d rows whose prompt fills max_length=%d",
                    dataset_name,
                    before - len(dataset),
                    args.max_length,
                )
        return dataset

    def _tokenize_catalog_row(self, example, dataset_name: str) -> dict[str, Any]:
        """``num_negatives="all"``: prompt and chosen ids (item token + EOS), the chosen item's column, env ids."""
        tokenizer = self._tokenizer
        eos = tokenizer.eos_token
        prompt_ids = tokenize_text(tokenizer, example["prompt"])
        chosen = example["chosen"]
        full = tokenize_text(tokenizer, example["prompt"] + (chosen if chosen.endswith(eos) else chosen + eos))
        n_prompt = common_prefix_length(prompt_ids, full)
        answer = full[n_prompt:]
        if n_prompt != len(prompt_ids) or not answer or answer[0] not in self._item_column:
            raise DataError(
                f"{dataset_name}: with num_negatives: all the chosen completion must be one item token "
                f"right after the prompt; {chosen!r} is not"
            )
        out = {
            "prompt_ids": prompt_ids,
            "chosen_ids": answer,
            "rejected_ids": [],
            CHOSEN_ITEM: self._item_column[answer[0]],
        }
        return {**out, **self._environment_ids(example)}

    def _environment_ids(self, example) -> dict[str, int]:
        """Each environment column's index in its vocabulary (-1 for a value not seen in training)."""
        ids = {}
        for col, vocab in self.env_vocabs.items():
            value = str(example[col]) if col in example else None
            ids[env_id_column(col)] = vocab.index(value) if value in vocab else -1
        return ids

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [env_id_column(c) for c in self.env_vocabs] + ([CHOSEN_ITEM] if self.args.all_negatives else [])
        self._signature_columns = list(self._signature_columns) + [c for c in extra if c not in self._signature_columns]

    # ----------------------------------------------------------------------------------------- loss
    def _catalog_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_negatives="all"``: ``log p(item | prompt)`` of every item ``[B, N]`` and the prompt states
        ``[B, H]`` (last hidden state at each prompt's last token), from one forward of ``model``. The model's own
        logits are computed at the last position only; the output layer is applied at the prompt ends."""
        unwrapped = self.accelerator.unwrap_model(model)
        with capture_last_hidden_state(backbone_module(unwrapped)) as store:
            model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                use_cache=False,
                logits_to_keep=1,
            )
        ends = inputs["prompt_lengths"] - 1
        logps = item_logps_at(store["hidden"], ends, unwrapped.get_output_embeddings(), self.item_token_ids)
        return logps, store["hidden"][torch.arange(ends.size(0), device=ends.device), ends]

    def _policy_forward(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The one policy forward: summed completion log-probs ``[(1 + J) B]`` and captured extras; with
        ``num_negatives="all"`` the item log-probs ``[B, N]`` and ``prompt_states``."""
        if self.args.all_negatives:
            logps, states = self._catalog_logps(model, inputs)
            return logps, {"prompt_states": states}
        logps, _ = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        return logps, {}

    def _reference_forward(self, inputs) -> torch.Tensor:
        """The one reference forward (no grad): summed completion log-probs ``[(1 + J) B]`` (``[B, N]`` item
        log-probs with ``num_negatives="all"``)."""
        with reference_context(self) as ref:
            if self.args.all_negatives:
                return self._catalog_logps(ref, inputs)[0]
            logps, _ = sequence_logps(ref, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        return logps

    def _batch_environments(self, inputs) -> dict[str, torch.Tensor]:
        """The batch's integer environment columns (``season_id`` ...) that the dataset has."""
        return {env_id_column(c): inputs[env_id_column(c)] for c in self.env_vocabs if env_id_column(c) in inputs}

    def _catalog_batch(self, model, inputs) -> PreferenceBatch:
        """``num_negatives="all"``: the chosen item against every other item of the catalog."""
        policy, extras = self._policy_forward(model, inputs)
        ratios = policy - self._reference_forward(inputs)  # [B, N]
        rows, chosen_col = torch.arange(ratios.size(0), device=ratios.device), inputs[CHOSEN_ITEM]
        others = torch.ones_like(ratios, dtype=torch.bool)
        others[rows, chosen_col] = False
        chosen = ratios[rows, chosen_col]
        return PreferenceBatch(
            chosen_logratios=chosen,
            rejected_logratios=ratios,
            logits=sdpo_logits(chosen, ratios, self.beta).masked_fill(~others, MASKED_LOGIT),
            policy_chosen_logps=policy[rows, chosen_col],
            policy_rejected_logps=policy,
            env=self._batch_environments(inputs),
            extras=extras,
            rejected_mask=others,
        )

    def _preference_batch(self, model, inputs) -> PreferenceBatch:
        if self.args.all_negatives:
            return self._catalog_batch(model, inputs)
        n_prompts = inputs["prompt_lengths"].size(0)
        policy, extras = self._policy_forward(model, inputs)
        reference = self._reference_forward(inputs)
        policy, reference = policy.view(-1, n_prompts), reference.view(-1, n_prompts)  # [1 + J, B]
        chosen, rejected = policy[0] - reference[0], (policy[1:] - reference[1:]).t()
        return PreferenceBatch(
            chosen_logratios=chosen,
            rejected_logratios=rejected,
            logits=sdpo_logits(chosen, rejected, self.beta),
            policy_chosen_logps=policy[0],
            policy_rejected_logps=policy[1:].t(),
            env=self._batch_environments(inputs),
            extras=extras,
        )

    def reduce_losses(self, losses: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
        """Batch loss from the per-sample S-DPO losses ``[B]``: their mean. Override to weight samples."""
        return losses.mean()

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        batch = self._preference_batch(model, inputs)
        losses = sdpo_loss_from_logits(batch.logits)
        loss = self.reduce_losses(losses, batch)
        if not torch.isfinite(loss.detach()):
            raise TrainingError(
                f"{self._name} loss is {loss.item()} at step {self.state.global_step}; lower learning_rate or beta"
            )
        self._log_rewards(batch, mode)
        return (loss, {"per_sample_losses": losses.detach()}) if return_outputs else loss

    def _log_rewards(self, batch: PreferenceBatch, mode: str) -> None:
        """TRL's reward metrics; with J > 1 'rejected' averages all negatives, accuracy needs beating all of them."""
        gather = self.accelerator.gather_for_metrics
        chosen = self.beta * batch.chosen_logratios.detach()
        rejected = self.beta * batch.rejected_logratios.detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen).mean().item())
        metrics["rewards/rejected"].append(gather(batch.rejected_mean(rejected)).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen > batch.rejected_max(rejected)).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen - batch.rejected_mean(rejected)).mean().item())
        metrics["logps/chosen"].append(gather(batch.policy_chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(
            gather(batch.rejected_mean(batch.policy_rejected_logps.detach())).mean().item()
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the loss only (the fused LM head builds no logits)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def make_preference_dataset(
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[Sequence[str]] | None,
    season: Sequence[str] | None = None,
    region: Sequence[str] | None = None,
) -> Dataset:
    """A preference ``Dataset``: ``prompt``, ``chosen``, ``rejected`` (list of str) and optional env columns.
    ``rejected=None``: no ``rejected`` column (``num_negatives="all"``, where the catalog supplies them)."""
    n = len(prompts)
    if not n:
        raise DataError("the preference dataset is empty; the training split has no rows with a history")
    if len(chosen) != n or (rejected is not None and len(rejected) != n):
        raise DataError(f"{n} prompts, {len(chosen)} chosen and {len(rejected)} rejected lists; they must pair up")
    columns: dict[str, list] = {"prompt": list(prompts), "chosen": list(chosen)}
    if rejected is not None:
        rejected = [[r] if isinstance(r, str) else list(r) for r in rejected]
        if len({len(r) for r in rejected}) != 1 or not rejected[0]:
            raise DataError("every row needs the same, non-zero number of rejected completions")
        columns["rejected"] = rejected
    for name, values in (("season", season), ("region", region)):
        if values is not None:
            if len(values) != n:
                raise DataError(f"{len(values)} {name} labels for {n} prompts")
            columns[name] = [str(v) for v in values]
    return Dataset.from_dict(columns)
