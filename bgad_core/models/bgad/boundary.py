"""The explicit boundary (paper Sec. 3.3): where normal log-likelihoods end and abnormal ones must stay below.

Log-likelihoods here are *per-dimension* (log p(x) / C) so that levels of different widths share one scale;
the boundary is then divided by ``normalizer`` as in the official code, which keeps tau on a scale near 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bgad_core.errors import ConfigError


@dataclass(frozen=True)
class Boundary:
    """Normal boundary b_n and abnormal boundary b_a = b_n - tau, both on the normalised scale."""

    normal: torch.Tensor
    abnormal: torch.Tensor


def check_beta(beta: float) -> float:
    """Return ``beta`` if it is a valid percentile fraction; the boundary is undefined at 0 and 1."""
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"beta must lie in (0, 1) (a fraction, 0.05 = 5th percentile), got {beta}")
    return beta


def find_boundary(
    logps: torch.Tensor, labels: torch.Tensor, beta: float, tau: float, normalizer: float
) -> Boundary:
    """b_n = beta-quantile of the normal per-dim log-likelihoods (lower order statistic), b_a = b_n - tau.

    Args:
        logps: per-dim log-likelihoods, shape (N,).
        labels: 0 for normal, 1 for abnormal feature vectors, shape (N,).
        beta: fraction of normal vectors allowed below b_n (paper: 1-10 %).
        tau: margin between the normal and abnormal boundaries.
        normalizer: divides log-likelihoods before the margin applies.
    """
    check_beta(beta)
    normal = logps[labels == 0].detach()
    if normal.numel() == 0:
        raise ValueError("find_boundary needs at least one normal feature vector")
    rank = int(normal.numel() * beta)
    b_n = torch.kthvalue(normal, rank + 1).values / normalizer
    return Boundary(normal=b_n, abnormal=b_n - tau)
