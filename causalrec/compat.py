"""The one place that adapts RecBole 1.2.1 to today's numpy / torch / scipy / pandas.

Each patch is idempotent, guarded by a feature check, and has a test in
``tests/test_compat.py`` that shows the failure it fixes. Upstream references are in
``../shared/notes/recbole-trl-optuna-internals.md`` §1.6 (B1-B8). When RecBole ships a fix,
the guard turns the patch into a no-op and its test says so.

Besides the stack breakages, four reliability patches live here, as the only place that patches
RecBole: its config strings are parsed as literals, not ``eval``-ed (B11); its checkpoints are written
atomically and read with ``torch.load(weights_only=True)`` and an allow-list (B12); and its dataset/dataloader
pickles are read only when the user turned RecBole's saving of them on (B13); and RecBole's global
``set_detect_anomaly(True)`` is undone (B14). ``docs/guarantees.md`` says
what each guarantees. One performance patch: RecBole's ``Trainer.fit`` runs with glibc's malloc keeping
large freed blocks instead of unmapping them (B15).

``apply()`` runs at ``import causalrec``, before anything imports ``recbole``.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import importlib
import logging
import os
import re
import threading
from typing import Any, Iterator

import numpy as np
import yaml

from causalrec.errors import CausalRecError, CheckpointError, TrainingError

_log = logging.getLogger(__name__)

# numpy 2 removed these aliases; RecBole reads them in Config.compatibility_settings (B1),
# ray 2.6.3 reads np.bool8 at import (B2), RecBole's metrics use np.float / np.bool (B3).
_NUMPY_ALIASES = {
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
    "bool8": np.bool_,
    "int_": np.int_,
    "float": float,
    "int": int,
    "bool": bool,
    "object": object,
    "str": str,
    "complex": complex,
    "long": np.int_,
    "unicode": np.str_,
}

_applied: set[str] = set()


def patch_numpy_aliases() -> list[str]:
    """Define the numpy aliases RecBole 1.2.1 and ray 2.6.3 still use. Returns the names added."""
    added = []
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)
            added.append(name)
    return added


def patch_scipy_dok_update() -> bool:
    """scipy >= 1.13 removed ``dok_matrix._update``, which LightGCN/NGCF/... call to build the graph (B8)."""
    import scipy.sparse as sp

    if hasattr(sp.dok_matrix, "_update"):
        return False

    def _update(self, data):
        # What the removed method did: a raw dict update, bypassing per-item validation.
        self._dict.update(data)

    sp.dok_matrix._update = _update
    return True


def stub_ray_if_broken() -> bool:
    """RecBole's quick_start does ``from ray import tune`` at import, for its Ray hyper-tuning only.

    ray 2.6.3 (RecBole's pin) has no wheels past Python 3.11 and imports ``pkg_resources``,
    which setuptools >= 81 no longer ships (B9, B10). When ray cannot be imported, register a
    stub ``ray``/``ray.tune`` whose ``tune.report`` does nothing; causalrec tunes with Optuna.
    """
    import importlib
    import sys
    import types

    if "ray" in sys.modules and getattr(sys.modules["ray"], "_causalrec_stub", False):
        return True
    try:
        importlib.import_module("ray.tune")
        return False
    except Exception as err:  # ImportError, or ray failing inside its own import
        _log.debug("ray unusable (%s); using a stub for recbole.quick_start", err)
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        del sys.modules[name]  # drop a half-imported ray
    ray = types.ModuleType("ray", "causalrec stub: ray is not importable here")
    tune = types.ModuleType("ray.tune")
    tune.report = lambda *args, **kwargs: None
    ray.tune, ray._causalrec_stub = tune, True
    sys.modules["ray"], sys.modules["ray.tune"] = ray, tune
    return True


def check_pandas() -> None:
    """pandas 3's copy-on-write makes RecBole 1.2.1 ignore in-place fills and break on
    ``agg(len)`` (B5-B7) without an error; refuse to run rather than give wrong data."""
    import pandas as pd

    if int(pd.__version__.split(".")[0]) >= 3:
        raise CausalRecError(
            f"pandas {pd.__version__} is installed, but RecBole 1.2.1 silently mis-loads data with pandas 3 "
            "(copy-on-write). Install a supported version: pip install 'pandas>=2.2,<3'"
        )


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


# --------------------------------------------------------------------------- config parsing (B11)
class RecBoleYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float, as RecBole's own (unsafe) loader does.

    Plain YAML 1.1 needs a dot in a float (``1.0e-3``); RecBole's YAML files and users write ``1e-3``.
    causalrec reads every config file with this loader, and RecBole's ``Config`` uses it too (B11).
    """


RecBoleYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no Python objects), with RecBole's float syntax."""
    return yaml.load(text, Loader=RecBoleYamlLoader)  # noqa: S506 - a SafeLoader subclass


