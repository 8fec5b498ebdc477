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
from causalrec.compat import literal_value, load_yaml
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


def _yaml_defaults(paths: Iterable[Path]) -> dict[str, list[Any]]:
    """Every key of the YAML files, with the default values it has in them."""
    defaults: dict[str, list[Any]] = {}
    for path in paths:
        loaded = load_yaml(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            for key, value in loaded.items():
                defaults.setdefault(key, []).append(value)
    return defaults


@lru_cache(maxsize=1)
def config_defaults() -> dict[str, tuple[Any, ...]]:
    """The default value(s) of each key in RecBole's and causalrec's YAML files and ``LLMTrainer.RUN_KEYS``."""
    import recbole

    from causalrec.trainer import RUN_KEYS

    recbole_props = Path(recbole.__file__).parent / "properties"
    defaults = _yaml_defaults([*recbole_props.rglob("*.yaml"), *registry.properties_dir().rglob("*.yaml")])
    for key, value in RUN_KEYS.items():
        defaults.setdefault(key, []).append(value)
    return {k: tuple(v) for k, v in defaults.items()}


@lru_cache(maxsize=1)
def known_config_keys() -> frozenset[str]:
    """Every key RecBole or causalrec reads: RecBole's argument lists and YAML files, causalrec's
    YAML files, ``LLMTrainer.RUN_KEYS``, and the prepared-data spec."""
    from recbole.utils import argument_list

    from causalrec.data import DataSpec

    keys = set(config_defaults())
    for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        keys.update(getattr(argument_list, name))
    keys.update(DataSpec.field_names())
    keys.update({"model", "dataset", "config_files", "device", "gpu_id", "use_gpu", "nproc", "world_size",
                 "offset", "ip", "port", "local_rank", "worker_id"})
    return frozenset(keys)


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, str):
        return "str"
    return None


# Keys whose YAML default has one type but that take another too (LoRA: "all-linear" or a list of module names).
_ALSO_ACCEPTED = {"target_modules": {"list"}, "num_negatives": {"str"}}

_WANTED = {"bool": "true or false", "int": "an integer", "float": "a number", "dict": "a mapping (key: value)",
           "list": "a list", "str": "a single value"}


def _type_ok(value: Any, kinds: set[str]) -> bool:
    """Whether ``value`` can be what the YAML defaults of a key are (as RecBole coerces: an int where a float is
    expected, a scalar where a list is, 0/1 for a bool)."""
    kind = _kind(value)
    if kind is None or kind in kinds:
        return True
    if kind == "int" and ("float" in kinds or ("bool" in kinds and value in (0, 1))):
        return True
    if kind in ("int", "float", "str", "bool") and ("list" in kinds or "str" in kinds):
        return True  # RecBole turns a scalar into a one-element list where it wants a list (topk: 10)
    return False


# Values RecBole, TRL or causalrec would only trip over deep inside training (None is always allowed).
_POSITIVE = ("epochs", "train_batch_size", "eval_batch_size", "stopping_step", "eval_step",
             "n_environments", "sft_max_samples", "dpo_max_samples", "rank_batch_size", "max_history_items",
             "resume_save_steps", "tiny_hidden_size", "tiny_layers", "tiny_heads", "max_seq_length",
             "MAX_ITEM_LIST_LENGTH", "num_threads")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: (lambda v: v >= 1, ">= 1") for key in _POSITIVE},
    "num_negatives": (lambda v: v == "all" or (isinstance(v, int) and v >= 1), ">= 1, or 'all' (item tokens)"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "beta": (lambda v: v > 0, "> 0"),
    "tau": (lambda v: v > 0, "> 0"),
    "lambda_inv": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "lora_r": (lambda v: v >= 0, ">= 0 (0: no LoRA)"),
    "topk": (lambda v: all(k >= 1 for k in (v if isinstance(v, (list, tuple)) else [v])), "positive cut-offs"),
    # RecBole's KD_DAGFM eval()s this value to find its teacher model: only a class name may pass.
    "teacher": (lambda v: isinstance(v, str) and v.isidentifier(), "a model class name"),
}


@lru_cache(maxsize=1)
def _choices() -> dict[str, tuple[str, ...]]:
    """causalrec's keys with a fixed set of values (checked before any data or training work)."""
    from causalrec.data.prompts import ENVIRONMENTS, NEGATIVE_STRATEGIES
    from causalrec.llm.items import ITEM_REPRS
    from causalrec.models.llm_recommender import ENVIRONMENT_INFERENCE, ENVIRONMENT_PRIORS, SFT_POSITIONS
    from causalrec.trainer import VALIDATE_STAGES

    from causalrec.context_rerank import CONTEXTS

    return {"context_rerank": CONTEXTS, "item_repr": ITEM_REPRS, "prompt_environment": ENVIRONMENTS, "environment_prior": ENVIRONMENT_PRIORS,
            "environment_inference": ENVIRONMENT_INFERENCE, "validate_stages": VALIDATE_STAGES,
            "negative_strategy": NEGATIVE_STRATEGIES, "sft_positions": SFT_POSITIONS}


