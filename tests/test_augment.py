"""RandAugmented CutPaste: exact pasting, alignment, determinism, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion

from bgad_core.data.racp import _OPS, GEOMETRIC, TRANSFORMS, racp_sample, racp_samples
from bgad_core.errors import ConfigError, DataError

SIZE = 48


def _images() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    normal = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    anomaly = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[20:30, 10:16] = 1
    mask[24:27, 16:22] = 1  # an L shape, so "only masked pixels" differs from "the whole bounding box"
    return normal, anomaly, mask


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def test_transforms_are_the_papers_set() -> None:
    assert set(TRANSFORMS) == {"AutoContrast", "Equalize", "Rotate", "Posterize", "Solarize", "Brightness",
                               "Sharpness", "Translate", "Shear"}


@pytest.mark.parametrize("seed", range(5))
def test_depth0_pastes_exactly_the_masked_pixels(seed: int) -> None:
    normal, anomaly, mask = _images()
    image, pasted = racp_sample(normal, anomaly, mask, depth=0, rng=np.random.default_rng(seed))
    assert pasted.dtype == np.uint8 and set(np.unique(pasted)) == {0, 1}
    outside = pasted == 0
    assert np.array_equal(image[outside], normal[outside])
    top, bottom, left, right = _bbox(mask)
    y, _, x, _ = _bbox(pasted)
    shifted = pasted[y : y + bottom - top, x : x + right - left]
    assert np.array_equal(shifted, mask[top:bottom, left:right]) and pasted.sum() == mask.sum()
    inside = shifted.astype(bool)
    assert np.array_equal(image[y : y + bottom - top, x : x + right - left][inside],
                          anomaly[top:bottom, left:right][inside])


@pytest.mark.parametrize("depth", range(len(TRANSFORMS) + 1))
def test_every_depth_works_and_keeps_image_and_mask_consistent(depth: int) -> None:
    normal, anomaly, mask = _images()
    for seed in range(4):
        image, pasted = racp_sample(normal, anomaly, mask, depth, np.random.default_rng(seed))
        assert image.shape == normal.shape and image.dtype == np.uint8 and pasted.shape == mask.shape
        assert pasted.any()
        assert np.array_equal(image[pasted == 0], normal[pasted == 0])


@pytest.mark.parametrize("seed", range(10))
def test_geometric_transforms_move_image_and_mask_together(seed: int) -> None:
    """A flat-coloured defect on black, put through all geometric operations in turn: the defect colour ends up
    exactly where the moved mask is (up to a one-pixel rim: image bilinear, mask nearest)."""
    anomaly = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[10:30, 14:24] = 1
    anomaly[mask == 1] = (200, 40, 90)
    rng = np.random.default_rng(seed)
    pair = (Image.fromarray(anomaly), Image.fromarray(mask * 255))
    for name in sorted(GEOMETRIC):
        image, moved = _OPS[name](pair, rng)
        image, moved = np.asarray(image), np.asarray(moved) > 0
        if moved.any():
            assert not image[~binary_dilation(moved, np.ones((3, 3)))].any(), name
            assert (image[binary_erosion(moved, np.ones((3, 3)))].max(axis=1) > 0).all(), name


def test_whole_image_mask_is_pasted_in_place() -> None:
    normal, anomaly, _ = _images()
    ones = np.ones((SIZE, SIZE), dtype=np.uint8)
    image, pasted = racp_sample(normal, anomaly, ones, depth=0, rng=np.random.default_rng(0))
    assert np.array_equal(image, anomaly) and pasted.all()


def test_mask_moved_out_of_frame_falls_back_to_original_geometry() -> None:
    normal, anomaly, _ = _images()
    corner = np.zeros((SIZE, SIZE), dtype=np.uint8)
    corner[0, 0] = 1  # a one-pixel defect in the corner leaves the frame under most geometric transforms
    for seed in range(30):
        _, pasted = racp_sample(normal, anomaly, corner, depth=len(TRANSFORMS), rng=np.random.default_rng(seed))
        assert pasted.sum() == 1


def test_racp_samples_deterministic_for_a_seed() -> None:
    normal, anomaly, mask = _images()
    normals = [normal, normal[::-1].copy(), normal[:, ::-1].copy()]
    a = racp_samples(normals, anomaly, mask, depth=2, count=6, seed=11)
    b = racp_samples(normals, anomaly, mask, depth=2, count=6, seed=11)
    c = racp_samples(normals, anomaly, mask, depth=2, count=6, seed=12)
    assert len(a) == 6
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, c, strict=True))
    assert racp_samples(normals, anomaly, mask, depth=2, count=0, seed=1) == []


@pytest.mark.parametrize("depth", [-1, len(TRANSFORMS) + 1, 1.0, True])
def test_bad_depth_is_named(depth: object) -> None:
    normal, anomaly, mask = _images()
    with pytest.raises(ConfigError, match="depth"):
        racp_sample(normal, anomaly, mask, depth, np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="depth"):
        racp_samples([normal], anomaly, mask, depth, 1, 0)  # type: ignore[arg-type]


def test_bad_inputs_are_named() -> None:
    normal, anomaly, mask = _images()
    with pytest.raises(ConfigError, match="count"):
        racp_samples([normal], anomaly, mask, 1, -1, 0)
    with pytest.raises(ConfigError, match="normals"):
        racp_samples([], anomaly, mask, 1, 1, 0)
    with pytest.raises(DataError, match="anomaly_mask is empty"):
        racp_sample(normal, anomaly, np.zeros_like(mask), 1, np.random.default_rng(0))
    with pytest.raises(DataError, match="anomaly_mask"):
        racp_sample(normal, anomaly, mask[:10], 1, np.random.default_rng(0))
    with pytest.raises(DataError, match="normal"):
        racp_sample(normal[:10], anomaly, mask, 1, np.random.default_rng(0))
