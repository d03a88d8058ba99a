"""From per-level log-likelihood maps to anomaly maps and image scores with *fixed* normalisation.

The official code subtracts the maximum log-likelihood of the whole evaluated set, so a score depends on which
other images were evaluated with it. Here each level is standardised with constants measured once on training
normals (mean and standard deviation of their per-dim log-likelihoods, per cell or per level) and stored with the
model: the same image always gets the same score, in a batch of one or of a thousand.

The map may also average in each cell's standardised distance to the nearest training-normal patch
(``components.memory_bank.NearestNormal``, PatchCore's evidence on the same features), by
``Normalization.nearest_normal_weight``: flows and distances fail on different data, and validation chooses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from bgad_core.errors import ConfigError
from bgad_core.models.components.postprocess import gaussian_blur, upsample

# the paper's (the simplest) first; the maximum before smoothing, PatchCore's image score on a map of distances
# alone, last (``image_scores``)
IMAGE_SCORE_REDUCTIONS = ("max", "top1pct_mean", "unsmoothed_max")
CALIBRATIONS = ("level", "position")  # the simpler (one constant per level, the paper's kind) first
# likelihoods alone (the paper's, the simpler) first; distances alone (1) last, chosen only where validation tells
# them apart as better than the best the flows reached at any selectable epoch (``scoring_choice.EpochScoring``: an
# epoch-independent figure would win epoch selection on validation noise otherwise)
NEAREST_NORMAL_WEIGHTS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class Normalization:
    """The scoring constants stored with a model: how its per-level log-likelihoods become one anomaly map.

    ``mean``, ``std``: location and scale of normal per-dim log-likelihoods, per level: scalars, or ``(H_l, W_l)``
    maps. The flows are conditioned on position, and their likelihoods still depend on it (borders, aligned parts
    of an object): a per-position mean and deviation, measured on training normals, turns each cell's
    log-likelihood into "how unusual for this place" instead of "how unusual for this level".
    ``coarse_level_weight``: how much more each level weighs in the map than the next finer one (1 = equal);
    ``image_score``: how a map becomes an image score (``image_scores``); ``nearest_normal_weight``: the share of
    the standardised nearest-normal distance in the map (0 = likelihoods alone, 1 = distances alone);
    ``image_nearest_normal_weight``: where the image score reduces a map that weighs the distances otherwise than
    the anomaly map does, that map's share (None: the anomaly map's own). Under a pixel objective validation
    chooses the map on the pixel metric and the image score on image AUROC, and the two need not agree
    (``scoring_choice.choose_image_map``). Each choice is made on validation by ``BGADTraining.validate`` when the
    training config says "auto", and lives here so that test, checkpoints, serving and export score with it.
    """

    mean: tuple[torch.Tensor, ...]
    std: tuple[torch.Tensor, ...]
    coarse_level_weight: float = 1.0
    image_score: str = "max"
    nearest_normal_weight: float = 0.0
    image_nearest_normal_weight: float | None = None

    def __post_init__(self) -> None:  # plain floats (checkpoints before per-position calibration) become tensors
        object.__setattr__(self, "mean", tuple(torch.as_tensor(m, dtype=torch.float32) for m in self.mean))
        object.__setattr__(self, "std", tuple(torch.as_tensor(s, dtype=torch.float32) for s in self.std))
        if self.image_score not in IMAGE_SCORE_REDUCTIONS:
            raise ConfigError(f"image_score must be one of {IMAGE_SCORE_REDUCTIONS}, got {self.image_score!r}")
        if isinstance(self.nearest_normal_weight, bool) or not 0.0 <= self.nearest_normal_weight <= 1.0:
            raise ConfigError(f"nearest_normal_weight must lie in [0, 1], got {self.nearest_normal_weight!r}")
        image_weight = self.image_nearest_normal_weight
        if image_weight is not None and (isinstance(image_weight, bool) or not 0.0 <= image_weight <= 1.0):
            raise ConfigError(f"image_nearest_normal_weight must be None or lie in [0, 1], got {image_weight!r}")

    @property
    def image_weight(self) -> float:
        """The nearest-normal weight of the map the image score reduces."""
        own = self.image_nearest_normal_weight
        return self.nearest_normal_weight if own is None else own

    @property
    def uses_distances(self) -> bool:
        """Whether the map or the image score reads the nearest-normal distances (a memory bank)."""
        return max(self.nearest_normal_weight, self.image_weight) > 0

    @property
    def uses_likelihoods(self) -> bool:
        """Whether the map or the image score reads the flows' likelihoods."""
        return min(self.nearest_normal_weight, self.image_weight) < 1

    @property
    def calibration(self) -> str:
        """"position" when the constants are per-cell maps, "level" when they are one number per level."""
        return "position" if any(m.ndim for m in self.mean) else "level"

    @staticmethod
    def fit(logp_maps: Sequence[torch.Tensor], calibration: str = "level") -> Normalization:
        """Measure the constants from each level's ``(N, H_l, W_l)`` log-likelihood maps of normal images.

        ``calibration="position"`` keeps a mean and deviation per cell; a cell's deviation is floored at a tenth of
        its level's, so that a cell where the few normals happen to agree cannot blow up every score there.
        """
        if calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
        means, stds = [], []
        for logps in logp_maps:
            values = logps.double()
            level_std = max(float(values.std()), 1e-6)
            if calibration == "position":
                means.append(values.mean(dim=0))
                stds.append(values.std(dim=0).clamp_min(0.1 * level_std))
            else:
                means.append(values.mean())
                stds.append(torch.tensor(level_std))
        return Normalization(tuple(means), tuple(stds))

    def choice_metrics(self) -> dict[str, float]:
        """The scoring choices as numbers, for a metrics log: the coarse-level and nearest-normal weights (the
        anomaly map's and the image score's map's), and 1 or 0 for whether the calibration is per cell ("position")
        and the image score the mean of the top 1 % ("top1pct_mean") or the maximum before smoothing
        ("unsmoothed_max"; both 0: the smoothed map's maximum)."""
        return {"coarse_level_weight": float(self.coarse_level_weight),
                "calibration_position": float(self.calibration == "position"),
                "image_score_top1pct_mean": float(self.image_score == "top1pct_mean"),
                "image_score_unsmoothed_max": float(self.image_score == "unsmoothed_max"),
                "nearest_normal_weight": float(self.nearest_normal_weight),
                "image_score_nearest_normal_weight": float(self.image_weight)}

    def describe(self) -> str:
        """The choices in words, for a log line: ``calibration position, coarse level weight 2, image score max,
        nearest-normal weight 0`` (and ``, image score of the map of nearest-normal weight 1`` where the image score
        reduces another map)."""
        other = ("" if self.image_nearest_normal_weight is None
                 else f", image score of the map of nearest-normal weight {self.image_nearest_normal_weight:g}")
        return (f"calibration {self.calibration}, coarse level weight {self.coarse_level_weight:g}, "
                f"image score {self.image_score}, nearest-normal weight {self.nearest_normal_weight:g}{other}")

    def to_dict(self) -> dict[str, list | float | str]:
        """Plain (nested) lists, floats and a string, for a ``weights_only`` checkpoint."""
        values = {"mean": [m.tolist() for m in self.mean], "std": [s.tolist() for s in self.std],
                  "coarse_level_weight": float(self.coarse_level_weight), "image_score": self.image_score,
                  "nearest_normal_weight": float(self.nearest_normal_weight)}
        if self.image_nearest_normal_weight is not None:
            values["image_nearest_normal_weight"] = float(self.image_nearest_normal_weight)
        return values

    @staticmethod
    def from_dict(
        values: dict[str, list | float | str], coarse_level_weight: float = 1.0, image_score: str = "max"
    ) -> Normalization:
        """The inverse of ``to_dict``; ``coarse_level_weight`` and ``image_score`` are the values of a checkpoint
        that predates storing them (its training config's); one that predates nearest-normal distances has none, and
        one without ``image_nearest_normal_weight`` reduces its anomaly map."""
        image_weight = values.get("image_nearest_normal_weight")
        return Normalization(tuple(values["mean"]), tuple(values["std"]),
                             float(values.get("coarse_level_weight", coarse_level_weight)),
                             str(values.get("image_score", image_score)),
                             float(values.get("nearest_normal_weight", 0.0)),
                             None if image_weight is None else float(image_weight))


