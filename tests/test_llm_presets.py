"""Backbone presets: a pretrained backbone gets LoRA, small learning rates and bf16 where supported; the tiny one
keeps the model YAMLs' defaults; the user's own values win over both."""

from __future__ import annotations

from causalrec.llm.presets import PRESETS, backbone_settings, preset_name, resolve_dtype, stage_overlay


def test_preset_follows_what_the_backbone_is():
    assert preset_name("tiny") == preset_name(None) == "tiny"
    assert preset_name("Qwen/Qwen2.5-0.5B-Instruct") == preset_name("/models/llama-3.2-1b") == "pretrained"


def test_unset_backbone_keys_take_the_preset_and_set_ones_stay():
    tiny = backbone_settings({"backbone": "tiny", "lora_r": None, "lora_alpha": None, "dtype": None})
    assert (tiny["lora_r"], tiny["lora_alpha"], tiny["dtype"]) == (0, 16, "float32")
    qwen = backbone_settings({"backbone": "/m/qwen", "lora_r": None, "lora_alpha": None, "dtype": None})
    assert (qwen["lora_r"], qwen["lora_alpha"]) == (16, 32)
    assert qwen["dtype"] == resolve_dtype("auto-bf16") == "float32"  # no GPU here
    mine = backbone_settings({"backbone": "/m/qwen", "lora_r": 0, "lora_alpha": 8, "dtype": "float16"})
    assert (mine["lora_r"], mine["lora_alpha"], mine["dtype"]) == (0, 8, "float16")


def test_stage_overlay_only_for_pretrained():
    assert stage_overlay("tiny", "sft_args") == {}
    assert stage_overlay("/m/qwen", "sft_args")["learning_rate"] == 1e-4
    assert stage_overlay("/m/qwen", "dpo_args")["learning_rate"] == 5e-6
    sft = PRESETS["pretrained"]["sft_args"]
    assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] == 32  # the tiny preset's batch


def _stage(trainer, key):
    from causalrec.recbole.stage_args import stage_defaults

    return stage_defaults(type(trainer.model), key, trainer.config["backbone"], trainer._user_value(key))


def test_stage_args_layer_yaml_preset_and_user(in_tmp, tmp_path):
    """Through a built model: YAML < preset < the user's fields, one field at a time."""
    from test_models_llm import TINY

    from causalrec.recbole.quick_start import build

    directory = _random_llama_dir(tmp_path)
    config = {**TINY, "backbone": str(directory), "sft_args": {"num_train_epochs": 1}}
    config.pop("dpo_args")
    _, trainer, _ = build("SDPORec", "retail-sim", config_dict=config)
    sft, dpo = _stage(trainer, "sft_args"), _stage(trainer, "dpo_args")
    assert sft["num_train_epochs"] == 1 and sft["learning_rate"] == 1e-4 and sft["save_strategy"] == "no"
    assert dpo["learning_rate"] == 5e-6 and dpo["gradient_accumulation_steps"] == 4
    assert trainer.model.backbone_config.lora_r == 16 and trainer.model.backbone_config.lora_alpha == 32
    assert any("lora_" in n for n, p in trainer.model.llm.named_parameters() if p.requires_grad)
    _, tiny, _ = build("SDPORec", "retail-sim", config_dict={**TINY, "sft_args": {"num_train_epochs": 1}})
    assert _stage(tiny, "sft_args")["learning_rate"] == 0.002 and tiny.model.backbone_config.lora_r == 0


def _random_llama_dir(tmp_path):
    """A random Llama with a word-level tokenizer saved as a Hugging Face directory (a stand-in for a user's)."""
    from causalrec.llm.backbone import BackboneConfig, build_tiny_llama, build_tokenizer

    words = "a customer bought in order next the buys season winter spring summer autumn".split()
    from causalrec.data.sources.retail_sim import CATEGORIES

    corpus = words + [n for c in CATEGORIES for n in c.nouns] + ["large small red blue wool cotton"]
    tok = build_tokenizer(corpus)
    model = build_tiny_llama(tok, BackboneConfig(tiny_hidden_size=16, tiny_heads=2, tiny_layers=1))
    directory = tmp_path / "llama"
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
