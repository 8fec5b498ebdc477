"""CausalDPO on TRL: reduction to S-DPO/DPO, hand-computed backdoor loss and penalties, gradient routing,
one forward per model per step, training."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_training_fixtures import completion_logp, tiny_model, tiny_tokenizer
from test_training_preference import FMT, ROWS, _batch, _config, _lora, _perturb_lora, _records
from trl import DPOConfig, DPOTrainer

from causalrec.data.prompts import completion_text
from causalrec.errors import ConfigError, DataError, UnknownNameError
from causalrec.training import CausalDPOConfig, CausalDPOTrainer, SDPOTrainer, preference_dataset
from causalrec.training.causal_dpo_config import ENV_STATE_FILE
from causalrec.training.losses import sdpo_loss_from_logits
from causalrec.training.trl_compat import backbone_module
from datasets import Dataset


def _causal(tmp_path, **kw):
    kw.setdefault("env_source", "latent")  # these tests exercise the clustering
    return _config(tmp_path, cls=CausalDPOConfig, **kw)


def _lora_trainer(cls, args, tok, records=None):
    trainer = cls(
        tiny_model(tok),
        args=args,
        processing_class=tok,
        peft_config=_lora(),
        train_dataset=preference_dataset(records or _records(args.num_negatives)),
    )
    _perturb_lora(trainer.model)
    return trainer


def test_config_validation(tmp_path):
    args = _causal(tmp_path)
    defaults = (args.n_environments, args.tau, args.invariance, args.lambda_inv)
    assert defaults == (4, 0.1, "mmd", 0.1)
    fields = {f.name: f.default for f in dataclasses.fields(CausalDPOConfig)}
    assert fields["env_source"] == "season" and fields["beta"] == 1.0  # the YAML's (one owner: test_config_owners)
    for bad in (
        {"n_environments": 0},
        {"tau": 0.0},
        {"lambda_inv": -1.0},
        {"mmd_bandwidths": [0.0]},
        {"beta": 0.0},
        {"inv_warmup_steps": -1},
    ):
        with pytest.raises(ConfigError):
            _causal(tmp_path, **bad)
    with pytest.raises(UnknownNameError, match="season"):
        _causal(tmp_path, env_source="seasn")
    with pytest.raises(UnknownNameError):
        _causal(tmp_path, invariance="coral")
    with pytest.raises(UnknownNameError, match="estimated"):
        _causal(tmp_path, env_prior="learned")
    with pytest.raises(UnknownNameError, match="margin"):
        _causal(tmp_path, invariance_target="reward")


def test_one_environment_without_penalty_is_exactly_sdpo(tmp_path):
    tok = tiny_tokenizer()
    sdpo = _lora_trainer(SDPOTrainer, _config(tmp_path / "s"), tok)
    causal = _lora_trainer(CausalDPOTrainer, _causal(tmp_path / "c", n_environments=1, lambda_inv=0.0), tok)
    expected = sdpo.compute_loss(sdpo.model, _batch(sdpo))
    got = causal.compute_loss(causal.model, _batch(causal))
    assert abs(expected.item() - math.log(4)) > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    # a single known label (every row in one region) is one environment too
    one_region = [r.__class__(r.history, r.target, r.negatives, r.season, "north") for r in _records()]
    labelled = _lora_trainer(
        CausalDPOTrainer, _causal(tmp_path / "l", env_source="region", lambda_inv=0.0), tok, one_region
    )
    torch.testing.assert_close(labelled.compute_loss(labelled.model, _batch(labelled)), expected, rtol=0, atol=1e-7)


def test_one_environment_one_negative_is_trl_dpo(tmp_path):
    tok = tiny_tokenizer()
    causal = _lora_trainer(
        CausalDPOTrainer, _causal(tmp_path / "c", n_environments=1, lambda_inv=0.0, num_negatives=1), tok
    )
    rows = {
        "prompt": [FMT.prompt(r[0]) for r in ROWS],
        "chosen": [completion_text(r[1]) for r in ROWS],
        "rejected": [completion_text(r[2][0]) for r in ROWS],
    }
    trl_args = DPOConfig(
        output_dir=str(tmp_path / "t"),
        beta=0.5,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        per_device_train_batch_size=4,
        disable_tqdm=True,
        seed=0,
    )
    trl_trainer = DPOTrainer(
        tiny_model(tok), args=trl_args, processing_class=tok, peft_config=_lora(), train_dataset=Dataset.from_dict(rows)
    )
    _perturb_lora(trl_trainer.model)
    torch.testing.assert_close(
        causal.compute_loss(causal.model, _batch(causal)),
        trl_trainer.compute_loss(trl_trainer.model, _batch(trl_trainer)),
        rtol=1e-6,
        atol=1e-7,
    )


def _brute_force_terms(policy, reference, tok, beta=0.5):
    """Per-row S-DPO loss, chosen log-ratio and reward margin (beta * (chosen - mean rejected log-ratio)) from
    separate plain forwards."""
    losses, chosen_ratios, margins = [], [], []
    for history, chosen, rejected, _, _ in ROWS:
        prompt = FMT.prompt(history)

        def ratio(title):
            return completion_logp(policy, tok, prompt, completion_text(title)) - completion_logp(
                reference, tok, prompt, completion_text(title)
            )

        rc = ratio(chosen)
        inner = math.log(sum(math.exp(beta * (ratio(r) - rc)) for r in rejected))
        losses.append(math.log1p(math.exp(inner)))
        chosen_ratios.append(rc)
        margins.append(beta * (rc - sum(ratio(r) for r in rejected) / len(rejected)))
    return losses, chosen_ratios, margins


@pytest.mark.parametrize("invariance,target", [("vrex", "chosen"), ("mmd", "chosen"), ("mmd", "margin")])
def test_backdoor_loss_and_penalty_by_hand(tmp_path, invariance, target):
    """Seasons in training: winter x3, summer x1 -> P = (summer 0.25, winter 0.75), the batch is the whole set.
    ``invariance_target="margin"``: the MMD compares the per-sample reward margins instead of the chosen log-ratios."""
    tok = tiny_tokenizer()
    policy, reference = tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    lam = 2.0
    args = _causal(tmp_path, env_source="season", invariance=invariance, invariance_target=target, lambda_inv=lam)
    trainer = CausalDPOTrainer(
        policy, ref_model=reference, processing_class=tok, args=args, train_dataset=preference_dataset(_records())
    )
    assert trainer.env_names == ["summer", "winter"]
    assert trainer.env_prior.tolist() == pytest.approx([0.25, 0.75])
    loss = trainer.compute_loss(trainer.model, _batch(trainer)).item()

    losses, chosen_ratios, margins = _brute_force_terms(policy, reference, tok)
    x = margins if target == "margin" else chosen_ratios
    _summer, winter = [1], [0, 2, 3]
    r_summer, r_winter = losses[1], sum(losses[i] for i in winter) / 3
    backdoor = 0.25 * r_summer + 0.75 * r_winter
    if invariance == "vrex":
        mean = (r_summer + r_winter) / 2
        penalty = ((r_summer - mean) ** 2 + (r_winter - mean) ** 2) / 2
    else:

        def k(a, b):
            return math.exp(-((a - b) ** 2) / 2)

        penalty = (
            k(x[1], x[1])
            + sum(k(x[i], x[j]) for i in winter for j in winter) / 9
            - 2 * sum(k(x[1], x[i]) for i in winter) / 3
        )
    assert penalty > 1e-4
    assert loss == pytest.approx(backdoor + lam * penalty, rel=1e-5)
    metrics = trainer._metrics["train"]
    assert metrics["causal/risk/summer"][-1] == pytest.approx(r_summer, rel=1e-5)
    assert metrics["causal/risk/winter"][-1] == pytest.approx(r_winter, rel=1e-5)
    assert metrics["causal/penalty"][-1] == pytest.approx(penalty, rel=1e-4)


def test_label_source_needs_its_column(tmp_path):
    tok = tiny_tokenizer()
    ds = preference_dataset(_records()).remove_columns(["season"])
    with pytest.raises(DataError, match="season"):
        CausalDPOTrainer(
            tiny_model(tok),
            args=_causal(tmp_path, env_source="season"),
            processing_class=tok,
            train_dataset=ds,
            peft_config=_lora(),
        )


def test_gradients_reach_only_lora_weights_and_prototypes(tmp_path):
    tok = tiny_tokenizer()
    trainer = _lora_trainer(CausalDPOTrainer, _causal(tmp_path, n_environments=2, lambda_inv=1.0), tok)
    trainer.initialize_environments()
    trainer.compute_loss(trainer.model, _batch(trainer)).backward()
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    base = {n: p for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert len(lora) == 12 and len(base) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None and not p.requires_grad for p in base.values())
    prototypes = trainer.environment_model.prototypes
    assert prototypes.grad is not None and prototypes.grad.abs().sum() > 0


def test_one_policy_and_one_reference_forward_per_step(tmp_path):
    tok = tiny_tokenizer()
    trainer = _lora_trainer(CausalDPOTrainer, _causal(tmp_path, n_environments=2), tok)
    trainer.initialize_environments()
    backbone = backbone_module(trainer.model)
    calls = []
    handle = backbone.register_forward_hook(lambda m, a, out: calls.append(torch.is_grad_enabled()))
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop otherwise
    try:
        trainer.training_step(trainer.model, _batch(trainer))
    finally:
        handle.remove()
    assert calls == [True, False]
    assert not backbone._forward_hooks  # the capture hook is gone after the policy forward
    assert {"causal/risk/e0", "causal/penalty", "causal/assignment_entropy"} <= set(trainer._metrics["train"])


def test_lambda_warmup(tmp_path):
    tok = tiny_tokenizer()
    trainer = _lora_trainer(CausalDPOTrainer, _causal(tmp_path, lambda_inv=0.4, inv_warmup_steps=10), tok)
    trainer.state.global_step = 5
    assert trainer.current_lambda_inv() == pytest.approx(0.2)
    trainer.state.global_step = 50
    assert trainer.current_lambda_inv() == pytest.approx(0.4)


def test_tau_annealing_is_geometric_from_tau_to_tau_final(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    trainer = _lora_trainer(CausalDPOTrainer, _causal(tmp_path, tau=0.4, tau_final=0.025), tok)
    trainer.state.max_steps = 40
    for step, expected in ((0, 0.4), (10, 0.2), (20, 0.1), (40, 0.025), (80, 0.025)):  # halves every 10 steps
        trainer.state.global_step = step
        assert trainer.current_tau() == pytest.approx(expected)
    # Through a real (short) training run, the environment model follows the schedule step by step.
    args = _causal(tmp_path / "run", n_environments=2, max_steps=6, tau=0.4, tau_final=0.025, learning_rate=2e-2)
    trained = CausalDPOTrainer(
        tiny_model(tok),
        args=args,
        processing_class=tok,
        peft_config=_lora(),
        train_dataset=preference_dataset(_records()),
    )
    seen = []
    original = CausalDPOTrainer.environment_assignments

    def spy(self, batch):
        out = original(self, batch)
        seen.append(self.environment_model.tau)
        return out

    monkeypatch.setattr(CausalDPOTrainer, "environment_assignments", spy)
    trained.train()
    assert seen[0] == pytest.approx(0.4) and seen[-1] == pytest.approx(0.4 * (0.025 / 0.4) ** (5 / 6))
    assert all(a > b for a, b in zip(seen, seen[1:]))
    fixed = _lora_trainer(CausalDPOTrainer, _causal(tmp_path / "f", tau=0.4), tok)
    fixed.state.max_steps, fixed.state.global_step = 40, 20
    assert fixed.current_tau() == 0.4
    with pytest.raises(ConfigError, match="tau_final must be > 0"):
        _causal(tmp_path / "bad", tau_final=0.0)


def test_environment_recovery_against_the_season_labels(tmp_path):
    """NMI / ARI of the latent environments' hard assignments against the labelled seasons, and nothing for label
    environments."""
    from causalrec.training.environments import adjusted_rand_index, linear_probe, normalized_mutual_information

    tok = tiny_tokenizer()
    args = _causal(tmp_path, n_environments=2, env_prior="estimated")
    trainer = _lora_trainer(CausalDPOTrainer, args, tok)
    assert trainer.environment_recovery() == {}  # not seeded yet
    trainer.initialize_environments()
    assert trainer.environment_model.estimated_prior
    recovery = trainer.environment_recovery()
    assert set(recovery) == {f"{m}/{c}" for m in ("nmi", "ari", "probe", "chance") for c in ("season", "region")}
    rows = trainer._sample_rows(None)
    assigned = trainer.environment_model(trainer.prompt_states(rows)).argmax(1)
    seasons = torch.tensor(trainer.train_dataset.select(rows)["season_id"])
    assert recovery["nmi/season"] == pytest.approx(normalized_mutual_information(assigned, seasons))
    assert recovery["ari/season"] == pytest.approx(adjusted_rand_index(assigned, seasons))
    features = trainer.environment_model.features(trainer.prompt_states(rows))
    assert (recovery["probe/season"], recovery["chance/season"]) == pytest.approx(
        linear_probe(features, seasons, seed=args.seed)
    )
    labelled = _lora_trainer(CausalDPOTrainer, _causal(tmp_path, env_source="season"), tok)
    assert labelled.environment_recovery() == {}


def test_training_lowers_the_loss_and_trains_prototypes(tmp_path):
    tok = tiny_tokenizer()
    args = _causal(tmp_path, n_environments=2, max_steps=30, learning_rate=2e-2, prototype_learning_rate=0.05)
    trainer = CausalDPOTrainer(
        tiny_model(tok),
        args=args,
        processing_class=tok,
        peft_config=_lora(),
        train_dataset=preference_dataset(_records()),
    )
    _perturb_lora(trainer.model, seed=3)

    def sdpo_loss():
        with torch.no_grad():
            return sdpo_loss_from_logits(trainer._preference_batch(trainer.model, _batch(trainer)).logits).mean().item()

    before = sdpo_loss()
    trainer.initialize_environments()
    prototypes = trainer.environment_model.prototypes.detach().clone()
    trainer.train()
    after = sdpo_loss()
    print(f"CausalDPO: S-DPO part of the loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before
    groups = trainer.optimizer.param_groups
    assert any(g["params"] == [trainer.environment_model.prototypes] for g in groups)
    assert not torch.equal(prototypes, trainer.environment_model.prototypes.detach())
    trainer.save_model(str(tmp_path / "final"))
    state = torch.load(tmp_path / "final" / ENV_STATE_FILE, weights_only=True)
    torch.testing.assert_close(state["prototypes"], trainer.environment_model.prototypes.detach())


def test_checkpoint_resume_restores_prototypes_and_reproduces_the_run(tmp_path):
    tok = tiny_tokenizer()

    def run(out, resume=None, **kw):
        args = _causal(out, n_environments=2, max_steps=4, learning_rate=1e-2, per_device_train_batch_size=2, **kw)
        trainer = CausalDPOTrainer(
            tiny_model(tok),
            args=args,
            processing_class=tok,
            peft_config=_lora(),
            train_dataset=preference_dataset(_records()),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "a", save_strategy="steps", save_steps=2, save_total_limit=None)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / ENV_STATE_FILE).is_file()
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    torch.testing.assert_close(resumed.environment_model.prototypes, straight.environment_model.prototypes)
    torch.testing.assert_close(resumed.environment_model.prior, straight.environment_model.prior)
    lora = {n: p for n, p in straight.model.named_parameters() if "lora_" in n}
    for name, p in resumed.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, lora[name], msg=name)