def anomaly_maps(
    logp_maps: Sequence[torch.Tensor],
    normalization: Normalization,
    image_size: tuple[int, int],
    blur_sigma: float = 4.0,
    distances: torch.Tensor | None = None,
) -> torch.Tensor:
    """Anomaly map ``(B, H, W)`` at image resolution: ``unsmoothed_maps`` smoothed as in the paper (Gaussian,
    sigma 4)."""
    return gaussian_blur(unsmoothed_maps(logp_maps, normalization, image_size, distances), blur_sigma)


def unsmoothed_maps(
    logp_maps: Sequence[torch.Tensor],
    normalization: Normalization,
    image_size: tuple[int, int],
    distances: torch.Tensor | None = None,
) -> torch.Tensor:
    """The anomaly map ``(B, H, W)`` at image resolution before smoothing: weighted mean over levels of standardised
    negative log-likelihood, with the standardised nearest-normal distances averaged in where ``normalization`` says.

    Each level's ``(B, H_l, W_l)`` map becomes (mean - logp) / std (higher = more anomalous; the constants are
    scalars or per-cell maps, see ``Normalization``), is upsampled bilinearly, and the levels (finest first) are
    averaged with weights growing by ``normalization.coarse_level_weight`` per level (1 = equal, the paper's).
    ``distances`` (``(B, h, w)``, ``NearestNormal``'s) are upsampled likewise and weigh
    ``normalization.nearest_normal_weight`` against the likelihoods' 1 minus it.
    """
    share = normalization.nearest_normal_weight
    if share > 0 and distances is None:
        raise ConfigError(f"nearest_normal_weight {share:g} needs the nearest-normal distances, none were given")
    weights = [normalization.coarse_level_weight**level for level in range(len(logp_maps))]
    total = None
    for level, logps in enumerate(logp_maps if share < 1 else ()):
        score = (normalization.mean[level] - logps.float()) / normalization.std[level]
        score = upsample(score, image_size) * ((1 - share) * weights[level] / sum(weights))
        total = score if total is None else total + score
    if share > 0:
        nearest = upsample(distances.float(), image_size) * share
        total = nearest if total is None else total + nearest
    return total


