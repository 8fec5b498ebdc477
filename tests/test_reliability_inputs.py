"""Bad input: a clear causalrec error, one CLI line with a non-zero exit and no traceback, nothing half-written;
and input safety: no config value, config file, dataset path or checkpoint makes causalrec run code."""

from __future__ import annotations

import glob
import os
import pickle
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import causalrec
from causalrec import cli
from causalrec.data import DataSpec, load_frame, prepare
from causalrec.errors import CheckpointError, ConfigError, DataError

SMALL = ["-p", "sim_users=150", "-p", "sim_items=60", "-p", "show_progress=false"]
LLM = SMALL + [
    "-p",
    "tiny_hidden_size=16",
    "-p",
    "tiny_layers=1",
    "-p",
    "sft_args={max_steps: 2}",
    "-p",
    "dpo_args={max_steps: 2}",
    "-p",
    "dpo_max_samples=16",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and line.startswith("causalrec: error:")]
    assert "Traceback" not in err
    return code, lines


def _written(folder: Path) -> list[str]:
    """What a failed run left: RecBole logs, checkpoints, stage files."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".yaml", ".csv"))
    )


# -------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["-m", "Pop", "--config-files", "bad.yaml"], "is not valid YAML"),
        (["-m", "Pop", "--config-files", "list.yaml"], "must hold a mapping"),
        (["-m", "Pop", "--config-files", "code.yaml"], "is not valid YAML"),  # !!python/object/apply is refused
        (["-m", "Pop", "-p", "epochz=1"], "unknown config key 'epochz'"),
        (["-m", "Pop", "-p", "epochs=two"], "'epochs' must be an integer; got 'two'"),
        (["-m", "Pop", "-p", "epochs=0"], "'epochs' must be >= 1"),
        (["-m", "Pop", "-p", "learning_rate=-0.1"], "'learning_rate' must be > 0"),
        (["-m", "Pop", "-p", "topk=[10, 0]"], "'topk' must be positive cut-offs"),
        (["-m", "Pop", "-p", "show_progress=maybe"], "'show_progress' must be true or false"),
        (["-m", "Pop", "-p", "eval_args=3"], "'eval_args' must be a mapping"),
        (["-m", "CausalDPO", "-p", "beta=-0.5"], "'beta' must be > 0"),
        (["-m", "CausalDPO", "-p", "beta=high"], "'beta' must be a number"),
        (["-m", "CausalDPO", "-p", "n_environments=0"], "'n_environments' must be >= 1"),
        (["-m", "CausalDPO", "-p", "n_environments=2.5"], "'n_environments' must be an integer"),
        (["-m", "CausalDPO", "-p", "tau=0"], "'tau' must be > 0"),
        (["-m", "CausalDPO", "-p", "lambda_inv=-1"], "lambda_inv must be >= 0"),
        (["-m", "SDPORec", "-p", "num_negatives=0"], "'num_negatives' must be >= 1"),
        (["-m", "GenRec", "-p", "sft_max_samples=0"], "'sft_max_samples' must be >= 1"),
        (["-m", "GenRec", "-p", "sft_args=5"], "'sft_args' must be a mapping"),
        (["-m", "KD_DAGFM", "-p", "teacher=__import__('os').getcwd()"], "'teacher' must be a model class name"),
    ],
)
def test_bad_config_values_fail_before_anything_runs(capsys, in_tmp, argv, expected):
    (in_tmp / "bad.yaml").write_text("epochs: [1, 2\n")
    (in_tmp / "list.yaml").write_text("- epochs\n- 2\n")
    (in_tmp / "code.yaml").write_text(f"epochs: !!python/object/apply:os.system ['touch {in_tmp}/pwned']\n")
    code, lines = _cli(capsys, "run", "-d", "retail-sim", *argv)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert _written(in_tmp) == [] and not (in_tmp / "pwned").exists()


def test_yaml_floats_are_numbers_not_strings(tmp_path):
    from causalrec.recbole.preflight import read_config_files

    (tmp_path / "c.yaml").write_text("learning_rate: 1e-3\nsft_args: {learning_rate: 5e-4}\n")
    params = read_config_files([tmp_path / "c.yaml"])
    assert params == {"learning_rate": 0.001, "sft_args": {"learning_rate": 0.0005}}
    from causalrec.cli.common import parse_params

    assert parse_params(["beta=1e-1"]) == {"beta": 0.1}


@pytest.mark.parametrize(
    "argv, code, expected",
    [
        (["-m", "SDPORec", "-p", "dpo_args={beta: -1}"], 2, "beta must be > 0"),
        (["-m", "CausalDPO", "-p", "dpo_args={tau: 0, lambda_inv: -1}"], 2, "tau must be > 0; lambda_inv must be >= 0"),
        (["-m", "GenRec", "-p", "sft_args={learning_rate: fast}"], 2, "sft_args: learning_rate must be a number"),
        (["-m", "GenRec", "-p", "backbone=/no/such/model/dir"], 4, "'/no/such/model/dir' does not exist"),
    ],
)
def test_bad_llm_settings_fail_before_training(capsys, in_tmp, argv, code, expected):
    got, lines = _cli(capsys, "run", "-d", "retail-sim", *LLM, *argv)
    assert got == code and len(lines) == 1 and expected in lines[0], lines
    assert not list(in_tmp.rglob("*.pth")) and not list(in_tmp.rglob("*.safetensors"))  # nothing trained or saved


# ------------------------------------------------------------------------------------------ data files
def _csv(folder: Path, text: str, name: str = "shop.csv") -> str:
    (folder / name).write_text(text)
    return str(folder / name)


CSV = [
    "data",
    "prepare",
    "-d",
    "csv",
    "--user",
    "u",
    "--item",
    "i",
    "--time",
    "t",
    "-p",
    "min_user_inter=1",
    "-p",
    "min_item_inter=1",
]


@pytest.mark.parametrize(
    "text, extra, expected",
    [
        ("u,i\na,x\n", ["--split", "iid"], "no column for time (csv_time) ('t')"),
        ("u,i,t\na,x,2024-01-01\na,y,yesterday\n", ["--split", "iid"], "'yesterday' at data row 2"),
        ("u,i,t\na,x,1700000000\na,y,1700000100\nb,x,soon\n", ["--split", "iid"], "'soon' at data row 3"),
        ("u,i,t\na,x,1700000000\na,y,inf\n", ["--split", "iid"], "not finite numbers; first: 'inf' at data row 2"),
        ("", ["--split", "iid"], "is empty"),
        ("u,i,t\n", ["--split", "iid"], "has a header but no rows"),
        # every user bought once: no user has a history, so no test target
        ("u,i,t\na,x,1700000000\nb,y,1700000100\nc,x,1700000200\n", ["--split", "iid"], "leaves the valid part empty"),
        (
            "u,i,t\na,x,1700000000\na,y,1700000100\n",
            ["--split", "seasonal", "-p", "train_months=[1]", "-p", "valid_months=[11]", "-p", "test_months=[12]"],
            "test_months=[12] hold no interactions",
        ),
        (
            "u,i,t,r\na,x,1700000000,north\na,y,1700000100,north\nb,x,1700000000,south\nb,y,1700000200,south\n",
            ["--region", "r", "--split", "regional", "-p", "test_regions=[west]"],
            "region(s) ['west'] that have no users",
        ),
    ],
)
def test_bad_data_is_one_line_exit_3_and_leaves_nothing(capsys, tmp_path, text, extra, expected):
    cache = tmp_path / "cache"
    code, lines = _cli(capsys, *CSV, "--source", _csv(tmp_path, text), "-p", f"data_cache_dir={cache}", *extra)
    assert code == 3 and len(lines) == 1 and expected in lines[0], lines
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]  # no data, no temp


def _spec(path: str, cache: Path, **kw) -> DataSpec:
    base = dict(
        dataset="csv",
        source=path,
        csv_user="u",
        csv_item="i",
        csv_time="t",
        min_user_inter=1,
        min_item_inter=1,
        split="iid",
        data_cache_dir=str(cache),
    )
    return DataSpec(**{**base, **kw})


def test_ties_keep_file_order_duplicates_are_dropped_and_odd_rows_are_kept(tmp_path):
    """Equal timestamps are ties (kept, in file order); an exact duplicate row is dropped and counted;
    single-purchase users only train; an item without a title is named by its id."""
    text = (
        "u,i,t,name\n"
        "ann,b,100,bowl\nann,a,100,apple\nann,c,100,\nann,a,100,apple\nann,d,200,dish\n"  # ties + a duplicate
        "bob,a,50,apple\nbob,d,60,dish\nbob,b,70,bowl\n"
        "cy,a,10,apple\n"
    )  # a single purchase
    spec = _spec(_csv(tmp_path, text), tmp_path / "cache", csv_text=["name"])
    frame = load_frame(spec)
    assert frame.attrs["cleaning"]["dropped_duplicate"] == 1
    prepared = prepare(spec, show_progress=False)
    seq_test = pd.read_csv(prepared.file("seq_test.inter"), sep="\t", dtype=str)
    seq_valid = pd.read_csv(prepared.file("seq_valid.inter"), sep="\t", dtype=str)
    ann_test = seq_test[seq_test["user_id:token"] == "ann"].iloc[0]
    assert ann_test["item_id:token"] == "d" and ann_test["item_id_list:token_seq"] == "b a c"  # file order
    assert seq_valid[seq_valid["user_id:token"] == "ann"].iloc[0]["item_id_list:token_seq"] == "b a"
    assert "cy" not in set(seq_test["user_id:token"]) | set(seq_valid["user_id:token"])
    train = pd.read_csv(prepared.file("train.inter"), sep="\t", dtype=str)
    assert list(train[train["user_id:token"] == "cy"]["item_id:token"]) == ["a"]
    titles = pd.read_csv(prepared.items_file, sep="\t", dtype=str).set_index("item_id")["item_text"]
    assert titles["c"] == "c" and titles["a"] == "apple"


def test_llm_model_needs_a_title_for_every_item(in_tmp):
    from recbole.data import create_dataset
    from recbole.utils import get_model

    from causalrec.recbole.quick_start import make_config

    config = make_config(
        "GenRec", "retail-sim", config_dict={"sim_users": 150, "sim_items": 60, "data_cache_dir": str(in_tmp / "cache")}
    )
    dataset = create_dataset(config)
    items = Path(config["prepared_dir"]) / "retail-sim.items.tsv"
    lines = items.read_text().splitlines()
    items.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # drop one item's title
    with pytest.raises(DataError, match=r"1 item\(s\) have no title"):
        get_model("GenRec")(config, dataset)


# ------------------------------------------------------------------------------------ RecBole checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    where = tmp_path_factory.mktemp("ckpt")
    config = {
        "sim_users": 150,
        "sim_items": 60,
        "epochs": 1,
        "show_progress": False,
        "checkpoint_dir": str(where),
        "env_metrics": False,
    }
    old = os.getcwd()
    os.chdir(where)
    try:
        for model in ("Pop", "BPR"):
            causalrec.run(model, "retail-sim", config_dict=config)
    finally:
        os.chdir(old)
    return {m: glob.glob(str(where / f"{m}-*.pth"))[0] for m in ("Pop", "BPR")}


def _loaded(path):
    from recbole.quick_start import load_data_and_model

    return load_data_and_model(path)


def test_recbole_checkpoints_load_restricted_and_bad_ones_are_checkpoint_errors(checkpoints, in_tmp, monkeypatch):
    tmp_path = in_tmp
    from causalrec.recbole import checkpoints as compat

    compat._WRITTEN.clear()  # as in a new process: nothing is trusted for having been written here
    config, model, _, _, _, test_data = _loaded(checkpoints["Pop"])  # weights_only + allow-list suffices
    from recbole.trainer import Trainer

    trainer = Trainer(config, model)
    with pytest.raises(CheckpointError, match="holds a BPR model, not Pop"):
        trainer.evaluate(test_data, load_best_model=True, model_file=checkpoints["BPR"])
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(Path(checkpoints["Pop"]).read_bytes()[:2000])
    for load in (
        lambda: _loaded(str(truncated)),
        lambda: trainer.evaluate(test_data, load_best_model=True, model_file=str(truncated)),
        lambda: trainer.evaluate(test_data, load_best_model=True, model_file=str(tmp_path / "none.pth")),
    ):
        with pytest.raises(CheckpointError, match="missing, truncated or not a RecBole checkpoint"):
            load()
    # A checkpoint in RecBole's own format (pickle protocol 4), not written here: refused unless trusted.
    legacy = tmp_path / "legacy.pth"
    with compat.trusted_torch_load():
        torch.save(torch.load(checkpoints["Pop"]), legacy, pickle_protocol=4)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        _loaded(str(legacy))
    monkeypatch.setenv(compat.TRUST_ENV, "1")
    assert _loaded(str(legacy))[0]["model"] == "Pop"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused_without_running_it(checkpoints, in_tmp):
    tmp_path = in_tmp
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with causalrec.recbole.checkpoints.trusted_torch_load():
        checkpoint = torch.load(checkpoints["Pop"])
    checkpoint["other_parameter"] = _Payload(marker)
    torch.save(checkpoint, evil, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        _loaded(str(evil))
    assert not marker.exists()


def test_config_strings_are_never_evaluated(in_tmp):
    from recbole.config import Config

    from causalrec.recbole.quick_start import make_config

    marker = in_tmp / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    config = make_config("Pop", "retail-sim", config_dict={"sim_users": 150, "sim_items": 60, "state": code})
    assert config["state"] == code and not marker.exists()
    direct = Config(model="Pop", dataset="ml-100k", config_dict={"state": code, "topk": "[5, 10]"})
    assert direct["state"] == code and direct["topk"] == [5, 10] and not marker.exists()  # literals still parse


def test_recbole_dataset_pickles_are_not_read_unless_enabled(in_tmp):
    marker = in_tmp / "pwned"
    saved = in_tmp / "saved"
    saved.mkdir()
    for name in ("retail-sim-Dataset.pth", "retail-sim-for-Pop-dataloader.pth"):
        (saved / name).write_bytes(pickle.dumps(_Payload(marker)))
    result = causalrec.run(
        "Pop",
        "retail-sim",
        config_dict={"sim_users": 150, "sim_items": 60, "epochs": 1, "show_progress": False, "env_metrics": False},
    )
    assert result["test_result"] and not marker.exists()


def _unsafe_calls(source: str) -> list[int]:
    """Line numbers of eval/exec, pickle.load(s), yaml.load without causalrec's safe loader, yaml.unsafe_load /
    full_load, and torch.load(weights_only=False) calls."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        loader = keywords.get("Loader")
        bad = (
            (isinstance(func, ast.Name) and name in ("eval", "exec"))
            or (owner == "pickle" and name in ("load", "loads"))
            or (owner == "yaml" and name in ("unsafe_load", "full_load", "full_load_all", "unsafe_load_all"))
            or (
                owner == "yaml"
                and name == "load"
                and not (isinstance(loader, ast.Name) and loader.id == "RecBoleYamlLoader")
            )
            or (isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is False)
        )
        if bad:
            lines.append(node.lineno)
    return lines


