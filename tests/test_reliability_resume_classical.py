"""Interruption of RecBole's classical models: last-epoch checkpoints, resume after SIGKILL, keys, damage.

A run with ``resume`` writes ``<checkpoint_dir>/<Model>-<key16>.last.pth`` after every epoch
(``causalrec.recbole.classical_trainer``); a rerun continues at the next epoch and ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import causalrec
from causalrec.errors import CheckpointError
from causalrec.recbole import classical_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPOCHS, KILL_AFTER = 5, 2
SMALL = {
    "sim_users": 150,
    "sim_items": 60,
    "epochs": EPOCHS,
    "show_progress": False,
    "env_metrics": False,
    "num_threads": 1,
}
MODELS = {
    "BPR": {},  # negatives from numpy's global RNG, shuffling from the loader's generator
    "SASRec": {
        "hidden_size": 16,
        "inner_size": 32,
        "n_layers": 1,
        "n_heads": 1,
        "MAX_ITEM_LIST_LENGTH": 20,
        "train_batch_size": 256,
    },  # dropout from torch's RNG; its best epoch is not its last
}

# The run to interrupt, in its own process: SIGKILL as soon as the checkpoint of epoch KILL_AFTER is on disk.
KILLED_RUN = """
import json, os, signal, sys
import causalrec
from causalrec.recbole.classical_trainer import EpochCheckpoints
write, kill_after = EpochCheckpoints._write_last_epoch, int(sys.argv[3])
def write_then_die(self, epoch, finished):
    write(self, epoch, finished)
    if epoch == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
EpochCheckpoints._write_last_epoch = write_then_die
causalrec.run(sys.argv[1], "retail-sim", config_dict=json.loads(sys.argv[2]), resume=True)
"""


def _config(model: str, where: Path, **extra) -> dict:
    return {**SMALL, **MODELS[model], "checkpoint_dir": str(where), **extra}


def _best_file(where: Path) -> dict:
    """RecBole's saved best model of a run (its checkpoint_dir holds one; the last-epoch file is gone)."""
    (path,) = [p for p in glob.glob(str(where / "*.pth")) if not p.endswith(classical_trainer.SUFFIX)]
    return torch.load(path, map_location="cpu", weights_only=False)  # a file this test's runs wrote


def _last_epoch_files(where: Path) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(where / f"*{classical_trainer.SUFFIX}")))


@pytest.mark.slow
def test_a_classical_run_killed_between_epochs_resumes_to_the_same_result(in_tmp, caplog):
    killed = {}
    for model in MODELS:  # both interrupted runs at once, while the references train here
        (in_tmp / model).mkdir()
        with open(in_tmp / model / "killed.log", "w") as out:
            killed[model] = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    KILLED_RUN,
                    model,
                    json.dumps(_config(model, in_tmp / model / "saved")),
                    str(KILL_AFTER),
                ],
                cwd=in_tmp / model,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
    for model, proc in killed.items():
        # The reference: the same settings, uninterrupted and without resume (which then writes no extra file).
        expected = causalrec.run(model, "retail-sim", config_dict=_config(model, in_tmp / model / "ref"))
        assert "epochs" not in expected and _last_epoch_files(in_tmp / model / "ref") == []
        reference = _best_file(in_tmp / model / "ref")

        proc.wait(timeout=300)
        log = (in_tmp / model / "killed.log").read_text()
        assert proc.returncode == -signal.SIGKILL, log[-3000:]
        assert f"epoch {KILL_AFTER} training" in log and f"epoch {KILL_AFTER + 1} training" not in log
        saved = in_tmp / model / "saved"
        (last,) = _last_epoch_files(saved)
        # what `compare --report-only` says of the stopped run, against the killed run's own log (RecBole keeps the
        # latest of equal best scores)
        scores = [float(v) for v in re.findall(r"valid_score\W+([0-9.]+)", re.sub(r"\x1b\[[0-9;]*m", "", log))]
        best = max(range(len(scores)), key=lambda e: (scores[e], e))
        assert len(scores) == KILL_AFTER + 1 and classical_trainer.run_progress(saved) == (
            f"epoch {KILL_AFTER} of at most {EPOCHS} saved; best validation {scores[best]:.4f} at epoch {best}, "
            f"{KILL_AFTER - best} epochs without improvement"
        )

        caplog.clear()
        with caplog.at_level(logging.INFO):
            result = causalrec.run(model, "retail-sim", config_dict=_config(model, saved), resume=True)
        assert f"continues after epoch {KILL_AFTER} (of {EPOCHS})" in caplog.text
        assert f"epoch {KILL_AFTER} training" not in caplog.text  # finished epochs are not trained again
        assert result["epochs"] == {
            "trained": EPOCHS - KILL_AFTER - 1,
            "resumed_from": KILL_AFTER,
            "last": EPOCHS - 1,
            "best": reference["epoch"],
        }
        assert result["test_result"] == expected["test_result"]
        assert result["best_valid_score"] == expected["best_valid_score"]
        assert result["best_valid_result"] == expected["best_valid_result"]
        best = _best_file(saved)  # the model load_best_model tested: bitwise the reference's best model
        assert best["epoch"] == reference["epoch"]
        assert best["state_dict"].keys() == reference["state_dict"].keys()
        assert all(torch.equal(best["state_dict"][k], reference["state_dict"][k]) for k in best["state_dict"])
        assert _last_epoch_files(saved) == []  # removed once the test result exists
        assert last.startswith(f"{model}-")
        if model == "SASRec":  # its best model is an earlier epoch's: restored from the checkpoint, not retrained
            assert reference["epoch"] < EPOCHS - 1


