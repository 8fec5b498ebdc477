"""Resumable epochs for RecBole's classical models (BPR, GRU4Rec, SASRec, LightGCN, ...).

With ``resume: true`` (``causalrec run --resume``, ``causalrec.run(..., resume=True)``), ``causalrec.recbole.quick_start.build``
gives a classical model a subclass of its RecBole trainer (``resumable``) that writes a *last-epoch checkpoint*
after every finished epoch (after its validation, when it validated):

    <checkpoint_dir>/<Model>-<key16>.last.pth

holding the model, the optimizer, the epoch, RecBole's early-stopping state (``best_valid_score``,
``best_valid_result``, ``cur_step``), the best model so far (so ``load_best_model`` still works), the validation
scores so far, and the random states (python, numpy, torch (+ CUDA), and the train and validation data loaders'
generators; RecBole's negative samplers draw from numpy's global state). It is written atomically (temp file, then
``os.replace``) with pickle protocol 2 and read back with ``causalrec.recbole.checkpoints.load_recbole_checkpoint``
(``torch.load(weights_only=True)`` and the allow-list): a damaged file is a ``CheckpointError``.

``key16`` starts the SHA-256 of what shapes training (``training_key``): every config key except the operational
ones (``_NOT_IN_KEY``: paths, logging, progress, devices, thread counts), the content of the dataset's atomic files,
the trainer class and the RecBole/torch versions. A run with other settings has another key, never loads the file,
and says so in the log. A rerun with the same key continues at the next epoch and trains exactly what the
uninterrupted run would have (same seed, same thread count). When training ends, the file is marked finished (a run
killed during its test evaluation is not trained again); ``causalrec.run`` deletes it once the test result exists.

Only trainers that train with RecBole's own ``Trainer.fit`` epoch loop are made resumable (models of one epoch,
Pop/ItemKNN/EASE..., have nothing to resume); others (causalrec's LLM trainer resumes its TRL stages itself; RecBole's
NCL, S3Rec, RaCT, decision trees) are left as they are. Without ``resume`` nothing here is used.

Why this module is long: the last-epoch file is one format, and everything that writes it, reads it back, restores
a trainer from it and reports a stopped run's progress from it (``run_progress``) is here, so that a change of what
the file holds is made in one place.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import logging
import os
import random
from typing import Any

from causalrec.errors import CheckpointError
from causalrec.io import digest

_log = logging.getLogger(__name__)

LAST_EPOCH_FORMAT = 1  # bump when what the file holds, or what its key covers, changes
LAST_EPOCH_KIND = "causalrec-last-epoch"
SUFFIX = ".last.pth"

# Config keys that do not shape the trained weights: where files go, logging, progress, devices and thread counts,
# evaluation-only settings, and the LLM trainer's run settings. Everything else is in the key.
_NOT_IN_KEY = frozenset(
    {
        "checkpoint_dir",
        "log_dir",
        "show_progress",
        "state",
        "log_wandb",
        "wandb_project",
        "save_dataset",
        "save_dataloaders",
        "dataset_save_path",
        "dataloaders_save_path",
        "config_files",
        "data_path",
        "prepared_dir",
        "data_cache_dir",
        "device",
        "gpu_id",
        "use_gpu",
        "local_rank",
        "nproc",
        "world_size",
        "offset",
        "ip",
        "port",
        "worker_id",
        "num_threads",
        "eval_batch_size",
        "env_metrics",
        "resume",
        "resume_save_steps",
        "stage_cache",
        "stage_cache_dir",
    }
)
# RecBole's atomic file suffixes (the data the model trains on).
_DATA_SUFFIXES = (".inter", ".user", ".item", ".kg", ".link", ".net")

_RESUMABLE: dict[type, type] = {}


# ------------------------------------------------------------------------------------------------ keys
def _file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def data_fingerprint(config) -> dict[str, str]:
    """SHA-256 of each RecBole atomic file of the run's dataset (``<data_path>/<dataset>.*``)."""
    folder, dataset = config["data_path"], config["dataset"]
    if not folder or not os.path.isdir(folder):
        return {}
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(f"{dataset}.") and name.endswith(_DATA_SUFFIXES) and os.path.isfile(path):
            out[name] = _file_sha256(path)
    return out