def check_values(params: dict[str, Any]) -> None:
    """Type, range and choice checks of known keys against their YAML defaults (after RecBole's literal parsing)."""
    defaults = config_defaults()
    for key, raw in params.items():
        value = literal_value(raw)
        if value is None:
            continue
        if key in _choices() and value not in _choices()[key]:
            raise UnknownNameError(key, value, _choices()[key])
        kinds = {k for k in map(_kind, defaults.get(key, ())) if k is not None} | _ALSO_ACCEPTED.get(key, set())
        if kinds and not _type_ok(value, kinds):
            wanted = " or ".join(sorted({_WANTED[k] for k in kinds}))
            raise ConfigError(f"config key {key!r} must be {wanted}; got {raw!r} ({type(raw).__name__})")
        rule = _RANGES.get(key)
        if rule is not None:
            check, text = rule
            try:
                ok = check(value)
            except TypeError:
                ok = False
            if not ok:
                raise ConfigError(f"config key {key!r} must be {text}; got {raw!r}")


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
            loaded = load_yaml(text)
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
    check_values(params)
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


def build(model: str, dataset: str, config_file_list=None, config_dict=None):
    """``(config, trainer, (train, valid, test))`` for a run, the way RecBole's ``run_recbole`` sets them up
    (seeds, logger, dataset, data loaders with causalrec's history protocol, model on its device).
    ``num_threads`` (when set) becomes torch's intra-op thread count here, before any tensor work."""
    import torch
    from recbole.data import create_dataset
    from recbole.quick_start import quick_start
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    config = make_config(model, dataset, config_file_list, config_dict)
    if config["num_threads"] is not None:
        torch.set_num_threads(int(config["num_threads"]))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    data = create_dataset(config)
    loaders = quick_start.data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    recommender = get_model(config["model"])(config, loaders[0]._dataset).to(config["device"])
    trainer_cls = get_trainer(config["MODEL_TYPE"], config["model"])
    if config["resume"]:  # classical models: a last-epoch checkpoint after every epoch (causalrec.classical_trainer)
        from causalrec.classical_trainer import resumable

        trainer_cls = resumable(trainer_cls)
    trainer = trainer_cls(config, recommender)
    if config["context_rerank"]:  # the case's environment at test time, for any model (causalrec.context_rerank)
        from causalrec import context_rerank

        context_rerank.install(trainer, loaders[0]._dataset, config["context_rerank"],
                               float(config["context_rerank_alpha"] or 1.0))
    return config, trainer, loaders


def run(
    model: str,
    dataset: str,
    config_file_list: Sequence[str] | None = None,
    config_dict: dict[str, Any] | None = None,
    *,
    saved: bool = True,
    callback_fn: Callable[[int, float], None] | None = None,
    resume: bool = False,
) -> dict[str, Any] | None:
    """Train ``model`` on ``dataset`` and evaluate it on the test split.

    ``resume=True`` (config key ``resume``) makes the LLM models' TRL stages write step checkpoints and
    continue an interrupted stage from its last one; finished stages are reused either way (``stage_cache``).
    RecBole's classical models (trained by its ``Trainer.fit`` epoch loop) then write a last-epoch checkpoint after
    every epoch and continue at the next epoch (``causalrec.classical_trainer``); it is deleted once the test
    result exists, and the result gets ``epochs`` (``trained`` here, ``resumed_from``, ``last``, ``best``).

    Returns RecBole's result dict (``best_valid_score``, ``best_valid_result``, ``test_result``)
    plus ``protocol`` (one line), when enabled ``test_env_result`` (metrics per environment) and, for the
    LLM models, ``stages`` (per training stage: validation score, reused from the stage cache or trained, ...).

    Under ``accelerate launch``/``torchrun`` every process trains (the LLM models' TRL stages as one DDP run), the
    main process (rank 0) evaluates and returns the result, the other processes return None.
    """
    if resume:
        config_dict = {**(config_dict or {}), "resume": True}
    config, trainer, (train_data, valid_data, test_data) = build(model, dataset, config_file_list, config_dict)
    show = bool(config["show_progress"])
    discard_last_epoch = getattr(trainer, "discard_last_epoch", None)
    if discard_last_epoch is not None:  # keep a finished last-epoch checkpoint until the test result exists
        trainer.keep_finished_checkpoint = True
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=show, callback_fn=callback_fn
    )
    from causalrec.trainer import process_rank

    rank, processes = process_rank()
    if rank != 0:
        _log.info("process %d of %d: training done; the main process evaluates", rank, processes)
        return None
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
    if getattr(trainer, "stage_results", None) is not None:
        result["stages"] = trainer.stage_results
    if discard_last_epoch is not None:
        if trainer.last_epoch_file:  # it checkpointed (models of one epoch do not)
            result["epochs"] = dict(trainer.epoch_summary)
        discard_last_epoch()
    _log.info("test result: %s", result["test_result"])
    return result