class _Killed(BaseException):
    """Stands in for a kill inside this process (not an Exception: nothing may catch it)."""


def _interrupt_after(monkeypatch, epoch: int, at_the_end: bool = False) -> None:
    write = classical_trainer.EpochCheckpoints._write_last_epoch

    def write_then_die(self, done, finished):
        write(self, done, finished)
        if done == epoch and finished == at_the_end:
            raise _Killed

    monkeypatch.setattr(classical_trainer.EpochCheckpoints, "_write_last_epoch", write_then_die)


def test_other_settings_no_resume_a_finished_training_an_earlier_best_and_a_damaged_checkpoint(
    in_tmp, monkeypatch, caplog
):
    where = in_tmp / "saved"
    config = _config("BPR", where)
    expected = causalrec.run("BPR", "retail-sim", config_dict={**config, "checkpoint_dir": str(in_tmp / "ref")})

    _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Killed):
        causalrec.run("BPR", "retail-sim", config_dict=config, resume=True)
    monkeypatch.undo()
    (left,) = _last_epoch_files(where)

    # Other settings (another seed) never resume it: they train from epoch 0 and say why.
    with caplog.at_level(logging.INFO):
        other = causalrec.run("BPR", "retail-sim", config_dict={**config, "seed": 7}, resume=True)
    assert other["epochs"]["trained"] == EPOCHS and other["epochs"]["resumed_from"] is None
    assert "of other settings" in caplog.text and left in caplog.text
    # Without resume the run is RecBole's: all epochs, no last-epoch file; the leftover one is kept.
    plain = causalrec.run("BPR", "retail-sim", config_dict=config)
    assert plain["test_result"] == expected["test_result"] and "epochs" not in plain
    assert _last_epoch_files(where) == [left]

    # The key: operational settings (progress bars, batch size of evaluation, where files go) are not in it,
    # hyper-parameters are.
    def key(**extra):
        return classical_trainer.training_key(_recbole_config({**config, **extra}), _trainer_class("BPR"))[0]

    assert left == f"BPR-{key()[:16]}{classical_trainer.SUFFIX}"
    assert key() == key(show_progress=True, eval_batch_size=128, checkpoint_dir=str(in_tmp / "elsewhere"))
    assert key() != key(learning_rate=0.01)
    # A key added after a checkpoint was written, at its default, leaves the key as it was (the checkpoint
    # resumes); set away from its default it is in the key.
    before = _recbole_config(config)
    del before.final_config_dict["history_environments"]
    assert key() == classical_trainer.training_key(before, _trainer_class("BPR"))[0]
    assert key() != key(history_environments=True)

    # Killed after training finished, during the test: the rerun trains nothing and gives the same result.
    _interrupt_after(monkeypatch, EPOCHS - 1, at_the_end=True)
    with pytest.raises(_Killed):
        causalrec.run("BPR", "retail-sim", config_dict=config, resume=True)
    monkeypatch.undo()
    assert classical_trainer.run_progress(where).startswith(
        f"epoch {EPOCHS - 1} of at most {EPOCHS} saved, training finished (the test had not run); best validation"
    )
    again = causalrec.run("BPR", "retail-sim", config_dict=config, resume=True)
    assert classical_trainer.run_progress(where) is None  # no last-epoch file left: nothing to say
    assert again["epochs"]["trained"] == 0 and again["epochs"]["resumed_from"] == EPOCHS - 1
    assert again["test_result"] == expected["test_result"] and _last_epoch_files(where) == []

    # The best model is a checkpoint's own (epoch 0) and the resumed epoch 1 does not beat it: through two
    # interruptions the tested model must stay the one of epoch 0, not become the last weights.
    two = {**config, "epochs": 2}
    expected_two = causalrec.run("BPR", "retail-sim", config_dict={**two, "checkpoint_dir": str(in_tmp / "ref2")})
    assert _best_file(in_tmp / "ref2")["epoch"] == 0, "the scenario needs BPR's epoch 1 not to improve on epoch 0"
    for epoch, at_the_end in ((0, False), (1, True)):
        _interrupt_after(monkeypatch, epoch, at_the_end)
        with pytest.raises(_Killed):
            causalrec.run("BPR", "retail-sim", config_dict=two, resume=True)
        monkeypatch.undo()
    for path in glob.glob(str(where / "BPR-*.pth")):  # the best model comes from the checkpoint, not RecBole's file
        if not path.endswith(classical_trainer.SUFFIX):
            os.unlink(path)
    resumed = causalrec.run("BPR", "retail-sim", config_dict=two, resume=True)
    assert resumed["epochs"] == {"trained": 0, "resumed_from": 1, "last": 1, "best": 0}
    assert resumed["test_result"] == expected_two["test_result"]
    assert resumed["best_valid_result"] == expected_two["best_valid_result"]

    # A damaged checkpoint is a CheckpointError that says what to do, not a traceback from torch.
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Killed):
        causalrec.run("BPR", "retail-sim", config_dict=config, resume=True)
    monkeypatch.undo()
    path = where / left
    path.write_bytes(path.read_bytes()[:1000])
    assert classical_trainer.run_progress(where).startswith("its last-epoch checkpoint cannot be read (")
    with pytest.raises(CheckpointError, match=f"truncated.*delete {re.escape(str(path))}$"):
        causalrec.run("BPR", "retail-sim", config_dict=config, resume=True)


