"""Search spaces, config layering and storage URLs: every bad input is a clear error before any trial."""

from __future__ import annotations

import optuna
import pytest

import causalrec
from causalrec.errors import ConfigError, PreflightError, UnknownNameError
from causalrec.experiments.configs import layer, split_sections
from causalrec.experiments.space import SearchSpace
from causalrec.experiments.tune import open_storage, resolve_space
from causalrec.recbole.plugin import tuning_dir

TINY = {"sim_users": 150, "sim_items": 60, "sim_categories": 8, "sim_inter_per_user": 15.0, "epochs": 1}


def space(params, **top):
    return SearchSpace.from_mapping({"params": params, **top}, source="test.yaml")


@pytest.mark.parametrize("model", ["SASRec", "BPR", "LightGCN", "GenRec", "SDPORec", "CausalDPO"])
def test_shipped_spaces_are_valid_for_their_model(model):
    path = resolve_space(None, model)
    assert path == tuning_dir() / f"{model.lower()}.yaml"
    loaded = SearchSpace.from_file(path)
    assert loaded.model == model
    loaded.check(model)
    # one trial's values stay inside the declared ranges and choices
    trial = optuna.trial.FixedTrial({p.name: (p.choices[0] if p.choices else p.high) for p in loaded.params})
    values = loaded.suggest(trial)
    assert set(values) == set(loaded.names)


def test_resolve_space_by_name_and_errors(tmp_path):
    assert resolve_space("sasrec", "BPR") == tuning_dir() / "sasrec.yaml"
    assert resolve_space("tuning/causaldpo.yaml", "CausalDPO").name == "causaldpo.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("params: {learning_rate: {type: float, low: 0.001, high: 0.01}}\n")
    assert resolve_space(str(own), "BPR") == own
    with pytest.raises(ConfigError, match="not found.*sasrec"):
        resolve_space("nosuch", "BPR")


def test_dotted_keys_set_one_field_and_keep_the_others():
    base = {"sft_args": {"num_train_epochs": 3, "learning_rate": 0.002}, "epochs": 2}
    merged = layer(base, {"sft_args.learning_rate": 1e-4, "dpo_args.beta": 0.5, "epochs": 5})
    assert merged == {
        "sft_args": {"num_train_epochs": 3, "learning_rate": 1e-4},
        "dpo_args": {"beta": 0.5},
        "epochs": 5,
    }
    assert base["sft_args"]["learning_rate"] == 0.002  # not modified in place
    with pytest.raises(ConfigError, match="not a mapping"):
        layer({"epochs": 2}, {"epochs.x": 1})
    shared, per_model = split_sections(
        {"epochs": 2, "SASRec": {"n_layers": 1}, "SASRec.n_heads": 2, "GenRec.sft_args.max_steps": 3},
        ["SASRec", "GenRec"],
    )
    assert shared == {"epochs": 2} and per_model == {
        "SASRec": {"n_layers": 1, "n_heads": 2},
        "GenRec": {"sft_args.max_steps": 3},
    }
    with pytest.raises(ConfigError, match="section for model 'SASRec' must be a mapping"):
        split_sections({"SASRec": 3}, ["SASRec"])


