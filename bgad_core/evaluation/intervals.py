"""95 % intervals for the metrics of ``bgad_core.evaluation.metrics``, from a stratified bootstrap over images.

Why. Models are chosen on validation splits of a few dozen images and judged on one test figure; at 45 images an
AUROC's standard error is about 0.05, so a point estimate to four decimals overstates what the split can tell.
Every figure a sweep reports therefore carries a percentile interval: the images of the split are resampled
with replacement, normals and anomalies separately so that each resample keeps both counts (stratified: a
resample without anomalies has no AUROC, and the class balance is a property of the split, not noise), every
metric is computed on each resample, and the interval is the central ``confidence`` share of those values.

How, and why it is fast. ``scipy.stats.bootstrap`` draws the resamples (``paired=False`` resamples each sample
independently, which is exactly the stratification; ``method="percentile"``; seeded). The samples handed to it
are image *indices*, so the vectorised statistic receives a batch of resamples as an index matrix and turns it
into a weight matrix W (resamples x images, how often each image was drawn). A resample then never re-sorts:

- image metrics sort the scores once; a resample's true/false positive counts at every distinct score are
  cumulative sums of W's columns in that order (the Mann-Whitney AUROC with multiplicities, average precision and
  F1-max all follow from them, as in ``metrics._Curves``). 1,000 resamples of 400 images take well under 0.1 s;
- pixel metrics (pixel AUROC and PRO) reuse per-image statistics computed once: for every image, histograms of its
  normal and defect pixels over fixed global thresholds, and for every defect region the share of its pixels at or
  above each threshold. A resample's ROC and PRO curves are then W times those tables (a matrix product), not a
  sort of millions of pixels: 1,000 resamples of 100 maps of 256 x 256 take about as long as ``compute_metrics``'
  one exact evaluation (``python -m benchmarks.bench_intervals``).

The binning approximation (pixel metrics only). The thresholds are quantiles of the normal and of the defect map
values (``bins`` of each, taken from a strided subsample of at most ``QUANTILE_SAMPLE`` values per class), and
they are map values themselves, so the binned ROC and PRO curves are exactly the exact curves evaluated at a
subset of their thresholds, joined by straight lines. Between two neighbouring thresholds at most about 1/``bins``
of the defect pixels and 1/``bins`` of the normal pixels change side, so the area lost or gained is at most about
1/(2 ``bins``) for pixel AUROC and 1/(2 ``bins`` x fpr_limit) for PRO (1024 bins: 5e-4 and 1.6e-3); in practice
it is far smaller (``tests/test_intervals.py`` checks unit weights against ``bgad_core.evaluation.metrics``). Image metrics
are exact on every resample.

Conventions. A metric undefined on the whole split (one class only, no defect region) gets (NaN, NaN); resamples
where a metric is undefined (e.g. PRO when the drawn anomalous images have no mask region) are left out of its
percentiles. A class with a single image cannot vary and is kept fixed in every resample (scipy's bootstrap needs
two observations per sample). Intervals are percentile intervals, not BCa: BCa's jackknife would recompute every
metric once per image, and its correction is small next to the width these splits have. F1-max is a maximum over
thresholds and so biased upwards on a resample; its interval can lean above the point estimate.

>>> import numpy as np
>>> from bgad_core.evaluation.metrics import image_auroc
>>> rng = np.random.default_rng(0)
>>> labels = np.repeat([0, 1], [30, 15])  # a validation split of 45 images
>>> scores = rng.normal(size=45) + labels
>>> round(image_auroc(labels, scores), 3)
0.867
>>> lo, hi = metric_intervals(labels, scores, resamples=1000, seed=0)["image_auroc"]
>>> round(lo, 2), round(hi, 2)
(0.74, 0.96)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, stats
from threadpoolctl import threadpool_limits

from bgad_core.errors import ConfigError, DataError
from bgad_core.evaluation.metrics import (_REGION_STRUCTURE, _check_fpr_limit, _image_inputs, _pixel_inputs,
                                         with_pro_and_image_auroc)

__all__ = [
    "BOOTSTRAP_SEED",
    "CONFIDENCE",
    "RESAMPLES",
    "PairedComparison",
    "bootstrap_distribution",
    "compare_paired",
    "interval_metrics",
    "metric_intervals",
    "percentile_interval",
]

RESAMPLES = 1000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
BINS = 1024  # thresholds per class for the pixel metrics (see the module docstring for the error bound)
QUANTILE_SAMPLE = 1 << 18  # map values per class the thresholds are taken from
BATCH = 250  # resamples per statistic call: bounds the (resamples x thresholds) tables of the pixel metrics
IMAGE_METRICS = ("image_auroc", "image_aupr", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "aupro")


# ----------------------------------------------------------------------------------------------------
# Per-split tables, computed once
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageTable:
    """The image scores' descending order and its ties: all a resample's image curves need besides its weights."""

    order: np.ndarray  # image indices, highest score first
    anomalous: np.ndarray  # label of each image in that order, as float
    tie_ends: np.ndarray  # position in ``order`` of the last image of each run of equal scores

    @classmethod
    def of(cls, labels: np.ndarray, scores: np.ndarray) -> _ImageTable:
        order = np.argsort(-scores, kind="stable")
        ranked = scores[order]
        tie_ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
        return cls(order, labels[order].astype(np.float64), tie_ends)

    def metrics(self, weights: np.ndarray) -> list[np.ndarray]:
        """Image AUROC, average precision and F1-max of each row of ``weights`` (resamples x images)."""
        ranked = weights[:, self.order]
        true_pos = np.cumsum(ranked * self.anomalous, axis=1)[:, self.tie_ends]
        false_pos = np.cumsum(ranked, axis=1)[:, self.tie_ends] - true_pos
        positives, negatives = true_pos[:, -1:], false_pos[:, -1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            # trapezoids between consecutive ROC points; the curve starts at (0, 0)
            previous_tp = np.pad(true_pos[:, :-1], ((0, 0), (1, 0)))
            steps = np.diff(false_pos, axis=1, prepend=0.0) * (true_pos + previous_tp)
            auroc = steps.sum(axis=1) / (2 * positives[:, 0] * negatives[:, 0])
            flagged = true_pos + false_pos
            precision = np.divide(true_pos, flagged, out=np.zeros_like(true_pos), where=flagged > 0)
            aupr = (np.diff(true_pos, axis=1, prepend=0.0) * precision).sum(axis=1) / positives[:, 0]
            f1 = (2 * true_pos / (flagged + positives)).max(axis=1)
        return [auroc, aupr, np.where(positives[:, 0] > 0, f1, np.nan)]


@dataclass(frozen=True)
class _PixelTable:
    """Per-image pixel counts and per-region overlaps at fixed thresholds (descending), computed once per split.

    Every table has one column per threshold, highest first, between a column for an infinite threshold (nothing
    at or above it: the curves' (0, 0)) and one below every value (all pixels: their (1, 1)). A resample's curves
    are weighted sums of rows.
    """

    normal_above: np.ndarray  # images x columns: normal pixels of each image at or above each threshold
    defect_above: np.ndarray  # images x columns: defect pixels likewise
    overlap: np.ndarray  # regions x columns: share of each defect region's pixels at or above each threshold
    region_image: np.ndarray  # image index of each defect region

    @classmethod
    def of(cls, truth: np.ndarray, maps: np.ndarray, bins: int) -> _PixelTable:
        thresholds = _thresholds(maps[truth], maps[~truth], bins)  # ascending
        slots = thresholds.size + 1  # slot s: values in [thresholds[s-1], thresholds[s]), slot 0 below them all
        regions, count = ndimage.label(truth, structure=_REGION_STRUCTURE)
        normal = np.empty((truth.shape[0], slots))
        defect = np.empty((truth.shape[0], slots))
        region_counts = np.zeros((count + 1, slots))
        region_image = np.empty(count, dtype=np.int64)
        for image, (mask, values, labelled) in enumerate(zip(truth, maps, regions)):
            slot = np.searchsorted(thresholds, values.ravel(), side="right")
            inside = mask.ravel()
            defect[image] = np.bincount(slot[inside], minlength=slots)
            normal[image] = np.bincount(slot[~inside], minlength=slots)
            region = labelled.ravel()[inside]
            if region.size:
                first, last = int(region.min()), int(region.max())  # ndimage numbers each image's regions in a row
                region_image[first - 1 : last] = image
                block = np.bincount((region - first) * slots + slot[inside], minlength=(last - first + 1) * slots)
                region_counts[first : last + 1] = block.reshape(-1, slots)
        region_counts = region_counts[1:]
        with np.errstate(invalid="ignore"):
            overlap = _above(region_counts) / region_counts.sum(axis=1, keepdims=True)
        return cls(_above(normal), _above(defect), overlap, region_image)

    def metrics(self, weights: np.ndarray, fpr_limit: float) -> list[np.ndarray]:
        """Pixel AUROC and normalised PRO area up to ``fpr_limit`` of each row of ``weights``."""
        normal = weights @ self.normal_above
        defect = weights @ self.defect_above
        negatives, positives = normal[:, -1], defect[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            # trapezoids on the counts, normalised once
            steps = np.diff(normal, axis=1) * (defect[:, 1:] + defect[:, :-1])
            auroc = steps.sum(axis=1) / (2 * negatives * positives)
            if self.overlap.shape[0] == 0:
                return [auroc, np.full(weights.shape[0], np.nan)]
            fpr = normal / negatives[:, None]
            # PRO needs the columns up to the first one past fpr_limit in every resample (FPR rises along a row)
            reached = np.flatnonzero((fpr < fpr_limit).any(axis=0))
            end = min(int(reached[-1]) + 2, fpr.shape[1]) if reached.size else fpr.shape[1]
            region_weights = weights[:, self.region_image]
            pro = region_weights @ self.overlap[:, :end] / region_weights.sum(axis=1, keepdims=True)
            return [auroc, _area_up_to(fpr[:, :end], pro, fpr_limit) / fpr_limit]


def _thresholds(defect: np.ndarray, normal: np.ndarray, bins: int) -> np.ndarray:
    """Ascending distinct map values: ``bins`` quantiles of each class (from a strided subsample of each)."""
    levels = np.linspace(0.0, 1.0, bins + 1)[1:]
    picked = [np.quantile(v[:: max(1, v.size // QUANTILE_SAMPLE)], levels, method="inverted_cdf")
              for v in (defect, normal) if v.size]
    return np.unique(np.concatenate(picked))


def _above(counts: np.ndarray) -> np.ndarray:
    """Counts per slot (ascending) -> counts at or above an infinite threshold (none), each threshold from the
    highest down, and below them all (the total)."""
    return np.pad(np.cumsum(counts[:, ::-1], axis=1), ((0, 0), (1, 0)))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> np.ndarray:
    """Row-wise trapezoidal area under non-decreasing (x, y) for x in [0, x_max], y interpolated at x_max.

    The vectorised form of ``metrics._area_up_to``: each segment is clipped to [0, x_max].
    """
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    end = np.minimum(x1, x_max)
    width = np.clip(end - x0, 0.0, None)
    span = x1 - x0
    fraction = np.divide(end - x0, span, out=np.zeros_like(span), where=span > 0)
    return (width * (2 * y0 + fraction * (y1 - y0))).sum(axis=1) / 2


# ----------------------------------------------------------------------------------------------------
# The bootstrap
# ----------------------------------------------------------------------------------------------------


def bootstrap_distribution(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    fpr_limit: float = 0.3,
    bins: int = BINS,
) -> dict[str, np.ndarray]:
    """Each metric on ``resamples`` stratified resamples of the images: {metric: values, one per resample}.

    Keys: image_auroc, image_aupr, image_f1_max, plus pixel_auroc, aupro and ``PRO_AND_IMAGE_AUROC`` (each
    resample's mean of aupro and image_auroc) when ``masks`` (with ``maps``) are given. The resamples depend only
    on the labels, ``resamples`` and ``seed``, so the image metrics' values are the same with or without masks.
    Distributions of several splits resampled independently (categories of one trial) can be averaged element-wise
    before ``percentile_interval``: that is the bootstrap of their mean.
    """
    if resamples < 1:
        raise ConfigError(f"resamples must be >= 1, got {resamples}")
    if bins < 1:
        raise ConfigError(f"bins must be >= 1, got {bins}")
    if (masks is None) != (maps is None):
        raise DataError(f"{'maps' if maps is None else 'masks'} is missing: pixel intervals need both masks and maps")
    truth, values = _image_inputs(labels, scores)
    keys = list(IMAGE_METRICS)
    image = _ImageTable.of(truth, values)
    pixel = None
    if masks is not None:
        limit = _check_fpr_limit(fpr_limit)
        pixel_truth, pixel_values = _pixel_inputs(masks, maps)
        if pixel_truth.shape[0] != truth.size:
            raise DataError(f"masks hold {pixel_truth.shape[0]} images but labels hold {truth.size}")
        pixel = _PixelTable.of(pixel_truth, pixel_values, bins)
        keys += PIXEL_METRICS
    classes = (np.flatnonzero(~truth), np.flatnonzero(truth))
    varying = [idx for idx in classes if idx.size >= 2]
    fixed = np.zeros(truth.size)  # a class of one image is in every resample once
    for idx in classes:
        if idx.size == 1:
            fixed[idx] = 1.0

    def statistic(*drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        weights = _weights(drawn, fixed)
        out = image.metrics(weights)
        if pixel is not None:
            out += pixel.metrics(weights, limit)
        return np.stack(out)

    if not varying:  # one image per class at most: every resample is the split itself
        distribution = np.repeat(statistic(), resamples, axis=1)
    else:
        # NaN resamples are handled in ``percentile_interval``. The products are small (resamples x images times
        # images x thresholds): threaded BLAS only adds contention, 2-5x slower on a busy 2-core machine, and a
        # trial's BLAS usually sees more cores than the trial holds.
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            result = stats.bootstrap(varying, statistic, n_resamples=resamples, batch=BATCH, vectorized=True,
                                     paired=False, method="percentile", rng=np.random.default_rng(seed))
        distribution = np.asarray(result.bootstrap_distribution).reshape(len(keys), resamples)
    return with_pro_and_image_auroc(dict(zip(keys, distribution)))


def _weights(drawn: Sequence[np.ndarray], fixed: np.ndarray) -> np.ndarray:
    """Resamples x images: how often each image was drawn, from one (resamples x class size) index matrix per class,
    plus ``fixed`` (the images in every resample)."""
    batch, images = (drawn[0].shape[0] if drawn else 1), fixed.size
    weights = np.tile(fixed, (batch, 1))
    offsets = np.arange(batch)[:, None] * images
    for rows in drawn:
        weights += np.bincount((rows.astype(np.int64) + offsets).ravel(), minlength=batch * images
                               ).reshape(batch, images)
    return weights


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` share of the finite ``values``; (NaN, NaN) when none is finite."""
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def metric_intervals(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
    fpr_limit: float = 0.3,
    bins: int = BINS,
) -> dict[str, tuple[float, float]]:
    """{metric: (lo, hi)}, the percentile interval of each metric ``bootstrap_distribution`` resamples.

    The companion of ``metrics.compute_metrics``' point estimates (same arguments, same key names; the pixel
    metrics covered are pixel AUROC, PRO and their mean with image AUROC).
    """
    distribution = bootstrap_distribution(labels, scores, masks, maps, resamples=resamples, seed=seed,
                                          fpr_limit=fpr_limit, bins=bins)
    return {key: percentile_interval(values, confidence) for key, values in distribution.items()}


def interval_metrics(intervals: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """{metric: (lo, hi)} as flat metric names, ``<metric>_lo`` and ``<metric>_hi`` (as MLflow logs them)."""
    return {f"{key}_{end}": float(value) for key, bounds in intervals.items()
            for end, value in zip(("lo", "hi"), bounds)}


# ----------------------------------------------------------------------------------------------------
# Two detectors on the same images
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedComparison:
    """Detector A against detector B on one metric of the same images: the gap of the point estimates, the paired
    ``confidence`` interval of A - B, and (where the interval holds 0) roughly how many images the split would need
    for an interval that excludes 0 at the same gap."""

    gap: float
    lo: float
    hi: float
    images: int
    images_to_separate: int | None

    @property
    def verdict(self) -> str:
        """"better" or "worse" (A than B, the whole interval on one side of 0), or "undecided"."""
        return "better" if self.lo > 0 else "worse" if self.hi < 0 else "undecided"


def compare_paired(a: np.ndarray, b: np.ndarray, gap: float, images: int,
                   confidence: float = CONFIDENCE) -> PairedComparison:
    """Compare two detectors from their ``bootstrap_distribution`` values of one metric on the same split.

    The resamples depend only on the labels and the seed, so the same split and seed draw the same images for both:
    ``a - b`` resample by resample is the paired bootstrap of the difference, far narrower than the two separate
    intervals when the detectors err on the same images. ``gap`` is A's point estimate minus B's; ``images`` the
    split's size.

    The image count that would separate them is a rough power estimate: an interval's width shrinks as one over the
    square root of the number of images, so an interval of half-width h at n images excludes a gap g at about
    n (h / g)^2 images (None where the interval already excludes 0, or there is no gap).

    >>> rng = np.random.default_rng(0)
    >>> noise = rng.normal(0, 0.03, 1000)
    >>> result = compare_paired(0.90 + noise, 0.88 + noise + rng.normal(0, 0.02, 1000), gap=0.02, images=50)
    >>> result.verdict, result.images_to_separate
    ('undecided', 194)
    """
    lo, hi = percentile_interval(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), confidence)
    separate = None
    if np.isfinite(lo) and lo <= 0 <= hi and gap != 0:
        half_width = (hi - lo) / 2
        separate = int(np.ceil(images * (half_width / abs(gap)) ** 2))
    return PairedComparison(float(gap), lo, hi, int(images), separate)
