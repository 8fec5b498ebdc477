"""The preflight: every setting, path and input file checked before any data is prepared or model trained.

``preflight(model, dataset, params)`` is the one edge where a run's configuration is validated (``causalrec.run``,
``compare`` and ``tune`` call it for every model before their first cell). It collects every problem and raises
one ``PreflightError`` listing them all (one line each; exit code 2 config, 3 data, 4 backbone, 5 checkpoint;
a single problem is raised as itself):

* keys: unknown names; types, ranges and choices of known keys (the owners' rules: RecBole's YAML types, the
  choices of causalrec's dataclasses, ``_RANGES``); NaN/infinite numbers;
* the training stages' TRL arguments, built by their own config classes (``stage_args``: ``SFTConfig``,
  ``SDPOConfig``/``CausalDPOConfig``) from the YAML defaults and the user's keys, exactly as training builds them;
* evaluation: metric names, ``valid_metric`` among them at a ``topk`` cut-off;
* folders: the output file's, ``checkpoint_dir``, the stage cache and the prepared-data cache are created or
  probed for writing; input files (``source``, ``csv_items_path``) exist, are files and can be read.

What needs the data (``topk`` against the catalog, ``n_environments`` against the training rows) is checked right
after the data is loaded, before training (``check_against_data``).

``null`` on a key means its default (``resolve_nulls``), not a library's: ``beta: null`` is the YAML's beta.

Why this module is long: one check per kind of input, each small, collected in one place so that a run is validated
once, at the edge (DESIGN.md); the key tables (``_RANGES``, ``_choices``) and RecBole's YAML defaults are read here too.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from causalrec.errors import CausalRecError, ConfigError, DataError, PreflightError, UnknownNameError
from causalrec.io import literal_value, load_yaml, read_yaml_file
from causalrec.llm.items import uses_item_tokens
from causalrec.recbole import plugin as registry
from causalrec.recbole import protocol
from causalrec.recbole.settings import LLMRecommenderConfig, resolve_sft_positions, validate_stages_problem


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

    from causalrec.recbole.stage_args import RUN_KEYS

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
    keys.update(
        {
            "model",
            "dataset",
            "config_files",
            "device",
            "gpu_id",
            "use_gpu",
            "nproc",
            "world_size",
            "offset",
            "ip",
            "port",
            "local_rank",
            "worker_id",
        }
    )
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
_ALSO_ACCEPTED = {"target_modules": {"list"}, "num_negatives": {"str"}, "num_threads": {"int"}, "repeat_mix": {"str"}}

_WANTED = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "dict": "a mapping (key: value)",
    "list": "a list",
    "str": "a single value",
}


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
_POSITIVE = (
    "epochs",
    "train_batch_size",
    "eval_batch_size",
    "stopping_step",
    "eval_step",
    "n_environments",
    "tiny_hidden_size",
    "tiny_layers",
    "tiny_heads",
    "max_seq_length",
    "MAX_ITEM_LIST_LENGTH",
)
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: (lambda v: v >= 1, ">= 1") for key in _POSITIVE},
    **{  # the LLM models' own keys: the lower bounds their owner states
        key: (lambda v, low=low: v >= low, f">= {low}") for key, low in LLMRecommenderConfig.rules()[1].items()
    },
    "repeat_mix": (
        lambda v: v == "auto" or (not isinstance(v, str) and 0 <= v < 1),
        ">= 0 and < 1 (the copy distribution's weight), or 'auto' (chosen on validation)",
    ),
    "num_threads": (lambda v: v == "auto" or (isinstance(v, int) and v >= 1), ">= 1, or 'auto' (one per free core)"),
    "num_negatives": (lambda v: v == "all" or (isinstance(v, int) and v >= 1), ">= 1, or 'all' (item tokens)"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "beta": (lambda v: v > 0, "> 0"),
    "tau": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "lora_r": (lambda v: v >= 0, ">= 0 (0: no LoRA)"),
    "topk": (lambda v: all(k >= 1 for k in (v if isinstance(v, (list, tuple)) else [v])), "positive cut-offs"),
    # RecBole's KD_DAGFM eval()s this value to find its teacher model: only a class name may pass.
    "teacher": (lambda v: isinstance(v, str) and v.isidentifier(), "a model class name"),
}


@lru_cache(maxsize=1)
def _choices() -> dict[str, tuple[str, ...]]:
    """causalrec's keys with a fixed set of values (checked before any data or training work)."""
    from causalrec.recbole.context_rerank import CONTEXTS

    return {"context_rerank": CONTEXTS, **LLMRecommenderConfig.rules()[0]}


