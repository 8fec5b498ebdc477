"""Stage checkpoints of the TRL training stages: keys, storage, the stage cache, resume points, the loss guard.

A finished stage is ``model.safetensors`` (weights; only the trainable ones under LoRA) + ``stage.json``
(format, key, the inputs the key covers, steps, loss), written into a temp dir and renamed into place. Its key is
a SHA-256 of everything that shapes the trained weights, so a run with the same inputs loads it instead of
training (``causalrec.recbole.trainer.LLMTrainer`` builds the keys). Nothing here is unpickled: safetensors and JSON only.

No RecBole and no TRL at module level: torch/safetensors are imported when used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from causalrec.io import digest, exclusive_lock

_log = logging.getLogger(__name__)

STAGE_FORMAT = 1  # bump when what a stage directory holds, or what its key covers, changes
STAGE_WEIGHTS = "model.safetensors"
STAGE_META = "stage.json"

# TrainingArguments fields that do not change the trained weights: left out of stage keys, so that, e.g., a run
# with resume (which turns step checkpoints on) and one without share their stages.
_NOT_IN_KEY = (
    "output_dir",
    "logging_",
    "save_",
    "disable_tqdm",
    "report_to",
    "run_name",
    "push_to_hub",
    "hub_",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "dataloader_pin_memory",
    "log_level",
    "skip_memory_metrics",
    "project",
    "trackio_",
)


# ------------------------------------------------------------------------------------------------ keys
def training_args_key(args) -> dict[str, Any]:
    """The fields of a TRL/transformers config that shape the trained weights (see ``_NOT_IN_KEY``), less the
    config's later fields at their defaults (``KEYED_AWAY_FROM_DEFAULT``)."""
    late = getattr(type(args), "KEYED_AWAY_FROM_DEFAULT", {})
    return {
        k: v for k, v in args.to_dict().items() if not k.startswith(_NOT_IN_KEY) and not (k in late and v == late[k])
    }


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


# Backbone settings added after stages were keyed: at their default they stay out of the key, so the stages
# trained before them keep their keys.
BACKBONE_KEYED_AWAY_FROM_DEFAULT: dict[str, Any] = {"tiny_dropout": 0.0}


