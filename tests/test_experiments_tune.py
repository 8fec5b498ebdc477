"""``causalrec tune``: pruning, failed trials, resume, two workers on one journal, the exported YAML."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import optuna
import pytest
import yaml

import causalrec
from causalrec.errors import ConfigError
from causalrec.experiments.space import SearchSpace
from causalrec.experiments.tune import budget_used

TINY = {
    "sim_users": 150,
    "sim_items": 60,
    "sim_categories": 8,
    "sim_inter_per_user": 15.0,
    "epochs": 3,
    "stopping_step": 3,
}
# embedding_size -1 passes every config check and fails when BPR builds its embeddings: a failing trial
SPACE = SearchSpace.from_mapping(
    {
        "model": "BPR",
        "params": {
            "learning_rate": {"type": "float", "low": 1.0e-6, "high": 0.05, "log": True},
            "embedding_size": {"type": "categorical", "choices": [16, -1]},
        },
    }
)
GOOD, BAD, BROKEN = (
    {"learning_rate": 0.05, "embedding_size": 16},
    {"learning_rate": 1e-6, "embedding_size": 16},
    {"learning_rate": 0.01, "embedding_size": -1},
)
States = optuna.trial.TrialState


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Five trials with the median pruner: a good one, a hopeless one, a broken one, then the sampler's."""
    where = tmp_path_factory.mktemp("tune")
    old = os.getcwd()
    os.chdir(where)
    try:
        result = causalrec.tune(
            "BPR",
            "retail-sim",
            split="regional",
            space=SPACE,
            trials=5,
            params=TINY,
            out=where / "out",
            pruner="median",
            pruner_startup_trials=1,
            sampler_seed=0,
            enqueue=[GOOD, BAD, BROKEN],
        )
    finally:
        os.chdir(old)
    return where / "out", result


def test_trials_complete_prune_and_fail_as_recorded(study):
    out, result = study
    states = [t.state for t in result.trials]
    assert len(states) == 5 and states[0] == States.COMPLETE and states[2] == States.FAIL
    assert "negative dimension -1" in result.trials[2].user_attrs["error"]
    assert States.PRUNED in states
    # every decision is the median rule on the stored values: prune at the first step where the trial's best
    # value so far is below the median of the complete trials' values at that step (1 startup trial)
    for i, trial in enumerate(result.trials):
        complete = [t for t in result.trials[:i] if t.state == States.COMPLETE]
        prune_at = None
        for step in sorted(trial.intermediate_values) if complete else ():
            best_so_far = max(v for s, v in trial.intermediate_values.items() if s <= step)
            others = [t.intermediate_values[step] for t in complete if step in t.intermediate_values]
            if others and best_so_far < np.median(others):
                prune_at = step
                break
        if trial.state == States.PRUNED:
            assert prune_at is not None and max(trial.intermediate_values) == prune_at, trial.number
        elif trial.state == States.COMPLETE:
            assert prune_at is None, trial.number
    # the objective of a complete trial is RecBole's best validation NDCG@10 over all validation cases
    best = result.trials[0]
    assert best.value == best.user_attrs["best_valid_score"] == best.user_attrs["valid_result"]["ndcg@10"]
    assert best.value == max(best.intermediate_values.values())
    assert set(best.user_attrs["test_result"]) >= {"ndcg@10", "recall@10"}


