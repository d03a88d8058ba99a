"""Image- and pixel-level anomaly-detection metrics: AUROC, average precision, best F1 and AUPRO.

All curves come from one descending sort of the scores, collapsed to distinct thresholds, so that
tied scores form a single operating point (a detector cannot separate pixels it scores equally).
scikit-learn's ``roc_auc_score`` / ``average_precision_score`` give the same numbers (the tests check
this) but take about 4 s together on 6.5 M pixels (100 maps of 256x256) on a 2-core CPU, because each
runs its own stable argsort. Here one sort, shared by the four pixel metrics including AUPRO, makes
``compute_metrics`` on such a split take about 0.3-0.5 s, which matters because a sweep evaluates
after every meta-epoch of every trial (``python -m benchmarks.bench_aupro`` measures it).

Undefined metrics (a single class, no defect region) return NaN with an ``UndefinedMetricWarning``
instead of raising: a validation split that happens to hold one class must not abort a sweep.
Malformed input (shape mismatch, non-binary masks, non-finite scores) raises ``DataError`` naming the
argument, because that is a bug in the caller rather than a property of the data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.exceptions import UndefinedMetricWarning

from bgad_core.errors import ConfigError, DataError

# The mean of AUPRO and image AUROC, where masks exist: one figure for both things a masked dataset is judged on (which
# images are defective, where the defects are), for a selection that must not buy one with the other.
PRO_AND_IMAGE_AUROC = "aupro_image_auroc_mean"

__all__ = [
    "PRO_AND_IMAGE_AUROC",
    "aupro",
    "compute_metrics",
    "f1_max",
    "image_aupr",
    "image_auroc",
    "pixel_aupr",
    "pixel_auroc",
    "pixel_f1_max",
    "with_pro_and_image_auroc",
]

# MVTec AD's reference evaluation labels defect regions with a 3x3 structure of ones (8-connectivity).
# The leading and trailing planes are empty so that one 3-D call labels each image independently.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# ----------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """Convert a numpy array, torch tensor (any device or dtype) or sequence to a numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
    return np.asarray(value)


def _scores_array(value: Any, name: str) -> np.ndarray:
    """Scores as a float array; NaN or infinite values are rejected because they have no rank."""
    array = _to_numpy(value)
    if array.dtype == np.float16:
        array = array.astype(np.float32)  # exact, and float32 takes the fast sort in ``_sort_with_ids``
    elif not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)  # integer or bool scores
    if array.size and not np.isfinite(array).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return array


def _binary_array(value: Any, name: str) -> np.ndarray:
    """Ground truth as a bool array; anything other than 0/1 (e.g. 0/255 or soft masks) is rejected."""
    array = _to_numpy(value)
    if array.dtype == bool:
        return array
    positive = array == 1
    if not (positive | (array == 0)).all():
        raise DataError(f"{name} must contain only 0 and 1, found values {np.unique(array)[:5].tolist()}")
    return positive


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-image labels and scores: equal-length, non-empty 1-D arrays."""
    truth = _binary_array(labels, "labels")
    values = _scores_array(scores, "scores")
    if truth.ndim != 1:
        raise DataError(f"labels must be 1-D (one label per image), got shape {truth.shape}")
    if values.shape != truth.shape:
        raise DataError(f"scores shape {values.shape} does not match labels shape {truth.shape}")
    if truth.size == 0:
        raise DataError("labels is empty")
    return truth, values


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate masks and anomaly maps: equal shapes, [N, H, W] (a single [H, W] image is promoted)."""
    truth = _binary_array(masks, "masks")
    values = _scores_array(maps, "maps")
    if truth.ndim not in (2, 3):
        raise DataError(f"masks must have shape [N, H, W] or [H, W], got {truth.shape}")
    if values.shape != truth.shape:
        raise DataError(f"maps shape {values.shape} does not match masks shape {truth.shape}")
    if truth.size == 0:
        raise DataError("masks is empty")
    if truth.ndim == 2:
        truth, values = truth[None], values[None]
    return truth, values