def test_a_run_that_ran_out_of_epochs_before_its_early_stopping_says_so(in_tmp, caplog):
    base = {**SMALL, "checkpoint_dir": str(in_tmp)}
    with caplog.at_level(logging.WARNING, logger="causalrec.recbole.quick_start"):
        capped = causalrec.run("BPR", "retail-sim", config_dict={**base, "epochs": 3, "stopping_step": 10})
    cap = capped["epoch_cap"]
    assert (cap["epochs"], cap["stopping_step"]) == (3, 10) and 0 <= cap["evaluations_since_best"] <= 2
    assert "BPR ran all 3 epochs without its early stopping firing (stopping_step 10" in caplog.text
    # patience 1 over 200 epochs: two evaluations without improvement stop it long before the cap
    stopped = causalrec.run("BPR", "retail-sim", config_dict={**base, "epochs": 200, "stopping_step": 1})
    assert "epoch_cap" not in stopped
    assert "epoch_cap" not in causalrec.run("Pop", "retail-sim", config_dict=base)  # one epoch: nothing to converge


def _recbole_config(config: dict):
    from causalrec.recbole.quick_start import make_config

    return make_config("BPR", "retail-sim", config_dict=config)


def _trainer_class(model: str) -> type:
    from recbole.utils import ModelType, get_trainer

    return get_trainer(ModelType.GENERAL, model)
