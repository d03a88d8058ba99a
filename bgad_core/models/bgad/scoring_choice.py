"""Scoring an evaluation split, and the scoring choices validation makes at no training cost.

Four cheap choices turn the flows' per-level log-likelihood maps into anomaly maps and image scores
(``bgad_core.models.bgad.scoring``): one scoring constant per level or per cell (``calibration``), how much more the coarser
level weighs (``coarse_level_weight``), how much the distance to the nearest normal patch counts beside the
likelihoods (``nearest_normal_weight``) and how a map becomes an image score (``image_score``). The best of each
depends on the data, and a wrong one can cost more than any hyperparameter: per-cell constants raised KolektorSDD's
test PRO by 0.05, where the commutator sits at the same place in every image, and collapsed on a held-out set of
unaligned tyres (PRO 0.19 against 0.80 per level; DeepPCB boards, every image a different region, fall the same
way); a coarse-level weight of 2 helped magnetic tiles and hurt KolektorSDD; on held-out solar cells a no-label
PatchCore's distances beat BGAD-FAS's flows by 0.08 image AUROC. Under a pixel objective one more: which map the
image score reduces (``choose_image_map``), since the evidence that outlines defects best need not rank images
best. None of them needs retraining: the flows run once over the split (the distances once per training) and only
the scoring is repeated, so validation chooses (``choose_scoring``) per dataset, at every meta-epoch, when the
training config says "auto".

Against fitting validation noise: few candidates (at most 2 x 2 x 2 maps x 3 reductions; a map of distances alone,
which does not depend on the likelihoods' calibration or weight, is one map), ordered from the simplest (the
paper's choices: per level, equal weights, likelihoods alone, the map's maximum) on, and a more elaborate candidate
replaces a simpler one only when it scores more than ``SCORING_MARGIN`` higher on validation. A map of distances
alone scores the same at every epoch, so it must be told apart, by a paired bootstrap, as better than the best the
flows reached at any epoch so far, and once chosen it gives way only to flows better by the margin
(``EpochScoring``). An image score of another map than the chosen one is one more choice within the epoch, by the
margin (``choose_image_map``), where the chosen map is the flows'; the distances alone keep their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from bgad_core.data.features import FeatureSet
from bgad_core.evaluation.intervals import bootstrap_distribution, compare_paired
from bgad_core.evaluation.metrics import PRO_AND_IMAGE_AUROC, compute_metrics, with_pro_and_image_auroc
from bgad_core.models.bgad.scoring import (CALIBRATIONS, IMAGE_SCORE_REDUCTIONS, NEAREST_NORMAL_WEIGHTS, Normalization,
                                           image_scores, scores_and_maps, unsmoothed_maps)
from bgad_core.models.components.postprocess import gaussian_blur

DISTANCES_ALONE = 1.0  # the nearest-normal weight of a map of distances alone: the flows' training does not change it
COARSE_LEVEL_WEIGHTS = (1.0, 2.0)  # the candidates of coarse_level_weight "auto", equal weights (the simpler) first
# the candidates of nearest_normal_coreset_ratio "auto": PatchCore's 1 % (a tenth of the fill) first
CORESET_RATIOS = (0.01, 0.1)
SCORING_MARGIN = 0.005  # how much better on validation a more elaborate scoring must be to replace a simpler one
IMAGE_OBJECTIVE = "image_auroc"  # what chooses the image-score reduction when the objective is a pixel metric


@dataclass
class ScoredSplit:
    """One scoring of a split: its metrics, the per-image scores and maps they came from, and the scoring
    (constants and choices) that made them; ``BGADTraining.validate`` turns the chosen one into an ``Evaluation``."""

    metrics: dict[str, float]
    scores: torch.Tensor
    maps: torch.Tensor
    normalization: Normalization


@dataclass(frozen=True)
class Candidate:
    """One way of scoring a split: how elaborate it is (0 = every choice the simplest), which map (calibration,
    coarse-level weight and nearest-normal weight, by their places in the candidate lists) and which reduction, and
    its evaluation."""

    rank: int
    map: tuple[int, int, int]
    reduction: int
    evaluation: ScoredSplit


def score_split(
    logps: Sequence[torch.Tensor],
    split: FeatureSet,
    normalization: Normalization,
    image_size: tuple[int, int],
    blur_sigma: float,
    distances: torch.Tensor | None = None,
) -> ScoredSplit:
    """Anomaly maps, image scores and metrics (pixel metrics where the split has masks) from the split's per-level
    log-likelihood maps (and nearest-normal distances, where ``normalization`` weighs them), scored as
    ``normalization`` says."""
    scores, maps = scores_and_maps(logps, normalization, image_size, blur_sigma, distances)
    masks = None if split.pixel_masks is None else split.pixel_masks.numpy()
    metrics = compute_metrics(split.labels.numpy(), scores.numpy(), masks, maps.numpy() if masks is not None else None)
    return ScoredSplit(metrics=metrics, scores=scores, maps=maps, normalization=normalization)


def choose_scoring(
    logps: Sequence[torch.Tensor],
    split: FeatureSet,
    fits: Sequence[Normalization],
    weights: Sequence[float],
    reductions: Sequence[str],
    image_size: tuple[int, int],
    blur_sigma: float,
    objective: str,
    nearest_weights: Sequence[float] = (0.0,),
    distances: torch.Tensor | None = None,
    epochs: EpochScoring | None = None,
    selectable: bool = True,
    image_maps: bool = True,
) -> ScoredSplit:
    """Score a validation split every candidate way and return the evaluation of the chosen one.

    Args:
        logps: the split's per-level log-likelihood maps (the flows ran once).
        fits: the candidate scoring constants (``Normalization.fit``), the simpler calibration first.
        weights, reductions: the candidate coarse-level weights and image-score reductions, the simpler first.
        objective: the metric to maximise. A pixel metric (PRO, pixel AUROC; PRO where the objective is the mean
            of PRO and image AUROC) chooses the calibration and weights, which make the map; the reduction, which
            changes no pixel, is then chosen on image AUROC. An image metric chooses all of them together.
        nearest_weights: the candidate nearest-normal weights, the simpler (0: likelihoods alone) first.
        distances: the split's standardised nearest-normal distances (``NearestNormal``), needed when a candidate
            weight is above 0.
        epochs: where validation runs at every meta-epoch of one training, its ``EpochScoring``: a map of
            distances alone (beside other candidates) must then be clearly better than the flows' best at this and
            earlier epochs; ``selectable``: whether selection may pick this epoch. None compares the candidates of
            this epoch only, by the margin. On the mean of PRO and image AUROC the flows enter that comparison with
            the image score they would deploy (``choose_image_map``), not their map's own: on DeepPCB board_b plain
            BGAD's own score kept the distances alone from epoch 2 on (test PRO 0.642; chosen on PRO, 0.685).
            Where the distances alone are chosen they keep their own image score: one from the flows' maps would
            make them depend on the epoch again, and epoch selection would then pick the epoch where the flows'
            image score was luckiest on validation, behind the guard that keeps the distances epoch-independent.
            On DeepPCB board_a (split seed 2) plain BGAD did exactly that: its distances' map with the flows' image
            score, 0.006 ahead on validation image AUROC at epoch 3, read test image AUROC 0.437 where the
            distances' own score read 0.806.
        image_maps: under a pixel objective, whether the image score may reduce a map that weighs the distances
            otherwise than the chosen map (``choose_image_map``); False: always the chosen map's.

    Each choice is ``simplest_within_margin``: the first candidate, in order of how many of its choices are not the
    simplest, whose value is within ``SCORING_MARGIN`` of the best.
    """
    def with_image_map(scored: ScoredSplit) -> ScoredSplit:
        if image_maps and len(nearest_weights) > 1 and not chosen_on_images(scored, objective):
            return choose_image_map(scored, logps, split, nearest_weights, reductions, image_size, blur_sigma,
                                    distances)
        return scored

    flow_weights = tuple(w for w in nearest_weights if w < DISTANCES_ALONE)
    if epochs is not None and flow_weights and len(flow_weights) < len(nearest_weights):
        flows = choose_scoring(logps, split, fits, weights, reductions, image_size, blur_sigma, objective,
                               flow_weights, distances, image_maps=False)
        if objective == PRO_AND_IMAGE_AUROC:  # the mean weighs the image score the flows would deploy
            flows = with_image_map(flows)
        alone = choose_scoring(logps, split, fits[:1], weights[:1], reductions, image_size, blur_sigma, objective,
                               (DISTANCES_ALONE,), distances, image_maps=False)
        chosen = epochs.distances_alone_or_flows(flows, alone, split, objective, selectable)
        if chosen is alone or objective == PRO_AND_IMAGE_AUROC:  # the distances alone keep their own image score
            return chosen
    else:
        candidates = scored_candidates(logps, split, fits, weights, nearest_weights, reductions,
                                       (image_size, blur_sigma), distances)
        chosen = choose_among(candidates, objective)
    return with_image_map(chosen)


def chosen_on_images(scored: ScoredSplit, objective: str) -> bool:
    """Whether ``objective`` chose the image score together with the map: an image metric, or a pixel metric the
    split has not (no masks), for which image AUROC stands in."""
    return objective.startswith("image_") or objective not in scored.metrics


def scored_candidates(
    logps: Sequence[torch.Tensor], split: FeatureSet, fits: Sequence[Normalization], weights: Sequence[float],
    nearest_weights: Sequence[float], reductions: Sequence[str], blur: tuple[tuple[int, int], float],
    distances: torch.Tensor | None,
) -> list[Candidate]:
    """Every candidate scoring of ``split`` (``choose_scoring``'s candidates; ``blur``: the maps' image size and
    blur sigma), each map's pixel metrics computed once."""
    labels = split.labels.numpy()
    masks = None if split.pixel_masks is None else split.pixel_masks.numpy()
    candidates: list[Candidate] = []
    for fit_rank, fit in enumerate(fits):
        for weight_rank, weight in enumerate(weights):
            for nearest_rank, nearest in enumerate(nearest_weights):
                if nearest >= 1 and fit_rank + weight_rank:  # distances alone: the same map for every fit and weight
                    continue
                normalization = replace(fit, coarse_level_weight=float(weight), nearest_normal_weight=float(nearest))
                unsmoothed = unsmoothed_maps(logps, normalization, blur[0], distances)
                maps = gaussian_blur(unsmoothed, blur[1])
                pixel: dict[str, float] = {}
                for reduction_rank, reduction in enumerate(reductions):
                    scores = image_scores(maps, reduction, unsmoothed)
                    if masks is not None and not pixel:  # the pixel metrics of a map, computed once
                        metrics = compute_metrics(labels, scores.numpy(), masks, maps.numpy())
                        pixel = {k: v for k, v in metrics.items() if not k.startswith("image_")}
                    else:
                        metrics = with_pro_and_image_auroc({**pixel, **compute_metrics(labels, scores.numpy())})
                    evaluation = ScoredSplit(metrics, scores, maps, replace(normalization, image_score=reduction))
                    candidates.append(Candidate(fit_rank + weight_rank + nearest_rank + reduction_rank,
                                                (fit_rank, weight_rank, nearest_rank), reduction_rank, evaluation))
    return candidates


