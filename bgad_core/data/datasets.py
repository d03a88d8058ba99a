"""Readers for anomaly-detection image folders and loaders for images and masks.

Three on-disk layouts are understood (``read_category`` detects which one by default):

``mvtec``  (MVTec AD, MTD, KolektorSDD, BrainMRI as staged in shared/data)::

    <cat>/train/good/*                      normal training images
    <cat>/test/good/*                       normal test images
    <cat>/test/<defect>/*                   anomalous test images
    <cat>/ground_truth/<defect>/<stem>_mask.*   pixel masks (optional as a whole)

``btad``  (BTAD)::

    <cat>/train/ok/*, <cat>/test/ok/*, <cat>/test/ko/*, <cat>/ground_truth/ko/<stem>.*

``folder``  (a plain class-per-folder dump)::

    <root>/good/*                           normal images
    <root>/<defect>/*                       anomalous images
    <root>/masks/<defect>/<stem>[_mask].*   pixel masks (optional as a whole)

  A folder dump has no train/test split of its own, so the sorted normals are split deterministically: every
  ``FOLDER_TEST_EVERY``-th one (indices 4, 9, 14, ... in sorted order) goes to test, the rest to train - the same
  rule that staged shared/data. With fewer than ``FOLDER_TEST_EVERY`` normals the last one goes to test so that
  evaluation always has a normal image; at least two normals are required.

Rules shared by all layouts, chosen so that a dataset problem surfaces when it is read rather than half-way
through a training run: images are matched by extension case-insensitively (``IMAGE_EXTENSIONS``) and other files
(``Thumbs.db``, hidden files, text files) are ignored; everything is sorted; an empty class directory, missing
training images are a ``DataError`` naming the directory. A mask may have another extension than its image and
is found as ``<stem>_mask.*`` or ``<stem>.*``; two images with the same stem in a masked class (``a.png`` beside
``a.jpg``) would share a mask and are a ``DataError``, elsewhere they are fine (BrainMRI has such pairs). When
the category has a mask folder at all, every anomalous image must have its mask (``DataError`` naming the expected
file); without a mask folder the category is image-level (``has_masks`` False, ``mask_path`` None) and
``load_mask`` returns whole-image masks for its anomalies.

An entry named like an image that cannot be read as a file (a dangling symlink, a symlink loop, a directory, a file
without read permission) is never dropped silently: with ``on_bad_image="error"`` (the default) it is a
``DataError`` naming it, with ``"skip"`` it is left out with a warning naming it.

Normals are always labelled ``defect_type == "good"`` (BTAD's ``ok`` included) so downstream code never needs to
know the layout.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bgad_core.errors import ConfigError, DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LAYOUTS: tuple[str, ...] = ("auto", "mvtec", "btad", "folder")
ON_BAD_IMAGE: tuple[str, ...] = ("error", "skip")
GOOD = "good"
FOLDER_TEST_EVERY = 5
MASK_THRESHOLD = 128
_MASK_SUFFIX = "_mask"
_FOLDER_MASK_DIR = "masks"

Size = int | tuple[int, int]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    """One image of a category; ``split`` ("train"/"test") only serves to make ``record_id`` unique."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None
    split: str = "test"

    @property
    def record_id(self) -> str:
        """Stable id ``<split>/<defect_type>/<file name>``: unique within a category, independent of the root.

        The extension is part of it because real data has same-stem pairs (BrainMRI ``Y92.jpg`` / ``Y92.png``).
        """
        return f"{self.split}/{self.defect_type}/{self.path.name}"


@dataclass
class CategoryIndex:
    """All images of one category: ``train`` holds normals only, ``test`` normals and anomalies."""

    name: str
    root: Path
    train: list[ImageRecord]
    test: list[ImageRecord]
    has_masks: bool

    @property
    def defect_types(self) -> list[str]:
        """Sorted names of the anomaly classes present in ``test`` ("good" excluded)."""
        return sorted({r.defect_type for r in self.test if r.label == 1})


def read_category(path: str | Path, layout: str = "auto", on_bad_image: str = "error") -> CategoryIndex:
    """Index a category directory in one of ``LAYOUTS``; see the module docstring for the layouts and rules.

    ``on_bad_image`` (one of ``ON_BAD_IMAGE``) decides what an image-named entry that is not a readable file does.

    >>> from bgad_core.data.synthetic import make_synthetic_category
    >>> import tempfile
    >>> index = read_category(make_synthetic_category(tempfile.mkdtemp(), size=32, n_train=2, n_test_good=1,
    ...                                               n_test_per_defect=1))
    >>> len(index.train), index.defect_types
    (2, ['scratch', 'spot'])
    """
    root = Path(path)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    if not root.is_dir():
        raise DataError(f"category directory not found: {root}")
    if layout == "auto":
        layout = detect_layout(root)
    readers = {"mvtec": _read_mvtec, "btad": _read_btad, "folder": _read_folder}
    return readers[layout](root, on_bad_image)


