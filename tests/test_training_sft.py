"""SFT stage: completion-only labels, learning on a tiny memorisation task, checkpoint + resume."""

from __future__ import annotations

import pytest
import torch
from test_training_fixtures import TITLES, completion_logp, tiny_model, tiny_tokenizer

from causalrec.data.prompts import PromptFormat, completion_text
from causalrec.errors import DataError, UnknownNameError
from causalrec.training import PreferenceRecord, build_sft_config, make_sft_dataset, run_sft, sft_dataset

FMT = PromptFormat()
HISTORIES = [TITLES[0:2], TITLES[2:3], TITLES[3:6], TITLES[6:8]]
TARGETS = [TITLES[8], TITLES[9], TITLES[10], TITLES[11]]


def _dataset():
    return make_sft_dataset([FMT.prompt(h) for h in HISTORIES], [completion_text(t) for t in TARGETS])


def _args(tmp_path, **kw):
    base = dict(
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return build_sft_config(str(tmp_path), **{**base, **kw})


def _mean_nll(model, tok):
    return -sum(completion_logp(model, tok, FMT.prompt(h), completion_text(t)) for h, t in zip(HISTORIES, TARGETS)) / 4


def test_config_defaults_are_cpu_safe_and_unknown_keys_named(tmp_path):
    args = build_sft_config(str(tmp_path))
    assert args.completion_only_loss is True
    assert args.report_to == [] and args.save_strategy == "epoch" and args.save_total_limit == 1
    if not torch.cuda.is_available():
        assert args.bf16 is False and args.activation_checkpointing is False
    with pytest.raises(UnknownNameError, match="learnig_rate.*learning_rate"):
        build_sft_config(str(tmp_path), learnig_rate=1e-3)


def test_dataset_validation():
    with pytest.raises(DataError):
        make_sft_dataset(["a"], ["b", "c"])
    with pytest.raises(DataError):
        make_sft_dataset([], [])
    ds = sft_dataset([PreferenceRecord(["red mug"], "blue cup", season="winter", region="north")])
    expected = {"prompt": FMT.prompt(["red mug"]), "completion": " blue cup", "season": "winter", "region": "north"}
    assert ds[0] == expected


def test_labels_mask_prompt_and_padding(tmp_path):
    tok = tiny_tokenizer()
    trainer = run_sft(tiny_model(tok), tok, _dataset(), _args(tmp_path, max_steps=1))
    rows = [trainer.train_dataset[i] for i in (0, 2)]  # prompts of different lengths
    batch = trainer.data_collator(rows)
    for i, (history, target) in enumerate([(HISTORIES[0], TARGETS[0]), (HISTORIES[2], TARGETS[2])]):
        n_prompt = len(tok(FMT.prompt(history)).input_ids)
        completion = tok(completion_text(target)).input_ids + [tok.eos_token_id]
        n = n_prompt + len(completion)
        labels, ids = batch["labels"][i].tolist(), batch["input_ids"][i].tolist()
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:n] == completion == ids[n_prompt:n]
        assert labels[n:] == [-100] * (len(labels) - n)  # padding
        assert ids[n:] == [tok.pad_token_id] * (len(ids) - n)
    assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows)


def test_loss_goes_down_on_memorisation(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    before = _mean_nll(model, tok)
    trainer = run_sft(model, tok, _dataset(), _args(tmp_path, max_steps=40))
    after = _mean_nll(trainer.model, tok)
    print(f"completion NLL per example: {before:.3f} -> {after:.3f}")
    assert after < 0.25 * before


def test_checkpoint_and_resume_reproduce_an_uninterrupted_run(tmp_path):
    tok = tiny_tokenizer()
    straight = run_sft(
        tiny_model(tok),
        tok,
        _dataset(),
        _args(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3, save_total_limit=None),
    )
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed = run_sft(
        tiny_model(tok, seed=1),
        tok,
        _dataset(),
        _args(tmp_path / "b", max_steps=6),
        resume_from_checkpoint=str(checkpoint),
    )
    assert resumed.state.global_step == 6
    for (name, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


# ------------------------------------------------------------------------------ sft_vrex
ENVS = [0, 0, 1, 1]


def _invariant(tmp_path, lambda_inv):
    from causalrec.training import InvariantSFTTrainer

    tok = tiny_tokenizer()
    data = _dataset().add_column("environment", ENVS)
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=4)
    trainer = InvariantSFTTrainer(
        model=tiny_model(tok),
        args=args,
        train_dataset=data,
        processing_class=tok,
        n_environments=2,
        lambda_inv=lambda_inv,
    )
    return trainer, tok


def test_vrex_sft_loss_is_the_sft_loss_plus_the_variance_of_the_environments_mean_row_losses(tmp_path):
    """Against a hand computation from one plain forward per row: TRL's loss is the token mean over the batch; each
    row's risk is its mean target-token NLL, each environment's the mean of its rows; V-REx their variance."""
    trainer, tok = _invariant(tmp_path, lambda_inv=3.0)
    trainer.model.eval()  # no dropout in the tiny Llama anyway; the forward is deterministic
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["environment"].tolist() == ENVS
    got = trainer.compute_loss(trainer.model, dict(batch)).item()

    nll, tokens = [], []
    for h, t in zip(HISTORIES, TARGETS):
        nll.append(-completion_logp(trainer.model, tok, FMT.prompt(h), completion_text(t)))
        tokens.append(len(tok(completion_text(t)).input_ids) + 1)  # + EOS
    base = sum(nll) / sum(tokens)
    rows = [n / k for n, k in zip(nll, tokens)]
    risks = [(rows[0] + rows[1]) / 2, (rows[2] + rows[3]) / 2]
    variance = ((risks[0] - risks[1]) / 2) ** 2
    assert variance > 1e-4, "the check needs environments whose risks differ"
    assert got == pytest.approx(base + 3.0 * variance, rel=1e-5)

    plain, _ = _invariant(tmp_path / "plain", lambda_inv=0.0)
    assert plain.compute_loss(plain.model, dict(batch)).item() == pytest.approx(base, rel=1e-5)


def test_vrex_sft_refuses_batches_and_losses_it_cannot_split_by_row(tmp_path):
    from causalrec.errors import ConfigError
    from causalrec.training import InvariantSFTTrainer

    tok = tiny_tokenizer()
    data = _dataset().add_column("environment", ENVS)
    for bad, match in (
        ({"padding_free": True, "max_length": None}, "padding_free"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing"),
    ):
        with pytest.raises(ConfigError, match=match):
            InvariantSFTTrainer(
                model=tiny_model(tok),
                args=_args(tmp_path, max_steps=1, **bad),
                train_dataset=data,
                processing_class=tok,
                n_environments=2,
                lambda_inv=1.0,
            )
    with pytest.raises(DataError, match="environment"):
        InvariantSFTTrainer(
            model=tiny_model(tok),
            args=_args(tmp_path, max_steps=1),
            train_dataset=_dataset(),
            processing_class=tok,
            n_environments=2,
            lambda_inv=1.0,
        )


def test_vrex_sft_trains_and_a_batch_of_one_environment_has_no_penalty(tmp_path):
    trainer, _ = _invariant(tmp_path, lambda_inv=1.0)
    one = trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)])  # both of environment 0
    plain, _ = _invariant(tmp_path / "plain", lambda_inv=0.0)
    assert trainer.compute_loss(trainer.model, dict(one)).item() == pytest.approx(
        plain.compute_loss(plain.model, dict(one)).item(), rel=1e-6
    )
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert any("vrex_penalty" in entry for entry in trainer.state.log_history), "the penalty is logged"