def choose_among(candidates: Sequence[Candidate], objective: str) -> ScoredSplit:
    """The chosen candidate's evaluation: all choices together on an image objective; under a pixel objective the
    map on it (``map_objective``; each map's first reduction), then that map's reduction on image AUROC."""
    if objective not in candidates[0].evaluation.metrics:  # a metric this split has not (PRO without masks)
        objective = IMAGE_OBJECTIVE
    if objective.startswith("image_"):
        return simplest_within_margin(candidates, objective).evaluation
    chosen_map = simplest_within_margin([c for c in candidates if c.reduction == 0], map_objective(objective)).map
    return simplest_within_margin([c for c in candidates if c.map == chosen_map], IMAGE_OBJECTIVE).evaluation


def map_objective(objective: str) -> str:
    """What chooses the map under a pixel ``objective``: the objective itself, or PRO where it is the mean of PRO and
    image AUROC (``PRO_AND_IMAGE_AUROC``).

    The map decides the pixels, and the image score is chosen apart on image AUROC (the reduction, and the map it
    reduces: ``choose_image_map``), so each part is chosen on its own figure and only the choices that decide both
    at once (the epoch, distances alone or flows, the memory bank) on their mean. Chosen on the mean, the map
    answered for an image score that was replaced afterwards: on MTD-200 with masks BGAD-FAS took the half-and-half
    map for its own image score (test PRO 0.781 against 0.788 for the map chosen on PRO, whose image score was then
    taken from the half-and-half map: the same test image AUROC, 0.927).
    """
    return "aupro" if objective == PRO_AND_IMAGE_AUROC else objective


