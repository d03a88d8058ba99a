"""Straightforward AUPRO: one binarisation of the maps per threshold, overlaps measured region by region.

It follows the MVTec AD definition literally and shares no code with ``bgad_core.evaluation.metrics``, so the
tests use it as an oracle for the vectorised implementation and the benchmark as its speed baseline.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def aupro_reference(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float:
    """AUPRO of [N, H, W] maps against binary masks, integrated to ``fpr_limit`` and divided by it.

    ``num_thresholds=None`` evaluates every distinct map value (exact); an integer evaluates that many
    thresholds evenly spaced from the maximum to the minimum value (the usual approximation).
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    regions = _defect_regions(masks)
    if num_thresholds is None:
        thresholds = np.unique(maps)[::-1]
    else:
        thresholds = np.linspace(maps.max(), maps.min(), num_thresholds)
    fprs, pros = [0.0], [0.0]  # a threshold above every value flags nothing
    normal = ~masks
    for threshold in thresholds:
        flagged = (maps >= threshold).reshape(len(maps), -1)
        fprs.append(np.count_nonzero(flagged & normal.reshape(len(maps), -1)) / np.count_nonzero(normal))
        pros.append(float(np.mean([flagged[image, pixels].mean() for image, pixels in regions])))
    return _clipped_trapezoid(fprs, pros, fpr_limit) / fpr_limit


def _defect_regions(masks: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(image index, flat pixel indices) of every 8-connected defect region of every mask."""
    regions = []
    for image, mask in enumerate(masks):
        components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        flat = components.ravel()
        regions.extend((image, np.flatnonzero(flat == region)) for region in range(1, count + 1))
    return regions


def _clipped_trapezoid(fprs: list[float], pros: list[float], fpr_limit: float) -> float:
    """Trapezoid over the points with FPR <= fpr_limit plus a point interpolated at fpr_limit itself."""
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area
