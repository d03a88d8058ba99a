"""What a sweep may fix or search for the PatchCore family."""

from __future__ import annotations

from dataclasses import dataclass

from bgad_core.errors import ConfigError
from bgad_core.models.base import DetectorConfig
from bgad_core.models.patchcore.torch_model import check_settings


@dataclass
class PatchCoreConfig(DetectorConfig):
    """Settings of the one-class PatchCore family.

    Attributes:
        feature_strides: backbone level strides it reads (each must be one the backbone extracts); the first is the
            memory bank's resolution, coarser ones are upsampled to it. Strides rather than level indices, so that
            a config means the same levels whatever else a cache extracted.
        coreset_ratio: share of training patches kept in the memory bank (paper: 1-10 %).
        num_neighbors: bank neighbours used to re-weight the image score (anomalib: 9).
        blur_sigma: Gaussian smoothing of anomaly maps, in pixels (as BGAD's; 0: none).
        meta_epochs: accepted for a sweep's shared schedule (any value >= 1); the family is fitted once regardless.
        seed: seeds the random projection and the coreset's first pick.
    """

    feature_strides: tuple[int, ...] = (8, 16)
    coreset_ratio: float = 0.01
    num_neighbors: int = 9
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        self.feature_strides = tuple(int(stride) for stride in self.feature_strides)  # lists, from YAML, JSON or a checkpoint
        if not self.feature_strides or len(set(self.feature_strides)) != len(self.feature_strides) or min(self.feature_strides) < 1:
            raise ConfigError(f"patchcore feature_strides: expected distinct positive strides, got {list(self.feature_strides)}")
        check_settings(self.coreset_ratio, self.num_neighbors, self.blur_sigma)
        if self.meta_epochs < 1:
            raise ConfigError(f"patchcore meta_epochs must be >= 1, got {self.meta_epochs}")