def _undefined(metric: str, reason: str) -> float:
    """Warn that ``metric`` is undefined for this data and return NaN (see module docstring for why)."""
    warnings.warn(f"{metric} is undefined: {reason}; returning NaN", UndefinedMetricWarning, stacklevel=4)
    return float("nan")


# ----------------------------------------------------------------------------------------------------
# Shared curve arithmetic
# ----------------------------------------------------------------------------------------------------


def _sort_with_ids(values: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-D ``values`` in ascending order, and the uint32 ``ids`` reordered alike (ties in any order)."""
    if values.dtype != np.float32:
        order = np.argsort(values)
        return values[order], ids[order]
    # Anomaly maps are float32, and numpy sorts plain 64-bit integers (SIMD) several times faster than
    # it argsorts: each value becomes an order-preserving uint32 key, packed above its id and sorted
    # in place, which also saves gathering the ids through an index array.
    # (-0.0 gets the key just below +0.0; ``_Curves.of`` finds ties on the decoded floats, which are equal.)
    bits = values.view(np.uint32)
    flip = (bits >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000)  # negatives: all bits
    packed = (bits ^ flip).astype(np.uint64) << np.uint64(32)
    packed |= ids
    packed.sort()
    keys = (packed >> np.uint64(32)).astype(np.uint32)
    unflip = np.where(keys >> np.uint32(31), np.uint32(0x80000000), np.uint32(0xFFFFFFFF))
    return (keys ^ unflip).view(np.float32), (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32)


@dataclass(frozen=True)
class _Curves:
    """True/false positive counts at every distinct threshold, from one descending sort of the scores.

    Sorting dominates the cost of every metric here, so all metrics of one (truth, scores) pair are
    read off this object. Each element carries an id, 0 for normal and > 0 for anomalous; for pixels
    the id is the number of the element's defect region, which is all AUPRO needs beyond the sort.
    """

    ids: np.ndarray  # uint32 id of every element, highest score first
    tie_ends: np.ndarray  # position in ``ids`` of the last element of each run of equal scores
    thresholds: np.ndarray  # the distinct scores, descending
    true_pos: np.ndarray  # anomalous elements scoring >= each threshold
    false_pos: np.ndarray  # normal elements scoring >= each threshold

    @classmethod
    def of(cls, ids: np.ndarray, scores: np.ndarray) -> _Curves:
        values, sorted_ids = _sort_with_ids(scores.ravel(), ids.ravel().astype(np.uint32, copy=False))
        values, sorted_ids = values[::-1], sorted_ids[::-1]
        tie_ends = np.append(np.flatnonzero(values[1:] != values[:-1]), values.size - 1)
        true_pos = np.cumsum(sorted_ids != 0)[tie_ends].astype(np.float64)
        false_pos = (tie_ends + 1) - true_pos
        return cls(sorted_ids, tie_ends, values[tie_ends], true_pos, false_pos)

    def auroc(self, metric: str) -> float:
        """Trapezoidal area under the ROC curve, starting from the (0, 0) point of an infinite threshold."""
        if self.true_pos[-1] == 0 or self.false_pos[-1] == 0:
            return _undefined(metric, "ground truth holds a single class")
        tpr = np.concatenate(([0.0], self.true_pos / self.true_pos[-1]))
        fpr = np.concatenate(([0.0], self.false_pos / self.false_pos[-1]))
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self, metric: str) -> float:
        """Step-wise AP = sum over thresholds of (recall increase) x precision, scikit-learn's definition."""
        if self.true_pos[-1] == 0:
            return _undefined(metric, "ground truth has no anomalous sample")
        precision = self.true_pos / (self.true_pos + self.false_pos)
        recall_gain = np.diff(self.true_pos, prepend=0.0) / self.true_pos[-1]
        return float(np.sum(recall_gain * precision))

    def f1_max(self, metric: str) -> tuple[float, float]:
        """Best F1 over the distinct thresholds (anomalous iff score >= threshold) and that threshold."""
        if self.true_pos[-1] == 0:
            return _undefined(metric, "ground truth has no anomalous sample"), float("nan")
        # F1 = 2 TP / (2 TP + FP + FN) with FN = P - TP; the denominator is >= P > 0.
        f1 = 2 * self.true_pos / (self.true_pos + self.false_pos + self.true_pos[-1])
        best = int(np.argmax(f1))
        return float(f1[best]), float(self.thresholds[best])

    def aupro(self, fpr_limit: float) -> float:
        """Normalised area under the PRO curve; the ids must number the defect regions 1..R."""
        if self.true_pos[-1] == 0:
            return _undefined("aupro", "masks contain no defect region")
        if self.false_pos[-1] == 0:
            reason = "masks contain no normal pixel, so the false positive rate is undefined"
            return _undefined("aupro", reason)
        # Each pixel of region r adds 1 / (|r| * R) to PRO once the threshold drops to its score, so a
        # cumulative sum in ranking order gives the mean per-region overlap at every threshold at once.
        region_sizes = np.bincount(self.ids)
        pixel_weight = 1.0 / (region_sizes * (region_sizes.size - 1))
        pixel_weight[0] = 0.0  # id 0 is the normal background
        pro = np.cumsum(pixel_weight[self.ids])[self.tie_ends]
        fpr = self.false_pos / self.false_pos[-1]
        area = _area_up_to(np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro)), fpr_limit)
        return area / fpr_limit