def training_key(config, trainer_cls: type) -> tuple[str, dict[str, Any]]:
    """``(sha256 hex, inputs)``: what shapes the training of a classical model (see the module docstring)."""
    import importlib.metadata as md

    from causalrec.recbole.settings import without_late_defaults

    # keys added later, at their default, stay out: a checkpoint written before them still resumes
    values = without_late_defaults({k: v for k, v in config.final_config_dict.items() if k not in _NOT_IN_KEY})
    versions = {}
    for name in ("recbole", "torch"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "-"
    inputs = {
        "format": LAST_EPOCH_FORMAT,
        "trainer": f"{trainer_cls.__module__}.{trainer_cls.__qualname__}",
        "config": values,
        "data": data_fingerprint(config),
        "versions": versions,
    }
    return digest(inputs), inputs


# ------------------------------------------------------------------------------------------ RNG states
def _rng_state(loaders: dict[str, Any]) -> dict[str, Any]:
    """The random states a resumed run must continue from, in types ``torch.load(weights_only=True)`` reads."""
    import numpy as np
    import torch

    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "loaders": {},
    }
    for name, loader in loaders.items():
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            state["loaders"][name] = generator.get_state()
    return state


def _set_rng_state(state: dict[str, Any], loaders: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": np.asarray(numpy["key"], dtype=np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    for name, loader in loaders.items():
        generator = getattr(loader, "generator", None)
        if name in state["loaders"] and isinstance(generator, torch.Generator):
            generator.set_state(state["loaders"][name])


def _cpu_copy(value: Any) -> Any:
    """A detached CPU copy of nested tensors (state dicts change in place as training goes on)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((k, _cpu_copy(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)


def _plain(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` can read ``value`` back without causalrec's trust opt-in."""
    import torch

    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


# --------------------------------------------------------------------------------------------- trainer
def run_progress(checkpoint_dir) -> str | None:
    """Where the unfinished resumable run under ``checkpoint_dir`` stands, read from its newest last-epoch
    checkpoint ("epoch 83 of at most 300 saved; best validation 0.1996 at epoch 77, 6 epochs without improvement"),
    or None where there is none."""
    import torch

    from causalrec.recbole.checkpoints import load_recbole_checkpoint

    files = glob.glob(os.path.join(glob.escape(str(checkpoint_dir)), f"*{SUFFIX}"))
    if not files:
        return None
    path = max(files, key=os.path.getmtime)
    try:
        state = load_recbole_checkpoint(torch.load, path, map_location="cpu")
    except CheckpointError as err:
        return f"its last-epoch checkpoint cannot be read ({err})"
    if not (isinstance(state, dict) and state.get("kind") == LAST_EPOCH_KIND):
        return None
    text = f"epoch {state['epoch']} of at most {state['epochs']} saved"
    if state.get("finished"):
        text += ", training finished (the test had not run)"
    if state.get("best_epoch") is not None:
        text += (
            f"; best validation {float(state['best_valid_score']):.4f} at epoch {state['best_epoch']}, "
            f"{state['cur_step']} epochs without improvement"
        )
    return text


def resumable(trainer_cls: type) -> type:
    """The resumable subclass of a RecBole trainer class that trains with RecBole's ``Trainer.fit`` epoch loop;
    any other trainer class is returned unchanged (a log line says the model restarts from epoch 0)."""
    from recbole.trainer import Trainer

    if isinstance(trainer_cls, type) and issubclass(trainer_cls, EpochCheckpoints):
        return trainer_cls
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer) and trainer_cls.fit is Trainer.fit):
        if not getattr(trainer_cls, "__module__", "").startswith("causalrec."):  # the LLM trainer resumes itself
            _log.info(
                "resume: %s has its own training loop, which causalrec cannot checkpoint per epoch; "
                "an interrupted run trains again from epoch 0",
                getattr(trainer_cls, "__name__", trainer_cls),
            )
        return trainer_cls
    if trainer_cls not in _RESUMABLE:
        _RESUMABLE[trainer_cls] = type(
            f"Resumable{trainer_cls.__name__}",
            (EpochCheckpoints, trainer_cls),
            {
                "__module__": __name__,
                "_base_trainer": trainer_cls,
                "__doc__": f"RecBole's {trainer_cls.__name__} with last-epoch checkpoints.",
            },
        )
    return _RESUMABLE[trainer_cls]


