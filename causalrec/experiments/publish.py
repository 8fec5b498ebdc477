"""Published comparison folders, and reports from stored cells (``causalrec compare --publish / --report-only``).

A run's ``--out`` holds cells with per-user values; ``publish_cells`` copies them into a folder meant to be
committed (``PUB/cells/``) without those values (``published_cell``: metrics overall and per environment, stage
timings, params without paths; no ``cases``) and writes ``PUB/compare.json`` (the grid) and a report from those
cells alone (no ``cases.csv.gz``), so it holds no user ids. With ``cases`` (``--publish-cases``, simulated data sets
only: ``SIMULATED_SOURCES``) each finished cell's per-case test values go beside it (``cells/<cell>.cases.csv.gz``,
read back by ``read_cell``), so the bootstrap and the pooled test can be recomputed from the published folder.
``report_cells`` (``--report-only --from DIR ...``, or ``--report-only`` on a published ``--out``) pools stored
cells, one per model, split and seed, into a report: no planning, data preparation or training.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from causalrec.errors import ConfigError
from causalrec.experiments.compare import (
    CELL_FORMAT,
    DEFAULT_MIN_ENV_CASES,
    DEFAULT_MODELS,
    DEFAULT_REPORT_METRICS,
    DEFAULT_SPLITS,
    VOLATILE_KEYS,
    CompareConfig,
    write_report,
)
from causalrec.io import write_atomic

_log = logging.getLogger(__name__)

# A published cell: what a report needs, without per-user values (``published_cell``).
PUBLISHED_FORMAT = 1
MANIFEST = "compare.json"  # a published folder's grid and report settings
PUBLISHED_RESULT_KEYS = (
    "model",
    "dataset",
    "best_valid_score",
    "valid_score_bigger",
    "best_valid_result",
    "test_result",
    "test_env_result",
    "protocol",
    "stages",
    "epochs",
    "repeat_mix",  # repeat_mix: auto's choice
)
PUBLISHED_STAGE_DROP = frozenset({"directory"})  # a path on the machine that ran it
CASES_SUFFIX = ".cases.csv.gz"  # a published cell's per-case values, beside it (``--publish-cases``)


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """A published folder's ``compare.json`` (its grid and report settings); None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); restore it from git or delete it") from None
    return data if isinstance(data, dict) and data.get("published") else None


def is_published(folder: str | Path) -> bool:
    """Whether ``folder`` is a published folder (``publish_cells`` wrote its ``compare.json``)."""
    return read_manifest(folder) is not None


def _cell_files(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, record)`` of every readable cell under ``folder/cells`` (name order)."""
    return [(path, rec) for path in sorted((folder / "cells").glob("*.json")) if (rec := read_cell(path))]


def check_run_targets(config: CompareConfig, publish: str | Path | None, cases: bool) -> None:
    """Before a run trains into ``config.out``: it is no published folder (unless the run only reports),
    ``publish`` is neither it nor a run's cache, and ``cases`` may be published for ``config.dataset``."""
    if is_published(config.out) and not config.report_only:
        raise ConfigError(
            f"--out {config.out} is a published folder (it has {MANIFEST}): its cells hold no "
            "per-user values and it is meant to be committed; run into a folder of its own (e.g. "
            f"runs/...) and add --publish {config.out}"
        )
    if publish is not None:
        if _same_folder(publish, config.out):
            raise ConfigError(
                f"--publish {publish} is the --out folder: the published cells would replace the "
                "cached ones; publish into a folder of its own (e.g. docs/results/<name>)"
            )
        _check_publish_target(Path(publish))
    _check_cases_publishable(publish, cases, config.dataset)


def _check_publish_target(folder: Path) -> None:
    """A publish target may hold published cells only: publishing over a run's cache would drop its cases."""
    raw = [p.name for p, rec in _cell_files(folder) if not rec.get("published")]
    if raw:
        raise ConfigError(
            f"--publish {folder}: {folder / 'cells'} holds cells with per-user values ({raw[0]}, "
            f"{len(raw)} in all), i.e. a run's cache; publish into a folder of its own"
        )


