"""What a BGAD / BGAD-FAS model is and how it trains and scores, split by concern.

``BGADConfig`` is the family's one flat config (the keys a sweep fixes or searches), composed of three parts that
each consumer reads alone: ``FlowArchitecture`` (what ``BGADFlows`` builds), ``Optimisation`` (what the training
loop does) and ``ScoringChoices`` (how log-likelihoods become maps and scores, and which of that validation
chooses). Defaults follow the paper and its official code except where BENCHMARKS.md measured better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bgad_core.errors import ConfigError
from bgad_core.models.base import DetectorConfig
from bgad_core.models.bgad.boundary import check_beta
from bgad_core.models.bgad.scoring import CALIBRATIONS, IMAGE_SCORE_REDUCTIONS
from bgad_core.precision import PRECISION_CHOICES

COARSE_LABELS = ("all", "distant")  # Optimisation.coarse_labels
IMAGE_SCORE_MAPS = ("auto", "anomaly_map")  # ScoringChoices.image_score_map


@dataclass
class FlowArchitecture:
    """The conditional flows (``torch_model.BGADFlows``).

    Attributes:
        coupling_blocks, clamp, cond_dim: flow architecture (paper: 8, 1.9, 128).
        condition_on_position: condition the flows on each cell's position (the paper's, default); false models one
            density per level, the same at every place (``model.BGADFlows``), for objects that do not sit at the
            same place in every image.
        local_aggregation: each feature is averaged over its ``k x k`` neighbourhood before its flow (odd; 1 = the
            paper's per-cell features). See ``bgad_core.models.bgad.torch_model``. Meant for grids of 16+ cells a side (256 px at
            stride 16); on small inputs (96 px: 12 and 6 cells) a 3x3 window spans much of the image and costs
            accuracy, so use 1 there.
    """

    coupling_blocks: int = 8
    clamp: float = 1.9
    cond_dim: int = 128
    condition_on_position: bool = True
    local_aggregation: int = 3

    def check_architecture(self) -> None:
        for key in ("coupling_blocks", "clamp", "cond_dim"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.local_aggregation < 1 or self.local_aggregation % 2 == 0:
            raise ConfigError(f"local_aggregation must be an odd number >= 1, got {self.local_aggregation}")


@dataclass
class Optimisation:
    """The two-phase training loop (``training.BGADTraining``).

    Attributes:
        beta: fraction of normal vectors allowed below the normal boundary b_n (Sec. 3.3).
        tau: margin between normal and abnormal boundary, b_a = b_n - tau.
        normalizer: scale dividing per-dim log-likelihoods before boundary and margin apply.
        bgspp_lambda: weight of the BG-SPP loss against the ML loss (Eq. 9).
        focal_weighting: asymmetric focal weights of BGAD-FAS (Eq. 17-19).
        lr: Adam learning rate at the end of warm-up.
        sub_epochs: passes over the sampled feature vectors per meta-epoch.
        normal_epochs: meta-epochs of phase 1 (normal only).
        warmup_epochs: meta-epochs of linear learning-rate warm-up before the cosine decay.
        fiber_batch: feature vectors per optimisation step (official: 4096).
        cells_per_step: 0 (the paper's) draws each step's vectors at random from all cells of the sampled images;
            k > 0 draws it as a block of k cells x ``fiber_batch // k`` images (more cells where a sub-epoch has
            fewer images, so that steps keep ``fiber_batch`` vectors), so the positional condition term is
            computed for k cells instead of thousands (the same objective, still unbiased SGD; the BG-SPP boundary
            is then a percentile over the block's cells). Its steps are 1.1-1.4x faster on a 2-core CPU but a
            trial only 1.05-1.14x; on MTD-200 test image AUROC and PRO stayed within 0.01 while pixel AUROC fell by
            0.03, measured on that one dataset, hence off by default (BENCHMARKS.md, sections 1b and 1c).
        abnormal_ratio: abnormal images drawn per normal image in phase 2 (0.5 = normal:abnormal 2:1).
        push_fraction: share of each step's abnormal vectors that phase 2 trains on, the least likely first (1 = all,
            the paper); for image-level labels, whose masks mark whole images, see ``least_likely_abnormal``.
        abnormal_fraction: share of defect pixels from which a feature cell counts as abnormal; cells with less
            (but some) defect are left out of the losses rather than trained as normal.
        coarse_labels: which cells of a label over most of its image (an image-level label, its RACP samples, a
            loose box) train as abnormal: "distant" (default): those farther from every training-normal patch than
            90 % of normal cells, the rest of the label left out of the losses
            (``bgad_core.models.bgad.coarse_labels``), or "all" (the paper's). With image-level labels it lifted
            validation PRO on the DeepPCB boards from 0.590 / 0.707 to 0.617 / 0.773 (plain BGAD: 0.611 / 0.735) and
            moved MTD-200, KolektorSDD and BrainMRI by at most 0.002 (BENCHMARKS.md, "Coarse labels").
        precision: training steps in "fp32", or "bf16": bfloat16 subnet matmuls with the feature path, log-det and
            loss in float32 (1.2-2x faster on 2-core CPUs with bf16 instructions, 3-10x slower on one without
            them, no faster on an H200; BENCHMARKS.md); "auto" (default) takes bf16 only on a CPU with bf16
            hardware (``bgad_core.precision``) and warns when "bf16" is forced without it. Evaluation is float32.
    """

    beta: float = 0.01
    tau: float = 0.1
    normalizer: float = 10.0
    bgspp_lambda: float = 1.0
    focal_weighting: bool = True
    lr: float = 2e-4
    sub_epochs: int = 8
    normal_epochs: int = 1
    warmup_epochs: int = 2
    fiber_batch: int = 4096
    cells_per_step: int = 0
    abnormal_ratio: float = 0.5
    abnormal_fraction: float = 0.25
    push_fraction: float = 1.0
    coarse_labels: str = "distant"
    precision: str = "auto"

    def check_optimisation(self) -> None:
        check_beta(self.beta)
        for key in ("tau", "normalizer", "lr", "sub_epochs", "fiber_batch"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("bgspp_lambda", "abnormal_ratio", "normal_epochs", "warmup_epochs", "cells_per_step"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.push_fraction <= 1.0:
            raise ConfigError(f"push_fraction must lie in (0, 1], got {self.push_fraction}")
        if not 0.0 < self.abnormal_fraction <= 1.0:
            raise ConfigError(f"abnormal_fraction must lie in (0, 1], got {self.abnormal_fraction}")
        if self.coarse_labels not in COARSE_LABELS:
            raise ConfigError(f"coarse_labels must be one of {list(COARSE_LABELS)}, got {self.coarse_labels!r}")
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"precision must be one of {list(PRECISION_CHOICES)}, got {self.precision!r}")


@dataclass
class ScoringChoices:
    """From log-likelihoods to anomaly maps and image scores (``scoring``; "auto" choices: ``scoring_choice``).

    Attributes:
        calibration: how log-likelihoods are standardised into scores, measured on training normals: "position"
            (a mean and deviation per cell of each level's grid, ``scoring.Normalization``), "level" (one per level,
            the paper's kind of constant) or "auto" (default: chosen on validation, ``bgad_core.models.bgad.scoring_choice``). Per
            cell raised test PRO by 0.05 on KolektorSDD, whose parts sit at the same place in every image, and
            collapsed on unaligned objects (held-out tyres: PRO 0.19 against 0.80 per level).
        coarse_level_weight: how much more each level weighs in the anomaly map than the next finer one (1 = equal,
            the paper's; see ``scoring.anomaly_maps``), or "auto" (default): chosen on validation among
            ``evaluation.COARSE_LEVEL_WEIGHTS`` (2 helped MTD-200, 1 KolektorSDD, BENCHMARKS.md).
        blur_sigma: Gaussian smoothing of anomaly maps, in pixels.
        image_score: how an anomaly map becomes an image score: "max", "top1pct_mean" (the mean of its top 1 %
            pixels), "unsmoothed_max" (the maximum of the map before ``blur_sigma``'s smoothing: a defect of a few
            cells keeps its peak; ``scoring.image_scores``) or "auto" (default: chosen on validation image AUROC).
        nearest_normal_weight: the share, in the anomaly map, of each cell's standardised distance to the nearest
            training-normal patch (PatchCore's evidence on the same features, ``components.memory_bank``) against
            the flows' standardised likelihoods: 0 (likelihoods alone, the paper's), up to 1 (distances alone), or
            "auto" (default: 0, 0.5 or 1, chosen on validation, ``scoring.NEAREST_NORMAL_WEIGHTS``; 1 only where a
            paired bootstrap tells it apart as better than the flows' best so far, and then until flows score more
            than the margin higher, ``scoring_choice.EpochScoring``; BENCHMARKS.md, issue 21). The memory bank is
            filled once per training and stored with the model only where it is used.
        image_score_map: which map the image score reduces: "anomaly_map" (the map the model outputs, the paper's)
            or "auto" (default): under a pixel objective, where ``nearest_normal_weight`` is "auto", validation may
            take it from a map that weighs the distances otherwise, where its image AUROC is more than the margin
            higher (``scoring_choice.choose_image_map``): the map is chosen on the pixel metric, and
            the evidence that outlines a defect best need not rank images best. The map, and so every pixel
            figure, stays the chosen one's; the image score is then not its maximum. A map of distances alone keeps
            its own image score (``choose_scoring``).
        nearest_normal_coreset_ratio: the share of the training normals' patches the memory bank keeps (greedy
            k-center coreset), or "auto" (default): 1 % (PatchCore's) or 10 %, whichever bank's distances alone
            score validation higher (10 % only by more than the margin, and under a pixel objective only where it
            also keeps image AUROC within the margin; ``scoring_choice.choose_bank``), once per training, both
            banks filled by one greedy run (``memory_bank.fit_banks``). No share wins everywhere: 10 % raised the
            distances' validation PRO on both DeepPCB boards and MTD-200 and lowered it on KolektorSDD, and test
            followed validation on all four (BENCHMARKS.md, "The bank's share chosen on validation"). The 10 %
            bank costs ten times the 1 % bank's fill (``benchmarks/bench_memory_bank.py``).

    Every "auto" choice costs no training: the flows run once per validation and only the scoring is repeated; the
    choices are stored with the scoring constants (``Normalization``), used for test and serving, and logged per
    meta-epoch.
    """

    calibration: str = "auto"
    coarse_level_weight: float | str = "auto"
    blur_sigma: float = 4.0
    image_score: str = "auto"
    nearest_normal_weight: float | str = "auto"
    image_score_map: str = "auto"
    nearest_normal_coreset_ratio: float | str = "auto"

    def check_scoring(self) -> None:
        if self.blur_sigma < 0:
            raise ConfigError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.coarse_level_weight != "auto":
            self.coarse_level_weight = _weight(self.coarse_level_weight)
        if self.calibration not in ("auto", *CALIBRATIONS):
            raise ConfigError(f"calibration must be one of {['auto', *CALIBRATIONS]}, got {self.calibration!r}")
        if self.image_score not in ("auto", *IMAGE_SCORE_REDUCTIONS):
            raise ConfigError(f"image_score must be one of {['auto', *IMAGE_SCORE_REDUCTIONS]}, got {self.image_score!r}")
        if self.nearest_normal_weight != "auto":
            number = _number(self.nearest_normal_weight)
            if not 0.0 <= number <= 1.0:
                raise ConfigError(f"nearest_normal_weight must be 'auto' or a number in [0, 1], "
                                  f"got {self.nearest_normal_weight!r}")
            self.nearest_normal_weight = number
        if self.image_score_map not in IMAGE_SCORE_MAPS:
            raise ConfigError(f"image_score_map must be one of {list(IMAGE_SCORE_MAPS)}, got {self.image_score_map!r}")
        if self.nearest_normal_coreset_ratio != "auto":
            number = _number(self.nearest_normal_coreset_ratio)
            if not 0.0 < number <= 1.0:
                raise ConfigError(f"nearest_normal_coreset_ratio must be 'auto' or a number in (0, 1], "
                                  f"got {self.nearest_normal_coreset_ratio!r}")
            self.nearest_normal_coreset_ratio = number


@dataclass
class BGADConfig(ScoringChoices, FlowArchitecture, Optimisation, DetectorConfig):
    """One BGAD / BGAD-FAS run: its schedule, flows, optimisation and scoring (the fields of the three parts).

    Attributes:
        meta_epochs: outer epochs; validation runs after each one.
        seed: seeds flow initialisation and sampling.
    """

    meta_epochs: int = 25

    def __post_init__(self) -> None:
        if not self.meta_epochs > 0:
            raise ConfigError(f"meta_epochs must be > 0, got {self.meta_epochs}")
        self.check_architecture()
        self.check_optimisation()
        self.check_scoring()


def _weight(value: object) -> float:
    """A fixed ``coarse_level_weight`` as a float > 0 (a number, or its text from a command line)."""
    number = _number(value)
    if not number > 0 or math.isinf(number):
        raise ConfigError(f"coarse_level_weight must be 'auto' or a number > 0, got {value!r}")
    return number


def _number(value: object) -> float:
    """A number, or its text from a command line, as a float; NaN for anything else (a bool included)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
