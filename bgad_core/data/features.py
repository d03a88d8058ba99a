"""Backbone features of a set of images, in the form the flows train and evaluate on.

Training never needs the images themselves, only their multi-scale features and each level's defect mask; the
feature cache (``sweeper.cache.build``) stores exactly this, and ``bgad_core.train`` builds it in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class FeatureSet:
    """Multi-scale features of N images.

    Attributes:
        features: per level, ``(N, C_l, H_l, W_l)`` (fp16 to halve memory, or fp32).
        masks: per level, ``(N, H_l, W_l)`` fraction of defect pixels in each cell (0 for normal images).
        labels: ``(N,)`` image labels, 0 normal / 1 anomalous.
        ids: a stable id per row (image record id, or the recipe of a synthetic anomaly).
        pixel_masks: ``(N, H, W)`` uint8 full-resolution masks for pixel metrics, kept for evaluation splits only.
    """

    features: list[torch.Tensor]
    masks: list[torch.Tensor]
    labels: torch.Tensor
    ids: list[str]
    pixel_masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def grids(self) -> list[tuple[int, int]]:
        """``(H_l, W_l)`` of each level."""
        return [(f.shape[2], f.shape[3]) for f in self.features]

    def select(self, rows: torch.Tensor | Sequence[int]) -> FeatureSet:
        """The subset of rows, in the given order."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return FeatureSet(
            features=[f[index] for f in self.features],
            masks=[m[index] for m in self.masks],
            labels=self.labels[index],
            ids=[self.ids[i] for i in index.tolist()],
            pixel_masks=None if self.pixel_masks is None else self.pixel_masks[index],
        )

    def with_levels(self, levels: Sequence[int]) -> FeatureSet:
        """The same rows with only the given feature levels, in the given order."""
        return FeatureSet(
            features=[self.features[i] for i in levels],
            masks=[self.masks[i] for i in levels],
            labels=self.labels,
            ids=self.ids,
            pixel_masks=self.pixel_masks,
        )

    @staticmethod
    def concat(parts: Sequence[FeatureSet]) -> FeatureSet:
        """Rows of all parts, in order; pixel masks are kept only when every part has them."""
        keep_pixels = all(p.pixel_masks is not None for p in parts)
        return FeatureSet(
            features=[torch.cat(level) for level in zip(*(p.features for p in parts))],
            masks=[torch.cat(level) for level in zip(*(p.masks for p in parts))],
            labels=torch.cat([p.labels for p in parts]),
            ids=[i for p in parts for i in p.ids],
            pixel_masks=torch.cat([p.pixel_masks for p in parts]) if keep_pixels else None,
        )


def local_average(features: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, H, W)`` features averaged over each cell's ``size x size`` neighbourhood (odd size), in float32.

    PatchCore's local aggregation: a cell then describes a patch with its context. Borders average over zero
    padding, as PatchCore's ``AvgPool2d(3, 1, 1)`` does.
    """
    features = features.float()
    if size == 1:
        return features
    return F.avg_pool2d(features, size, stride=1, padding=size // 2)


def mask_to_grid(masks: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of defect pixels in each cell of a ``grid``: ``(N, H, W)`` {0,1} masks -> ``(N, h, w)`` float.

    Area averaging keeps thin defects visible at coarse levels (a nearest-neighbour resize can drop them); the
    trainer decides which fraction makes a cell abnormal.
    """
    masks = torch.as_tensor(masks, dtype=torch.float32)
    return F.adaptive_avg_pool2d(masks.unsqueeze(1), grid).squeeze(1)


@torch.inference_mode()
def extract_feature_set(
    extractor: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    labels: Sequence[int],
    ids: Sequence[str],
    batch_size: int = 16,
    dtype: torch.dtype = torch.float16,
    keep_pixel_masks: bool = False,
) -> FeatureSet:
    """Run the frozen backbone over ``(N, H, W, 3)`` uint8 images once and keep what training needs.

    Args:
        extractor: a ``bgad_core.backbone.FeatureExtractor`` (anything with ``extract(uint8 batch)``).
        images: uint8 RGB images of one size.
        masks: ``(N, H, W)`` {0,1} defect masks (zeros for normal images).
        labels: image labels, 0 normal / 1 anomalous.
        ids: one id per image.
        batch_size: images per backbone call.
        dtype: storage type of the features.
        keep_pixel_masks: keep the full-resolution masks (needed for pixel metrics on evaluation splits).
    """
    images = torch.as_tensor(images)
    masks = torch.as_tensor(masks, dtype=torch.uint8)
    levels: list[list[torch.Tensor]] = []
    for start in range(0, len(images), batch_size):
        batch = extractor.extract(images[start : start + batch_size])
        if not levels:
            levels = [[] for _ in batch]
        for store, feature in zip(levels, batch):
            store.append(feature.to(dtype).cpu())
    features = [torch.cat(level) for level in levels]
    return FeatureSet(
        features=features,
        masks=[mask_to_grid(masks, (f.shape[2], f.shape[3])) for f in features],
        labels=torch.as_tensor(list(labels), dtype=torch.long),
        ids=list(ids),
        pixel_masks=masks if keep_pixel_masks else None,
    )
