"""``prepare``: write a split as RecBole benchmark files, atomically, cached by a hash of its inputs.

Layout (docs/contracts.md): ``<data_cache_dir>/<dataset>/<hash16>/<dataset>/<dataset>.<suffix>`` with
``data_path = <data_cache_dir>/<dataset>/<hash16>``. The hash covers the spec fields that shape the
output, the identity of every input file (path, size and SHA-256 of its content) and ``FORMAT_VERSION``.

Atomicity: files are written into a temporary sibling directory that is renamed into place only when
complete, so the final location holds a whole dataset or nothing. A lock file serialises concurrent
prepares of the same spec (the second waits, then reuses); where locking is unavailable, a rename that
loses the race discards its copy and reuses the winner's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from causalrec.data.frame import describe, warn_if_texts_tie
from causalrec.data.shifts import Split, split_frame
from causalrec.data.sources import input_files, load_frame
from causalrec.data.sources.tables import check_file, permission_error
from causalrec.data.spec import DataSpec
from causalrec.io import exclusive_lock

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump whenever the files written for the same inputs change
INTER_COLUMNS = ("user_id:token", "item_id:token", "timestamp:float", "season:token", "region:token")
SEQ_COLUMNS = (
    "user_id:token",
    "item_id_list:token_seq",
    "item_id:token",
    "timestamp:float",
    "season:token",
    "region:token",
)
# with ``history_environments``: each history item's own labels, aligned with ``item_id_list``
HISTORY_ENVIRONMENT_COLUMNS = ("season_list:token_seq", "region_list:token_seq")
FILE_SUFFIXES = (
    "train.inter",
    "valid.inter",
    "test.inter",
    "seq_train.inter",
    "seq_valid.inter",
    "seq_test.inter",
    "item",
    "items.tsv",
    "meta.json",
)
_HASH_CHUNK = 1 << 20


@dataclass
class PreparedDataset:
    """A prepared dataset on disk.

    Attributes:
        data_path: RecBole's ``data_path`` (the files are in ``<data_path>/<dataset>/``).
        dataset: the RecBole dataset name.
        directory: ``<data_path>/<dataset>``.
        meta: the content of ``<dataset>.meta.json`` (spec, input hash, statistics, shift evidence, ...).
        n_items: items in the catalog (RecBole adds padding id 0, so its ``item_num`` is ``n_items + 1``).
        files: path of each file by suffix (``train.inter``, ..., ``items.tsv``, ``meta.json``).
        reused: True when an existing copy was reused.
    """

    data_path: str
    dataset: str
    directory: Path
    meta: dict[str, Any]
    n_items: int
    files: dict[str, Path] = field(default_factory=dict)
    reused: bool = False

    def file(self, suffix: str) -> Path:
        return self.files[suffix]

    @property
    def items_file(self) -> Path:
        return self.files["items.tsv"]

    @property
    def meta_file(self) -> Path:
        return self.files["meta.json"]


def file_identity(path: Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if path.is_dir():
        check_file(path, what="input")  # raises: a directory is not a table
    if not path.is_file():
        return {"path": str(path.resolve()), "missing": True}
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    except PermissionError as err:
        raise permission_error(path, "input", err) from None
    return {"name": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def input_hash(spec: DataSpec) -> tuple[str, dict[str, Any]]:
    """(hex digest, the inputs it covers): spec fields, input file contents, format version."""
    inputs = {
        "format_version": FORMAT_VERSION,
        "spec": spec.key_fields(),
        "files": [file_identity(p) for p in input_files(spec)],
    }
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), inputs


def file_names(dataset: str) -> dict[str, str]:
    return {suffix: f"{dataset}.{suffix}" for suffix in FILE_SUFFIXES}


def _complete(directory: Path, dataset: str, key: str) -> bool:
    names = file_names(dataset)
    if not all((directory / n).is_file() for n in names.values()):
        return False
    try:
        return json.loads((directory / names["meta.json"]).read_text()).get("input_hash") == key
    except (OSError, ValueError):
        return False


def _open(data_path: Path, dataset: str, reused: bool) -> PreparedDataset:
    directory = data_path / dataset
    files = {suffix: directory / name for suffix, name in file_names(dataset).items()}
    meta = json.loads(files["meta.json"].read_text())
    return PreparedDataset(str(data_path), dataset, directory, meta, int(meta["stats"]["items"]), files, reused)


def prepare(spec: DataSpec, *, force: bool = False, show_progress: bool = True) -> PreparedDataset:
    """Load, clean and split ``spec``'s data and write the RecBole files (reused when inputs are unchanged)."""
    key, inputs = input_hash(spec)
    root = spec.cache_dir() / spec.dataset
    data_path = root / key[:16]
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / f".{key[:16]}.lock", "preparing the same data"):
        if not force and _complete(data_path / spec.dataset, spec.dataset, key):
            _log.info("reusing prepared data at %s", data_path / spec.dataset)
            return _open(data_path, spec.dataset, reused=True)
        for pattern in (f".tmp-{key[:16]}-*", f".old-{key[:16]}-*"):  # left by a killed run; we hold the lock
            for stale in root.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
        try:
            started = time.perf_counter()
            frame = load_frame(spec)
            split = split_frame(frame, spec)
            write_split(
                split,
                frame,
                spec,
                tmp / spec.dataset,
                key=key,
                inputs=inputs,
                show_progress=show_progress,
                started=started,
            )
            _install(tmp, data_path, spec.dataset, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _log.info("prepared %s (%s split) at %s", spec.dataset, spec.split, data_path / spec.dataset)
    return _open(data_path, spec.dataset, reused=False)


def _install(tmp: Path, data_path: Path, dataset: str, key: str) -> None:
    """Rename the finished temp dir into place (replacing an old or incomplete copy)."""
    old = None
    if data_path.exists():
        old = data_path.with_name(f".old-{data_path.name}-{os.getpid()}-{time.time_ns()}")
        os.replace(data_path, old)
    try:
        os.replace(tmp, data_path)
    except OSError:
        if not _complete(data_path / dataset, dataset, key):  # lost a race, and the winner is not whole
            raise
        _log.info("another process prepared %s first; using its copy", data_path)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _histories(
    split: Split, rows: np.ndarray, max_history: int, show_progress: bool, what: str, column: str = "item_id"
) -> list[str]:
    """Space-joined ``column`` of the earlier interactions of each row (the frame is ordered by user and time, so a
    row's history is the ``position`` rows right before it), the last ``max_history`` kept. A label with a space
    (``United Kingdom``) is written with ``_`` (``history_label``), as a token_seq splits on spaces."""
    items = split.frame[column].astype(str).tolist()
    if column != "item_id":
        items = [history_label(v) for v in items]
    position = split.frame["position"].to_numpy()
    out = []
    for r in tqdm(rows.tolist(), desc=f"histories ({what})", disable=not show_progress, mininterval=1.0, leave=False):
        out.append(" ".join(items[r - min(position[r], max_history) : r]))
    return out


def history_label(value: str) -> str:
    """An environment label as a ``season_list`` / ``region_list`` token: spaces become ``_``."""
    return str(value).replace(" ", "_")


def _write_tsv(table: pd.DataFrame, header: tuple[str, ...], path: Path, quoting: int = csv.QUOTE_NONE) -> None:
    table.to_csv(path, sep="\t", index=False, header=list(header), quoting=quoting, lineterminator="\n")


def write_split(
    split: Split,
    frame: pd.DataFrame,
    spec: DataSpec,
    directory: Path,
    *,
    key: str,
    inputs: dict[str, Any],
    show_progress: bool = True,
    started: float | None = None,
) -> dict[str, Any]:
    """Write the files of docs/contracts.md for ``split`` into ``directory``; returns the meta dict."""
    directory.mkdir(parents=True, exist_ok=True)
    names = file_names(spec.dataset)
    f = split.frame
    cols = ["user_id", "item_id", "timestamp", "season", "region"]
    for part in ("train", "valid", "test"):
        rows = getattr(split, part)
        _write_tsv(rows[cols], INTER_COLUMNS, directory / names[f"{part}.inter"])
        if part == "train":
            rows = rows[rows["position"] >= 1]
        index = rows.index.to_numpy()
        seq = pd.DataFrame(
            {
                "user_id": rows["user_id"].to_numpy(),
                "item_id_list": _histories(split, index, spec.max_history, show_progress, part),
                "item_id": rows["item_id"].to_numpy(),
                "timestamp": rows["timestamp"].to_numpy(),
                "season": rows["season"].to_numpy(),
                "region": rows["region"].to_numpy(),
            }
        )
        header = SEQ_COLUMNS
        if spec.history_environments:
            for name in ("season", "region"):
                seq[f"{name}_list"] = _histories(split, index, spec.max_history, False, part, column=name)
            header = SEQ_COLUMNS + HISTORY_ENVIRONMENT_COLUMNS
        _write_tsv(seq, header, directory / names[f"seq_{part}.inter"])
    catalog = f.drop_duplicates("item_id").sort_values("item_id")  # titles already capped by load_frame
    warn_if_texts_tie(catalog["item_text"].tolist(), spec.dataset)
    _write_tsv(catalog[["item_id"]], ("item_id:token",), directory / names["item"])
    items = pd.DataFrame(
        {
            "item_id": catalog["item_id"],
            "item_text": catalog["item_text"],
            "category": catalog["category"] if "category" in catalog.columns else "",
        }
    )
    _write_tsv(items, ("item_id", "item_text", "category"), directory / names["items.tsv"], csv.QUOTE_MINIMAL)
    counts = split.counts()
    meta = {
        "format_version": FORMAT_VERSION,
        "input_hash": key,
        "dataset": spec.dataset,
        "split": spec.split,
        "spec": spec.to_dict(),
        "inputs": inputs,
        "stats": describe(frame),
        "split_params": split.params,
        "parts": {
            **counts,
            "seq_train": int((split.train["position"] >= 1).sum()),
            "users_with_valid_target": counts["valid"],
            "users_with_test_target": counts["test"],
        },
        "shift_evidence": split.evidence,
        "environments": {
            name: {str(k): int(v) for k, v in split.train[name].value_counts().sort_index().items()}
            for name in ("season", "region")
        },
        "files": names,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.perf_counter() - started, 2) if started is not None else None,
    }
    (directory / names["meta.json"]).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta
