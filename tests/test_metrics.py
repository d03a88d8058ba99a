"""bgad_core.evaluation.metrics against scikit-learn, brute force and a literal AUPRO implementation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks.aupro_reference import aupro_reference
from bgad_core.errors import ConfigError, DataError
from bgad_core.evaluation.metrics import (
    PRO_AND_IMAGE_AUROC,
    aupro,
    compute_metrics,
    f1_max,
    image_aupr,
    image_auroc,
    pixel_aupr,
    pixel_auroc,
    pixel_f1_max,
)

PIXEL_KEYS = {"pixel_auroc", "pixel_aupr", "pixel_f1_max", "aupro"}
IMAGE_KEYS = {"image_auroc", "image_aupr", "image_f1_max"}


def random_scores(seed: int, size: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores that separate the classes imperfectly; rounding creates tied scores."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(size) < 0.3).astype(np.int64)
    scores = rng.normal(size=size) + 1.2 * labels
    return labels, scores if decimals is None else np.round(scores, decimals)


def blob_masks(
    seed: int, count: int, size: int, decimals: int | None, dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Masks with several irregular defects per image (some images defect-free) and noisy maps."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(count, size, size)), sigma=(0, 2, 2))
    masks = (noise > 0.25).astype(np.uint8)
    masks[rng.random(count) < 0.3] = 0
    maps = masks * rng.uniform(0.2, 1.5, size=(count, 1, 1)) + rng.normal(scale=0.5, size=masks.shape)
    return masks, (maps if decimals is None else np.round(maps, decimals)).astype(dtype)


def brute_force_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 found by thresholding at every distinct score, highest threshold first."""
    best, best_threshold = -1.0, math.nan
    for threshold in np.unique(scores)[::-1]:
        flagged = scores >= threshold
        true_pos = np.sum(flagged & (labels == 1))
        f1 = 2 * true_pos / (np.sum(flagged) + np.sum(labels == 1))
        if f1 > best:
            best, best_threshold = f1, threshold
    return float(best), float(best_threshold)


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(seed: int, decimals: int | None) -> None:
    labels, scores = random_scores(seed, 300, decimals)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_aupr(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("decimals", [None, 2])
def test_pixel_metrics_match_sklearn(decimals: int | None, dtype: type) -> None:
    masks, maps = blob_masks(3, 10, 48, decimals, dtype)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    expected_ap = average_precision_score(masks.ravel(), maps.ravel())
    assert pixel_aupr(masks, maps) == pytest.approx(expected_ap, abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 5])
def test_f1_max_matches_brute_force(seed: int, decimals: int | None) -> None:
    labels, scores = random_scores(seed, 200, decimals)
    f1, threshold = f1_max(labels, scores)
    expected_f1, expected_threshold = brute_force_f1(labels, scores)
    assert f1 == pytest.approx(expected_f1, abs=1e-12)
    assert threshold == expected_threshold


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pixel_f1_max_matches_brute_force(dtype: type) -> None:
    masks, maps = blob_masks(4, 4, 24, 1, dtype)
    assert pixel_f1_max(masks, maps) == pytest.approx(brute_force_f1(masks.ravel(), maps.ravel()), abs=1e-12)


