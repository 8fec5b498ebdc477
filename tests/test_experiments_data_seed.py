"""``data_seed`` drives the prepared data; RecBole's ``seed`` (re-drawn per comparison seed) does not."""

from __future__ import annotations

from pathlib import Path

import pytest

import causalrec  # noqa: F401  (registration)
from causalrec.data import DataSpec
from causalrec.errors import UnknownNameError
from causalrec.recbole.quick_start import make_config

SMALL = {
    "sim_users": 150,
    "sim_items": 60,
    "sim_categories": 8,
    "sim_inter_per_user": 15.0,
    "split": "regional",
    "show_progress": False,
}


def _prepared(**params) -> tuple[Path, bytes]:
    config = make_config("BPR", "retail-sim", config_dict={**SMALL, **params})
    folder = Path(config["prepared_dir"])
    return folder, (folder / "retail-sim.train.inter").read_bytes()


def test_seed_alone_keeps_the_data_and_data_seed_changes_it(in_tmp):
    base_dir, base_bytes = _prepared(seed=2020)
    other_seed_dir, other_seed_bytes = _prepared(seed=7)
    assert other_seed_dir == base_dir and other_seed_bytes == base_bytes
    new_data_dir, new_data_bytes = _prepared(seed=2020, data_seed=7)
    assert new_data_dir != base_dir and new_data_bytes != base_bytes
    # the data_seed=7 files are exactly what the data layer makes with its seed at 7
    spec = DataSpec.from_mapping({"dataset": "retail-sim", **SMALL, "seed": 2020, "data_seed": 7})
    assert spec.seed == 7
    from causalrec.data import prepare

    assert prepare(spec, show_progress=False).directory == new_data_dir


def test_mapping_without_data_seed_falls_back_to_seed_and_strict_accepts_the_key():
    assert DataSpec.from_mapping({"seed": 5}).seed == 5
    assert DataSpec.from_mapping({"seed": 5, "data_seed": 9}, strict=True).seed == 9
    assert DataSpec.from_mapping({"seed": 5, "data_seed": None}).seed == 5
    with pytest.raises(UnknownNameError):
        DataSpec.from_mapping({"data_sed": 1}, strict=True)
