"""Shared test set-up: no network, RecBole's working-directory output kept in tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process: runs pick ``num_threads: auto`` from OMP_NUM_THREADS, so a test that runs
# twice gets the same count both times however busy the other xdist worker is (and -n 2 workers fill 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
ONLINE_RETAIL = SHARED_DATASETS / "online_retail_uci" / "online_retail.csv.gz"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Prepared datasets are cached per test session, never in the user's cache."""
    cache = tmp_path_factory.mktemp("causalrec-cache")
    old = os.environ.get("CAUSALREC_CACHE")
    os.environ["CAUSALREC_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("CAUSALREC_CACHE", None)
    else:
        os.environ["CAUSALREC_CACHE"] = old


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh directory: RecBole writes ./log, ./log_tensorboard and ./saved."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def online_retail_path():
    if not ONLINE_RETAIL.is_file():
        pytest.skip(f"real Online Retail data not found at {ONLINE_RETAIL} (../shared is absent)")
    return ONLINE_RETAIL


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared 2-core box, two threads fighting other processes are many
    times slower (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