def literal_value(value: Any) -> Any:
    """What RecBole's ``Config`` makes of a string value, without running it: a Python literal
    (``"[10, 20]"`` -> ``[10, 20]``, ``"1e-3"`` -> ``0.001``), ``true``/``false``, or the string itself."""
    if not isinstance(value, str):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        lowered = value.lower()
        return True if lowered == "true" else False if lowered == "false" else value
    return parsed if parsed is None or isinstance(parsed, (str, int, float, list, tuple, dict, bool)) else value


def patch_recbole_config_parsing() -> bool:
    """RecBole's ``Config`` runs ``eval()`` on every string value of ``config_dict`` and the command line
    (``_convert_config_dict``), so ``data_path: "__import__('os').system('...')"`` in a config file or a
    ``--param`` would run code; and it reads YAML with ``yaml.FullLoader``. Parse literals with
    ``ast.literal_eval`` instead, and read YAML with ``RecBoleYamlLoader`` (B11)."""
    from recbole.config.configurator import Config

    if getattr(Config._convert_config_dict, "_causalrec", False):
        return False

    def _convert_config_dict(self, config_dict):
        for key in config_dict:
            config_dict[key] = literal_value(config_dict[key])
        return config_dict

    def _build_yaml_loader(self):
        return RecBoleYamlLoader

    _convert_config_dict._causalrec = True
    Config._convert_config_dict = _convert_config_dict
    Config._build_yaml_loader = _build_yaml_loader
    return True


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
    allowed += [getattr(enum_type, n) for n in ("ModelType", "KGDataLoaderState", "EvaluatorType", "InputType",
                                                "FeatureType", "FeatureSource") if hasattr(enum_type, n)]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                             "uint8", "bool")]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return allowed + [scalar]


def _model_class(name: str):
    """The class a checkpoint names, if it is a recommender model (RecBole's or a registered one), else None."""
    module_name, _, attr = name.rpartition(".")
    if not (module_name.startswith("recbole.model.") or module_name.startswith("causalrec.models.")):
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    from recbole.model.abstract_recommender import AbstractRecommender

    return obj if isinstance(obj, type) and issubclass(obj, AbstractRecommender) else None


def _restricted_load(load, args, kwargs):
    """``torch.load(weights_only=True)`` with the allow-list, plus the model class the checkpoint names."""
    import torch

    allowed = _checkpoint_allow_list()
    for _ in range(4):
        try:
            with torch.serialization.safe_globals(allowed):
                return load(*args, **{**kwargs, "weights_only": True})
        except Exception as err:  # torch raises UnpicklingError with the offending global in its message
            match = re.search(r"GLOBAL ([\w\.]+) was not an allowed global|Unsupported global: GLOBAL ([\w\.]+)", str(err))
            cls = _model_class(match.group(1) or match.group(2)) if match else None
            if cls is None or cls in allowed:
                raise
            allowed.append(cls)
    raise RuntimeError("too many model classes in one checkpoint")


def _checkpoint_path(args, kwargs) -> str:
    target = args[0] if args else kwargs.get("f")
    return os.fspath(target) if isinstance(target, (str, os.PathLike)) else repr(target)


