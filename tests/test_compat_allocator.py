"""B15: RecBole's Trainer.fit runs with glibc malloc keeping large freed blocks (no page faults per step)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

import causalrec
from causalrec import allocator as compat

pytestmark = pytest.mark.skipif(
    compat._glibc() is None, reason="not glibc, or malloc tuned by the user: B15 is a no-op"
)

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): always mmap-ed by default


# Measured in a fresh interpreter: in a long-lived test worker, an earlier heap_allocator session can leave a
# large free chunk inside the heap, and glibc then serves later 64 MiB blocks from it even with its default
# settings (CI once counted [16383, 0, 0, 0, 0, 0] faults "outside"), which says nothing about B15.
_MEASURE = """
import json, resource, torch
from causalrec import allocator as compat

def faults(times):
    out = []
    for _ in range(times):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(%d // 4, dtype=torch.float32)
        block.fill_(1.0)  # touch every page
        del block
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

outside = faults(6)
with compat.heap_allocator():
    active = compat.heap_allocator_active()
    inside = faults(9)
print(json.dumps({"outside": outside, "inside": inside, "active": active, "after": compat.heap_allocator_active()}))
"""


def _measure_in_fresh_process() -> dict:
    """Minor page faults of rounds of allocating, touching and freeing a 64 MiB tensor, outside and inside
    ``heap_allocator``, in a new interpreter (a clean heap)."""
    env = {k: v for k, v in os.environ.items() if k != compat.MALLOC_ENV}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE % BLOCK], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_heap_allocator_stops_refaulting_large_blocks():
    pages = BLOCK // resource.getpagesize()
    seen = _measure_in_fresh_process()
    outside, inside = seen["outside"], seen["inside"]
    if max(outside) < pages // 10:  # e.g. transparent huge pages always on: one fault maps 512 pages
        pytest.skip(f"this kernel does not fault 4 KiB pages one by one ({outside} faults per 64 MiB block)")
    # each allocation is a fresh mapping: (nearly) every page faults again; a few pages may already be mapped
    # next to the block (CI once counted 16,380 of 16,384)
    assert min(outside) >= pages * 0.95, outside
    assert seen["active"] and not seen["after"]
    # The heap grows at first (and now and then when small objects land next to the freed block); otherwise the
    # freed block is reused without a single fault.
    assert sum(f < pages // 100 for f in inside) >= 5, inside


class _FakeLibc:
    def __init__(self):
        self.calls: list[tuple] = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_heap_allocator_sets_once_and_restores_glibc_defaults(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(compat, "_glibc", lambda: libc)
    with compat.heap_allocator():
        with compat.heap_allocator():
            assert compat.heap_allocator_active()
        assert compat.heap_allocator_active()  # the inner exit restores nothing
        assert libc.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]  # M_MMAP_MAX 0, no trimming
    assert not compat.heap_allocator_active()
    # glibc's documented defaults (mallopt(3)): M_TRIM_THRESHOLD 128 KiB, M_MMAP_MAX 65536; then memory goes back
    assert libc.calls[2:] == [("mallopt", -1, 128 * 1024), ("mallopt", -4, 65536), ("malloc_trim", 0)]
    with pytest.raises(RuntimeError), compat.heap_allocator():
        raise RuntimeError("training failed")
    assert not compat.heap_allocator_active() and libc.calls[-1] == ("malloc_trim", 0)  # restored on errors too


@pytest.mark.parametrize(
    "env",
    [
        {"CAUSALREC_MALLOC_TUNING": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        {"MALLOC_ARENA_MAX_": "2"},
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
    ],
)
def test_user_choice_turns_it_off(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert compat._glibc() is None
    with compat.heap_allocator():
        assert not compat.heap_allocator_active()


def _fit(monkeypatch, tmp_path, tuning: str):
    monkeypatch.setenv("CAUSALREC_MALLOC_TUNING", tuning)
    seen: list[bool] = []  # whether the heap allocator was on, per training epoch
    config, trainer, (train, valid, _) = causalrec.recbole.quick_start.build(
        "SASRec",
        "retail-sim",
        config_dict={
            "sim_users": 150,
            "sim_items": 60,
            "epochs": 2,
            "show_progress": False,
            "checkpoint_dir": str(tmp_path),
            "train_batch_size": 256,
            "hidden_size": 16,
            "inner_size": 32,
        },
    )
    monkeypatch.setattr(trainer, "_train_epoch", _recorder(trainer._train_epoch, seen))
    score, _ = trainer.fit(train, valid, saved=False, show_progress=False)
    return score, {k: v.clone() for k, v in trainer.model.state_dict().items()}, seen


def _recorder(train_epoch, seen):
    def wrapped(*args, **kwargs):
        seen.append(compat.heap_allocator_active())
        return train_epoch(*args, **kwargs)

    return wrapped


def test_recbole_fit_runs_on_the_heap_with_identical_results(monkeypatch, tmp_path):
    from recbole.trainer import Trainer

    assert getattr(Trainer.fit, "_causalrec", False)
    on_score, on_state, on_seen = _fit(monkeypatch, tmp_path, "1")
    off_score, off_state, off_seen = _fit(monkeypatch, tmp_path, "0")
    assert on_seen == [True, True] and off_seen == [False, False]  # both epochs, only when allowed
    assert not compat.heap_allocator_active()  # restored after fit
    assert on_score == off_score
    assert on_state.keys() == off_state.keys()
    for key in on_state:  # the allocator changes where tensors live, never what they hold
        assert torch.equal(on_state[key], off_state[key]), key
