"""``causalrec compare``: every model x split x seed through ``causalrec.run``, cached, then tables and plots.

Each cell trains one model on one split with one RecBole ``seed`` through ``causalrec.run``: the same prepared
data (the data's randomness follows ``data_seed``, not ``seed``), the same evaluator (``metrics``, ``topk``,
``valid_metric`` and ``mask_history`` are shared by every cell) and the same history protocol. A finished cell
is written atomically as JSON under ``<out>/cells/``, named by a hash of its whole RecBole config, so a re-run
or an interrupted run only trains what is missing. A cell that fails is recorded with its error; the grid goes
on and the report lists it.

Outputs under ``<out>``: ``results.csv`` (model, split, seed, environment, metric, value), ``report.md``
(mean ± std tables, OOD drop from iid, worst environments, significance against ``baseline``, failed cells),
``significance.csv``, ``cases.csv.gz`` (the per-case test values the bootstrap and the pooled test resample),
``failures.csv`` and ``plots/*.png``.

``publish`` (``--publish PUB``) copies every recorded cell, without its per-user values, into a folder meant to be
committed; ``--report-only`` on such a folder, or with ``--from DIR ...``, assembles a report from stored cells
alone (both in ``publish.py``, as the report's tables and tests are in ``report.py``).

Config layering, later wins: causalrec's evaluation defaults < ``config_files`` < ``params``; in files and
params a top-level key naming a model holds settings for that model only (``SASRec: {hidden_size: 64}``,
``--param SASRec.hidden_size=64``) and wins over the shared keys of the same source.

Why this module is long: planning a cell (its key), running it (the cache, ``--jobs`` worker processes) and writing
its report share the cell's key and record layout; publishing and pooling, which need only stored records, are in
``publish.py``, the tables and tests in ``report.py``.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from causalrec.errors import CausalRecError, ConfigError, UnknownNameError
from causalrec.experiments.configs import layer, split_sections
from causalrec.io import digest, exclusive_lock, write_atomic

_log = logging.getLogger(__name__)

DEFAULT_MODELS = ("Pop", "ItemKNN", "BPR", "GRU4Rec", "SASRec", "LightGCN", "GenRec", "SDPORec", "CausalDPO")
DEFAULT_SPLITS = ("iid", "seasonal", "regional")
# One evaluator for every cell: these keys may be set for the whole comparison, never per model.
EVAL_DEFAULTS: dict[str, Any] = {
    "metrics": ["Recall", "NDCG", "Hit", "MRR", "Precision"],
    "topk": [10, 20],
    "valid_metric": "NDCG@10",
}
EVAL_KEYS = ("metrics", "topk", "valid_metric", "mask_history", "env_metrics")
# The grid sets these per cell.
GRID_KEYS = ("split", "seed", "checkpoint_dir")
# Final-config keys that do not change a cell's result (paths, devices, logging): left out of its hash.
VOLATILE_KEYS = frozenset(
    {
        "checkpoint_dir",
        "log_dir",
        "data_path",
        "data_cache_dir",
        "prepared_dir",
        "stage_cache_dir",
        "device",
        "gpu_id",
        "use_gpu",
        "show_progress",
        "state",
        "log_wandb",
        "wandb_project",
        "worker",
        "local_rank",
        "single_spec",
        "nproc",
        "world_size",
        "offset",
        "ip",
        "port",
        "save_dataset",
        "save_dataloaders",
        "dataset_save_path",
        "dataloaders_save_path",
        "resume",
        "resume_save_steps",
        "eval_batch_size",
        "rank_batch_size",
        "validate_stages",
    }
)
CELL_FORMAT = 1
MAX_SEED_COUNT = 100
DEFAULT_REPORT_METRICS = ("ndcg@10", "recall@10")
DEFAULT_MIN_ENV_CASES = 20
DEFAULT_SEEDS = 3


@dataclass
class CompareConfig:
    """What to compare and where to write it.

    Args:
        models: RecBole or causalrec model names.
        dataset: a causalrec dataset (``retail-sim``, ``online-retail``, ``csv``) or any RecBole dataset.
        splits: causalrec splits (``iid``, ``seasonal``, ``regional``, ``temporal``, ``popularity``, ``mixed``);
            ``iid`` is the reference of the "drop vs iid" columns.
        seeds: RecBole ``seed`` values, or a count ``n`` meaning 2020 .. 2020 + n - 1 (2020 is RecBole's
            default, so seed 2020 matches a plain ``causalrec run``). The data stays the same (``data_seed``).
        out: output folder; cells are cached in ``<out>/cells``.
        config_files: RecBole YAML files for every cell (top-level model-name keys: that model only).
        params: config keys for every cell, over the files (``"Model.key"`` or ``{"Model": {...}}``: that
            model only; ``"sft_args.max_steps"``: one field of a dict-valued key).
        baseline: model every other model is tested against (paired t-test over seeds with Holm's correction,
            hierarchical-bootstrap interval of the relative change, Cohen's d_z; a pooled per-user Wilcoxon as a
            secondary figure); None: no significance section.
        report_metrics: metrics of the markdown tables, plots and tests (RecBole names, e.g. ``ndcg@10``).
        min_env_cases: the worst-environment rows consider only groups with at least this many test cases (a
            region with three test cases is at 0 or 1 by chance and would be every model's worst).
        retry_failed: re-run cells recorded as failed (finished cells are never re-run).
        report_only: train nothing: write the report from the cells already cached under ``out`` (e.g. after
            several processes ran disjoint parts of the grid); cells without a record are reported as not run.
        keep_checkpoints: keep each cell's model checkpoint under ``<out>/checkpoints`` (off: deleted after
            testing). LLM training stages are shared through ``<out>/stages`` unless ``stage_cache_dir`` is set.
        plots: write PNG plots.
        show_progress: a progress bar over cells.
        jobs: cells trained at once, each in a process of its own (``spawn``); each process gets
            ``OMP_NUM_THREADS`` = allowed cores // jobs (at least 1) unless the environment sets it, so ``num_threads:
            auto`` uses that count. Prepared data and LLM training stages are shared through their caches, whose
            locks let one process build what another waits for.
    """

    models: Sequence[str] = DEFAULT_MODELS
    dataset: str = "retail-sim"
    splits: Sequence[str] = DEFAULT_SPLITS
    seeds: int | Sequence[int] = 3
    out: str | Path = "compare-results"
    config_files: Sequence[str | Path] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    report_metrics: Sequence[str] = ("ndcg@10", "recall@10")
    min_env_cases: int = 20
    retry_failed: bool = True
    report_only: bool = False
    keep_checkpoints: bool = False
    plots: bool = True
    show_progress: bool = True
    jobs: int = 1

    def __post_init__(self):
        from causalrec.data import SPLITS
        from causalrec.recbole.preflight import model_names, raise_all

        # every problem of the grid at once, as the preflight lists a configuration's
        problems: list[CausalRecError] = []
        for what in ("models", "splits", "report_metrics"):
            items = _names(getattr(self, what))
            if not items:
                problems.append(ConfigError(f"{what} must name at least one entry"))
            elif len(set(items)) < len(items):
                problems.append(ConfigError(f"{what} lists an entry twice: {items}"))
            setattr(self, what, list(dict.fromkeys(items)))  # checked further once each
        self.report_metrics = [m.lower() for m in self.report_metrics]
        self.out = Path(self.out)
        problems += [
            *(UnknownNameError("model", m, model_names()) for m in self.models if m not in model_names()),
            *(UnknownNameError("split", s, SPLITS) for s in self.splits if s not in SPLITS),
        ]
        if self.baseline is not None and self.baseline not in self.models:
            problems.append(
                ConfigError(
                    f"baseline {self.baseline!r} is not one of the compared models "
                    f"({', '.join(self.models)}); add it to the models or choose another"
                )
            )
        if isinstance(self.min_env_cases, bool) or not isinstance(self.min_env_cases, int) or self.min_env_cases < 1:
            problems.append(ConfigError(f"min_env_cases must be an integer >= 1; got {self.min_env_cases!r}"))
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            problems.append(ConfigError(f"jobs must be an integer >= 1; got {self.jobs!r}"))
        try:
            self.seed_list()
        except ConfigError as bad_seeds:
            problems.append(bad_seeds)
        raise_all(problems)

    def seed_list(self) -> list[int]:
        seeds = self.seeds
        if isinstance(seeds, bool) or not isinstance(seeds, (int, Sequence)) or isinstance(seeds, str):
            raise ConfigError(f"seeds must be a count or a list of integers; got {seeds!r}")
        if isinstance(seeds, int):
            if seeds < 1:
                raise ConfigError(f"seeds must be >= 1; got {seeds}")
            if seeds > MAX_SEED_COUNT:  # `--seeds 2020` is far more likely a seed than 2,020 runs per cell
                raise ConfigError(
                    f"seeds={seeds} asks for {seeds} seeds per model and split; to run one seed, "
                    f"give a list: --seeds {seeds}, (or seeds=[{seeds}] from Python)"
                )
            return [2020 + i for i in range(seeds)]
        out = list(seeds)
        if (
            not out
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in out)
            or len(set(out)) < len(out)
        ):
            raise ConfigError(f"seeds must be distinct integers >= 0; got {seeds!r}")
        return out


@dataclass
class Cell:
    """One (model, split, seed) run: its ``causalrec.run`` settings and the hash of its whole config."""

    model: str
    split: str
    seed: int
    params: dict[str, Any]
    key: str

    @property
    def name(self) -> str:
        return f"{self.model}/{self.split}/seed {self.seed}"

    def path(self, out: Path) -> Path:
        return out / "cells" / f"{self.model}-{self.split}-seed{self.seed}-{self.key[:16]}.json"


def _names(value: str | Sequence[str]) -> list[str]:
    """The entries of a comma-separated string or a sequence, stripped, empty ones dropped."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    return [v for v in items if v]


