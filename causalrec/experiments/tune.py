"""``causalrec tune``: an Optuna study whose objective is the out-of-distribution validation metric.

Each trial draws settings from a search space (``tuning/<model>.yaml``, see ``causalrec.experiments.space``),
trains the model on the split's training part and scores it on the split's validation part — for a shift
split that is the OOD validation environment, never the test part. ``objective="mean"`` takes the validation
metric over all validation cases (what RecBole early-stops on); ``objective="worst"`` the worst validation
environment (season or region group, ``env_fields``; groups with fewer than ``min_env_cases`` cases are left
out). Per-epoch values (per training stage for the LLM models) are reported to Optuna so a pruner (median,
hyperband) stops bad trials; a trial that fails is recorded with its error and the study goes on. Test
metrics of finished trials are stored as user attributes for information only.

Storage: a SQLite file ``<out>/optuna.db`` by default (with heartbeats: a trial of a killed process is marked
failed and retried once), any Optuna RDB URL, or ``journal:PATH`` (a journal file that several worker
processes can share). ``resume=True`` continues a stored study; its finished trials are kept. Outputs under
``<out>``: ``best.yaml`` (``causalrec run --config-files best.yaml``), ``trials.csv``, ``importance.csv``,
``summary.md`` and ``plots/*.png``.

Checkpoint selection and early stopping stay RecBole's (the overall ``valid_metric``); with the worst objective
the trial's value is the worst environment of the model RecBole kept.

Why this module is long: a study is one object graph (the objective, pruning on the stage callbacks, the journal storage, the test of the best trial, the importance table) around one Optuna study; the search space is in ``space.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from causalrec.errors import CausalRecError, ConfigError, UnknownNameError
from causalrec.experiments.configs import layer
from causalrec.experiments.space import SearchSpace
from causalrec.io import digest, write_atomic

_log = logging.getLogger(__name__)

OBJECTIVES = ("mean", "worst")
STUDY_ATTR = "causalrec"  # study user attribute: what the study measures (model, split, metric, space, ...)
PRUNERS = ("median", "hyperband", "none")
# Keys a study sets per trial, and base-config keys that do not change what a trial measures.
_TRIAL_KEYS = ("checkpoint_dir",)
_NOT_COMPARED = (
    "show_progress",
    "stage_cache_dir",
    "checkpoint_dir",
    "log_dir",
    "data_cache_dir",
    "eval_batch_size",
    "rank_batch_size",
    "state",
)


@dataclass
class TuneConfig:
    """An Optuna study over one model on one split.

    Args:
        model, dataset, split: what is tuned, on which data and shift split.
        space: a search-space YAML path, a name in ``tuning/`` (``sasrec``) or a ``SearchSpace``;
            None: ``tuning/<model lower-case>.yaml``.
        trials: trials this process runs (Optuna's ``n_trials``).
        max_trials: stop once the study holds this many finished trials, counting every worker's and earlier
            runs' (None: no such limit).
        timeout: stop starting trials after this many seconds.
        storage: None (``sqlite:///<out>/optuna.db``), an Optuna RDB URL, or ``journal:PATH``.
        study_name: None: ``<model>-<dataset>-<split>-<objective>``.
        resume: continue a stored study of that name (its model, split, metric, objective, space and base
            config must match); without it an existing name is an error.
        metric: validation metric (a RecBole name such as ``ndcg@10``; it must be among ``metrics`` x ``topk``).
        objective: ``mean`` (all validation cases) or ``worst`` (worst environment of ``env_fields``).
        env_fields, min_env_cases: environments of the worst objective, and the fewest cases one must have.
        pruner: ``median`` | ``hyperband`` | ``none`` or an ``optuna.pruners.BasePruner``.
        pruner_startup_trials, pruner_warmup_steps: the median pruner's ``n_startup_trials``/``n_warmup_steps``.
        sampler_seed: seed of the TPE sampler (leave None when several workers share a study).
        config_files, params: RecBole settings of every trial, over the space's ``fixed:`` keys (dotted keys
            set one field of a dict, ``sft_args.max_steps``); the tuned keys win over both.
        out: output folder (default storage, per-trial checkpoints, shared LLM stage cache, reports).
        test: evaluate finished trials on the test split (user attribute ``test_result``; never the objective).
        enqueue: parameter dicts to try first (e.g. the current defaults), skipped if already tried.
        keep_checkpoints: keep each trial's checkpoint under ``<out>/trials``.
        show_progress: Optuna's progress bar over trials.
    """

    model: str
    dataset: str = "retail-sim"
    split: str = "seasonal"
    space: str | Path | SearchSpace | None = None
    trials: int = 20
    max_trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None
    resume: bool = False
    metric: str = "ndcg@10"
    objective: str = "mean"
    env_fields: Sequence[str] = ("season", "region")
    min_env_cases: int = 1
    pruner: Any = "median"
    pruner_startup_trials: int = 5
    pruner_warmup_steps: int = 0
    sampler_seed: int | None = None
    config_files: Sequence[str | Path] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    out: str | Path = "tune-results"
    test: bool = True
    enqueue: Sequence[Mapping[str, Any]] = ()
    keep_checkpoints: bool = False
    show_progress: bool = False

    def __post_init__(self):
        from causalrec.data import SPLITS
        from causalrec.recbole.preflight import model_names, raise_all

        problems: list[CausalRecError] = []  # every problem at once, as the preflight lists a configuration's
        if self.model not in model_names():
            problems.append(UnknownNameError("model", self.model, model_names()))
        if self.split not in SPLITS:
            problems.append(UnknownNameError("split", self.split, SPLITS))
        if self.objective not in OBJECTIVES:
            problems.append(UnknownNameError("objective", self.objective, OBJECTIVES))
        if isinstance(self.pruner, str) and self.pruner not in PRUNERS:
            problems.append(UnknownNameError("pruner", self.pruner, PRUNERS))
        for name in ("trials", "pruner_startup_trials", "pruner_warmup_steps", "min_env_cases"):
            value, low = getattr(self, name), 1 if name == "trials" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(ConfigError(f"{name} must be an integer >= {low}; got {value!r}"))
        if self.max_trials is not None and (not isinstance(self.max_trials, int) or self.max_trials < 1):
            problems.append(ConfigError(f"max_trials must be an integer >= 1; got {self.max_trials!r}"))
        self.env_fields = tuple(self.env_fields)
        if not self.env_fields:
            problems.append(ConfigError("env_fields must name at least one environment field (season, region)"))
        if "@" not in str(self.metric):
            problems.append(ConfigError(f"metric must be a top-k metric like ndcg@10; got {self.metric!r}"))
        raise_all(problems)
        self.metric = str(self.metric).lower()
        self.out = Path(self.out)
        if self.study_name is None:
            self.study_name = f"{self.model}-{self.dataset}-{self.split}-{self.objective}"

    def load_space(self) -> SearchSpace:
        if isinstance(self.space, SearchSpace):
            return self.space
        return SearchSpace.from_file(resolve_space(self.space, self.model))


def resolve_space(space: str | Path | None, model: str) -> Path:
    """A space path: as given, or by name (``sasrec``, ``tuning/sasrec.yaml``) from the shipped ``tuning/``."""
    from causalrec.recbole.plugin import tuning_dir

    if space is not None and Path(space).is_file():
        return Path(space)
    given = Path(str(space)) if space is not None else Path(f"{model.lower()}.yaml")
    shipped = tuning_dir() / f"{given.stem}.yaml"
    if given.parent in (Path("."), Path("tuning")) and shipped.is_file():
        return shipped
    available = sorted(p.stem for p in tuning_dir().glob("*.yaml"))
    raise ConfigError(
        f"search space {str(given)!r} not found; give a YAML path or one of the shipped spaces "
        f"({tuning_dir()}): {', '.join(available)}"
    )


# ------------------------------------------------------------------------------------------- storage
def open_storage(url: str | None, out: Path):
    """``(storage, url)``: an Optuna storage for ``url`` (None: SQLite in ``out``), or a ConfigError."""
    import optuna

    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(out / 'optuna.db').resolve()}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:") :]).expanduser()
        if not str(path) or path.is_dir() or not path.parent.is_dir():
            raise ConfigError(
                f"cannot open Optuna journal {url!r}: {str(path.parent)!r} is not an existing folder "
                f"or the path is a folder; use journal:PATH/TO/FILE.log"
            )
        try:
            return JournalStorage(JournalFileBackend(str(path))), url
        except Exception as err:  # noqa: BLE001 - any backend failure is the user's path
            raise ConfigError(f"cannot open Optuna journal {url!r}: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.x
            storage = optuna.storages.RDBStorage(
                url,
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"cannot open Optuna storage {url!r}: its database driver is not installed "
            f"({err.name}); install it, or use sqlite:///PATH or journal:PATH"
        ) from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy/Optuna raise many kinds for a bad URL
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"cannot open Optuna storage {url!r}: {reason}. Use sqlite:///PATH/TO/study.db, an "
            f"RDB URL such as postgresql://user:pass@host/db, or journal:PATH"
        ) from None
    return storage, url


def make_pruner(cfg: TuneConfig):
    import optuna

    if not isinstance(cfg.pruner, str):
        return cfg.pruner
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_steps
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig, storage, url: str, direction: str, meta: dict[str, Any]):
    """Create the study, or load it with ``resume`` after checking it measures the same thing."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed)
    exists = cfg.study_name in optuna.study.get_all_study_names(storage)
    if exists and not cfg.resume:
        n = len(optuna.load_study(study_name=cfg.study_name, storage=storage).trials)
        raise ConfigError(
            f"study {cfg.study_name!r} already exists in {url} with {n} trials; pass --resume "
            f"(resume=True) to continue it, or choose another --study-name"
        )
    study = optuna.create_study(
        study_name=cfg.study_name,
        storage=storage,
        direction=direction,
        sampler=sampler,
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )  # another worker may create it now
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:  # one attribute, written at once: a worker never sees half of it
        study.set_user_attr(STUDY_ATTR, meta)
        return study
    differ = {k: (stored.get(k), v) for k, v in meta.items() if stored.get(k) != v}
    if differ:
        text = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ConfigError(
            f"study {cfg.study_name!r} in {url} was made with other settings ({text}); resuming "
            f"would mix trials that measure different things. Use another --study-name"
        )
    if exists:
        _log.info("resuming study %s: %d trials stored", cfg.study_name, len(study.trials))
    return study


# --------------------------------------------------------------------------------------- one trial
@dataclass
class TrialOutcome:
    value: float
    best_valid_score: float
    valid_result: dict[str, float]
    valid_env_result: dict[str, Any]
    worst_environment: str | None
    test_result: dict[str, float] | None
    test_env_result: dict[str, Any] | None
    steps: int


def fit_trial(
    model: str,
    dataset: str,
    params: dict[str, Any],
    *,
    report: Callable[[int, float], None],
    objective: str,
    metric: str,
    env_fields: Sequence[str],
    min_env_cases: int,
    test: bool,
) -> TrialOutcome:
    """Train one configuration the way ``causalrec.run`` does, with every validation also scored per
    environment; ``report(step, value)`` gets each validation's objective value (it may raise TrialPruned)."""
    from causalrec.recbole.evaluation import (
        ENV_FIELDS,
        evaluate_with_environments,
        record_environments,
        worst_environment,
    )
    from causalrec.recbole.quick_start import build

    config, trainer, (train_data, valid_data, test_data) = build(model, dataset, config_dict=params)
    smaller = not config["valid_metric_bigger"]
    show = bool(config["show_progress"])
    scores: list[float] = []
    warned: list[bool] = []

    def value_of(score: float, per_env) -> tuple[float, str | None]:
        if objective == "mean":
            return float(score), None
        worst = worst_environment(per_env, metric, env_fields, min_env_cases, smaller)
        if worst is None:
            if not warned:
                warned.append(True)
                _log.warning(
                    "no validation environment of %s has >= %d cases: the worst objective falls back to the mean",
                    "/".join(env_fields),
                    min_env_cases,
                )
            return float(score), None
        return worst

    with record_environments(trainer, valid_data, fields=tuple(env_fields)) as history:

        def callback(step: int, score: float) -> None:
            scores.append(float(score))
            value, _ = value_of(score, history[-1] if history else {})
            report(step, value)

        best_score, best_result = trainer.fit(
            train_data, valid_data, saved=True, show_progress=show, callback_fn=callback
        )
    if scores:  # the validation of the model RecBole kept: the last stage (LLM models) or the first best epoch
        llm = getattr(trainer, "stage_results", None) is not None
        kept = len(scores) - 1 if llm or best_score not in scores else scores.index(best_score)
        per_env = history[kept] if kept < len(history) else {}
    else:
        per_env = {}
    value, where = value_of(best_score, per_env)
    test_result = test_env_result = None
    if test:
        test_result, test_env_result = evaluate_with_environments(
            trainer,
            test_data,
            load_best_model=True,
            show_progress=show,
            fields=ENV_FIELDS if config["env_metrics"] else (),
        )
    return TrialOutcome(
        value, float(best_score), dict(best_result or {}), per_env, where, test_result, test_env_result, len(scores)
    )


def _float(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


class Objective:
    """Optuna objective: suggest, train (reporting per epoch), record; errors are recorded and re-raised."""

    def __init__(self, cfg: TuneConfig, space: SearchSpace, base: dict[str, Any]):
        self.cfg, self.space, self.base = cfg, space, base

    def __call__(self, trial) -> float:
        import optuna

        cfg = self.cfg
        values = self.space.suggest(trial)
        params = layer(self.base, values)
        checkpoints = cfg.out / "trials" / f"{_safe(cfg.study_name)}-{trial.number}"
        params["checkpoint_dir"] = str(checkpoints)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        start = time.perf_counter()

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} ({cfg.metric} {value:.4f})")

        try:
            outcome = fit_trial(
                cfg.model,
                cfg.dataset,
                params,
                report=report,
                objective=cfg.objective,
                metric=cfg.metric,
                env_fields=cfg.env_fields,
                min_env_cases=cfg.min_env_cases,
                test=cfg.test,
            )
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
            raise
        except Exception as err:  # recorded on the trial; Optuna marks it failed and the study goes on
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            trial.set_user_attr("traceback", "".join(traceback.format_exception(err)[-4:])[-4000:])
            raise
        finally:
            if not cfg.keep_checkpoints:
                shutil.rmtree(checkpoints, ignore_errors=True)
                with contextlib.suppress(OSError):
                    checkpoints.parent.rmdir()  # only when no other trial keeps one
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
        trial.set_user_attr("best_valid_score", _float(outcome.best_valid_score))
        trial.set_user_attr("valid_result", {k: float(v) for k, v in outcome.valid_result.items()})
        trial.set_user_attr("valid_env_result", outcome.valid_env_result)
        if outcome.worst_environment:
            trial.set_user_attr("worst_environment", outcome.worst_environment)
        if outcome.test_result is not None:
            trial.set_user_attr("test_result", {k: float(v) for k, v in outcome.test_result.items()})
        return outcome.value


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ------------------------------------------------------------------------------------------- study
def base_config(cfg: TuneConfig, space: SearchSpace) -> dict[str, Any]:
    """Every trial's settings before the tuned keys: space ``fixed`` < config files < params < split/metric."""
    from causalrec.recbole.preflight import read_config_files

    base = layer(space.fixed, read_config_files(cfg.config_files))
    base = layer(base, cfg.params)
    for key in ("split", "valid_metric"):
        if key in base:
            _log.warning(
                "config sets %s=%r; the study uses %r", key, base[key], cfg.split if key == "split" else cfg.metric
            )
    base["split"] = cfg.split
    base["valid_metric"] = cfg.metric.upper() if "@" in cfg.metric else cfg.metric
    base.setdefault("show_progress", False)
    if base.get("stage_cache_dir") is None:
        base["stage_cache_dir"] = str((cfg.out / "stages").resolve())
    tuned_top = {n for n in space.names if "." not in n} & set(base)
    if tuned_top:
        _log.warning(
            "the search space tunes %s; the configured value(s) are replaced in every trial", sorted(tuned_top)
        )
    return base


def check_setup(cfg: TuneConfig, space: SearchSpace, base: dict[str, Any]) -> str:
    """Fail before any trial: keys, values, dataset and metric. Returns the study direction."""
    from causalrec.recbole.quick_start import make_config

    space.check(cfg.model)
    first = {p.name: p.values_to_check()[0] for p in space.params}
    config = make_config(cfg.model, cfg.dataset, config_dict=layer(base, first))
    name, _, k = cfg.metric.partition("@")
    metrics = [m.lower() for m in config["metrics"]]
    topk = config["topk"] if isinstance(config["topk"], list) else [config["topk"]]
    if name not in metrics or not k.isdigit() or int(k) not in topk:
        raise ConfigError(
            f"metric {cfg.metric!r} is not computed: the config's metrics are {config['metrics']} "
            f"at topk {topk}; choose one of those or set metrics/topk"
        )
    return "minimize" if not config["valid_metric_bigger"] else "maximize"


def tune(model: str, dataset: str = "retail-sim", **kwargs):
    """Run (or continue) an Optuna study and write its outputs; returns the ``optuna.Study``.

    Keyword arguments are ``TuneConfig`` fields. Example::

        study = causalrec.tune("SASRec", "retail-sim", split="seasonal", trials=20, objective="worst",
                               params={"epochs": 50}, out="runs/tune-sasrec")
        study.best_params
    """
    return run_study(TuneConfig(model=model, dataset=dataset, **kwargs))


def run_study(cfg: TuneConfig):
    """``tune`` for a ``TuneConfig``."""
    from causalrec.experiments.compare import VOLATILE_KEYS

    space = cfg.load_space()
    base = base_config(cfg, space)
    direction = check_setup(cfg, space, base)
    cfg.out.mkdir(parents=True, exist_ok=True)
    storage, url = open_storage(cfg.storage, cfg.out)
    compared = {k: v for k, v in base.items() if k not in VOLATILE_KEYS and k not in _NOT_COMPARED}
    meta = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "metric": cfg.metric,
        "objective": cfg.objective,
        "env_fields": list(cfg.env_fields) if cfg.objective == "worst" else None,
        "space": space.digest(),
        "config": digest(compared, ascii_only=True)[:16],
    }
    study = open_study(cfg, storage, url, direction, meta)
    for params in cfg.enqueue:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    n_trials = cfg.trials
    callbacks = []
    if cfg.max_trials is not None:
        n_trials = min(n_trials, max(0, cfg.max_trials - budget_used(study)))
        callbacks.append(_StopAtBudget(cfg.max_trials))
    _log.info(
        "study %s (%s %s of %s, %s): %d trial(s) to run in %s",
        cfg.study_name,
        direction,
        cfg.objective,
        cfg.metric,
        cfg.model,
        n_trials,
        url,
    )
    try:
        if n_trials:
            study.optimize(
                Objective(cfg, space, base),
                n_trials=n_trials,
                timeout=cfg.timeout,
                catch=(Exception,),
                callbacks=callbacks,
                gc_after_trial=True,
                show_progress_bar=cfg.show_progress,
            )
    finally:
        write_outputs(study, cfg, base, url)
    return study