def backbone_identity(cfg) -> dict[str, Any]:
    """Backbone settings (not the device, nor the ``tiny_*`` ones a pretrained backbone ignores) and, for a local
    model directory, its files' names, sizes and mtimes."""
    late = BACKBONE_KEYED_AWAY_FROM_DEFAULT
    skip = {"device"} | (
        {k for k in dataclasses.asdict(cfg) if k.startswith("tiny_")} if cfg.backbone != "tiny" else set()
    )
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip and not (k in late and v == late[k])}
    path = Path(str(cfg.backbone)).expanduser()
    if cfg.backbone != "tiny" and path.is_dir():
        values["files"] = sorted(
            [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in path.rglob("*") if p.is_file()
        )
    return values


def records_digest(records) -> str:
    # the user and the history's labels join a record's identity only where prompts show them, so earlier stage
    # keys stay valid
    return digest(
        [
            [list(r.history), r.target, r.season, r.region]
            + ([r.user] if r.user else [])
            + ([list(r.history_environments)] if r.history_environments is not None else [])
            for r in records
        ]
    )


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
        raise CheckpointError(
            f"{str(directory)!r} is not a causalrec stage checkpoint (it has no {STAGE_META})"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"stage checkpoint {str(directory)!r} is damaged ({STAGE_META}: {err}); {retrain}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != STAGE_FORMAT:
        raise CheckpointError(
            f"stage checkpoint {str(directory)!r} has format {meta.get('format') if isinstance(meta, dict) else '?'}, "
            f"this causalrec reads format {STAGE_FORMAT}; {retrain}"
        )
    if key is not None and meta.get("key") != key:
        raise CheckpointError(
            f"stage checkpoint {str(directory)!r} was trained from other inputs (key "
            f"{str(meta.get('key'))[:16]}, expected {key[:16]}); {retrain}"
        )
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
                raise ValueError(
                    f"its tensors do not match the model's trainable parameters (unexpected {extra}, missing {missing})"
                )
            module.load_state_dict(state, strict=False)
    except FileNotFoundError:
        raise CheckpointError(f"stage checkpoint {str(directory)!r} has no {STAGE_WEIGHTS}; {retrain}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(
            f"cannot load stage checkpoint {str(weights)!r} into {type(module).__name__}: {first}. "
            f"It is truncated or belongs to another model/backbone; {retrain}"
        ) from None
    return meta


def _damaged_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of a TRL checkpoint folder that does not hold together, and why; None when every file does.

    Torch files (``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``*.bin``, ...) are inspected without
    unpickling (``causalrec.recbole.checkpoints.torch_file_problem``: whole zip archive or pickle stream, CRC-32s,
    data records), safetensors files by their header (``safetensors_problem``), JSON files by parsing them.
    """
    from causalrec.integrity import safetensors_problem, torch_file_problem

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix in (".pt", ".pth", ".bin"):
            problem = torch_file_problem(path)
        elif path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix == ".json" and path.name != "trainer_state.json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
                problem = None
            except (OSError, ValueError) as err:
                problem = f"it is not valid JSON ({err})"
        else:
            continue
        if problem is not None:
            return path, problem
    return None


def check_resume_checkpoint(folder: str | os.PathLike, then: str = "") -> None:
    """A ``CheckpointError`` if a file of the TRL checkpoint ``folder`` is damaged (``_damaged_file``), naming the
    file and saying to delete the folder; ``then`` says what a run does once it is gone."""
    damaged = _damaged_file(Path(folder))
    if damaged is not None:
        from causalrec.errors import CheckpointError

        file, problem = damaged
        then = f": {then}" if then else ""
        raise CheckpointError(
            f"resume checkpoint {str(folder)!r} is damaged: {str(file)!r}: {problem}; delete "
            f"{str(folder)!r} and run again{then}"
        )


def last_checkpoint(directory: str | os.PathLike) -> str | None:
    """The newest complete TRL checkpoint in ``directory`` (the one to resume from), or None.

    Complete: ``checkpoint-N`` whose ``trainer_state.json`` (transformers writes it last) parses and says step N.
    One without a whole ``trainer_state.json`` was cut short by a kill during the save, which is expected; it is
    skipped (the previous checkpoint, or the start of the stage, is where that run really was).

    Damaged: a complete checkpoint with a file that does not hold together (``check_resume_checkpoint``: a truncated
    ``optimizer.pt``, a safetensors file whose header does not cover it, ...) is a ``CheckpointError`` naming the
    file and the folder to delete, found here, before transformers reads anything, instead of a traceback deep in
    TRL. It is not skipped with a warning: the damage happened after the save completed (the disk, a copy, a crash
    before the data reached it), which the user should hear about; with resume one checkpoint is usually all there
    is (``save_total_limit: 1``), so skipping would silently throw the stage's progress away and train it from
    step 0 (the caller then deletes the partial run); and deleting the folder is one command, after which the run
    resumes from the previous complete checkpoint (named in the message) or from the start of the stage.
    Costs one read of the checkpoint's files.

    Raises:
        CheckpointError: the newest complete checkpoint is damaged.
    """
    complete: list[tuple[int, Path]] = []
    for path in Path(directory).glob("checkpoint-*"):
        try:
            step = int(path.name.rsplit("-", 1)[1])
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        if isinstance(state, dict) and state.get("global_step") == step:
            complete.append((step, path))
    if not complete:
        return None
    complete.sort(reverse=True)
    newest = complete[0][1]
    check_resume_checkpoint(
        newest,
        f"training then resumes from the previous checkpoint {str(complete[1][1])!r}"
        if len(complete) > 1
        else "training then starts again from the start of the stage (there is no earlier checkpoint)",
    )
    return str(newest)


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

    def lock(self, stage: str, key: str):
        """An exclusive advisory lock (``causalrec.io.exclusive_lock``) for one stage key."""
        return exclusive_lock(self.root / f"{stage}-{key[:16]}.lock", f"training the same {stage} stage")

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