# ------------------------------------------------------------------------------------------ planning
def cell_params(config: CompareConfig) -> dict[str, dict[str, Any]]:
    """Each model's ``causalrec.run`` settings (without the grid's split/seed/checkpoint_dir)."""
    from causalrec.recbole.preflight import model_names, read_config_files

    known = model_names()
    file_shared, file_models = split_sections(read_config_files(config.config_files), known)
    param_shared, param_models = split_sections(config.params, known)
    for source, sections in (("config files", file_models), ("params", param_models)):
        for model, section in sections.items():
            fixed = sorted({k.partition(".")[0] for k in section} & set(EVAL_KEYS + GRID_KEYS))
            if fixed:
                raise ConfigError(
                    f"{source}: {model}'s section sets {fixed}; every cell of a comparison shares "
                    f"one evaluator and the grid sets split/seed, so set them for all models"
                )
    if file_shared.get("split") is not None and list(config.splits) == [file_shared["split"]]:
        # a tuned best.yaml names the split it was chosen on: agreeing with a one-split grid, it changes nothing
        file_shared = {k: v for k, v in file_shared.items() if k != "split"}
    for source, shared in (("config files", file_shared), ("params", param_shared)):
        fixed = sorted(set(shared) & set(GRID_KEYS))
        if fixed:
            raise ConfigError(
                f"{source} set {fixed}: the grid sets these per cell; use --splits/--seeds "
                f"(and --out for where checkpoints go)"
            )
    out = {}
    for model in config.models:
        params = layer(EVAL_DEFAULTS, file_shared)
        params = layer(params, file_models.get(model, {}))
        params = layer(params, param_shared)
        params = layer(params, param_models.get(model, {}))
        params.setdefault("show_progress", False)  # the grid's bar is the progress
        if params.get("stage_cache_dir") is None:
            params["stage_cache_dir"] = str((config.out / "stages").resolve())
        out[model] = params
    return out


