"""Config layering shared by ``compare`` and ``tune``: per-model sections and dotted keys.

A comparison or a study starts from plain RecBole settings (YAML files and ``key=value`` pairs) and adds:

* per-model sections: a top-level key that names a model and holds a mapping applies to that model only
  (``SASRec: {hidden_size: 64}`` in a YAML file, ``SASRec.hidden_size=64`` on the command line);
* dotted keys: ``sft_args.learning_rate: 1e-4`` sets one field of a dict-valued key and keeps the others
  (the LLM models' ``sft_args`` / ``dpo_args``, RecBole's ``train_neg_sample_args``, ...).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from causalrec.errors import ConfigError


def split_sections(
    mapping: Mapping[str, Any], models: Iterable[str]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(shared, per_model)``: keys naming a model (``SASRec``, or ``SASRec.hidden_size``) go to that model.

    ``models`` are the names that count as sections (every model causalrec knows, so a section for a model
    that is not in this comparison is ignored rather than taken for a config key).
    """
    names = set(models)
    shared: dict[str, Any] = {}
    per_model: dict[str, dict[str, Any]] = {}
    for key, value in mapping.items():
        head, dot, rest = str(key).partition(".")
        if head in names and dot:
            per_model.setdefault(head, {})[rest] = value
        elif key in names:
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"the section for model {key!r} must be a mapping of config keys to values, "
                    f"e.g. {key}: {{learning_rate: 0.001}}; got {value!r}"
                )
            per_model.setdefault(key, {}).update(value)
        else:
            shared[key] = value
    return shared, per_model


def layer(base: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``updates``; a dotted key ``a.b`` sets field ``b`` of the dict-valued key ``a``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in updates.items():
        head, dot, rest = str(key).partition(".")
        if not dot:
            out[key] = dict(value) if isinstance(value, dict) else value
            continue
        if not head or not rest or "." in rest:
            raise ConfigError(
                f"config key {key!r}: a dotted key must be <dict key>.<field>, e.g. sft_args.learning_rate"
            )
        current = out.get(head)
        if current is not None and not isinstance(current, dict):
            raise ConfigError(
                f"config key {key!r} sets a field of {head!r}, but {head!r} is {current!r}, not a mapping"
            )
        out[head] = {**(current or {}), rest: value}
    return out
