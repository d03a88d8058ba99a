"""The scoring choices validation makes: the margin rule, and which metric chooses what."""

from __future__ import annotations

import torch

from bgad_core.models.bgad.scoring_choice import (SCORING_MARGIN, Candidate, ScoredSplit, choose_scoring, scoring_candidates,
                                  simplest_within_margin)
from bgad_core.data.features import FeatureSet
from bgad_core.models.bgad.scoring import Normalization


def candidate(rank: int, value: float) -> Candidate:
    evaluation = ScoredSplit({"image_auroc": value}, torch.zeros(1), torch.zeros(1, 1, 1), Normalization((0.0,), (1.0,)))
    return Candidate(rank, (rank, 0, 0), 0, evaluation)


def test_a_more_elaborate_scoring_wins_only_by_more_than_the_margin():
    simple, elaborate = candidate(0, 0.80), candidate(1, 0.80 + SCORING_MARGIN / 2)
    assert simplest_within_margin([elaborate, simple], "image_auroc") is simple
    clearly_better = candidate(1, 0.80 + 2 * SCORING_MARGIN)
    assert simplest_within_margin([simple, clearly_better], "image_auroc") is clearly_better
    undefined = candidate(0, float("nan"))  # NaN counts as the worst, never as a tie
    assert simplest_within_margin([undefined, elaborate], "image_auroc") is elaborate


def test_auto_lets_validation_try_every_candidate_and_a_fixed_value_only_itself():
    assert scoring_candidates("auto", "auto", "auto", "auto") == (("level", "position"), (1.0, 2.0),
                                                                  ("max", "top1pct_mean", "unsmoothed_max"),
                                                                  (0.0, 0.5, 1.0))
    assert scoring_candidates("level", 2, "max", 0.5) == (("level",), (2.0,), ("max",), (0.5,))


def place_dependent_split(n_normal: int = 8, n_abnormal: int = 8) -> tuple[list[torch.Tensor], FeatureSet, list]:
    """One 4 x 4 level whose corner cell is always unlikely in normals (a border, say) and a defect at the centre.

    Per level, the corner outscores every defect; per cell, the corner is ordinary and the defect stands out.
    """
    generator = torch.Generator().manual_seed(0)
    n = n_normal + n_abnormal

    def logps(count: int) -> torch.Tensor:
        values = -1.0 + 0.05 * torch.randn(count, 4, 4, generator=generator)
        values[:, 0, 0] -= 3.0
        return values

    normals = [logps(32)]
    val = logps(n)
    labels = torch.tensor([0] * n_normal + [1] * n_abnormal)
    val[n_normal:, 2, 2] -= 1.0
    masks = torch.zeros(n, 16, 16, dtype=torch.uint8)
    masks[n_normal:, 8:12, 8:12] = 1
    split = FeatureSet(features=[torch.zeros(n, 1, 4, 4)], masks=[torch.zeros(n, 4, 4)], labels=labels,
                       ids=[str(i) for i in range(n)], pixel_masks=masks)
    fits = [Normalization.fit(normals, calibration) for calibration in ("level", "position")]
    return [val], split, fits


def test_a_pixel_objective_chooses_the_map_and_image_auroc_the_reduction():
    logps, split, fits = place_dependent_split()
    chosen = choose_scoring(logps, split, fits, (1.0,), ("max", "top1pct_mean"), (16, 16), 0.0, "aupro")
    assert chosen.normalization.calibration == "position"  # per level, the corner ranks above the defect
    every = [choose_scoring(logps, split, [fit], (1.0,), (reduction,), (16, 16), 0.0, "aupro")
             for fit in fits for reduction in ("max", "top1pct_mean")]
    assert chosen.metrics["aupro"] == max(e.metrics["aupro"] for e in every) > every[0].metrics["aupro"] + 0.1
    same_map = [e for e in every if e.normalization.calibration == "position"]
    best_image = max(e.metrics["image_auroc"] for e in same_map)
    assert chosen.metrics["image_auroc"] >= best_image - SCORING_MARGIN
    # and an objective the split lacks (PRO without masks) falls back to image AUROC
    unmasked = FeatureSet(split.features, split.masks, split.labels, split.ids)
    fallback = choose_scoring(logps, unmasked, fits, (1.0,), ("max",), (16, 16), 0.0, "aupro")
    assert set(fallback.metrics) == {"image_auroc", "image_aupr", "image_f1_max"}
