"""causalrec: generative LLM recommenders fine-tuned with TRL, and CausalDPO, as a RecBole plugin.

``import causalrec`` is enough for RecBole's own entry points
(``recbole.quick_start.run_recbole(model="CausalDPO", dataset="retail-sim")``) to find
causalrec's models, trainers, YAML properties and datasets.
"""

from causalrec import compat as _compat

_compat.apply()  # before anything imports recbole.quick_start (numpy aliases for ray)

from causalrec import registry as _registry  # noqa: E402
from causalrec.errors import CausalRecError  # noqa: E402

__version__ = "0.1.0"

_registry.install()
for _name, _module in (("GenRec", "causalrec.models.genrec"), ("SDPORec", "causalrec.models.sdporec"), ("CausalDPO", "causalrec.models.causaldpo")):
    _registry.register_model(_name, _module, flops=False)
from causalrec.trainer import LLMTrainer as _LLMTrainer  # noqa: E402
for _name in ("GenRec", "SDPORec", "CausalDPO"):
    _registry.register_trainer(_name, _LLMTrainer)

from causalrec.quick_start import run  # noqa: E402

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
