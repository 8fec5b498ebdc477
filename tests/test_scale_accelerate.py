"""The TRL stages under ``accelerate launch`` with 2 CPU processes (DDP, gloo) train exactly what one process trains
on the same global batches.

Why these references. Accelerate gives global batch k to process k mod N, so 2 processes x 2 rows see per
optimizer step the same 4 rows, in the same order, as 1 process x 2 rows x ``gradient_accumulation_steps=2`` and
as 1 process x 4 rows. The all-reduce averages the two gradients, which is (g0 + g1) / 2, the very sum gradient
accumulation forms (halving is exact in floating point), so against the accumulation run the results are expected
bitwise equal and are checked to ``distributed_check``'s tolerance (rtol 1e-4, atol 1e-5), which covers float32
reductions in another order (other thread counts, GPU kernels). Against the 4-row run SFT and S-DPO differ only by
padding two rows vs four (measured <= 5e-7); CausalDPO's environment risks, penalty and clustering terms are
per micro-batch by design, so it matches the accumulation run and not the 4-row run (measured 0.03 on the losses).
A run on a different global batch (1 x 2 rows) differs by > 1e-3 and must be reported as a mismatch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from causalrec.training import distributed_check as dc

pytestmark = pytest.mark.slow

N_PROCESSES = 2
LAUNCH_TIMEOUT_S = 300
STAGES = ("sft", "sdpo", "causal_dpo", "causal_dpo+lora")
# 4 optimizer steps x 4 rows = 16 of 48 rows: no run reaches an epoch boundary.
BASE = {"stages": STAGES, "rows": 48, "max_steps": 4, "per_device_train_batch_size": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_config(path, port: int) -> str:
    # MULTI_GPU + ACCELERATE_USE_CPU=true is how accelerate starts N gloo CPU processes through torchrun; a
    # MULTI_CPU config or --cpu goes to its simple launcher, which starts one process unless given an MPI hostfile.
    path.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nmachine_rank: 0\n"
        f"num_processes: {N_PROCESSES}\nmain_process_ip: 127.0.0.1\nmain_process_port: {port}\n"
        "mixed_precision: 'no'\nuse_cpu: false\ngpu_ids: all\nrdzv_backend: static\nsame_network: true\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    """One ``accelerate launch`` of distributed_check with 2 processes; returns the directory of rank0/rank1.pt."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "result"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "HF_HOME": str(tmp / "hf")}  # no user accelerate config or HF cache leaks in
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", _accelerate_config(tmp / "accelerate.yaml", _free_port()),
           "-m", "causalrec.training.distributed_check", "--out", str(out),
           "--expect-processes", str(N_PROCESSES), "--stages", ",".join(STAGES),
           "--rows", str(BASE["rows"]), "--max-steps", str(BASE["max_steps"]),
           "--per-device-train-batch-size", str(BASE["per_device_train_batch_size"])]
    start = time.perf_counter()
    log = tmp / "launch.log"  # a file, not a pipe: a stray worker cannot block the test by holding it open
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # A collective left waiting (e.g. on a file lock). SIGTERM: torchrun's agent stops its workers, which
            # run in sessions of their own (SIGKILL to the agent would orphan them).
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"accelerate launch hung for {LAUNCH_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{log.read_text()[-4000:]}"
    print(f"2-process accelerate launch: {time.perf_counter() - start:.1f}s")
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a loaded 2-core machine they make a step ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _one_process(tmp_path_factory, name, **overrides):
    return dc.run_check(dc.CheckConfig(**{**BASE, **overrides}), tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module")
def accumulation_run(tmp_path_factory):
    return _one_process(tmp_path_factory, "ga", gradient_accumulation_steps=N_PROCESSES)


def test_every_process_holds_the_same_model(ddp_dir):
    rank0, rank1 = dc.load_result(ddp_dir, 0), dc.load_result(ddp_dir, 1)
    assert (rank0["world_size"], rank0["rank"], rank1["rank"]) == (N_PROCESSES, 0, 1)
    assert rank0["distributed_type"] == "DistributedType.MULTI_CPU"  # DDP over gloo
    assert set(rank0["stages"]) == set(STAGES)
    # Replicas, the gathered loss logs, the CausalDPO prototypes and its EMA prior are bitwise identical.
    assert dc.differences(rank1, rank0) == {key: 0.0 for key in dc.differences(rank0, rank0)}
    assert "causal_dpo/env_prior" in dc.differences(rank1, rank0)


def test_ddp_equals_one_process_with_gradient_accumulation(ddp_dir, accumulation_run):
    ddp = dc.load_result(ddp_dir)
    assert accumulation_run["world_size"] == 1
    assert dc.compare(ddp, accumulation_run) == []
    for stage in STAGES:  # the runs trained: the losses move from step to step
        losses = ddp["stages"][stage]["losses"]
        assert len(losses) == BASE["max_steps"] and float(losses.max() - losses.min()) > 1e-3, stage


def test_sft_and_sdpo_equal_one_process_with_the_whole_global_batch(ddp_dir, tmp_path_factory):
    big = _one_process(tmp_path_factory, "big", per_device_train_batch_size=N_PROCESSES * 2)
    ddp = dc.load_result(ddp_dir)
    problems = dc.compare(ddp, big)
    assert not [p for p in problems if p.startswith(("sft/", "sdpo/"))]
    # CausalDPO computes environment risks per micro-batch (see docs/scale.md); over 4 rows they differ.
    causal = dc.differences(ddp, big)
    assert causal["causal_dpo/losses"] > 1e-3 and "causal_dpo/losses" in " ".join(problems)


def test_a_different_global_batch_is_reported(ddp_dir, tmp_path_factory):
    half = _one_process(tmp_path_factory, "half")  # 1 process x 2 rows: half the global batch
    problems = dc.compare(dc.load_result(ddp_dir), half)
    for stage in STAGES:
        assert any(p.startswith(f"{stage}/weights") for p in problems), (stage, problems)


def test_expect_processes_catches_a_launcher_that_started_one_process(tmp_path):
    code = dc.main(["--stages", "sft", "--max-steps", "1", "--out", str(tmp_path), "--expect-processes", "2"])
    assert code == 2
    assert not (tmp_path / "rank0.pt").exists()