def test_no_unsafe_loader_in_the_source():
    assert _unsafe_calls(
        "import yaml, pickle\nyaml.load(t, Loader=yaml.FullLoader)\npickle.loads(b)\neval(x)\n"
        "torch.load(f, weights_only=False)\nyaml.load(t, Loader=RecBoleYamlLoader)\nm.eval()\n"
    ) == [2, 3, 4, 5]  # the scan itself finds what it looks for
    root = Path(causalrec.__file__).parent
    offenders = {str(p.relative_to(root)): _unsafe_calls(p.read_text()) for p in root.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"beta": "high"}, "beta must be a number; got 'high'"),
        ({"num_negatives": 1.5}, "num_negatives must be an integer"),
        ({"n_environments": "2"}, "n_environments must be an integer"),
        ({"tau": None}, "tau must be a number"),
        ({"lambda_inv": [0.1]}, "lambda_inv must be a number"),
        ({"mmd_bandwidths": "1.0"}, "mmd_bandwidths must be a list of numbers"),
        ({"n_environments": 0, "tau": -1.0}, "n_environments must be >= 1; tau must be > 0"),
    ],
)
def test_method_configs_name_wrong_types_and_ranges(tmp_path, kwargs, expected):
    from causalrec.training import CausalDPOConfig

    with pytest.raises(ConfigError, match=re.escape(expected)):
        CausalDPOConfig(str(tmp_path), **kwargs)


