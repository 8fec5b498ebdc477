"""The RecBole adapter: the only package that imports RecBole, patches it, or writes into its namespaces.

Importing it applies the stack patches (``patches``), registers causalrec's models, trainers, YAML properties
and datasets with RecBole (``plugin``), and exposes ``run`` (``quick_start``).
"""

from causalrec.recbole import patches as _patches

_patches.apply()  # before anything imports recbole.quick_start (numpy aliases for ray)

from causalrec.recbole import plugin as _plugin  # noqa: E402

LLM_MODELS = {"GenRec": "genrec", "SDPORec": "sdporec", "CausalDPO": "causaldpo"}

_plugin.install()
for _name, _module in LLM_MODELS.items():
    _plugin.register_model(_name, f"causalrec.recbole.models.{_module}", flops=False)
from causalrec.recbole.trainer import LLMTrainer as _LLMTrainer  # noqa: E402

for _name in LLM_MODELS:
    _plugin.register_trainer(_name, _LLMTrainer)

from causalrec.recbole.quick_start import run  # noqa: E402

__all__ = ["LLM_MODELS", "run"]