def _config_identity(model: str, dataset: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a cell's result depends on: RecBole's final config without paths/devices, and the data's hash."""
    import causalrec
    from causalrec.recbole.quick_start import make_config
    from causalrec.recbole.settings import without_late_defaults

    final = make_config(model, dataset, config_dict=params).final_config_dict
    # Keys added after cells were cached count only when set away from their default, so old cells stay valid.
    identity = without_late_defaults({k: v for k, v in final.items() if k not in VOLATILE_KEYS})
    if identity.get("num_threads") == "auto":  # torch's own count on a quiet machine: the old default (None)'s key
        identity["num_threads"] = None
    if final.get("validate_stages") == "best":  # all / last only choose which validations run; best picks the model
        identity["validate_stages"] = "best"
    if final.get("prepared_dir"):  # <cache>/<dataset>/<hash16>/<dataset>: the prepared files' input hash
        identity["data_hash"] = Path(final["prepared_dir"]).parent.name
    identity["causalrec_version"] = causalrec.__version__
    return identity


def plan(config: CompareConfig) -> list[Cell]:
    """Every cell, in run order (split, then seed, then model); a bad setting fails here, before any training."""
    from causalrec.recbole.preflight import validate

    per_model = cell_params(config)
    for model, params in per_model.items():
        validate(model, config.dataset, params)
    cells = []
    for split in config.splits:
        for seed in config.seed_list():
            for model in config.models:
                params = {**per_model[model], "split": split, "seed": seed}
                key = digest(
                    {
                        "format": CELL_FORMAT,
                        "model": model,
                        "dataset": config.dataset,
                        "config": _config_identity(model, config.dataset, params),
                    },
                    ascii_only=True,
                )
                cells.append(Cell(model, split, seed, params, key))
    return cells


# ------------------------------------------------------------------------------------------- running
def load_cell(cell: Cell, out: Path) -> dict[str, Any] | None:
    path = cell.path(out)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:  # written atomically, so this is outside damage: re-run
        _log.warning("cell file %s is unreadable (%s); running the cell again", path, err)
        return None
    return record if record.get("key") == cell.key else None


def _cases_json(cases: dict[str, Any] | None) -> dict[str, Any] | None:
    if not cases:
        return None
    return {
        "user": [str(u) for u in cases["user"]],
        "metrics": {m: [round(float(v), 6) for v in values] for m, values in cases["metrics"].items()},
        "environments": {f: [str(x) for x in labels] for f, labels in cases.get("environments", {}).items()},
    }


def _cell_record(cell: Cell, dataset: str) -> dict[str, Any]:
    """What every cell record starts with: the cell's identity and settings."""
    return {
        "format": CELL_FORMAT,
        "key": cell.key,
        "model": cell.model,
        "dataset": dataset,
        "split": cell.split,
        "seed": cell.seed,
        "params": cell.params,
    }


def run_cell(cell: Cell, dataset: str, out: Path, keep_checkpoints: bool = False) -> dict[str, Any]:
    """Train and test one cell through ``causalrec.run``; write and return its record (failures included).

    One process at a time per cell (a lock beside its record): a process that reaches a cell another one is
    training waits, then takes its finished record instead of training it again (two processes on overlapping
    grids of one ``out`` would otherwise share the cell's checkpoint folder, and the first to finish would
    delete it under the other)."""
    with exclusive_lock(cell.path(out).with_suffix(".lock"), f"training the same cell {cell.name}"):
        record = load_cell(cell, out)
        if record is not None and record.get("status") == "ok":
            _log.info("cell %s: finished by another process while this one waited", cell.name)
            return record
        return _train_cell(cell, dataset, out, keep_checkpoints)


def _train_cell(cell: Cell, dataset: str, out: Path, keep_checkpoints: bool) -> dict[str, Any]:
    from causalrec.recbole.evaluation import collect_cases
    from causalrec.recbole.quick_start import run

    checkpoints = out / "checkpoints" / cell.key[:16]
    record = _cell_record(cell, dataset)
    start = time.perf_counter()
    try:
        with collect_cases() as cases:
            result = run(
                cell.model, dataset, config_dict={**cell.params, "checkpoint_dir": str(checkpoints)}, saved=True
            )
    except Exception as err:  # noqa: BLE001 - a failing cell is a result to report, not the end of the grid
        record.update(
            status="failed",
            error=f"{type(err).__name__}: {err}",
            traceback="".join(traceback.format_exception(err)[-6:]),
        )
        _log.warning("cell %s failed: %s", cell.name, record["error"])
    else:
        record.update(status="ok", result=result, cases=_cases_json(cases[-1] if cases else None))
    finally:
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
            with contextlib.suppress(OSError):
                checkpoints.parent.rmdir()  # only when no other cell keeps one
        gc.collect()
        _empty_device_cache()
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_atomic(cell.path(out), json.dumps(record, indent=1, default=str))
    return json.loads(json.dumps(record, default=str))  # the same plain JSON a cache hit returns


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cells(cells: Sequence[Cell], config: CompareConfig) -> tuple[list[dict[str, Any]], int]:
    """Records of every cell (cached or run; under ``report_only`` the cached ones) and how many were run now."""
    from tqdm.auto import tqdm

    found: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    for i, cell in enumerate(cells):
        record = load_cell(cell, config.out)
        if record is not None and (record.get("status") == "ok" or not config.retry_failed or config.report_only):
            _log.debug("cell %s: cached (%s)", cell.name, record.get("status"))
            found[i] = record
        elif not config.report_only:
            pending.append(i)
    bar = tqdm(total=len(cells), desc="compare", unit="cell", disable=not config.show_progress)
    bar.update(len(found) + (len(cells) - len(found) if config.report_only else 0))

    def done(i: int, record: dict[str, Any]) -> None:
        found[i] = record
        _log.info("cell %s: %s in %.1fs", cells[i].name, record["status"], record["seconds"])
        bar.set_postfix_str(f"{cells[i].name}: {record['status']} {record['seconds']:.1f}s")
        bar.update(1)

    if config.jobs > 1 and len(pending) > 1:
        _run_parallel(cells, pending, config, done)
    else:
        for i in pending:
            done(i, run_cell(cells[i], config.dataset, config.out, config.keep_checkpoints))
    bar.close()
    return [found[i] for i in range(len(cells)) if i in found], len(pending)


def _worker_init(threads: int) -> None:
    """A ``compare --jobs`` worker: its share of the cores, before torch starts its thread pool."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _run_parallel(cells: Sequence[Cell], pending: Sequence[int], config: CompareConfig, done) -> None:
    """Train ``pending`` cells in ``config.jobs`` spawned processes; ``done(i, record)`` as each finishes. A worker
    that dies (killed, out of memory) breaks the pool: its cell and the cells not yet finished are reported failed
    for this run only (nothing is cached for them), so the same command trains them again."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from causalrec.recbole.threads import allowed_cores

    jobs = min(config.jobs, len(pending))
    threads = max(1, len(allowed_cores()) // jobs)
    _log.info("compare: %d cells in %d processes, %d torch thread(s) each", len(pending), jobs, threads)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch or CUDA state
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {
            pool.submit(run_cell, cells[i], config.dataset, config.out, config.keep_checkpoints): i for i in pending
        }
        for future in as_completed(futures):
            i = futures[future]
            try:
                record = future.result()
            except Exception as err:  # noqa: BLE001 - the worker itself died; run_cell reports its own errors
                record = {
                    **_cell_record(cells[i], config.dataset),
                    "status": "failed",
                    "error": f"worker process failed: {type(err).__name__}: {err}",
                    "seconds": 0.0,
                }
                _log.warning("cell %s: %s", cells[i].name, record["error"])
            done(i, record)


# ------------------------------------------------------------------------------------------- results
def results_frame(records: Sequence[Mapping[str, Any]], min_env_cases: int = 1):
    """One row per (model, split, seed, environment, metric) of the finished cells; ``environment`` is
    ``all`` or ``<field>=<label>`` (``<field>=<worst>``: that field's worst environment among the groups with at
    least ``min_env_cases`` test cases; no row when none has that many)."""
    import pandas as pd

    from causalrec.recbole.evaluation import worst_environment

    rows = []
    for rec in records:
        if rec.get("status") != "ok":
            continue
        result = rec["result"]
        base = (rec["model"], rec["split"], int(rec["seed"]))
        for metric, value in result["test_result"].items():
            rows.append((*base, "all", metric, float(value)))
        per_env = result.get("test_env_result") or {}
        for env_field, by_label in per_env.items():
            for label, metrics in by_label.items():
                for metric, value in metrics.items():
                    if metric != "cases" and label != "<worst>":
                        rows.append((*base, f"{env_field}={label}", metric, float(value)))
            for metric in result["test_result"]:
                worst = worst_environment(per_env, metric, [env_field], min_env_cases)
                if worst is not None:
                    rows.append((*base, f"{env_field}=<worst>", metric, worst[0]))
    return pd.DataFrame(rows, columns=["model", "split", "seed", "environment", "metric", "value"])


def failures_frame(records: Sequence[Mapping[str, Any]]):
    import pandas as pd

    rows = [(r["model"], r["split"], int(r["seed"]), r.get("error", "")) for r in records if r.get("status") != "ok"]
    return pd.DataFrame(rows, columns=["model", "split", "seed", "error"])


def compare(
    models: str | Sequence[str] | None = None,
    dataset: str | None = None,
    *,
    splits: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    out: str | Path = "compare-results",
    config_files: Sequence[str | Path] = (),
    params: Mapping[str, Any] | None = None,
    baseline: str | None = None,
    report_metrics: Sequence[str] | None = None,
    min_env_cases: int | None = None,
    retry_failed: bool = True,
    report_only: bool = False,
    keep_checkpoints: bool = False,
    plots: bool = True,
    show_progress: bool = True,
    publish: str | Path | None = None,
    sources: Sequence[str | Path] = (),
    jobs: int = 1,
    publish_cases: bool = False,
):
    """Run (or load from ``out``) every model x split x seed cell and write the comparison's outputs.

    Defaults: ``models`` ``DEFAULT_MODELS``, ``dataset`` retail-sim, ``splits`` ``DEFAULT_SPLITS``, ``seeds`` 3,
    ``report_metrics`` ndcg@10 and recall@10, ``min_env_cases`` 20.

    ``jobs``: cells trained at once, each in its own process (``CompareConfig.jobs``).

    ``publish``: a folder (e.g. ``docs/results/<name>``) that gets every recorded cell without its per-user
    values, a grid file and a report of its own (``publish_cells``); ``publish_cases`` also publishes each cell's
    per-case values beside it (simulated datasets only). ``sources`` (needs ``report_only``):
    folders whose ``cells/`` are pooled into the report under ``out`` (``report_cells``); ``report_only`` on a
    published ``out`` reads its cells the same way. There, the grid, ``baseline``, report metrics and
    ``min_env_cases`` left at None come from the folders' ``compare.json`` and cells, and the others select.

    Returns the long results table (``results.csv``): columns model, split, seed, environment, metric, value.
    ``frame.attrs`` carries ``failures`` (a DataFrame of failed cells with their errors), ``significance``
    (a DataFrame, empty without a baseline), ``trained`` (cells run now, not loaded), ``not_run`` ((model,
    split, seed) of the cells ``report_only`` found no record of), ``files`` (paths) and, with ``publish``,
    ``published`` (the published report's files).

    Example::

        frame = causalrec.compare(["Pop", "SASRec"], "retail-sim", splits="iid,seasonal", seeds=3,
                                  params={"epochs": 50, "SASRec.hidden_size": 64}, out="runs/cmp")
    """
    if sources and not report_only:
        raise ConfigError("sources (--from) are read by a report-only comparison; add --report-only")
    from causalrec.experiments.publish import is_published, report_cells

    if sources or (report_only and is_published(out)):
        if config_files or params:
            _log.info(
                "compare --report-only over stored cells: --config-files/--param are not used (the cells "
                "keep the settings they ran with)"
            )
        return report_cells(
            sources or [out],
            out,
            models=models,
            dataset=dataset,
            splits=splits,
            seeds=seeds,
            baseline=baseline,
            report_metrics=report_metrics,
            min_env_cases=min_env_cases,
            plots=plots,
            publish=publish,
            publish_cases=publish_cases,
        )
    config = CompareConfig(
        models=DEFAULT_MODELS if models is None else models,
        dataset=dataset or "retail-sim",
        splits=DEFAULT_SPLITS if splits is None else splits,
        seeds=DEFAULT_SEEDS if seeds is None else seeds,
        out=out,
        config_files=config_files,
        params=dict(params or {}),
        baseline=baseline,
        report_metrics=DEFAULT_REPORT_METRICS if report_metrics is None else report_metrics,
        min_env_cases=DEFAULT_MIN_ENV_CASES if min_env_cases is None else min_env_cases,
        retry_failed=retry_failed,
        report_only=report_only,
        keep_checkpoints=keep_checkpoints,
        plots=plots,
        show_progress=show_progress,
        jobs=jobs,
    )
    return run_comparison(config, publish=publish, publish_cases=publish_cases)


def run_comparison(config: CompareConfig, publish: str | Path | None = None, publish_cases: bool = False):
    """``compare`` for a ``CompareConfig``: plan, run or load the cells of ``config.out``, write the report and,
    with ``publish``, publish the cells (``publish_cells``; with ``publish_cases``, their per-case values)."""
    from causalrec.experiments.publish import check_run_targets, publish_cells

    check_run_targets(config, publish, publish_cases)  # before any training
    config.out.mkdir(parents=True, exist_ok=True)
    cells = plan(config)
    _log.info(
        "compare: %d cells (%d models x %d splits x %d seeds) in %s",
        len(cells),
        len(config.models),
        len(config.splits),
        len(config.seed_list()),
        config.out,
    )
    records, trained = run_cells(cells, config)
    done = {(r["model"], r["split"], r["seed"]) for r in records}
    not_run = [(c.model, c.split, c.seed) for c in cells if (c.model, c.split, c.seed) not in done]
    if not_run:
        _log.warning(
            "compare --report-only: %d of %d cells have no record under %s (not run)",
            len(not_run),
            len(cells),
            config.out,
        )
        from causalrec.recbole.classical_trainer import run_progress

        for cell in cells:  # a run stopped between epochs (resume: true) says where it stands
            if (cell.model, cell.split, cell.seed) in not_run and (
                progress := run_progress(config.out / "checkpoints" / cell.key[:16])
            ):
                _log.warning("  %s: %s", cell.name, progress)
    results = write_report(records, config, not_run=not_run, trained=trained, cases_file=True)
    if publish is not None:
        published = publish_cells(records, publish, config, cases=publish_cases)
        results.attrs["published"] = published.attrs["files"]
    return results


def write_report(
    records: Sequence[Mapping[str, Any]],
    config: CompareConfig,
    *,
    not_run: Sequence[tuple[str, str, int]] = (),
    trained: int = 0,
    cases_file: bool = True,
):
    """Write ``results.csv``, ``failures.csv``, ``significance.csv``, ``report.md``, the plots and (with
    ``cases_file``) ``cases.csv.gz`` of ``records`` under ``config.out``; return the results table (attrs as
    ``compare``'s)."""
    from causalrec.experiments import report

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    results, failures = results_frame(records, config.min_env_cases), failures_frame(records)
    files = {"results": out / "results.csv", "failures": out / "failures.csv"}
    write_atomic(files["results"], results.to_csv(index=False))
    write_atomic(files["failures"], failures.to_csv(index=False))
    significance = (
        report.significance(results, records, config.baseline, config.report_metrics)
        if config.baseline
        else report.empty_significance()
    )
    write_atomic(out / "significance.csv", significance.to_csv(index=False))
    files["significance"] = out / "significance.csv"
    if cases_file:
        files["cases"] = out / "cases.csv.gz"
        cases = report.case_frame(records, config.report_metrics).to_csv(index=False)
        write_atomic(files["cases"], gzip.compress(cases.encode("utf-8"), mtime=0))
    protocol = next((r["result"].get("protocol") for r in records if r.get("status") == "ok"), None)
    text = report.markdown(
        results,
        failures,
        significance,
        config,
        protocol=protocol,
        not_run=not_run,
        significance_notes=_case_notes(records),
        choices=report.validation_choices(records),
        capped=[
            (r["model"], r["split"], r["seed"], r["result"]["epoch_cap"])
            for r in records
            if r.get("status") == "ok" and r["result"].get("epoch_cap")
        ],
    )
    files["report"] = out / "report.md"
    write_atomic(files["report"], text)
    if config.plots:
        files["plots"] = report.plots(
            results,
            config.report_metrics,
            out / "plots",
            cases=report.environment_cases(records),
            min_cases=config.min_env_cases,
            baseline=config.baseline,
        )
    _log.info(
        "compare: %d cells run now, %d loaded, %d failed; report %s",
        trained,
        len(records) - trained,
        len(failures),
        files["report"],
    )
    results.attrs.update(
        failures=failures,
        significance=significance,
        trained=trained,
        not_run=list(not_run),
        files={k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in files.items()},
    )
    return results


def _case_notes(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The significance section's note on finished cells without per-case values (no bootstrap, no Wilcoxon)."""
    ok = [r for r in records if r.get("status") == "ok"]
    published = sum(1 for r in ok if not r.get("cases") and r.get("published"))
    lost = sum(1 for r in ok if not r.get("cases") and not r.get("published"))
    notes = []
    if published:
        notes.append(
            f"bootstrap: per-case values not published ({published} of {len(ok)} finished cells are "
            "published summaries without per-user values): the bootstrap interval of the relative change "
            "and the pooled Wilcoxon test are left empty where they would need them; the seed-level "
            "t-test, its interval, Holm p and d_z use the cells' test metrics and are complete."
        )
    if lost:
        notes.append(
            f"bootstrap: per-case values not kept by {lost} of {len(ok)} finished cells (run before "
            "causalrec kept them): the bootstrap interval and the pooled Wilcoxon test are left empty "
            "where they would need them."
        )
    return notes


__all__ = [
    "CompareConfig",
    "Cell",
    "compare",
    "run_comparison",
    "plan",
    "run_cell",
    "results_frame",
    "write_report",
    "DEFAULT_MODELS",
    "DEFAULT_SPLITS",
    "EVAL_DEFAULTS",
]