def _damaged(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, (EOFError, FileNotFoundError)) or any(s in text for s in (
        "PytorchStreamReader", "failed finding central directory", "BadZipFile", "truncated", "invalid load key",
        "unpickling stack underflow", "Ran out of input", "not a zip file"))


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
        raise CheckpointError(f"checkpoint {path!r} holds a {found} model, not {expected}; "
                              f"pass a checkpoint written by a {expected} run")


def load_recbole_checkpoint(load, *args, **kwargs):
    """How RecBole's checkpoint readers load under causalrec (B12): restricted unpickling first; full
    unpickling only for a file this process wrote or with ``CAUSALREC_TRUST_CHECKPOINTS=1``; a missing,
    truncated or foreign file is a ``CheckpointError``."""
    path = _checkpoint_path(args, kwargs)
    try:
        checkpoint = _restricted_load(load, args, kwargs)
    except Exception as err:
        if _damaged(err):
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(f"cannot read checkpoint {path!r}: {first}. The file is missing, truncated or "
                                  "not a RecBole checkpoint; train again or pass the right file") from None
        if not _trusted(path):
            raise CheckpointError(
                f"checkpoint {path!r} cannot be read safely (it holds objects outside causalrec's allow-list, or was "
                f"written with pickle protocol 4 by RecBole without causalrec): reading it would unpickle arbitrary "
                f"code. If you trust the file, set {TRUST_ENV}=1 or load it inside causalrec.compat.trusted_torch_load()"
            ) from None
        _log.debug("checkpoint %s: full unpickling (%s)", path, "written by this process" if os.path.realpath(path)
                   in _WRITTEN else TRUST_ENV)
        checkpoint = load(*args, **{**kwargs, "weights_only": False})
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
        expected = trainer_config["model"] if trainer_config is not None and hasattr(trainer_config, "__getitem__") else None
        with _recbole_checkpoint_reading(expected if isinstance(expected, str) else None):
            try:
                return function(*args, **kwargs)
            except RuntimeError as err:  # load_state_dict: another architecture or size
                if "Error(s) in loading state_dict" not in str(err):
                    raise
                first = str(err).strip().splitlines()[0]
                raise CheckpointError(f"the checkpoint does not fit this model ({first}): it was written by another "
                                      "model or configuration; pass a checkpoint of this model and config") from None

    wrapper._causalrec_wrapped = True
    setattr(owner, name, wrapper)


def patch_recbole_checkpoint_loading() -> None:
    """Route the RecBole entry points that read checkpoints through ``load_recbole_checkpoint`` (B4, B12)."""
    import recbole.quick_start as quick_start_pkg
    import recbole.quick_start.quick_start as quick_start
    from recbole.trainer import Trainer

    _wrap_checkpoint_reader(Trainer, "resume_checkpoint")
    _wrap_checkpoint_reader(Trainer, "evaluate")
    _wrap_checkpoint_reader(quick_start, "load_data_and_model")
    quick_start_pkg.load_data_and_model = quick_start.load_data_and_model


def atomic_torch_save(obj: Any, path: str | os.PathLike, **kwargs) -> None:
    """``torch.save`` into a temp file next to ``path``, then ``os.replace``: a killed run leaves the old file or
    the new one, never half of one. Pickle protocol 2, which ``torch.load(weights_only=True)`` can read."""
    import tempfile

    import torch

    path = os.fspath(path)
    kwargs["pickle_protocol"] = 2
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle, **kwargs)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    real = os.path.realpath(path)
    _WRITTEN[real] = _stat_key(real)


def patch_atomic_checkpoints() -> list[str]:
    """RecBole's trainers ``torch.save`` checkpoints in place (a kill mid-write leaves a truncated file that
    ``evaluate`` later fails on), with pickle protocol 4 (unreadable by ``weights_only``). Route every
    ``_save_checkpoint`` through ``atomic_torch_save`` (B12). Returns the classes patched."""
    import recbole.trainer.trainer as trainers
    import torch

    patched = []
    for name in dir(trainers):
        cls = getattr(trainers, name)
        if not (isinstance(cls, type) and "_save_checkpoint" in vars(cls)):
            continue
        function = vars(cls)["_save_checkpoint"]
        if getattr(function, "_causalrec_wrapped", False):
            continue

        def make(function):
            @functools.wraps(function)
            def wrapper(*args, **kwargs):
                original = torch.save

                def save(obj, f, *a, **kw):
                    if isinstance(f, (str, os.PathLike)):
                        return atomic_torch_save(obj, f, **kw)
                    return original(obj, f, *a, **kw)

                torch.save = save
                try:
                    return function(*args, **kwargs)
                finally:
                    torch.save = original

            wrapper._causalrec_wrapped = True
            return wrapper

        setattr(cls, "_save_checkpoint", make(function))
        patched.append(name)
    return patched


