"""Feature cells, the unit every family scores: their locally aggregated embeddings and their defect labels.

A cell is one position of a cached backbone level. PatchCore and SimpleNet compare cells as concatenated, locally
averaged multi-level embeddings (``patch_embeddings``); BGAD and few-shot SimpleNet learn from cells labelled by how
much of them a defect mask covers (``fiber_labels``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bgad_core.data.features import local_average
from bgad_core.errors import ConfigError

IGNORED = -1  # cells that are partly defect: neither pulled in as normal nor pushed out as abnormal


def patch_embeddings(features: Sequence[torch.Tensor], levels: Sequence[int] | None = None) -> torch.Tensor:
    """Locally aggregated float32 patch features ``(N, C, H, W)`` at the resolution of ``levels[0]`` (None: all).

    Each chosen level is averaged over 3x3 neighbourhoods (a patch sees its surroundings), upsampled bilinearly to
    the first chosen level's grid and concatenated along channels.
    """
    levels = range(len(features)) if levels is None else levels
    for level in levels:
        if not 0 <= level < len(features):
            raise ConfigError(f"feature level {level} does not exist: the features have {len(features)} levels")
    grid = features[levels[0]].shape[-2:]
    parts = []
    for level in levels:
        pooled = local_average(features[level], 3)
        if pooled.shape[-2:] != grid:
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        parts.append(pooled)
    return torch.cat(parts, dim=1)


def fiber_labels(mask_fractions: torch.Tensor, abnormal_fraction: float) -> torch.Tensor:
    """Label each feature cell 0 (no defect), 1 (defect share >= ``abnormal_fraction``) or IGNORED (in between)."""
    labels = torch.zeros_like(mask_fractions, dtype=torch.long)
    labels[mask_fractions > 0] = IGNORED
    labels[mask_fractions >= abnormal_fraction] = 1
    return labels
