"""One owner per key: where a YAML key is also a field of the dataclass that uses it, both say the same default.

The dataclasses (``SDPOConfig``, ``CausalDPOConfig``, ``BackboneConfig``, ``DataSpec``) own their keys: type,
default, range and help text live there, and their ``__post_init__`` validates. The model YAMLs repeat the defaults
RecBole needs to see; these tests hold the two equal, so ``env_source`` cannot be ``season`` in one place and
``latent`` in the other again. A YAML ``~`` on a backbone key means "the backbone preset decides"
(``causalrec.llm.presets``), which is the one allowed difference.
"""

from __future__ import annotations

import dataclasses

import pytest

import causalrec  # noqa: F401
from causalrec.data import DataSpec
from causalrec.io import load_yaml
from causalrec.llm.backbone import BackboneConfig
from causalrec.llm.presets import BACKBONE_KEYS
from causalrec.recbole.plugin import model_class, model_defaults, properties_dir


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _owned(cls, values):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    return {k: (v, _default(fields[k])) for k, v in values.items() if k in fields}


@pytest.mark.parametrize("model", ["SDPORec", "CausalDPO"])
def test_method_keys_have_one_default(model):
    from causalrec.training import CausalDPOConfig, SDPOConfig

    cls = model_class(model)
    config_cls = CausalDPOConfig if cls.alignment == "causal_dpo" else SDPOConfig
    yaml_defaults = model_defaults(cls)
    keys = {k: yaml_defaults[k] for k in cls.method_keys}
    differ = {k: pair for k, pair in _owned(config_cls, keys).items() if pair[0] != pair[1]}
    assert not differ, f"{model}.yaml and {config_cls.__name__} disagree (yaml, dataclass): {differ}"
    assert set(keys) <= {f.name for f in dataclasses.fields(config_cls)}


def test_backbone_keys_have_one_default():
    yaml_defaults = load_yaml((properties_dir() / "model" / "LLMRecommender.yaml").read_text(encoding="utf-8"))
    differ = {
        k: pair
        for k, pair in _owned(BackboneConfig, yaml_defaults).items()
        if pair[0] != pair[1] and not (pair[0] is None and k in BACKBONE_KEYS)
    }
    assert not differ, f"LLMRecommender.yaml and BackboneConfig disagree (yaml, dataclass): {differ}"


def test_data_keys_of_the_overall_yaml_have_one_default():
    overall = load_yaml((properties_dir() / "overall.yaml").read_text(encoding="utf-8"))
    differ = {k: pair for k, pair in _owned(DataSpec, overall).items() if pair[0] != pair[1]}
    assert not differ, f"overall.yaml and DataSpec disagree (yaml, dataclass): {differ}"


def test_llm_recommender_keys_have_one_default():
    """The first model YAML that defines a key of ``LLMRecommenderConfig`` (base class first) states its default;
    subclasses' YAMLs may then preset it per model (CausalDPO.yaml's ``prompt_environment: season``)."""
    from causalrec.recbole.settings import LLMRecommenderConfig

    first: dict = {}
    for name in ("LLMRecommender", "SDPORec"):
        values = load_yaml((properties_dir() / "model" / f"{name}.yaml").read_text(encoding="utf-8"))
        for key, value in values.items():
            first.setdefault(key, value)
    defaults = LLMRecommenderConfig.defaults()
    missing = sorted(set(defaults) - set(first))
    assert not missing, f"keys RecBole's Config would not know: {missing}"
    differ = {k: (first[k], v) for k, v in defaults.items() if k in first and first[k] != v}
    assert not differ, f"model YAML and LLMRecommenderConfig disagree (yaml, dataclass): {differ}"