class EpochCheckpoints:
    """Mixin over a RecBole ``Trainer``: a last-epoch checkpoint after every finished epoch; ``fit`` continues from it.

    The checkpoint of epoch ``e`` is written when epoch ``e + 1`` starts (nothing happens between the two: RecBole's
    epoch loop has validated, updated its early-stopping state and saved the best model by then), and as a *finished*
    one when ``fit`` ends. ``epoch_summary`` says what this process trained.
    """

    # causalrec.run sets this: the finished checkpoint stays until the test evaluation is done (then
    # ``discard_last_epoch``); other callers of ``fit`` get it removed when fit returns.
    keep_finished_checkpoint = False
    _base_trainer: type | None = None  # the RecBole trainer class (set by ``resumable``)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.last_epoch_file: str | None = None
        self.epoch_summary: dict[str, Any] = {"trained": 0, "resumed_from": None, "last": None, "best": None}
        self._active = False
        self._key: str | None = None
        self._loaders: dict[str, Any] = {}
        self._first_epoch = 0
        self._epoch: int | None = None
        self._last_valid: tuple[int, Any] | None = None
        self._valid_history: list[tuple[int, float]] = []
        self._best_epoch: int | None = None
        self._best_state: dict[str, Any] | None = None
        self._saved = True

    # ---------------------------------------------------------------------------------------- hooks
    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self._active and self._epoch is not None and epoch_idx > self._first_epoch:
            self._epoch_done(self._epoch, finished=False)  # that epoch, its validation and best-model save are over
        self._epoch = epoch_idx
        self.epoch_summary["trained"] += 1
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _valid_epoch(self, valid_data, show_progress=False):
        score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
        if self._epoch is not None:
            self._last_valid = (self._epoch, result)
            self._valid_history.append((self._epoch, float(score)))
        return score, result

    def _epoch_done(self, epoch: int, finished: bool) -> None:
        """Note whether ``epoch`` gave the best model so far, then write its checkpoint."""
        last = self._last_valid
        if last is not None and last[0] == epoch and self.best_valid_result is last[1]:
            self._best_epoch = epoch  # RecBole's fit keeps the validation result it improved on
            self._best_state = None if finished else self._saved_state(epoch)  # later epochs change the model
        self.epoch_summary.update(last=epoch, best=self._best_epoch)
        self._write_last_epoch(epoch, finished=finished)

    def _saved_state(self, epoch: int) -> dict[str, Any]:
        """What RecBole's ``_save_checkpoint`` writes for the best model (a copy: training changes it in place)."""
        return {
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": _cpu_copy(self.model.state_dict()),
            "other_parameter": _cpu_copy(self.model.other_parameter()),
            "optimizer": _cpu_copy(self.optimizer.state_dict()),
        }

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._active = bool(self.config["single_spec"]) and self.epochs > 1
        if not self._active:
            return super().fit(
                train_data,
                valid_data,
                verbose=verbose,
                saved=saved,
                show_progress=show_progress,
                callback_fn=callback_fn,
            )
        self._loaders = {"train": train_data, "valid": valid_data}
        self._saved = saved
        self._key, _ = training_key(self.config, self._base_trainer or type(self))
        self.last_epoch_file = os.path.join(self.checkpoint_dir, f"{self.config['model']}-{self._key[:16]}{SUFFIX}")
        other = self.model.other_parameter()
        if not _plain(other):
            _log.warning(
                "resume: %s keeps %s outside its weights; its last-epoch checkpoint can be read back only "
                "with CAUSALREC_TRUST_CHECKPOINTS=1",
                self.config["model"],
                sorted(other),
            )
        checkpoint = self._read_last_epoch()
        if checkpoint is not None:
            self._restore(checkpoint)
            if callback_fn is not None:  # what the uninterrupted run reported (Optuna pruning), in order
                for epoch, score in self._valid_history:
                    callback_fn(epoch, score)
            if checkpoint["finished"]:
                _log.info(
                    "resume: %s finished training (epoch %d) before the interruption; nothing left to train",
                    self.config["model"],
                    checkpoint["epoch"],
                )
                self.eval_collector.data_collect(train_data)
                return self.best_valid_score, self.best_valid_result
        self._first_epoch = self.start_epoch
        result = super().fit(
            train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress, callback_fn=callback_fn
        )
        if self._epoch is not None and self._epoch >= self._first_epoch:
            self._epoch_done(self._epoch, finished=True)
        if not self.keep_finished_checkpoint:
            self.discard_last_epoch()
        return result

    def discard_last_epoch(self) -> None:
        """Delete the last-epoch checkpoint (and temp files a killed write left): training and testing are done."""
        if not self.last_epoch_file:
            return
        for path in [self.last_epoch_file, *self._stale_temp_files()]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _stale_temp_files(self) -> list[str]:
        folder, name = os.path.split(self.last_epoch_file)
        return glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*"))

    # ---------------------------------------------------------------------------------- write / read
    def _write_last_epoch(self, epoch: int, finished: bool) -> None:
        from causalrec.recbole.checkpoints import atomic_torch_save

        # The best model so far: RecBole saved it at epoch best_epoch; without validation it saves every epoch.
        validates = bool(self._loaders.get("valid")) and self.eval_step > 0
        if self._best_epoch == epoch or (self._best_epoch is None and not validates):
            best: Any = "current"
        elif self._best_epoch is None:
            best = "none"  # no validation yet (eval_step > 1): no best model file yet
        else:
            best = self._best_state
        state = {
            "kind": LAST_EPOCH_KIND,
            "format": LAST_EPOCH_FORMAT,
            "key": self._key,
            "model": self.config["model"],
            "epoch": epoch,
            "finished": finished,
            "epochs": self.epochs,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "best_valid_result": self.best_valid_result,
            "best_epoch": self._best_epoch,
            "valid_history": [list(item) for item in self._valid_history],
            "train_loss": {int(k): v for k, v in self.train_loss_dict.items()},
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
            "best": best,
            "best_model_file": os.path.basename(self.saved_model_file),
            "rng": _rng_state(self._loaders),
        }
        atomic_torch_save(state, self.last_epoch_file)
        _log.info(
            "resume: epoch %d%s saved to %s", epoch, " (training finished)" if finished else "", self.last_epoch_file
        )

    def _read_last_epoch(self) -> dict[str, Any] | None:
        """The checkpoint of this run's key, or None (with a log line saying why training starts at epoch 0)."""
        import torch

        from causalrec.recbole.checkpoints import load_recbole_checkpoint

        model, path = self.config["model"], self.last_epoch_file
        for stale in self._stale_temp_files():  # a write cut short by a kill
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        if not os.path.isfile(path):
            pattern = os.path.join(glob.escape(self.checkpoint_dir), f"{glob.escape(model)}-*{SUFFIX}")
            others = [p for p in glob.glob(pattern) if p != path]
            if others:
                _log.info(
                    "resume: no last-epoch checkpoint of %s with these settings (key %s); %d of other settings "
                    "in %s (%s) are not used: training starts at epoch 0",
                    model,
                    self._key[:16],
                    len(others),
                    self.checkpoint_dir,
                    ", ".join(sorted(os.path.basename(p) for p in others)),
                )
            else:
                _log.info(
                    "resume: no last-epoch checkpoint of %s with these settings (%s): training starts at epoch 0",
                    model,
                    path,
                )
            return None
        try:
            checkpoint = load_recbole_checkpoint(torch.load, path, map_location="cpu")
        except CheckpointError as err:
            raise CheckpointError(f"{err}. To train {model} from epoch 0 instead, delete {path}") from None
        if not (isinstance(checkpoint, dict) and checkpoint.get("kind") == LAST_EPOCH_KIND):
            raise CheckpointError(
                f"{path!r} is not a causalrec last-epoch checkpoint; delete it to train {model} from epoch 0"
            )
        if checkpoint.get("format") != LAST_EPOCH_FORMAT or checkpoint.get("key") != self._key:
            _log.info(
                "resume: %s was written with other settings or another causalrec version (key %s, not %s): "
                "training starts at epoch 0",
                path,
                str(checkpoint.get("key"))[:16],
                self._key[:16],
            )
            return None
        return checkpoint

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        from causalrec.recbole.checkpoints import atomic_torch_save

        path = self.last_epoch_file
        try:
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            epoch = int(checkpoint["epoch"])
            self.start_epoch = epoch + 1
            self.cur_step = checkpoint["cur_step"]
            self.best_valid_score = checkpoint["best_valid_score"]
            self.best_valid_result = checkpoint["best_valid_result"]
            self.train_loss_dict = dict(checkpoint["train_loss"])
            self._best_epoch = checkpoint["best_epoch"]
            self._valid_history = [(int(e), float(s)) for e, s in checkpoint["valid_history"]]
            best = checkpoint["best"]
            if best == "current":  # a copy: later checkpoints need it, and training changes the model in place
                best = self._saved_state(epoch)
            self._best_state = best if isinstance(best, dict) else None
            if self._saved and self._best_state is not None:  # the best model's file, for load_best_model
                name = os.path.basename(checkpoint["best_model_file"])
                self.saved_model_file = os.path.join(self.checkpoint_dir, name)
                atomic_torch_save({"config": self.config, **self._best_state}, self.saved_model_file)
            _set_rng_state(checkpoint["rng"], self._loaders)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(
                f"last-epoch checkpoint {path!r} does not fit this {self.config['model']} run "
                f"({type(err).__name__}: {first}); delete it to train from epoch 0"
            ) from None
        self._epoch = epoch
        self.epoch_summary.update(resumed_from=epoch, last=epoch, best=self._best_epoch)
        _log.info("resume: %s continues after epoch %d (of %d) from %s", self.config["model"], epoch, self.epochs, path)
