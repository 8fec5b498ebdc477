"""Reading and writing RecBole checkpoints safely (B12): atomic writes, ``torch.load(weights_only=True)`` with an
allow-list, full unpickling only for files this process wrote or when the user opts in.

A file that cannot be read is told apart by inspecting it, never by an exception's text (``torch_file_problem``,
``safetensors_problem``; nothing is unpickled): a damaged file (not a whole zip archive or pickle stream, a
member that fails its CRC, a data record cut short) is a ``CheckpointError`` saying what to delete; a whole file
whose pickle needs globals outside the allow-list is "untrusted", the only case where trusting it
(``CAUSALREC_TRUST_CHECKPOINTS=1``) can help."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
import pickle
import re
from typing import Any, Iterator

import numpy as np
import yaml

from causalrec.errors import CheckpointError
from causalrec.integrity import torch_file_problem
from causalrec.io import RecBoleYamlLoader, atomic_path

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def trusted_torch_load() -> Iterator[None]:
    """Full unpickling for ``torch.load`` calls that do not choose ``weights_only`` (B4): the explicit opt-in.

    torch >= 2.6 defaults to ``weights_only=True``, and RecBole's checkpoints pickle the whole
    ``Config`` object. causalrec's RecBole readers try a restricted load first (``load_recbole_checkpoint``);
    inside this context they, and any other ``torch.load`` that does not choose ``weights_only`` itself,
    unpickle fully. Calls that choose (transformers, TRL, causalrec's own loaders) are untouched. Only wrap
    code that loads files you trust: unpickling can run arbitrary code.
    """
    import torch

    original = torch.load
    if getattr(original, "_causalrec_trusted", False):  # nested use
        yield
        return

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    load._causalrec_trusted = True
    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ------------------------------------------------------------------------------ checkpoints (B12)
# Checkpoint files this process wrote (path -> (size, mtime_ns)): these may be fully unpickled when the
# allow-list does not cover them (e.g. ItemKNN keeps a scipy matrix in its checkpoint).
_WRITTEN: dict[str, tuple[int, int]] = {}
_EXPECTED_MODEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("causalrec_expected_model", default=None)
TRUST_ENV = "CAUSALREC_TRUST_CHECKPOINTS"


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _checkpoint_allow_list() -> list:
    """The globals a RecBole checkpoint (config, enums, numpy scalars) needs, and nothing that runs code."""
    from recbole.config.configurator import Config
    from recbole.utils import enum_type

    allowed: list = [Config, RecBoleYamlLoader, yaml.loader.FullLoader, yaml.loader.SafeLoader, np.dtype]
    allowed += [
        getattr(enum_type, n)
        for n in ("ModelType", "KGDataLoaderState", "EvaluatorType", "InputType", "FeatureType", "FeatureSource")
        if hasattr(enum_type, n)
    ]
    allowed += [
        type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
    ]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return allowed + [scalar]


def _model_class(name: str):
    """The class a checkpoint names, if it is a recommender model (RecBole's or a registered one), else None."""
    module_name, _, attr = name.rpartition(".")
    if not (module_name.startswith("recbole.model.") or module_name.startswith("causalrec.recbole.models.")):
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    from recbole.model.abstract_recommender import AbstractRecommender

    return obj if isinstance(obj, type) and issubclass(obj, AbstractRecommender) else None


def _restricted_load(load, args, kwargs):
    """``torch.load(weights_only=True)`` with the allow-list, plus the model class the checkpoint names.

    Only the ``UnpicklingError`` of the weights-only unpickler is looked at (it names a global outside the
    allow-list); any other exception, a bug in this code included, propagates as it is."""
    import torch

    allowed = _checkpoint_allow_list()
    for attempt in range(4):  # a checkpoint names one model class; more than a few: refused as untrusted
        try:
            with torch.serialization.safe_globals(allowed):
                return load(*args, **{**kwargs, "weights_only": True})
        except pickle.UnpicklingError as err:  # torch names the offending global in its message
            match = re.search(
                r"GLOBAL ([\w\.]+) was not an allowed global|Unsupported global: GLOBAL ([\w\.]+)", str(err)
            )
            cls = _model_class(match.group(1) or match.group(2)) if match else None
            if cls is None or cls in allowed or attempt == 3:
                raise
            allowed.append(cls)


def _checkpoint_path(args, kwargs) -> str:
    target = args[0] if args else kwargs.get("f")
    return os.fspath(target) if isinstance(target, (str, os.PathLike)) else repr(target)


# What ``torch.load`` raises for a file it cannot read: format errors (RuntimeError from its zip reader, OSError,
# EOFError) and unpickling errors. Anything else (NameError, TypeError, ...) is a bug and keeps its traceback.
_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, OSError, EOFError)
_BUGS = (NotImplementedError, RecursionError)  # RuntimeErrors that do not come from reading a file


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _damaged_error(path: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path!r} is damaged: {reason}. The file is missing, truncated or not a "
        "RecBole checkpoint; delete it and train again, or pass the right file"
    )


def _trusted(path: str) -> bool:
    if os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes"):
        return True
    real = os.path.realpath(path)
    return real in _WRITTEN and _WRITTEN[real] == _stat_key(real)