def test_recbole_nan_check_is_a_training_error():
    import types

    from recbole.trainer import Trainer

    from causalrec.errors import TrainingError

    fake = types.SimpleNamespace(config={"model": "BPR"})
    Trainer._check_nan(fake, torch.tensor(0.5))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(TrainingError, match="BPR training loss is"):
            Trainer._check_nan(fake, torch.tensor(bad))


def test_recbole_anomaly_mode_is_switched_back_off(tmp_path):
    """RecBole's SINE module turns autograd anomaly detection on at import (every backward several times slower)."""
    import subprocess
    import sys

    code = "import torch, recbole.model.sequential_recommender; print(torch.is_anomaly_enabled())"
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    if without.stdout.strip() != "True":
        pytest.skip("this RecBole no longer enables anomaly detection: the patch is a no-op")
    assert not torch.is_anomaly_enabled()  # import causalrec undid it


def test_target_modules_takes_a_name_or_a_list_but_backbone_takes_no_list():
    from causalrec.recbole.preflight import validate

    validate("GenRec", "retail-sim", {"target_modules": ["q_proj", "v_proj"], "lora_r": 2})
    validate("GenRec", "retail-sim", {"target_modules": "all-linear"})
    with pytest.raises(ConfigError, match="backbone"):
        validate("GenRec", "retail-sim", {"backbone": ["tiny"]})
