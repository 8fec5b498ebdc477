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

``causalrec run`` (and RecBole's ``run_recbole``) under the same launch: the two processes train the TRL stages as one
DDP run, the main process alone holds the stage lock, installs the stages, evaluates and writes; so its test metrics
and stage weights are those of one process with ``gradient_accumulation_steps: 2``, with a cold and a warm stage cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import causalrec
from causalrec.errors import ConfigError
from causalrec.recbole.trainer import LLMTrainer, process_rank
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


def _launch(tmp, cwd, target: list[str]) -> str:
    """``accelerate launch`` of 2 gloo CPU processes running ``target`` (``-m module args`` or ``script args``) in
    ``cwd``; returns the combined log, fails the test on a non-zero exit or a hang."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_HOME": str(tmp / "hf"),
    }  # no user accelerate config or HF cache leaks in; CAUSALREC_CACHE: the session's
    config = _accelerate_config(cwd / "accelerate.yaml", _free_port())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *target]
    start = time.perf_counter()
    log = cwd / "launch.txt"  # a file, not a pipe: a stray worker cannot block the test by holding it open
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
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
    text = log.read_text()
    assert proc.returncode == 0, f"accelerate launch failed ({proc.returncode}):\n{text[-4000:]}"
    print(f"2-process accelerate launch of {' '.join(target)[:60]}: {time.perf_counter() - start:.1f}s")
    return text


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    """One ``accelerate launch`` of distributed_check with 2 processes; returns the directory of rank0/rank1.pt."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "result"
    _launch(
        tmp,
        tmp / "launch",
        [
            "-m",
            "causalrec.training.distributed_check",
            "--out",
            str(out),
            "--expect-processes",
            str(N_PROCESSES),
            "--stages",
            ",".join(STAGES),
            "--rows",
            str(BASE["rows"]),
            "--max-steps",
            str(BASE["max_steps"]),
            "--per-device-train-batch-size",
            str(BASE["per_device_train_batch_size"]),
        ],
    )
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


PRESET_STAGES = ("sft", "sft+lora", "sdpo+lora", "causal_dpo+lora")


def test_sft_with_lora_under_accumulation_equals_the_larger_batch(tmp_path):
    # 2 rows x 2 accumulation steps == 4 rows x 1 (what was once reported as an accumulation gap was unseeded LoRA
    # initialisation: two runs of one config differed at step 2)
    stage = {**BASE, "stages": ("sft+lora",)}
    accumulated = dc.run_check(dc.CheckConfig(**{**stage, "gradient_accumulation_steps": 2}), tmp_path / "ga")
    whole = dc.run_check(dc.CheckConfig(**{**stage, "per_device_train_batch_size": 4}), tmp_path / "whole")
    assert dc.compare(accumulated, whole) == []
    half = dc.run_check(dc.CheckConfig(**stage), tmp_path / "half")  # 2 rows per step: another model
    assert dc.compare(half, whole)


@pytest.fixture(scope="module")
def preset_backbone(tmp_path_factory):
    """A random Llama saved as a Hugging Face directory: as a ``backbone`` it gets the ``pretrained`` preset."""
    from causalrec.data.prompts import PromptFormat
    from causalrec.llm.backbone import BackboneConfig, build_tiny_llama, build_tokenizer

    fmt = PromptFormat()
    tok = build_tokenizer(list(dc.TITLES) + [fmt.template, fmt.prompt([])])
    directory = tmp_path_factory.mktemp("preset") / "llama"
    build_tiny_llama(tok, BackboneConfig(tiny_hidden_size=16, tiny_heads=2, tiny_layers=1)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_the_pretrained_preset_trains_the_same_under_launch(preset_backbone, tmp_path_factory):
    """``distributed_check`` covers the presets: with a directory backbone (LoRA rank 16, alpha 32 from the
    ``pretrained`` preset), 2 DDP processes equal 1 process with gradient accumulation 2 (``PRESET_STAGES``)."""
    tmp = tmp_path_factory.mktemp("ddp_preset")
    args = ["--stages", ",".join(PRESET_STAGES), "--backbone", str(preset_backbone)]
    for key in ("rows", "max_steps", "per_device_train_batch_size"):
        args += ["--" + key.replace("_", "-"), str(BASE[key])]
    _launch(
        tmp,
        tmp / "launch",
        [
            "-m",
            "causalrec.training.distributed_check",
            "--out",
            str(tmp / "result"),
            "--expect-processes",
            str(N_PROCESSES),
            *args,
        ],
    )
    one = dc.run_check(
        dc.CheckConfig(
            **{
                **BASE,
                "stages": PRESET_STAGES,
                "backbone": str(preset_backbone),
                "gradient_accumulation_steps": N_PROCESSES,
            }
        ),
        tmp / "one",
    )
    assert dc.compare(dc.load_result(tmp / "result"), one) == []
    from causalrec.data.prompts import PromptFormat
    from causalrec.llm.presets import PRESETS

    model, _ = dc._backbone(dc.CheckConfig(backbone=str(preset_backbone)), PromptFormat(), lora=True)
    ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {PRESETS["pretrained"]["lora_r"]}


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


def test_causalrec_check_is_the_same_check(tmp_path, capsys):
    from causalrec.cli import main

    argv = ["--stages", "sft", "--max-steps", "1", "--rows", "8", "--out", str(tmp_path / "one")]
    assert main(["check", *argv, "--expect-processes", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("causalrec: error:")]
    assert len(errors) == 1 and "the launcher started 1 process(es), expected 2" in errors[0]
    assert not (tmp_path / "one" / "rank0.pt").exists()
    assert main(["check", *argv]) == 0 and (tmp_path / "one" / "rank0.pt").is_file()
    assert dc.main([*argv[:-1], str(tmp_path / "two"), "--compare", str(tmp_path / "one")]) == 0


# ------------------------------------------------------------------------ causalrec run under accelerate launch
# 8 SFT steps x 16 rows and 4 S-DPO steps x 8 rows of 2390 training rows: no epoch boundary, where DDP would pad the
# last batch and gradient accumulation would not. Learning rates high enough that the metrics move.
RUN = {
    "sim_users": 150,
    "sim_items": 60,
    "show_progress": False,
    "tiny_hidden_size": 16,
    "tiny_layers": 1,
    "eval_batch_size": 256,
    "rank_batch_size": 32,
    "sft_args": {"max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 0.01},
    "dpo_args": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 0.005},
}

RUN_RECBOLE = """import json, sys
import causalrec
from recbole.quick_start import run_recbole
from causalrec.recbole.trainer import process_rank
result = run_recbole(model="SDPORec", dataset="retail-sim", config_dict=json.loads(sys.argv[1]))
print(f"RANK {process_rank()[0]} TEST " + json.dumps(result["test_result"], default=float))
"""


def _with_accumulation(params, steps):
    return {**params, **{k: {**params[k], "gradient_accumulation_steps": steps} for k in ("sft_args", "dpo_args")}}


def _cli_args(params) -> list[str]:
    args = ["-m", "causalrec", "run", "--model", "SDPORec", "--dataset", "retail-sim", "--output", "result.json"]
    for key, value in params.items():
        args += ["-p", f"{key}={json.dumps(value)}"]
    return args


@pytest.fixture(scope="module")
def launched_runs(tmp_path_factory):
    """``causalrec run`` launched twice on one stage cache (cold: trains; warm: loads), then ``run_recbole``."""
    tmp = tmp_path_factory.mktemp("run-ddp")
    params = {**RUN, "stage_cache_dir": str(tmp / "stages")}
    out = {"tmp": tmp, "stages": tmp / "stages"}
    for name in ("cold", "warm"):
        out[name] = tmp / name
        out[f"{name}_log"] = _launch(tmp, tmp / name, _cli_args(params))
    (tmp / "run_recbole.py").write_text(RUN_RECBOLE)
    out["recbole_log"] = _launch(tmp, tmp / "recbole", [str(tmp / "run_recbole.py"), json.dumps(params)])
    return out


def _run_here(where, params):
    old = os.getcwd()
    where.mkdir(parents=True)
    os.chdir(where)  # RecBole writes ./log, ./log_tensorboard, ./saved
    try:
        return causalrec.run("SDPORec", "retail-sim", config_dict=params)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def accumulation_result(launched_runs):
    """One process, 2 x the rows per optimizer step through gradient accumulation, in a stage cache of its own."""
    tmp = launched_runs["tmp"]
    return _run_here(tmp / "ga2", {**_with_accumulation(RUN, 2), "stage_cache_dir": str(tmp / "ga2-stages")})


def _stage_dirs(root, processes=None):
    """The finished stages under ``root`` trained by ``processes`` processes (None: by one), by stage name."""
    found = {}
    for meta in root.glob("*/stage.json"):
        info = json.loads(meta.read_text())
        if info["inputs"].get("processes") == processes:
            assert info["stage"] not in found, f"two {info['stage']} stages in {root}"
            found[info["stage"]] = meta.parent
    return found


def _stage_weights(root, stage, processes=None):
    from safetensors.torch import load_file

    return load_file(str(_stage_dirs(root, processes)[stage] / "model.safetensors"))


def test_causalrec_run_under_launch_equals_one_process_with_accumulation(launched_runs, accumulation_result):
    cold, warm = (json.loads((launched_runs[n] / "result.json").read_text()) for n in ("cold", "warm"))
    assert [(s["stage"], s["reused"]) for s in cold["stages"]] == [("sft", False), ("sdpo", False)]
    assert [s["reused"] for s in warm["stages"]] == [True, True]  # the warm launch loaded both stages
    for key in ("test_result", "test_env_result", "best_valid_result"):
        assert cold[key] == accumulation_result[key] == warm[key], key
    assert [s["valid_score"] for s in cold["stages"]] == [s["valid_score"] for s in accumulation_result["stages"]]
    # The stage weights themselves, to distributed_check's tolerance (bitwise on CPU in practice).
    for stage in ("sft", "sdpo"):
        ddp = _stage_weights(launched_runs["stages"], stage, processes=N_PROCESSES)
        one = _stage_weights(launched_runs["tmp"] / "ga2-stages", stage)
        assert ddp.keys() == one.keys()
        for name, tensor in ddp.items():
            assert torch.allclose(tensor, one[name], rtol=1e-4, atol=1e-5), (stage, name)


def test_only_the_main_process_evaluates_and_writes(launched_runs):
    for name in ("cold", "warm"):
        folder, log = launched_runs[name], launched_runs[f"{name}_log"]
        assert len(re.findall(r"^test: ", log, flags=re.M)) == 1, log[-3000:]  # one process printed a result
        assert log.count("process 1 of 2: training done; the main process evaluates") == 1
        assert sorted(p.name for p in folder.glob("*.json")) == ["result.json"]
        assert len(list((folder / "saved").glob("SDPORec-*.pth"))) == 1
    stages = launched_runs["stages"]
    assert sorted(_stage_dirs(stages, processes=N_PROCESSES)) == ["sdpo", "sft"]  # each installed once
    assert not list(stages.glob("*.partial")) and not list(stages.glob(".tmp-*"))


def test_run_recbole_under_launch(launched_runs):
    lines = dict(re.findall(r"^RANK (\d) TEST (.*)$", launched_runs["recbole_log"], flags=re.M))
    assert set(lines) == {"0", "1"}, launched_runs["recbole_log"][-3000:]
    assert lines["1"] == "null"  # evaluation runs on the main process only
    cold = json.loads((launched_runs["cold"] / "result.json").read_text())
    assert json.loads(lines["0"]) == cold["test_result"]


def test_one_process_does_not_reuse_the_stages_of_two(launched_runs):
    """Same per-process settings, shared stage cache: one process trains half the global batch, so it must train
    its own stages (the key covers the number of processes), and its metrics differ."""
    single = _run_here(launched_runs["tmp"] / "ga1", {**RUN, "stage_cache_dir": str(launched_runs["stages"])})
    assert [s["reused"] for s in single["stages"]] == [False, False]
    cold = json.loads((launched_runs["cold"] / "result.json").read_text())
    assert single["test_result"] != cold["test_result"]


def test_a_launch_without_a_process_group_is_a_config_error(monkeypatch):
    import torch.distributed as dist

    assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert process_rank() == (1, 2)
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU"):
        LLMTrainer._processes()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert process_rank() == (0, 1)


def test_the_cli_destroys_the_process_group_it_exits_with(tmp_path):
    """Under ``accelerate launch`` every command runs inside a process group; ``causalrec`` destroys it before the
    interpreter exits (left to exit, gloo's threads once aborted a finished process), on an error too."""
    import torch.distributed as dist

    from causalrec.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        assert main(["run", "--model", "NoSuchModel", "--dataset", "retail-sim"]) != 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
