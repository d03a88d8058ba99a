"""PatchCore as a plain ``nn.Module`` (anomalib's ``PatchcoreModel`` split): memory bank, coreset, scoring.

It sees no defect: a memory bank of locally aggregated normal patch features, thinned by a greedy coreset, and the
distance of each test patch to its nearest bank entry as the anomaly score. The family around it
(``bgad_core.models.patchcore``) adds the config, the training and the checkpointed detector; this module is what
they share.

The recipe follows the paper and anomalib's reference model: each level is averaged over 3x3 neighbourhoods,
coarser levels are upsampled (bilinear) to the finest chosen one and concatenated, the coreset is chosen by greedy
k-center selection on a random projection, and the image score re-weights the most anomalous patch's distance by
how isolated its nearest bank entry is among its ``num_neighbors`` neighbours.

Scoring is written in operations the ONNX tracer follows (matrix products, ``topk``, ``gather``; no Python branch
on a data value), so that PyTorch and an exported graph run the same code. The coreset and the distances are the
shared memory-bank parts (``bgad_core.models.components.memory_bank``).

Example:
    >>> import torch
    >>> from bgad_core.data.features import FeatureSet
    >>> def rows(n):
    ...     return FeatureSet([torch.randn(n, 8, 8, 8), torch.randn(n, 16, 4, 4)],
    ...                       [torch.zeros(n, 8, 8), torch.zeros(n, 4, 4)], torch.zeros(n, dtype=torch.long),
    ...                       [str(i) for i in range(n)])
    >>> model = PatchCore(coreset_ratio=0.1).fit(rows(4))
    >>> distance, scores = model.patch_scores(rows(2).features)
    >>> scores.shape, model.anomaly_maps(distance, (32, 32)).shape
    (torch.Size([2]), torch.Size([2, 32, 32]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError
from bgad_core.models.components.cells import patch_embeddings
from bgad_core.models.components.memory_bank import greedy_coreset, nearest_distances
from bgad_core.models.components.postprocess import gaussian_blur, upsample


def check_settings(coreset_ratio: float, num_neighbors: int, blur_sigma: float) -> None:
    """Raise a ``ConfigError`` naming the first setting out of range (shared by the module and the family config)."""
    if not 0.0 < coreset_ratio <= 1.0:
        raise ConfigError(f"patchcore coreset_ratio must lie in (0, 1], got {coreset_ratio}")
    if num_neighbors < 1:
        raise ConfigError(f"patchcore num_neighbors must be >= 1, got {num_neighbors}")
    if blur_sigma < 0:
        raise ConfigError(f"patchcore blur_sigma must be >= 0 (0: no blur), got {blur_sigma}")


class PatchCore(nn.Module):
    """Memory bank of normal patch features; anomaly score = distance to the nearest bank entry.

    Args:
        levels: indices of the feature levels it reads (None: all); the first is the resolution of the memory bank.
        coreset_ratio: share of training patches kept in the memory bank (paper: 1-10 %).
        num_neighbors: bank neighbours used to re-weight the image score (anomalib: 9).
        blur_sigma: Gaussian smoothing of anomaly maps, in pixels (as BGAD's; 0: none).
        seed: seeds the random projection and the coreset's first pick.
    """

    memory_bank: torch.Tensor

    def __init__(
        self,
        levels: Sequence[int] | None = None,
        coreset_ratio: float = 0.01,
        num_neighbors: int = 9,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_settings(coreset_ratio, num_neighbors, blur_sigma)
        if levels is not None and (not levels or len(set(levels)) != len(levels)):
            raise ConfigError(f"patchcore levels: expected distinct level indices, got {levels}")
        self.levels = None if levels is None else tuple(int(level) for level in levels)
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.register_buffer("memory_bank", torch.empty(0))

    @torch.no_grad()
    def fit(self, train: FeatureSet) -> PatchCore:
        """Fill the memory bank from the normal rows of ``train`` (anomalous rows are never read: one-class), on
        the device the module is on."""
        normal = train.select(torch.nonzero(train.labels == 0).flatten())
        if len(normal) == 0:
            raise ConfigError("patchcore: the training set has no normal image")
        device = self.memory_bank.device
        embedding = patch_embeddings([f.to(device) for f in normal.features], self.levels)
        patches = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        count = max(1, round(patches.shape[0] * self.coreset_ratio))
        self.memory_bank = patches[greedy_coreset(patches, count, self.seed).to(device)].contiguous()
        return self

    @torch.no_grad()
    def patch_scores(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the ``(H, W)`` nearest-neighbour distance map (at ``levels[0]``'s grid) and the re-weighted
        image score, in float32."""
        if self.memory_bank.numel() == 0:
            raise ConfigError("patchcore: fit() the memory bank before scoring")
        embedding = patch_embeddings(features, self.levels)
        batch, channels, height, width = embedding.shape
        patches = embedding.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        distance, nearest = nearest_distances(patches.reshape(-1, channels), self.memory_bank)
        distance = distance.reshape(batch, height * width)
        nearest = nearest.reshape(batch, height * width)
        return distance.reshape(batch, height, width), self._image_scores(patches, distance, nearest)

    def _image_scores(self, patches: torch.Tensor, distance: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """The largest patch distance, scaled by 1 - softmax weight of its nearest bank entry among its neighbours.

        A test patch whose nearest entry sits in a dense part of the bank is more surely anomalous than one whose
        nearest entry is itself isolated (PatchCore paper, Eq. 7). ``patches`` ``(B, P, C)``, ``distance`` and
        ``nearest`` ``(B, P)``; rows are picked with ``gather`` so that the batch stays a traced dimension.
        """
        worst = distance.argmax(dim=1, keepdim=True)  # (B, 1): the most anomalous patch of each image
        score = distance.gather(1, worst)[:, 0]
        k = min(self.num_neighbors, int(self.memory_bank.shape[0]))
        if k == 1:
            return score
        anchors = self.memory_bank[nearest.gather(1, worst)[:, 0]]  # its nearest bank entry
        _, support = nearest_distances(anchors, self.memory_bank, k)  # that entry's neighbourhood, itself first
        worst_patch = patches.gather(1, worst.unsqueeze(2).expand(-1, -1, patches.shape[2]))  # (B, 1, C)
        to_support = torch.linalg.vector_norm(worst_patch - self.memory_bank[support], dim=2)
        weight = 1 - torch.softmax(to_support, dim=1)[:, 0]
        return weight * score

    def anomaly_maps(self, distance: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``(B, h, w)`` distance maps -> ``(B, H, W)`` anomaly maps at ``image_size``: bilinear upsampling, then
        the Gaussian blur."""
        return gaussian_blur(upsample(distance, image_size), self.blur_sigma)
