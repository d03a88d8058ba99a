"""Coarse labels narrowed to the cells that look abnormal: an image-level label is not a defect mask.

A labelled anomaly without a pixel mask marks every cell of its image abnormal (so do its RACP samples, which
paste the whole image), although most of those cells look like any normal cell. BG-SPP then pushes normal-looking
cells below the boundary while pulling the same-looking cells of normal images above it, and BGAD-FAS's focal
weights raise exactly those "hard" abnormal cells. On shared data read without masks this put validation below
plain BGAD's (DeepPCB boards, MTD-200; BENCHMARKS.md, "Labels that never hurt"), the held-out solar cells' failure.

``coarse_labels: distant`` (the default) narrows every coarse label (one over at least ``COARSE_LABEL_SHARE`` of
its image's cells: image-level labels, their RACP samples, loose boxes) to the cells whose distance to the nearest
training-normal patch (``components.memory_bank``, PatchCore's evidence, independent of the flows being trained)
is above ``DISTANT_QUANTILE`` of normal cells' distances, measured on the training normals the memory bank leaves
out; at least its most distant cell stays abnormal (the label says something is). The rest of the label is left out of
the losses (``IGNORED``): neither pushed out as abnormal nor pulled in as normal, as it may hold a subtler part of
the defect. Labels over less of their image are pixel masks and stay as they are. ``coarse_labels: all`` is the
paper's: every labelled cell is pushed.

    >>> import torch
    >>> labels = [torch.ones(1, 4, 4, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long)]
    >>> distances = torch.zeros(1, 4, 4)
    >>> distances[0, 0, :2] = 5.0
    >>> narrowed = narrow_coarse_labels(labels, torch.tensor([True]), distances, threshold=3.0, abnormal_fraction=0.25)
    >>> narrowed[0][0].tolist()
    [[1, 1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]]
    >>> narrowed[1][0].tolist()
    [[1, -1], [-1, -1]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bgad_core.models.components.cells import IGNORED

COARSE_LABEL_SHARE = 0.5  # a label over at least half of an image's cells says "this image", not "these pixels"
# of held-out normal cells' distances: a labelled cell stays abnormal where it is farther from every normal patch
# than 90 % of normal cells are. 0.999 narrowed too far where the defect's evidence is spread over the image
# (BrainMRI: 1.8 % of the labelled cells kept, test image AUROC -0.048); 0.9 kept 22-51 % there and on the DeepPCB
# boards, and changed no dataset's validation by more than 0.002 except to gain (BENCHMARKS.md, "Coarse labels").
DISTANT_QUANTILE = 0.9


def coarse_rows(finest_labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` whether each row's label covers at least ``COARSE_LABEL_SHARE`` of its ``(N, H, W)`` cells."""
    return (finest_labels != 0).flatten(1).float().mean(dim=1) >= COARSE_LABEL_SHARE


def distant_threshold(normal_distances: torch.Tensor) -> float:
    """The ``DISTANT_QUANTILE`` of normal cells' nearest-normal distances (any shape), by order statistic (no size
    limit, unlike ``torch.quantile``)."""
    values = normal_distances.flatten().float()
    rank = min(values.numel(), max(1, round(DISTANT_QUANTILE * values.numel())))
    return float(values.kthvalue(rank).values)


def narrow_coarse_labels(
    labels: Sequence[torch.Tensor], rows: torch.Tensor, distances: torch.Tensor, threshold: float,
    abnormal_fraction: float,
) -> list[torch.Tensor]:
    """Every level's ``(N, H_l, W_l)`` cell labels with the coarse labels of ``rows`` narrowed to distant cells.

    Args:
        labels: per level, cell labels 0 / 1 / ``IGNORED`` (``fiber_labels``); level 0's grid is the distances'.
        rows: ``(N,)`` bool, the rows to narrow (``coarse_rows``).
        distances: ``(rows.sum(), H_0, W_0)`` nearest-normal distances of those rows, in ``rows``' order.
        threshold: the distance above which a labelled cell stays abnormal (``distant_threshold``).
        abnormal_fraction: share of distant finest cells from which a coarser level's cell stays abnormal (the
            same rule as a pixel mask's share of a cell, ``fiber_labels``).
    """
    labelled = labels[0][rows] == 1
    distant = labelled & (distances > threshold)
    # at least the most distant labelled cell of each row stays abnormal
    most = torch.where(labelled, distances, torch.tensor(-torch.inf)).flatten(1).argmax(dim=1)
    distant.flatten(1)[torch.arange(len(most)), most] |= labelled.flatten(1)[torch.arange(len(most)), most]
    narrowed = []
    for level in labels:
        share = F.adaptive_avg_pool2d(distant.unsqueeze(1).float(), tuple(level.shape[-2:])).squeeze(1)
        part = level[rows]
        part = torch.where((part == 1) & (share < abnormal_fraction), torch.tensor(IGNORED), part)
        level = level.clone()
        level[rows] = part
        narrowed.append(level)
    return narrowed
