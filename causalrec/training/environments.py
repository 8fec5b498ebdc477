"""Environments for CausalDPO: soft assignments, per-environment risks, backdoor weights, invariance penalties.

Pure torch, no TRL: every function takes tensors and returns tensors, so each piece is tested on its own.

Notation: ``N`` samples, ``K`` environments, ``q [N, K]`` assignment of sample i to environment e (rows sum to
one), ``l [N]`` per-sample losses. Conventions shared by all functions:

* An environment is *active* in a batch when its mass ``Σ_i q_ie`` exceeds ``MIN_MASS``. With known labels
  (season, region) most batches miss some environments; inactive ones get risk 0, are left out of every
  penalty, and the backdoor sum is renormalised over the active ones (``mask`` arguments, default: all active).
* The backdoor prior ``P(e)`` is a property of the whole training set, never of the batch: label environments
  use the label frequencies of the training set (computed once); latent environments keep an exponential moving
  average of the batch assignments in ``EnvironmentModel.prior`` (initialised from the clustering sample).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from causalrec.errors import ConfigError, DataError
from causalrec.training.losses import sdpo_loss_from_logits

MIN_MASS = 1e-6


def soft_assign(
    h: torch.Tensor, prototypes: torch.Tensor, tau: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """``q_ie = softmax_e(-||h_i - c_e||² / tau)``: ``[N, H]``, ``[K, H]`` -> ``[N, K]``.

    With a ``prior [K]`` the mixture posterior ``q_ie ∝ P(e) exp(-||h_i - c_e||² / tau)`` (an isotropic Gaussian
    mixture's E-step with mixing weights ``P``); a uniform prior gives the plain softmax."""
    logits = -torch.cdist(h, prototypes).pow(2) / tau
    if prior is not None:
        logits = logits + prior.to(logits).clamp_min(1e-12).log()
    return torch.softmax(logits, dim=-1)


def label_assign(labels: torch.Tensor, n_environments: int) -> torch.Tensor:
    """One-hot assignment from integer labels ``[N]``; a label of -1 (an environment never seen in training,
    e.g. an out-of-distribution evaluation row) is spread uniformly over the K training environments."""
    labels = labels.long()
    if labels.numel() and int(labels.max()) >= n_environments:
        raise DataError(f"environment label {int(labels.max())} out of range for {n_environments} environments")
    known = labels >= 0
    q = torch.full((labels.numel(), n_environments), 1.0 / n_environments, device=labels.device)
    q[known] = F.one_hot(labels[known], n_environments).float()
    return q


def active_environments(q: torch.Tensor) -> torch.Tensor:
    """``[K]`` bool: environments with mass in this batch."""
    return q.sum(dim=0) > MIN_MASS


def environment_risks(losses: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``R_e = Σ_i q_ie l_i / Σ_i q_ie`` (0 for an environment without mass): ``[N]``, ``[N, K]`` -> ``[K]``."""
    mass = q.sum(dim=0)
    return (q * losses.unsqueeze(-1)).sum(dim=0) / mass.clamp_min(MIN_MASS)


def backdoor_loss(risks: torch.Tensor, prior: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Backdoor-adjusted risk ``Σ_e P(e) R_e`` over the active environments, ``P`` renormalised over them."""
    weights = prior.to(risks) if mask is None else prior.to(risks) * mask.to(risks)
    total = weights.sum()
    if total <= 0:
        raise DataError("no active environment has positive prior mass; check the environment prior")
    return (weights * risks).sum() / total


def vrex_penalty(risks: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """V-REx: (population) variance of the active environments' risks; 0 with fewer than two."""
    active = risks if mask is None else risks[mask]
    if active.numel() < 2:
        return risks.sum() * 0.0
    return (active - active.mean()).pow(2).mean()


def rbf_kernel(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Sum of Gaussian kernels ``Σ_σ exp(-(x_i - y_j)² / 2σ²)`` on scalars: ``[N]``, ``[M]`` -> ``[N, M]``."""
    sq = (x.unsqueeze(-1) - y.unsqueeze(0)).pow(2)
    return sum(torch.exp(-sq / (2.0 * s * s)) for s in bandwidths)


MMD_ESTIMATORS = ("biased", "unbiased")


def mmd_penalty(
    values: torch.Tensor,
    q: torch.Tensor,
    bandwidths: Sequence[float] = (1.0,),
    mask: torch.Tensor | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """Mean pairwise RBF-MMD² between the environments' soft-weighted distributions of ``values [N]``.

    Environment e's distribution puts weight ``w_ei = q_ie / Σ_i q_ie`` on ``values_i``; for two environments
    ``MMD² = G_ee + G_ff - 2 G_ef`` with ``G_ef = Σ_ij w_ei w_fj k(v_i, v_j)``, averaged over active pairs (as the
    paper's released code does). Zero when all environments see the same distribution, > 0 otherwise.

    ``unbiased``: the U-statistic. The biased (V-statistic) form compares every sample with itself too
    (``k(v_i, v_i) = Σ_σ 1``), which inflates ``G_ee`` by about ``1 / n_e`` and so penalises small environments
    for their size, not for a shift. The unbiased form drops the ``i = j`` terms and renormalises by the weight left:
    ``G_ef = (Σ_ij w_ei w_fj k_ij - Σ_i w_ei w_fi k_ii) / (1 - Σ_i w_ei w_fi)`` — with hard assignments exactly
    ``Σ_{i≠j∈e} k_ij / (n_e (n_e - 1))`` within and ``Σ_{i∈e, j∈f} k_ij / (n_e n_f)`` across environments. An
    environment with fewer than two samples' worth of weight (effective size ``1 / Σ_i w_ei² < 2``) has no
    unbiased estimate and is left out. The estimate can be slightly negative when the distributions agree.
    """
    if not bandwidths or any(s <= 0 for s in bandwidths):
        raise ConfigError(f"mmd_bandwidths must be positive numbers; got {list(bandwidths)}")
    if mask is None:
        mask = torch.ones(q.size(1), dtype=torch.bool, device=q.device)
    w = q[:, mask].t().to(values)
    w = w / w.sum(dim=1, keepdim=True)  # [K_active, N]
    if unbiased:
        keep = w.pow(2).sum(dim=1) <= 0.5 + 1e-6  # effective size >= 2
        w = w[keep]
    if w.size(0) < 2:
        return values.sum() * 0.0
    kernel = rbf_kernel(values, values, bandwidths)
    gram = w @ kernel @ w.t()
    if unbiased:
        self_terms = (w * kernel.diagonal()) @ w.t()
        gram = (gram - self_terms) / (1.0 - w @ w.t()).clamp_min(1e-12)
    diag = gram.diagonal()
    pairwise = diag.unsqueeze(0) + diag.unsqueeze(1) - 2.0 * gram
    k = gram.size(0)
    return pairwise.triu(diagonal=1).sum() / (k * (k - 1) / 2)


def irm_penalty(logits: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """IRMv1 for the S-DPO loss: mean over active environments of ``(∂R_e(s)/∂s at s = 1)²``.

    ``R_e(s)`` is the risk with a dummy scale ``s`` on the S-DPO logits ``z = β(r_rej - r_chosen)`` ``[N, J]``.
    For ``l(s) = softplus(logsumexp(s z))`` the derivative is ``σ(logsumexp z) Σ_j softmax(z)_j z_j``, used
    in closed form (no second autograd pass). It is zero when every environment's risk is stationary in the
    scale, positive when some environment would prefer a different scale.
    """
    lse = torch.logsumexp(logits, dim=-1)
    dl_ds = torch.sigmoid(lse) * (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    grads = environment_risks(dl_ds, q)
    if mask is not None:
        grads = grads[mask]
    return grads.pow(2).mean() if grads.numel() else logits.sum() * 0.0


def irm_penalty_autograd(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Reference IRMv1 through autograd (slow, for tests): same value as ``irm_penalty``."""
    scale = torch.ones((), device=logits.device, requires_grad=True)
    risks = environment_risks(sdpo_loss_from_logits(scale * logits), q)
    grads = [torch.autograd.grad(r, scale, create_graph=True)[0] for r in risks]
    return torch.stack(grads).pow(2).mean()


def cluster_loss(h: torch.Tensor, prototypes: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Soft k-means distortion ``mean_i Σ_e q_ie ||h_i - c_e||²``."""
    return (q * torch.cdist(h, prototypes).pow(2)).sum(dim=-1).mean()


def balance_loss(q: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(mean_i q_i || P)``, ``P`` uniform by default: zero when the batch uses the environments in the
    proportions ``P``; keeps clusters from collapsing into one (uniform) or from drifting away from the frequencies
    estimated so far (``P`` the running prior: the data, not the loss, decides how unequal they are)."""
    mean_q = q.mean(dim=0).clamp_min(1e-12)
    target = torch.full_like(mean_q, 1.0 / q.size(1)) if prior is None else prior.to(mean_q).clamp_min(1e-12)
    return (mean_q * (mean_q / target).log()).sum()


def contingency(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` counts of the pairs ``(labels_a[i], labels_b[i])`` (non-negative integer labels)."""
    a, b = labels_a.long(), labels_b.long()
    n_b = int(b.max()) + 1 if b.numel() else 0
    table = torch.zeros(int(a.max()) + 1 if a.numel() else 0, n_b, dtype=torch.float64)
    table.view(-1).index_add_(0, a * n_b + b, torch.ones(a.numel(), dtype=torch.float64))
    return table


def normalized_mutual_information(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """NMI with the arithmetic-mean normaliser ``I(A; B) / ((H(A) + H(B)) / 2)`` (scikit-learn's default); 1 when
    one labelling determines the other up to renaming, 0 when independent (and when both are constant)."""
    p = contingency(labels_a, labels_b)
    p = p / p.sum()
    pa, pb = p.sum(1), p.sum(0)

    def entropy(x):
        x = x[x > 0]
        return float(-(x * x.log()).sum())

    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    norm = (entropy(pa) + entropy(pb)) / 2
    return max(0.0, mi / norm) if norm > 0 else 1.0  # norm 0: both labellings constant, hence identical


def adjusted_rand_index(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """Hubert and Arabie's adjusted Rand index: 1 for identical partitions (up to renaming), ~0 for random ones."""
    table = contingency(labels_a, labels_b)

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    n = float(table.sum())
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2) if n > 1 else 0.0
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def linear_probe(
    x: torch.Tensor, labels: torch.Tensor, seed: int = 0, weight_decay: float = 1e-3, steps: int = 100
) -> tuple[float, float]:
    """``(accuracy, chance)`` of a multinomial logistic regression predicting ``labels`` from ``x [N, H]``: fitted
    (L-BFGS, L2 ``weight_decay``) on a seeded half of the rows, scored on the other half; ``chance`` is the
    held-out share of the training half's most frequent label. Whether an environment is in a representation at
    all, whatever clusters the representation forms."""
    n = x.size(0)
    if n < 4:
        raise DataError(f"a linear probe needs at least 4 samples; got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = order[: n // 2], order[n // 2 :]
    x = x.double()
    y = labels.long()
    n_classes = int(y.max()) + 1
    weight = torch.zeros(x.size(1), n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x[fit] @ weight + bias, y[fit]) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        accuracy = float(((x[held] @ weight + bias).argmax(dim=1) == y[held]).double().mean())
    majority = int(torch.bincount(y[fit], minlength=n_classes).argmax())
    return accuracy, float((y[held] == majority).double().mean())


def assignment_entropy(q: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the assignment rows (0: hard assignments, log K: uniform)."""
    return -(q * q.clamp_min(1e-12).log()).sum(dim=-1).mean()


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``[N, H]`` -> ``[k, H]`` centres chosen among the rows."""
    if x.size(0) < k:
        raise DataError(f"cannot seed {k} environment prototypes from {x.size(0)} samples; use fewer environments")
    first = torch.randint(x.size(0), (1,), generator=generator).item()
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(-1)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:  # all points coincide with a centre: pick any remaining row
            idx = torch.randint(x.size(0), (1,), generator=generator).item()
        else:
            idx = torch.multinomial(d2 / d2.sum(), 1, generator=generator).item()
        centres.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(-1))
    return torch.stack(centres)


def lloyd(x: torch.Tensor, centres: torch.Tensor, n_iter: int = 10) -> torch.Tensor:
    """A few hard k-means (Lloyd) iterations; an emptied cluster keeps its centre."""
    for _ in range(n_iter):
        labels = torch.cdist(x, centres).argmin(dim=1)
        one_hot = F.one_hot(labels, centres.size(0)).to(x)
        counts = one_hot.sum(0)
        moved = (one_hot.t() @ x) / counts.clamp_min(1).unsqueeze(-1)
        centres = torch.where(counts.unsqueeze(-1) > 0, moved, centres)
    return centres


class EnvironmentModel(nn.Module):
    """K learned prototypes over prompt representations: ``q(e|x) = softmax(-||h - c_e||² / tau)``.

    Args:
        n_environments: K.
        hidden_size: size of the representations ``h``.
        tau: softmax temperature (smaller: harder assignments).
        normalize: standardise ``h`` per dimension (mean and std of the initialisation sample, then fixed) and
            L2-normalise it, so squared distances lie in [0, 4] whatever the backbone. Without the centring, an
            LLM's prompt states all point the same way (anisotropy) and every assignment comes out uniform.
        prior_momentum: EMA momentum of the environment prior ``P(e)`` (see ``update_prior``).
        estimated_prior: assign by the mixture posterior ``q ∝ P(e) exp(-d² / tau)`` with ``P`` the running
            prior, and balance towards ``P`` (``clustering_losses``), instead of the plain softmax balanced towards
            equal sizes.
    """

    def __init__(
        self,
        n_environments: int,
        hidden_size: int,
        tau: float = 1.0,
        normalize: bool = True,
        prior_momentum: float = 0.99,
        estimated_prior: bool = False,
    ):
        super().__init__()
        if n_environments < 1:
            raise ConfigError(f"n_environments must be >= 1; got {n_environments}")
        if tau <= 0:
            raise ConfigError(f"tau must be > 0; got {tau}")
        if not 0.0 <= prior_momentum < 1.0:
            raise ConfigError(f"prior_momentum must be in [0, 1); got {prior_momentum}")
        self.tau, self.normalize, self.prior_momentum = float(tau), normalize, float(prior_momentum)
        self.estimated_prior = estimated_prior
        self.prototypes = nn.Parameter(torch.zeros(n_environments, hidden_size))
        self.register_buffer("prior", torch.full((n_environments,), 1.0 / n_environments))
        self.register_buffer("center", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def n_environments(self) -> int:
        return self.prototypes.size(0)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.prototypes.dtype)
        return F.normalize((h - self.center) / self.scale, dim=-1) if self.normalize else h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` raw representations -> ``[N, K]`` soft assignments."""
        return soft_assign(self.features(h), self.prototypes, self.tau, self.prior if self.estimated_prior else None)

    @torch.no_grad()
    def initialize(self, h: torch.Tensor, n_iter: int = 10, seed: int = 0) -> None:
        """Fix the standardisation, seed the prototypes by k-means++ and ``n_iter`` Lloyd steps on a sample
        ``h [N, H]``, and the prior by the sample's mean assignment (with ``estimated_prior``: 10 EM steps of the
        mixing weights, the prototypes fixed)."""
        h = h.to(self.prototypes)
        if self.normalize:
            self.center.copy_(h.mean(dim=0))
            self.scale.copy_(h.std(dim=0).clamp_min(1e-6) if h.size(0) > 1 else torch.ones_like(self.scale))
        x = self.features(h)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        centres = lloyd(x, kmeans_plus_plus(x.cpu(), self.n_environments, generator).to(x), n_iter)
        self.prototypes.copy_(centres)
        self.prior.fill_(1.0 / self.n_environments)
        for _ in range(10 if self.estimated_prior else 1):  # EM on the mixing weights, the centres fixed
            self.prior.copy_(self(h).mean(dim=0))
        self.initialized.fill_(True)

    @torch.no_grad()
    def update_prior(self, q: torch.Tensor) -> None:
        """``P ← m P + (1 - m) mean_i q_i``: a running estimate of the training-set environment frequencies."""
        self.prior.mul_(self.prior_momentum).add_((1.0 - self.prior_momentum) * q.detach().mean(dim=0).to(self.prior))

    def clustering_losses(self, h: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft k-means distortion, balance KL) for representations ``h`` and their assignments ``q``."""
        target = self.prior if self.estimated_prior else None
        return cluster_loss(self.features(h), self.prototypes, q), balance_loss(q, target)
