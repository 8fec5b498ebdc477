"""``LLMTrainer``: RecBole's Trainer for causalrec's LLM recommenders; ``fit`` runs the TRL stages.

Stages: SFT (TRL's ``SFTTrainer``), then, for models with an ``alignment``, S-DPO or CausalDPO on sampled
negatives with the SFT model as reference. After each stage the model is evaluated on the validation split
with RecBole's evaluator and ``callback_fn(stage_index, valid_score)`` is called (Optuna pruning); both stage
scores are kept in ``trainer.stage_results`` (the final, aligned model is the result: stages are never swapped).
Evaluation, checkpoint loading and testing are RecBole's own.

Stage checkpoints (``causalrec.training.stage_cache.StageCache``): a finished stage is saved as ``model.safetensors`` + ``stage.json`` under
``<stage_cache_dir>/<stage>-<key16>/``, where the key is a SHA-256 of everything that shapes the trained weights
(training rows, item titles, prompt format, backbone settings, the stage's TRL arguments, seed, library
versions; for the preference stage also the SFT key, negatives and method arguments). A later run with the same
key loads the stage instead of training it, so GenRec, SDPORec and CausalDPO with identical SFT settings share
one SFT run. With ``resume: true`` (``causalrec run --resume``) the TRL stages also write step checkpoints
(``<stage>-<key16>.partial/checkpoint-N``) and an interrupted stage continues from its last complete one.

Under ``accelerate launch`` / ``torchrun`` (several processes, one ``torch.distributed`` group that TRL/accelerate
create from the first stage's arguments) every process trains every stage (DDP), but only the main process (rank 0)
takes the stage cache's lock, decides "load or train" and broadcasts the decision, installs a finished stage,
validates, saves the RecBole checkpoint and evaluates; the other processes' ``evaluate`` returns None. A stage key
also covers the number of processes (N processes train another global batch than one).

Only recbole and the standard library are imported at module level (``import causalrec`` stays fast);
transformers/TRL are imported when training starts.

Why this module is long: ``fit`` is one state machine over the stages (records, keys, the cache's load-or-train decision shared across processes, validation, saving); its argument building is in ``stage_args.py``, the cache in ``training/stage_cache.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from typing import Any, Callable

from recbole.trainer import Trainer

from causalrec.io import digest
from causalrec.recbole import stage_args
from causalrec.recbole.settings import SEQUENCE_PATIENCE, VALIDATE_STAGES, validate_stages_problem
from causalrec.training.loss_guard import guard_training_losses
from causalrec.training.stage_cache import (
    STAGE_FORMAT,
    StageCache,
    backbone_identity,
    last_checkpoint,
    library_versions,
    load_stage,
    records_digest,
    training_args_key,
)

_log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- processes
def process_rank() -> tuple[int, int]:
    """``(rank, number of processes)`` of this run: ``torch.distributed``'s once a process group exists
    (TRL/accelerate create it when the first stage's TRL arguments are built), before that what the launcher
    (``torchrun``, ``accelerate launch``) put in ``RANK``/``WORLD_SIZE``; ``(0, 1)`` in a plain process.
    Rank 0 is the main process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK") or 0), int(os.environ.get("WORLD_SIZE") or 1)


def _broadcast(value: Any) -> Any:
    """The main process's ``value`` in every process (a pickled object over the process group)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------- trainer
def _epoch_validation(score: Callable[[], float], patience: int, bigger: bool):
    """A ``TrainerCallback`` that validates after every epoch, keeps the best epoch's weights (``best_state``) and
    stops training after ``patience`` epochs without a better score: SFT's early stopping, as RecBole's
    ``stopping_step`` does for the classical models."""
    import torch
    from transformers import TrainerCallback

    class EpochValidation(TrainerCallback):
        def __init__(self):
            self.scores: list[float] = []
            self.best_epoch, self.best_state = None, None

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            value = float(score())
            self.scores.append(value)
            best = None if self.best_epoch is None else self.scores[self.best_epoch]
            if best is None or (value > best if bigger else value < best):
                self.best_epoch = len(self.scores) - 1
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif len(self.scores) - 1 - self.best_epoch >= patience:
                control.should_training_stop = True
            _log.info(
                "SFT epoch %d: valid %.4f (best %.4f at epoch %d)",
                len(self.scores),
                value,
                self.scores[self.best_epoch],
                self.best_epoch + 1,
            )
            return control

        def restore_best(self, model) -> None:
            if self.best_state is not None:
                with torch.no_grad():
                    model.load_state_dict(self.best_state)

    return EpochValidation()


def prompt_key(fmt) -> dict[str, Any]:
    """A prompt format in a stage key; ``environment_each`` only when set, so stages keyed before it stay valid."""
    key = dataclasses.asdict(fmt)
    if not key["environment_each"]:
        del key["environment_each"]
    return key


@dataclasses.dataclass
class _Stage:
    name: str
    key: str
    inputs: dict[str, Any]
    args: Any  # the stage's TRL config; output_dir is set when the stage runs
    train: Callable[[Any, str | None], tuple[int, float]]  # (args, resume_from) -> (global_step, training_loss)


class LLMTrainer(Trainer):
    """Trains an ``LLMRecommender`` with TRL; evaluates and saves the RecBole way.

    RecBole config keys read here: ``sft_args`` (``SFTConfig`` fields), ``dpo_args`` (``SDPOConfig`` /
    ``CausalDPOConfig`` fields), the model's ``method_keys``, ``negative_strategy``, ``num_negatives``,
    ``sft_max_samples``, ``dpo_max_samples``, ``seed``, and ``RUN_KEYS`` (stage cache and resume).

    Attributes:
        stage_results: after ``fit``, one dict per stage: ``stage``, ``key`` (16 hex), ``reused`` (loaded from
            the stage cache), ``resumed_from_step``, ``global_step``, ``training_loss``, ``train_seconds``,
            ``valid_score``, ``valid_result``, ``directory`` (the stage checkpoint); with SFT's epoch validation
            (``sft_patience``) also ``epoch_valid_scores`` and ``best_epoch`` (1-based, the weights kept).
    """

    stage_results: list[dict[str, Any]]

    def _setting(self, key: str) -> Any:
        return stage_args.setting(self.config, key)

    # ---------------------------------------------------------------------------- records
    def _records(self, dataset, show_progress: bool = False):
        """One ``PreferenceRecord`` per training row (history and target written as the model's ``item_repr``
        says, season, region)."""
        import numpy as np
        from tqdm.auto import tqdm

        from causalrec.training import PreferenceRecord

        model, feat, cfg = self.model, dataset.inter_feat, self.config
        seqs = feat[cfg["ITEM_ID_FIELD"] + cfg["LIST_SUFFIX"]].numpy()
        lens = feat[cfg["ITEM_LIST_LENGTH_FIELD"]].numpy()
        targets = feat[cfg["ITEM_ID_FIELD"]].numpy()
        envs = {}
        for name in ("season", "region"):
            if name in feat.columns:
                vocab = dataset.field2id_token[name]
                envs[name] = [str(vocab[i]) for i in feat[name].numpy()]
            else:
                envs[name] = ["all"] * len(targets)
        users = feat[cfg["USER_ID_FIELD"]].numpy()
        labels = None
        if model.prompt_format.environment_each:
            labels = model.history_environment_texts(seqs, lens, feat[model.history_env_field])
        records = []
        for r in tqdm(range(len(targets)), desc="building records", unit="row", disable=not show_progress):
            history = [model.item_texts[i] for i in seqs[r, : int(lens[r])] if i]
            records.append(
                PreferenceRecord(
                    history=history,
                    target=model.answers[int(targets[r])],
                    season=envs["season"][r],
                    region=envs["region"][r],
                    user=model.user_text(users[r]),
                    history_environments=None if labels is None else labels[r],
                )
            )
        return records, np.asarray(targets, dtype=np.int64)

    def _sequence_windows(self, dataset):  # -> numpy.ndarray
        """Rows whose histories tile each user's training sequence (``sft_positions: all``): the user's last row,
        then the row ``max_history_items`` positions before it, and so on (rows are in time order per user)."""
        import numpy as np

        feat, cfg = dataset.inter_feat, self.config
        users = feat[cfg["USER_ID_FIELD"]].numpy()
        lengths = feat[cfg["ITEM_LIST_LENGTH_FIELD"]].numpy()
        time_field = cfg["TIME_FIELD"]
        times = feat[time_field].numpy() if time_field in feat.columns else np.zeros(len(users))
        order = np.lexsort((np.arange(len(users)), lengths, times, users))  # by user, then time order
        window = self.model.prompt_format.max_history_items
        keep = []
        starts = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1]])
        for rows in np.split(order, starts[1:]):
            keep.extend(rows[::-1][::window].tolist())
        return np.sort(np.asarray(keep, dtype=np.int64))

    def _order_augmented(self, records):
        """``history_shuffles`` random orders of every SFT record's items besides the record (order augmentation,
        ``training.records.shuffled_records``); the records themselves when it is 0."""
        from causalrec.training.records import shuffled_records

        copies = int(self.config["history_shuffles"] or 0)
        if not copies:
            return records
        model = self.model
        answer_of = dict(zip(model.item_texts[1:], model.answers[1:]))
        history_text_of = dict(zip(model.answers[1:], model.item_texts[1:]))
        return shuffled_records(
            records,
            copies,
            int(self.config["seed"]),
            answer_of,
            history_text_of,
            environment=model.prompt_format.environment,
        )

    def _valid_identity(self, valid_data) -> str:
        """Digest of the validation cases (users, histories, targets, environments)."""
        feat = valid_data._dataset.inter_feat
        return digest({c: feat[c].tolist() for c in sorted(feat.columns)})

    def _validation_ranking(self, valid_data) -> dict[str, Any]:
        """How SFT's epoch validation ranks, beyond its cases and prompts: the epoch it keeps depends on it, so its
        stage key holds it. Recorded only away from the ranking that keys before it assumed (each case's own
        known environment, the training prior, no re-ranking, history not masked): the weights of the validation
        cases where the environment settings change them (``environment_inference: marginal`` on a validation
        month whose season trains, ``environment_prior: uniform``), ``context_rerank``, ``mask_history``,
        ``rank_orders`` and ``repeat_mix``."""
        import torch

        model, cfg, out = self.model, self.config, {}
        if model.environments:
            feat = valid_data._dataset.inter_feat
            weights = model.environment_weights(feat)
            assumed = model.environment_weights(feat, inference="observed", log_prior=model.env_train_log_prior)
            if not torch.equal(weights, assumed):
                out["environment_weights"] = digest(weights.tolist())
        if cfg["context_rerank"]:
            out["context_rerank"] = [cfg["context_rerank"], float(cfg["context_rerank_alpha"] or 1.0)]
        if cfg["mask_history"]:
            out["mask_history"] = True
        if model.rank_orders:
            out["rank_orders"] = model.rank_orders
        if model.repeat_mix:
            out["repeat_mix"] = model.repeat_mix
        return out

    def _capped(self, records, targets, key: str):
        """At most ``config[key]`` rows (a seeded sample in time order); all rows when the key is None."""
        import numpy as np

        cap = self.config[key]
        if cap is None or len(records) <= int(cap):
            return records, targets
        keep = np.sort(np.random.default_rng(int(self.config["seed"])).choice(len(records), int(cap), replace=False))
        return [records[i] for i in keep], targets[keep]

    def _user_value(self, key: str) -> Any:
        """What the user set for ``key`` (config files, ``--param``, ``config_dict``), not the YAML's default."""
        external = getattr(self.config, "external_config_dict", None)
        return external.get(key) if external is not None else self.config[key]

    def _user_values(self) -> dict[str, Any]:
        return {key: self._user_value(key) for key in ("sft_args", "dpo_args")}

    def _sft_args(self, output_dir: str, show_progress: bool):
        return stage_args.sft_config(
            self.config, self._user_values(), self.model.sft_positions, output_dir, show_progress
        )

    def _align_args(self, output_dir: str, show_progress: bool):
        return stage_args.alignment_config(
            self.config, self._user_values(), type(self.model), output_dir, show_progress
        )

    # ------------------------------------------------------------------------------- keys
    def _sft_inputs(self, records, args) -> dict[str, Any]:
        model = self.model
        return {
            "format": STAGE_FORMAT,
            "stage": "sft",
            "records": records_digest(records),
            "rows": len(records),
            "titles": digest(list(model.titles)),
            "item_repr": model.item_repr,
            "positions": model.sft_positions,
            "prompt": prompt_key(model.prompt_format),
            "backbone": backbone_identity(model.backbone_config),
            "args": training_args_key(args),
            "seed": int(self.config["seed"]),
            "versions": library_versions(),
        }

    def _align_inputs(self, sft_key: str, records, args) -> dict[str, Any]:
        cfg = self.config
        return {
            "format": STAGE_FORMAT,
            "stage": self.model.alignment,
            "sft": sft_key,
            "records": records_digest(records),
            "rows": len(records),
            "negatives": {
                "strategy": cfg["negative_strategy"],
                "num_negatives": cfg["num_negatives"],
                "seed": int(cfg["seed"]),
            },
            "args": training_args_key(args),
            "versions": library_versions(),
        }

    # ----------------------------------------------------------------------------- stages
    def _sft_patience(self, valid_data) -> int | None:
        """``sft_patience``: epochs without a better validation score before SFT stops (None: no epoch validation).
        Unset: ``SEQUENCE_PATIENCE`` for sequence SFT (its validation costs one forward per case), none for titles
        (a title-trie validation per epoch costs minutes). One process only: every process would have to agree."""
        value = self.config["sft_patience"]
        if value is None:
            value = SEQUENCE_PATIENCE if self.model.sft_positions == "all" else None
        if value is None or not valid_data or process_rank()[1] > 1:
            return None
        return int(value)

    def _sft(
        self, records, args, resume_from: str | None, valid_data=None, patience: int | None = None
    ) -> tuple[int, float]:
        from trl import SFTTrainer

        from causalrec.training import sft_dataset
        from causalrec.training.records import sft_sequence_dataset
        from causalrec.training.sft import ENVIRONMENT_COLUMN, InvariantSFTTrainer

        model = self.model
        if model.sft_positions == "all":
            data = sft_sequence_dataset(
                records, model.prompt_format, model.tokenizer, model.sequence_token_ids, model.tokens_per_item
            )
        else:
            data = sft_dataset(records, model.prompt_format)
        stopper = None
        if patience is not None:
            stopper = _epoch_validation(
                lambda: self._valid_epoch(valid_data)[0], patience, bool(self.config["valid_metric_bigger"])
            )
        common = dict(
            model=model.llm,
            args=args,
            processing_class=model.tokenizer,
            callbacks=[stopper] if stopper else None,
        )
        vrex = self._sft_vrex()
        if vrex > 0:  # the rows' environments ride along as a column that the penalty reads
            source = self.config["sft_env_source"]
            index = {name: i for i, name in enumerate(sorted({getattr(r, source) for r in records}))}
            if len(index) < 2:
                _log.warning("sft_vrex: the SFT rows have one %s (%s); the penalty is zero", source, list(index))
            data = data.add_column(ENVIRONMENT_COLUMN, [index[getattr(r, source)] for r in records])
            trainer = InvariantSFTTrainer(**common, train_dataset=data, n_environments=len(index), lambda_inv=vrex)
        else:
            trainer = SFTTrainer(**common, train_dataset=data)
        guard_training_losses(trainer, "SFT")
        result = trainer.train(resume_from_checkpoint=resume_from)
        if stopper is not None:
            stopper.restore_best(trainer.model)
            self._stage_extra = {"epoch_valid_scores": stopper.scores, "best_epoch": stopper.best_epoch + 1}
        self.model.llm = trainer.model
        return trainer.state.global_step, float(result.training_loss)

    def _negatives(self, records, targets, show_progress: bool):
        import numpy as np

        from causalrec.data.prompts import ENVIRONMENT_NEGATIVES, sample_negatives

        cfg, model = self.config, self.model
        if cfg["num_negatives"] == "all":  # every other catalog item, scored by the trainer's own forward
            return None
        rng = np.random.default_rng(int(cfg["seed"]))
        n_items = len(model.titles)
        scorer = None
        if cfg["negative_strategy"] == "hard":
            prompts = model.encode_prompts([r.prompt(model.prompt_format) for r in records])

            def scorer(rows):
                return (
                    model.score_prompts([prompts[r] for r in rows], show_progress=show_progress).float().cpu().numpy()
                )

        popularity, groups = np.bincount(targets, minlength=n_items), None
        field = ENVIRONMENT_NEGATIVES.get(cfg["negative_strategy"])
        if field is not None:  # popularity within each row's own environment
            labels = [getattr(r, field) for r in records]
            names = sorted(set(labels))
            groups = np.array([names.index(v) for v in labels], dtype=np.int64)
            popularity = np.stack([np.bincount(targets[groups == g], minlength=n_items) for g in range(len(names))])
        return sample_negatives(
            targets,
            n_items,
            int(cfg["num_negatives"]),
            cfg["negative_strategy"],
            rng=rng,
            popularity=popularity,
            scorer=scorer,
            groups=groups,
        )

    def _align(self, records, targets, args, resume_from: str | None, show_progress: bool) -> tuple[int, float]:
        from causalrec.training import CausalDPOTrainer, SDPOTrainer, preference_dataset

        negatives = self._negatives(records, targets, show_progress)
        answers = self.model.answers
        if negatives is not None:  # everything else of the record (user, history labels) stays
            records = [
                dataclasses.replace(r, negatives=[answers[j] for j in neg])
                for r, neg in zip(records, negatives.tolist())
            ]
        trainer_cls = CausalDPOTrainer if self.model.alignment == "causal_dpo" else SDPOTrainer
        trainer = trainer_cls(
            self.model.llm,
            args=args,
            train_dataset=preference_dataset(records, self.model.prompt_format),
            processing_class=self.model.tokenizer,
            item_token_ids=self.model.item_token_ids or None,
        )
        guard_training_losses(trainer, trainer_cls._name)
        result = trainer.train(resume_from_checkpoint=resume_from)
        _log.info(
            "%s finished: %d steps, training loss %.4f",
            trainer_cls.__name__,
            trainer.state.global_step,
            result.training_loss,
        )
        recovery = trainer.environment_recovery() if isinstance(trainer, CausalDPOTrainer) else {}
        if recovery:  # latent environments: how much of the labelled seasons / regions they found
            _log.info("CausalDPO latent environments vs the labels: %s", {k: round(v, 3) for k, v in recovery.items()})
            self._stage_extra = {"environment_recovery": recovery}
        llm = trainer.model
        if hasattr(llm, "peft_config") and "ref" in llm.peft_config:
            # TRL's frozen copy of the SFT adapter served as the reference; it is not part of the model, and
            # keeping it would make checkpoints unloadable into a fresh instance.
            llm.delete_adapter("ref")
        self.model.llm = llm
        return trainer.state.global_step, float(result.training_loss)

    def _plan(self, cache: StageCache, stage: _Stage) -> dict[str, Any]:
        """Load or train (main process, holding the stage's lock): ``{"action": "load", "directory": ...}`` or
        ``{"action": "train", "resume_from": checkpoint or None}``; a stale partial run is removed."""
        found = cache.find(stage.name, stage.key) if self._setting("stage_cache") else None
        if found is not None:
            return {"action": "load", "directory": str(found)}
        work = cache.work_dir(stage.name, stage.key)
        resume_from = last_checkpoint(work) if self._setting("resume") else None
        if resume_from is None:
            shutil.rmtree(work, ignore_errors=True)  # a stale partial run: start afresh
        return {"action": "train", "resume_from": resume_from}

    def _share_plan(self, plan: dict[str, Any] | None, stage: _Stage, rank: int) -> dict[str, Any]:
        """The main process's plan in every process; a process whose stage key differs is an error (its rows,
        titles or arguments differ, so DDP would silently average gradients of different problems)."""
        from causalrec.errors import TrainingError

        shared = _broadcast(None if plan is None else {**plan, "key": stage.key})
        if shared["key"] != stage.key:
            raise TrainingError(
                f"process {rank} built other {stage.name} training inputs than the main process (stage key "
                f"{stage.key[:16]}, main {shared['key'][:16]}): every process must see the same data, config and "
                f"backbone; launch them from one config and one data_cache_dir"
            )
        return shared

    def _run_stage(self, cache: StageCache, stage: _Stage) -> dict[str, Any]:
        """Load the stage from the cache, or train it (continuing from its last checkpoint with ``resume``).

        One process: under the stage's lock, so concurrent runs train a stage once. Several processes (one
        DDP run): the main process holds the lock and decides, every process loads or trains, the main process
        installs the finished stage, then all meet at a barrier.
        """
        rank, world = process_rank()
        main = rank == 0
        with cache.lock(stage.name, stage.key) if main else contextlib.nullcontext():
            plan = self._plan(cache, stage) if main else None
            if world > 1:
                plan = self._share_plan(plan, stage, rank)
            info = self._execute(cache, stage, plan, install=main)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the stage is installed (or loaded) everywhere before any process goes on
        return info

    def _execute(self, cache: StageCache, stage: _Stage, plan: dict[str, Any], install: bool) -> dict[str, Any]:
        info: dict[str, Any] = {
            "stage": stage.name,
            "key": stage.key[:16],
            "reused": False,
            "resumed_from_step": None,
            "train_seconds": 0.0,
        }
        if plan["action"] == "load":
            meta = load_stage(plan["directory"], self.model.llm, key=stage.key)
            info.update(
                reused=True,
                directory=plan["directory"],
                global_step=meta.get("global_step"),
                training_loss=meta.get("training_loss"),
            )
            _log.info(
                "stage %s: loaded %s (trained by %s), not trained again",
                stage.name,
                plan["directory"],
                meta.get("model"),
            )
            return info
        resume_from = plan["resume_from"]
        if resume_from is not None:
            info["resumed_from_step"] = int(resume_from.rsplit("-", 1)[1])
            _log.info("stage %s: resuming from %s", stage.name, resume_from)
        work = cache.work_dir(stage.name, stage.key)
        stage.args.output_dir = str(work)
        start = time.perf_counter()
        global_step, loss = stage.train(stage.args, resume_from)
        info.update(global_step=global_step, training_loss=loss, train_seconds=time.perf_counter() - start)
        info.update(self.__dict__.pop("_stage_extra", {}))  # SFT's per-epoch validation, if it ran
        if install:
            if self._setting("stage_cache"):
                meta = {
                    "model": self.config["model"],
                    "inputs": stage.inputs,
                    "global_step": global_step,
                    "training_loss": loss,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                info["directory"] = str(cache.install(stage.name, stage.key, self.model.llm, meta))
            shutil.rmtree(work, ignore_errors=True)  # the finished stage replaces its step checkpoints
        return info

    def _sft_vrex(self) -> float:
        """The SFT stage's V-REx weight (``sft_vrex``; 0: plain SFT)."""
        return float(self.config["sft_vrex"] or 0.0)

    def _keep_best_stage(self, stages: list[_Stage]) -> tuple[float, dict]:
        """``validate_stages: best``: reload the stage with the best validation score (the earliest on a tie) when
        it is not the last one; marks it ``selected`` in ``stage_results`` and returns its validation."""
        scores = [info["valid_score"] for info in self.stage_results]
        sign = 1 if self.config["valid_metric_bigger"] else -1
        best = max(range(len(scores)), key=lambda i: (sign * scores[i], -i))
        chosen = self.stage_results[best]
        chosen["selected"] = True
        if best != len(stages) - 1:
            load_stage(chosen["directory"], self.model.llm, key=stages[best].key)
            self.model.to(self.device)
            _log.info(
                "validate_stages best: keeping stage %s (valid %s %.4f) over %s (%.4f)",
                chosen["stage"],
                self.valid_metric,
                scores[best],
                self.stage_results[-1]["stage"],
                scores[-1],
            )
        return chosen["valid_score"], chosen["valid_result"]

    @staticmethod
    def _processes() -> tuple[int, int]:
        """``(rank, processes)`` of the training run; a launch of several processes without a process group is a
        ConfigError (each would train alone, N times the same work)."""
        import torch.distributed as dist

        from causalrec.errors import ConfigError

        rank, processes = process_rank()
        if processes > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                f"this is process {rank} of {processes} (WORLD_SIZE={processes}), but the TRL arguments created no "
                f"torch.distributed process group: without GPUs launch with ACCELERATE_USE_CPU=true (gloo), see "
                f"docs/scale.md"
            )
        return rank, processes

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's ``evaluate`` on the main process; None on the other processes of a multi-process launch
        (RecBole's ``run_recbole`` then reports ``test_result: None`` there)."""
        rank, processes = process_rank()
        if rank != 0:
            _log.info("process %d of %d: evaluation runs on the main process only", rank, processes)
            return None
        return super().evaluate(
            eval_data, load_best_model=load_best_model, model_file=model_file, show_progress=show_progress
        )

    # -------------------------------------------------------------------------------- fit
    def fit(
        self,
        train_data,
        valid_data=None,
        verbose: bool = True,
        saved: bool = True,
        show_progress: bool = False,
        callback_fn: Callable[[int, float], None] | None = None,
    ):
        """Run SFT (and the model's alignment stage); returns ``(best_valid_score, best_valid_result)``.

        The final model is the result, validated after every stage (after the last one only with
        ``validate_stages: last``), unless ``validate_stages: best`` keeps an earlier stage that validates better
        (reloaded from the stage cache); the result is saved to ``self.saved_model_file`` when ``saved``. Stages
        found in the stage cache are loaded, not trained. Under a multi-process launch only the main process validates (``callback_fn``
        included) and saves; the others return ``(None, None)``.
        """
        cache_dir = self._setting("stage_cache_dir")
        if cache_dir is None and not saved:  # --no-save: nothing left behind, the stages live in a temp folder
            import tempfile

            self._scratch = tempfile.TemporaryDirectory(prefix="causalrec-stages-")
            cache_dir = self._scratch.name
        cache = StageCache(cache_dir or os.path.join(self.checkpoint_dir, "stages"))
        pending = str(cache.root / "pending")  # each stage's output_dir is set once its key is known
        # Every stage's settings are checked before any training, so a typo costs no SFT run.
        sft_args = self._sft_args(pending, show_progress)
        align_args = self._align_args(pending, show_progress) if self.model.alignment is not None else None
        rank, processes = self._processes()  # after the TRL arguments, which create the process group
        main = rank == 0
        records, targets = self._records(train_data._dataset, show_progress)
        if self.model.sft_positions == "all":  # one row per window of each user's sequence
            windows = self._sequence_windows(train_data._dataset)
            sft_records, _ = self._capped([records[i] for i in windows], targets[windows], "sft_max_samples")
        else:
            sft_records, _ = self._capped(records, targets, "sft_max_samples")
        sft_records = self._order_augmented(sft_records)
        sft_inputs = self._sft_inputs(sft_records, sft_args)
        patience = self._sft_patience(valid_data)
        if patience is not None:  # the trained weights then depend on the validation cases too
            sft_inputs["early_stopping"] = {
                "patience": patience,
                "metric": self.valid_metric,
                "valid": self._valid_identity(valid_data),
                **self._validation_ranking(valid_data),
            }
        if processes > 1:  # N processes train on N times the global batch: other weights than one process
            sft_inputs["processes"] = processes
        if self._sft_vrex() > 0:  # absent at 0, so plain SFT stages keep their keys
            sft_inputs["vrex"] = {"weight": self._sft_vrex(), "env": self.config["sft_env_source"]}
        sft_key = digest(sft_inputs)
        stages = [
            _Stage(
                "sft", sft_key, sft_inputs, sft_args, lambda a, r: self._sft(sft_records, a, r, valid_data, patience)
            )
        ]
        if align_args is not None:
            dpo_records, dpo_targets = self._capped(records, targets, "dpo_max_samples")
            inputs = self._align_inputs(sft_key, dpo_records, align_args)
            if processes > 1:
                inputs["processes"] = processes
            stages.append(
                _Stage(
                    self.model.alignment,
                    digest(inputs),
                    inputs,
                    align_args,
                    lambda a, r: self._align(dpo_records, dpo_targets, a, r, show_progress),
                )
            )
        validate = self._setting("validate_stages")
        if validate not in VALIDATE_STAGES:
            from causalrec.errors import UnknownNameError

            raise UnknownNameError("validate_stages", validate, VALIDATE_STAGES)
        problem = validate_stages_problem(validate, self._setting("stage_cache"))
        if problem is not None:  # preflight reports it first; a trainer built directly still refuses
            raise problem
        self.stage_results = []
        valid_score, valid_result = None, None
        for index, stage in enumerate(stages):
            info = self._run_stage(cache, stage)
            if main:  # the other processes do not evaluate: keep RecBole's device (cuda:0) free of their copies
                self.model.to(self.device)
            rows = stage.inputs["rows"]
            how = "loaded from the stage cache" if info["reused"] else f"trained in {info['train_seconds']:.1f}s"
            message = f"stage {stage.name}: {rows} training rows, {how}"
            if valid_data and main and (validate != "last" or index == len(stages) - 1):
                start = time.perf_counter()
                valid_score, valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
                info.update(valid_score=float(valid_score), valid_result=dict(valid_result))
                message += f"; valid {self.valid_metric} {valid_score:.4f} in {time.perf_counter() - start:.1f}s"
                if callback_fn is not None:
                    callback_fn(index, valid_score)
            self.stage_results.append(info)
            if verbose:
                self.logger.info(message)
            _log.debug(message)
        if validate == "best" and valid_data and main:
            valid_score, valid_result = self._keep_best_stage(stages)
        self.best_valid_score, self.best_valid_result = valid_score, valid_result
        self.cur_step = 0
        if saved and main:
            self._save_checkpoint(len(stages) - 1, verbose=verbose)
        return self.best_valid_score, self.best_valid_result