def test_outputs(study):
    out, result = study
    for name in ("trials.csv", "summary.md", "best.yaml", "optuna.db"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    assert "## Failed trials" in summary and "| 2 |" in summary
    assert f"optuna-dashboard sqlite:///{(out / 'optuna.db').resolve()}" in summary
    assert (out / "plots" / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    complete = [t for t in result.trials if t.state == States.COMPLETE]
    if len(complete) < 2:
        assert "not available: needs at least 2 complete trials" in summary
    assert not (out / "trials").exists()  # per-trial checkpoints are removed


def test_exported_yaml_runs_through_causalrec_run(study, in_tmp):
    from causalrec.cli import main
    from causalrec.recbole.quick_start import make_config

    out, result = study
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["learning_rate"] == result.best_params["learning_rate"] and best["split"] == "regional"
    assert best["valid_metric"].lower() == "ndcg@10" and "checkpoint_dir" not in best
    config = make_config("BPR", "retail-sim", config_file_list=[str(out / "best.yaml")])
    assert config["embedding_size"] == result.best_params["embedding_size"]
    assert (
        main(
            ["run", "--model", "BPR", "--dataset", "retail-sim", "--config-files", str(out / "best.yaml"), "--no-save"]
        )
        == 0
    )


def test_a_pruner_that_must_prune_prunes_at_the_first_report(in_tmp):
    result = causalrec.tune(
        "BPR",
        "retail-sim",
        split="regional",
        space=SPACE,
        trials=2,
        params=TINY,
        out=in_tmp,
        pruner=optuna.pruners.ThresholdPruner(lower=1.5),
        enqueue=[GOOD, BAD],
        test=False,
    )
    assert [t.state for t in result.trials] == [States.PRUNED, States.PRUNED]
    assert all(list(t.intermediate_values) == [0] for t in result.trials)
    assert not (in_tmp / "best.yaml").exists()  # no complete trial: nothing to export


def test_worst_objective_is_the_worst_validation_environment(in_tmp):
    result = causalrec.tune(
        "BPR",
        "retail-sim",
        split="regional",
        space=SPACE,
        trials=1,
        params=TINY,
        out=in_tmp,
        objective="worst",
        env_fields=("region",),
        pruner="none",
        enqueue=[GOOD],
        test=False,
    )
    trial = result.trials[0]
    regions = {k: v for k, v in trial.user_attrs["valid_env_result"]["region"].items() if k != "<worst>"}
    assert len(regions) >= 2
    worst_label = min(regions, key=lambda k: regions[k]["ndcg@10"])
    assert trial.value == regions[worst_label]["ndcg@10"] < trial.user_attrs["best_valid_score"]
    assert trial.user_attrs["worst_environment"] == f"region={worst_label}"
    # the per-epoch values are worst-region values too: never above the overall value of that epoch
    assert trial.value in trial.intermediate_values.values()


def test_resume_keeps_finished_trials(in_tmp):
    settings = dict(
        split="regional", space=SPACE, params=TINY, out=in_tmp, pruner="none", test=False, study_name="resumable"
    )
    first = causalrec.tune("BPR", "retail-sim", trials=2, enqueue=[GOOD, BAD], **settings)
    before = [(t.number, t.state, t.value, t.params, t.datetime_complete) for t in first.trials]
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        causalrec.tune("BPR", "retail-sim", trials=1, **settings)
    other_space = SearchSpace.from_mapping({"params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}})
    with pytest.raises(ConfigError, match="other settings.*space"):
        causalrec.tune("BPR", "retail-sim", trials=1, resume=True, **{**settings, "space": other_space})
    again = causalrec.tune(
        "BPR", "retail-sim", trials=1, resume=True, **settings, enqueue=[{"learning_rate": 0.02, "embedding_size": 16}]
    )
    assert [(t.number, t.state, t.value, t.params, t.datetime_complete) for t in again.trials[:2]] == before
    assert len(again.trials) == 3 and again.trials[2].state == States.COMPLETE
    # max_trials counts what the study already holds
    capped = causalrec.tune("BPR", "retail-sim", trials=5, max_trials=4, resume=True, **settings)
    assert len(capped.trials) == 4
    # a trial whose worker died (failed by its stale heartbeat) and was retried spends the budget once
    done = capped.trials[0]
    stale = optuna.trial.create_trial(
        state=States.FAIL, params=done.params, distributions=done.distributions, system_attrs={}
    )
    capped.add_trial(stale)
    retry = optuna.trial.create_trial(
        params=done.params,
        distributions=done.distributions,
        value=done.value,
        system_attrs={"failed_trial": 4, "retry_history": [4]},
    )
    capped.add_trial(retry)
    assert budget_used(capped) == 5 and len(capped.trials) == 6
    resumed = causalrec.tune("BPR", "retail-sim", trials=5, max_trials=6, resume=True, **settings)
    assert len(resumed.trials) == 7 and budget_used(resumed) == 6


@pytest.mark.slow
def test_two_workers_share_one_journal_file(in_tmp):
    from causalrec.recbole.quick_start import make_config

    make_config("BPR", "retail-sim", config_dict={**TINY, "split": "regional"})  # data prepared once, up front
    space = in_tmp / "bpr.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "model": "BPR",
                "params": {
                    "learning_rate": {"type": "float", "low": 1.0e-4, "high": 0.05, "log": True},
                    "embedding_size": {"type": "categorical", "choices": [8, 16]},
                },
            }
        )
    )
    journal = in_tmp / "study.log"
    command = [
        sys.executable,
        "-m",
        "causalrec",
        "tune",
        "--model",
        "BPR",
        "--dataset",
        "retail-sim",
        "--split",
        "regional",
        "--space",
        str(space),
        "--trials",
        "3",
        "--storage",
        f"journal:{journal}",
        "--study-name",
        "shared",
        "--resume",
        "--pruner",
        "none",
        "--no-test",
        *sum((["-p", f"{k}={v}"] for k, v in TINY.items()), []),
    ]
    workers = [
        subprocess.Popen(
            [*command, "--out", str(in_tmp / f"w{i}")],
            cwd=in_tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    loaded = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = loaded.trials
    assert len(trials) == 6 and sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == States.COMPLETE and np.isfinite(t.value) for t in trials)
    assert all(1e-4 <= t.params["learning_rate"] <= 0.05 and t.params["embedding_size"] in (8, 16) for t in trials)
    per_worker = {}
    for t in trials:
        per_worker.setdefault(t.user_attrs["worker"], []).append(t.number)
    assert sorted(len(v) for v in per_worker.values()) == [3, 3]


def test_cli_tune_reports_bad_storage_in_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "causalrec",
            "tune",
            "--model",
            "BPR",
            "--space",
            "bpr",
            "--storage",
            "nosuchdb://nowhere",
            "--out",
            str(tmp_path / "o"),
            "--trials",
            "1",
            *sum((["-p", f"{k}={v}"] for k, v in TINY.items()), []),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CAUSALREC_CACHE": str(tmp_path / "cache")},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("causalrec: error:")]
    assert len(lines) == 1 and "cannot open Optuna storage 'nosuchdb://nowhere'" in lines[0]
    assert "Traceback" not in out.stderr
