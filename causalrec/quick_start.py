"""``causalrec.run``: RecBole's ``run_recbole`` with validation, one protocol and clean errors.

Differences from ``recbole.quick_start.run_recbole`` (which also works after ``import causalrec``):
unknown model/dataset/config keys fail early with the valid choices; the command line is not
re-parsed by RecBole's Config; a per-epoch ``callback_fn`` is passed through (Optuna pruning);
and the result carries the evaluation protocol and per-environment metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from causalrec import protocol, registry
from causalrec.evaluation import ENV_FIELDS, evaluate_with_environments
from causalrec.errors import ConfigError, UnknownNameError

_log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def recbole_model_names() -> tuple[str, ...]:
    """RecBole's own model names (one YAML per model in its properties/model)."""
    import recbole

    folder = Path(recbole.__file__).parent / "properties" / "model"
    return tuple(sorted(p.stem for p in folder.glob("*.yaml")))


def model_names() -> tuple[str, ...]:
    return tuple(sorted(set(recbole_model_names()) | set(registry.MODELS)))


def _yaml_keys(paths: Iterable[Path]) -> set[str]:
    keys: set[str] = set()
    for path in paths:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            keys.update(loaded)
    return keys


@lru_cache(maxsize=1)
def known_config_keys() -> frozenset[str]:
    """Every key RecBole or causalrec reads: RecBole's argument lists and YAML files, causalrec's
    YAML files, and the prepared-data spec."""
    import recbole
    from recbole.utils import argument_list

    from causalrec.data import DataSpec

    recbole_props = Path(recbole.__file__).parent / "properties"
    keys = _yaml_keys(recbole_props.rglob("*.yaml")) | _yaml_keys(registry.properties_dir().rglob("*.yaml"))
    for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        keys.update(getattr(argument_list, name))
    keys.update(DataSpec.field_names())
    keys.update({"model", "dataset", "config_files", "device", "gpu_id", "use_gpu", "nproc", "world_size",
                 "offset", "ip", "port", "local_rank", "worker_id"})
    return frozenset(keys)


def read_config_files(paths: Sequence[str | os.PathLike] | None) -> dict[str, Any]:
    """Read and merge YAML config files (later files win), with clear errors."""
    merged: dict[str, Any] = {}
    for path in paths or ():
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, not {type(loaded).__name__}")
        merged.update(loaded)
    return merged


def validate(model: str, dataset: str, params: dict[str, Any]) -> None:
    """Fail early, naming the problem and the valid choices."""
    if model not in model_names():
        raise UnknownNameError("model", model, model_names())
    known = known_config_keys()
    for key in params:
        if key not in known:
            raise UnknownNameError("config key", key, known, more="; `causalrec keys` lists them")
    if not protocol.needs_preparation({"dataset": dataset, **params}):
        data_path = Path(params.get("data_path", "dataset/"))
        if dataset != "ml-100k" and not (data_path / dataset).is_dir():
            choices = list(protocol.PREPARED_DATASETS) + ["ml-100k"]
            raise ConfigError(
                f"unknown dataset {dataset!r}: it is not one of causalrec's ({', '.join(choices)}) and "
                f"{str(data_path / dataset)!r} holds no RecBole atomic files. Set data_path or use one of those."
            )


@contextlib.contextmanager
def _argv_isolated():
    """RecBole's Config parses ``--key=value`` out of sys.argv; causalrec passes settings explicitly."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def make_config(model: str, dataset: str, config_file_list=None, config_dict=None):
    """A validated RecBole ``Config`` (prepares causalrec datasets on the way)."""
    from recbole.config import Config

    params = {**read_config_files(config_file_list), **(config_dict or {})}
    validate(model, dataset, params)
    with _argv_isolated():
        return Config(model=model, dataset=dataset, config_dict=params)


def run(
    model: str,
    dataset: str,
    config_file_list: Sequence[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    *,
    saved: bool = True,
    callback_fn: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` and evaluate it on the test split.

    Returns RecBole's result dict (``best_valid_score``, ``best_valid_result``, ``test_result``)
    plus ``protocol`` (one line) and, when enabled, ``test_env_result`` (metrics per environment).
    """
    from recbole.data import create_dataset
    from recbole.quick_start import quick_start
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    config = make_config(model, dataset, config_file_list, config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    data = create_dataset(config)
    train_data, valid_data, test_data = quick_start.data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    recommender = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, recommender)
    show = bool(config["show_progress"])
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=show, callback_fn=callback_fn
    )
    test_result, test_env_result = evaluate_with_environments(
        trainer, test_data, load_best_model=saved, show_progress=show,
        fields=ENV_FIELDS if config["env_metrics"] else (),
    )
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": dict(best_valid_result or {}),
        "test_result": dict(test_result),
        "test_env_result": test_env_result,
        "protocol": protocol.describe_protocol(config),
    }
    _log.info("test result: %s", result["test_result"])
    return result