def choose_image_map(
    chosen: ScoredSplit,
    logps: Sequence[torch.Tensor],
    split: FeatureSet,
    nearest_weights: Sequence[float],
    reductions: Sequence[str],
    image_size: tuple[int, int],
    blur_sigma: float,
    distances: torch.Tensor | None,
) -> ScoredSplit:
    """``chosen`` (a map chosen on a pixel metric, its image score on image AUROC), or the same map with the image
    score of a map that weighs the distances otherwise, where that score's validation image AUROC is more than
    ``SCORING_MARGIN`` higher.

    A pixel objective chooses the map, and image AUROC only chooses among that map's reductions; but which evidence
    ranks images best need not be the one that outlines defects best. On MTD-200 with masks validation chose
    BGAD-FAS's flows alone on PRO (test PRO 0.788 against the distances' 0.706) while the distances alone ranked
    test images better (image AUROC 0.901 against 0.896), and on held-out unaligned tyres PatchCore's distances
    led BGAD-FAS's flows by 0.05 of test image AUROC. The candidates are the maps of the other candidate
    nearest-normal weights (the chosen map's calibration and coarse-level weight), each reduced every candidate
    way; the best replaces ``chosen``'s score where it leads by more than the margin, as the mean of the top 1 %
    replaces the maximum: within one epoch, one more choice of the same kind. The map, and so every pixel figure,
    stays ``chosen``'s. Measured: on MTD-200 with masks BGAD-FAS keeps its flows' map and takes the half-and-half
    map's image score (test image AUROC 0.896 -> 0.927); plain BGAD on DeepPCB board_b takes the distances alone's
    (seed 0: 0.715 -> 0.802).

    Until the eighteenth session the lead also had to be told apart by a paired bootstrap (95 %), the guard of the
    distances alone against the flows' best across epochs. Under the mean of PRO and image AUROC that made the
    comparison lopsided: the distances alone bring their image score to it ungated, the flows could borrow the same
    score only where a bootstrap of a few validation images told it apart. On DeepPCB board_b with one image-level
    label the distances alone then won at epoch 2 (test image AUROC / pixel AUROC / PRO 0.802 / 0.847 / 0.642)
    where the flows' map of epoch 8 with the distances' image score, chosen by the margin, gives 0.802 / 0.910 /
    0.749 (BENCHMARKS.md, "The image score's map by the margin alone"). The guard across epochs stays where the
    selection bias is, with the distances alone, whose constant figure meets the flows' best of every epoch (and
    which is why ``choose_scoring`` does not pass the distances alone here once that guard has chosen them). Over
    the 22 arms measured both ways the margin alone moved the test mean of PRO and image AUROC by +0.002 on
    average: three gains of PRO (+0.044 to +0.107), two trades, two losses of image AUROC (-0.070, -0.026) where
    another flows map's score led on 23-24 validation images (BENCHMARKS.md, nineteenth session). Letting only the
    distances alone lend was worse on 25 more arms (-0.166 of test image AUROC over the seven where it differed),
    and borrowing at all against the chosen map's own score a wash (12 differ: -0.032 of image AUROC, +0.018 of
    PRO; BENCHMARKS.md, twentieth session).
    """
    own = chosen.normalization
    labels = split.labels.numpy()
    value = objective_value(chosen.metrics, IMAGE_OBJECTIVE)
    best: tuple[float, ScoredSplit] | None = None
    for weight in nearest_weights:
        if weight == own.nearest_normal_weight:
            continue
        unsmoothed = unsmoothed_maps(logps, replace(own, nearest_normal_weight=float(weight)), image_size, distances)
        maps = gaussian_blur(unsmoothed, blur_sigma)
        for reduction in reductions:
            scores = image_scores(maps, reduction, unsmoothed)
            metrics = compute_metrics(labels, scores.numpy())
            other = objective_value(metrics, IMAGE_OBJECTIVE)
            if best is None or other > best[0]:
                scoring = replace(own, image_score=reduction, image_nearest_normal_weight=float(weight))
                merged = with_pro_and_image_auroc({**chosen.metrics, **metrics})
                best = (other, ScoredSplit(merged, scores, chosen.maps, scoring))
    return best[1] if best is not None and best[0] - value > SCORING_MARGIN else chosen


