"""Experiments on top of ``causalrec.run``: comparisons (models x splits x seeds) and Optuna tuning.

* ``causalrec.compare`` / ``CompareConfig`` (``causalrec compare``): cached cells, results.csv, mean ± std tables with
  the OOD drop, paired significance against a baseline, plots (``causalrec.experiments.compare``, ``.report``);
* ``causalrec.tune`` / ``TuneConfig`` (``causalrec tune``): an Optuna study on the OOD validation metric with pruning,
  resumable storage and the best trial as a RecBole YAML (``causalrec.experiments.tune``);
* ``SearchSpace``: search-space YAML files (``tuning/<model>.yaml``, ``causalrec.experiments.space``).

Loaded on first use, so ``import causalrec`` does not import Optuna, scipy or matplotlib. (The functions are
``causalrec.compare`` and ``causalrec.tune``; here ``compare`` and ``tune`` are the submodules.)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CompareConfig": "causalrec.experiments.compare",
    "TuneConfig": "causalrec.experiments.tune",
    "SearchSpace": "causalrec.experiments.space",
    "SearchParam": "causalrec.experiments.space",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