def _pixel_curves(truth: np.ndarray, maps: np.ndarray) -> _Curves:
    """Pixel-level curves whose ids are the defect regions: 8-connected, never across images."""
    regions, _ = ndimage.label(truth, structure=_REGION_STRUCTURE)
    return _Curves.of(regions, maps)


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under (x, y) for x in [0, x_max], interpolating y linearly at exactly x_max.

    ``x`` is non-decreasing, starts at 0 and ends at >= x_max (an FPR curve ends at 1).
    """
    inside = int(np.searchsorted(x, x_max, side="right"))  # x[:inside] <= x_max < x[inside]
    if inside < x.size:
        fraction = (x_max - x[inside - 1]) / (x[inside] - x[inside - 1])
        y_at = y[inside - 1] + fraction * (y[inside] - y[inside - 1])
        x, y = np.append(x[:inside], x_max), np.append(y[:inside], y_at)
    return float(np.trapezoid(y, x))


def _check_fpr_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


# ----------------------------------------------------------------------------------------------------
# Public metrics
# ----------------------------------------------------------------------------------------------------


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of per-image scores (label 1 = anomalous); NaN if one class only."""
    return _Curves.of(*_image_inputs(labels, scores)).auroc("image_auroc")


def image_aupr(labels: Any, scores: Any) -> float:
    """Average precision of per-image scores (scikit-learn's definition); NaN without anomalous images."""
    return _Curves.of(*_image_inputs(labels, scores)).average_precision("image_aupr")


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 over all thresholds of per-image scores and that threshold (anomalous iff score >= it).

    Returns (NaN, NaN) when there is no anomalous image, since F1 is then undefined.
    """
    return _Curves.of(*_image_inputs(labels, scores)).f1_max("f1_max")


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Area under the ROC curve over all pixels of [N, H, W] maps; NaN if the masks hold one class only."""
    return _pixel_curves(*_pixel_inputs(masks, maps)).auroc("pixel_auroc")


def pixel_aupr(masks: Any, maps: Any) -> float:
    """Average precision over all pixels; NaN when no pixel is anomalous."""
    return _pixel_curves(*_pixel_inputs(masks, maps)).average_precision("pixel_aupr")