def budget_used(study) -> int:
    """Finished trials (complete, pruned, failed) counted against ``max_trials``, leaving out a trial that failed
    because its worker died (a stale heartbeat) and was then retried: the retry spends that budget, not both, so
    a study killed and resumed evaluates as many configurations as one that ran straight through."""
    import optuna
    from optuna.storages import RetryFailedTrialCallback

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since 2.8
        retried = {RetryFailedTrialCallback.retried_trial_number(t) for t in trials} - {None}
    return sum(
        t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and t.number not in retried)
        for t in trials
    )


class _StopAtBudget:
    """``study.optimize`` callback: stop once ``budget_used`` reaches ``max_trials`` (every worker's trials)."""

    def __init__(self, max_trials: int):
        self.max_trials = max_trials

    def __call__(self, study, trial) -> None:
        if budget_used(study) >= self.max_trials:
            study.stop()


# ------------------------------------------------------------------------------------------- outputs
def export_best(study, cfg: TuneConfig, base: dict[str, Any], path: Path) -> Path | None:
    """The best trial's whole config as a RecBole YAML for ``causalrec run --config-files``."""
    import yaml

    try:
        best = study.best_trial
    except ValueError:
        _log.info("no complete trial yet: no best.yaml")
        return None
    config = layer(base, best.params)
    for key in ("stage_cache_dir", "checkpoint_dir", "show_progress"):
        config.pop(key, None)
    header = (
        f"# Best trial {best.number} of Optuna study {study.study_name!r}: {cfg.objective} validation "
        f"{cfg.metric} = {best.value:.6g} ({cfg.model} on {cfg.dataset}, split {cfg.split}).\n"
        f"# causalrec run --model {cfg.model} --dataset {cfg.dataset} --config-files {path.name}\n"
    )
    write_atomic(path, header + yaml.safe_dump(config, sort_keys=True, default_flow_style=False))
    return path