def _check_cases_publishable(publish: str | Path | None, cases: bool, dataset: str) -> None:
    """``--publish-cases`` needs ``--publish`` and a simulated data set (its user ids identify no one)."""
    from causalrec.data import SIMULATED_SOURCES

    if not cases:
        return
    if publish is None:
        raise ConfigError("--publish-cases publishes per-case values beside published cells; add --publish DIR")
    if dataset not in SIMULATED_SOURCES:
        raise ConfigError(
            f"--publish-cases: {dataset}'s per-case values are keyed by the ids of real users and stay out of "
            f"published folders; only simulated datasets ({', '.join(sorted(SIMULATED_SOURCES))}) publish them"
        )


def cases_path(cell_path: Path) -> Path:
    """Where a published cell's per-case values lie: beside it, ``<cell>.cases.csv.gz``."""
    return cell_path.with_name(cell_path.stem + CASES_SUFFIX)


def _cases_csv(cases: Mapping[str, Any], metrics: Sequence[str]) -> bytes:
    """A cell's per-case values of ``metrics`` as gzipped CSV: ``user``, one column per metric, one
    ``env:<field>`` column per environment field; the same values give the same bytes."""
    import pandas as pd

    columns: dict[str, list] = {"user": list(cases["user"])}
    columns.update({m: cases["metrics"][m] for m in metrics if m in cases["metrics"]})
    columns.update({f"env:{f}": labels for f, labels in (cases.get("environments") or {}).items()})
    return gzip.compress(pd.DataFrame(columns).to_csv(index=False).encode("utf-8"), mtime=0)


def _read_cases(path: Path) -> dict[str, Any] | None:
    """``_cases_csv``'s file back as a record's ``cases``; None (logged) when it cannot be read."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        return {
            "user": frame["user"].tolist(),
            "metrics": {
                c: frame[c].astype(float).tolist() for c in frame.columns if c != "user" and not c.startswith("env:")
            },
            "environments": {c[4:]: frame[c].tolist() for c in frame.columns if c.startswith("env:")},
        }
    except (OSError, EOFError, ValueError, KeyError) as err:  # gzip.BadGzipFile is an OSError
        _log.warning("per-case file %s is unreadable (%s); its cell is reported without it", path, err)
        return None


def read_cell(path: str | Path) -> dict[str, Any] | None:
    """The cell record in ``path`` (None, logged, when it is unreadable or not a compare cell). A published cell
    with a per-case file beside it (``--publish-cases``) gets its ``cases`` back from that file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        _log.warning("cell file %s is unreadable (%s); left out", path, err)
        return None
    if not isinstance(record, dict) or not all(k in record for k in ("key", "model", "split", "seed")):
        _log.warning("%s is not a compare cell (no key/model/split/seed); left out", path)
        return None
    if record.get("published") and "cases" not in record and cases_path(path).is_file():
        cases = _read_cases(cases_path(path))
        if cases is not None:
            record["cases"] = cases
    return record


def cell_file_name(record: Mapping[str, Any]) -> str:
    """``<model>-<split>-seed<seed>-<key16>.json``, the name ``Cell.path`` gives the cell."""
    return f"{record['model']}-{record['split']}-seed{int(record['seed'])}-{str(record['key'])[:16]}.json"


def published_cell(record: Mapping[str, Any]) -> dict[str, Any]:
    """A cell record without per-user values, for a folder that is committed: its key, model, dataset, split,
    seed, params (without the paths and devices of ``VOLATILE_KEYS``), status, result (test and validation
    metrics, per-environment metrics with their case counts, protocol, stages without their directories,
    epochs), the number of test cases, the error of a failed cell, seconds and finish time. ``cases`` (values
    per user id) and anything not listed are left out; the seed-level statistics need only the overall test
    metrics."""
    out: dict[str, Any] = {"format": record.get("format", CELL_FORMAT), "published": PUBLISHED_FORMAT}
    for k in ("key", "model", "dataset", "split", "seed"):
        out[k] = record.get(k)
    out["params"] = {k: v for k, v in (record.get("params") or {}).items() if k not in VOLATILE_KEYS}
    out["status"] = record.get("status")
    if record.get("status") == "ok":
        result = record.get("result") or {}
        dropped = sorted(set(result) - set(PUBLISHED_RESULT_KEYS))
        if dropped:
            _log.debug("publish %s: result keys %s left out", cell_file_name(record), dropped)
        out["result"] = {k: result[k] for k in PUBLISHED_RESULT_KEYS if k in result}
        if out["result"].get("stages"):
            out["result"]["stages"] = [
                {k: v for k, v in stage.items() if k not in PUBLISHED_STAGE_DROP}
                if isinstance(stage, Mapping)
                else stage
                for stage in out["result"]["stages"]
            ]
        cases = record.get("cases")
        if cases and cases.get("user") is not None:
            out["n_cases"] = len(cases["user"])
        elif "n_cases" in record:
            out["n_cases"] = record["n_cases"]
    else:
        out["error"] = record.get("error", "")
    for k in ("seconds", "finished"):
        if k in record:
            out[k] = record[k]
    return json.loads(json.dumps(out, default=str))