def _value_problem(key: str, raw: Any) -> CausalRecError | None:
    """The problem with one key's value (type against its YAML defaults, choices, range), or None."""
    value = literal_value(raw)
    if value is None:
        return None
    if key in _choices() and value not in _choices()[key]:
        return UnknownNameError(key, value, _choices()[key])
    kinds = {k for k in map(_kind, config_defaults().get(key, ())) if k is not None} | _ALSO_ACCEPTED.get(key, set())
    if kinds and not _type_ok(value, kinds):
        wanted = " or ".join(sorted({_WANTED[k] for k in kinds}))
        return ConfigError(f"config key {key!r} must be {wanted}; got {raw!r} ({type(raw).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        return ConfigError(f"config key {key!r} must be a finite number; got {raw!r}")
    rule = _RANGES.get(key)
    if rule is not None:
        test, text = rule
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            return ConfigError(f"config key {key!r} must be {text}; got {raw!r}")
    return None


def check_values(params: Mapping[str, Any]) -> None:
    """Type, range and choice checks of known keys (after RecBole's literal parsing); the first problem raised."""
    for key, raw in params.items():
        problem = _value_problem(key, raw)
        if problem is not None:
            raise problem


def resolve_nulls(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without the ``null``s that mean "the default": a key set to None whose YAML defaults are never
    None (``beta: null``, ``--param beta=``) is dropped, so RecBole's merged default applies, not a library's
    (TRL's beta 0.1). Keys where None is a setting of its own (``prompt_environment: ~``) keep it."""
    defaults = config_defaults()
    return {
        k: v for k, v in params.items() if v is not None or k not in defaults or any(d is None for d in defaults[k])
    }


def _merged_settings(model: str, dataset: str, params: Mapping[str, Any]) -> "_Settings":
    """RecBole's layering without RecBole's ``Config`` (which prepares data as a side effect): overall YAMLs,
    then the dataset's and the model's YAMLs (causalrec's, base classes first), then the user's keys."""
    import recbole

    merged: dict[str, Any] = {}
    props = Path(recbole.__file__).parent / "properties"
    files = [
        props / "overall.yaml",
        registry.properties_dir() / "overall.yaml",
        props / "dataset" / f"{dataset}.yaml",
        registry.properties_dir() / "dataset" / f"{dataset}.yaml",
        props / "model" / f"{model}.yaml",
    ]
    for path in files:
        if path.is_file():
            merged.update(load_yaml(path.read_text(encoding="utf-8")) or {})
    model_cls = registry.model_class(model)
    if model_cls is not None:
        merged.update(registry.model_defaults(model_cls))
    merged.update({k: literal_value(v) for k, v in params.items()})
    merged.update(model=model, dataset=dataset)
    return _Settings(merged)


class _Settings(dict):
    """A merged config read like RecBole's ``Config``: a missing key is None."""

    def __getitem__(self, key: str) -> Any:
        return self.get(key)


def _stage_problems(model: str, settings: _Settings, params: Mapping[str, Any]) -> list[CausalRecError]:
    """Build the LLM model's TRL stage configs as training will (in a throw-away folder)."""
    from causalrec.recbole import stage_args

    model_cls = registry.model_class(model)
    if model_cls is None or not hasattr(model_cls, "alignment"):
        return []
    user = {k: params.get(k) for k in ("sft_args", "dpo_args")}
    problems = [p for p in [validate_stages_problem(settings["validate_stages"], settings["stage_cache"])] if p]
    if settings["item_repr"] == "semantic" and settings["semantic_source"] == "sentence":
        from causalrec.llm.grounding import sentence_encoder_dir

        try:  # the encoder loads when the model is built, after the data is prepared
            sentence_encoder_dir(settings["semantic_encoder"])
        except CausalRecError as err:
            problems.append(err)
    try:  # the backbone's own rules (dropouts, sizes, heads that divide the width), else checked once data is ready
        from causalrec.llm.backbone import BackboneConfig
        from causalrec.llm.presets import backbone_settings

        BackboneConfig.from_dict(backbone_settings(dict(settings)))
    except CausalRecError as err:
        problems.append(err)
    with tempfile.TemporaryDirectory(prefix="causalrec-preflight-") as tmp:
        try:
            positions = resolve_sft_positions(settings["sft_positions"], settings["item_repr"])
            stage_args.sft_config(settings, user, positions, tmp)
        except CausalRecError as err:
            problems.append(err)
        if model_cls.alignment is not None:
            try:
                stage_args.alignment_config(settings, user, model_cls, tmp)
            except CausalRecError as err:
                problems.append(err)
            if settings["num_negatives"] == "all" and not uses_item_tokens(settings["item_repr"]):
                problems.append(  # the trainer says so too, but only after SFT
                    ConfigError(
                        f"num_negatives: all needs item tokens (item_repr: id or title+id); got item_repr: "
                        f"{settings['item_repr']}: use a number of sampled negatives"
                    )
                )
    return problems


def _metric_problems(settings: _Settings) -> list[CausalRecError]:
    """Metric names are RecBole's; ``valid_metric`` is one of ``metrics`` (at a ``topk`` cut-off for top-k ones)."""
    from recbole.evaluator.register import metrics_dict

    metrics = settings["metrics"] or []
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    topk = settings["topk"]
    topk = [topk] if isinstance(topk, int) else list(topk or [])
    problems: list[CausalRecError] = [
        UnknownNameError("metric", m, sorted(metrics_dict)) for m in metrics if str(m).lower() not in metrics_dict
    ]
    valid = str(settings["valid_metric"] or "")
    name, _, cut = valid.partition("@")
    wanted = {str(m).lower() for m in metrics}
    if name.lower() not in wanted:
        choices = [f"{m}@{k}" for m in metrics for k in topk] or [str(m) for m in metrics]
        problems.append(UnknownNameError("valid_metric", valid, choices, more=" (a metric of `metrics` at a `topk`)"))
    elif cut and (not cut.isdigit() or int(cut) not in topk):
        problems.append(ConfigError(f"valid_metric {valid!r}: the cut-off @{cut} is not in topk {topk}"))
    return problems


def probe_writable(folder: str | os.PathLike, what: str, created: list[Path] | None = None) -> CausalRecError | None:
    """Whether a run could write into ``folder``: missing folders up to it are made (appended to ``created``, so the
    caller can remove them if the run does not go ahead) and a file is created and removed in it. Safe when several
    processes of one launch probe the same folder at once. A ConfigError naming ``what`` and the folder when not."""
    folder = Path(folder).expanduser().absolute()
    created = [] if created is None else created
    try:
        for attempt in range(5):
            try:
                _make_missing(folder, created)
                break
            except FileNotFoundError:  # another process removed an empty parent we had just made: again
                if attempt == 4:
                    raise
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".causalrec-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return ConfigError(f"{what} {str(folder)!r} cannot be written ({reason}): choose a writable folder")
    return None


def _make_missing(folder: Path, created: list[Path]) -> None:
    """Make ``folder`` and its missing parents, outermost first, appending each one made here to ``created``."""
    for parent in reversed([p for p in [folder, *folder.parents] if not p.exists()]):
        try:
            parent.mkdir()
            created.append(parent)
        except FileExistsError:  # another process of the launch made it first
            pass


def remove_created(created: list[Path]) -> None:
    """Remove the folders a probe made (deepest first), where they are still empty."""
    for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()


def _folder_problems(
    settings: _Settings, output: str | os.PathLike | None, saved: bool, created: list[Path]
) -> list[CausalRecError]:
    from causalrec.data.spec import default_cache_dir

    folders = []
    if output is not None:
        out = Path(output).expanduser()
        if out.is_dir():
            return [ConfigError(f"--output {str(out)!r} is a folder; give a file name such as result.json")]
        folders.append((out.parent, "the --output file's folder"))
    checkpoint_dir = settings["checkpoint_dir"] or "saved"
    if saved:
        folders.append((checkpoint_dir, "checkpoint_dir"))
    folders.append((settings["log_dir"] or checkpoint_dir, "log_dir (RecBole's logs)"))
    if saved and settings["stage_cache"] is not False and settings["backbone"] is not None:  # LLM models only
        folders.append((settings["stage_cache_dir"] or Path(checkpoint_dir) / "stages", "the stage cache"))
    if protocol.needs_preparation(settings):
        spec_cache = settings["data_cache_dir"]
        folders.append((Path(spec_cache) if spec_cache else default_cache_dir(), "the prepared-data cache"))
    return [p for p in (probe_writable(f, what, created) for f, what in folders) if p is not None]


def _input_problems(settings: _Settings) -> list[CausalRecError]:
    """Every input file of a prepared dataset exists, is a file and can be read (its first bytes)."""
    if not protocol.needs_preparation(settings):
        return []
    from causalrec.data import DataSpec
    from causalrec.data.sources import input_files

    try:
        spec = DataSpec.from_mapping(settings, strict=False)
    except CausalRecError as err:
        return [err]
    problems: list[CausalRecError] = []
    for path in input_files(spec):
        if not path.exists():
            problems.append(DataError(f"input file {str(path)!r} does not exist"))
        elif path.is_dir():
            problems.append(DataError(f"input file {str(path)!r} is a folder, not a file"))
        else:
            try:
                with open(path, "rb") as handle:
                    handle.read(4096)
            except OSError as err:
                problems.append(DataError(f"input file {str(path)!r} cannot be read ({err.strerror or err})"))
    return problems


def _attempt(problems: list[CausalRecError], check: Callable[[], Iterable[CausalRecError] | None]) -> None:
    try:
        problems.extend(check() or ())
    except CausalRecError as err:
        problems.append(err)


def preflight(
    model: str,
    dataset: str,
    params: Mapping[str, Any],
    *,
    output: str | os.PathLike | None = None,
    saved: bool = True,
    probe_folders: bool = True,
) -> None:
    """Check a run's configuration before any work; a ``PreflightError`` lists every problem found.

    ``params`` are the user's keys (config files and ``--param`` merged, after ``resolve_nulls``); ``output`` the
    JSON result file (``--output``); ``saved`` whether checkpoints are written."""
    if model not in model_names():
        raise UnknownNameError("model", model, model_names())
    problems: list[CausalRecError] = []
    known = known_config_keys()
    for key in params:
        if key not in known:
            problems.append(UnknownNameError("config key", key, known, more="; `causalrec keys` lists them"))
    for key, raw in params.items():
        if key in known:
            _attempt(problems, lambda key=key, raw=raw: [p for p in [_value_problem(key, raw)] if p])
    _attempt(problems, lambda: _dataset_problems(dataset, params))
    settings = _merged_settings(model, dataset, params)
    _attempt(problems, lambda: _metric_problems(settings))
    _attempt(problems, lambda: _input_problems(settings))
    if not problems:  # built only from valid keys, so that a bad value is not reported twice
        _attempt(problems, lambda: _stage_problems(model, settings, params))
    created: list[Path] = []  # kept when the run goes ahead (it writes there), removed when it does not
    if probe_folders:
        _attempt(problems, lambda: _folder_problems(settings, output, saved, created))
    if problems:
        remove_created(created)
    raise_all(problems)


def raise_all(problems: list[CausalRecError]) -> None:
    """One problem is raised as itself (its own class and exit code); several as a ``PreflightError`` listing all."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise PreflightError(problems)


def _dataset_problems(dataset: str, params: Mapping[str, Any]) -> list[CausalRecError]:
    if protocol.needs_preparation({"dataset": dataset, **params}):
        return []
    data_path = Path(params.get("data_path", "dataset/"))
    if dataset != "ml-100k" and not (data_path / dataset).is_dir():
        choices = list(protocol.PREPARED_DATASETS) + ["ml-100k"]
        return [
            ConfigError(
                f"unknown dataset {dataset!r}: it is not one of causalrec's ({', '.join(choices)}) and "
                f"{str(data_path / dataset)!r} holds no RecBole atomic files. Set data_path or use one of those."
            )
        ]
    return []


def validate(model: str, dataset: str, params: Mapping[str, Any]) -> None:
    """The configuration checks of ``preflight`` without probing folders (for callers that write nothing yet)."""
    preflight(model, dataset, params, probe_folders=False)


def check_against_data(config, dataset) -> None:
    """What only the loaded data can tell, checked before training: ``topk`` cut-offs within the catalog, and
    latent environments no more than the preference stage's training rows."""
    n_items = int(dataset.item_num) - 1  # RecBole's item 0 is padding
    topk = config["topk"]
    topk = [topk] if isinstance(topk, int) else list(topk or [])
    problems: list[CausalRecError] = []
    too_big = [k for k in topk if k > n_items]
    if too_big:
        problems.append(
            ConfigError(f"topk {too_big} exceeds the catalog of {n_items} items: use cut-offs <= {n_items}")
        )
    if config["env_source"] == "latent" and config["n_environments"] is not None:
        rows = len(dataset.inter_feat)
        cap = config["dpo_max_samples"]
        rows = min(rows, int(cap)) if cap is not None else rows
        if int(config["n_environments"]) > rows:
            problems.append(
                ConfigError(
                    f"n_environments {config['n_environments']} exceeds the {rows} rows of the "
                    f"preference stage: use at most {rows} latent environments"
                )
            )
    raise_all(problems)


def read_config_files(paths: Sequence[str | os.PathLike] | None) -> dict[str, Any]:
    """Read and merge YAML config files (later files win), with clear errors."""
    merged: dict[str, Any] = {}
    for path in paths or ():
        loaded = read_yaml_file(path)
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of keys to values, not {type(loaded).__name__}"
            )
        merged.update(loaded)
    return merged