def scores_and_maps(
    logp_maps: Sequence[torch.Tensor],
    normalization: Normalization,
    image_size: tuple[int, int],
    blur_sigma: float = 4.0,
    distances: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores ``(B,)`` and anomaly maps ``(B, H, W)`` as ``normalization`` says: the maps of
    ``anomaly_maps``, the scores their reduction, or, where ``normalization.image_nearest_normal_weight`` is set,
    the reduction of the map that weighs the distances by that share instead."""
    unsmoothed = unsmoothed_maps(logp_maps, normalization, image_size, distances)
    maps = gaussian_blur(unsmoothed, blur_sigma)
    if normalization.image_nearest_normal_weight is not None:
        image_map = replace(normalization, nearest_normal_weight=normalization.image_weight)
        unsmoothed = unsmoothed_maps(logp_maps, image_map, image_size, distances)
        return image_scores(gaussian_blur(unsmoothed, blur_sigma), normalization.image_score, unsmoothed), maps
    return image_scores(maps, normalization.image_score, unsmoothed), maps


def image_scores(maps: torch.Tensor, reduction: str = "max", unsmoothed: torch.Tensor | None = None) -> torch.Tensor:
    """Image-level score from each ``(H, W)`` anomaly map: its maximum, the mean of its top 1 % pixels, or
    ("unsmoothed_max") the maximum of the same map before smoothing (``unsmoothed``, ``unsmoothed_maps``').

    Smoothing spreads a small defect's peak over its neighbours and lowers it, so a defect of a few cells can rank
    below a normal image's broad bump; the maximum before smoothing keeps the peak. On a map of distances alone it
    is PatchCore's own image score (without its re-weighting). Chosen on validation (``image_score: auto``) on 33
    arms of DeepPCB, KolektorSDD (aligned and unaligned), BrainMRI and MTD-200, it was taken on 22, all but one on
    DeepPCB (defects a few pixels wide), and test image AUROC followed on 18 (+0.003 to +0.184, +0.496 summed with
    the four losses, the largest -0.024; BGAD-FAS on board_b with one image-level label 0.802 -> 0.822 and 0.765 ->
    0.785, above PatchCore's 0.815 and 0.779); the smoothed reductions stayed where defects are larger than the
    Gaussian (BENCHMARKS.md, twenty-first session).
    """
    if reduction == "unsmoothed_max":
        if unsmoothed is None:
            raise ConfigError("image_score 'unsmoothed_max' needs the map before smoothing, none was given")
        maps = unsmoothed
    flat = maps.flatten(1)
    if reduction in ("max", "unsmoothed_max"):
        return flat.max(dim=1).values
    if reduction == "top1pct_mean":
        k = max(1, flat.shape[1] // 100)
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ConfigError(f"image_score must be one of {IMAGE_SCORE_REDUCTIONS}, got {reduction!r}")
