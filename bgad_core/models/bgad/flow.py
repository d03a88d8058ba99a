"""Conditional normalizing flows (FrEIA) and the log-likelihood they assign to feature vectors.

One flow per feature level maps a feature vector x (conditioned on its position) to a latent z that should be
standard normal for normal data. log p(x) = log N(z; 0, I) + log|det dz/dx| (paper Eq. 6).
"""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)


def subnet_fc(dims_in: int, dims_out: int) -> nn.Module:
    """Coupling subnet: Linear-ReLU-Linear with a 2x hidden width, as in CFlow-AD / BGAD."""
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


def build_flow(
    in_channels: int,
    cond_dim: int = 128,
    coupling_blocks: int = 8,
    clamp: float = 1.9,
) -> Ff.SequenceINN:
    """Build the paper's conditional flow for ``in_channels``-dimensional feature vectors.

    AllInOneBlock couplings with soft (learned-free, random orthogonal) permutations and a SOFTPLUS global affine
    scale; ``clamp`` bounds the affine log-scales so training cannot blow up early.
    """
    flow = Ff.SequenceINN(in_channels)
    for _ in range(coupling_blocks):
        flow.append(
            Fm.AllInOneBlock,
            cond=0,
            cond_shape=(cond_dim,),
            subnet_constructor=subnet_fc,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
    return flow


def log_likelihood(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-vector log p(x) from the flow output: standard-normal log density of z plus log|det J| (Eq. 6)."""
    dim = z.shape[1]
    return -dim * LOG_2PI_HALF - 0.5 * z.pow(2).sum(dim=1) + log_jac_det
