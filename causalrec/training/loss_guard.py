"""The NaN/inf guard of the TRL stages: stop at the first non-finite loss, before the optimizer applies it, naming the
setting that can explain it; and refuse weights an update made non-finite."""

from __future__ import annotations

from causalrec.training.stage_cache import last_checkpoint


def _batch_prompts(inputs, tokenizer, limit: int = 2) -> tuple[int, list[str]]:
    """Number of examples in a TRL batch and the decoded prompts of the first ``limit``."""
    ids = inputs.get("input_ids")
    if ids is None or tokenizer is None:
        return 0, []
    lengths = inputs.get("prompt_lengths")  # preference batches: [chosen; rejected...] rows, one length per prompt
    n = int(lengths.numel()) if lengths is not None else int(ids.shape[0])
    prompts = []
    for row in range(min(limit, n)):
        if lengths is not None:
            tokens = ids[row, : int(lengths[row])]
        elif inputs.get("completion_mask") is not None:
            keep = inputs["completion_mask"][row] == 0
            if inputs.get("attention_mask") is not None:
                keep &= inputs["attention_mask"][row] == 1
            tokens = ids[row][keep]
        else:
            tokens = ids[row]
        prompts.append(tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()[:160])
    return n, prompts


def _suspects(args, first_step: bool) -> str:
    """Which settings can explain a non-finite loss at this point: before any update only the loss's own settings
    (``beta``, ``lambda_inv``) or the data can; after updates, the step size first."""

    def named(names):
        return ", ".join(f"{n}={getattr(args, n)!r}" for n in names if getattr(args, n, None) is not None)

    if first_step:
        loss_settings = named(("beta", "lambda_inv"))
        return (
            "before any update, so the learning rate is not the cause: "
            + (f"the loss's settings ({loss_settings}) overflow it, or " if loss_settings else "")
            + "these rows hold something the model cannot score; lower "
            + ("beta / lambda_inv" if loss_settings else "the loss's weights")
            + " or check the rows"
        )
    lr = named(("learning_rate", "max_grad_norm"))
    return f"after {{steps}} update(s) with {lr}: lower learning_rate or set max_grad_norm (gradient clipping)"


def guard_training_losses(trainer, stage: str) -> None:
    """Stop a transformers/TRL trainer at the first non-finite training loss, before the optimizer applies it, and
    after training if an update made the weights non-finite (one batch: no later loss would show it).

    Wraps ``trainer.training_step`` and ``trainer.train`` (public Trainer API). The ``TrainingError`` names the
    stage, the global step, the batch (size and its first prompts), the setting that can explain it
    (``_suspects``) and the last complete checkpoint, which stays on disk.
    """
    import math

    import torch

    from causalrec.errors import CausalRecError, TrainingError

    step_fn, train_fn = trainer.training_step, trainer.train

    def kept_checkpoint() -> str:
        try:
            kept = last_checkpoint(trainer.args.output_dir)
        except CausalRecError:  # a damaged last checkpoint must not hide the training error
            kept = None
        return (
            f"the last good checkpoint is kept at {kept!r}"
            if kept
            else "no checkpoint of this stage was written (set resume: true to write step checkpoints)"
        )

    def fail(inputs, what: str):
        n, prompts = _batch_prompts(inputs, getattr(trainer, "processing_class", None))
        state = trainer.state
        epoch = state.epoch if state.epoch is not None and math.isfinite(state.epoch) else 0.0
        shown = "; ".join(repr(p) for p in prompts) or "-"
        cause = _suspects(trainer.args, state.global_step == 0).format(steps=state.global_step)
        return TrainingError(
            f"{stage} training stopped: {what} at global step {state.global_step + 1} (epoch {epoch:.2f}) on a batch "
            f"of {n} examples, first prompts: {shown}. It is non-finite {cause}. The update was not applied; "
            f"{kept_checkpoint()}"
        )

    def training_step(model, inputs, *args, **kwargs):
        try:
            loss = step_fn(model, inputs, *args, **kwargs)
        except TrainingError as err:  # the preference trainers' own check: add the batch and the checkpoint
            raise fail(inputs, str(err).split(";")[0]) from None
        if not bool(torch.isfinite(loss).all()):
            raise fail(inputs, f"the loss is {loss.float().mean().item()}")
        return loss

    def train(*args, **kwargs):
        result = train_fn(*args, **kwargs)
        bad = [
            name
            for name, p in trainer.model.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(p).all())
        ]
        if bad:
            raise TrainingError(
                f"{stage} training made {len(bad)} weight tensor(s) non-finite (first: {bad[0]}) after "
                f"{trainer.state.global_step} update(s) with learning_rate={trainer.args.learning_rate!r}: the "
                f"updates overflowed; lower learning_rate or set max_grad_norm (gradient clipping). Nothing was saved"
            )
        return result

    trainer.training_step = training_step
    trainer.train = train
