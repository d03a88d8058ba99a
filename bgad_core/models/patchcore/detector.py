"""The fitted PatchCore family as the engine checkpoints, serves and exports it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bgad_core.models.base import Detector
from bgad_core.models.patchcore.config import PatchCoreConfig
from bgad_core.models.patchcore.torch_model import PatchCore


class PatchCoreDetector(Detector):
    """A fitted memory bank: every backbone level's features in, image scores and anomaly maps out.

    The module traces to ONNX as it is, for any grids (``exportable`` is the base's ``self``): scoring is matrix
    products, ``topk`` and ``gather`` (``torch_model``), and the upsampling and blur depend on nothing but
    ``image_size``.

    Args:
        config: the family config it was fitted with (kept for the checkpoint; ``blur_sigma`` and the re-weighting
            settings apply here).
        levels: indices, among the backbone's levels, of ``config.feature_strides`` (mapped by the training).
        memory_bank: ``(M, C)`` float32 bank patches (shared, not copied).
        image_size: ``(H, W)`` of the maps.
    """

    family = "patchcore"

    def __init__(
        self, config: PatchCoreConfig, levels: Sequence[int], memory_bank: torch.Tensor, image_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.config = config
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.model = unfitted_model(config, levels)
        self.model.memory_bank = memory_bank

    @property
    def levels(self) -> tuple[int, ...]:
        """The backbone levels it reads; the first is the memory bank's grid."""
        return self.model.levels

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every level's ``(B, C_l, H_l, W_l)`` features (any float dtype) -> float32 scores ``(B,)``, maps
        ``(B, H, W)``: nearest-bank distances, re-weighted maximum as the score, upsampled and blurred as the map."""
        distance, scores = self.model.patch_scores(features)
        return scores, self.model.anomaly_maps(distance, self.image_size)

    def to_checkpoint(self) -> dict[str, Any]:
        """Config, levels and the bank (on the CPU, so that any machine loads it)."""
        return {"config": self.config.to_dict(), "levels": list(self.levels),
                "memory_bank": self.model.memory_bank.detach().cpu()}

    @classmethod
    def from_checkpoint(cls, entry: Mapping[str, Any], image_size: tuple[int, int]) -> PatchCoreDetector:
        """The detector ``to_checkpoint`` described, in eval mode."""
        config = PatchCoreConfig.from_dict(entry["config"])
        return cls(config, entry["levels"], entry["memory_bank"], image_size).eval()


def unfitted_model(config: PatchCoreConfig, levels: Sequence[int]) -> PatchCore:
    """An empty ``PatchCore`` with the config's settings, reading ``levels``."""
    return PatchCore(levels, config.coreset_ratio, config.num_neighbors, config.blur_sigma, config.seed)
