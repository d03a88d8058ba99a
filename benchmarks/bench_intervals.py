"""Time the bootstrap intervals of ``bgad_core.evaluation.intervals`` on an image-metric case and a pixel-metric case.

Run from the repository root: ``python -m benchmarks.bench_intervals [--images 400 --pixel-images 100 --size 256]``.
Every figure a sweep reports gets an interval (every validation meta-epoch for the image metrics, every test
evaluation for all of them), so the bootstrap must cost little next to the evaluation itself: the target is well
under a second for 1,000 resamples of 400 images' image metrics and a few seconds for the pixel metrics of an
evaluation split. Also prints how far the binned pixel metrics are from the exact ones (the module docstring's
approximation) on the same split.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.bench_accuracy import cpu_flags
from benchmarks.bench_aupro import best_time, make_split
from bgad_core.evaluation.intervals import BINS, PIXEL_METRICS, _PixelTable, metric_intervals
from bgad_core.evaluation.metrics import compute_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="images of the image-metric case (default 400)")
    parser.add_argument("--pixel-images", type=int, default=100, help="images of the pixel-metric case (default 100)")
    parser.add_argument("--size", type=int, default=256, help="side of the pixel case's maps, in pixels (default 256)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the fastest is printed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated splits")
    args = parser.parse_args()
    print(f"machine: {cpu_flags()}")

    rng = np.random.default_rng(args.seed)
    labels = (rng.random(args.images) < 0.25).astype(np.int64)
    scores = rng.normal(size=args.images) + 1.5 * labels
    seconds = best_time(lambda: metric_intervals(labels, scores, resamples=args.resamples), args.repeats)
    bounds = metric_intervals(labels, scores, resamples=args.resamples)
    print(f"image metrics, {args.images} images ({labels.sum()} anomalous), {args.resamples} resamples: "
          f"{seconds:.3f} s; image AUROC {compute_metrics(labels, scores)['image_auroc']:.3f} "
          f"[{bounds['image_auroc'][0]:.3f}, {bounds['image_auroc'][1]:.3f}]")

    labels, scores, masks, maps = make_split(args.pixel_images, args.size, args.seed)
    exact_seconds = best_time(lambda: compute_metrics(labels, scores, masks, maps), args.repeats)
    seconds = best_time(lambda: metric_intervals(labels, scores, masks, maps, resamples=args.resamples),
                        args.repeats)
    print(f"pixel + image metrics, {args.pixel_images} maps of {args.size}x{args.size}, {args.resamples} resamples: "
          f"{seconds:.3f} s (compute_metrics' exact point estimates alone: {exact_seconds:.3f} s)")
    exact = compute_metrics(labels, scores, masks, maps)
    binned = _PixelTable.of(masks.astype(bool), maps, BINS).metrics(np.ones((1, labels.size)), fpr_limit=0.3)
    deviation = ", ".join(f"{key} {abs(value[0] - exact[key]):.1e}" for key, value in zip(PIXEL_METRICS, binned))
    print(f"binning ({BINS} thresholds per class) at unit weights, |binned - exact|: {deviation}")


if __name__ == "__main__":
    main()
