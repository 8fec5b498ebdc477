"""CausalDPO (Zhao, Yang, Zhao, Guo, 2026, arXiv 2603.22335): S-DPO with a backdoor adjustment over
environments, soft environment clustering and an invariance penalty. ``CausalDPOConfig`` + ``CausalDPOTrainer``.

Per step, from the ONE policy and ONE reference forward of ``SDPOTrainer``:

1. per-sample S-DPO losses ``l_i`` and the prompt representation ``h_i`` (the policy backbone's last hidden
   state at the last prompt token, captured by a forward hook during the policy forward only);
2. environment assignments ``q(e|x_i)``: ``softmax(-||h_i - c_e||² / tau)`` over K learned prototypes
   (``env_source="latent"``) or one-hot known labels (``"season"``, ``"region"``);
3. per-environment risks ``R_e`` and the backdoor-adjusted loss ``Σ_e P(e) R_e`` with ``P(e)`` the training-set
   prior (see ``causalrec.training.environments`` for how it is estimated and how empty environments are handled);
4. ``+ lambda_inv(t) * penalty`` (``mmd`` on the chosen-item log-ratios — the paper's choice —, ``vrex``,
   ``irm`` or ``none``), ``lambda_inv`` warmed up linearly over ``inv_warmup_steps``;
5. latent environments only: ``+ cluster_weight * distortion + balance_weight * KL(mean q || P)``, which
   trains the prototypes (their own optimizer param group, ``prototype_learning_rate``); ``P`` is uniform (the
   paper) or, with ``env_prior="estimated"``, the running frequency estimate that also weighs the assignment.
   ``environment_recovery()`` measures what they found against the labelled seasons / regions (NMI, ARI).

Design decision: ``h`` is detached before the assignment, and ``q`` is detached inside risks and penalties. The
partition into environments is an estimate of the confounder, fitted by the clustering terms alone; if the DPO
objective could move it, the cheapest way to lower an invariance penalty would be to make every environment look
alike (uniform ``q``) or to reshape the LLM's representation for the clusterer, and the penalty would stop
measuring anything. So the LLM (LoRA) is trained by backdoor loss + penalty, the prototypes by clustering only.

With K = 1 and ``lambda_inv = 0`` the loss is exactly the S-DPO loss (and TRL's sigmoid DPO loss for J = 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from causalrec.errors import ConfigError, DataError
from causalrec.training.causal_dpo_config import ENV_STATE_FILE, CausalDPOConfig
from causalrec.training.environments import (
    EnvironmentModel,
    active_environments,
    adjusted_rand_index,
    assignment_entropy,
    backdoor_loss,
    environment_risks,
    irm_penalty,
    label_assign,
    linear_probe,
    mmd_penalty,
    normalized_mutual_information,
    vrex_penalty,
)
from causalrec.training.sdpo_config import env_id_column
from causalrec.training.sdpo_trainer import PreferenceBatch, SDPOTrainer
from causalrec.training.trl_compat import backbone_module, capture_last_hidden_state, pad

logger = logging.getLogger(__name__)


class _PrototypeGradients(TrainerCallback):
    """Gradient bookkeeping for a module that is not part of ``model``: ``Trainer`` zeroes only ``model``'s
    gradients (the prototypes' would accumulate across steps) and DDP all-reduces only ``model``'s."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        dist = torch.distributed
        # DDP on 2 CPU processes: tests/test_scale_accelerate.py
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(dist.get_world_size())

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


class CausalDPOTrainer(SDPOTrainer):
    """CausalDPO on TRL: S-DPO per-sample losses reduced by a backdoor adjustment over environments plus an
    invariance penalty; see the module docstring. Arguments are those of ``SDPOTrainer`` with a ``CausalDPOConfig``.

    Attributes:
        environment_model: the ``EnvironmentModel`` (latent environments), else None.
        env_prior: ``[K]`` training-set environment frequencies (label environments), else None.
        env_names: a name per environment (label values, or ``e0``, ``e1``, ...), used in ``causal/*`` metrics.
    """

    _tag_names = ["trl", "dpo", "causal-dpo", "causalrec"]
    _name = "CausalDPO"

    def __init__(self, model, ref_model=None, args: CausalDPOConfig | None = None, **kwargs):
        if not isinstance(args, CausalDPOConfig):
            raise ConfigError(f"CausalDPOTrainer needs a CausalDPOConfig; got {type(args).__name__}")
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self.environment_model: EnvironmentModel | None = None
        self.env_prior: torch.Tensor | None = None
        device = self.accelerator.device
        if args.env_source == "latent":
            hidden_size = self.model.config.get_text_config().hidden_size
            self.environment_model = EnvironmentModel(
                args.n_environments,
                hidden_size,
                args.tau,
                args.env_normalize,
                args.prior_momentum,
                estimated_prior=args.env_prior == "estimated",
            ).to(device)
            self.env_names = [f"e{k}" for k in range(args.n_environments)]
            self.add_callback(_PrototypeGradients(self.environment_model))
        else:
            if args.env_source not in self.env_vocabs:
                raise DataError(
                    f"env_source={args.env_source!r} needs a {args.env_source!r} column in the training set; "
                    f"it has {sorted(self.train_dataset.column_names)}"
                )
            self.env_names = self.env_vocabs[args.env_source]
            labels = torch.tensor(self.train_dataset[env_id_column(args.env_source)], dtype=torch.long)
            counts = torch.bincount(labels, minlength=len(self.env_names)).float()
            self.env_prior = (counts / counts.sum()).to(device)
            if args.n_environments != len(self.env_names):
                logger.info(
                    "env_source=%s: %d environments from the labels (n_environments=%d ignored)",
                    args.env_source,
                    len(self.env_names),
                    args.n_environments,
                )

    @property
    def n_environments(self) -> int:
        return len(self.env_names)

    # --------------------------------------------------------------------------- representations
    def _policy_forward(self, model, inputs):
        if self.environment_model is None or self.args.all_negatives:  # the catalog forward returns prompt_states
            return super()._policy_forward(model, inputs)
        with capture_last_hidden_state(backbone_module(self.accelerator.unwrap_model(model))) as store:
            logps, extras = super()._policy_forward(model, inputs)
        lengths = inputs["prompt_lengths"]
        rows = torch.arange(lengths.size(0), device=lengths.device)
        extras["prompt_states"] = store["hidden"][rows, lengths - 1]  # chosen rows come first
        return logps, extras

    def _sample_rows(self, num_samples: int | None) -> list[int]:
        """A seeded random sample of up to ``num_samples`` training rows (default ``args.env_init_samples``)."""
        n = min(num_samples or self.args.env_init_samples, len(self.train_dataset))
        generator = torch.Generator().manual_seed(self.args.seed)
        return torch.randperm(len(self.train_dataset), generator=generator)[:n].tolist()

    @torch.no_grad()
    def prompt_states(self, rows: list[int]) -> torch.Tensor:
        """``[n, H]`` the policy's last hidden state at the last prompt token of training rows ``rows`` (eval mode)."""
        prompts = self.train_dataset.select(rows)["prompt_ids"]
        model = self.accelerator.unwrap_model(self.model)
        backbone, device = backbone_module(model), self.accelerator.device
        pad_id = self.data_collator.pad_token_id
        batch_size = max(1, self.args.per_device_train_batch_size * self.args.rows_per_prompt)
        states = []
        was_training = model.training
        model.eval()
        for start in range(0, len(rows), batch_size):
            chunk = [torch.tensor(p, dtype=torch.long) for p in prompts[start : start + batch_size]]
            ids = pad(chunk, padding_value=pad_id, padding_side="right").to(device)
            mask = pad([torch.ones_like(p) for p in chunk], padding_value=0, padding_side="right").to(device)
            with self.compute_loss_context_manager():
                hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            lengths = torch.tensor([len(p) for p in chunk], device=device)
            states.append(hidden[torch.arange(len(chunk), device=device), lengths - 1].float())
        model.train(was_training)
        return torch.cat(states)

    @torch.no_grad()
    def initialize_environments(self, num_samples: int | None = None) -> None:
        """Seed the prototypes from the policy's representations of up to ``num_samples`` training prompts
        (default ``args.env_init_samples``, a seeded random sample). Runs before the first step if not called."""
        env = self.environment_model
        if env is None:
            return
        rows = self._sample_rows(num_samples)
        env.initialize(self.prompt_states(rows), seed=self.args.seed)
        logger.info(
            "CausalDPO: %d prototypes seeded from %d prompts; prior %s",
            env.n_environments,
            len(rows),
            [round(p, 3) for p in env.prior.tolist()],
        )

    @torch.no_grad()
    def environment_recovery(self, num_samples: int | None = None) -> dict[str, float]:
        """How well the latent environments match each labelled environment column of the training set: NMI and
        adjusted Rand index of the hard assignments of a seeded sample of training prompts (the policy as it is
        now) against the season / region labels, e.g. ``{"nmi/season": 0.07, "ari/season": 0.03, ...}``, and
        whether each label is in the clustered features at all: the held-out accuracy of a linear probe on them
        (``probe/season``) beside the majority-label rate (``chance/season``). Empty for label environments."""
        env = self.environment_model
        if env is None or not bool(env.initialized):
            return {}
        rows = self._sample_rows(num_samples)
        states = self.prompt_states(rows)
        assigned = env(states).argmax(dim=1).cpu()
        features = env.features(states).cpu()
        sample = self.train_dataset.select(rows)
        out = {}
        for col in self.env_vocabs:
            labels = torch.tensor(sample[env_id_column(col)], dtype=torch.long)
            known = labels >= 0
            out[f"nmi/{col}"] = normalized_mutual_information(assigned[known], labels[known])
            out[f"ari/{col}"] = adjusted_rand_index(assigned[known], labels[known])
            if int(known.sum()) >= 4:
                out[f"probe/{col}"], out[f"chance/{col}"] = linear_probe(
                    features[known], labels[known], seed=self.args.seed
                )
        return out

    # ------------------------------------------------------------------------------------- loss
    def current_lambda_inv(self) -> float:
        """``lambda_inv`` after the linear warm-up at the current optimizer step."""
        warmup = self.args.inv_warmup_steps
        if warmup <= 0:
            return self.args.lambda_inv
        return self.args.lambda_inv * min(1.0, self.state.global_step / warmup)

    def current_tau(self) -> float:
        """The assignment temperature at the current optimizer step: ``tau``, or with ``tau_final`` the geometric
        interpolation ``tau * (tau_final / tau) ** (step / max_steps)``."""
        tau, final = self.args.tau, self.args.tau_final
        total = self.state.max_steps
        if final is None or not total:
            return tau
        return tau * (final / tau) ** min(1.0, self.state.global_step / total)

    def environment_assignments(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(q [B, K] without grad, q with grad to the prototypes or None)``."""
        if self.environment_model is None:
            labels = batch.env[env_id_column(self.args.env_source)]
            return label_assign(labels, self.n_environments).to(batch.logits.dtype), None
        if not bool(self.environment_model.initialized):
            self.initialize_environments()
        self.environment_model.tau = self.current_tau()
        q = self.environment_model(batch.extras["prompt_states"].detach())
        return q.detach(), q

    def invariance_penalty(self, batch: PreferenceBatch, q: torch.Tensor, mask: torch.Tensor, risks: torch.Tensor):
        kind = self.args.invariance
        if kind == "mmd":
            unbiased = self.args.mmd_estimator == "unbiased"
            values = batch.chosen_logratios
            if self.args.invariance_target == "margin":
                values = self.beta * (values - batch.rejected_mean(batch.rejected_logratios))
            return mmd_penalty(values, q, self.args.mmd_bandwidths, mask, unbiased=unbiased)
        if kind == "vrex":
            return vrex_penalty(risks, mask)
        if kind == "irm":
            return irm_penalty(batch.logits, q, mask)
        return risks.sum() * 0.0

    def reduce_losses(self, losses: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
        """Backdoor-adjusted risk + lambda_inv(t) * penalty (+ clustering terms for latent environments)."""
        mode = "train" if self.model.training else "eval"
        q, q_grad = self.environment_assignments(batch)
        q = q.to(losses.dtype)
        mask = active_environments(q)
        risks = environment_risks(losses, q)
        env = self.environment_model
        prior = self.env_prior
        if env is not None:
            prior = self._prior_for_batch(q) if mode == "train" and self.n_environments > 1 else env.prior
        adjusted = backdoor_loss(risks, prior, mask)
        penalty = self.invariance_penalty(batch, q, mask, risks)
        lam = self.current_lambda_inv()
        loss = adjusted + lam * penalty
        metrics = self._metrics[mode]
        if env is not None and self.n_environments > 1:
            distortion, balance = env.clustering_losses(batch.extras["prompt_states"].detach(), q_grad)
            loss = loss + self.args.cluster_weight * distortion + self.args.balance_weight * balance
            metrics["causal/cluster_loss"].append(distortion.item())
            metrics["causal/balance_loss"].append(balance.item())
        metrics["causal/backdoor_loss"].append(adjusted.item())
        metrics["causal/penalty"].append(penalty.item())
        metrics["causal/lambda_inv"].append(lam)
        metrics["causal/assignment_entropy"].append(assignment_entropy(q).item())
        for k in torch.nonzero(mask).flatten().tolist():
            metrics[f"causal/risk/{self.env_names[k]}"].append(risks[k].item())
        return loss

    def _prior_for_batch(self, q: torch.Tensor) -> torch.Tensor:
        """The latent prior this training micro-batch's loss uses; advances the EMA past the micro-batch.

        Under DDP, process r's micro-batch is micro-batch r of a gradient-accumulation step over all N processes
        (accelerate gives global batch k to process k mod N): the batch means of all processes are gathered, this
        process's loss uses the prior with the lower ranks' updates applied, and every process applies all N
        updates in rank order. So the prior stays identical across processes, and N processes with b rows each
        train exactly like one process with b rows and ``gradient_accumulation_steps=N``.
        """
        env = self.environment_model
        means = q.detach().mean(dim=0, keepdim=True)
        if self.accelerator.num_processes > 1:
            means = self.accelerator.gather(means)  # [N, K] in rank order
        prior = None
        for rank, row in enumerate(means):
            if rank == self.accelerator.process_index:
                prior = env.prior.clone()
            env.update_prior(row.unsqueeze(0))
        return prior

    # ------------------------------------------------------------------------- optimizer, saving
    def create_optimizer(self, model=None):
        """The policy's optimizer plus a param group for the prototypes (own learning rate, no weight decay)."""
        optimizer = super().create_optimizer(model)
        env = self.environment_model
        if env is not None and not any(p is env.prototypes for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group(
                {"params": [env.prototypes], "lr": self.args.prototype_learning_rate, "weight_decay": 0.0}
            )
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the policy as TRL does, plus the environment model (``causal_environments.pt``)."""
        super().save_model(output_dir, _internal_call)
        if self.environment_model is not None and self.args.should_save:
            path = Path(output_dir or self.args.output_dir) / ENV_STATE_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.environment_model.state_dict(), path)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / ENV_STATE_FILE
        if self.environment_model is not None and path.is_file():
            state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
            self.environment_model.load_state_dict(state)