def _check_model(checkpoint: Any, path: str) -> None:
    expected = _EXPECTED_MODEL.get()
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if expected is None or config is None:
        return
    try:
        found = config["model"]
    except (KeyError, TypeError):
        return
    if str(found).lower() != expected.lower():
        raise CheckpointError(
            f"checkpoint {path!r} holds a {found} model, not {expected}; pass a checkpoint written by a {expected} run"
        )


def load_recbole_checkpoint(load, *args, **kwargs):
    """How RecBole's checkpoint readers load under causalrec (B12).

    1. A path is inspected first (``torch_file_problem``): a damaged file is a ``CheckpointError`` that names it
       and says to delete it or train again, whatever ``CAUSALREC_TRUST_CHECKPOINTS`` says.
    2. Restricted unpickling (``weights_only=True`` + the allow-list).
    3. If that refuses a global, the file is whole but untrusted: full unpickling only for a file this process
       wrote or with ``CAUSALREC_TRUST_CHECKPOINTS=1``, else a ``CheckpointError`` that says so.
    A read error torch raises on a file that passed the inspection (e.g. a file object) is the damaged error too;
    any other exception is a bug and propagates.
    """
    path = _checkpoint_path(args, kwargs)
    target = args[0] if args else kwargs.get("f")
    if isinstance(target, (str, os.PathLike)):
        problem = torch_file_problem(target)
        if problem is not None:
            raise _damaged_error(path, problem)
    try:
        checkpoint = _restricted_load(load, args, kwargs)
    except pickle.UnpicklingError:
        if not _trusted(path):
            raise CheckpointError(
                f"checkpoint {path!r} cannot be read safely (it holds objects outside causalrec's allow-list, or was "
                f"written with pickle protocol 4 by RecBole without causalrec): reading it would unpickle arbitrary "
                f"code. If you trust the file, set {TRUST_ENV}=1 or load it inside causalrec.recbole.checkpoints.trusted_torch_load()"
            ) from None
        _log.debug(
            "checkpoint %s: full unpickling (%s)",
            path,
            "written by this process" if os.path.realpath(path) in _WRITTEN else TRUST_ENV,
        )
        try:
            checkpoint = load(*args, **{**kwargs, "weights_only": False})
        except _READ_ERRORS as err:
            if isinstance(err, _BUGS):
                raise
            raise _damaged_error(path, f"torch cannot read it ({_first_line(err)})") from None
    except _READ_ERRORS as err:  # not an unpickling error: torch's reader failed on the file
        if isinstance(err, _BUGS):
            raise
        raise _damaged_error(path, f"torch cannot read it ({_first_line(err)})") from None
    _check_model(checkpoint, path)
    return checkpoint


@contextlib.contextmanager
def _recbole_checkpoint_reading(expected_model: str | None = None) -> Iterator[None]:
    """Inside, ``torch.load`` without an explicit ``weights_only`` goes through ``load_recbole_checkpoint``."""
    import torch

    original = torch.load
    if getattr(original, "_causalrec_trusted", False) or getattr(original, "_causalrec_reader", False):
        token = _EXPECTED_MODEL.set(expected_model) if expected_model else None
        try:
            yield
        finally:
            if token is not None:
                _EXPECTED_MODEL.reset(token)
        return

    @functools.wraps(original)
    def load(*args, **kwargs):
        if "weights_only" in kwargs:  # an explicit choice (transformers, TRL, causalrec) is respected
            return original(*args, **kwargs)
        return load_recbole_checkpoint(original, *args, **kwargs)

    load._causalrec_reader = True
    token = _EXPECTED_MODEL.set(expected_model)
    torch.load = load
    try:
        yield
    finally:
        torch.load = original
        _EXPECTED_MODEL.reset(token)


def _wrap_checkpoint_reader(owner, name: str) -> None:
    function = getattr(owner, name)
    if getattr(function, "_causalrec_wrapped", False):
        return

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        trainer_config = getattr(args[0], "config", None) if args else None
        expected = (
            trainer_config["model"] if trainer_config is not None and hasattr(trainer_config, "__getitem__") else None
        )
        with _recbole_checkpoint_reading(expected if isinstance(expected, str) else None):
            try:
                return function(*args, **kwargs)
            except RuntimeError as err:  # load_state_dict: another architecture or size
                if "Error(s) in loading state_dict" not in str(err):
                    raise
                first = str(err).strip().splitlines()[0]
                raise CheckpointError(
                    f"the checkpoint does not fit this model ({first}): it was written by another "
                    "model or configuration; pass a checkpoint of this model and config"
                ) from None

    wrapper._causalrec_wrapped = True
    setattr(owner, name, wrapper)


def atomic_torch_save(obj: Any, path: str | os.PathLike, **kwargs) -> None:
    """``torch.save`` through ``io.atomic_path`` (fsynced): a killed run leaves the old file or the new one, never
    half of one. Pickle protocol 2, which ``torch.load(weights_only=True)`` can read. The file is remembered as
    written by this process (see ``_trusted``)."""
    import torch

    kwargs["pickle_protocol"] = 2
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle, **kwargs)  # a file object: RecBole's patched torch.save passes it through
    real = os.path.realpath(path)
    _WRITTEN[real] = _stat_key(real)
