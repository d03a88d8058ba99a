"""A self-describing checkpoint: everything needed to rebuild the detector, loadable with ``weights_only=True``.

Only tensors, numbers, strings, lists and dicts go in, so loading never unpickles arbitrary objects. Version 2 names
the detector family and holds the detector's own entry (``Detector.to_checkpoint``); version 1 (BGAD only, written
before families existed) is upgraded on load, so old checkpoints and registered versions keep serving.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bgad_core.models.base import Detector
from bgad_core.models.registry import family

CHECKPOINT_VERSION = 2
_V1_DETECTOR_KEYS = {"flows": "flows", "channels": "channels", "train_config": "config", "normalization": "normalization"}


def make_checkpoint(
    detector: Detector,
    backbone: Mapping[str, Any],
    threshold: float,
    metrics: Mapping[str, float],
    epoch: int,
) -> dict[str, Any]:
    """Assemble the checkpoint dict of a detector (its tensors on the CPU, plain Python values elsewhere).

    ``backbone``: name, strides, weights digest and source, normalisation, feature dtype and ``channels`` (each
    level's width, which ``Scorer`` checks against the backbone it is given).
    """
    return {
        "version": CHECKPOINT_VERSION,
        "family": detector.family,
        "detector": detector.to_checkpoint(),
        "backbone": dict(backbone),
        "image_size": list(detector.image_size),
        "threshold": float(threshold),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "epoch": int(epoch),
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temporary file, then rename) so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``), upgrading a version-1 one; other versions are refused."""
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    version = checkpoint.get("version") if isinstance(checkpoint, dict) else None
    if version == 1:
        return upgrade_v1(checkpoint)
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a bgad checkpoint of version 1 or {CHECKPOINT_VERSION} (found {version!r})")
    return checkpoint


def upgrade_v1(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 checkpoint (BGAD flows, their config and constants at the top level) in version 2's form."""
    detector = {new: checkpoint[old] for old, new in _V1_DETECTOR_KEYS.items()}
    rest = {k: v for k, v in checkpoint.items() if k not in _V1_DETECTOR_KEYS}
    backbone = {**checkpoint["backbone"], "channels": list(checkpoint["channels"])}
    return {**rest, "version": CHECKPOINT_VERSION, "family": "bgad", "detector": detector, "backbone": backbone}


def detector_from_checkpoint(checkpoint: Mapping[str, Any]) -> Detector:
    """Rebuild the checkpoint's detector (in eval mode) through its family."""
    size = checkpoint["image_size"]
    return family(checkpoint["family"]).detector.from_checkpoint(checkpoint["detector"], (int(size[0]), int(size[1])))


def checkpoint_config(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The family config the checkpoint's detector was trained with, with its family: what a summary shows."""
    return {"family": checkpoint["family"], **checkpoint["detector"].get("config", {})}
