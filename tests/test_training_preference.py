"""S-DPO on TRL's DPOTrainer: TRL pin, collator layout, loss vs brute force and vs TRL's own DPO loss."""

from __future__ import annotations

import math

import pytest
import torch
import trl
from peft import LoraConfig
from test_training_fixtures import TITLES, completion_logp, tiny_model, tiny_tokenizer
from trl import DPOConfig, DPOTrainer

from causalrec.data.prompts import PromptFormat, completion_text
from causalrec.errors import ConfigError, DataError
from causalrec.training import (
    DataCollatorForMultiPreference,
    PreferenceRecord,
    SDPOConfig,
    SDPOTrainer,
    make_preference_dataset,
    preference_dataset,
)
from causalrec.training.trl_compat import COMPUTE_LOSS_PARAMS, PREPARE_DATASET_PARAMS, backbone_module, trl_signature

FMT = PromptFormat()
ROWS = [  # history, chosen, rejected (3), season, region
    (TITLES[0:2], TITLES[8], [TITLES[3], TITLES[4], TITLES[5]], "winter", "north"),
    (TITLES[2:3], TITLES[9], [TITLES[6], TITLES[0], TITLES[1]], "summer", "south"),
    (TITLES[3:6], TITLES[10], [TITLES[7], TITLES[2], TITLES[8]], "winter", "south"),
    (TITLES[6:8], TITLES[11], [TITLES[1], TITLES[9], TITLES[4]], "winter", "north"),
]


def _records(n_neg=3):
    return [PreferenceRecord(h, c, r[:n_neg], s, g) for h, c, r, s, g in ROWS]


def _config(tmp_path, cls=SDPOConfig, **kw):
    base = dict(
        per_device_train_batch_size=4,
        beta=0.5,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return cls(output_dir=str(tmp_path), **{**base, **kw})


def _lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])


def _perturb_lora(model, seed=0):
    """LoRA B starts at zero (policy = reference); give every adapter the same nonzero weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def test_trl_private_api_is_pinned():
    """SDPOTrainer overrides these TRL 1.16 private methods; a TRL upgrade that changes them must fail here."""
    assert trl.__version__.startswith("1.16."), trl.__version__
    assert trl_signature("_compute_loss") == COMPUTE_LOSS_PARAMS
    assert trl_signature("_prepare_dataset") == PREPARE_DATASET_PARAMS
    assert trl_signature("compute_loss")[:3] == ("self", "model", "inputs")
    from trl.trainer.utils import FusedCausalLMOutput

    assert "log_probs" in FusedCausalLMOutput.__dataclass_fields__


def test_fused_head_projects_only_labelled_positions_with_the_same_log_probs(monkeypatch):
    """On a CPU TRL 1.16 projects every position; ``sequence_logps`` projects only the completion positions (as TRL
    does on CUDA) and must give bit-identical log-probs to TRL's own all-position path."""
    from trl.trainer import utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from causalrec.training.trl_compat import labelled_positions_only, sequence_logps

    model = tiny_model(tiny_tokenizer())
    add_fused_lm_head(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (6, 12), generator=gen)
    attention = torch.ones_like(ids)
    attention[:2, :3] = 0  # left padding
    completion = torch.zeros_like(ids)
    completion[:, -2:] = 1
    completion[0, -3:] = 1
    projected = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction,
        "apply",
        lambda hidden, *a: projected.append(len(hidden)) or apply(hidden, *a),
    )
    ours, _ = sequence_logps(model, ids, attention, completion)
    labels = ids.masked_fill(completion == 0, -100)
    out = model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False, fused_lm_head=True)
    assert projected == [int(completion[:, 1:].sum()), 6 * 11]  # ours: 13 labelled positions; TRL on a CPU: all
    assert torch.equal(ours, out.log_probs.sum(dim=1))
    original = trl_utils._use_triton
    with pytest.raises(RuntimeError), labelled_positions_only():
        raise RuntimeError
    assert trl_utils._use_triton is original


def test_config_validation_and_cpu_defaults(tmp_path):
    args = _config(tmp_path)
    assert args.num_negatives == 3 and args.loss_type == ["sigmoid"] and args.report_to == []
    if not torch.cuda.is_available():
        assert args.bf16 is False and args.activation_checkpointing is False
    with pytest.raises(ConfigError, match="loss_type"):
        _config(tmp_path, loss_type="ipo")
    with pytest.raises(ConfigError, match="precompute_ref_log_probs"):
        _config(tmp_path, precompute_ref_log_probs=True)
    with pytest.raises(ConfigError, match="num_negatives"):
        _config(tmp_path, num_negatives=0)
    with pytest.raises(ConfigError, match="beta"):
        _config(tmp_path, beta=0.0)


