"""The contract every detector family keeps, so that the engine trains, selects, checkpoints, serves and exports
any of them without knowing which.

A family (``Family``, registered in ``bgad_core.models.registry``) has a name, a learning type, a config whose
fields are what a search may vary, and a factory for its ``Training``. Two objects carry the contract:

- ``Training`` fits a family on a training ``FeatureSet`` meta-epoch by meta-epoch (a family fitted in one pass,
  PatchCore's memory bank, has one meta-epoch), and scores validation with the choices validation may make.
- ``Detector`` is what a validation produced and what gets checkpointed, served and exported: every level's
  backbone features in, image scores and anomaly maps at image resolution out. Every subclass returns
  ``(scores (B,), maps (B, H, W))`` in float32, higher meaning more anomalous, whatever dtype the features come
  in (the feature cache stores fp16); the same image scores the same in any batch; and ``exportable(grids)`` gives a
  module with the same forward that the ONNX tracer can follow.

Nothing here knows a family; the families know nothing of Ray, MLflow or the command line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError
from bgad_core.evaluation.metrics import compute_metrics

LearningType = Literal["one_class", "few_shot"]
ONE_CLASS: LearningType = "one_class"  # trains on normal images only; labelled and synthetic anomalies are not read
FEW_SHOT: LearningType = "few_shot"  # reads the labelled anomalies and their RACP samples too


@dataclass
class DetectorConfig:
    """Base of every family's configuration: its fields are the values a sweep may fix or search.

    Attributes:
        meta_epochs: outer epochs; validation runs after each one (1 for a family fitted in one pass).
        seed: seeds initialisation and sampling.
    """

    meta_epochs: int = 1
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DetectorConfig:
        """Build from a mapping, naming any unknown key instead of silently ignoring it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Detector(nn.Module, ABC):
    """A trained detector after the backbone: per-level features in, image scores and anomaly maps out.

    Subclasses implement ``forward``, ``to_checkpoint`` and ``from_checkpoint``, and ``exportable`` where the module
    itself does not trace to ONNX as it is. ``family`` is the registry name of its family (checkpoints carry it),
    ``image_size`` the ``(H, W)`` of the maps.
    """

    family: ClassVar[str]
    image_size: tuple[int, int]

    @abstractmethod
    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every backbone level's ``(B, C_l, H_l, W_l)`` features -> image scores ``(B,)`` and maps ``(B, H, W)``."""

    @abstractmethod
    def to_checkpoint(self) -> dict[str, Any]:
        """Everything ``from_checkpoint`` needs, as tensors, numbers, strings, lists and dicts (``weights_only``)."""

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, entry: Mapping[str, Any], image_size: tuple[int, int]) -> Detector:
        """The detector ``to_checkpoint`` described, in eval mode."""

    def exportable(self, grids: Sequence[tuple[int, int]]) -> nn.Module:
        """A module with this forward that ``torch.onnx.export`` traces, for features of the given ``(H_l, W_l)``
        grids (what depends only on parameters and grids may be precomputed); raises
        ``bgad_core.errors.ExportError`` naming the layer when the detector cannot be exported."""
        return self

    @torch.no_grad()
    def predict(self, split: FeatureSet, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(N,)`` and maps ``(N, H, W)`` of every row of ``split``, on the CPU."""
        self.eval()
        device = next(iter(self.buffers()), next(iter(self.parameters()), torch.empty(0))).device
        scores, maps = [], []
        for start in range(0, len(split), batch_size):
            batch_scores, batch_maps = self([f[start : start + batch_size].to(device) for f in split.features])
            scores.append(batch_scores.cpu())
            maps.append(batch_maps.cpu())
        return torch.cat(scores), torch.cat(maps)


@dataclass
class Evaluation:
    """A detector's metrics on one split with the per-image scores and maps they came from.

    ``detector`` is the detector that scored them, with the choices validation made (``choices``: each as a number,
    for a metrics log, e.g. ``coarse_level_weight``). It may share parameters with a training that goes on: a
    caller that keeps it past the next meta-epoch checkpoints or copies it first.
    """

    metrics: dict[str, float]
    scores: torch.Tensor
    maps: torch.Tensor
    detector: Detector
    choices: dict[str, float]


def split_metrics(split: FeatureSet, scores: torch.Tensor, maps: torch.Tensor) -> dict[str, float]:
    """``compute_metrics`` of a split: image metrics, and pixel metrics where the split has masks."""
    masks = None if split.pixel_masks is None else split.pixel_masks.numpy()
    return compute_metrics(split.labels.numpy(), scores.numpy(), masks, None if masks is None else maps.numpy())


def evaluate(detector: Detector, split: FeatureSet) -> Evaluation:
    """A fixed detector on a split (test, or a checkpoint's re-evaluation): no choice is made here."""
    scores, maps = detector.predict(split)
    return Evaluation(split_metrics(split, scores, maps), scores, maps, detector, {})


class Training(ABC):
    """One family's training on a training ``FeatureSet``, meta-epoch by meta-epoch.

    The engine calls ``train_meta_epoch`` then ``validate`` until ``epoch == meta_epochs`` (or its plateau), keeps
    the validation whose objective is best among epochs ``>= first_selectable_epoch``, and resumes a killed run with
    ``load_state_dict(state_dict())``.
    """

    config: DetectorConfig
    epoch: int  # meta-epochs trained so far

    @property
    def meta_epochs(self) -> int:
        """The length of the schedule."""
        return int(self.config.meta_epochs)

    @property
    def first_selectable_epoch(self) -> int:
        """The first meta-epoch whose model may be selected (a family with a warm-up phase excludes it)."""
        return 1

    @abstractmethod
    def train_meta_epoch(self) -> dict[str, float]:
        """Train one meta-epoch; its figures for the log (at least ``loss``, NaN where a family has none)."""

    @abstractmethod
    def validate(self, val: FeatureSet, image_size: tuple[int, int], objective: str) -> Evaluation:
        """Score validation with the current model, making on ``objective`` (a metric name such as ``aupro``)
        every choice the config leaves to validation; the evaluation's ``detector`` holds them."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where training stopped (plain tensors: ``weights_only``-safe)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``."""

    def score_distribution(self) -> ScoreDistribution | None:
        """Scores of (a sample of) normal and anomalous training cells and the decision boundaries between them,
        for a diagnostic histogram; None for a family without such a notion."""
        return None


class OptimizerTraining(Training):
    """A ``Training`` that fits ``model`` with one torch ``optimizer`` and draws its batches from ``generator``.

    Its resumable state is exactly those three and the epoch counter, so ``state_dict`` / ``load_state_dict`` are
    shared here: a run killed after meta-epoch k and resumed trains meta-epoch k + 1 on the same weights, optimizer
    moments and sampling stream as an uninterrupted run (BGAD and SimpleNet; PatchCore, fitted in one pass, has
    no optimizer).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer moments, epoch counter and sampling stream (plain tensors: ``weights_only``-safe)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``: the next meta-epoch trains exactly as it would have without the break."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class ScoreDistribution:
    """What a training's histogram shows: normal and abnormal training values and the boundaries it keeps."""

    normal: Any  # np.ndarray
    abnormal: Any  # np.ndarray
    boundaries: dict[str, float]
    label: str


@dataclass(frozen=True)
class Family:
    """A detector family: what the registry knows of it.

    Attributes:
        name: how configs and checkpoints name it (``family: patchcore``).
        learning_type: ``ONE_CLASS`` (normal images only) or ``FEW_SHOT`` (reads labelled and synthetic anomalies).
        config: its ``DetectorConfig`` subclass.
        detector: its ``Detector`` subclass (``from_checkpoint`` rebuilds a trained one).
        training: ``training(config, train, strides, device)``: a ``Training`` on the training features of a
            backbone with the given level strides.
        summary: one line for listings.
        single_pass: fitted in one meta-epoch whatever the schedule says (its ``Training.meta_epochs`` is 1): nothing
            to prune or stop early, and a trial with the same config and data fits the same model again.
    """

    name: str
    learning_type: LearningType
    config: type[DetectorConfig]
    detector: type[Detector]
    training: Callable[[DetectorConfig, FeatureSet, Sequence[int], str], Training]
    summary: str
    single_pass: bool = False

    def __post_init__(self) -> None:
        if self.learning_type not in (ONE_CLASS, FEW_SHOT):
            raise ConfigError(f"family {self.name}: learning_type must be {ONE_CLASS!r} or {FEW_SHOT!r}")
        if self.detector.family != self.name:
            raise ConfigError(f"family {self.name}: its detector {self.detector.__name__} says family "
                              f"{self.detector.family!r}")

    def parameters(self) -> frozenset[str]:
        """The config fields: what a sweep may fix or search for this family."""
        return frozenset(f.name for f in fields(self.config))
