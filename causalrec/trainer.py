"""``LLMTrainer``: RecBole's Trainer for causalrec's LLM recommenders; ``fit`` runs the TRL stages.

Stages: SFT (``causalrec.training.run_sft``), then, for models with an ``alignment``, S-DPO or CausalDPO on
sampled negatives with the SFT model as reference. After each stage the model is evaluated on the validation
split with RecBole's evaluator and ``callback_fn(stage_index, valid_score)`` is called (Optuna pruning).
Evaluation, checkpoint loading and testing are RecBole's own.

Only recbole and the standard library are imported at module level (``import causalrec`` stays fast);
transformers/TRL are imported when training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

from recbole.trainer import Trainer
from recbole.utils import get_local_time

_log = logging.getLogger(__name__)


class LLMTrainer(Trainer):
    """Trains an ``LLMRecommender`` with TRL; evaluates and saves the RecBole way.

    RecBole config keys read here: ``sft_args`` (``SFTConfig`` fields), ``dpo_args`` (``SDPOConfig`` /
    ``CausalDPOConfig`` fields), the model's ``method_keys``, ``negative_strategy``, ``num_negatives``,
    ``dpo_max_samples``, ``seed``.
    """

    # ---------------------------------------------------------------------------- records
    def _records(self, dataset, show_progress: bool = False):
        """One ``PreferenceRecord`` per training row (history titles, target title, season, region)."""
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
        records = []
        for r in tqdm(range(len(targets)), desc="building records", unit="row", disable=not show_progress):
            history = [model.titles[i] for i in seqs[r, : int(lens[r])] if i]
            records.append(
                PreferenceRecord(history=history, target=model.titles[int(targets[r])],
                                 season=envs["season"][r], region=envs["region"][r])
            )
        return records, np.asarray(targets, dtype=np.int64)

    def _stage_args(self, key: str) -> dict[str, Any]:
        """``sft_args`` / ``dpo_args``: the model YAML's defaults updated by the user's dict.

        RecBole replaces a dict-valued key wholesale, so a user who sets only ``num_train_epochs``
        would otherwise silently lose the YAML's learning rate and fall back to TRL's default.
        """
        import yaml

        from causalrec.registry import properties_dir

        path = properties_dir() / "model" / f"{self.config['model']}.yaml"
        defaults = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(key) if path.is_file() else None
        return {**(defaults or {}), **(self.config[key] or {})}

    def _method_args(self, config_cls, output_dir: str) -> Any:
        """The alignment config from the model's method keys and ``dpo_args``; unknown keys are a ConfigError."""
        from causalrec.errors import ConfigError

        args = {k: self.config[k] for k in self.model.method_keys if self.config[k] is not None}
        args.update(self._stage_args("dpo_args"))
        valid = {f.name for f in dataclasses.fields(config_cls) if f.init}
        unknown = sorted(set(args) - valid)
        if unknown:
            raise ConfigError(
                f"unknown {config_cls.__name__} key(s) {unknown} in dpo_args; valid keys are the fields of "
                f"{config_cls.__name__} (e.g. num_train_epochs, learning_rate, per_device_train_batch_size)"
            )
        args.setdefault("seed", int(self.config["seed"]))
        try:
            return config_cls(output_dir=output_dir, **args)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid {config_cls.__name__} arguments: {err}") from err

    # ----------------------------------------------------------------------------- stages
    def _sft(self, records, run_dir: str, show_progress: bool) -> None:
        from causalrec.training import build_sft_config, run_sft, sft_dataset

        sft_args = {"seed": int(self.config["seed"]), "disable_tqdm": not show_progress, **self._stage_args("sft_args")}
        args = build_sft_config(os.path.join(run_dir, "sft"), **sft_args)
        trainer = run_sft(self.model.llm, self.model.tokenizer, sft_dataset(records, self.model.prompt_format), args)
        self.model.llm = trainer.model

    def _negatives(self, records, targets, show_progress: bool):
        import numpy as np

        from causalrec.data.prompts import sample_negatives

        cfg, model = self.config, self.model
        rng = np.random.default_rng(int(cfg["seed"]))
        n_items = len(model.titles)
        scorer = None
        if cfg["negative_strategy"] == "hard":
            prompts = model.encode_prompts([model.prompt_format.prompt(r.history) for r in records])

            def scorer(rows):
                return model.score_prompts([prompts[r] for r in rows], show_progress=show_progress).float().cpu().numpy()

        popularity = np.bincount(targets, minlength=n_items)
        return sample_negatives(
            targets, n_items, int(cfg["num_negatives"]), cfg["negative_strategy"], rng=rng,
            popularity=popularity, scorer=scorer,
        )

    def _align_args(self, run_dir: str, show_progress: bool):
        from causalrec.training import CausalDPOConfig, SDPOConfig

        config_cls = CausalDPOConfig if self.model.alignment == "causal_dpo" else SDPOConfig
        args = self._method_args(config_cls, os.path.join(run_dir, self.model.alignment))
        if "disable_tqdm" not in self._stage_args("dpo_args"):
            args.disable_tqdm = not show_progress
        return args

    def _align(self, records, targets, args, show_progress: bool) -> None:
        import numpy as np

        from causalrec.training import CausalDPOTrainer, PreferenceRecord, SDPOTrainer, preference_dataset

        cap = self.config["dpo_max_samples"]
        if cap is not None and len(records) > int(cap):
            keep = np.sort(np.random.default_rng(int(self.config["seed"])).choice(len(records), int(cap), replace=False))
            records, targets = [records[i] for i in keep], targets[keep]
        negatives = self._negatives(records, targets, show_progress)
        titles = self.model.titles
        records = [
            PreferenceRecord(r.history, r.target, [titles[j] for j in neg], r.season, r.region)
            for r, neg in zip(records, negatives.tolist())
        ]
        trainer_cls = CausalDPOTrainer if self.model.alignment == "causal_dpo" else SDPOTrainer
        trainer = trainer_cls(
            self.model.llm, args=args, train_dataset=preference_dataset(records, self.model.prompt_format),
            processing_class=self.model.tokenizer,
        )
        result = trainer.train()
        _log.info("%s finished: %d steps, training loss %.4f", trainer_cls.__name__, trainer.state.global_step,
                  result.training_loss)
        llm = trainer.model
        if hasattr(llm, "peft_config") and "ref" in llm.peft_config:
            # TRL's frozen copy of the SFT adapter served as the reference; it is not part of the model, and
            # keeping it would make checkpoints unloadable into a fresh instance.
            llm.delete_adapter("ref")
        self.model.llm = llm

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

        The final model is the result (stages are not early-stopped against each other); it is validated
        after every stage and saved to ``self.saved_model_file`` when ``saved``.
        """
        run_dir = os.path.join(self.checkpoint_dir, f"{self.config['model']}-{get_local_time()}")
        # Alignment settings are checked before any training, so a typo costs no SFT run.
        align_args = self._align_args(run_dir, show_progress) if self.model.alignment is not None else None
        records, targets = self._records(train_data._dataset, show_progress)
        stages = [("sft", lambda: self._sft(records, run_dir, show_progress))]
        if align_args is not None:
            stages.append((self.model.alignment, lambda: self._align(records, targets, align_args, show_progress)))
        valid_score, valid_result = None, None
        for index, (name, run_stage) in enumerate(stages):
            start = time.perf_counter()
            run_stage()
            self.model.to(self.device)
            trained = time.perf_counter() - start
            message = f"stage {name}: {len(records)} training rows, trained in {trained:.1f}s"
            if valid_data:
                start = time.perf_counter()
                valid_score, valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
                message += f"; valid {self.valid_metric} {valid_score:.4f} in {time.perf_counter() - start:.1f}s"
                if callback_fn is not None:
                    callback_fn(index, valid_score)
            if verbose:
                self.logger.info(message)
            _log.debug(message)
        self.best_valid_score, self.best_valid_result = valid_score, valid_result
        self.cur_step = 0
        if saved:
            self._save_checkpoint(len(stages) - 1, verbose=verbose)
        return self.best_valid_score, self.best_valid_result
