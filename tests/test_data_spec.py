"""DataSpec: defaults, validation, config-mapping, cache-key fields, and the shipped dataset YAML."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from causalrec.data import SOURCES, SPLITS, DataSpec
from causalrec.data.spec import DATASET_DEFAULTS, DEFAULT_EXCLUDE_STOCK_CODES
from causalrec.errors import ConfigError, UnknownNameError

PROPS = Path(__file__).resolve().parents[1] / "properties" / "dataset"


def test_names():
    assert SOURCES == ("retail-sim", "online-retail", "ml-100k", "csv")
    assert SPLITS == ("iid", "temporal", "seasonal", "regional", "popularity", "mixed")


def test_dataset_defaults_resolve():
    sim = DataSpec()
    assert (sim.dataset, sim.split, sim.seed) == ("retail-sim", "seasonal", 2020)
    assert (sim.train_months, sim.valid_months, sim.test_months) == ((1, 2, 3, 4, 5, 6, 7, 8), (9,), (10, 11, 12))
    ml = DataSpec(dataset="ml-100k")
    assert ml.split == "temporal" and ml.test_months == (1, 2, 3, 4)
    assert DataSpec(dataset="csv", source="x.csv").split == "temporal"
    # an explicit value wins over the dataset default
    assert DataSpec(split="iid", test_months=[12]).test_months == (12,)


def test_months_accept_names_and_single_values():
    spec = DataSpec(train_months=["Jan", "february", 3], valid_months="apr", test_months=12)
    assert (spec.train_months, spec.valid_months, spec.test_months) == ((1, 2, 3), (4,), (12,))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"split": "seasonl"}, ["split", "seasonal"]),
        ({"dataset": "retail"}, ["dataset", "retail-sim"]),
        ({"train_months": [1, 13]}, ["train_months", "13"]),
        ({"train_months": [1, 9], "valid_months": [9]}, ["train_months", "valid_months", "[9]"]),
        ({"train_regions": ["a"], "test_regions": ["a", "b"]}, ["train_regions", "test_regions", "'a'"]),
        ({"test_ratio": 0.7, "valid_ratio": 0.3}, ["test_ratio + valid_ratio"]),
        ({"test_ratio": 0}, ["test_ratio", "(0, 1)"]),
        ({"sim_confounding": 1.5}, ["sim_confounding", "[0, 1]"]),
        ({"min_user_inter": 0}, ["min_user_inter", ">= 1"]),
        ({"min_item_inter": 2.5}, ["min_item_inter"]),
        ({"sim_categories": 1}, ["sim_categories", ">= 2"]),
        ({"dataset": "csv"}, ["csv", "source"]),
        ({"csv_text": [""]}, ["csv_text"]),
    ],
)
def test_invalid_values_name_the_key(kwargs, words):
    with pytest.raises(ConfigError) as err:
        DataSpec(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_unknown_split_lists_choices():
    with pytest.raises(UnknownNameError) as err:
        DataSpec(split="weekly")
    assert err.value.choices == sorted(SPLITS)


def test_from_mapping_strict_and_lenient():
    merged = {
        "dataset": "retail-sim",
        "split": "regional",
        "seed": 7,
        "epochs": 3,
        "train_regions": None,
        "sim_users": 50,
    }
    spec = DataSpec.from_mapping(merged, strict=False)
    assert (spec.split, spec.seed, spec.sim_users, spec.train_regions) == ("regional", 7, 50, None)
    with pytest.raises(UnknownNameError) as err:
        DataSpec.from_mapping(merged, strict=True)
    assert "'epochs'" in str(err.value)
    assert set(DataSpec.field_names()) >= {
        "dataset",
        "source",
        "split",
        "seed",
        "min_user_inter",
        "min_item_inter",
        "max_history",
        "exclude_stock_codes",
        "data_cache_dir",
        "train_months",
        "valid_months",
        "test_months",
        "train_regions",
        "valid_regions",
        "test_regions",
        "test_ratio",
        "tail_ratio",
    }


def test_field_names_are_prefixed_or_common():
    common = {
        "dataset",
        "max_title_chars",
        "source",
        "split",
        "seed",
        "min_user_inter",
        "min_item_inter",
        "max_history",
        "history_environments",
        "exclude_stock_codes",
        "data_cache_dir",
        "train_months",
        "valid_months",
        "test_months",
        "train_regions",
        "valid_regions",
        "test_regions",
        "valid_user_ratio",
        "test_ratio",
        "valid_ratio",
        "tail_ratio",
    }
    for name in DataSpec.field_names():
        assert name in common or name.startswith(("sim_", "csv_")), name


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CAUSALREC_CACHE", str(tmp_path / "env"))
    assert DataSpec().cache_dir() == tmp_path / "env"
    assert DataSpec(data_cache_dir=str(tmp_path / "mine")).cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CAUSALREC_CACHE")
    assert DataSpec().cache_dir() == Path.home() / ".cache" / "causalrec"


def test_key_fields_cover_only_what_shapes_the_output():
    base = DataSpec(dataset="online-retail", source="x.csv", split="iid")
    keys = base.key_fields()
    assert "exclude_stock_codes" in keys and "seed" in keys
    assert not any(k.startswith(("sim_", "csv_")) for k in keys)
    assert "train_months" not in keys and "data_cache_dir" not in keys
    seasonal = DataSpec(dataset="retail-sim", split="seasonal").key_fields()
    assert {"train_months", "valid_months", "test_months", "sim_users"} <= set(seasonal)
    assert "exclude_stock_codes" not in seasonal and "tail_ratio" not in seasonal
    # a field another source or split reads does not change the key
    assert DataSpec(split="iid", sim_users=10).key_fields() != DataSpec(split="iid").key_fields()
    assert DataSpec(split="iid", tail_ratio=0.5).key_fields() == DataSpec(split="iid").key_fields()


@pytest.mark.parametrize("dataset", ["retail-sim", "online-retail", "csv", "ml-100k"])
def test_dataset_yaml_matches_dataspec_defaults(dataset):
    path = PROPS / f"{dataset}.yaml"
    loaded = yaml.safe_load(path.read_text())
    assert set(loaded) <= set(DataSpec.field_names()), set(loaded) - set(DataSpec.field_names())
    extra = {"source": "x.csv"} if dataset == "csv" else {}
    from_yaml = DataSpec.from_mapping({"dataset": dataset, **loaded, **extra}, strict=True)
    assert from_yaml == DataSpec(dataset=dataset, **extra)
    # RecBole style: every key line carries a "# (type) description" comment
    for line in path.read_text().splitlines():
        if re.match(r"^[a-z_]+:", line):
            assert re.search(r"# \((str|int|float|bool|list|dict)\) \S", line), line


def test_ml100k_yaml_sets_no_split():
    """RecBole's own ml-100k must keep working: causalrec prepares ml-100k only when a split is asked for."""
    assert "split" not in yaml.safe_load((PROPS / "ml-100k.yaml").read_text())
    assert DATASET_DEFAULTS["ml-100k"]["split"] == "temporal"


def test_default_exclusion_list_is_documented_in_yaml():
    loaded = yaml.safe_load((PROPS / "online-retail.yaml").read_text())
    assert tuple(loaded["exclude_stock_codes"]) == DEFAULT_EXCLUDE_STOCK_CODES
