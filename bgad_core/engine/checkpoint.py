"""A self-describing checkpoint: everything needed to rebuild the scorer, loadable with ``weights_only=True``.

Only tensors, numbers, strings, lists and dicts go in, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.bgad.scoring import Normalization
from bgad_core.models.bgad.training import TrainConfig

CHECKPOINT_VERSION = 1


def make_checkpoint(
    model: BGADFlows,
    config: TrainConfig,
    backbone: dict[str, Any],
    image_size: tuple[int, int],
    normalization: Normalization,
    threshold: float,
    metrics: dict[str, float],
    epoch: int,
) -> dict[str, Any]:
    """Assemble the checkpoint dict (flows on the CPU, plain Python values elsewhere)."""
    return {
        "version": CHECKPOINT_VERSION,
        "flows": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "channels": list(model.channels),
        "train_config": config.to_dict(),
        "backbone": dict(backbone),
        "image_size": list(image_size),
        "normalization": normalization.to_dict(),
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
    """Read a checkpoint safely (``weights_only=True``) and check its format version."""
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    version = checkpoint.get("version") if isinstance(checkpoint, dict) else None
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a bgad checkpoint of version {CHECKPOINT_VERSION} (found {version!r})")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[BGADFlows, TrainConfig, Normalization]:
    """Rebuild the flows (in eval mode), their training config and the scoring constants."""
    # options a checkpoint predates take the value its model was trained and scored with, not today's default
    predates = {"local_aggregation": 1, "calibration": "level", "coarse_level_weight": 1.0, "condition_on_position": True,
                "image_score": "max"}
    config = TrainConfig.from_dict({**predates, **checkpoint["train_config"]})
    model = BGADFlows.from_config(checkpoint["channels"], config)
    model.load_state_dict(checkpoint["flows"])
    # a checkpoint from before the weight and the reduction were stored with the constants kept them in its config
    weight, reduction = config.coarse_level_weight, config.image_score
    normalization = Normalization.from_dict(checkpoint["normalization"], 1.0 if weight == "auto" else float(weight),
                                            "max" if reduction == "auto" else reduction)
    return model.eval(), config, normalization
