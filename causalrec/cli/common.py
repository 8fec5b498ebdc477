"""What the commands share: ``key=value`` parameters and the config options (JSON output: ``causalrec.io.write_json``)."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import yaml

from causalrec.errors import ConfigError
from causalrec.io import load_yaml


def parse_params(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["epochs=3", "topk=[10,20]"]`` -> ``{"epochs": 3, "topk": [10, 20]}`` (values parsed as YAML)."""
    params: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects key=value, got {pair!r}")
        try:
            params[key.strip()] = load_yaml(value) if value.strip() else None
        except yaml.YAMLError:
            params[key.strip()] = value
    return params


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--config-files`` and ``--param``/``-p`` (read with ``read_config_files`` and ``parse_params``)."""
    parser.add_argument(
        "--config-files", nargs="+", default=[], metavar="YAML", help="RecBole YAML files, later ones win"
    )
    parser.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key (YAML value); repeatable; wins over the files",
    )


__all__ = ["add_config_options", "parse_params"]