def test_collator_layout_by_hand():
    collator = DataCollatorForMultiPreference(pad_token_id=0)
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [[6], [7, 8, 9]], "season_id": 1},
        {"prompt_ids": [10], "chosen_ids": [11], "rejected_ids": [[12, 13], [14]], "season_id": -1},
    ]
    out = collator(examples)
    assert out["input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 0],
        [10, 11, 0, 0, 0, 0],  # chosen
        [1, 2, 3, 6, 0, 0],
        [10, 12, 13, 0, 0, 0],  # rejected_1
        [1, 2, 3, 7, 8, 9],
        [10, 14, 0, 0, 0, 0],  # rejected_2
    ]
    assert out["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0, 0],
    ]
    assert out["attention_mask"].sum(1).tolist() == [5, 2, 4, 3, 6, 2]
    assert out["prompt_lengths"].tolist() == [3, 1]
    assert out["season_id"].tolist() == [1, -1]
    with pytest.raises(DataError):
        collator([examples[0], {**examples[1], "rejected_ids": [[12]]}])


def test_make_preference_dataset_validation():
    ds = make_preference_dataset(["p"], [" a"], [" b"], season=["winter"])
    assert ds[0] == {"prompt": "p", "chosen": " a", "rejected": [" b"], "season": "winter"}
    with pytest.raises(DataError):
        make_preference_dataset(["p", "q"], [" a"], [[" b"]])
    with pytest.raises(DataError):
        make_preference_dataset(["p", "q"], [" a", " b"], [[" c"], [" d", " e"]])
    with pytest.raises(DataError):
        make_preference_dataset([], [], [])


def test_dataset_tokenisation_and_environment_columns(tmp_path):
    tok = tiny_tokenizer()
    trainer = SDPOTrainer(
        tiny_model(tok), args=_config(tmp_path), train_dataset=preference_dataset(_records()), processing_class=tok
    )
    row = trainer.train_dataset[0]
    prompt = FMT.prompt(ROWS[0][0])
    assert row["prompt_ids"] == tok(prompt).input_ids
    assert row["chosen_ids"] == tok(completion_text(ROWS[0][1])).input_ids + [tok.eos_token_id]
    assert [len(r) for r in row["rejected_ids"]] == [len(tok(completion_text(t)).input_ids) + 1 for t in ROWS[0][2]]
    assert trainer.env_vocabs == {"season": ["summer", "winter"], "region": ["north", "south"]}
    assert [trainer.train_dataset[i]["season_id"] for i in range(4)] == [1, 0, 1, 1]
    # an evaluation set with an unseen season gets label -1
    eval_ds = trainer._prepare_dataset(
        preference_dataset([PreferenceRecord(["red mug"], "sun hat", ["snow globe"] * 3, "autumn", "north")]),
        tok,
        trainer.args,
        "eval",
    )
    assert eval_ds[0]["season_id"] == -1 and eval_ds[0]["region_id"] == 0
    with pytest.raises(DataError, match="num_negatives"):
        SDPOTrainer(
            tiny_model(tok),
            args=_config(tmp_path, num_negatives=2),
            train_dataset=preference_dataset(_records()),
            processing_class=tok,
        )


