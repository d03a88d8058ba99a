"""sweeper.tracking.plots renders valid PNGs headlessly and copes with the degenerate inputs a trial can produce."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from bgad_core.errors import DataError
from sweeper.tracking.plots import anomaly_map_overlays, score_histogram, roc_pr_curves, save_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """The file exists, starts with the PNG signature and is big enough to hold a real drawing."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000


def overlay_inputs(count: int = 3, size: int = 32) -> tuple[np.ndarray, ...]:
    """Random images with a square defect in every odd-indexed image and maps that peak on it."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=np.uint8)
    masks[1::2, 8:20, 10:24] = 1
    maps = masks + rng.normal(scale=0.3, size=masks.shape)
    labels = (masks.reshape(count, -1).max(axis=1) > 0).astype(np.int64)
    return images, maps, masks, maps.reshape(count, -1).max(axis=1), labels


@pytest.mark.parametrize("with_masks", [True, False])
def test_anomaly_map_overlays(tmp_path: Path, with_masks: bool) -> None:
    images, maps, masks, scores, labels = overlay_inputs()
    fig = anomaly_map_overlays(images, maps, masks if with_masks else None, scores, labels)
    assert_png(save_figure(fig, tmp_path / "overlays.png"))


def test_anomaly_map_overlays_shares_colour_scale() -> None:
    images, maps, masks, scores, labels = overlay_inputs()
    fig = anomaly_map_overlays(images, maps, masks, scores, labels, vmin=-1.0, vmax=2.0)
    map_images = [ax.images[1] for ax in fig.axes[1:6:2]]
    assert {im.get_clim() for im in map_images} == {(-1.0, 2.0)}


def test_anomaly_map_overlays_rejects_mismatched_shapes() -> None:
    images, maps, masks, scores, labels = overlay_inputs()
    with pytest.raises(DataError, match="maps"):
        anomaly_map_overlays(images, maps[:, :16], None, scores, labels)
    with pytest.raises(DataError, match="masks"):
        anomaly_map_overlays(images, maps, masks[:2], scores, labels)


@pytest.mark.parametrize("abnormal_count", [200, 0])
def test_score_histogram_marks_boundaries(tmp_path: Path, abnormal_count: int) -> None:
    rng = np.random.default_rng(1)
    normal = rng.normal(-1.0, 0.3, size=500)
    abnormal = rng.normal(-3.0, 0.5, size=abnormal_count)
    fig = score_histogram(normal, abnormal, {"b_n": -1.5, "b_a": -2.0}, "log-likelihood / normalizer")
    lines = {line.get_label(): line.get_xdata() for line in fig.axes[0].lines}
    assert set(lines) == {"b_n", "b_a"}
    assert np.allclose(lines["b_n"], -1.5) and np.allclose(lines["b_a"], -2.0)
    assert_png(save_figure(fig, tmp_path / "hist.png"))


def test_score_histogram_ignores_non_finite(tmp_path: Path) -> None:
    fig = score_histogram(np.array([-1.0, -np.inf, np.nan, -1.2]), np.array([]), {"b_n": -1.1, "b_a": -2.0}, "x")
    assert_png(save_figure(fig, tmp_path / "hist.png"))


def test_roc_pr_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    labels = (rng.random(100) < 0.3).astype(np.int64)
    scores = rng.normal(size=100) + 1.5 * labels
    fig = roc_pr_curves(labels, scores, title="pixel")
    roc_ax, pr_ax = fig.axes
    assert roc_ax.get_legend().get_texts()[0].get_text().startswith("AUROC = ")
    assert pr_ax.get_legend().get_texts()[0].get_text().startswith("AP = ")
    assert_png(save_figure(fig, tmp_path / "roc_pr.png"))


@pytest.mark.parametrize("label", [0, 1])
def test_roc_pr_curves_single_class_draws_note(tmp_path: Path, label: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = roc_pr_curves(np.full(10, label), np.linspace(0, 1, 10))
    assert all("single class" in ax.texts[0].get_text() for ax in fig.axes)
    assert_png(save_figure(fig, tmp_path / "roc_pr.png"))


def test_roc_pr_curves_rejects_length_mismatch() -> None:
    with pytest.raises(DataError, match="labels"):
        roc_pr_curves(np.array([0, 1, 1]), np.array([0.1, 0.2]))


def test_save_figure_creates_parent_and_frees_figure(tmp_path: Path) -> None:
    fig = roc_pr_curves(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.3, 0.6]))
    path = save_figure(fig, tmp_path / "nested" / "dir" / "roc.png")
    assert path == tmp_path / "nested" / "dir" / "roc.png"
    assert_png(path)
    assert fig.axes == []
