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

import functools
import importlib
import logging
import os

import numpy as np

from causalrec.allocator import heap_allocator
from causalrec.errors import CausalRecError, TrainingError
from causalrec.io import RecBoleYamlLoader, literal_value
from causalrec.recbole.checkpoints import _wrap_checkpoint_reader, atomic_torch_save

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


def patch_recbole_checkpoint_loading() -> None:
    """Route the RecBole entry points that read checkpoints through ``load_recbole_checkpoint`` (B4, B12)."""
    import recbole.quick_start as quick_start_pkg
    import recbole.quick_start.quick_start as quick_start
    from recbole.trainer import Trainer

    _wrap_checkpoint_reader(Trainer, "resume_checkpoint")
    _wrap_checkpoint_reader(Trainer, "evaluate")
    _wrap_checkpoint_reader(quick_start, "load_data_and_model")
    quick_start_pkg.load_data_and_model = quick_start.load_data_and_model


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

        cls._save_checkpoint = make(function)
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


# ------------------------------------------------------------------------------ log folders (B16)
_LOG_ROOT: list[str | None] = [None]  # the log_dir of the last init_logger, for get_tensorboard (no config there)


def patch_log_dir() -> bool:
    """RecBole writes its log to ``./log/`` and TensorBoard events to ``./log_tensorboard/`` (constants in
    ``init_logger`` and ``get_tensorboard``), wherever the run's checkpoints go. With the config key ``log_dir`` set
    (``causalrec.run`` sets it to ``checkpoint_dir``), both go under it instead (``<log_dir>/log/<model>/...``,
    ``<log_dir>/log_tensorboard/...``), so a run writes under one folder. Unset: RecBole's behaviour (B16)."""
    import recbole.quick_start.quick_start as quick_start
    import recbole.trainer.trainer as trainer_module
    import recbole.utils as utils
    import recbole.utils.logger as logger_module

    original = logger_module.init_logger
    if getattr(original, "_causalrec", False):
        return False
    original_tensorboard = trainer_module.get_tensorboard

    def init_logger(config):
        root = config["log_dir"]
        _LOG_ROOT[0] = root
        if not root:
            return original(config)
        # RecBole's init_logger with LOGROOT under log_dir: its body, with the one constant replaced.
        import hashlib

        from colorama import init

        init(autoreset=True)
        folder = os.path.join(root, "log", config["model"])
        os.makedirs(folder, exist_ok=True)
        config_str = "".join(str(key) for key in config.final_config_dict.values())
        md5 = hashlib.md5(config_str.encode(encoding="utf-8")).hexdigest()[:6]
        name = f"{config['model']}-{config['dataset']}-{utils.get_local_time()}-{md5}.log"
        state = str(config["state"] or "info").upper()
        level = getattr(logging, state) if state in ("INFO", "DEBUG", "ERROR", "WARNING", "CRITICAL") else logging.INFO
        file_handler = logging.FileHandler(os.path.join(folder, name))
        file_handler.setLevel(level)
        file_handler.setFormatter(
            logging.Formatter("%(asctime)-15s %(levelname)s  %(message)s", "%a %d %b %Y %H:%M:%S")
        )
        file_handler.addFilter(logger_module.RemoveColorFilter())
        stream_handler = logging.StreamHandler()
        stream_handler.setLevel(level)
        stream_handler.setFormatter(
            logger_module.colorlog.ColoredFormatter(
                "%(log_color)s%(asctime)-15s %(levelname)s  %(message)s",
                "%d %b %H:%M",
                log_colors=logger_module.log_colors_config,
            )
        )
        logging.basicConfig(level=level, handlers=[stream_handler, file_handler])

    def get_tensorboard(logger):
        root = _LOG_ROOT[0]
        if not root:
            return original_tensorboard(logger)
        from torch.utils.tensorboard import SummaryWriter

        name = next(
            (os.path.basename(h.baseFilename).split(".")[0] for h in logger.handlers if hasattr(h, "baseFilename")),
            f"model-{utils.get_local_time()}",
        )
        return SummaryWriter(os.path.join(root, "log_tensorboard", name))

    init_logger._causalrec = True
    for module in (logger_module, utils, quick_start):
        module.init_logger = init_logger
    trainer_module.get_tensorboard = get_tensorboard
    return True


# --------------------------------------------------------------------------- concurrent folders (B17)
def patch_ensure_dir() -> list[str]:
    """RecBole's ``ensure_dir`` checks ``os.path.exists`` and then ``os.makedirs``: two processes of one launch
    (``accelerate launch``, ``torchrun``) that both create ``saved/`` or ``log/`` race, and the loser dies with
    ``FileExistsError``. ``os.makedirs(exist_ok=True)`` has no such window (B17). Returns the modules patched."""

    def ensure_dir(dir_path):
        os.makedirs(dir_path, exist_ok=True)

    ensure_dir._causalrec = True
    patched = []
    for name in (
        "recbole.utils.utils",
        "recbole.utils",
        "recbole.utils.logger",
        "recbole.trainer.trainer",
        "recbole.data.utils",
        "recbole.data.dataset.dataset",
    ):
        module = importlib.import_module(name)
        if hasattr(module, "ensure_dir") and not getattr(module.ensure_dir, "_causalrec", False):
            module.ensure_dir = ensure_dir
            patched.append(name)
    return patched


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
    patch_log_dir()
    patch_ensure_dir()
    _applied.add("all")