@pytest.mark.parametrize(
    "params, top, error, words",
    [
        (
            {"learnin_rate": {"type": "float", "low": 0.001, "high": 0.01}},
            {},
            UnknownNameError,
            ["unknown config key 'learnin_rate'", "learning_rate", "test.yaml"],
        ),
        (
            {"sft_args.learnig_rate": {"type": "float", "low": 0.001, "high": 0.01}},
            {},
            UnknownNameError,
            ["sft_args field 'learnig_rate'", "Did you mean 'learning_rate'"],
        ),
        ({"epochs.x": {"type": "int", "low": 1, "high": 3}}, {}, ConfigError, ["'epochs' is not a mapping"]),
        (
            {"learning_rate": {"type": "float", "low": 0.01, "high": 0.01}},
            {},
            ConfigError,
            ["empty range", "low (0.01)"],
        ),
        ({"n_layers": {"type": "int", "low": 3, "high": 1}}, {}, ConfigError, ["n_layers", "empty range"]),
        (
            {"learning_rate": {"type": "double", "low": 0.001, "high": 0.01}},
            {},
            UnknownNameError,
            ["parameter type", "'double'", "categorical, float, int"],
        ),
        (
            {"learning_rate": {"type": "float", "low": 0.0, "high": 0.01, "log": True}},
            {},
            ConfigError,
            ["log-scale", "low > 0"],
        ),
        ({"learning_rate": {"type": "float", "low": 0.0, "high": 0.01}}, {}, ConfigError, ["learning_rate", "> 0"]),
        (
            {"learning_rate": {"type": "float", "low": 0.001, "high": 0.01, "log": True, "step": 0.001}},
            {},
            ConfigError,
            ["step and log"],
        ),
        ({"hidden_size": {"type": "categorical", "choices": []}}, {}, ConfigError, ["non-empty list of choices"]),
        ({"topk": {"type": "categorical", "choices": [[10], [20]]}}, {}, ConfigError, ["choices must be scalars"]),
        ({"hidden_size": {"type": "categorical", "choices": [8, 8]}}, {}, ConfigError, ["repeat"]),
        (
            {"hidden_size": {"type": "int", "low": 8, "high": 64, "scale": "log"}},
            {},
            ConfigError,
            ["unknown field", "scale"],
        ),
        ({"hidden_size": {"type": "int", "low": 8.5, "high": 64}}, {}, ConfigError, ["integer"]),
        ({"learning_rate": {"type": "float", "low": "small", "high": 0.1}}, {}, ConfigError, ["low must be a number"]),
        (
            {"sft_args.learning_rate": {"type": "categorical", "choices": ["fast", 0.1]}},
            {},
            ConfigError,
            ["sft_args", "learning_rate must be a number"],
        ),
        (
            {"learning_rate": {"type": "float", "low": 0.001, "high": 0.01}},
            {"fixed": {"learning_rate": 0.1}},
            ConfigError,
            ["both tuned", "fixed"],
        ),
        (
            {"learning_rate": {"type": "float", "low": 0.001, "high": 0.01}},
            {"fixed": {"epoks": 3}},
            UnknownNameError,
            ["epoks", "epochs"],
        ),
        (
            {"learning_rate": {"type": "float", "low": 0.001, "high": 0.01}},
            {"searchspace": 1},
            ConfigError,
            ["unknown top-level key", "searchspace"],
        ),
        ({}, {}, ConfigError, ["params:"]),
        (
            {"learning_rate": {"type": "float", "low": 0.001, "high": 0.01}},
            {"model": "SASRec"},
            ConfigError,
            ["for model 'SASRec', not 'GenRec'"],
        ),
    ],
)
def test_bad_spaces_name_the_problem(params, top, error, words):
    with pytest.raises(error) as err:
        space(params, **top).check("GenRec")
    for word in words:
        assert word in str(err.value), str(err.value)


def test_bad_yaml_file_is_a_config_error(tmp_path):
    (tmp_path / "s.yaml").write_text("params: {learning_rate: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SearchSpace.from_file(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="cannot read search space"):
        SearchSpace.from_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "url, words",
    [
        (
            "sqlite:////nonexistent-folder-causalrec/x/study.db",
            ["cannot open Optuna storage", "unable to open database"],
        ),
        ("nosuchdb://host/db", ["cannot open Optuna storage 'nosuchdb://host/db'"]),
        ("journal:/nonexistent-folder-causalrec/x.log", ["cannot open Optuna journal", "not an existing folder"]),
    ],
)
def test_storage_that_cannot_be_opened(tmp_path, url, words):
    with pytest.raises(ConfigError) as err:
        open_storage(url, tmp_path)
    for word in words:
        assert word in str(err.value)


def test_storage_defaults_to_sqlite_in_out_and_journal_opens(tmp_path):
    storage, url = open_storage(None, tmp_path / "o")
    assert url == f"sqlite:///{(tmp_path / 'o' / 'optuna.db').resolve()}"
    assert isinstance(storage, optuna.storages.RDBStorage)
    journal, url = open_storage(f"journal:{tmp_path / 'j.log'}", tmp_path)
    assert isinstance(journal, optuna.storages.JournalStorage)


def test_study_settings_are_checked_before_any_trial(in_tmp):
    lr = {"learning_rate": {"type": "float", "low": 0.001, "high": 0.01}}
    with pytest.raises(ConfigError, match="NDCG@50.*not in topk"):
        causalrec.tune("BPR", split="regional", space=space(lr), trials=1, params=TINY, metric="ndcg@50", out=in_tmp)
    with pytest.raises(UnknownNameError, match="epochz"):
        causalrec.tune("BPR", split="regional", space=space(lr), trials=1, params={**TINY, "epochz": 1}, out=in_tmp)
    with pytest.raises(UnknownNameError, match="objective"):
        causalrec.tune("BPR", space=space(lr), objective="best", out=in_tmp)
    with pytest.raises(UnknownNameError, match="pruner"):
        causalrec.tune("BPR", space=space(lr), pruner="sometimes", out=in_tmp)
    with pytest.raises(ConfigError, match="trials must be an integer >= 1"):
        causalrec.tune("BPR", space=space(lr), trials=0, out=in_tmp)
    with pytest.raises(PreflightError) as err:  # several at once: every one listed, a line each
        causalrec.tune("Foo", split="bogus", space=space(lr), trials=0, pruner="sometimes", out=in_tmp)
    assert str(err.value).splitlines()[0] == "4 problems found before any work started:"
    for word, line in zip(("'Foo'", "'bogus'", "'sometimes'", "trials"), str(err.value).splitlines()[1:], strict=True):
        assert word in line
    assert not (in_tmp / "optuna.db").exists()  # nothing was stored
