"""bgad_core.evaluation.intervals: stratified bootstrap intervals, checked against exact metrics and a naive resampling loop."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

import bgad_core.evaluation.intervals as intervals_module
from benchmarks.bench_aupro import make_split
from bgad_core.errors import ConfigError, DataError
from bgad_core.evaluation.intervals import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    _ImageTable,
    _PixelTable,
    _weights,
    bootstrap_distribution,
    compare_paired,
    interval_metrics,
    metric_intervals,
    percentile_interval,
)
from bgad_core.evaluation.metrics import PRO_AND_IMAGE_AUROC, compute_metrics


def image_split(normals: int, anomalies: int, seed: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of one fixed distribution (normal scores N(0, 1), anomalous N(1.2, 1)); rounding ties them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], [normals, anomalies])
    scores = rng.normal(size=labels.size) + 1.2 * labels
    return labels, scores if decimals is None else np.round(scores, decimals)


def width(bounds: tuple[float, float]) -> float:
    return bounds[1] - bounds[0]


def test_module_example_runs() -> None:
    assert doctest.testmod(intervals_module).failed == 0


def test_intervals_contain_the_point_estimates() -> None:
    labels, scores, masks, maps = make_split(40, 64, seed=3)
    point = compute_metrics(labels, scores, masks, maps)
    bounds = metric_intervals(labels, scores, masks, maps)
    assert set(bounds) == set(IMAGE_METRICS) | set(PIXEL_METRICS) | {PRO_AND_IMAGE_AUROC}
    for key, (lo, hi) in bounds.items():
        assert lo <= point[key] <= hi and lo < hi, key


def test_image_intervals_shrink_as_images_are_added() -> None:
    """Nested splits of one draw, 4x the images each: about half the width each time (1 / sqrt(n))."""
    rng = np.random.default_rng(0)
    normal, anomalous = rng.normal(size=480), rng.normal(size=240) + 1.2
    widths = []
    for count in (30, 120, 480):
        labels = np.repeat([0, 1], [count, count // 2])
        bounds = metric_intervals(labels, np.concatenate([normal[:count], anomalous[: count // 2]]))
        widths.append([width(bounds[key]) for key in IMAGE_METRICS])
    for key, (few, more, most) in zip(IMAGE_METRICS, zip(*widths)):
        assert few > more > most and most < 0.6 * few, key


def test_pixel_intervals_shrink_as_images_are_added() -> None:
    small = metric_intervals(*make_split(20, 48, seed=1))
    large = metric_intervals(*make_split(160, 48, seed=1))
    for key in PIXEL_METRICS:
        assert width(large[key]) < width(small[key]), key


def test_a_seeded_bootstrap_is_reproducible() -> None:
    labels, scores, masks, maps = make_split(24, 48, seed=2)
    first = metric_intervals(labels, scores, masks, maps, seed=7)
    assert metric_intervals(labels, scores, masks, maps, seed=7) == first
    first_values = bootstrap_distribution(labels, scores, masks, maps, seed=7)
    other_values = bootstrap_distribution(labels, scores, masks, maps, seed=8)
    assert all(not np.array_equal(first_values[key], other_values[key]) for key in first)
    assert metric_intervals(labels, scores, masks, maps, seed=8) != first
    # the resamples depend on labels and seed only: the image intervals do not change when masks are added
    image_only = metric_intervals(labels, scores, seed=7)
    assert all(image_only[key] == first[key] for key in IMAGE_METRICS)


def test_vectorised_image_metrics_equal_a_naive_loop_over_the_same_resamples() -> None:
    labels, scores = image_split(12, 7, seed=4, decimals=1)  # ties within and across the classes
    rng = np.random.default_rng(0)
    normals, anomalies = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    drawn = [rng.choice(normals, size=(25, normals.size)), rng.choice(anomalies, size=(25, anomalies.size))]
    vectorised = _ImageTable.of(labels.astype(bool), scores).metrics(_weights(drawn, np.zeros(labels.size)))
    for row in range(25):
        chosen = np.concatenate([drawn[0][row], drawn[1][row]])
        naive = compute_metrics(labels[chosen], scores[chosen])
        for key, values in zip(IMAGE_METRICS, vectorised):
            assert values[row] == pytest.approx(naive[key], abs=1e-12), (row, key)


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binned_pixel_metrics_at_unit_weights_match_the_exact_ones(decimals: int | None, dtype: type) -> None:
    labels, _, masks, maps = make_split(30, 64, seed=5)
    maps = (maps if decimals is None else np.round(maps, decimals)).astype(dtype)
    exact = compute_metrics(labels, maps.max(axis=(1, 2)), masks, maps)
    table = _PixelTable.of(masks.astype(bool), maps, intervals_module.BINS)
    binned = table.metrics(np.ones((1, labels.size)), fpr_limit=0.3)
    for key, values in zip(PIXEL_METRICS, binned):
        assert values[0] == pytest.approx(exact[key], abs=2e-3), key


def test_binned_pixel_metrics_of_a_resample_match_the_exact_ones_on_it() -> None:
    """Weights are multiplicities: the binned metrics of weights w equal the exact metrics of the repeated images."""
    labels, _, masks, maps = make_split(20, 48, seed=6)
    counts = np.random.default_rng(1).integers(0, 3, size=labels.size)
    counts[np.flatnonzero(labels)[0]] += 1  # keep at least one defect
    repeated = np.repeat(np.arange(labels.size), counts)
    exact = compute_metrics(labels[repeated], maps[repeated].max(axis=(1, 2)), masks[repeated], maps[repeated])
    binned = _PixelTable.of(masks.astype(bool), maps, intervals_module.BINS).metrics(counts[None].astype(float), 0.3)
    for key, values in zip(PIXEL_METRICS, binned):
        assert values[0] == pytest.approx(exact[key], abs=2e-3), key


def test_a_class_of_one_image_stays_in_every_resample() -> None:
    labels, scores = image_split(20, 1, seed=0)
    distribution = bootstrap_distribution(labels, scores, resamples=200)
    assert all(values.shape == (200,) and np.isfinite(values).all() for values in distribution.values())
    lo, hi = percentile_interval(distribution["image_auroc"])
    assert lo < hi  # the normals still vary


def test_undefined_metrics_get_nan_intervals() -> None:
    labels = np.zeros(10, dtype=int)
    bounds = metric_intervals(labels, np.arange(10.0), resamples=50)
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in bounds.values())


def test_flat_names_and_bad_arguments() -> None:
    assert interval_metrics({"aupro": (0.5, 0.7)}) == {"aupro_lo": 0.5, "aupro_hi": 0.7}
    labels, scores = image_split(5, 5, seed=0)
    with pytest.raises(ConfigError, match="resamples"):
        metric_intervals(labels, scores, resamples=0)
    with pytest.raises(ConfigError, match="confidence"):
        percentile_interval(np.ones(3), confidence=1.0)
    with pytest.raises(DataError, match="maps is missing"):
        metric_intervals(labels, scores, masks=np.zeros((10, 4, 4)))


def paired(labels: np.ndarray, a: np.ndarray, b: np.ndarray):
    """compare_paired of two detectors' image AUROC on the same images."""
    first = bootstrap_distribution(labels, a)["image_auroc"]
    second = bootstrap_distribution(labels, b)["image_auroc"]
    gap = compute_metrics(labels, a)["image_auroc"] - compute_metrics(labels, b)["image_auroc"]
    return compare_paired(first, second, gap, labels.size), first, second