def _strings(value: Any):
    """Every string in a JSON value, mapping keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _user_ids(records: Sequence[Mapping[str, Any]]) -> set[str]:
    users: set[str] = set()
    for rec in records:
        cases = rec.get("cases")
        if cases and cases.get("user") is not None:
            users.update(str(u) for u in cases["user"])
    return users


def publish_cells(records: Sequence[Mapping[str, Any]], folder: str | Path, config: CompareConfig, cases: bool = False):
    """Write ``published_cell`` of every record to ``folder/cells/`` (atomically; a published cell of the same
    model, split and seed with other settings is replaced, a finished one is not replaced by a failed copy of
    itself); with ``cases`` (simulated datasets only) each finished cell's per-case values of the report metrics
    beside it (``cases_path``; without, a per-case file left from an earlier publication of it is removed), merge
    the grid and ``config``'s report settings into
    ``folder/compare.json``, and write the report of every cell in ``folder`` there (``report_cells``: results,
    failures, significance, report.md, plots; never ``cases.csv.gz``). Returns that report's results table."""
    folder = Path(folder)
    _check_publish_target(folder)
    _check_cases_publishable(folder, cases, config.dataset)
    users = _user_ids(records)
    existing: dict[tuple[str, str, int], list[tuple[Path, str, dict]]] = {}
    finished: dict[tuple[str, str, int], tuple[str, str]] = {}
    for path, rec in _cell_files(folder):
        ident = (rec["model"], rec["split"], int(rec["seed"]))
        existing.setdefault(ident, []).append((path, rec["key"], rec.get("params") or {}))
        if rec.get("status") == "ok":
            finished[ident] = (rec["key"], path.name)
    manifest = read_manifest(folder) or {}
    if manifest.get("dataset") not in (None, config.dataset):
        raise ConfigError(
            f"--publish {folder} holds {manifest['dataset']} cells; publish {config.dataset} cells into another folder"
        )
    for rec in records:
        ident = (rec["model"], rec["split"], int(rec["seed"]))
        if rec.get("status") != "ok" and finished.get(ident, ("",))[0] == rec["key"]:
            _log.warning("publish: %s failed here; %s keeps its finished copy", cell_file_name(rec), folder)
            continue
        cell = published_cell(rec)
        leaked = sorted({s for s in _strings(cell) if s in users})
        if leaked:  # a guard on published_cell: never reached unless a new result field carries user ids
            raise RuntimeError(f"published cell {cell_file_name(rec)} would hold {len(leaked)} user ids; not written")
        for path, key, params in existing.get(ident, []):
            if key != rec["key"] and path.exists():
                why = (
                    "the same params: a key or default of causalrec's full config differs from the version that "
                    "published it"
                    if params == cell["params"]
                    else "the same cell with other settings"
                )
                _log.warning("publish: %s replaces %s (%s)", cell_file_name(rec), path.name, why)
                path.unlink()
                cases_path(path).unlink(missing_ok=True)
        target = folder / "cells" / cell_file_name(rec)
        write_atomic(target, json.dumps(cell, indent=1))
        if cases and rec.get("status") == "ok" and rec.get("cases"):
            write_atomic(cases_path(target), _cases_csv(rec["cases"], config.report_metrics))
        else:
            cases_path(target).unlink(missing_ok=True)
    seeds = sorted(set(manifest.get("seeds", [])) | set(config.seed_list()))
    manifest = {
        "published": PUBLISHED_FORMAT,
        "dataset": config.dataset,
        "models": list(dict.fromkeys([*manifest.get("models", []), *config.models])),
        "splits": list(dict.fromkeys([*manifest.get("splits", []), *config.splits])),
        "seeds": seeds,
        "baseline": config.baseline,
        "report_metrics": list(config.report_metrics),
        "min_env_cases": config.min_env_cases,
        "about": "written by causalrec compare --publish: cells/ holds one JSON per model, split and seed with "
        "test metrics overall and per environment, without per-user values (a simulated dataset's cells may "
        "have their per-case values beside them, <cell>.cases.csv.gz, from --publish-cases); rebuild the report "
        "with causalrec compare --report-only --out <this folder>",
    }
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _log.info("compare --publish: %d cells written to %s", len(records), folder / "cells")
    return report_cells([folder], folder, plots=config.plots)


