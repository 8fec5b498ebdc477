"""causalrec: generative LLM recommenders fine-tuned with TRL, and CausalDPO, as a RecBole plugin.

``import causalrec`` is enough for RecBole's own entry points
(``recbole.quick_start.run_recbole(model="CausalDPO", dataset="retail-sim")``) to find
causalrec's models, trainers, YAML properties and datasets.
"""

import importlib.util as _importlib_util

from causalrec.errors import CausalRecError

__version__ = "0.1.0"

# The RecBole plugin installs itself when RecBole is there, so that ``import causalrec`` is all RecBole's own
# entry points need; without RecBole, the data, LLM and training layers still import (they never import it).
try:
    _HAS_RECBOLE = _importlib_util.find_spec("recbole") is not None
except (ImportError, ValueError):  # blocked or half-installed
    _HAS_RECBOLE = False
if _HAS_RECBOLE:
    from causalrec.recbole import run  # noqa: E402  (installs patches, models, trainers and properties)

__all__ = ["CausalRecError", "compare", "run", "tune", "__version__"]


def __getattr__(name: str):
    """``causalrec.compare`` and ``causalrec.tune`` load on first use (PEP 562): Optuna, scipy and matplotlib
    stay out of ``import causalrec``."""
    if name == "compare":
        from causalrec.experiments.compare import compare

        return compare
    if name == "tune":
        from causalrec.experiments.tune import tune

        return tune
    raise AttributeError(f"module 'causalrec' has no attribute {name!r}")
