"""Time AUPRO and compute_metrics on an evaluation-sized split against the naive baselines.

Run from the repository root: ``python -m benchmarks.bench_aupro [--images 100 --size 256]``.
Evaluation runs after every meta-epoch of every trial in a sweep, so its cost multiplies; this shows
what the single shared sort in ``bgad_core.evaluation.metrics`` saves over a loop over thresholds and over
scikit-learn's per-metric sorts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks.aupro_reference import aupro_reference
from bgad_core.evaluation.metrics import aupro, compute_metrics

REFERENCE_THRESHOLDS = 200


def make_split(images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, image scores, masks and float32 maps: 1-3 elliptic defects in 70 % of the images."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((images, size, size), dtype=np.uint8)
    for image in np.flatnonzero(rng.random(images) < 0.7):
        mask = masks[image]  # a view: writing to it fills ``masks``
        for _ in range(rng.integers(1, 4)):
            centre_r, centre_c = rng.uniform(0, size, 2)
            radius_r, radius_c = rng.uniform(size / 40, size / 8, 2)
            mask[((rows - centre_r) / radius_r) ** 2 + ((cols - centre_c) / radius_c) ** 2 <= 1] = 1
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 3, 3)) * 4
    signal = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 4, 4))
    maps = (noise + signal * rng.uniform(0.5, 2.0, size=(images, 1, 1))).astype(np.float32)
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    return labels, maps.max(axis=(1, 2)), masks, maps


def best_time(function: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` wall-clock runs, in seconds (the least disturbed by other processes)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    labels, scores, masks, maps = make_split(args.images, args.size, args.seed)
    shape = f"{args.images}x{args.size}x{args.size}"
    value = aupro(masks, maps)
    aupro_s = best_time(lambda: aupro(masks, maps), args.repeats)
    start = time.perf_counter()
    reference_value = aupro_reference(masks, maps, num_thresholds=REFERENCE_THRESHOLDS)
    reference_s = time.perf_counter() - start
    print(
        f"aupro {shape}: {aupro_s:.2f} s (reference {REFERENCE_THRESHOLDS} thresholds: {reference_s:.1f} s, "
        f"{reference_s / aupro_s:.0f}x); value {value:.4f}, reference {reference_value:.4f}"
    )

    metrics_s = best_time(lambda: compute_metrics(labels, scores, masks, maps), args.repeats)
    pixels, flat_maps = masks.ravel(), maps.ravel()
    start = time.perf_counter()
    roc_auc_score(pixels, flat_maps)
    average_precision_score(pixels, flat_maps)
    sklearn_s = time.perf_counter() - start
    print(
        f"compute_metrics {shape}: {metrics_s:.2f} s (7 metrics; scikit-learn pixel AUROC + AP alone: "
        f"{sklearn_s:.1f} s)"
    )
    for key, metric in compute_metrics(labels, scores, masks, maps).items():
        print(f"  {key}: {metric:.4f}")


if __name__ == "__main__":
    main()
