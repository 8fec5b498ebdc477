"""The command line: clear one-line errors with exit code 2, and a working run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def causalrec(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "causalrec", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def env_with_bars() -> dict[str, str]:
    """This environment without tqdm's overrides (tests elsewhere in the process turn tqdm off), so that a test of
    ``--no-progress`` sees every bar the command would draw."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["run", "--model", "SASRecc", "--dataset", "ml-100k"],
            ["unknown model 'SASRecc'", "Did you mean 'SASRec'", "BPR"],
        ),
        (["run", "--model", "Pop", "--dataset", "nowhere"], ["unknown dataset 'nowhere'", "retail-sim"]),
        (
            ["run", "--model", "Pop", "--dataset", "ml-100k", "--param", "epochz=1"],
            ["unknown config key 'epochz'", "Did you mean 'epochs'"],
        ),
        (
            ["run", "--model", "Pop", "--dataset", "ml-100k", "--config-files", "missing.yaml"],
            ["cannot read config file 'missing.yaml'"],
        ),
        (
            ["run", "--model", "Pop", "--dataset", "ml-100k", "--config-files", "bad.yaml"],
            ["bad.yaml' is not valid YAML"],
        ),
        (["run", "--model", "Pop", "--dataset", "ml-100k", "--param", "novalue"], ["--param expects key=value"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, expected, tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2\n")
    out = causalrec(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("causalrec: error:"), out.stderr
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in out.stderr


def test_run_from_cli_with_config_file(tmp_path):
    (tmp_path / "small.yaml").write_text("epochs: 1\n")
    out = causalrec(
        "run",
        "--model",
        "Pop",
        "--dataset",
        "ml-100k",
        "--config-files",
        "small.yaml",
        "--param",
        "topk=[5,10]",
        "--output",
        "result.json",
        "--no-progress",
        cwd=tmp_path,
        env=env_with_bars(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ndcg@5=" in out.stdout and "ndcg@10=" in out.stdout
    assert (tmp_path / "result.json").is_file()
    assert "%|" not in out.stderr  # --no-progress: RecBole's training and evaluation bars stay off


def test_data_prepare_and_stats(tmp_path):
    env_cache = {"CAUSALREC_CACHE": str(tmp_path / "cache")}
    import os

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "causalrec", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env_cache},
        )

    out = run("data", "prepare", "--dataset", "retail-sim", "--split", "seasonal", "-p", "sim_users=150")
    assert out.returncode == 0, out.stderr[-2000:]
    folder = Path(out.stdout.split("prepared retail-sim at ")[1].splitlines()[0])
    assert (folder / "retail-sim.seq_test.inter").is_file() and "shift evidence" in out.stdout
    stats = run("data", "stats", "--dataset", "retail-sim", "-p", "sim_users=150")
    assert stats.returncode == 0 and "users" in stats.stdout and "sparsity" in stats.stdout
    bad = run(
        "data",
        "prepare",
        "--dataset",
        "csv",
        "--source",
        "missing.csv",
        "--user",
        "u",
        "--item",
        "i",
        "--time",
        "t",
        "--split",
        "iid",
    )
    assert bad.returncode == 3 and bad.stderr.strip().startswith("causalrec: error:") and "missing.csv" in bad.stderr
    assert not (tmp_path / "cache" / "csv").exists() or not any((tmp_path / "cache" / "csv").rglob("*.inter"))


def test_one_module_per_command():
    from causalrec.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == ["run", "data", "keys", "compare", "tune", "headroom", "check"]
    data = next(a for a in sub.choices["data"]._actions if a.dest == "data_command")
    commands = {
        **{n: p for n, p in sub.choices.items() if n != "data"},
        **{f"data {n}": p for n, p in data.choices.items()},
    }
    for name, parser in commands.items():
        module = parser.get_default("func").__module__
        assert module == "causalrec.cli." + {"keys": "run"}.get(name, name.split()[0]), (name, module)


TINY_LLM_YAML = """\
sim_users: 120
sim_items: 60
env_metrics: false
tiny_hidden_size: 16
tiny_layers: 1
sft_args: {max_steps: 2, per_device_train_batch_size: 16}
dpo_args: {max_steps: 2, per_device_train_batch_size: 16}
dpo_max_samples: 32
stage_cache: false
"""


def test_run_no_progress_silences_the_llm_stages_bars_too(tmp_path):
    """TRL's SFT and DPO stages map their data sets with Hugging Face ``datasets``, whose bars have their own switch."""
    (tmp_path / "tiny.yaml").write_text(TINY_LLM_YAML)
    out = causalrec(
        "run",
        "--model",
        "SDPORec",
        "--config-files",
        "tiny.yaml",
        "--no-save",
        "--no-progress",
        cwd=tmp_path,
        env=env_with_bars(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stage sdpo (trained" in out.stdout
    assert "%|" not in out.stderr, [line for line in out.stderr.splitlines() if "%|" in line][:3]
