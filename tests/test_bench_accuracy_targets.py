"""``benchmarks/bench_accuracy.py``'s verdicts on issue 21's inequalities, with paired intervals of the gaps."""

from __future__ import annotations

import torch

from benchmarks import bench_accuracy
from bgad_core.data.features import FeatureSet
from bgad_core.evaluation.metrics import image_auroc


def split_of(images: int) -> FeatureSet:
    """``images`` test rows, half anomalous, without masks (the verdicts read only labels and scores)."""
    labels = torch.arange(images) % 2
    return FeatureSet([torch.zeros(images, 1, 1, 1)], [torch.zeros(images, 1, 1)], labels,
                      [str(i) for i in range(images)])


def arm(split: FeatureSet, scores: torch.Tensor) -> dict:
    """A row as the arms report it, from per-image test scores."""
    return {"test": {"image_auroc": image_auroc(split.labels.numpy(), scores.numpy())},
            "test_outputs": (scores, torch.zeros(len(split), 4, 4))}


def test_a_short_figure_is_told_from_noise_by_its_paired_interval():
    split = split_of(400)
    labels = split.labels.float()
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(len(split), generator=generator)  # both arms err on the same images: a narrow paired interval
    good = labels * 2.0 + shared
    rows = [("PatchCore, no labels", arm(split, good)),
            ("BGAD, no labels", arm(split, labels * 2.0 + shared + 0.3 * torch.randn(len(split), generator=generator))),
            ("BGAD-FAS, n = 1", arm(split, labels * 0.5 + shared))]  # far behind both
    verdicts = {t["against"]: t for t in bench_accuracy.paired_targets(rows, "BGAD-FAS, n = 1", split)}
    assert set(verdicts) == {"PatchCore, no labels", "BGAD, no labels"}  # no PRO: the split has no masks
    against_patchcore = verdicts["PatchCore, no labels"]
    assert against_patchcore["metric"] == "image_auroc" and against_patchcore["bound"] == -0.01
    assert against_patchcore["lo"] <= against_patchcore["gap"] <= against_patchcore["hi"] < -0.01
    assert against_patchcore["verdict"] == "short"

    small = split_of(24)  # the same kind of gap on 24 images, one wrong pair: the interval reaches the bound
    scores = small.labels.float() * 3.0
    worse = scores.clone()
    worse[1] = -1.0  # one anomaly ranked below every normal
    rows = [("PatchCore, no labels", arm(small, scores)), ("BGAD-FAS, n = 1", arm(small, worse))]
    (verdict,) = bench_accuracy.paired_targets(rows, "BGAD-FAS, n = 1", small)
    assert verdict["gap"] < -0.01 and verdict["hi"] >= -0.01 and verdict["verdict"] == "short, within noise"


def test_the_default_policy_stands_for_an_arm_under_compare_scoring_and_missing_arms_are_skipped():
    split = split_of(20)
    scores = split.labels.float()
    default = f"BGAD, no labels, scoring {bench_accuracy.DEFAULT_POLICY} [calibration level]"
    rows = [("BGAD, no labels, scoring auto, likelihoods alone [calibration level]", {"test": {}}),
            (default, arm(split, scores)), ("BGAD-FAS, n = 1", arm(split, scores))]
    (verdict,) = bench_accuracy.paired_targets(rows, "BGAD-FAS, n = 1", split)
    assert verdict["against"] == "BGAD, no labels" and verdict["gap"] == 0.0 and verdict["verdict"] == "met"
    assert bench_accuracy.paired_targets(rows[:1], "BGAD-FAS, n = 1", split) == []
