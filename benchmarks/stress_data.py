"""Stress variants of a shared category: the same images, each moved by its own seeded shift and rotation; or the
same category without its masks (``image_level_copy``).

A lever that assumes something about the data must be checked where the assumption fails. Per-cell calibration
and position-conditioned flows assume that a part sits at the same place in every image: true for KolektorSDD's
commutators, false for unaligned objects (held-out tyres, DeepPCB's board regions). ``shifted_rotated_copy`` makes
an unaligned twin of any MVTec-style category: every image (train, test) is rotated by an angle drawn uniformly in
``[-max_angle, max_angle]`` degrees and shifted by up to ``max_shift`` of its size in each direction, the
uncovered corners filled with the image's median colour; each mask moves with its image (nearest neighbour, filled
with 0). The draw is seeded by the image's relative path, so a copy is reproducible and independent of file order.

    .venv/bin/python -m benchmarks.stress_data ../shared/data/kolektorsdd/commutator /tmp/kolektor-shifted
"""

from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MASK_SUFFIX = "_mask"


def _motion(relative: str, seed: int, max_shift: float, max_angle: float) -> tuple[float, float, float]:
    """(angle in degrees, x shift, y shift as fractions of the size), drawn from the path and the seed."""
    digest = hashlib.sha256(f"{seed}:{relative}".encode()).digest()
    draw = random.Random(int.from_bytes(digest[:8], "big"))
    return (draw.uniform(-max_angle, max_angle), draw.uniform(-max_shift, max_shift),
            draw.uniform(-max_shift, max_shift))


def _moved(image: Image.Image, motion: tuple[float, float, float], mask: bool) -> Image.Image:
    angle, dx, dy = motion
    shift = (round(dx * image.width), round(dy * image.height))
    if mask:
        return image.rotate(angle, resample=Image.Resampling.NEAREST, translate=shift, fillcolor=0)
    median = tuple(int(v) for v in np.median(np.asarray(image).reshape(-1, len(image.getbands())), axis=0))
    fill = median[0] if len(median) == 1 else median
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, translate=shift, fillcolor=fill)


def shifted_rotated_copy(source: Path, target: Path, seed: int = 0, max_shift: float = 0.15,
                         max_angle: float = 180.0) -> Path:
    """Write the moved twin of the category ``source`` to ``target`` (same layout and names); returns ``target``.

    A mask ``ground_truth/<defect>/<stem>_mask.png`` moves exactly as the image ``test/<defect>/<stem>.*``.
    """
    if not (source / "train").is_dir():
        raise SystemExit(f"{source}: not a category folder (no train/)")
    for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = path.relative_to(source)
        is_mask = relative.parts[0] == "ground_truth"
        if is_mask:  # the motion of the image it belongs to
            stem = path.stem.removesuffix(MASK_SUFFIX)
            images = list((source / "test" / relative.parts[1]).glob(stem + ".*"))
            if not images:
                raise SystemExit(f"{path}: no image test/{relative.parts[1]}/{stem}.* for this mask")
            key = str(images[0].relative_to(source))
        else:
            key = str(relative)
        out = target / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            _moved(image, _motion(key, seed, max_shift, max_angle), is_mask).save(out)
    return target


def image_level_copy(source: Path, target: Path) -> Path:
    """The category ``source`` without its masks, at ``target`` (its other folders linked, not copied): an
    image-level category, whose anomalies ``bgad_core.data.datasets.load_mask`` marks whole, so that a labelled
    anomaly teaches what an image-level label does and its RandAugmented CutPaste rows paste whole images
    (``bgad_core.data.racp``). Record ids are the same as ``source``'s, so the same seeds draw the same splits."""
    if not (source / "train").is_dir():
        raise SystemExit(f"{source}: not a category folder (no train/)")
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != "ground_truth":
            (target / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an MVTec-style category folder (train/, test/, ground_truth/)")
    parser.add_argument("target", type=Path, help="where to write the moved copy (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image motions")
    parser.add_argument("--max-shift", type=float, default=0.15, help="largest shift, as a fraction of the size")
    parser.add_argument("--max-angle", type=float, default=180.0, help="largest rotation, in degrees either way")
    args = parser.parse_args()
    print(shifted_rotated_copy(args.source, args.target, args.seed, args.max_shift, args.max_angle))


if __name__ == "__main__":
    main()
