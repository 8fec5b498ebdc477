"""Concurrency: two processes preparing the same data, or training the same stage, build it once and
leave one whole copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _start(args, cwd: Path, env: dict, log: str) -> subprocess.Popen:
    with open(cwd / log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "causalrec", *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        )


def test_two_data_prepare_processes_build_once(tmp_path):
    cache = tmp_path / "cache"
    args = ["data", "prepare", "-d", "retail-sim", "--split", "seasonal", "-p", "sim_users=1500", "-p", "sim_items=200"]
    procs = [_start(args, tmp_path, {"CAUSALREC_CACHE": str(cache)}, f"p{i}.log") for i in range(2)]
    for proc in procs:
        proc.wait(timeout=600)
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], logs
    folders = {log.split("prepared retail-sim at ")[1].splitlines()[0] for log in logs}
    assert len(folders) == 1
    assert sum("reusing prepared data" in log for log in logs) == 1  # one built, the other reused its copy
    root = cache / "retail-sim"
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [Path(*folders).parent.name]
    meta = json.loads((Path(*folders) / "retail-sim.meta.json").read_text())
    rows = sum(1 for _ in open(Path(*folders) / "retail-sim.seq_test.inter")) - 1
    assert rows == meta["parts"]["test"] > 0  # the files are whole


@pytest.mark.slow
def test_two_runs_training_the_same_stage_train_it_once(tmp_path):
    stages = tmp_path / "stages"
    params = {
        "sim_users": 150,
        "sim_items": 60,
        "show_progress": False,
        "env_metrics": False,
        "tiny_hidden_size": 16,
        "tiny_layers": 1,
        "eval_batch_size": 256,
        "rank_batch_size": 32,
        "sft_args": {"max_steps": 6, "per_device_train_batch_size": 8},
        "stage_cache_dir": str(stages),
    }
    procs = []
    for i in range(2):
        (tmp_path / f"r{i}").mkdir()
        args = ["run", "--model", "GenRec", "--dataset", "retail-sim", "--output", "result.json"]
        for key, value in params.items():
            args += ["-p", f"{key}={json.dumps(value)}"]
        procs.append(_start(args, tmp_path / f"r{i}", {"CAUSALREC_CACHE": str(tmp_path / "cache")}, "run.log"))
    for proc in procs:
        proc.wait(timeout=600)
    logs = [(tmp_path / f"r{i}" / "run.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], [log[-2000:] for log in logs]
    results = [json.loads((tmp_path / f"r{i}" / "result.json").read_text()) for i in range(2)]
    assert sorted(r["stages"][0]["reused"] for r in results) == [False, True]
    assert results[0]["test_result"] == results[1]["test_result"]
    assert len(list(stages.glob("sft-*/model.safetensors"))) == 1 and not list(stages.glob(".tmp-*"))


def test_a_cell_two_compare_processes_reach_together_is_trained_once(tmp_path, monkeypatch):
    """Two ``compare`` runs over overlapping grids of one folder: the second waits for the cell the first is
    training and takes its record (training it too would share, and lose, its checkpoint folder)."""
    import threading
    import time

    from causalrec.experiments import compare

    calls, started, release = [], threading.Event(), threading.Event()

    def fake_run(model, dataset, config_dict=None, saved=True):
        calls.append(config_dict["checkpoint_dir"])
        started.set()
        assert release.wait(30)
        return {"model": model, "test_result": {"ndcg@10": 0.25}}

    monkeypatch.setattr("causalrec.recbole.quick_start.run", fake_run)
    cell = compare.Cell("BPR", "seasonal", 2020, {"seed": 2020}, "ab" * 32)
    records = [None, None]

    def reach(i):
        records[i] = compare.run_cell(cell, "retail-sim", tmp_path)

    first = threading.Thread(target=reach, args=(0,))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=reach, args=(1,))
    second.start()
    time.sleep(0.5)  # the second is waiting on the cell's lock
    assert len(calls) == 1
    release.set()
    first.join(30)
    second.join(30)
    assert len(calls) == 1
    assert records[0]["status"] == records[1]["status"] == "ok"
    assert records[1]["result"] == records[0]["result"] == {"model": "BPR", "test_result": {"ndcg@10": 0.25}}
    assert json.loads(cell.path(tmp_path).read_text())["status"] == "ok"
