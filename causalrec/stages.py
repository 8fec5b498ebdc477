"""Stage checkpoints of the TRL training stages: keys, storage, the stage cache, resume points, the loss guard.

A finished stage is ``model.safetensors`` (weights; only the trainable ones under LoRA) + ``stage.json``
(format, key, the inputs the key covers, steps, loss), written into a temp dir and renamed into place. Its key is
a SHA-256 of everything that shapes the trained weights, so a run with the same inputs loads it instead of
training (``causalrec.trainer.LLMTrainer`` builds the keys). Nothing here is unpickled: safetensors and JSON only.

No RecBole and no TRL at module level: torch/safetensors are imported when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

_log = logging.getLogger(__name__)

STAGE_FORMAT = 1  # bump when what a stage directory holds, or what its key covers, changes
STAGE_WEIGHTS = "model.safetensors"
STAGE_META = "stage.json"

# TrainingArguments fields that do not change the trained weights: left out of stage keys, so that, e.g., a run
# with resume (which turns step checkpoints on) and one without share their stages.
_NOT_IN_KEY = ("output_dir", "logging_", "save_", "disable_tqdm", "report_to", "run_name", "push_to_hub", "hub_",
               "resume_from_checkpoint", "overwrite_output_dir", "dataloader_pin_memory", "log_level",
               "skip_memory_metrics", "project", "trackio_")


# ------------------------------------------------------------------------------------------------ keys
def digest(value: Any) -> str:
    """SHA-256 (hex) of a JSON-able value (keys sorted; other objects by ``str``)."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def training_args_key(args) -> dict[str, Any]:
    """The fields of a TRL/transformers config that shape the trained weights (see ``_NOT_IN_KEY``)."""
    return {k: v for k, v in args.to_dict().items() if not k.startswith(_NOT_IN_KEY)}


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def backbone_identity(cfg) -> dict[str, Any]:
    """Backbone settings (not the device) and, for a local model directory, its files' names, sizes and mtimes."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}
    path = Path(str(cfg.backbone)).expanduser()
    if cfg.backbone != "tiny" and path.is_dir():
        values["files"] = sorted(
            [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in path.rglob("*") if p.is_file()
        )
    return values


def records_digest(records) -> str:
    return digest([[list(r.history), r.target, r.season, r.region] for r in records])


# ------------------------------------------------------------------------------------ stage checkpoints
def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _trainable_names(module) -> tuple[set[str], bool]:
    """Names of the parameters training can change, and whether that is every parameter."""
    names, every = set(), True
    for name, param in module.named_parameters():
        if param.requires_grad:
            names.add(name)
        else:
            every = False
    return names, every


def save_stage(directory: str | os.PathLike, module, meta: dict[str, Any]) -> None:
    """Write ``module``'s weights (safetensors) and ``meta`` (JSON) into ``directory``.

    Only trainable parameters are written when some are frozen (LoRA: the adapters; the frozen base is rebuilt
    from the backbone, which the stage key covers), every tensor otherwise.
    """
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / STAGE_WEIGHTS
    names, every = _trainable_names(module)
    if every:
        save_model(module, str(weights))
    else:
        params = dict(module.named_parameters())
        save_file({n: params[n].detach().contiguous() for n in sorted(names)}, str(weights))
    meta = {**meta, "format": STAGE_FORMAT, "weights": "all" if every else "trainable"}
    (directory / STAGE_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    for path in (weights, directory / STAGE_META):
        _fsync(path)


def load_stage(directory: str | os.PathLike, module, key: str | None = None) -> dict[str, Any]:
    """Load a stage written by ``save_stage`` into ``module``; returns its metadata.

    Raises:
        CheckpointError: no stage there, damaged or truncated files, another stage format, a key other than
            ``key``, or weights that do not fit ``module`` (another model, backbone or LoRA setting).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    from causalrec.errors import CheckpointError

    directory = Path(directory)
    retrain = f"delete {str(directory)!r} to train the stage again"
    try:
        meta = json.loads((directory / STAGE_META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(directory)!r} is not a causalrec stage checkpoint (it has no {STAGE_META})") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"stage checkpoint {str(directory)!r} is damaged ({STAGE_META}: {err}); {retrain}") from None
    if not isinstance(meta, dict) or meta.get("format") != STAGE_FORMAT:
        raise CheckpointError(f"stage checkpoint {str(directory)!r} has format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                              f"this causalrec reads format {STAGE_FORMAT}; {retrain}")
    if key is not None and meta.get("key") != key:
        raise CheckpointError(f"stage checkpoint {str(directory)!r} was trained from other inputs (key "
                              f"{str(meta.get('key'))[:16]}, expected {key[:16]}); {retrain}")
    weights = directory / STAGE_WEIGHTS
    device = next(module.parameters()).device
    try:
        if meta.get("weights") == "all":
            load_model(module, str(weights), strict=True, device=str(device))
        else:
            state = load_file(str(weights), device=str(device))
            names, _ = _trainable_names(module)
            if set(state) != names:
                extra, missing = sorted(set(state) - names)[:3], sorted(names - set(state))[:3]
                raise ValueError(f"its tensors do not match the model's trainable parameters "
                                 f"(unexpected {extra}, missing {missing})")
            module.load_state_dict(state, strict=False)
    except FileNotFoundError:
        raise CheckpointError(f"stage checkpoint {str(directory)!r} has no {STAGE_WEIGHTS}; {retrain}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(f"cannot load stage checkpoint {str(weights)!r} into {type(module).__name__}: {first}. "
                              f"It is truncated or belongs to another model/backbone; {retrain}") from None
    return meta


def last_checkpoint(directory: str | os.PathLike) -> str | None:
    """The newest complete TRL checkpoint (``checkpoint-N`` whose ``trainer_state.json``, written last, says
    step N) in ``directory``, or None. A checkpoint cut short by a kill is skipped."""
    best: tuple[int, Path] | None = None
    for path in Path(directory).glob("checkpoint-*"):
        try:
            step = int(path.name.rsplit("-", 1)[1])
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        if state.get("global_step") == step and (best is None or step > best[0]):
            best = (step, path)
    return str(best[1]) if best else None


class StageCache:
    """Finished training stages on disk, keyed by a hash of their inputs.

    Layout under ``root``::

        <stage>-<key16>/            model.safetensors + stage.json: a finished stage (appears by an atomic rename)
        <stage>-<key16>.partial/    TRL's output_dir while the stage trains (checkpoint-N/ with resume)
        <stage>-<key16>.lock        held while the stage trains, so parallel runs train it once
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def directory(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key[:16]}"

    def work_dir(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key[:16]}.partial"

    def find(self, stage: str, key: str) -> Path | None:
        directory = self.directory(stage, key)
        return directory if (directory / STAGE_META).is_file() else None

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """An exclusive advisory lock (POSIX ``flock``; a no-op where it is missing) for one stage key."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: the atomic rename in install still keeps each copy whole
            yield
            return
        with open(self.root / f"{stage}-{key[:16]}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log.info("waiting for another process training the same %s stage (%s)", stage, key[:16])
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def install(self, stage: str, key: str, module, meta: dict[str, Any]) -> Path:
        """Save a finished stage into a temp dir, then rename it into place (replacing a damaged copy)."""
        final = self.directory(stage, key)
        for stale in self.root.glob(f".tmp-{final.name}-*"):  # left by a run killed while saving; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=self.root))
        try:
            save_stage(tmp, module, {**meta, "stage": stage, "key": key})
            if final.exists():  # no stage.json (find() said so): an incomplete copy; we hold the lock
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


# ------------------------------------------------------------------------------------- loss guard
def _batch_prompts(inputs, tokenizer, limit: int = 2) -> tuple[int, list[str]]:
    """Number of examples in a TRL batch and the decoded prompts of the first ``limit``."""
    ids = inputs.get("input_ids")
    if ids is None or tokenizer is None:
        return 0, []
    lengths = inputs.get("prompt_lengths")  # preference batches: [chosen; rejected...] rows, one length per prompt
    n = int(lengths.numel()) if lengths is not None else int(ids.shape[0])
    prompts = []
    for row in range(min(limit, n)):
        if lengths is not None:
            tokens = ids[row, : int(lengths[row])]
        elif inputs.get("completion_mask") is not None:
            keep = inputs["completion_mask"][row] == 0
            if inputs.get("attention_mask") is not None:
                keep &= inputs["attention_mask"][row] == 1
            tokens = ids[row][keep]
        else:
            tokens = ids[row]
        prompts.append(tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()[:160])
    return n, prompts


def guard_training_losses(trainer, stage: str) -> None:
    """Stop a transformers/TRL trainer at the first non-finite training loss, before the optimizer applies it.

    Wraps ``trainer.training_step`` (public Trainer API). The ``TrainingError`` names the stage, the global step,
    the batch (size and its first prompts) and the last complete checkpoint, which stays on disk.
    """
    import math

    import torch

    from causalrec.errors import TrainingError

    step_fn = trainer.training_step

    def fail(inputs, what: str):
        n, prompts = _batch_prompts(inputs, getattr(trainer, "processing_class", None))
        state = trainer.state
        kept = last_checkpoint(trainer.args.output_dir)
        where = (f"the last good checkpoint is kept at {kept!r}" if kept else
                 "no checkpoint of this stage was written (set resume: true to write step checkpoints)")
        epoch = state.epoch if state.epoch is not None and math.isfinite(state.epoch) else 0.0
        shown = "; ".join(repr(p) for p in prompts) or "-"
        return TrainingError(
            f"{stage} training stopped: {what} at global step {state.global_step + 1} (epoch {epoch:.2f}) on a batch "
            f"of {n} examples, first prompts: {shown}. The update was not applied; {where}. Lower learning_rate, "
            f"enable gradient clipping (max_grad_norm) or check these rows"
        )

    def training_step(model, inputs, *args, **kwargs):
        try:
            loss = step_fn(model, inputs, *args, **kwargs)
        except TrainingError as err:  # the preference trainers' own check: add the batch and the checkpoint
            raise fail(inputs, str(err).split(";")[0]) from None
        if not bool(torch.isfinite(loss).all()):
            raise fail(inputs, f"the loss is {loss.float().mean().item()}")
        return loss

    trainer.training_step = training_step


# ----------------------------------------------------------------------------- argument types
def check_field_types(config_cls, values: dict[str, Any], *, where: str) -> None:
    """A ConfigError for a value whose type cannot be what a numeric or boolean dataclass field needs
    (``learning_rate: fast``), before transformers fails on it somewhere deep in training."""
    from causalrec.errors import ConfigError

    types = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
             for f in dataclasses.fields(config_cls) if f.init}
    for name, value in values.items():
        kind = types.get(name)  # only plain bool/int/float annotations; unions and containers are left to the config
        if value is None or kind not in ("bool", "int", "float"):
            continue
        if kind == "bool":
            ok, wanted = isinstance(value, bool), "true or false"
        elif kind == "int":
            ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        if not ok:
            raise ConfigError(f"{where}: {name} must be {wanted}; got {value!r} ({type(value).__name__})")