def _pooled(sources: Sequence[Path]) -> list[dict[str, Any]]:
    """The cells of ``sources``, one per (model, split, seed): a finished cell over a failed one, then the
    earlier source, then the later ``finished`` time. Every record left out is logged (a copy of the same cell
    key at info level, a cell with other settings as a warning)."""
    chosen: dict[tuple[str, str, int], tuple[tuple, dict[str, Any], Path]] = {}
    for index, folder in enumerate(sources):
        if not (folder / "cells").is_dir():
            raise ConfigError(f"{folder} holds no cells/ folder (neither a compare --out nor a --publish folder)")
        for path, rec in _cell_files(folder):
            ident = (rec["model"], rec["split"], int(rec["seed"]))
            rank = (rec.get("status") == "ok", -index, str(rec.get("finished", "")))
            if ident not in chosen:
                chosen[ident] = (rank, rec, path)
                continue
            old_rank, old, old_path = chosen[ident]
            best, other = sorted([(old_rank, old, old_path), (rank, rec, path)], key=lambda t: t[0], reverse=True)
            chosen[ident], kept, left = best, best[2], other[2]
            if rec["key"] == old["key"]:
                _log.info("%s/%s/seed %s: %s is a copy of %s; ignored", *ident, left, kept)
            else:
                _log.warning(
                    "%s/%s/seed %s: %s and %s hold it with other settings; reporting %s, ignoring %s",
                    *ident,
                    old_path,
                    path,
                    kept,
                    left,
                )
    return [rec for _, rec, _ in chosen.values()]


def _ordered(names, manifest_lists: Sequence[Sequence[str]], defaults: Sequence[str]) -> list[str]:
    """The manifests' order first, then ``defaults``' order, then by name."""
    first = list(dict.fromkeys(x for lst in manifest_lists for x in lst))
    rest = sorted(set(names) - set(first), key=lambda n: (defaults.index(n) if n in defaults else len(defaults), n))
    return first + rest


