"""A one-class PatchCore-style baseline on the same cached features as BGAD (Roth et al., "Towards Total Recall").

It sees no defect: a memory bank of locally aggregated normal patch features, thinned by a greedy coreset, and the
distance of each test patch to its nearest bank entry as the anomaly score. It exists so that every sweep can show
what BGAD-FAS's few labels buy over what a user would otherwise run; it shares ``FeatureSet``, the splits, the
anomaly-map upsampling and blur (``bgad_core.models.bgad.scoring``) and the metrics with BGAD.

The recipe follows the paper and anomalib's reference model: each level is averaged over 3x3 neighbourhoods,
coarser levels are upsampled (bilinear) to the finest chosen one and concatenated, the coreset is chosen by greedy
k-center selection on a random projection, and the image score re-weights the most anomalous patch's distance by
how isolated its nearest bank entry is among its ``num_neighbors`` neighbours.

Example:
    >>> import torch
    >>> from bgad_core.data.features import FeatureSet
    >>> def rows(n):
    ...     return FeatureSet([torch.randn(n, 8, 8, 8), torch.randn(n, 16, 4, 4)],
    ...                       [torch.zeros(n, 8, 8), torch.zeros(n, 4, 4)], torch.zeros(n, dtype=torch.long),
    ...                       [str(i) for i in range(n)])
    >>> model = PatchCore(coreset_ratio=0.1).fit(rows(4))
    >>> scores, maps = model.predict(rows(2), image_size=(32, 32))
    >>> scores.shape, maps.shape
    (torch.Size([2]), torch.Size([2, 32, 32]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bgad_core.errors import ConfigError
from bgad_core.data.features import FeatureSet, local_average
from bgad_core.evaluation.metrics import compute_metrics
from bgad_core.models.bgad.scoring import gaussian_blur

PROJECTION_DIM = 128  # k-center distances are computed on a random projection of this width (enough to rank)
DISTANCE_CHUNK = 8192  # query patches per distance block: bounds memory at 8192 x bank size floats


@dataclass
class PatchCoreConfig:
    """Settings of the one-class baseline.

    Attributes:
        levels: indices of the feature levels to use (None: all, i.e. strides 8 and 16 of the default cache); the
            first is the resolution of the memory bank.
        coreset_ratio: share of training patches kept in the memory bank (paper: 1-10 %).
        num_neighbors: bank neighbours used to re-weight the image score (anomalib: 9).
        blur_sigma: Gaussian smoothing of anomaly maps, in pixels (as BGAD's).
        seed: seeds the random projection and the coreset's first pick.
    """

    levels: tuple[int, ...] | None = None
    coreset_ratio: float = 0.01
    num_neighbors: int = 9
    blur_sigma: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.levels is not None:
            self.levels = tuple(int(level) for level in self.levels)
        if self.levels is not None and (not self.levels or len(set(self.levels)) != len(self.levels)):
            raise ConfigError(f"patchcore levels: expected distinct level indices, got {self.levels}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"patchcore coreset_ratio must lie in (0, 1], got {self.coreset_ratio}")
        if self.num_neighbors < 1:
            raise ConfigError(f"patchcore num_neighbors must be >= 1, got {self.num_neighbors}")


def patch_embeddings(features: Sequence[torch.Tensor], levels: Sequence[int] | None = None) -> torch.Tensor:
    """Locally aggregated patch features ``(N, C, H, W)`` at the resolution of ``levels[0]`` (None: all levels).

    Each chosen level is averaged over 3x3 neighbourhoods (a patch sees its surroundings), upsampled bilinearly to
    the first chosen level's grid and concatenated along channels.
    """
    levels = range(len(features)) if levels is None else levels
    for level in levels:
        if not 0 <= level < len(features):
            raise ConfigError(f"patchcore level {level} does not exist: the features have {len(features)} levels")
    grid = features[levels[0]].shape[-2:]
    parts = []
    for level in levels:
        pooled = local_average(features[level], 3)
        if pooled.shape[-2:] != grid:
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        parts.append(pooled)
    return torch.cat(parts, dim=1)


def greedy_coreset(embeddings: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``count`` rows chosen by greedy k-center selection (each pick is the row farthest from the set).

    Distances are measured on a Gaussian random projection to ``PROJECTION_DIM`` dims (Johnson-Lindenstrauss: the
    ranking of distances is kept), as in the PatchCore paper, which makes each pick one matrix-vector product.
    """
    total = embeddings.shape[0]
    if count >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed)
    if embeddings.shape[1] > PROJECTION_DIM:
        projection = torch.randn(embeddings.shape[1], PROJECTION_DIM, generator=generator) / PROJECTION_DIM**0.5
        points = embeddings @ projection.to(embeddings)
    else:
        points = embeddings
    squared = (points * points).sum(dim=1)
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = torch.randint(total, (1,), generator=generator)
    nearest = torch.full((total,), float("inf"), dtype=points.dtype)
    for i in range(1, count + 1):
        center = points[chosen[i - 1]]
        distance = squared - 2 * (points @ center) + squared[chosen[i - 1]]
        torch.minimum(nearest, distance, out=nearest)
        if i < count:
            chosen[i] = torch.argmax(nearest)
    return chosen


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances ``(Q, k)`` and indices of each query's ``k`` nearest bank rows, in blocks of queries."""
    distances, indices = [], []
    for block in queries.split(DISTANCE_CHUNK):
        d, i = torch.cdist(block, bank).topk(k, dim=1, largest=False)
        distances.append(d)
        indices.append(i)
    return torch.cat(distances), torch.cat(indices)