def test_a_clearly_better_detector_is_told_apart_and_an_identical_one_is_not() -> None:
    labels, scores = image_split(60, 30, seed=4)
    better, _, _ = paired(labels, scores + 1.5 * labels, scores)
    assert better.verdict == "better" and better.lo > 0 and better.images_to_separate is None
    worse, _, _ = paired(labels, scores, scores + 1.5 * labels)
    assert worse.verdict == "worse" and worse.hi < 0
    same, _, _ = paired(labels, scores, scores.copy())
    assert same.verdict == "undecided" and same.gap == same.lo == same.hi == 0 and same.images_to_separate is None


def test_pairing_narrows_the_interval_and_a_small_gap_asks_for_more_images() -> None:
    """Two detectors that err on the same images: the paired interval of the difference is much narrower than the
    two separate intervals suggest, and a gap inside it needs more images than the split has to be resolved."""
    labels, scores = image_split(30, 15, seed=5)
    nudged = scores + 0.05 * labels + np.random.default_rng(6).normal(0, 0.1, labels.size)
    result, first, second = paired(labels, nudged, scores)
    unpaired = width(percentile_interval(first)) + width(percentile_interval(second))
    assert result.hi - result.lo < unpaired / 2
    assert result.verdict == "undecided" and result.images_to_separate > labels.size, result