def report_cells(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    models: str | Sequence[str] | None = None,
    dataset: str | None = None,
    splits: str | Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    baseline: str | None = None,
    report_metrics: Sequence[str] | None = None,
    min_env_cases: int | None = None,
    plots: bool = True,
    publish: str | Path | None = None,
    publish_cases: bool = False,
):
    """The report of the cells stored under ``sources`` (``compare --out`` folders or published folders),
    written to ``out``; nothing is planned, prepared or trained, and cells are taken by their stored fields.

    Cells are pooled (``_pooled``: one per model, split and seed). The grid is ``models`` x ``splits`` x
    ``seeds`` when given (other cells are left out), else the union of the sources' ``compare.json`` grids and
    their cells; cells of the grid without a record are "not run". ``baseline``, ``report_metrics``,
    ``min_env_cases``: given, else the first source's ``compare.json``, else the defaults. ``cases.csv.gz`` is
    written only when some cell has per-case values and ``out`` is not a published folder. ``publish``: also
    publish the pooled cells there (``publish_cells``; with ``publish_cases``, their per-case values too). Returns
    the results table (attrs as ``compare``'s).
    """
    sources = [Path(s) for s in sources]
    out = Path(out)
    if publish is not None:
        _check_publish_target(Path(publish))
    records = _pooled(sources)
    manifests = [m for m in (read_manifest(s) for s in sources) if m]
    if not records and not manifests:
        raise ConfigError(f"no cells under {', '.join(str(s / 'cells') for s in sources)}: nothing to report")
    datasets = list(dict.fromkeys(str(r.get("dataset")) for r in records))
    if dataset is None:
        if len(datasets) > 1:
            raise ConfigError(
                f"the cells of {', '.join(map(str, sources))} are of {len(datasets)} datasets "
                f"({', '.join(datasets)}); choose one with --dataset"
            )
        dataset = datasets[0] if datasets else next((m["dataset"] for m in manifests if m.get("dataset")), "retail-sim")
    _check_cases_publishable(publish, publish_cases, dataset)
    kept = [r for r in records if str(r.get("dataset")) == dataset]
    if len(kept) < len(records):
        _log.info("compare --report-only: %d cells of other datasets left out", len(records) - len(kept))
    if models is None:
        models = _ordered({r["model"] for r in kept}, [m.get("models", []) for m in manifests], DEFAULT_MODELS)
    if splits is None:
        splits = _ordered({r["split"] for r in kept}, [m.get("splits", []) for m in manifests], DEFAULT_SPLITS)
    if seeds is None:
        seeds = sorted({int(r["seed"]) for r in kept} | {int(s) for m in manifests for s in m.get("seeds", [])})
    first = manifests[0] if manifests else {}
    if baseline is None and first.get("baseline"):
        baseline = first["baseline"]
        if baseline not in (models.split(",") if isinstance(models, str) else models):
            _log.warning(
                "compare --report-only: baseline %s (from %s) is not among the reported models; no "
                "significance section",
                baseline,
                MANIFEST,
            )
            baseline = None
    config = CompareConfig(
        models=models,
        dataset=dataset,
        splits=splits,
        seeds=seeds,
        out=out,
        baseline=baseline,
        report_metrics=report_metrics or first.get("report_metrics") or DEFAULT_REPORT_METRICS,
        min_env_cases=min_env_cases or first.get("min_env_cases") or DEFAULT_MIN_ENV_CASES,
        report_only=True,
        plots=plots,
        show_progress=False,
    )
    grid = {(m, s, seed) for m in config.models for s in config.splits for seed in config.seed_list()}
    chosen = [r for r in kept if (r["model"], r["split"], int(r["seed"])) in grid]
    if not chosen:  # an empty report would look like a result; say what the sources do hold
        held = "; ".join(
            f"{what} {', '.join(map(str, dict.fromkeys(sorted(r[what[:-1]] for r in kept))))}"
            for what in ("models", "splits", "seeds")
        )
        raise ConfigError(
            f"none of the {len(grid)} cells asked for ({', '.join(config.models)} x {', '.join(config.splits)} x "
            f"seeds {', '.join(map(str, config.seed_list()))}) is recorded under {', '.join(map(str, sources))}, "
            + (f"whose {dataset} cells are of {held}" if kept else f"which hold no {dataset} cell")
        )
    if len(chosen) < len(kept):
        _log.info(
            "compare --report-only: %d cells outside the grid (models x splits x seeds) left out",
            len(kept) - len(chosen),
        )
    order = {
        (m, s, seed): i
        for i, (s, seed, m) in enumerate(
            (s, seed, m) for s in config.splits for seed in config.seed_list() for m in config.models
        )
    }
    chosen.sort(key=lambda r: order[(r["model"], r["split"], int(r["seed"]))])  # plan's order
    done = {(r["model"], r["split"], int(r["seed"])) for r in chosen}
    not_run = [ident for ident in sorted(grid, key=order.__getitem__) if ident not in done]
    if not_run:
        _log.warning(
            "compare --report-only: %d of %d cells have no record under %s (not run)",
            len(not_run),
            len(grid),
            ", ".join(map(str, sources)),
        )
    _log.info("compare --report-only: %d cells from %s", len(chosen), ", ".join(map(str, sources)))
    if publish is not None and _same_folder(publish, out):  # one report, from the published cells
        return publish_cells(chosen, publish, config, cases=publish_cases)
    cases_file = any(r.get("cases") for r in chosen) and not is_published(out)
    results = write_report(chosen, config, not_run=not_run, cases_file=cases_file)
    if publish is not None:
        results.attrs["published"] = publish_cells(chosen, publish, config, cases=publish_cases).attrs["files"]
    return results


__all__ = [
    "MANIFEST",
    "check_run_targets",
    "cases_path",
    "cell_file_name",
    "is_published",
    "publish_cells",
    "published_cell",
    "read_cell",
    "read_manifest",
    "report_cells",
]
