"""``causalrec data prepare|stats`` read the data's seed from ``data_seed`` as ``causalrec run`` does (RecBole's
``seed`` leaves the data alone), and the ``num_threads`` key sets torch's thread count for a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from causalrec import cli
from causalrec.errors import ConfigError
from causalrec.recbole.preflight import known_config_keys, validate
from causalrec.recbole.quick_start import build, make_config

SMALL = {"sim_users": 150, "sim_items": 60}


def _cli(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _prepared_by_cli(capsys, **params) -> Path:
    pairs = [arg for key, value in {**SMALL, **params}.items() for arg in ("-p", f"{key}={value}")]
    out = _cli(capsys, "data", "prepare", "-d", "retail-sim", *pairs)
    return Path(out.split("prepared retail-sim at ")[1].splitlines()[0])


def _prepared_by_run(**params) -> Path:
    """The directory ``causalrec run`` (through ``make_config``, which prepares the data) reads."""
    config = make_config("Pop", "retail-sim", config_dict={**SMALL, "show_progress": False, **params})
    return Path(config["prepared_dir"])


def test_data_prepare_and_run_agree_on_the_data_seed(in_tmp, capsys):
    default = _prepared_by_cli(capsys)
    assert default == _prepared_by_run()  # both default to data_seed 2020
    seven = _prepared_by_cli(capsys, data_seed=7)
    assert seven != default  # data_seed changes the data (the cache key)...
    assert seven == _prepared_by_run(data_seed=7)  # ...and run with the same data_seed reads the same files
    assert seven == _prepared_by_run(data_seed=7, seed=3)
    # RecBole's seed alone changes nothing, in data prepare as in run (it used to become the data's seed here)
    assert _prepared_by_cli(capsys, seed=7) == default == _prepared_by_run(seed=7)
    assert _prepared_by_cli(capsys, seed=3, data_seed=7) == seven


def test_data_stats_follow_data_seed_not_seed(in_tmp, capsys):
    def stats(*pairs):
        return _cli(capsys, "data", "stats", "-d", "retail-sim", "-p", "sim_users=150", "-p", "sim_items=60", *pairs)

    default = stats()
    assert "users" in default
    assert stats("-p", "seed=7") == default
    assert stats("-p", "data_seed=7") != default  # another simulated shop


def test_num_threads_is_a_known_key_listed_by_keys(capsys):
    assert "num_threads" in known_config_keys()
    assert "num_threads" in _cli(capsys, "keys").split()
    validate("Pop", "retail-sim", {"num_threads": 1})
    for bad in (0, -2, "many"):
        with pytest.raises(ConfigError, match="num_threads"):
            validate("Pop", "retail-sim", {"num_threads": bad})


def test_build_applies_num_threads(in_tmp):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        build("Pop", "retail-sim", config_dict={**SMALL, "show_progress": False, "num_threads": 2})
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        build("Pop", "retail-sim", config_dict={**SMALL, "show_progress": False})  # None: torch's setting stays
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
