"""``CausalDPOConfig``: the settings of CausalDPO on ``SDPOConfig``; the method is in ``causal_dpo_trainer``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from causalrec.errors import ConfigError, UnknownNameError
from causalrec.training.environments import MMD_ESTIMATORS
from causalrec.training.sdpo_config import SDPOConfig, require_numbers

logger = logging.getLogger(__name__)


ENV_SOURCES = ("latent", "season", "region")
INVARIANCES = ("mmd", "vrex", "irm", "none")
ENV_PRIORS = ("uniform", "estimated")
INVARIANCE_TARGETS = ("chosen", "margin")
ENV_STATE_FILE = "causal_environments.pt"


@dataclass
class CausalDPOConfig(SDPOConfig):
    r"""
    Configuration class for [`CausalDPOTrainer`].

    Only the CausalDPO parameters are listed; every [`SDPOConfig`] / [`~trl.DPOConfig`] field is accepted. Where the
    paper gives no value (it reports none for the weights below in the text we could access), the default is ours.

    Parameters:
        n_environments (`int`, *optional*, defaults to `4`):
            Number K of latent environments (prototypes). Ignored for label sources, where K is the number of
            distinct labels in the training set. `1` reduces CausalDPO to S-DPO.
        env_source (`str`, *optional*, defaults to `"season"`):
            Where environments come from: `"latent"` (soft clustering of prompt representations), `"season"` or
            `"region"` (the known label columns).
        tau_final (`float` or `None`, *optional*, defaults to `None`):
            With a value, `tau` is annealed geometrically, `tau * (tau_final / tau) ** (step / max_steps)`, from the
            first optimizer step to the last (latent environments only): soft assignments while the prototypes
            move, hard ones at the end, so the result does not hinge on one temperature. `None`: `tau` throughout.
        tau (`float`, *optional*, defaults to `0.1`):
            Softmax temperature of the soft assignment over L2-normalised representations (squared distances in
            [0, 4]); smaller is harder. At 0.3 and above the assignments of real prompt states are near uniform,
            the distortion term then pulls every prototype to the mean and the clusters collapse (CausalDPO
            silently becomes S-DPO); tests/test_training_environments.py pins this.
        env_normalize (`bool`, *optional*, defaults to `True`):
            L2-normalise prompt representations before clustering, so `tau` means the same for every backbone.
        invariance (`str`, *optional*, defaults to `"mmd"`):
            Invariance penalty: `"mmd"` (RBF-MMD² between environments' distributions of the policy's chosen-item
            log-ratio, the paper's choice), `"vrex"` (variance of environment risks), `"irm"` (IRMv1) or `"none"`.
        lambda_inv (`float`, *optional*, defaults to `0.1`):
            Weight of the invariance penalty after warm-up. Not stated in the paper text available to us (its
            released code uses 0.001 on a different quantity); 0.1 is our default — tune it.
        inv_warmup_steps (`int`, *optional*, defaults to `0`):
            Linear warm-up of `lambda_inv` from 0 over this many optimizer steps (0: full weight from the start).
        invariance_target (`str`, *optional*, defaults to `"chosen"`):
            The per-sample value whose distributions the `mmd` penalty compares across environments: `"chosen"`,
            the policy's chosen-item log-ratio (the paper's released code), or `"margin"`, the reward margin
            `beta * (chosen log-ratio - mean rejected log-ratio)` (TRL's `rewards/margins` per sample: the
            quantity the paper's text names).
        mmd_estimator (`str`, *optional*, defaults to `"biased"`):
            `"biased"` (V-statistic, as the paper's code) or `"unbiased"` (U-statistic; see
            `causalrec.training.environments.mmd_penalty`).
        mmd_bandwidths (`list[float]`, *optional*, defaults to `[1.0]`):
            RBF bandwidths σ (kernel `Σ_σ exp(-d²/2σ²)`); the paper and its code use one RBF kernel with σ = 1.
        cluster_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the soft k-means distortion that trains the prototypes (latent environments only).
        balance_weight (`float`, *optional*, defaults to `1.0`):
            Weight of `KL(mean_i q_i || P)`, which keeps clusters from collapsing (latent only); `P` is uniform or
            the estimated prior (`env_prior`).
        env_prior (`str`, *optional*, defaults to `"uniform"`):
            Latent environments: `"uniform"` (the paper) assigns by the plain softmax and balances every batch
            towards equal cluster sizes; `"estimated"` assigns by the mixture posterior `q ∝ P(e) exp(-d² / tau)`
            with `P` the running estimate of the environment frequencies (`prior_momentum`) and balances towards
            it, so the data, not the loss, decides how unequal the environments are.
        prototype_learning_rate (`float`, *optional*, defaults to `1e-2`):
            Learning rate of the prototypes' optimizer parameter group.
        prior_momentum (`float`, *optional*, defaults to `0.99`):
            EMA momentum of the latent environment prior `P(e)` (label priors are exact training-set frequencies).
        env_init_samples (`int`, *optional*, defaults to `512`):
            Training prompts whose representations seed the prototypes (k-means++ then 10 Lloyd steps) before the
            first step.
    """

    n_environments: int = field(default=4, metadata={"help": "Number K of latent environments (prototypes)."})
    env_source: str = field(
        default="season",
        metadata={
            "help": "Environment source: 'season' (the default: retail's known confounder), 'region' or 'latent'."
        },
    )
    tau: float = field(default=0.1, metadata={"help": "Temperature of the soft environment assignment."})
    tau_final: float | None = field(
        default=None,
        metadata={
            "help": "Anneal tau geometrically from tau to this value over the training steps (deterministic "
            "annealing: soft, then hard clusters); None keeps tau fixed."
        },
    )
    env_normalize: bool = field(
        default=True, metadata={"help": "L2-normalise prompt representations before clustering."}
    )
    invariance: str = field(default="mmd", metadata={"help": "Invariance penalty: 'mmd', 'vrex', 'irm' or 'none'."})
    lambda_inv: float = field(default=0.1, metadata={"help": "Weight of the invariance penalty after warm-up."})
    inv_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which lambda_inv rises linearly from 0."}
    )
    invariance_target: str = field(
        default="chosen",
        metadata={
            "help": "Values the mmd penalty compares across environments: 'chosen' (chosen-item log-ratio, the "
            "paper's code) or 'margin' (per-sample reward margin beta * (chosen - mean rejected log-ratio))."
        },
    )
    mmd_estimator: str = field(
        default="biased",
        metadata={
            "help": "MMD² estimator of the penalty: 'biased' (V-statistic, the paper's code) or 'unbiased' "
            "(U-statistic: no sample compared with itself; environments need >= 2 samples' weight)."
        },
    )
    mmd_bandwidths: list[float] = field(
        default_factory=lambda: [1.0], metadata={"help": "RBF kernel bandwidths for the MMD penalty."}
    )
    cluster_weight: float = field(default=1.0, metadata={"help": "Weight of the soft k-means distortion."})
    balance_weight: float = field(
        default=1.0, metadata={"help": "Weight of the cluster balance term KL(mean q || uniform)."}
    )
    env_prior: str = field(
        default="uniform",
        metadata={
            "help": "Latent environments' prior: 'uniform' (balanced towards equal sizes, the paper) or "
            "'estimated' (mixture posterior with the running frequency estimate, balanced towards it)."
        },
    )
    prototype_learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate of the prototypes."})
    prior_momentum: float = field(default=0.99, metadata={"help": "EMA momentum of the latent environment prior."})
    env_init_samples: int = field(default=512, metadata={"help": "Training prompts used to seed the prototypes."})

    def __post_init__(self):
        if self.env_source not in ENV_SOURCES:
            raise UnknownNameError("env_source", self.env_source, ENV_SOURCES)
        if self.invariance not in INVARIANCES:
            raise UnknownNameError("invariance", self.invariance, INVARIANCES)
        require_numbers(
            self,
            integers=("n_environments", "inv_warmup_steps", "env_init_samples"),
            numbers=(
                "tau",
                "lambda_inv",
                "cluster_weight",
                "balance_weight",
                "prototype_learning_rate",
                "prior_momentum",
            ),
        )
        if not isinstance(self.mmd_bandwidths, (list, tuple)) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in self.mmd_bandwidths
        ):
            raise ConfigError(f"mmd_bandwidths must be a list of numbers; got {self.mmd_bandwidths!r}")
        if self.env_prior not in ENV_PRIORS:
            raise UnknownNameError("env_prior", self.env_prior, ENV_PRIORS)
        if self.invariance_target not in INVARIANCE_TARGETS:
            raise UnknownNameError("invariance_target", self.invariance_target, INVARIANCE_TARGETS)
        if self.mmd_estimator not in MMD_ESTIMATORS:
            raise UnknownNameError("mmd_estimator", self.mmd_estimator, MMD_ESTIMATORS)
        checks = {
            "n_environments must be >= 1": self.n_environments >= 1,
            "tau must be > 0": self.tau > 0,
            "tau_final must be > 0": self.tau_final is None or self.tau_final > 0,
            "lambda_inv must be >= 0": self.lambda_inv >= 0,
            "inv_warmup_steps must be >= 0": self.inv_warmup_steps >= 0,
            "mmd_bandwidths must be positive numbers": bool(self.mmd_bandwidths)
            and all(s > 0 for s in self.mmd_bandwidths),
            "cluster_weight must be >= 0": self.cluster_weight >= 0,
            "balance_weight must be >= 0": self.balance_weight >= 0,
            "prototype_learning_rate must be > 0": self.prototype_learning_rate > 0,
            "prior_momentum must be in [0, 1)": 0 <= self.prior_momentum < 1,
            "env_init_samples must be >= 1": self.env_init_samples >= 1,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ConfigError("invalid CausalDPO config: " + "; ".join(failed))
        self.mmd_bandwidths = [float(s) for s in self.mmd_bandwidths]
        super().__post_init__()
