"""Make RecBole see causalrec: models, trainers, YAML properties and prepared datasets.

RecBole 1.2.1 has no plugin discovery (notes §1.1, §1.3), so ``install()`` — run once at
``import causalrec`` — does what its entry points need:

* models: a module ``recbole.model.sequential_recommender.<name lower>`` in ``sys.modules``
  (``get_model`` finds modules with ``importlib.util.find_spec``); it is a lazy module, so
  ``import causalrec`` does not import transformers/TRL;
* trainers: ``recbole.trainer.<Model>Trainer`` (``get_trainer`` uses ``getattr``);
* YAML: ``Config._load_internal_config_dict`` also reads causalrec's
  ``properties/model/<Model>.yaml`` and ``properties/dataset/<dataset>.yaml``, after RecBole's
  own files (as RecBole-GNN does), from a checkout or an installed wheel;
* datasets: after RecBole merged the config, a causalrec dataset (``retail-sim``,
  ``online-retail``, ``csv``, or ``ml-100k`` with a ``split``) is prepared on disk and the
  config points RecBole at the prepared benchmark files (``causalrec.recbole.protocol``);
* evaluation protocol: RecBole's ``data_preparation`` as seen by ``run_recbole`` applies the
  same history-masking rule to every model (``causalrec.recbole.protocol.apply_history_protocol``).

This is the only module that writes into RecBole's namespaces.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.resources
import logging
import os
import sys
import types
from pathlib import Path

_log = logging.getLogger(__name__)

# Model name -> module that defines it. Filled by register_model; the shipped LLM models are
# added in causalrec/__init__.py.
MODELS: dict[str, str] = {}
# Models whose FLOPs RecBole must not profile (get_flops deep-copies the model).
NO_FLOPS: set[str] = set()
_PLUGIN_PACKAGE = "recbole.model.sequential_recommender"


def properties_dir() -> Path:
    """causalrec's RecBole YAML folder: ``properties/`` in a checkout, ``causalrec/_properties`` in a wheel."""
    checkout = Path(__file__).resolve().parent.parent / "properties"
    if (checkout / "model").is_dir():
        return checkout
    return Path(str(importlib.resources.files("causalrec._properties")))


def tuning_dir() -> Path:
    """The shipped Optuna search spaces (``tuning/`` in a checkout, ``causalrec/_tuning`` in a wheel)."""
    checkout = Path(__file__).resolve().parent.parent / "tuning"
    if checkout.is_dir() and any(checkout.glob("*.yaml")):
        return checkout
    return Path(str(importlib.resources.files("causalrec._tuning")))


def _lazy_model_module(model_name: str, target: str) -> types.ModuleType:
    name = f"{_PLUGIN_PACKAGE}.{model_name.lower()}"
    module = types.ModuleType(name, f"causalrec model {model_name} (defined in {target})")
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)

    def __getattr__(attr):  # PEP 562: resolved on first use by RecBole's get_model
        real = importlib.import_module(target)
        return getattr(real, attr)

    module.__getattr__ = __getattr__
    return module


def register_model(model_name: str, target_module: str, *, flops: bool = True) -> None:
    """Make ``get_model(model_name)`` return ``getattr(import_module(target_module), model_name)``."""
    import recbole.model.sequential_recommender as package

    module = _lazy_model_module(model_name, target_module)
    sys.modules[module.__name__] = module
    setattr(package, model_name.lower(), module)
    MODELS[model_name] = target_module
    if not flops:
        NO_FLOPS.add(model_name)


def model_class(model_name: str) -> type | None:
    """The class of a model registered here (causalrec's LLM models), or None for RecBole's own."""
    target = MODELS.get(model_name)
    return getattr(importlib.import_module(target), model_name) if target else None


def register_trainer(model_name: str, trainer_cls: type) -> None:
    """Make ``get_trainer(..., model_name)`` return ``trainer_cls``."""
    import recbole.trainer

    setattr(recbole.trainer, f"{model_name}Trainer", trainer_cls)


def model_yaml_files(model_class) -> list[Path]:
    """causalrec's YAML files for a model class, base classes first: ``properties/model/<Class>.yaml`` for each
    class in its MRO that has one (GenRec: LLMRecommender.yaml; CausalDPO: LLMRecommender, SDPORec, CausalDPO),
    so keys shared by a family of models live in one file."""
    folder = properties_dir() / "model"
    return [
        folder / f"{cls.__name__}.yaml"
        for cls in reversed(getattr(model_class, "__mro__", ()))
        if (folder / f"{cls.__name__}.yaml").is_file()
    ]


def model_defaults(model_class) -> dict:
    """The merged causalrec YAML defaults of a model class (later files of ``model_yaml_files`` win)."""
    import yaml

    merged: dict = {}
    for path in model_yaml_files(model_class):
        merged.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return merged


def _patch_config() -> None:
    from recbole.config import Config

    if getattr(Config._load_internal_config_dict, "_causalrec", False):
        return
    load_internal = Config._load_internal_config_dict
    set_defaults = Config._set_default_parameters

    @functools.wraps(load_internal)
    def _load_internal_config_dict(self, model, model_class, dataset):
        load_internal(self, model, model_class, dataset)
        props = properties_dir()
        for path in (props / "overall.yaml", *model_yaml_files(model_class), props / "dataset" / f"{dataset}.yaml"):
            if path.is_file():
                loaded = self._update_internal_config_dict(str(path))
                if path.parent.name == "dataset" and loaded:
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]

    @functools.wraps(set_defaults)
    def _set_default_parameters(self):
        from causalrec.recbole import protocol

        final = self.final_config_dict
        if final.get("loss_type") == "CE" and "train_neg_sample_args" not in self.external_config_dict:
            # RecBole 1.2.1's overall.yaml samples negatives by default, then rejects that for
            # CE-loss sequential models (SASRec, GRU4Rec, ...): make its defaults runnable.
            final["train_neg_sample_args"] = None
        set_defaults(self)
        protocol.configure_dataset(final)

    _load_internal_config_dict._causalrec = True
    Config._load_internal_config_dict = _load_internal_config_dict
    Config._set_default_parameters = _set_default_parameters


def _patch_quick_start() -> None:
    import recbole.quick_start.quick_start as quick_start

    if getattr(quick_start.get_flops, "_causalrec", False):
        return
    get_flops = quick_start.get_flops
    data_preparation = quick_start.data_preparation

    @functools.wraps(get_flops)
    def _get_flops(model, dataset, device, logger, transform, verbose=False):
        if type(model).__name__ in NO_FLOPS:
            return 0  # profiling deep-copies the model: pointless and costly for an LLM
        return get_flops(model, dataset, device, logger, transform, verbose)

    @functools.wraps(data_preparation)
    def _data_preparation(config, dataset):
        from causalrec.recbole import protocol
        from causalrec.recbole.evaluation import batch_customers

        batch_customers(config, dataset)  # a general model's evaluation: many customers per batch
        loaders = data_preparation(config, dataset)
        for loader in loaders[1:]:
            protocol.apply_history_protocol(loader, config)
        return loaders

    _get_flops._causalrec = True
    quick_start.get_flops = _get_flops
    quick_start.data_preparation = _data_preparation


def install() -> None:
    """Idempotently hook causalrec into RecBole."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    _patch_config()
    _patch_quick_start()
