"""A trained BGAD model as a ``Detector``: the flows, the scoring constants and choices validation made, the blur,
and the memory bank of normal patches where validation chose to weigh nearest-normal distances in.

The flows give each level's per-dim log-likelihood map; ``scoring.anomaly_maps`` standardises them with the
constants measured on training normals (``Normalization``), upsamples, weights the levels (and the distances)
and blurs; the image score is the reduction validation chose, of that map or of one that weighs the distances
otherwise (``Normalization.image_nearest_normal_weight``). For export the flows' condition terms
(which depend only on the parameters and the grid) become constant tables (``exportable``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bgad_core.errors import ConfigError, ExportError
from bgad_core.models.base import Detector
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.fast_flow import check_supported
from bgad_core.models.bgad.scoring import Normalization, scores_and_maps
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.components.memory_bank import NearestNormal

# options a checkpoint predates take the value its model was trained and scored with, not today's default
PREDATES = {"local_aggregation": 1, "calibration": "level", "coarse_level_weight": 1.0, "condition_on_position": True,
            "image_score": "max", "nearest_normal_weight": 0.0, "image_score_map": "anomaly_map"}


class BGADDetector(Detector):
    """Flows + scoring constants + blur: features -> image scores and anomaly maps.

    Args:
        flows: the trained flows (shared, not copied: a training that goes on changes them).
        normalization: scoring constants and choices (calibration, coarse-level weight, image-score reduction).
        blur_sigma: Gaussian smoothing of the maps, in pixels.
        image_size: ``(H, W)`` of the maps.
        config: the config the flows were trained with (kept for the checkpoint).
        nearest: the memory bank of training-normal patches; needed (and kept) only where the map or the image score
            weighs the distances in (``normalization.uses_distances``).
    """

    family = "bgad"

    def __init__(self, flows: BGADFlows, normalization: Normalization, blur_sigma: float,
                 image_size: tuple[int, int], config: BGADConfig, nearest: NearestNormal | None = None) -> None:
        super().__init__()
        if normalization.uses_distances and nearest is None:
            weight = max(normalization.nearest_normal_weight, normalization.image_weight)
            raise ConfigError(f"nearest-normal weight {weight:g} needs the memory bank of normal patches (nearest), "
                              "none was given")
        self.flows = flows
        self.normalization = normalization
        self.blur_sigma = float(blur_sigma)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.config = config
        self.nearest = nearest if normalization.uses_distances else None

    def forward(self, features: Sequence[torch.Tensor],
                tables: Sequence[Sequence[torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``tables``: the flows' ``condition_tables`` at the features' grids, when the caller holds them."""
        distances = None if self.nearest is None else self.nearest(features)
        logps = self.flows(features, tables) if self.normalization.uses_likelihoods else []
        return scores_and_maps(logps, self.normalization, self.image_size, self.blur_sigma, distances)

    def exportable(self, grids: Sequence[tuple[int, int]]) -> nn.Module:
        return _WithConditionTables(self, grids)

    def to_checkpoint(self) -> dict[str, Any]:
        entry = {"flows": {k: v.detach().cpu() for k, v in self.flows.state_dict().items()},
                 "channels": list(self.flows.channels), "config": self.config.to_dict(),
                 "normalization": self.normalization.to_dict()}
        if self.nearest is not None:
            entry["nearest_normal"] = self.nearest.to_dict()
        return entry

    @classmethod
    def from_checkpoint(cls, entry: Mapping[str, Any], image_size: tuple[int, int]) -> BGADDetector:
        config = BGADConfig.from_dict({**PREDATES, **entry["config"]})
        flows = BGADFlows.from_config(entry["channels"], config)
        flows.load_state_dict(entry["flows"])
        # a checkpoint from before the weight and the reduction were stored with the constants kept them in its config
        weight, reduction = config.coarse_level_weight, config.image_score
        normalization = Normalization.from_dict(entry["normalization"], 1.0 if weight == "auto" else float(weight),
                                                "max" if reduction == "auto" else reduction)
        nearest = NearestNormal.from_dict(entry["nearest_normal"]) if "nearest_normal" in entry else None
        return cls(flows, normalization, config.blur_sigma, image_size, config, nearest).eval()


class _WithConditionTables(nn.Module):
    """The detector with each coupling block's condition term stored as a constant table for the given grids.

    At inference the term (``W_c c + b`` over the positional encoding of every cell, ``fast_flow.condition_term``)
    depends on nothing but the parameters and the grid, so the exported graph holds it instead of the encoding.
    """

    def __init__(self, detector: BGADDetector, grids: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        for level, flow in enumerate(detector.flows.flows):
            try:
                check_supported(flow)
            except TypeError as err:
                raise ExportError(f"flow of level {level} (flows.flows.{level}): {err}") from err
        self.detector = detector
        device = next(detector.flows.parameters()).device
        tables = detector.flows.condition_tables(list(grids), device)
        self.blocks = [len(level) for level in tables]
        for level, level_tables in enumerate(tables):
            for block, table in enumerate(level_tables):
                self.register_buffer(f"condition_{level}_{block}", table.detach().clone())

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tables = [[getattr(self, f"condition_{level}_{block}") for block in range(blocks)]
                  for level, blocks in enumerate(self.blocks)]
        return self.detector(features, tables)
