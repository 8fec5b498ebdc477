"""The TRL arguments of an LLM model's training stages, from a config: one place for the trainer and the preflight.

``sft_config`` and ``alignment_config`` build TRL's own config objects (``SFTConfig``; ``SDPOConfig`` or
``CausalDPOConfig``) from the merged RecBole settings (``settings[key]``: a RecBole ``Config``, or the YAML
defaults plus the user's keys before any data exists) and the user's own ``sft_args``/``dpo_args``. So every field
is checked by the class that owns it (its ``__post_init__``), and the preflight (``causalrec.recbole.preflight``)
runs exactly what training will run, before data preparation or SFT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from causalrec.errors import ConfigError
from causalrec.recbole.settings import LLMRecommenderConfig

# The stage cache and resume keys LLMTrainer reads, with their owner's defaults (``causalrec keys`` lists them).
RUN_KEYS: dict[str, Any] = {
    k: LLMRecommenderConfig.defaults()[k]
    for k in ("stage_cache", "stage_cache_dir", "resume", "resume_save_steps", "validate_stages")
}
# Stage-argument fields that must be finite and positive: a NaN or infinite one trains nothing meaningful.
_POSITIVE_FIELDS = ("learning_rate", "beta", "num_train_epochs", "per_device_train_batch_size")


def setting(settings: Mapping[str, Any], key: str) -> Any:
    """``settings[key]``, or ``RUN_KEYS``' default when it is unset."""
    value = settings[key]
    return RUN_KEYS.get(key) if value is None else value


def check_field_types(config_cls, values: Mapping[str, Any], *, where: str) -> None:
    """A ConfigError for a value whose type cannot be what a numeric or boolean dataclass field needs
    (``learning_rate: fast``), or a NaN/infinite number, before transformers fails on it deep in training."""
    types = {
        f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        for f in dataclasses.fields(config_cls)
        if f.init
    }
    for name, value in values.items():
        kind = types.get(name)  # only plain bool/int/float annotations; unions and containers are left to the config
        if value is None or kind not in ("bool", "int", "float"):
            continue
        if kind == "bool":
            ok, wanted = isinstance(value, bool), "true or false"
        elif kind == "int":
            ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        if ok and kind == "float" and not math.isfinite(value):
            ok, wanted = False, "a finite number"
        if ok and name in _POSITIVE_FIELDS and value <= 0:
            ok, wanted = False, "> 0"
        if not ok:
            raise ConfigError(f"{where}: {name} must be {wanted}; got {value!r} ({type(value).__name__})")


def stage_defaults(model_cls, key: str, backbone: str, user: Any) -> dict[str, Any]:
    """``sft_args`` / ``dpo_args``: the model YAML's defaults, the backbone preset's fields over them
    (``causalrec.llm.presets``: a pretrained backbone's learning rates and batches), the user's dict over both.

    RecBole replaces a dict-valued key wholesale, so a user who sets only ``num_train_epochs``
    would otherwise silently lose the YAML's learning rate and fall back to TRL's default.
    """
    from causalrec.llm.presets import stage_overlay
    from causalrec.recbole.plugin import model_defaults

    if user is not None and not isinstance(user, dict):
        raise ConfigError(
            f"{key} must be a mapping of TRL config fields to values, e.g. {{num_train_epochs: 1}}; got {user!r}"
        )
    defaults = model_defaults(model_cls).get(key)
    return {**(defaults or {}), **stage_overlay(backbone or "tiny", key), **(user or {})}


def checkpointing(settings: Mapping[str, Any], stage_args: Mapping[str, Any]) -> dict[str, Any]:
    """With ``resume``, step checkpoints for a stage whose arguments save none (the model YAMLs say "no",
    for speed); one checkpoint is kept. Without ``resume``, the arguments as given."""
    if not setting(settings, "resume") or str(stage_args.get("save_strategy", "epoch")) != "no":
        return {}
    return {"save_strategy": "steps", "save_steps": int(setting(settings, "resume_save_steps")), "save_total_limit": 1}


def sft_config(
    settings: Mapping[str, Any],
    user: Mapping[str, Any],
    sft_positions: str,
    output_dir: str,
    show_progress: bool = False,
):
    """The SFT stage's ``SFTConfig``; ``user`` holds what the user set for ``sft_args`` (not the YAML's)."""
    from trl import SFTConfig

    from causalrec.recbole.models.llm_recommender import LLMRecommender
    from causalrec.training import build_sft_config

    stage = stage_defaults(LLMRecommender, "sft_args", settings["backbone"], user.get("sft_args"))
    if sft_positions == "all" and "num_train_epochs" not in (user.get("sft_args") or {}):
        stage["num_train_epochs"] = int(settings["sequence_sft_epochs"])
    args = {"seed": int(settings["seed"]), "disable_tqdm": not show_progress, **stage, **checkpointing(settings, stage)}
    check_field_types(SFTConfig, args, where="sft_args")
    return build_sft_config(output_dir, **args)


def alignment_config(
    settings: Mapping[str, Any], user: Mapping[str, Any], model_cls, output_dir: str, show_progress: bool = False
):
    """The preference stage's ``SDPOConfig`` / ``CausalDPOConfig`` from the model's method keys and ``dpo_args``;
    unknown keys are a ConfigError."""
    from causalrec.training import CausalDPOConfig, SDPOConfig

    config_cls = CausalDPOConfig if model_cls.alignment == "causal_dpo" else SDPOConfig
    args = {k: settings[k] for k in model_cls.method_keys if settings[k] is not None}
    check_field_types(config_cls, args, where="config")
    stage = stage_defaults(model_cls, "dpo_args", settings["backbone"], user.get("dpo_args"))
    check_field_types(config_cls, stage, where="dpo_args")
    args.update(stage)
    args.update(checkpointing(settings, stage))
    valid = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(args) - valid)
    if unknown:
        raise ConfigError(
            f"unknown {config_cls.__name__} key(s) {unknown} in dpo_args; valid keys are the fields of "
            f"{config_cls.__name__} (e.g. num_train_epochs, learning_rate, per_device_train_batch_size)"
        )
    args.setdefault("seed", int(settings["seed"]))
    try:
        config = config_cls(output_dir=output_dir, **args)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"invalid {config_cls.__name__} arguments: {err}") from err
    if "disable_tqdm" not in stage:
        config.disable_tqdm = not show_progress
    return config