def importance(study):
    """``(frame, reason)``: parameter importances (Optuna's default evaluator), or why there are none."""
    import optuna
    import pandas as pd

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"needs at least 2 complete trials ({len(complete)} so far)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study)
    except Exception as err:  # noqa: BLE001 - e.g. every trial used the same values
        return None, f"{type(err).__name__}: {err}"
    if not values:
        return None, "no parameter varied across complete trials"
    return pd.DataFrame({"param": list(values), "importance": list(values.values())}), None


def write_plots(study, folder: Path) -> list[str]:
    """Optuna's matplotlib plots as PNGs; a plot that cannot be drawn is skipped with a log line."""
    import matplotlib

    if "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use("Agg")  # headless; a session that already chose a backend keeps it
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (
        ("optimization_history", ovm.plot_optimization_history),
        ("intermediate_values", ovm.plot_intermediate_values),
        ("param_importances", ovm.plot_param_importances),
        ("parallel_coordinate", ovm.plot_parallel_coordinate),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study)
            axes = ax.flat if hasattr(ax, "flat") else [ax]
            fig = next(iter(axes)).figure
            fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(str(folder / f"{name}.png"))
        except Exception as err:  # noqa: BLE001 - too few trials, no varying parameter, ...
            _log.info("plot %s skipped: %s", name, str(err).splitlines()[0] if str(err) else type(err).__name__)
            plt.close("all")
    return written


