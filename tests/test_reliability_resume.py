"""Interruption: stage checkpoints, the shared SFT stage, resume after SIGKILL, the non-finite loss guard."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import causalrec
from causalrec.errors import CheckpointError, TrainingError
from causalrec.training.stage_cache import (
    STAGE_META,
    STAGE_WEIGHTS,
    StageCache,
    last_checkpoint,
    load_stage,
    save_stage,
)

# Tiny but real: ~2400 SFT rows, a 1-layer Llama with hidden size 16.
TINY = {
    "sim_users": 150,
    "sim_items": 60,
    "split": "seasonal",
    "show_progress": False,
    "tiny_hidden_size": 16,
    "tiny_layers": 1,
    "sft_args": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 3e-3},
    "dpo_args": {"max_steps": 3, "per_device_train_batch_size": 4},
    "dpo_max_samples": 32,
    "eval_batch_size": 256,
    "rank_batch_size": 32,
    "env_metrics": False,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(model, where: Path, **extra):
    return causalrec.run(model, "retail-sim", config_dict={**TINY, "checkpoint_dir": str(where), **extra})


# ------------------------------------------------------------------------------------- storage units
class _Tiny(torch.nn.Module):
    def __init__(self, width=3, frozen=False):
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, 2)
        self.c = torch.nn.Linear(width, width, bias=False)
        self.c.weight = self.a.weight  # tied, as embeddings and LM heads often are
        if frozen:
            self.a.requires_grad_(False)


def test_stage_round_trip_and_damaged_or_foreign_checkpoints(tmp_path):
    torch.manual_seed(0)
    src, dst = _Tiny(), _Tiny()
    save_stage(tmp_path / "s", src, {"key": "k" * 64})
    meta = load_stage(tmp_path / "s", dst, key="k" * 64)
    assert meta["weights"] == "all" and all(torch.equal(p, q) for p, q in zip(src.parameters(), dst.parameters()))
    with pytest.raises(CheckpointError, match="other inputs"):
        load_stage(tmp_path / "s", _Tiny(), key="x" * 64)
    with pytest.raises(CheckpointError, match="another model"):
        load_stage(tmp_path / "s", _Tiny(width=4))  # a model of another size
    with pytest.raises(CheckpointError, match="not a causalrec stage"):
        load_stage(tmp_path, _Tiny())
    weights = tmp_path / "s" / STAGE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-20])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_stage(tmp_path / "s", _Tiny())
    (tmp_path / "s" / STAGE_META).write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        load_stage(tmp_path / "s", _Tiny())


def test_frozen_parameters_are_not_stored(tmp_path):
    torch.manual_seed(0)
    src = _Tiny(frozen=True)
    save_stage(tmp_path, src, {})
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / STAGE_WEIGHTS))) == {"b.weight", "b.bias"}  # LoRA-like: trainables only
    torch.manual_seed(0)
    dst = _Tiny(frozen=True)  # the frozen part is rebuilt identically (the key covers the backbone and seed)
    torch.nn.init.zeros_(dst.b.weight)
    load_stage(tmp_path, dst)
    assert torch.equal(dst.b.weight, src.b.weight)
    with pytest.raises(CheckpointError, match="trainable"):
        load_stage(tmp_path, _Tiny(frozen=False))


def test_last_checkpoint_skips_incomplete_ones(tmp_path):
    def make(step, state_step=None, state=True):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": state_step or step}))

    assert last_checkpoint(tmp_path) is None
    make(2)
    make(4, state=False)  # killed before trainer_state.json (written last)
    make(6, state_step=5)  # not what its name says
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_install_is_atomic_and_replaces_an_incomplete_copy(tmp_path):
    cache = StageCache(tmp_path)
    key = "a" * 64
    cache.directory("sft", key).mkdir(parents=True)  # a copy without stage.json (e.g. damaged by hand)
    (tmp_path / f".tmp-sft-{key[:16]}-killed").mkdir()  # a save cut short by a kill
    assert cache.find("sft", key) is None
    final = cache.install("sft", key, _Tiny(), {"model": "GenRec"})
    assert cache.find("sft", key) == final and json.loads((final / STAGE_META).read_text())["key"] == key
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # no temp dir left


def test_resume_turns_on_step_checkpoints_only_where_none_are_saved():
    from causalrec.recbole import stage_args as args_module

    def checkpointing(resume, stage_args, steps=None):
        return args_module.checkpointing({"resume": resume, "resume_save_steps": steps}, stage_args)

    assert checkpointing(False, {"save_strategy": "no"}) == {}
    assert checkpointing(True, {"save_strategy": "no"}, 7) == {
        "save_strategy": "steps",
        "save_steps": 7,
        "save_total_limit": 1,
    }
    assert checkpointing(True, {"save_strategy": "no"})["save_steps"] == 100  # the default
    assert checkpointing(True, {"save_strategy": "epoch"}) == {}  # the user's own checkpoints serve


def test_config_fields_added_later_enter_a_stage_key_only_away_from_their_defaults(tmp_path, monkeypatch):
    """A field added to the preference configs with a default that trains as before must not orphan the stages
    cached before it: ``training_args_key`` leaves a field of ``KEYED_AWAY_FROM_DEFAULT`` out at that default and
    keeps it otherwise; every other field is keyed whatever its value."""
    from causalrec.training.causal_dpo_config import CausalDPOConfig
    from causalrec.training.sdpo_config import SDPOConfig
    from causalrec.training.stage_cache import training_args_key

    assert CausalDPOConfig.KEYED_AWAY_FROM_DEFAULT == SDPOConfig.KEYED_AWAY_FROM_DEFAULT == {}  # every field keyed
    before = training_args_key(CausalDPOConfig(output_dir=str(tmp_path)))
    assert before["tau_final"] is None and before["env_prior"] == "uniform"
    monkeypatch.setattr(CausalDPOConfig, "KEYED_AWAY_FROM_DEFAULT", {"tau_final": None, "env_prior": "uniform"})
    plain = training_args_key(CausalDPOConfig(output_dir=str(tmp_path)))
    assert plain == {k: v for k, v in before.items() if k not in ("tau_final", "env_prior")}
    assert training_args_key(CausalDPOConfig(output_dir=str(tmp_path), tau_final=0.01))["tau_final"] == 0.01
    assert (
        training_args_key(CausalDPOConfig(output_dir=str(tmp_path), env_prior="estimated"))["env_prior"] == "estimated"
    )


# ------------------------------------------------------------------------------- shared SFT stage
@pytest.mark.slow
def test_models_with_the_same_sft_settings_share_one_sft_stage(tmp_path, monkeypatch):
    genrec = _run("GenRec", tmp_path)
    (sft,) = genrec["stages"]
    assert not sft["reused"] and sft["global_step"] == 4
    assert sorted(p.name for p in Path(sft["directory"]).iterdir()) == [STAGE_WEIGHTS, STAGE_META]
    assert not list((tmp_path / "stages").glob("*.partial"))  # step checkpoints are gone once the stage is done

    from trl import SFTTrainer

    def no_training(*args, **kwargs):
        raise AssertionError("the SFT stage was trained again")

    monkeypatch.setattr(SFTTrainer, "train", no_training)
    # CausalDPO without environments in its prompts has GenRec's SFT settings
    for model, extra in (("SDPORec", {}), ("CausalDPO", {"env_source": "season", "prompt_environment": None})):
        result = _run(model, tmp_path, **extra)
        first, second = result["stages"]
        assert first["reused"] and first["directory"] == sft["directory"]
        assert first["valid_result"] == sft["valid_result"]  # re-evaluated from the loaded weights: identical
        assert second["stage"] == ("sdpo" if model == "SDPORec" else "causal_dpo") and not second["reused"]
        assert result["best_valid_score"] == second["valid_score"]  # the aligned model is the result
    # Another SFT setting is another stage: another seed, or CausalDPO's default season-conditioned prompts.
    monkeypatch.undo()
    changed = _run("GenRec", tmp_path, seed=7)
    assert not changed["stages"][0]["reused"] and changed["stages"][0]["key"] != sft["key"]
    causal = _run("CausalDPO", tmp_path)
    assert not causal["stages"][0]["reused"] and causal["stages"][0]["key"] != sft["key"]


@pytest.mark.slow
def test_a_damaged_cached_stage_is_a_checkpoint_error(tmp_path):
    first = _run("GenRec", tmp_path, tiny_hidden_size=8, tiny_heads=2)
    weights = Path(first["stages"][0]["directory"]) / STAGE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        _run("GenRec", tmp_path, tiny_hidden_size=8, tiny_heads=2)


# ----------------------------------------------------------------------------------- loss guard
@pytest.mark.slow
def test_nan_in_the_sft_loss_stops_naming_step_and_batch_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from trl import SFTTrainer

    real, calls = SFTTrainer.compute_loss, []

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    with pytest.raises(TrainingError) as caught:
        _run("GenRec", tmp_path, resume=True, resume_save_steps=1)
    message = str(caught.value)
    assert "SFT" in message and "global step 3" in message and "nan" in message
    assert "a customer bought" in message.lower() and "batch of 8 examples" in message
    (partial,) = (tmp_path / "stages").glob("sft-*.partial")
    kept = last_checkpoint(partial)
    assert kept == str(partial / "checkpoint-2") and kept in message
    from safetensors.torch import load_file

    weights = load_file(str(Path(kept) / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())  # the bad update was never applied
    assert not [p for p in (tmp_path / "stages").iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    assert not list(tmp_path.glob("*.pth"))  # no final RecBole checkpoint


@pytest.mark.slow
def test_inf_in_the_preference_loss_stops_with_the_step(tmp_path, monkeypatch):
    from causalrec.training import SDPOTrainer

    real, calls = SDPOTrainer.reduce_losses, []

    def poisoned(self, losses, batch):
        calls.append(1)
        loss = real(self, losses, batch)
        return loss + float("inf") if len(calls) == 2 else loss

    monkeypatch.setattr(SDPOTrainer, "reduce_losses", poisoned)
    with pytest.raises(TrainingError) as caught:
        _run("SDPORec", tmp_path)
    message = str(caught.value)
    assert message.startswith("S-DPO training stopped") and "global step 2" in message and "inf" in message
    assert "batch of 4 examples" in message and "no checkpoint of this stage was written" in message
    assert len(list((tmp_path / "stages").glob("sft-*/" + STAGE_WEIGHTS))) == 1  # the finished SFT stage is kept


# --------------------------------------------------------------------------------- kill and resume
KILL_CONFIG = {
    **TINY,
    "sft_args": {"max_steps": 24, "per_device_train_batch_size": 8, "learning_rate": 3e-3},
    "dpo_args": {"max_steps": 16, "per_device_train_batch_size": 4},
    "dpo_max_samples": 64,
    "env_source": "latent",
    "n_environments": 2,
    "resume_save_steps": 2,
}


# The child process: causalrec's CLI, with a kill switch that SIGKILLs it right after the first complete TRL
# checkpoint of the stage whose output folder matches argv[1] ("" = run to the end). Killing from inside, after
# the Trainer's on_save event (the checkpoint folder is complete then, the environment model's file included), is
# deterministic; a parent polling the folder could miss the window on a loaded machine.
KILL_SWITCH = """
import fnmatch, os, signal, sys
pattern, sys.argv = sys.argv[1], ["causalrec", *sys.argv[2:]]
if pattern:
    from transformers.trainer_callback import CallbackHandler
    on_save = CallbackHandler.on_save
    def save_then_die(self, args, state, control):
        control = on_save(self, args, state, control)
        if fnmatch.fnmatch(os.path.basename(args.output_dir), pattern):
            os.kill(os.getpid(), signal.SIGKILL)
        return control
    CallbackHandler.on_save = save_then_die
