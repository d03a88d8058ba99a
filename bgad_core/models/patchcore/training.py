"""Fitting the PatchCore family: one pass over the training normals, nothing for validation to choose."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError
from bgad_core.models.base import Evaluation, Training, split_metrics
from bgad_core.models.components.levels import level_indices
from bgad_core.models.patchcore.config import PatchCoreConfig
from bgad_core.models.patchcore.detector import PatchCoreDetector, unfitted_model


class PatchCoreTraining(Training):
    """PatchCore on a training ``FeatureSet``: one meta-epoch fills the memory bank from its normal rows.

    One-class: anomalous rows (labelled or synthetic) are never read. The schedule is one meta-epoch whatever
    ``config.meta_epochs`` says (the family is ``single_pass``): a second fit of the same data would give the same
    bank.

    Args:
        config: the family config.
        train: training features of every backbone level.
        strides: the stride of each of ``train``'s levels, in order; ``config.feature_strides`` picks among them.
        device: where the bank is fitted and validation scores ("cpu", "cuda", ...).
    """

    def __init__(self, config: PatchCoreConfig, train: FeatureSet, strides: Sequence[int], device: str) -> None:
        levels = level_indices("patchcore", config.feature_strides, strides)
        if not bool((train.labels == 0).any()):
            raise ConfigError("patchcore: the training set has no normal image")
        self.config = config
        self.train = train
        self.levels = levels
        self.device = device
        self.epoch = 0
        self.memory_bank: torch.Tensor | None = None  # fitted by train_meta_epoch

    @property
    def meta_epochs(self) -> int:
        """One: the bank is fitted in a single pass."""
        return 1

    def train_meta_epoch(self) -> dict[str, float]:
        """Fit the memory bank on the normal rows; no loss (NaN), phase 1, and the seconds the fit took."""
        started = time.perf_counter()
        self.memory_bank = unfitted_model(self.config, self.levels).to(self.device).fit(self.train).memory_bank
        self.epoch += 1
        return {"loss": math.nan, "phase": 1.0, "fit_seconds": time.perf_counter() - started}

    def validate(self, val: FeatureSet, image_size: tuple[int, int], objective: str) -> Evaluation:
        """Score ``val`` with the fitted bank. Nothing is left to choose, so ``objective`` is not read."""
        if self.memory_bank is None:
            raise RuntimeError("patchcore: train_meta_epoch() (or load_state_dict of a fitted state) before validate")
        detector = PatchCoreDetector(self.config, self.levels, self.memory_bank, image_size)
        scores, maps = detector.predict(val)
        return Evaluation(split_metrics(val, scores, maps), scores, maps, detector, {})

    def state_dict(self) -> dict[str, Any]:
        """The epoch counter and, once fitted, the levels and the bank: a resumed training validates without
        fitting again."""
        if self.memory_bank is None:
            return {"epoch": self.epoch}
        return {"epoch": self.epoch, "levels": list(self.levels), "memory_bank": self.memory_bank.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``; a bank fitted on other levels than this training reads is refused."""
        self.epoch = int(state["epoch"])
        if "memory_bank" not in state:
            self.memory_bank = None
            return
        if [int(level) for level in state["levels"]] != self.levels:
            raise ConfigError(f"patchcore: the state was fitted on levels {list(state['levels'])}, "
                              f"this training reads levels {self.levels}")
        self.memory_bank = state["memory_bank"].to(self.device)