# ------------------------------------------------------------------------- dataset pickles (B13)
def patch_recbole_pickle_caches() -> bool:
    """RecBole's ``create_dataset`` / ``data_preparation`` unpickle ``<checkpoint_dir>/<dataset>-*.pth`` (or
    ``dataset_save_path`` / ``dataloaders_save_path``) whenever such a file exists, even with saving off: a file
    there runs code, and a stale one silently replaces the data. Read them only when ``save_dataset`` /
    ``save_dataloaders`` is on (the user's opt-in to RecBole's pickle caches) (B13)."""
    import recbole.data as data_pkg
    import recbole.data.utils as data_utils
    import recbole.quick_start.quick_start as quick_start

    if getattr(data_utils.create_dataset, "_causalrec", False):
        return False
    create_dataset, load_split_dataloaders = data_utils.create_dataset, data_utils.load_split_dataloaders

    @functools.wraps(create_dataset)
    def create_dataset_guarded(config):
        if config["save_dataset"]:
            return create_dataset(config)
        saved = config["dataset_save_path"]
        config["dataset_save_path"] = os.path.join(os.path.abspath(os.sep), "causalrec-no-such-dir", "none.pth")
        try:
            return create_dataset(config)
        finally:
            config["dataset_save_path"] = saved

    @functools.wraps(load_split_dataloaders)
    def load_split_dataloaders_guarded(config):
        return load_split_dataloaders(config) if config["save_dataloaders"] else None

    create_dataset_guarded._causalrec = True
    for module in (data_utils, data_pkg, quick_start):
        if getattr(module, "create_dataset", None) is create_dataset:
            module.create_dataset = create_dataset_guarded
    data_utils.load_split_dataloaders = load_split_dataloaders_guarded
    return True


def patch_anomaly_mode() -> bool:
    """RecBole's ``sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)`` at import,
    and the package imports every sequential model, so registering causalrec's models turned anomaly detection
    on for the whole process: every backward pass records forward tracebacks (LLM training several times
    slower) and a NaN gradient raises a bare ``RuntimeError``. Import the package here and restore the setting
    it had before (B14). Returns True when it had to be restored."""
    import torch

    before = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender  # noqa: F401  (runs sine.py)

    if torch.is_anomaly_enabled() and not before:
        torch.autograd.set_detect_anomaly(False)
        return True
    return False


def patch_nan_check() -> bool:
    """RecBole's epoch loop raises a bare ``ValueError("Training loss is nan")`` (a traceback in the CLI) and
    lets ``inf`` through. Raise a ``TrainingError`` for either."""
    from recbole.trainer import Trainer

    if getattr(Trainer._check_nan, "_causalrec", False):
        return False

    def _check_nan(self, loss):
        import torch

        if not bool(torch.isfinite(loss).all()):
            raise TrainingError(
                f"{self.config['model']} training loss is {loss.float().mean().item()}; training stopped and the last "
                "saved checkpoint is kept. Lower learning_rate or set clip_grad_norm"
            )

    _check_nan._causalrec = True
    Trainer._check_nan = _check_nan
    return True