from causalrec.cli import main
sys.exit(main())
"""


def _cli_args(where: Path, kill_in: str) -> list[str]:
    args = [sys.executable, "-c", KILL_SWITCH, kill_in, "run", "--model", "CausalDPO", "--dataset", "retail-sim"]
    args += ["--resume", "--output", str(where / "result.json")]
    for key, value in {**KILL_CONFIG, "checkpoint_dir": str(where / "saved")}.items():
        args += ["-p", f"{key}={json.dumps(value)}"]
    return args


def _run_until(where: Path, kill_in: str | None, log: str) -> subprocess.CompletedProcess:
    """Run the CLI; it SIGKILLs itself after the first checkpoint of the stage folder matching ``kill_in``."""
    with open(where / log, "w") as out:
        return subprocess.run(
            _cli_args(where, kill_in or ""),
            cwd=where,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600,
        )


@pytest.mark.slow
def test_a_run_killed_in_sft_and_in_the_preference_stage_resumes_to_the_same_metrics(tmp_path):
    # The reference: the same run, uninterrupted, in another process (OMP_NUM_THREADS=1 in both).
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir(), kill_dir.mkdir()
    reference = _run_until(ref_dir, None, "ref.log")
    assert reference.returncode == 0, (ref_dir / "ref.log").read_text()[-3000:]
    expected = json.loads((ref_dir / "result.json").read_text())

    first = _run_until(kill_dir, "sft-*.partial", "first.log")
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed in SFT"
    assert not list((kill_dir / "saved" / "stages").glob(f"sft-*/{STAGE_META}"))  # SFT unfinished
    (kept,) = (kill_dir / "saved" / "stages").glob("sft-*.partial/checkpoint-*")
    assert kept.name == "checkpoint-2"  # killed at its first checkpoint (resume_save_steps 2)

    second = _run_until(kill_dir, "causal_dpo-*.partial", "second.log")
    log = (kill_dir / "second.log").read_text()
    assert second.returncode == -signal.SIGKILL, "the run ended before it could be killed in the preference stage"
    assert "stage sft: resuming from" in log and "checkpoint-" in log
    assert list((kill_dir / "saved" / "stages").glob(f"sft-*/{STAGE_META}"))  # SFT finished and stored

    third = _run_until(kill_dir, None, "third.log")
    log = (kill_dir / "third.log").read_text()
    assert third.returncode == 0, log[-3000:]
    assert "stage sft: loaded" in log and "stage causal_dpo: resuming from" in log
    result = json.loads((kill_dir / "result.json").read_text())
    assert result["test_result"] == expected["test_result"]
    assert result["best_valid_score"] == expected["best_valid_score"]
    assert [s["valid_score"] for s in result["stages"]] == [s["valid_score"] for s in expected["stages"]]
    assert all(math.isfinite(v) for v in result["test_result"].values())
    assert not list((kill_dir / "saved" / "stages").glob("*.partial"))
