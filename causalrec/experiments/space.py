"""Optuna search spaces as YAML files (``tuning/<model>.yaml``), checked against the config keys.

A space file::

    model: SASRec                 # optional: the model the space is for (checked against --model)
    description: ...              # optional free text
    fixed:                        # optional: config keys set in every trial (e.g. the training budget)
      epochs: 100
      stopping_step: 5
    params:                       # the tuned keys
      learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      n_layers: {type: int, low: 1, high: 3}
      hidden_dropout_prob: {type: float, low: 0.0, high: 0.5, step: 0.1}
      hidden_size: {type: categorical, choices: [32, 64, 128]}
      sft_args.learning_rate: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}

A parameter's name is a RecBole config key (``causalrec keys`` lists them) or ``<dict key>.<field>`` for one
field of a dict-valued key: ``sft_args.*`` are ``trl.SFTConfig`` fields, ``dpo_args.*`` the fields of the
model's alignment config (``SDPOConfig`` / ``CausalDPOConfig``), other dict keys the fields their defaults have.
Types: ``float`` and ``int`` (``low`` < ``high``; optional ``log``, ``step``) and ``categorical``
(``choices``: scalars). Bounds and choices pass the same value checks as a config (``learning_rate > 0``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from causalrec.errors import ConfigError, UnknownNameError
from causalrec.io import digest

PARAM_TYPES = ("float", "int", "categorical")
PARAM_FIELDS = ("type", "low", "high", "log", "step", "choices")
SPACE_KEYS = ("model", "description", "fixed", "params")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SearchParam:
    """One tuned config key.

    Args:
        name: a RecBole config key, or ``<dict key>.<field>`` (``sft_args.learning_rate``).
        type: ``float`` | ``int`` | ``categorical``.
        low, high: the range (inclusive) of ``float`` / ``int``; ``low < high``.
        log: sample on a log scale (``low > 0``).
        step: a grid step (not with ``log``).
        choices: the values of a ``categorical`` (None, bool, int, float or str).
    """

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    @classmethod
    def from_mapping(cls, name: str, spec: Any, where: str) -> "SearchParam":
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"{where}: parameter {name!r} must be a mapping like "
                f"{{type: float, low: 0.0001, high: 0.01, log: true}}; got {spec!r}"
            )
        unknown = sorted(set(spec) - set(PARAM_FIELDS))
        if unknown:
            raise ConfigError(
                f"{where}: parameter {name!r} has unknown field(s) {unknown}; valid fields: {', '.join(PARAM_FIELDS)}"
            )
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise UnknownNameError(f"parameter type (for {name!r} in {where})", str(kind), PARAM_TYPES)
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: {name}: log must be true or false; got {log!r}")
        if kind == "categorical":
            extra = sorted(k for k in ("low", "high", "step") if k in spec) + (["log"] if log else [])
            if extra:
                raise ConfigError(f"{where}: {name}: a categorical parameter takes choices, not {extra}")
            choices = spec.get("choices")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ConfigError(
                    f"{where}: {name}: a categorical parameter needs a non-empty list of choices; got {choices!r}"
                )
            for choice in choices:
                if choice is not None and not isinstance(choice, (bool, int, float, str)):
                    raise ConfigError(
                        f"{where}: {name}: choices must be scalars (None, bool, int, float, str); "
                        f"got {choice!r}. Tune a list-valued key through separate parameters."
                    )
            if len(set(map(repr, choices))) < len(choices):
                raise ConfigError(f"{where}: {name}: choices repeat a value: {list(choices)}")
            return cls(name, kind, choices=tuple(choices))
        if "choices" in spec:
            raise ConfigError(f"{where}: {name}: choices belong to type categorical, not {kind}")
        low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
        for key, value in (("low", low), ("high", high)):
            if not _number(value):
                raise ConfigError(f"{where}: {name}: {key} must be a number; got {value!r}")
        if kind == "int":
            for key, value in (("low", low), ("high", high), ("step", step)):
                if value is not None and int(value) != value:
                    raise ConfigError(f"{where}: {name}: {key} of an int parameter must be an integer; got {value!r}")
            low, high = int(low), int(high)
            step = None if step is None else int(step)
        else:
            low, high = float(low), float(high)
        if low >= high:
            raise ConfigError(
                f"{where}: {name}: empty range, low ({low}) must be < high ({high}); "
                f"a single value belongs under fixed:"
            )
        if log and low <= 0:
            raise ConfigError(f"{where}: {name}: a log-scale range needs low > 0; got {low}")
        if step is not None:
            if not _number(step) or step <= 0:
                raise ConfigError(f"{where}: {name}: step must be a positive number; got {step!r}")
            if log:
                raise ConfigError(
                    f"{where}: {name}: step and log cannot be combined (Optuna samples either a grid or a log scale)"
                )
        return cls(name, kind, low=low, high=high, log=log, step=step)

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def values_to_check(self) -> list[Any]:
        """The values whose validity stands for the whole range: the bounds, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v not in (None, False)}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