def dashboard_command(url: str) -> str:
    if url.startswith("journal:"):
        return f"optuna-dashboard {url[len('journal:') :]}"
    return f"optuna-dashboard {url}"


def write_outputs(study, cfg: TuneConfig, base: dict[str, Any], url: str) -> dict[str, Any]:
    """``trials.csv``, ``best.yaml``, ``importance.csv``, ``summary.md`` and ``plots/`` under ``cfg.out``."""
    import optuna

    out = cfg.out
    files: dict[str, Any] = {}
    trials = study.trials_dataframe()
    drop = [c for c in trials.columns if c.endswith("user_attrs_traceback")]
    write_atomic(out / "trials.csv", trials.drop(columns=drop).to_csv(index=False))
    files["trials"] = str(out / "trials.csv")
    best = export_best(study, cfg, base, out / "best.yaml")
    if best is not None:
        files["best"] = str(best)
    table, reason = importance(study)
    if table is not None:
        write_atomic(out / "importance.csv", table.to_csv(index=False))
        files["importance"] = str(out / "importance.csv")
    else:
        _log.info("parameter importance skipped: %s", reason)
    files["plots"] = write_plots(study, out / "plots")
    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState}
    lines = [
        f"# Optuna study {study.study_name}",
        "",
        f"{cfg.model} on {cfg.dataset}, split {cfg.split}; objective: {cfg.objective} validation {cfg.metric} "
        f"({study.direction.name.lower()}). Storage: `{url}`.",
        "",
        "Trials: " + ", ".join(f"{n.lower()} {c}" for n, c in counts.items() if c),
        "",
    ]
    if best is not None:
        bt = study.best_trial
        lines += [
            f"## Best trial {bt.number}: {bt.value:.6g}",
            "",
            *(f"- `{k}`: {v!r}" for k, v in bt.params.items()),
            "",
            f"Config: `{best.name}` (`causalrec run --model {cfg.model} --dataset {cfg.dataset} "
            f"--config-files {best}`).",
        ]
        if bt.user_attrs.get("test_result"):
            shown = ", ".join(f"{k} {v:.4f}" for k, v in bt.user_attrs["test_result"].items())
            lines += ["", f"Test (information only, not used for selection): {shown}."]
    lines += ["", "## Parameter importance", ""]
    if table is not None:
        lines += [
            "| parameter | importance |",
            "|---|---|",
            *(f"| {r.param} | {r.importance:.3f} |" for r in table.itertuples()),
        ]
    else:
        lines.append(f"not available: {reason}")
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    if failed:
        lines += ["", "## Failed trials", "", "| trial | error |", "|---|---|"]
        for t in failed:
            error = " ".join(str(t.user_attrs.get("error", "(no error recorded)")).split())[:300]
            lines.append(f"| {t.number} | {error.replace('|', chr(92) + '|')} |")
    lines += ["", f"Dashboard: `{dashboard_command(url)}` (pip install 'causalrec[dashboard]')."]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")
    files["summary"] = str(out / "summary.md")
    return files