class PatchCore(nn.Module):
    """Memory bank of normal patch features; anomaly score = distance to the nearest bank entry.

    Args:
        levels, coreset_ratio, num_neighbors, blur_sigma, seed: see ``PatchCoreConfig``.
    """

    def __init__(
        self,
        levels: Sequence[int] | None = None,
        coreset_ratio: float = 0.01,
        num_neighbors: int = 9,
        blur_sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = PatchCoreConfig(None if levels is None else tuple(levels), coreset_ratio, num_neighbors, blur_sigma, seed)
        self.register_buffer("memory_bank", torch.empty(0))

    @torch.no_grad()
    def fit(self, train: FeatureSet) -> PatchCore:
        """Fill the memory bank from the normal rows of ``train`` (anomalous rows are ignored: one-class)."""
        normal = train.select(torch.nonzero(train.labels == 0).flatten())
        if len(normal) == 0:
            raise ConfigError("patchcore: the training set has no normal image")
        embedding = patch_embeddings(normal.features, self.config.levels)
        patches = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        count = max(1, round(patches.shape[0] * self.config.coreset_ratio))
        self.memory_bank = patches[greedy_coreset(patches, count, self.config.seed)].contiguous()
        return self

    @torch.no_grad()
    def patch_scores(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the ``(H, W)`` nearest-neighbour distance map and the re-weighted image score."""
        if self.memory_bank.numel() == 0:
            raise ConfigError("patchcore: fit() the memory bank before scoring")
        embedding = patch_embeddings(features, self.config.levels)
        batch, channels, height, width = embedding.shape
        patches = embedding.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        distance, nearest = nearest_distances(patches.reshape(-1, channels), self.memory_bank)
        distance = distance[:, 0].reshape(batch, height * width)
        nearest = nearest[:, 0].reshape(batch, height * width)
        return distance.reshape(batch, height, width), self._image_scores(patches, distance, nearest)

    def _image_scores(self, patches: torch.Tensor, distance: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """The largest patch distance, scaled by 1 - softmax weight of its nearest bank entry among its neighbours.

        A test patch whose nearest entry sits in a dense part of the bank is more surely anomalous than one whose
        nearest entry is itself isolated (PatchCore paper, Eq. 7).
        """
        worst = distance.argmax(dim=1)
        rows = torch.arange(patches.shape[0])
        score = distance[rows, worst]
        k = min(self.config.num_neighbors, self.memory_bank.shape[0])
        if k == 1:
            return score
        anchors = self.memory_bank[nearest[rows, worst]]
        _, support = nearest_distances(anchors, self.memory_bank, k)
        to_support = torch.linalg.vector_norm(patches[rows, worst].unsqueeze(1) - self.memory_bank[support], dim=2)
        weight = 1 - torch.softmax(to_support, dim=1)[:, 0]
        return weight * score

    @torch.no_grad()
    def predict(
        self, split: FeatureSet, image_size: tuple[int, int], batch_size: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(N,)`` and anomaly maps ``(N, H, W)`` at ``image_size`` (bilinear upsampling, then blur)."""
        scores, maps = [], []
        for start in range(0, len(split), batch_size):
            features = [f[start : start + batch_size] for f in split.features]
            distance, score = self.patch_scores(features)
            upsampled = F.interpolate(distance.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)
            maps.append(gaussian_blur(upsampled.squeeze(1), self.config.blur_sigma))
            scores.append(score)
        return torch.cat(scores), torch.cat(maps)

    def evaluate(self, split: FeatureSet, image_size: tuple[int, int]) -> dict[str, float]:
        """The metrics BGAD reports (``bgad_core.evaluation.metrics.compute_metrics``) on an evaluation split."""
        scores, maps = self.predict(split, image_size)
        masks = None if split.pixel_masks is None else split.pixel_masks.numpy()
        return compute_metrics(split.labels.numpy(), scores.numpy(), masks, None if masks is None else maps.numpy())