@dataclass
class SearchSpace:
    """Tuned parameters and the config every trial shares; ``suggest(trial)`` draws one trial's settings."""

    params: tuple[SearchParam, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    description: str | None = None
    source: str = "<mapping>"

    @classmethod
    def from_mapping(cls, mapping: Any, source: str = "<mapping>") -> "SearchSpace":
        if not isinstance(mapping, Mapping):
            raise ConfigError(
                f"search space {source}: must be a mapping with a params: section; got {type(mapping).__name__}"
            )
        unknown = sorted(set(mapping) - set(SPACE_KEYS))
        if unknown:
            raise ConfigError(
                f"search space {source}: unknown top-level key(s) {unknown}; valid keys: "
                f"{', '.join(SPACE_KEYS)} (tuned config keys go under params:)"
            )
        params = mapping.get("params")
        if not isinstance(params, Mapping) or not params:
            raise ConfigError(f"search space {source}: params: must map at least one config key to a parameter spec")
        fixed = mapping.get("fixed") or {}
        if not isinstance(fixed, Mapping):
            raise ConfigError(f"search space {source}: fixed: must be a mapping of config keys to values")
        both = sorted(set(params) & set(fixed))
        if both:
            raise ConfigError(f"search space {source}: {both} both tuned (params:) and fixed (fixed:)")
        parsed = tuple(
            SearchParam.from_mapping(str(name), spec, f"search space {source}") for name, spec in params.items()
        )
        model = mapping.get("model")
        if model is not None and not isinstance(model, str):
            raise ConfigError(f"search space {source}: model must be a model name; got {model!r}")
        return cls(parsed, dict(fixed), model, mapping.get("description"), source)

    @classmethod
    def from_file(cls, path: str | Path) -> "SearchSpace":
        from causalrec.io import read_yaml_file

        loaded = read_yaml_file(path, "search space")
        return cls.from_mapping(loaded, source=str(path))

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        """One trial's values, by parameter name (dotted names stay dotted: ``configs.layer`` merges them)."""
        return {p.name: p.suggest(trial) for p in self.params}

    def digest(self) -> str:
        """Identifies the space (a resumed study must keep it)."""
        return digest({"params": {p.name: p.to_dict() for p in self.params}, "fixed": self.fixed}, ascii_only=True)[:16]

    def check(self, model: str) -> None:
        """Every name is a config key of ``model`` (or a field of a dict-valued key) and every bound or choice
        passes the config's value checks; a ConfigError names what is wrong."""
        from causalrec.recbole.preflight import check_values, config_defaults, known_config_keys

        if self.model is not None and self.model != model:
            raise ConfigError(
                f"search space {self.source} is for model {self.model!r}, not {model!r}; "
                f"pass the space of {model} (e.g. tuning/{model.lower()}.yaml)"
            )
        known = known_config_keys()
        more = f" (in search space {self.source}); `causalrec keys` lists the valid keys"
        for name in [*self.names, *self.fixed]:
            head, dot, rest = name.partition(".")
            if head not in known:
                raise UnknownNameError("config key", head if dot else name, known, more=more)
            if dot:
                fields = dict_fields(head, model, config_defaults())
                if rest not in fields:
                    raise UnknownNameError(f"{head} field", rest, fields, more=f" (in search space {self.source})")
        for param in self.params:
            head, dot, rest = param.name.partition(".")
            for value in param.values_to_check():
                try:
                    if dot:
                        check_dict_field(head, rest, value, model)
                    else:
                        check_values({param.name: value})
                except ConfigError as err:
                    raise ConfigError(f"search space {self.source}: parameter {param.name}: {err}") from None
        if self.fixed:
            from causalrec.experiments.configs import layer

            check_values(layer({}, self.fixed))


def _alignment_config(model: str):
    from causalrec.training import CausalDPOConfig, SDPOConfig

    return CausalDPOConfig if model == "CausalDPO" else SDPOConfig


def _trl_class(head: str, model: str):
    if head == "sft_args":
        from trl import SFTConfig

        return SFTConfig
    if head == "dpo_args":
        return _alignment_config(model)
    return None


def dict_fields(head: str, model: str, defaults: Mapping[str, tuple[Any, ...]]) -> list[str]:
    """The fields a dotted key ``<head>.<field>`` may name."""
    cls = _trl_class(head, model)
    if cls is not None:
        return sorted(f.name for f in dataclasses.fields(cls) if f.init)
    values = [v for v in defaults.get(head, ()) if isinstance(v, dict)]
    if not values:
        raise ConfigError(f"config key {head!r} is not a mapping, so {head}.<field> names nothing; tune {head} itself")
    return sorted({k for v in values for k in v})


def check_dict_field(head: str, name: str, value: Any, model: str) -> None:
    cls = _trl_class(head, model)
    if cls is not None:
        from causalrec.recbole.stage_args import check_field_types

        check_field_types(cls, {name: value}, where=head)