class EpochScoring:
    """What ``choose_scoring`` remembers across the meta-epochs of one training, for the one choice that must look
    across epochs: the flows' best validation scoring, which a map of distances alone must beat.

    A map of distances alone (nearest-normal weight ``DISTANCES_ALONE``) does not depend on the flows, so it has the
    same validation figure at every epoch. Compared within each epoch only, it won epoch selection whenever the flows
    dipped by noise: on unaligned KolektorSDD it beat the best mix of an earlier epoch by 0.004 of validation PRO and
    lost 0.047 of test PRO to it; a margin of 0.005 over the flows' best so far was not enough either (it won by
    0.006 there). So it replaces the flows' choice only where its paired bootstrap interval against the flows' best
    scoring so far (this epoch's and every earlier one selection could pick) lies wholly above 0
    (``intervals.compare_paired``, 95 %): the flows keep anything validation cannot tell apart, and the distances
    are deployed only where they are clearly better than anything the flows reached, as PatchCore's distances
    were on held-out solar cells (0.910 test image AUROC against BGAD-FAS's 0.826 on the same features). The
    bootstrap runs only when the distances lead by more than ``SCORING_MARGIN`` (about a second per scoring of
    100 maps), and the flows' best scoring's resampled values are kept while it stays the best.

    Once chosen at a selectable epoch, the distances are the incumbent, and later flows replace them only by
    scoring more than ``SCORING_MARGIN`` higher, as any more elaborate scoring replaces a simpler one. Without
    that, flows a hair above them by noise took epoch selection back: DeepPCB board_a with one image-level label,
    validation PRO 0.637 at epoch 8 against the distances' 0.636 (24 validation images), test image AUROC / PRO
    0.604 / 0.548 against the distances' 0.731 / 0.595.
    """

    def __init__(self) -> None:
        self.flows_best: ScoredSplit | None = None  # the flows' best scoring at a selectable epoch so far
        self.best_value = -math.inf  # its objective value, which outlives a resume (the scoring itself does not)
        self._best_resampled: tuple[ScoredSplit, np.ndarray] | None = None
        self.distances_chosen = False  # the distances alone won a selectable epoch, and no flows beat them since

    def state_dict(self) -> dict[str, float]:
        """What a resumed training needs: the flows' best objective value so far, and whether the distances alone
        are the incumbent."""
        return {"flows_best_value": self.best_value, "distances_chosen": float(self.distances_chosen)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Resume from ``state_dict()`` (one written before the incumbent was kept has no ``distances_chosen``);
        the distances must then also lead the restored value by the margin."""
        self.best_value = float(state["flows_best_value"])
        self.distances_chosen = bool(state.get("distances_chosen", 0.0))

    def distances_alone_or_flows(
        self, flows: ScoredSplit, alone: ScoredSplit, split: FeatureSet, objective: str, selectable: bool
    ) -> ScoredSplit:
        """``alone`` (the choice among maps of distances alone) where validation tells it apart as better than the
        flows' best so far, ``flows`` (this epoch's choice among the flows' candidates) otherwise; ``selectable``:
        whether selection may pick this epoch, so whether ``flows`` may become the flows' best."""
        objective = objective if objective in flows.metrics else IMAGE_OBJECTIVE
        value, alone_value = objective_value(flows.metrics, objective), objective_value(alone.metrics, objective)
        best = self.flows_best
        if best is None or value > objective_value(best.metrics, objective):
            best = flows
        if selectable:
            self.flows_best, self.best_value = best, max(self.best_value, value)
        if self.distances_chosen:  # the incumbent: the flows must now beat it by more than the margin
            if value <= alone_value + SCORING_MARGIN:
                return alone
            if selectable:
                self.distances_chosen = False
            return flows
        gap = alone_value - max(self.best_value, value)
        if not gap > SCORING_MARGIN:
            return flows
        if self._best_resampled is None or self._best_resampled[0] is not best:
            self._best_resampled = (best, resampled(best, split, objective))
        comparison = compare_paired(resampled(alone, split, objective), self._best_resampled[1], gap, len(split))
        if comparison.verdict != "better":
            return flows
        self.distances_chosen = selectable
        return alone


def resampled(scored: ScoredSplit, split: FeatureSet, objective: str) -> np.ndarray:
    """``objective`` of a scoring of ``split`` on the split's bootstrap resamples (``intervals``: the same images
    for every scoring of the split, so two scorings' values are paired)."""
    pixels = not objective.startswith("image_") and split.pixel_masks is not None
    return bootstrap_distribution(split.labels.numpy(), scored.scores.numpy(),
                                  split.pixel_masks.numpy() if pixels else None,
                                  scored.maps.numpy() if pixels else None)[objective]


def objective_value(metrics: dict[str, float], objective: str) -> float:
    """``metrics[objective]``; a missing or NaN value counts as the worst."""
    number = metrics.get(objective, math.nan)
    return -math.inf if math.isnan(number) else number


def simplest_within_margin(candidates: Sequence[Candidate], objective: str) -> Candidate:
    """The least elaborate candidate (lowest rank; the first of equal rank) within ``SCORING_MARGIN`` of the best
    value of ``objective``; a NaN value counts as the worst."""
    ordered = sorted(candidates, key=lambda candidate: candidate.rank)  # stable: the first of equal rank stays first
    return ordered[first_within_margin([objective_value(c.evaluation.metrics, objective) for c in ordered])]


def first_within_margin(values: Sequence[float]) -> int:
    """The index of the first of ``values`` (ordered from the simplest choice on) within ``SCORING_MARGIN`` of the
    largest."""
    best = max(values)
    return next(index for index, value in enumerate(values) if value >= best - SCORING_MARGIN)


def choose_bank(
    distances: Sequence[torch.Tensor], split: FeatureSet, image_size: tuple[int, int], blur_sigma: float,
    objective: str,
) -> int:
    """Which memory bank validation chooses: the index of the first of ``distances`` (each bank's standardised
    nearest-normal distances over ``split``, the smallest share first) whose map of distances alone scores within
    ``SCORING_MARGIN`` of the best on ``objective`` (image AUROC, with the maximum, where the split has no masks).
    Under a pixel objective a larger bank must also keep image AUROC within the margin of the smallest's.

    The distances do not depend on the flows, so this is one choice per training, made at its first validation: it
    cannot follow epoch noise. The bank whose distances alone score best is the one a mix is built on too. Why image
    AUROC as well: on DeepPCB board_b a 10 % bank raised the distances' validation PRO from 0.593 to 0.738 and
    lowered their validation image AUROC from 0.818 to 0.773, and test moved the same way (PRO 0.642 -> 0.745,
    image AUROC 0.802 -> 0.770); chosen on PRO alone, BGAD-FAS with image-level labels lost 0.041 of test image
    AUROC for 0.053 of PRO (BENCHMARKS.md, "The bank's share chosen on validation").
    """
    alone = Normalization((), (), nearest_normal_weight=DISTANCES_ALONE)
    metrics = [score_split((), split, alone, image_size, blur_sigma, d).metrics for d in distances]
    objective = objective if objective in metrics[0] else IMAGE_OBJECTIVE
    floor = objective_value(metrics[0], IMAGE_OBJECTIVE) - SCORING_MARGIN
    return first_within_margin([objective_value(m, objective) if objective_value(m, IMAGE_OBJECTIVE) >= floor
                                else -math.inf for m in metrics])


def scoring_candidates(
    calibration: str, coarse_level_weight: float | str, image_score: str, nearest_normal_weight: float | str = 0.0
) -> tuple[tuple[str, ...], tuple[float, ...], tuple[str, ...], tuple[float, ...]]:
    """The calibrations, coarse-level weights, image-score reductions and nearest-normal weights a training config
    lets validation try: every candidate of an "auto" choice, the configured value otherwise."""
    return (
        CALIBRATIONS if calibration == "auto" else (calibration,),
        COARSE_LEVEL_WEIGHTS if coarse_level_weight == "auto" else (float(coarse_level_weight),),
        IMAGE_SCORE_REDUCTIONS if image_score == "auto" else (image_score,),
        NEAREST_NORMAL_WEIGHTS if nearest_normal_weight == "auto" else (float(nearest_normal_weight),),
    )
