"""RandAugmented CutPaste (RACP), BGAD-FAS's way to multiply its few real anomalies.

One RACP sample: apply ``depth`` distinct RandAugment operations (random order, random magnitudes) to a real
anomalous image, cut its defect region out along the (equally transformed) mask and paste exactly those pixels at
a random position of a normal image. The new mask is exactly the pasted pixels, so pixel-level supervision stays
correct.

Details that the paper leaves open, decided here:

- Operations and magnitude ranges follow torchvision's RandAugment at a moderate-to-strong magnitude, implemented
  with PIL (``ImageOps`` / ``ImageEnhance`` / affine transforms) so the module stays numpy/PIL only and is exactly
  reproducible from the numpy ``Generator`` it is given.
- Geometric operations (Rotate, Translate, Shear) move image and mask together (image bilinear, mask nearest,
  both filled with 0) so they stay aligned. If one of them would leave the mask empty (e.g. translated out of the
  frame) that operation is skipped for both, i.e. the anomaly keeps its untransformed geometry for that step.
- The paste position is uniform over all positions where the mask's bounding box fits in the normal image. A mask
  covering the whole image (image-level datasets) therefore lands where it came from, and the result is the
  augmented anomaly itself.
- ``normal`` and ``anomaly`` must have the same shape: both come from the same loader at the training size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bgad_core.errors import ConfigError, DataError

TRANSFORMS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Rotate",
    "Posterize",
    "Solarize",
    "Brightness",
    "Sharpness",
    "Translate",
    "Shear",
)
GEOMETRIC: frozenset[str] = frozenset({"Rotate", "Translate", "Shear"})

MAX_ROTATE_DEG = 30.0
MAX_TRANSLATE_FRACTION = 0.3
MAX_SHEAR = 0.3
POSTERIZE_BITS = (4, 8)
SOLARIZE_THRESHOLD = (128, 255)
MAX_BRIGHTNESS_DELTA = 0.5
MAX_SHARPNESS_DELTA = 0.9

Pair = tuple[Image.Image, Image.Image]


def _signed(rng: np.random.Generator, limit: float) -> float:
    return float(rng.uniform(-limit, limit))


def _affine(pair: Pair, matrix: tuple[float, ...]) -> Pair:
    """Apply the same inverse affine ``matrix`` to image (bilinear) and mask (nearest), filling with 0."""
    image, mask = pair
    transform = Image.Transform.AFFINE
    return (
        image.transform(image.size, transform, matrix, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)),
        mask.transform(mask.size, transform, matrix, Image.Resampling.NEAREST, fillcolor=0),
    )


def _rotate(pair: Pair, rng: np.random.Generator) -> Pair:
    angle = _signed(rng, MAX_ROTATE_DEG)
    image, mask = pair
    return (
        image.rotate(angle, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)),
        mask.rotate(angle, Image.Resampling.NEAREST, fillcolor=0),
    )


def _translate(pair: Pair, rng: np.random.Generator) -> Pair:
    width, height = pair[0].size
    dx = round(_signed(rng, MAX_TRANSLATE_FRACTION) * width)
    dy = round(_signed(rng, MAX_TRANSLATE_FRACTION) * height)
    return _affine(pair, (1, 0, -dx, 0, 1, -dy))


def _shear(pair: Pair, rng: np.random.Generator) -> Pair:
    """Shear along x or y (chosen at random) about the image centre, so the content stays roughly in frame."""
    shear = _signed(rng, MAX_SHEAR)
    width, height = pair[0].size
    if rng.integers(2) == 0:
        return _affine(pair, (1, shear, -shear * height / 2, 0, 1, 0))
    return _affine(pair, (1, 0, 0, shear, 1, -shear * width / 2))


def _photometric(op: Callable[[Image.Image, np.random.Generator], Image.Image]) -> Callable[..., Pair]:
    """Lift an image-only operation to a (image, mask) one that leaves the mask untouched."""

    def apply(pair: Pair, rng: np.random.Generator) -> Pair:
        return op(pair[0], rng), pair[1]

    return apply


_OPS: dict[str, Callable[[Pair, np.random.Generator], Pair]] = {
    "AutoContrast": _photometric(lambda im, rng: ImageOps.autocontrast(im)),
    "Equalize": _photometric(lambda im, rng: ImageOps.equalize(im)),
    "Rotate": _rotate,
    "Posterize": _photometric(
        lambda im, rng: ImageOps.posterize(im, int(rng.integers(POSTERIZE_BITS[0], POSTERIZE_BITS[1] + 1)))
    ),
    "Solarize": _photometric(
        lambda im, rng: ImageOps.solarize(im, int(rng.integers(SOLARIZE_THRESHOLD[0], SOLARIZE_THRESHOLD[1] + 1)))
    ),
    "Brightness": _photometric(
        lambda im, rng: ImageEnhance.Brightness(im).enhance(1.0 + _signed(rng, MAX_BRIGHTNESS_DELTA))
    ),
    "Sharpness": _photometric(
        lambda im, rng: ImageEnhance.Sharpness(im).enhance(1.0 + _signed(rng, MAX_SHARPNESS_DELTA))
    ),
    "Translate": _translate,
    "Shear": _shear,
}


def _check_depth(depth: int) -> None:
    if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool) or not 0 <= depth <= len(TRANSFORMS):
        raise ConfigError(f"depth must be an int in [0, {len(TRANSFORMS)}], got {depth!r}")


def _check_inputs(normal: np.ndarray, anomaly: np.ndarray, anomaly_mask: np.ndarray) -> np.ndarray:
    """Validate shapes and return the mask as bool."""
    if anomaly.ndim != 3 or anomaly.shape[2] != 3 or anomaly.dtype != np.uint8:
        raise DataError(f"anomaly must be a uint8 HxWx3 array, got {anomaly.dtype} {anomaly.shape}")
    if normal.shape != anomaly.shape or normal.dtype != np.uint8:
        raise DataError(f"normal must be uint8 with the anomaly's shape {anomaly.shape}, got {normal.shape}")
    if anomaly_mask.shape != anomaly.shape[:2]:
        raise DataError(f"anomaly_mask must have shape {anomaly.shape[:2]}, got {anomaly_mask.shape}")
    mask = anomaly_mask > 0
    if not mask.any():
        raise DataError("anomaly_mask is empty: there is no defect region to cut and paste")
    return mask


def augment_anomaly(
    anomaly: np.ndarray, mask: np.ndarray, depth: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """RandAugment ``anomaly`` with ``depth`` distinct random operations; geometric ones also move ``mask``."""
    _check_depth(depth)
    pair: Pair = (Image.fromarray(anomaly), Image.fromarray((mask > 0).astype(np.uint8) * 255))
    for index in rng.choice(len(TRANSFORMS), size=depth, replace=False):
        name = TRANSFORMS[int(index)]
        image, moved = _OPS[name](pair, rng)
        if name not in GEOMETRIC or moved.getbbox() is not None:
            pair = (image, moved)
    return np.asarray(pair[0], dtype=np.uint8), np.asarray(pair[1]) > 0


def _paste(
    normal: np.ndarray, anomaly: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paste the masked pixels of ``anomaly`` (their bounding box) at a random position where the box fits."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    patch_mask = mask[top:bottom, left:right]
    patch = anomaly[top:bottom, left:right]
    height, width = patch_mask.shape
    y = int(rng.integers(0, normal.shape[0] - height + 1))
    x = int(rng.integers(0, normal.shape[1] - width + 1))
    image = normal.copy()
    image[y : y + height, x : x + width][patch_mask] = patch[patch_mask]
    out_mask = np.zeros(normal.shape[:2], dtype=np.uint8)
    out_mask[y : y + height, x : x + width] = patch_mask
    return image, out_mask


def racp_sample(
    normal: np.ndarray,
    anomaly: np.ndarray,
    anomaly_mask: np.ndarray,
    depth: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One RACP sample: (image uint8 HxWx3, mask uint8 {0,1} HxW); ``depth`` 0 is plain CutPaste."""
    _check_depth(depth)
    mask = _check_inputs(normal, anomaly, anomaly_mask)
    augmented, moved = augment_anomaly(anomaly, mask, depth, rng)
    return _paste(normal, augmented, moved, rng)


def racp_samples(
    normals: Sequence[np.ndarray],
    anomaly: np.ndarray,
    anomaly_mask: np.ndarray,
    depth: int,
    count: int,
    seed: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` RACP samples from one anomaly onto normals drawn at random; deterministic for ``seed``."""
    _check_depth(depth)
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
        raise ConfigError(f"count must be an int >= 0, got {count!r}")
    if len(normals) == 0:
        raise ConfigError("normals must contain at least one image")
    rng = np.random.default_rng(seed)
    return [
        racp_sample(normals[int(rng.integers(len(normals)))], anomaly, anomaly_mask, depth, rng)
        for _ in range(count)
    ]
