"""The S-DPO loss in pure torch (no TRL), shared by the trainers and the invariance penalties.

S-DPO (Chen et al., 2024, "On Softmax Direct Preference Optimization for Recommendation") compares the
chosen item with J rejected items at once::

    l_i = -log σ( -log Σ_j exp(β [(π_ij - ref_ij) - (π_ic - ref_ic)]) )

where π/ref are summed completion log-probabilities under policy/reference. With J = 1 this is the
sigmoid DPO loss ``-log σ(β [(π_c - ref_c) - (π_r - ref_r)])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpo_logits(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """``z_ij = β (rejected_ij - chosen_i)``: ``[N]`` and ``[N, J]`` log-ratios -> ``[N, J]``."""
    return beta * (rejected_logratios - chosen_logratios.unsqueeze(-1))


def sdpo_loss_from_logits(z: torch.Tensor) -> torch.Tensor:
    """Per-sample S-DPO loss ``-log σ(-logsumexp_j z_ij)`` = ``softplus(logsumexp_j z_ij)``, ``[N, J] -> [N]``."""
    return F.softplus(torch.logsumexp(z, dim=-1))


def sdpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-sample S-DPO losses from summed log-probs: chosen ``[N]``, rejected ``[N, J]`` -> ``[N]``."""
    return sdpo_loss_from_logits(sdpo_logits(policy_chosen - ref_chosen, policy_rejected - ref_rejected, beta))
