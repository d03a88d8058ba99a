"""Training losses: maximum likelihood (Eq. 5), BG-SPP (Eq. 9-10) and asymmetric focal weights (Eq. 17-19).

All take per-dim log-likelihoods (log p(x) / C). Constants follow the official BGAD implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bgad_core.models.bgad.boundary import Boundary


def ml_loss(logps: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood of normal vectors, through a log-sigmoid as in the official code.

    log_sigmoid(l) ~ l for very unlikely vectors but saturates for likely ones, so the flow stops sharpening the
    density where it is already high instead of collapsing onto the training set.
    """
    loss = -F.logsigmoid(logps)
    if weights is not None:
        loss = loss * weights
    return loss.mean()


def _masked_mean(values: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the kept entries (0 when none is kept, so an absent side adds no gradient)."""
    if weights is not None:
        values = values * weights
    count = keep.sum()
    return (values * keep).sum() / count.clamp_min(1)


def bg_spp_loss(
    logps: torch.Tensor,
    labels: torch.Tensor,
    boundary: Boundary,
    normalizer: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boundary guided semi-push-pull loss, l1 form (Eq. 10).

    Normal vectors below b_n are pulled up to b_n; abnormal vectors above b_a are pushed down to b_a. Vectors
    already on the right side contribute nothing (the "semi" in semi-push-pull), and each side is averaged over
    its violators, as in the official code.
    """
    scaled = logps / normalizer
    normal = labels == 0
    abnormal = ~normal
    pull = normal & (scaled <= boundary.normal)
    push = abnormal & (scaled >= boundary.abnormal)
    loss_n = _masked_mean(boundary.normal - scaled, pull, weights)
    loss_a = _masked_mean(scaled - boundary.abnormal, push, weights)
    return loss_n + loss_a


def normal_focal_weights(
    logps: torch.Tensor, normalizer: float, gamma: float = 0.5, alpha: float = 11.7, threshold: float = -0.2
) -> torch.Tensor:
    """Eq. 17-18: up-weight hard normal vectors (low likelihood); easy ones (above ``threshold``) keep weight 1."""
    scaled = logps.detach() / normalizer
    focal = alpha * (1 - scaled.exp()).pow(gamma) * scaled.abs()
    return torch.where(scaled > threshold, torch.ones_like(scaled), focal)


def abnormal_focal_weights(
    logps: torch.Tensor, normalizer: float, gamma: float = 2.0, alpha: float = 0.53, threshold: float = -1.0
) -> torch.Tensor:
    """Eq. 19: up-weight hard abnormal vectors (high likelihood); easy ones (below ``threshold``) keep weight 1."""
    scaled = logps.detach() / normalizer
    focal = alpha * (1 + scaled.exp()).pow(gamma) / scaled.abs().clamp_min(1e-6)
    return torch.where(scaled <= threshold, torch.ones_like(scaled), focal)


def focal_weights(logps: torch.Tensor, labels: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Asymmetric focal weights for a mixed batch: the normal rule for label 0, the abnormal rule for label 1."""
    return torch.where(
        labels == 0, normal_focal_weights(logps, normalizer), abnormal_focal_weights(logps, normalizer)
    )
