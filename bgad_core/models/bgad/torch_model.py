"""The trainable part of BGAD: one conditional flow per feature level, conditioned on 2-D position.

A pure ``nn.Module``: it maps backbone feature maps to per-dim log-likelihood maps. Training glue lives in
``training.py``, turning likelihoods into anomaly maps in ``scoring.py``.

Before a level reaches its flow, each feature vector can be replaced by the mean of its ``aggregation x
aggregation`` neighbourhood (PatchCore's local aggregation). A single backbone cell is a noisy, very local
description; its neighbourhood mean describes a patch with context, whose density a flow estimates far better
(on MTD-200 it lifted test image AUROC from 0.67 to 0.82 at the same schedule, BENCHMARKS.md). ``aggregation=1``
is the paper's model.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch
from torch import nn

from bgad_core.models.bgad.config import FlowArchitecture
from bgad_core.models.bgad.fast_flow import (check_supported, condition_tables, distinct_positions, grid_log_likelihood,
                                 positioned_log_likelihood)
from bgad_core.data.features import local_average
from bgad_core.models.bgad.flow import build_flow
from bgad_core.models.bgad.positional import positional_encoding_2d

class BGADFlows(nn.Module):
    """Conditional normalizing flows over multi-scale features.

    Args:
        channels: feature width of each level (the backbone's ``channels``).
        cond_dim: positional-encoding width used as the flow condition (paper: 128).
        coupling_blocks: AllInOneBlock couplings per flow (paper: 8).
        clamp: affine clamping of the couplings (paper: 1.9).
        aggregation: side of the square neighbourhood each feature is averaged over before its flow (odd; 1 = none,
            the paper's model). Border cells average over zero padding, as PatchCore's: on MTD-200 this scored 0.82
            test image AUROC against 0.77 when borders averaged only the cells that exist (BENCHMARKS.md).
        positional: condition the flows on each cell's position (the paper's). False gives every cell the same
            (zero) condition: one density for the whole level, for objects that do not sit at the same place in
            every image, where what is normal at a place in one image is normal anywhere.
    """

    def __init__(
        self,
        channels: Sequence[int],
        cond_dim: int = 128,
        coupling_blocks: int = 8,
        clamp: float = 1.9,
        aggregation: int = 1,
        positional: bool = True,
    ) -> None:
        super().__init__()
        if aggregation < 1 or aggregation % 2 == 0:
            raise ValueError(f"aggregation must be an odd number >= 1, got {aggregation}")
        self.channels = tuple(int(c) for c in channels)
        self.cond_dim = cond_dim
        self.aggregation = int(aggregation)
        self.positional = bool(positional)
        self.flows = nn.ModuleList(build_flow(c, cond_dim, coupling_blocks, clamp) for c in self.channels)
        for flow in self.flows:
            check_supported(flow)
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def from_config(cls, channels: Sequence[int], config: FlowArchitecture) -> BGADFlows:
        """The flows a ``FlowArchitecture`` describes, for features of the given level widths."""
        return cls(channels, config.cond_dim, config.coupling_blocks, config.clamp, config.local_aggregation,
                   config.condition_on_position)

    def aggregate(self, feature: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` features averaged over each cell's ``aggregation``-neighbourhood, in float32."""
        return local_average(feature, self.aggregation)

    def positions(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """Positional condition for every cell of a ``height x width`` grid, shape ``(H*W, cond_dim)``, cached
        (zeros when the flows are not ``positional``)."""
        key = (height, width)
        if key not in self._positions:
            encoding = positional_encoding_2d(self.cond_dim, height, width)
            if not self.positional:
                encoding = torch.zeros_like(encoding)
            self._positions[key] = encoding.flatten(1).T.contiguous()
        return self._positions[key].to(device)

    def cell_logps(
        self, level: int, vectors: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int], precision: str = "fp32"
    ) -> torch.Tensor:
        """Per-dim log-likelihoods (log p(x) / C) of ``(N, C)`` vectors at flat cell indices ``cells`` of ``grid``.

        The flow is conditioned on each cell's positional encoding; each distinct cell's condition term is
        computed once (``fast_flow``), which gives FrEIA's result at a fraction of the cost.
        """
        conditions, index = distinct_positions(cells, self.positions(*grid, vectors.device))
        return positioned_log_likelihood(self.flows[level], vectors, conditions, index, precision) / self.channels[level]

    def block_logps(
        self, level: int, vectors: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int], precision: str = "fp32"
    ) -> torch.Tensor:
        """Per-dim log-likelihoods of a position block: ``(B * P, C)`` vectors, B images each at the P ``cells``.

        Rows are image-major (row ``i * P + p`` is image i at ``cells[p]``). The condition term is computed for the
        P cells only and broadcast over the images, which is why training steps are drawn as such blocks.
        """
        conditions = self.positions(*grid, vectors.device)[cells]
        tables = condition_tables(self.flows[level], conditions, precision)
        return grid_log_likelihood(self.flows[level], vectors, tables, precision) / self.channels[level]

    def condition_tables(self, grids: Sequence[tuple[int, int]], device: torch.device) -> list[list[torch.Tensor]]:
        """Per level, each coupling block's condition term ``(H_l*W_l, hidden)`` over the cells of its grid.

        They depend on the flows' parameters and the grid only; an exported model stores them as constants.
        """
        return [condition_tables(flow, self.positions(*grid, device)) for flow, grid in zip(self.flows, grids)]

    def forward(
        self, features: Sequence[torch.Tensor], tables: Sequence[Sequence[torch.Tensor]] | None = None
    ) -> list[torch.Tensor]:
        """Per-dim log-likelihood map ``(B, H_l, W_l)`` for each level's ``(B, C_l, H_l, W_l)`` feature map.

        ``tables``: the ``condition_tables`` of the features' grids, when the caller keeps them (computed here
        otherwise).
        """
        if tables is None:
            tables = self.condition_tables([tuple(f.shape[2:]) for f in features], features[0].device)
        maps = []
        for flow, feature, level_tables in zip(self.flows, features, tables):
            _, channels, height, width = feature.shape
            vectors = self.aggregate(feature).permute(0, 2, 3, 1).reshape(-1, channels)
            logps = grid_log_likelihood(flow, vectors, list(level_tables)) / channels
            maps.append(logps.view(-1, height, width))
        return maps
