"""The one place that adapts RecBole 1.2.1 to today's numpy / torch / scipy / pandas.

Each patch is idempotent, guarded by a feature check, and has a test in
``tests/test_compat.py`` that shows the failure it fixes. Upstream references are in
``../shared/notes/recbole-trl-optuna-internals.md`` §1.6 (B1-B8). When RecBole ships a fix,
the guard turns the patch into a no-op and its test says so.

``apply()`` runs at ``import causalrec``, before anything imports ``recbole``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator

import numpy as np

from causalrec.errors import CausalRecError

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
    """Let RecBole's own ``torch.load`` calls read the checkpoints RecBole writes (B4).

    torch >= 2.6 defaults to ``weights_only=True``, and RecBole's checkpoints pickle the whole
    ``Config`` object, so every ``evaluate(load_best_model=True)`` fails. Inside this context a
    ``torch.load`` that does not choose ``weights_only`` itself gets ``False``; calls that choose
    (transformers, TRL, causalrec's own loaders) are untouched. Only wrap code that loads
    checkpoints this process wrote or the user trusts.
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


def _wrap_with_trusted_load(owner, name: str) -> None:
    function = getattr(owner, name)
    if getattr(function, "_causalrec_wrapped", False):
        return

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with trusted_torch_load():
            return function(*args, **kwargs)

    wrapper._causalrec_wrapped = True
    setattr(owner, name, wrapper)


def patch_recbole_checkpoint_loading() -> None:
    """Scope ``trusted_torch_load`` to the RecBole entry points that read checkpoints (B4)."""
    import recbole.quick_start as quick_start_pkg
    import recbole.quick_start.quick_start as quick_start
    from recbole.trainer import Trainer

    _wrap_with_trusted_load(Trainer, "resume_checkpoint")
    _wrap_with_trusted_load(Trainer, "evaluate")
    _wrap_with_trusted_load(quick_start, "load_data_and_model")
    quick_start_pkg.load_data_and_model = quick_start.load_data_and_model


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
    patch_recbole_checkpoint_loading()
    patch_pop_counting()
    _applied.add("all")