@pytest.mark.parametrize(
    ("seed", "decimals", "fpr_limit"),
    [(0, None, 0.3), (1, None, 0.3), (2, 1, 0.3), (3, 0, 0.3), (4, 2, 0.05), (5, None, 1.0), (6, 1, 0.3)],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_aupro_matches_reference(seed: int, decimals: int | None, fpr_limit: float, dtype: type) -> None:
    masks, maps = blob_masks(seed, 8, 24, decimals, dtype)
    region_count = sum(ndimage.label(mask, structure=np.ones((3, 3)))[1] for mask in masks)
    assert region_count > masks.any(axis=(1, 2)).sum()  # several regions in some image
    assert not masks.any(axis=(1, 2)).all()  # and defect-free images
    expected = aupro_reference(masks, maps, fpr_limit=fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_float32_ranking_handles_signs_zeros_and_ties() -> None:
    # float32 scores take the packed-integer sort; its key must order negatives, -0.0 == +0.0,
    # subnormals and extremes exactly as the floats compare.
    special = np.array([-1e30, -1.5, -1e-45, -0.0, 0.0, 1e-45, 2.5, 1e30], dtype=np.float32)
    rng = np.random.default_rng(12)
    scores = rng.choice(special, size=400)
    labels = (rng.random(400) < 0.5 + 0.05 * np.sign(scores)).astype(np.int64)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_aupr(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_max(labels, scores) == brute_force_f1(labels, scores)
    assert f1_max(labels, scores)[0] == f1_max(labels, scores.astype(np.float64))[0]


def test_aupro_uses_8_connected_regions_per_image() -> None:
    # Image 0: one 3-pixel region (a diagonal contact joins the single pixel to the pair) of which only
    # that pixel scores above the normals. Image 1: one pixel at the same place, scored below them.
    # PRO is mean(1/3, 0) = 1/6 from FPR 0 to 1. 4-connectivity would give mean(1, 0, 0) = 1/3, and
    # regions merged across the stacked images would give 1/4.
    masks = np.zeros((2, 5, 5), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 2, 3] = masks[1, 1, 1] = 1
    maps = np.full((2, 5, 5), 0.5)
    maps[0, 1, 1], maps[0, 2, 2], maps[0, 2, 3], maps[1, 1, 1] = 1.0, 0.0, 0.0, 0.0
    assert aupro(masks, maps) == pytest.approx(1 / 6)
    assert aupro_reference(masks, maps) == pytest.approx(1 / 6)


def test_perfect_and_inverted_maps() -> None:
    masks, _ = blob_masks(7, 6, 32, None)
    perfect = masks + np.random.default_rng(0).uniform(0, 0.5, size=masks.shape)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, -perfect) == pytest.approx(0.0, abs=1e-12)
    constant = np.zeros(masks.shape)
    assert aupro(masks, constant) == pytest.approx(0.15)  # one threshold: the chance diagonal to (1, 1)


def test_accepts_torch_tensors() -> None:
    masks, maps = blob_masks(8, 4, 16, None)
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    scores = maps.max(axis=(1, 2))
    from_numpy = compute_metrics(labels, scores, masks, maps)
    from_torch = compute_metrics(
        torch.from_numpy(labels), torch.from_numpy(scores), torch.from_numpy(masks), torch.from_numpy(maps)
    )
    assert from_torch == pytest.approx(from_numpy)
    half = torch.from_numpy(maps).half()
    assert aupro(torch.from_numpy(masks), half) == aupro(masks, half.float().numpy())
    assert aupro(masks[1], maps[1]) == aupro(masks[1:2], maps[1:2])  # a single [H, W] image


def test_compute_metrics_matches_individual_functions() -> None:
    masks, maps = blob_masks(9, 10, 32, 1)
    masks[0] = 1  # an image-level defect covering the whole image
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    scores = maps.mean(axis=(1, 2))
    assert compute_metrics(labels, scores) == {
        "image_auroc": image_auroc(labels, scores),
        "image_aupr": image_aupr(labels, scores),
        "image_f1_max": f1_max(labels, scores)[0],
    }
    metrics = compute_metrics(labels, scores, masks, maps, fpr_limit=0.2)
    assert metrics.keys() == IMAGE_KEYS | PIXEL_KEYS | {PRO_AND_IMAGE_AUROC}
    assert metrics["pixel_auroc"] == pixel_auroc(masks, maps)
    assert metrics["pixel_aupr"] == pixel_aupr(masks, maps)
    assert metrics["pixel_f1_max"] == pixel_f1_max(masks, maps)[0]
    assert metrics["aupro"] == aupro(masks, maps, fpr_limit=0.2)
    assert metrics[PRO_AND_IMAGE_AUROC] == (metrics["aupro"] + metrics["image_auroc"]) / 2


def test_single_class_gives_nan_with_warning() -> None:
    labels, scores = np.zeros(5, dtype=int), np.arange(5.0)
    masks, maps = np.zeros((5, 8, 8), dtype=np.uint8), np.random.default_rng(0).random((5, 8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = compute_metrics(labels, scores, masks, maps)
    assert {str(w.message).split()[0] for w in caught} == IMAGE_KEYS | PIXEL_KEYS
    assert all(issubclass(w.category, UndefinedMetricWarning) for w in caught)
    assert metrics.keys() == IMAGE_KEYS | PIXEL_KEYS | {PRO_AND_IMAGE_AUROC}
    assert all(math.isnan(value) for value in metrics.values())
    with pytest.warns(UndefinedMetricWarning, match="image_auroc"):
        assert math.isnan(image_auroc(np.ones(5, dtype=int), scores))
    with pytest.warns(UndefinedMetricWarning, match="no normal pixel"):
        assert math.isnan(aupro(np.ones((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4))))
    with pytest.warns(UndefinedMetricWarning, match="no defect region"):
        assert math.isnan(aupro(masks, maps))


def test_all_anomalous_split_keeps_defined_metrics() -> None:
    labels, scores = np.ones(4, dtype=int), np.arange(4.0)
    masks, maps = blob_masks(10, 4, 16, None)
    masks[:, 0, 0] = 1  # every image defective
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = compute_metrics(labels, scores, masks, maps)
    assert [str(w.message).split()[0] for w in caught] == ["image_auroc"]
    assert math.isnan(metrics["image_auroc"])
    assert metrics["image_aupr"] == 1.0 and metrics["image_f1_max"] == 1.0
    assert not any(math.isnan(metrics[key]) for key in PIXEL_KEYS)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: aupro(np.zeros((2, 8, 8)), np.zeros((2, 8, 9))), "maps"),
        (lambda: pixel_auroc(np.zeros((2, 8, 8)), np.zeros((8, 8))), "maps"),
        (lambda: image_auroc([0, 1, 1], [0.1, 0.2]), "scores"),
        (lambda: image_auroc([[0, 1]], [[0.1, 0.2]]), "labels"),
        (lambda: pixel_aupr(np.full((2, 4, 4), 255), np.zeros((2, 4, 4))), "masks"),
        (lambda: aupro(np.zeros((2, 4, 4)), np.full((2, 4, 4), np.nan)), "maps"),
        (lambda: compute_metrics([0, 1], [0.0, 1.0], masks=np.zeros((2, 4, 4))), "maps"),
        (lambda: compute_metrics([0, 1], [0.0, 1.0], np.zeros((3, 4, 4)), np.zeros((3, 4, 4))), "masks"),
        (lambda: f1_max([], []), "labels"),
    ],
)
def test_bad_input_raises_data_error_naming_argument(call, name: str) -> None:
    with pytest.raises(DataError, match=name):
        call()


def test_bad_fpr_limit_raises_config_error() -> None:
    masks, maps = blob_masks(11, 2, 8, None)
    for limit in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="fpr_limit"):
            aupro(masks, maps, fpr_limit=limit)
