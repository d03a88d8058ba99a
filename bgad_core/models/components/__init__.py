"""Parts every detector family shares: feature cells (embeddings, defect labels), levels by stride, memory banks of
normal patches (coreset, nearest-normal distances), and the way from a coarse score grid to an anomaly map at image
resolution.

    >>> import torch
    >>> from bgad_core.models.components import fiber_labels, gaussian_blur, patch_embeddings, upsample
    >>> patch_embeddings([torch.zeros(2, 8, 8, 8), torch.zeros(2, 16, 4, 4)]).shape
    torch.Size([2, 24, 8, 8])
    >>> fiber_labels(torch.tensor([0.0, 0.1, 0.5]), abnormal_fraction=0.25).tolist()
    [0, -1, 1]
    >>> gaussian_blur(upsample(torch.zeros(2, 4, 4), (32, 32)), sigma=4.0).shape
    torch.Size([2, 32, 32])
"""

from bgad_core.models.components.cells import IGNORED, fiber_labels, patch_embeddings
from bgad_core.models.components.levels import level_indices
from bgad_core.models.components.memory_bank import NearestNormal, fit_banks, greedy_coreset, nearest_distances
from bgad_core.models.components.postprocess import gaussian_blur, upsample

__all__ = ["IGNORED", "NearestNormal", "fiber_labels", "fit_banks", "gaussian_blur", "greedy_coreset",
           "level_indices", "nearest_distances", "patch_embeddings", "upsample"]
