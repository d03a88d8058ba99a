"""From per-level log-likelihood maps to anomaly maps and image scores with *fixed* normalisation.

The official code subtracts the maximum log-likelihood of the whole evaluated set, so a score depends on which
other images were evaluated with it. Here each level is standardised with constants measured once on training
normals (mean and standard deviation of their per-dim log-likelihoods) and stored with the model: the same image
always gets the same score, in a batch of one or of a thousand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bgad_core.errors import ConfigError

IMAGE_SCORE_REDUCTIONS = ("max", "top1pct_mean")


@dataclass(frozen=True)
class Normalization:
    """Per-level mean and standard deviation of normal per-dim log-likelihoods."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def fit(logp_maps: Sequence[torch.Tensor]) -> Normalization:
        """Measure the constants from each level's log-likelihood maps of normal images."""
        means, stds = [], []
        for logps in logp_maps:
            values = logps.flatten().double()
            means.append(float(values.mean()))
            stds.append(max(float(values.std()), 1e-6))
        return Normalization(tuple(means), tuple(stds))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, H, W)`` maps (truncated at 4 sigma, reflect padding), image by image."""
    if sigma <= 0:
        return maps
    radius = int(math.ceil(4 * sigma))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(maps.unsqueeze(1), (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]  # not squeeze(1): traced with a dynamic batch, that exports as a runtime If on the shape


def anomaly_maps(
    logp_maps: Sequence[torch.Tensor],
    normalization: Normalization,
    image_size: tuple[int, int],
    blur_sigma: float = 4.0,
) -> torch.Tensor:
    """Anomaly map ``(B, H, W)`` at image resolution: mean over levels of standardised negative log-likelihood.

    Each level's ``(B, H_l, W_l)`` map becomes (mean - logp) / std (higher = more anomalous), is upsampled
    bilinearly, averaged over levels and smoothed as in the paper (Gaussian, sigma 4).
    """
    total = None
    for level, logps in enumerate(logp_maps):
        score = (normalization.mean[level] - logps.float()) / normalization.std[level]
        score = F.interpolate(score.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)
        total = score if total is None else total + score
    maps = total[:, 0] / len(logp_maps)
    return gaussian_blur(maps, blur_sigma)


def image_scores(maps: torch.Tensor, reduction: str = "max") -> torch.Tensor:
    """Image-level score from each ``(H, W)`` anomaly map: its maximum, or the mean of its top 1 % pixels."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.max(dim=1).values
    if reduction == "top1pct_mean":
        k = max(1, flat.shape[1] // 100)
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ConfigError(f"image_score must be one of {IMAGE_SCORE_REDUCTIONS}, got {reduction!r}")
