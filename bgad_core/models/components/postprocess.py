"""Anomaly maps at image resolution: bilinear upsampling of a score grid, then the paper's Gaussian smoothing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def upsample(grid: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w)`` scores -> ``(B, H, W)`` at ``image_size``, bilinearly (corners not aligned, as the backbone's
    cells cover the image)."""
    return F.interpolate(grid.unsqueeze(1), size=tuple(image_size), mode="bilinear", align_corners=False)[:, 0]


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