def patch_pop_counting() -> bool:
    """RecBole's Pop counts ``item_cnt[item] = item_cnt[item] + 1``: an item bought k times in one
    batch is counted once, so with RecBole's default batch sizes Pop ranks by "batches containing
    the item", not by popularity (and sampled negative rows, when present, are counted too).
    Count each positive training row exactly once instead. Not a stack breakage: an upstream bug
    that makes the most common baseline wrong."""
    from recbole.model.general_recommender.pop import Pop

    if getattr(Pop.calculate_loss, "_causalrec", False):
        return False

    def calculate_loss(self, interaction):
        item = interaction[self.ITEM_ID]
        if "label" in interaction.interaction:  # RecBole's LABEL_FIELD default, set by its negative sampler
            item = item[interaction["label"] > 0]
        self.item_cnt.index_add_(0, item, torch.ones(len(item), 1, dtype=self.item_cnt.dtype, device=item.device))
        self.max_cnt = torch.max(self.item_cnt, dim=0)[0]
        return torch.nn.Parameter(torch.zeros(1)).to(self.device)

    import torch

    calculate_loss._causalrec = True
    Pop.calculate_loss = calculate_loss
    return True


# ------------------------------------------------------------------------------ CPU allocator (B15)
# glibc serves every block above 32 MiB with a fresh mmap and unmaps it on free (mallopt cannot raise that
# threshold further). A SASRec batch (2048 x 50 x 256 floats = 105 MB per activation) allocates dozens of such
# tensors per step, so each step re-faults gigabytes of zeroed pages: on retail-sim 42 % of a training step was
# kernel time (4 M page faults per 4 steps). Serving them from the heap and not trimming it removes that.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
MALLOC_ENV = "CAUSALREC_MALLOC_TUNING"
_heap_lock = threading.Lock()
_heap_depth = 0


def _glibc():
    """glibc's ``mallopt``/``malloc_trim``, or None where B15 must not act: not glibc, turned off with
    ``CAUSALREC_MALLOC_TUNING=0``, or the user tuned malloc (``GLIBC_TUNABLES``, ``MALLOC_*_``, a preloaded
    jemalloc/tcmalloc)."""
    import ctypes
    import platform

    if os.environ.get(MALLOC_ENV, "1").lower() in ("0", "false", "no", "off"):
        return None
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def heap_allocator_active() -> bool:
    """Whether ``heap_allocator`` is in effect now."""
    return _heap_depth > 0


@contextlib.contextmanager
def heap_allocator() -> Iterator[None]:
    """Inside, glibc serves large blocks from its heap and keeps freed memory for reuse (no mmap per tensor,
    no page faults per step); on exit its default settings come back and the freed memory is returned to the
    OS (``malloc_trim``). Process-wide while active (mallopt is global); nests. A no-op where ``_glibc()`` is
    None. The cost: the process's memory stays at its peak while inside (RecBole's SASRec on retail-sim:
    3.6 GB instead of 3.1 GB peak)."""
    global _heap_depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        if _heap_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: glibc's mallopt takes one
        _heap_depth += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_depth -= 1
            if _heap_depth == 0:
                for param, value in _GLIBC_DEFAULTS.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


def patch_trainer_allocator() -> bool:
    """Run RecBole's ``Trainer.fit`` (every classical model; its subclasses call it) inside ``heap_allocator``:
    SASRec on retail-sim trains 1.7x faster per CPU second, bitwise the same (B15)."""
    from recbole.trainer import Trainer

    if getattr(Trainer.fit, "_causalrec", False):
        return False
    fit = Trainer.fit

    @functools.wraps(fit)
    def fit_on_heap(*args, **kwargs):
        with heap_allocator():
            return fit(*args, **kwargs)

    fit_on_heap._causalrec = True
    Trainer.fit = fit_on_heap
    return True


def apply() -> None:
    """Apply every patch once. Safe to call repeatedly."""
    if "all" in _applied:
        return
    check_pandas()
    added = patch_numpy_aliases()
    if added:
        _log.debug("numpy aliases added for RecBole/ray: %s", added)
    patch_scipy_dok_update()
    stub_ray_if_broken()
    patch_recbole_config_parsing()
    patch_recbole_checkpoint_loading()
    patch_atomic_checkpoints()
    patch_recbole_pickle_caches()
    patch_nan_check()
    patch_anomaly_mode()
    patch_pop_counting()
    patch_trainer_allocator()
    _applied.add("all")
