"""A small generated MVTec-layout category for tests and demos, so nothing needs downloading.

The surface is a woven, fabric-like texture: two crossing sinusoidal thread patterns plus smooth noise, in a mild
category colour. Every image varies slightly in thread phase, frequency, angle, brightness and noise, so normals
are similar but never identical. Defects are drawn on top and their masks are exactly the changed pixels:

- ``scratch``: a thin (2-3 px) bright or dark polyline across part of the image;
- ``spot``: a dark or bright elliptical blob;
- ``stain``: an irregular, strongly tinted (reddish brown) patch.

Contrast is high on purpose (BGAD-FAS with a pretrained EfficientNet-lite0 should separate them almost
perfectly), while position, size, shape, orientation and polarity are random so no two defects are identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from bgad_core.errors import ConfigError, DataError

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot", "stain")
_MARKER = ".synthetic.json"


def make_synthetic_category(
    root: str | Path,
    name: str = "synthetic",
    size: int = 128,
    n_train: int = 40,
    n_test_good: int = 20,
    n_test_per_defect: int = 10,
    defect_types: Sequence[str] = ("scratch", "spot"),
    seed: int = 0,
) -> Path:
    """Write ``<root>/<name>`` (train/good, test/good, test/<defect>, ground_truth/<defect>) and return it.

    Deterministic for its arguments. Calling again with the same arguments returns the existing directory
    unchanged (a parameter file records them); a non-empty directory made otherwise is a ``DataError`` rather than
    being overwritten or mixed with stale files.
    """
    params = _validated(name, size, n_train, n_test_good, n_test_per_defect, defect_types, seed)
    category = Path(root) / name
    if _already_made(category, params):
        return category
    rng = np.random.default_rng(seed)
    style = _Style.draw(rng)
    _write_images(category / "train" / "good", [style.surface(rng, size) for _ in range(n_train)])
    _write_images(category / "test" / "good", [style.surface(rng, size) for _ in range(n_test_good)])
    for defect in params["defect_types"]:
        pairs = [_DEFECTS[defect](style.surface(rng, size), rng) for _ in range(n_test_per_defect)]
        _write_images(category / "test" / defect, [image for image, _ in pairs])
        _write_images(category / "ground_truth" / defect, [mask * 255 for _, mask in pairs], suffix="_mask")
    (category / _MARKER).write_text(json.dumps(params, sort_keys=True))
    return category


def _validated(
    name: str,
    size: int,
    n_train: int,
    n_test_good: int,
    n_test_per_defect: int,
    defect_types: Sequence[str],
    seed: int,
) -> dict[str, object]:
    """Check the arguments and return them as the JSON-able record stored beside the data."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"name must be a plain directory name, got {name!r}")
    minimums = {"size": 32, "n_train": 1, "n_test_good": 1, "n_test_per_defect": 1, "seed": 0}
    values = {"size": size, "n_train": n_train, "n_test_good": n_test_good,
              "n_test_per_defect": n_test_per_defect, "seed": seed}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimums[key]:
            raise ConfigError(f"{key} must be an int >= {minimums[key]}, got {value!r}")
    types = [defect_types] if isinstance(defect_types, str) else list(defect_types)
    unknown = [t for t in types if t not in DEFECT_TYPES]
    if not types or unknown or len(set(types)) != len(types):
        raise ConfigError(f"defect_types must be distinct names from {DEFECT_TYPES}, got {defect_types!r}")
    return {"name": name, **values, "defect_types": types}


def _already_made(category: Path, params: dict[str, object]) -> bool:
    if not category.exists() or not any(category.iterdir()):
        return False
    marker = category / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return True
    raise DataError(f"{category} already exists with other content; refusing to overwrite it")


def _write_images(directory: Path, images: list[np.ndarray], suffix: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.astype(np.uint8)).save(directory / f"{i:03d}{suffix}.png")


class _Style:
    """Category-wide look (thread angle and period, colour); ``surface`` adds per-image variation."""

    def __init__(self, angle: float, period: float, colour: np.ndarray) -> None:
        self.angle = angle
        self.period = period
        self.colour = colour

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Style:
        colour = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.08, 0.08, size=3)
        return cls(angle=rng.uniform(0, np.pi / 2), period=rng.uniform(7.0, 10.0), colour=colour)

    def surface(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """One normal image: RGB float array in 0..255 (quantised when written)."""
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        angle = self.angle + rng.normal(0, 0.03)
        period = self.period * (1 + rng.normal(0, 0.03))
        u = x * np.cos(angle) + y * np.sin(angle)
        v = -x * np.sin(angle) + y * np.cos(angle)
        warp = gaussian_filter(rng.normal(size=(size, size)), 6) * 12
        weave = np.sin(2 * np.pi * (u + warp) / period + rng.uniform(0, 2 * np.pi)) * np.sin(
            2 * np.pi * v / period + rng.uniform(0, 2 * np.pi)
        )
        noise = gaussian_filter(rng.normal(size=(size, size)), 1.0)
        grey = 128 + rng.normal(0, 4) + 28 * weave + 10 * noise / max(noise.std(), 1e-6)
        return np.clip(grey[..., None] * self.colour, 0, 255)


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    start = rng.uniform(0.2, 0.8, size=2) * size
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.3, 0.55) * size
    points = [tuple(start)]
    for _ in range(3):
        angle += rng.normal(0, 0.25)
        step = np.array([np.cos(angle), np.sin(angle)]) * length / 3
        points.append(tuple(np.clip(np.array(points[-1]) + step, 2, size - 3)))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line(points, fill=1, width=int(rng.integers(2, 4)), joint="curve")
    return _shade(image, np.asarray(canvas, dtype=np.uint8), rng.uniform(80, 110) * rng.choice([-1, 1]))


def _spot(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = rng.uniform(0.05, 0.1, size=2) * size
    centre = rng.uniform(radius.max() + 2, size - radius.max() - 2, size=2)
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).ellipse([*(centre - radius), *(centre + radius)], fill=1)
    return _shade(image, np.asarray(canvas, dtype=np.uint8), rng.uniform(70, 100) * rng.choice([-1, 1]))


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = rng.uniform(0.08, 0.14) * size
    centre = rng.uniform(radius + 2, size - radius - 2, size=2)
    y, x = np.mgrid[0:size, 0:size]
    distance = np.hypot(x - centre[0], y - centre[1]) / radius
    wobble = gaussian_filter(rng.normal(size=(size, size)), 3)
    mask = (distance + 0.35 * wobble / max(wobble.std(), 1e-6) < 1).astype(np.uint8)
    tint = np.array([1.25, 0.75, 0.45]) * rng.uniform(0.85, 1.0)
    stained = np.where(mask[..., None] == 1, np.clip(image * tint, 0, 255), image)
    return stained, mask


def _shade(image: np.ndarray, mask: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Brighten or darken the masked pixels by ``delta`` grey levels."""
    return np.clip(image + delta * mask[..., None], 0, 255), mask


_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "spot": _spot,
    "stain": _stain,
}