def detect_layout(root: Path) -> str:
    """Name the layout of ``root`` from its directory names ("btad" wins over "mvtec" when ok/ko dirs exist)."""
    if (root / "train" / "ok").is_dir() or (root / "test" / "ko").is_dir():
        return "btad"
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "mvtec"
    if (root / GOOD).is_dir():
        return "folder"
    raise DataError(
        f"cannot detect the layout of {root}: expected train/ and test/ (mvtec), train/ok (btad) or good/ (folder)"
    )


def _read_mvtec(root: Path, on_bad_image: str) -> CategoryIndex:
    return _read_split_layout(root, normal_dir=GOOD, mask_dir=root / "ground_truth", on_bad_image=on_bad_image)


def _read_btad(root: Path, on_bad_image: str) -> CategoryIndex:
    return _read_split_layout(root, normal_dir="ok", mask_dir=root / "ground_truth", on_bad_image=on_bad_image)


def _read_split_layout(root: Path, normal_dir: str, mask_dir: Path, on_bad_image: str) -> CategoryIndex:
    """Read a layout with explicit train/ and test/ folders (MVTec and BTAD differ only in the normal name)."""
    test_dir = root / "test"
    train = _records(_require_dir(root / "train" / normal_dir), 0, GOOD, "train", on_bad_image)
    test = _records(_require_dir(test_dir / normal_dir), 0, GOOD, "test", on_bad_image)
    has_masks = mask_dir.is_dir()
    for defect_dir in _subdirs(test_dir, exclude={normal_dir}):
        test += _anomalies(defect_dir, mask_dir / defect_dir.name if has_masks else None, on_bad_image)
    return CategoryIndex(root.name, root, train, test, has_masks)


def _read_folder(root: Path, on_bad_image: str) -> CategoryIndex:
    """Read ``<root>/good`` + ``<root>/<defect>`` and split the normals (see ``FOLDER_TEST_EVERY``)."""
    normals = _image_files(_require_dir(root / GOOD), on_bad_image)
    if len(normals) < 2:
        raise DataError(f"{root / GOOD} needs at least 2 normal images (one for training, one for testing)")
    test_idx = {i for i in range(len(normals)) if i % FOLDER_TEST_EVERY == FOLDER_TEST_EVERY - 1}
    test_idx = test_idx or {len(normals) - 1}
    train = [ImageRecord(p, 0, GOOD, None, "train") for i, p in enumerate(normals) if i not in test_idx]
    test = [ImageRecord(p, 0, GOOD, None, "test") for i, p in enumerate(normals) if i in test_idx]
    mask_root = root / _FOLDER_MASK_DIR
    has_masks = mask_root.is_dir()
    for defect_dir in _subdirs(root, exclude={GOOD, _FOLDER_MASK_DIR}):
        test += _anomalies(defect_dir, mask_root / defect_dir.name if has_masks else None, on_bad_image)
    return CategoryIndex(root.name, root, train, test, has_masks)


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"missing directory: {path}")
    return path


def _subdirs(path: Path, exclude: set[str]) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in exclude)


