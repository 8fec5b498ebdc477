"""Fail before the work (issue #21): every setting, folder and input checked before data or training.

Each case was a traceback or a late failure before the preflight existed: an unwritable --output lost a finished
run's result, a valid_metric typo failed after the first epoch, TRL-stage settings (NaN or negative learning
rates, beta .inf, null) failed after SFT or silently became TRL's defaults. None of these tests trains a model
except the NaN-guard and --no-save ones (tiny, seconds).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

import causalrec
from causalrec.errors import CausalRecError, ConfigError, DataError, PreflightError, TrainingError
from causalrec.recbole.preflight import preflight, probe_writable, resolve_nulls

SMALL = {"sim_users": 150, "sim_items": 60, "show_progress": False}
TINY = {
    **SMALL,
    "split": "seasonal",
    "tiny_hidden_size": 16,
    "tiny_layers": 1,
    "sft_args": {"max_steps": 2, "per_device_train_batch_size": 8},
    "dpo_args": {"max_steps": 2, "per_device_train_batch_size": 4},
    "dpo_max_samples": 32,
    "validate_stages": "last",
}


def problems(model, params, **kwargs) -> list[str]:
    with pytest.raises(CausalRecError) as caught:
        preflight(model, "retail-sim", params, **kwargs)
    return [str(p) for p in getattr(caught.value, "problems", [caught.value])]


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "causalrec", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


# ------------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize(
    "params, expected",
    [
        ({"dpo_args": {"learning_rate": float("nan")}}, "dpo_args: learning_rate must be a finite number"),
        ({"dpo_args": {"learning_rate": -1e-4}}, "dpo_args: learning_rate must be > 0"),
        ({"sft_args": {"learning_rate": float("inf")}}, "sft_args: learning_rate must be a finite number"),
        ({"beta": float("inf")}, "config key 'beta' must be a finite number"),
        ({"lambda_inv": -1.0}, "lambda_inv must be >= 0"),
        ({"valid_metric": "NDGC@10"}, "Did you mean 'NDCG@10'"),
        ({"valid_metric": "NDCG@5"}, "the cut-off @5 is not in topk [10, 20]"),
        ({"metrics": ["Recall", "NDCGG"], "valid_metric": "Recall@10"}, "unknown metric 'NDCGG'"),
        ({"dpo_args": {"bogus": 1}}, "unknown CausalDPOConfig key(s) ['bogus']"),
        ({"validate_stages": "best", "stage_cache": False}, "validate_stages: best reloads the chosen stage"),
        ({"tiny_dropout": 1.5}, "tiny_dropout must be in [0, 1); got 1.5"),  # the backbone's own rules, up front
        ({"tiny_heads": 3}, "tiny_heads (3) must divide tiny_hidden_size (64)"),
    ],
)
def test_bad_settings_are_found_before_any_data(params, expected):
    found = problems("CausalDPO", params)
    assert any(expected in p for p in found), found


def test_every_problem_is_listed_at_once_with_the_first_kinds_exit_code(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PreflightError) as caught:
        preflight("CausalDPO", "retail-sim", {"valid_metric": "NDGC@10", "epochz": 1}, output=blocker / "out.json")
    err = caught.value
    assert err.exit_code == 2 and len(err.problems) == 3  # the unknown key, the metric, the output folder
    assert "unknown config key 'epochz'" in str(err) and "valid_metric" in str(err) and "a-file" in str(err)
    assert str(err).startswith("3 problems found before any work started:")
    with pytest.raises(PreflightError) as caught:  # keys valid: now the folders are probed
        preflight("CausalDPO", "retail-sim", {"dpo_args": {"learning_rate": float("nan")}}, output=blocker / "out.json")
    found = [str(p) for p in caught.value.problems]
    assert len(found) == 2 and "cannot be written" in found[1] and "a-file" in found[1]


def test_null_means_the_default_not_the_librarys():
    assert resolve_nulls({"beta": None, "prompt_environment": None, "lora_r": None}) == {
        "prompt_environment": None,
        "lora_r": None,
    }  # None is a setting of its own for these two
    import tempfile

    from causalrec.recbole import stage_args
    from causalrec.recbole.preflight import _merged_settings

    settings = _merged_settings("SDPORec", "retail-sim", resolve_nulls({"beta": None}))
    with tempfile.TemporaryDirectory() as tmp:
        config = stage_args.alignment_config(settings, {}, causalrec.recbole.plugin.model_class("SDPORec"), tmp)
    assert config.beta == 1.0  # SDPORec.yaml's beta, not TRL's 0.1


def test_probe_makes_folders_and_a_failed_preflight_removes_them(tmp_path):
    from causalrec.recbole.preflight import remove_created

    created = []
    target = tmp_path / "new" / "deeper"
    assert probe_writable(target, "x", created) is None and target.is_dir() and not list(target.iterdir())
    assert probe_writable(target, "x", created) is None  # a second process of the launch: no error
    remove_created(created)
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("")
    problem = probe_writable(tmp_path / "f" / "sub", "checkpoint_dir")
    assert isinstance(problem, ConfigError) and "checkpoint_dir" in str(problem)


def test_probe_survives_another_process_removing_the_parent_it_just_made(tmp_path, monkeypatch):
    # compare --jobs: a finishing cell removes the shared, empty checkpoints/ folder while another cell's probe is
    # between making it and making its own folder inside it
    target = tmp_path / "checkpoints" / "cell"
    mkdir = Path.mkdir
    raced = []

    def racing_mkdir(self, *args, **kwargs):
        if self == target and not raced:
            raced.append(True)
            self.parent.rmdir()  # the other process's cleanup, just before our mkdir
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    assert probe_writable(target, "checkpoint_dir") is None
    assert raced and target.is_dir()


def test_input_files_are_opened_up_front(tmp_path):
    with pytest.raises(DataError) as caught:
        preflight(
            "BPR",
            "csv",
            {"source": str(tmp_path), "csv_user": "u", "csv_item": "i", "csv_time": "t"},
            probe_folders=False,
        )
    assert "is a folder" in str(caught.value) and caught.value.exit_code == 3
    with pytest.raises(DataError) as caught:
        preflight(
            "BPR",
            "csv",
            {"source": str(tmp_path / "missing.csv"), "csv_user": "u", "csv_item": "i", "csv_time": "t"},
            probe_folders=False,
        )
    assert "does not exist" in str(caught.value)


# --------------------------------------------------------------------------- what needs the data, before training
def test_topk_beyond_the_catalog_and_too_many_environments_fail_before_training(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="topk \\[100\\] exceeds the catalog"):
        causalrec.run("Pop", "retail-sim", config_dict={**SMALL, "topk": [10, 100], "checkpoint_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="n_environments 100000 exceeds the 32 rows"):
        causalrec.run(
            "CausalDPO",
            "retail-sim",
            config_dict={**TINY, "env_source": "latent", "n_environments": 100000, "checkpoint_dir": str(tmp_path)},
        )
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.pth"))  # nothing trained
    assert time.perf_counter() - start < 60


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_unwritable_output_fails_before_training_exit_2(tmp_path):
    (tmp_path / "a-file").write_text("")
    start = time.perf_counter()
    out = cli(
        "run",
        "--model",
        "Pop",
        "--dataset",
        "retail-sim",
        "--param",
        "sim_users=150",
        "--param",
        "sim_items=60",
        "--output",
        "a-file/result.json",
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert "cannot be written" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "saved").exists() and not (tmp_path / "log").exists()
    assert time.perf_counter() - start < 60


def test_cli_lists_every_problem_and_exits_with_the_first_kinds_code(tmp_path):
    out = cli(
        "run",
        "--model",
        "GenRec",
        "--dataset",
        "csv",
        "--param",
        f"source={tmp_path}",
        "--param",
        "valid_metric=NDGC@10",
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert "Did you mean 'NDCG@10'" in out.stderr and "Traceback" not in out.stderr


# -------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_first_step_non_finite_loss_names_the_loss_setting_not_the_learning_rate(tmp_path):
    with pytest.raises(TrainingError) as caught:
        causalrec.run("SDPORec", "retail-sim", config_dict={**TINY, "beta": 1e300, "checkpoint_dir": str(tmp_path)})
    message = str(caught.value)
    assert "global step 1" in message and "before any update" in message and "beta=1e+300" in message


@pytest.mark.slow
def test_an_update_that_overflows_the_weights_is_refused(tmp_path):
    with pytest.raises(TrainingError) as caught:
        causalrec.run(
            "GenRec",
            "retail-sim",
            config_dict={
                **TINY,
                "sft_args": {"max_steps": 1, "learning_rate": 1e38, "per_device_train_batch_size": 8},
                "checkpoint_dir": str(tmp_path),
            },
        )
    message = str(caught.value)
    assert "non-finite" in message and "learning_rate=1e+38" in message
    assert not list(tmp_path.rglob("*.pth"))


@pytest.mark.slow
def test_no_save_leaves_no_stages_behind(tmp_path):
    result = causalrec.run(
        "GenRec", "retail-sim", config_dict={**TINY, "checkpoint_dir": str(tmp_path / "saved")}, saved=False
    )
    assert math.isfinite(result["test_result"]["ndcg@10"])
    assert not (tmp_path / "saved" / "stages").exists() and not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("name", ["bpr", "lightgcn", "genrec", "sdporec", "causaldpo"])
def test_shipped_tuned_configs_pass_the_preflight_for_their_model(name):
    """tuning/tuned/retail-sim-seasonal/<model>.yaml (an equal-budget study's best.yaml) names its model in its
    first line and holds only keys and values the preflight accepts for that model."""
    from pathlib import Path

    from causalrec.recbole.preflight import read_config_files, validate

    path = Path(__file__).resolve().parents[1] / "tuning" / "tuned" / "retail-sim-seasonal" / f"{name}.yaml"
    model = path.read_text().split("Optuna study '")[1].split("-")[0]
    assert model.lower() == name
    params = read_config_files([path])
    assert params["split"] == "seasonal"
    validate(model, "retail-sim", resolve_nulls(params))