def pixel_f1_max(masks: Any, maps: Any) -> tuple[float, float]:
    """Best pixel-level F1 and its threshold (anomalous iff map value >= it); (NaN, NaN) without defects."""
    return _pixel_curves(*_pixel_inputs(masks, maps)).f1_max("pixel_f1_max")


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec AD definition).

    Defect regions are the 8-connected components of each image's mask; at every threshold the PRO is
    the mean, over all regions of all images, of the fraction of the region's pixels at or above the
    threshold, and the FPR is taken over all normal pixels. A perfect detector scores 1.0; a random one
    about ``fpr_limit / 2``. Unlike pixel AUROC, each defect weighs the same regardless of its size.

    Returns NaN (with an ``UndefinedMetricWarning``) when the masks contain no defect region, because
    the mean over zero regions does not exist, or no normal pixel, because the FPR axis does not.
    """
    return _pixel_curves(*_pixel_inputs(masks, maps)).aupro(_check_fpr_limit(fpr_limit))


def compute_metrics(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All image-level metrics and, when ``masks`` are given, all pixel-level metrics and AUPRO.

    Keys: image_auroc, image_aupr, image_f1_max, plus pixel_auroc, pixel_aupr, pixel_f1_max, aupro and
    ``PRO_AND_IMAGE_AUROC`` (the mean of aupro and image_auroc) when ``masks`` is not None. The key set depends
    only on whether masks were passed, never on the data: an undefined metric is present with value NaN (and a
    warning), so logged runs stay comparable.
    The pixels are sorted once and that ranking is shared by the four pixel-level metrics.
    """
    if (masks is None) != (maps is None):
        missing = "maps" if maps is None else "masks"
        raise DataError(f"{missing} is missing: pixel metrics need both masks and maps")
    truth, values = _image_inputs(labels, scores)
    image = _Curves.of(truth, values)
    metrics = {
        "image_auroc": image.auroc("image_auroc"),
        "image_aupr": image.average_precision("image_aupr"),
        "image_f1_max": image.f1_max("image_f1_max")[0],
    }
    if masks is None:
        return metrics
    limit = _check_fpr_limit(fpr_limit)
    pixel_truth, pixel_values = _pixel_inputs(masks, maps)
    if pixel_truth.shape[0] != truth.size:
        raise DataError(f"masks hold {pixel_truth.shape[0]} images but labels hold {truth.size}")
    pixel = _pixel_curves(pixel_truth, pixel_values)
    metrics.update(
        pixel_auroc=pixel.auroc("pixel_auroc"),
        pixel_aupr=pixel.average_precision("pixel_aupr"),
        pixel_f1_max=pixel.f1_max("pixel_f1_max")[0],
        aupro=pixel.aupro(limit),
    )
    return with_pro_and_image_auroc(metrics)


def with_pro_and_image_auroc(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with ``PRO_AND_IMAGE_AUROC`` (re)computed from its aupro and image_auroc where it has aupro: for
    one map's pixel metrics merged with the image metrics of another image score (a stale mean would be kept), and
    for bootstrap distributions (one value per resample, element-wise)."""
    if "aupro" in metrics:
        metrics[PRO_AND_IMAGE_AUROC] = (metrics["aupro"] + metrics["image_auroc"]) / 2
    return metrics


def objective_metric(has_masks: bool) -> str:
    """The default validation objective: the mean of PRO and image AUROC where pixel masks exist, image AUROC otherwise.

    A masked line is judged on both. Selected on PRO alone, BGAD-FAS on the unaligned KolektorSDD deployed distances
    alone for a 0.008 lead of validation PRO and lost 0.079 of test PRO and 0.025 of image AUROC. On nineteen arms
    of the shared data the mean selected what PRO did in twelve, raised the test mean of both by 0.004 on average,
    and at worst traded one for the other (+0.038 image AUROC, -0.107 PRO; BENCHMARKS.md, "The mean of PRO and image
    AUROC as the default objective"). That worst case came from a lopsided comparison, gone since the flows borrow
    the distances' image score by the margin alone (``scoring_choice.choose_image_map``): 0.802 image AUROC with
    PRO 0.749 there now.
    """
    return PRO_AND_IMAGE_AUROC if has_masks else "image_auroc"
