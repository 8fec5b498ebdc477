"""``import causalrec`` makes RecBole's own entry points see plugin models, trainers and YAML."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import causalrec
from causalrec.recbole import plugin as registry

ROOT = Path(__file__).resolve().parents[1]
# ml-100k shrunk to its densest users/items so a full train + evaluate takes seconds
SMALL_ML100K = {
    "epochs": 1,
    "show_progress": False,
    "train_batch_size": 1024,
    "eval_batch_size": 4096,
    "user_inter_num_interval": "[10,inf)",
    "item_inter_num_interval": "[200,inf)",
    "hidden_size": 16,
    "embedding_size": 16,
    "inner_size": 32,
    "n_layers": 1,
    "MAX_ITEM_LIST_LENGTH": 20,
}


@pytest.fixture(scope="module")
def toyrec():
    registry.register_model("ToyRec", "toyrec_fixture")
    from toyrec_fixture import ToyRecTrainer

    registry.register_trainer("ToyRec", ToyRecTrainer)
    return ToyRecTrainer


def test_run_recbole_finds_plugin_model_and_trainer(toyrec, in_tmp):
    from recbole.quick_start import run_recbole

    result = run_recbole(model="ToyRec", dataset="ml-100k", config_dict=SMALL_ML100K)
    assert toyrec.used
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    # the learned bias is popularity: it must beat a random ranking (hit@10 ~ 10/n_items)
    assert result["test_result"]["hit@10"] > 0.05


def test_causalrec_properties_reach_recbole_config():
    from recbole.config import Config

    config = Config(model="Pop", dataset="ml-100k")
    assert config["mask_history"] is not None  # causalrec's properties/overall.yaml was read
    assert (registry.properties_dir() / "overall.yaml").is_file()


@pytest.mark.parametrize("model", ["Pop", "BPR", "SASRec", "GRU4Rec", "LightGCN"])
def test_classical_models_train_and_reload_best(model, in_tmp):
    result = causalrec.run(model, "ml-100k", config_dict=SMALL_ML100K, saved=True)  # load_best_model on
    test = result["test_result"]
    assert set(test) >= {"ndcg@10", "hit@10", "recall@10", "mrr@10"}
    assert all(0.0 <= v <= 1.0 for v in test.values())
    assert list((in_tmp / "saved").glob(f"{model}-*.pth"))


@pytest.mark.slow
def test_properties_found_from_installed_wheel(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("causalrec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "causalrec/_properties/overall.yaml" in names
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    code = (
        "import causalrec, causalrec.recbole.plugin as r; from recbole.config import Config;"
        "print(r.properties_dir()); c = Config(model='Pop', dataset='ml-100k'); print(c['mask_history'])"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    props, mask = out.stdout.strip().splitlines()[-2:]
    assert props.startswith(str(target)), props
    assert mask in ("False", "True")


def test_model_yaml_layers_follow_the_class_hierarchy():
    """CausalDPO reads LLMRecommender.yaml, then SDPORec.yaml, then its own: keys shared by the LLM models live in one
    file, and a subclass's file wins."""
    from causalrec.recbole.models.causaldpo import CausalDPO
    from causalrec.recbole.models.genrec import GenRec
    from causalrec.recbole.quick_start import make_config

    assert [p.stem for p in registry.model_yaml_files(CausalDPO)] == ["LLMRecommender", "SDPORec", "CausalDPO"]
    assert [p.stem for p in registry.model_yaml_files(GenRec)] == ["LLMRecommender"]
    config = make_config("CausalDPO", "retail-sim", config_dict={"sim_users": 60, "sim_items": 30})
    defaults = registry.model_defaults(CausalDPO)
    for key in ("sft_args", "dpo_args", "tau", "beta"):  # one from each layer
        assert config[key] == defaults[key]
    assert "dpo_args" not in registry.model_defaults(GenRec)


def test_recbole_model_overlay_applies_to_that_model_only():
    """properties/model/LightGCN.yaml lengthens LightGCN's patience (its validation metric dips before it rises) and
    lifts RecBole's 300-epoch cap;
    other RecBole models get causalrec's overall default (30, over RecBole's 10), and a user's value still wins."""
    from causalrec.recbole.quick_start import make_config

    small = {"sim_users": 60, "sim_items": 30}
    assert make_config("LightGCN", "retail-sim", config_dict=small)["stopping_step"] == 100
    assert make_config("LightGCN", "retail-sim", config_dict=small)["epochs"] == 3000  # not RecBole's cap of 300
    assert make_config("BPR", "retail-sim", config_dict=small)["stopping_step"] == 30
    assert make_config("BPR", "retail-sim", config_dict=small)["epochs"] == 300
    assert make_config("LightGCN", "retail-sim", config_dict={**small, "stopping_step": 7})["stopping_step"] == 7