def test_loss_matches_brute_force_with_three_negatives(tmp_path):
    """Policy/reference log-probs from separate plain forwards of each sequence, S-DPO formula in Python."""
    tok = tiny_tokenizer()
    policy, reference = tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    trainer = SDPOTrainer(
        policy,
        ref_model=reference,
        args=_config(tmp_path),
        processing_class=tok,
        train_dataset=preference_dataset(_records()),
    )
    loss = trainer.compute_loss(trainer.model, _batch(trainer)).item()
    beta, expected = 0.5, []
    for history, chosen, rejected, _, _ in ROWS:
        prompt = FMT.prompt(history)

        def ratio(title):
            return completion_logp(policy, tok, prompt, completion_text(title)) - completion_logp(
                reference, tok, prompt, completion_text(title)
            )

        inner = math.log(sum(math.exp(beta * (ratio(r) - ratio(chosen))) for r in rejected))
        expected.append(math.log1p(math.exp(inner)))
    assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    metrics = trainer._metrics["train"]
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def test_one_negative_equals_trl_dpo_loss_and_gradients(tmp_path):
    tok = tiny_tokenizer()
    prompts = [FMT.prompt(r[0]) for r in ROWS]
    chosen = [completion_text(r[1]) for r in ROWS]
    rejected = [completion_text(r[2][0]) for r in ROWS]
    ours = SDPOTrainer(
        tiny_model(tok),
        args=_config(tmp_path / "ours", num_negatives=1),
        processing_class=tok,
        train_dataset=make_preference_dataset(prompts, chosen, [[r] for r in rejected]),
        peft_config=_lora(),
    )
    trl_args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.5,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        per_device_train_batch_size=4,
        disable_tqdm=True,
        seed=0,
    )
    from datasets import Dataset

    theirs = DPOTrainer(
        tiny_model(tok),
        args=trl_args,
        processing_class=tok,
        peft_config=_lora(),
        train_dataset=Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}),
    )
    _perturb_lora(ours.model)
    _perturb_lora(theirs.model)
    batch_ours, batch_theirs = _batch(ours), _batch(theirs)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch_ours[key], batch_theirs[key]), key
    loss_ours = ours.compute_loss(ours.model, batch_ours)
    loss_theirs = theirs.compute_loss(theirs.model, batch_theirs)
    assert abs(loss_ours.item() - math.log(2)) > 1e-3  # the adapters really move the policy off the reference
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-7)
    loss_ours.backward()
    loss_theirs.backward()
    grads_theirs = {n: p.grad for n, p in theirs.model.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in ours.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_theirs[name], rtol=1e-5, atol=1e-7, msg=name)
            checked += 1
    assert checked == 2 * 3 * 2  # A and B of 3 modules in 2 layers
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert ours._metrics["train"][key][-1] == pytest.approx(theirs._metrics["train"][key][-1], rel=1e-5, abs=1e-7)


def test_one_policy_and_one_reference_forward_per_step(tmp_path):
    tok = tiny_tokenizer()
    trainer = SDPOTrainer(
        tiny_model(tok),
        args=_config(tmp_path),
        processing_class=tok,
        train_dataset=preference_dataset(_records()),
        peft_config=_lora(),
    )
    calls = []
    backbone = backbone_module(trainer.model)
    handle = backbone.register_forward_hook(
        lambda m, a, out: calls.append((torch.is_grad_enabled(), out.last_hidden_state.shape[0]))
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop otherwise
    try:
        trainer.training_step(trainer.model, _batch(trainer))
    finally:
        handle.remove()
    assert calls == [(True, 16), (False, 16)]  # (1 + 3 negatives) x 4 prompts, once each


def test_frozen_copy_reference_and_training_lowers_the_loss(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    trainer = SDPOTrainer(
        model, args=_config(tmp_path, max_steps=15), processing_class=tok, train_dataset=preference_dataset(_records())
    )
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    ref_before = {n: p.clone() for n, p in trainer.ref_model.named_parameters()}
    # policy == reference at the start: every log-ratio is 0 and the loss is log(1 + J)
    start = trainer.compute_loss(trainer.model, _batch(trainer)).item()
    assert start == pytest.approx(math.log(4), rel=1e-6)
    trainer.train()
    end = trainer.compute_loss(trainer.model, _batch(trainer)).item()
    print(f"S-DPO loss {start:.4f} -> {end:.4f}")
    assert end < 0.8 * start
    for n, p in trainer.ref_model.named_parameters():
        assert torch.equal(p, ref_before[n]), n


def test_lora_reference_is_the_sft_model_without_a_second_backbone(tmp_path):
    """A PEFT policy whose adapter SFT trained: the reference is TRL's frozen "ref" copy of that adapter on the same
    base weights (no deep copy of the model), its log-probabilities equal the SFT model's before the first update,
    and they stay the SFT model's while the policy trains."""
    from peft import get_peft_model

    from causalrec.training.trl_compat import reference_context, sequence_logps

    tok = tiny_tokenizer()
    sft = get_peft_model(tiny_model(tok), _lora())
    _perturb_lora(sft, seed=3)  # the SFT stage's adapter
    trainer = SDPOTrainer(
        sft, args=_config(tmp_path, max_steps=10), processing_class=tok, train_dataset=preference_dataset(_records())
    )
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config  # no second model
    batch = _batch(trainer)
    with torch.no_grad():
        sft_logps, _ = sequence_logps(
            trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
    ref_logps = trainer._reference_forward(batch)
    torch.testing.assert_close(ref_logps, sft_logps)
    with torch.no_grad(), reference_context(trainer) as ref:
        assert ref is trainer.model  # the same module, switched to the "ref" adapter
    trainer.train()
    with torch.no_grad():
        policy_after, _ = sequence_logps(
            trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
    assert (policy_after - sft_logps).abs().max() > 1e-3  # the policy moved...
    torch.testing.assert_close(trainer._reference_forward(batch), sft_logps)  # ...the reference did not
