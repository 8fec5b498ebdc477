"""Damaged checkpoints are told apart from untrusted ones by inspecting the file (issue #21).

A damaged file (truncated, random bytes, a corrupt zip member, a bad safetensors header) is a ``CheckpointError``
that names the file and says what to delete or retrain, never a traceback and never advice to trust it; a valid
RecBole checkpoint holding globals outside the allow-list is "untrusted" and only that message mentions
``CAUSALREC_TRUST_CHECKPOINTS=1``. No training: every file is written directly.
"""

from __future__ import annotations

import fractions
import json
import os
import re
from pathlib import Path

import pytest
import torch

from causalrec.errors import CheckpointError
from causalrec.recbole import checkpoints
from causalrec.recbole.checkpoints import TRUST_ENV, load_recbole_checkpoint
from causalrec.training.stage_cache import STAGE_WEIGHTS, last_checkpoint, load_stage, save_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state() -> dict:
    torch.manual_seed(0)
    return {"state_dict": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "epoch": 3, "other_parameter": None}


def _damage(data: bytes, how: str) -> bytes:
    if how == "head":
        return data[:2000]
    if how == "half":
        return data[: len(data) // 2]
    if how == "tail":
        return data[:-30]
    if how == "empty":
        return b""
    if how == "random":
        return os.urandom(5000)
    if how == "flipped":  # a bit flip inside the first data record: torch itself would load it without noticing
        start = data.find(b"data/0") + 200
        return data[:start] + bytes(b ^ 0xFF for b in data[start : start + 64]) + data[start + 64 :]
    raise ValueError(how)


def _damaged_message(err: CheckpointError, path: Path) -> str:
    message = str(err)
    assert repr(str(path)) in message, message
    assert TRUST_ENV not in message and "trusted_torch_load" not in message, message
    assert "missing, truncated or not a RecBole checkpoint" in message and "delete it" in message, message
    return message


# --------------------------------------------------------------------------------- (1) RecBole checkpoints
@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted-env", "trusted-env"])
def test_a_damaged_recbole_checkpoint_is_damaged_not_untrusted_even_with_the_trust_variable(
    tmp_path, monkeypatch, trusted
):
    if trusted:
        monkeypatch.setenv(TRUST_ENV, "1")
    good = tmp_path / "good.pth"
    torch.save(_state(), good, pickle_protocol=2)
    assert torch.equal(load_recbole_checkpoint(torch.load, good)["state_dict"]["w"], _state()["state_dict"]["w"])
    legacy = tmp_path / "legacy.pth"  # torch's pre-zip format: pickles followed by the raw data records
    torch.save(_state(), legacy, _use_new_zipfile_serialization=False)
    assert load_recbole_checkpoint(torch.load, legacy)["epoch"] == 3
    data, old = good.read_bytes(), legacy.read_bytes()
    cases = {how: _damage(data, how) for how in ("half", "tail", "random", "flipped", "head", "empty")}
    cases["legacy-data"] = old[:-100]  # the pickles are whole, a data record is cut short
    cases["legacy-pickle"] = old[:40]
    for how, content in cases.items():
        path = tmp_path / f"{how}.pth"
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as caught:
            load_recbole_checkpoint(torch.load, path, map_location="cpu")
        _damaged_message(caught.value, path)
    missing = tmp_path / "none.pth"
    with pytest.raises(CheckpointError, match="does not exist") as caught:
        load_recbole_checkpoint(torch.load, missing)
    _damaged_message(caught.value, missing)


def test_only_a_valid_checkpoint_with_foreign_globals_is_untrusted(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign.pth"
    torch.save({**_state(), "other_parameter": fractions.Fraction(1, 3)}, foreign, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="cannot be read safely") as caught:
        load_recbole_checkpoint(torch.load, foreign)
    assert f"{TRUST_ENV}=1" in str(caught.value) and repr(str(foreign)) in str(caught.value)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_recbole_checkpoint(torch.load, foreign)["other_parameter"] == fractions.Fraction(1, 3)
    # Damaged after it was written: the damaged error, trusted or not, and no traceback from the full unpickler.
    foreign.write_bytes(foreign.read_bytes()[:-50])
    for env in ("1", ""):
        monkeypatch.setenv(TRUST_ENV, env)
        with pytest.raises(CheckpointError) as caught:
            load_recbole_checkpoint(torch.load, foreign)
        _damaged_message(caught.value, foreign)


def test_a_programming_error_in_the_loader_is_not_reported_as_untrusted(tmp_path, monkeypatch):
    good = tmp_path / "good.pth"
    torch.save(_state(), good, pickle_protocol=2)

    def broken_allow_list():
        raise NameError("name 'Config' is not defined")  # the import bug that once made every file "untrusted"

    monkeypatch.setattr(checkpoints, "_checkpoint_allow_list", broken_allow_list)
    with pytest.raises(NameError):
        load_recbole_checkpoint(torch.load, good)
    monkeypatch.undo()

    def bad_load(*args, **kwargs):
        raise TypeError("load() got an unexpected keyword argument")

    with pytest.raises(TypeError):
        load_recbole_checkpoint(bad_load, good)


# ------------------------------------------------------------------------ (2) backbone and stage weights
def _tiny_backbone(where: Path) -> Path:
    from test_llm_bpe import random_model, train_bpe, wrap

    tok = wrap(
        train_bpe(["red wool hat", "blue cotton shirt", "season winter region north"] * 4, vocab_size=300),
        "qwen",
        pad=False,
    )
    random_model(tok, "qwen", hidden=48, layers=1, sharpen=False).save_pretrained(where)
    tok.save_pretrained(where)
    return where


def test_a_corrupt_backbone_model_safetensors_is_a_checkpoint_error(tmp_path):
    from causalrec.llm.backbone import BackboneConfig, load_backbone

    where = _tiny_backbone(tmp_path / "qwen")
    cfg = BackboneConfig(backbone=str(where), device="cpu")
    load_backbone(cfg)  # intact: loads
    weights = where / "model.safetensors"
    data = weights.read_bytes()
    for content in (os.urandom(3000), data[: len(data) // 2], data[:-10], data[:50], b""):
        weights.write_bytes(content)
        with pytest.raises(CheckpointError) as caught:
            load_backbone(cfg)
        message = str(caught.value)
        assert str(weights) in message and "download" in message and str(where) in message, message


def test_a_corrupt_lora_adapter_of_a_saved_backbone_is_a_checkpoint_error(tmp_path):
    from causalrec.llm.backbone import BackboneConfig, load_backbone, save_backbone

    base = _tiny_backbone(tmp_path / "base")
    model, tok = load_backbone(BackboneConfig(backbone=str(base), device="cpu", lora_r=2))
    saved = save_backbone(model, tok, tmp_path / "saved")
    (adapter,) = (saved / "adapter").glob("*.safetensors")
    adapter.write_bytes(adapter.read_bytes()[:-16])
    with pytest.raises(CheckpointError) as caught:
        load_backbone(BackboneConfig(backbone=str(saved), device="cpu", lora_r=2))
    assert str(adapter) in str(caught.value)


def test_a_corrupt_stage_model_safetensors_is_a_checkpoint_error(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    save_stage(tmp_path / "sft", module, {"key": "k" * 64})
    weights = tmp_path / "sft" / STAGE_WEIGHTS
    data = weights.read_bytes()
    for content in (os.urandom(500), data[:-8], data[:30]):
        weights.write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(str(weights))) as caught:
            load_stage(tmp_path / "sft", module)
        assert f"delete {str(tmp_path / 'sft')!r}" in str(caught.value)


# --------------------------------------------------------------------------- (3) TRL resume checkpoints
def _step_checkpoint(folder: Path, step: int) -> Path:
    """What transformers writes into ``checkpoint-N/`` (weights, optimizer, scheduler, RNG), at toy size."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(step)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_file({"lora_A": torch.randn(2, 8)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2}))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save({"python": [1, 2, 3], "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "model.safetensors",
        "adapter_model.safetensors",
        "adapter_config.json",
    ],
)
def test_a_damaged_resume_checkpoint_is_a_checkpoint_error_naming_the_folder_to_delete(tmp_path, name):
    earlier = _step_checkpoint(tmp_path / "checkpoint-2", 2)
    newest = _step_checkpoint(tmp_path / "checkpoint-4", 4)
    assert last_checkpoint(tmp_path) == str(newest)  # intact: resumes from the newest
    damaged = newest / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(CheckpointError) as caught:
        last_checkpoint(tmp_path)
    message = str(caught.value)
    assert str(damaged) in message and f"delete {str(newest)!r}" in message, message
    assert str(earlier) in message and TRUST_ENV not in message, message  # where the run resumes once it is gone
    import shutil

    shutil.rmtree(newest)  # what the message says to do
    assert last_checkpoint(tmp_path) == str(earlier)
    # The only checkpoint damaged: the message says the stage starts over.
    (earlier / "optimizer.pt").write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError, match="start of the stage"):
        last_checkpoint(tmp_path)


def test_a_resume_checkpoint_cut_short_is_still_skipped(tmp_path):
    """A kill while transformers saves leaves a checkpoint without a whole ``trainer_state.json`` (written last):
    that is an interrupted save, not damage, and is skipped as before."""
    earlier = _step_checkpoint(tmp_path / "checkpoint-2", 2)
    cut = _step_checkpoint(tmp_path / "checkpoint-4", 4)
    (cut / "trainer_state.json").write_text('{"global_st')
    (cut / "optimizer.pt").write_bytes(b"")  # written in place, in any state
    assert last_checkpoint(tmp_path) == str(earlier)


def test_a_real_sft_checkpoint_passes_and_a_damaged_one_stops_the_resume(tmp_path):
    """End to end through ``run_sft`` (two optimizer steps of a tiny model): transformers' own checkpoint files pass
    the check; with a truncated ``optimizer.pt`` the resume stops before training, and once the folder named in the
    message is deleted it resumes from the earlier checkpoint."""
    import shutil

    from causalrec.llm.backbone import BackboneConfig, load_backbone
    from causalrec.training.sft import build_sft_config, make_sft_dataset, run_sft

    prompts = [f"a customer bought item {i} then" for i in range(8)]
    completions = [f"item {i + 1}" for i in range(8)]
    cfg = BackboneConfig(tiny_hidden_size=16, tiny_layers=1, device="cpu")

    def sft(resume, max_steps: int):
        model, tok = load_backbone(cfg, prompts + completions)
        args = build_sft_config(
            str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=1,
            save_total_limit=2,
            disable_tqdm=True,
            logging_strategy="no",
        )
        return run_sft(model, tok, make_sft_dataset(prompts, completions), args, resume_from_checkpoint=resume)

    sft(None, 2)
    newest, earlier = tmp_path / "checkpoint-2", tmp_path / "checkpoint-1"
    assert last_checkpoint(tmp_path) == str(newest)  # every file transformers/TRL wrote passes
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    for resume in (True, str(newest)):
        with pytest.raises(CheckpointError, match=re.escape(f"delete {str(newest)!r}")) as caught:
            sft(resume, 3)
        assert str(optimizer) in str(caught.value)
        assert resume is not True or f"resumes from the previous checkpoint {str(earlier)!r}" in str(caught.value)
    shutil.rmtree(newest)
    assert sft(True, 2).state.global_step == 2  # resumed from checkpoint-1 and trained step 2