def _named_like_image(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _unreadable_reason(path: Path) -> str | None:
    """Why the image-named entry ``path`` cannot be read as a file, or None when it can."""
    try:
        mode = path.stat().st_mode  # follows symlinks: a dangling one or a loop fails here
    except OSError as err:
        return f"{'broken symlink' if path.is_symlink() else 'cannot stat it'} ({err.strerror})"
    if stat.S_ISDIR(mode):
        return "a directory, not an image file"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "no read permission"
    return None


def _listed_images(directory: Path, on_bad_image: str, what: str = "image") -> list[Path]:
    """Sorted readable images of ``directory``; an unreadable image-named entry is an error or a warning."""
    files = []
    for path in sorted(p for p in directory.iterdir() if _named_like_image(p)):
        reason = _unreadable_reason(path)
        if reason is None:
            files.append(path)
        elif on_bad_image == "error":
            raise DataError(f"cannot read {what} {path}: {reason}")
        else:
            logger.warning("skipping %s %s: %s", what, path, reason)
    return files


def _image_files(directory: Path, on_bad_image: str) -> list[Path]:
    """Sorted images of ``directory``; an empty directory is an error naming it."""
    files = _listed_images(directory, on_bad_image)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in directory {directory}")
    return files


def _check_unique_stems(files: Iterable[Path]) -> None:
    """Masks are found by stem, so ``a.png`` beside ``a.jpg`` would silently share one mask."""
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise DataError(f"two images with the same stem: {seen[path.stem]} and {path}")
        seen[path.stem] = path


def _records(directory: Path, label: int, defect_type: str, split: str, on_bad_image: str) -> list[ImageRecord]:
    return [ImageRecord(p, label, defect_type, None, split) for p in _image_files(directory, on_bad_image)]


def _anomalies(defect_dir: Path, mask_dir: Path | None, on_bad_image: str) -> list[ImageRecord]:
    """Anomalous records of one class; with ``mask_dir`` every image must have its mask there."""
    images = _image_files(defect_dir, on_bad_image)
    if mask_dir is None:
        return [ImageRecord(p, 1, defect_dir.name, None, "test") for p in images]
    _check_unique_stems(images)
    masks = _mask_lookup(mask_dir, on_bad_image)
    return [ImageRecord(p, 1, defect_dir.name, _find_mask(p, mask_dir, masks), "test") for p in images]


def _mask_lookup(mask_dir: Path, on_bad_image: str) -> dict[str, list[Path]]:
    """Map a stem (with any ``_mask`` suffix removed) to the mask files carrying it, listing the folder once."""
    lookup: dict[str, list[Path]] = {}
    if not mask_dir.is_dir():
        return lookup
    for path in _listed_images(mask_dir, on_bad_image, what="mask"):
        stem = path.stem.removesuffix(_MASK_SUFFIX)
        lookup.setdefault(stem, []).append(path)
    return lookup


def _find_mask(image: Path, mask_dir: Path, lookup: dict[str, list[Path]]) -> Path:
    candidates = lookup.get(image.stem, [])
    if not candidates:
        raise DataError(
            f"missing mask for {image}: expected {mask_dir / (image.stem + _MASK_SUFFIX)}.<ext> "
            f"(or {mask_dir / image.stem}.<ext>)"
        )
    if len(candidates) > 1:
        raise DataError(f"ambiguous masks for {image}: {', '.join(str(c) for c in candidates)}")
    return candidates[0]


def _pil_size(size: Size, key: str = "size") -> tuple[int, int]:
    """``size`` (int = square, or (height, width)) as PIL's (width, height)."""
    values: tuple = ()
    if isinstance(size, int):
        values = (size, size)
    elif isinstance(size, (tuple, list)):
        values = tuple(size)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(f"{key} must be a positive int or (height, width) of positive ints, got {size!r}")
    return values[1], values[0]


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` so truncated files fail here, with the file named, not in a worker later."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Reduce 16/32-bit and float images to 8 bit; other modes are left for ``convert`` to handle."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def load_image(path: str | Path, size: Size | None) -> np.ndarray:
    """Read an image as RGB uint8 [H, W, 3], resized bilinearly (antialiased when shrinking) to ``size``.

    ``size`` is an int (square) or (height, width); None keeps the original size. Grey, palette, RGBA and 16-bit
    images become RGB so every backbone sees 3 channels. EXIF orientation is deliberately ignored: masks are
    stored in raw pixel geometry and must stay aligned with the image.
    """
    path = Path(path)
    image = rgb_image(_open(path, "image"))
    if size is not None:
        image = image.resize(_pil_size(size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def rgb_image(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB: what every backbone sees, from files (``load_image``) and from requests."""
    return _to_8bit(image).convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _mask_values(image: Image.Image) -> np.ndarray:
    """Mask as float 0..255: palette and 1-bit masks count any non-zero index as defect."""
    if image.mode in ("P", "1"):
        return (np.asarray(image) > 0).astype(np.float64) * 255.0
    return np.asarray(_to_8bit(image).convert("L"), dtype=np.float64)


def load_mask(record: ImageRecord, size: Size | None) -> np.ndarray:
    """Pixel mask of ``record`` as uint8 {0, 1} [H, W] at ``size`` (as in ``load_image``).

    Normal images give zeros; anomalous images of image-level datasets (``mask_path`` None) give ones, i.e. the
    whole image counts as defective. Stored masks are resized bilinearly in the 0-255 domain and then binarised at
    ``MASK_THRESHOLD`` (>= 128 is defect): this handles anti-aliased masks and is area-faithful (a resized pixel
    is defect when about half of what it covers is) instead of nearest-neighbour's aliasing; the price is that a
    defect thinner than half a resized pixel disappears (one tiny MTD mask at 256 px). A mask whose size differs from its image's is a ``DataError``: it
    means image and mask were exported differently and would be silently misaligned after resizing.
    """
    if size is None:
        width, height = image_size(record.path)
    else:
        width, height = _pil_size(size)
    if record.label == 0:
        return np.zeros((height, width), dtype=np.uint8)
    if record.mask_path is None:
        return np.ones((height, width), dtype=np.uint8)
    mask = _open(record.mask_path, "mask")
    expected = image_size(record.path)
    if mask.size != expected:
        raise DataError(
            f"mask {record.mask_path} is {mask.size[0]}x{mask.size[1]} but its image {record.path} is "
            f"{expected[0]}x{expected[1]} (width x height)"
        )
    values = Image.fromarray(_mask_values(mask).astype(np.float32), mode="F")
    values = values.resize((width, height), Image.Resampling.BILINEAR)
    return (np.asarray(values) >= MASK_THRESHOLD).astype(np.uint8)
