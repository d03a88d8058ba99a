"""Checkpoints: a version-1 file, written before detector families, still loads and serves exactly as the
version-2 checkpoint of the same model does."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bgad_core.backbone import FeatureExtractor
from bgad_core.engine.checkpoint import (CHECKPOINT_VERSION, checkpoint_config, detector_from_checkpoint,
                                         load_checkpoint, make_checkpoint, save_checkpoint)
from bgad_core.engine.inference import Scorer
from bgad_core.engine.selection import seed_everything
from bgad_core.errors import ConfigError
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.detector import BGADDetector
from bgad_core.models.bgad.scoring import Normalization
from bgad_core.models.bgad.torch_model import BGADFlows

IMAGE_SIZE = (64, 64)
STRIDES = (8, 16)
# the fields of the training config a version-1 checkpoint stored (``TrainConfig.to_dict()`` then), as written
V1_TRAIN_CONFIG_KEYS = (
    "beta", "tau", "normalizer", "bgspp_lambda", "focal_weighting", "lr", "meta_epochs", "sub_epochs", "normal_epochs",
    "warmup_epochs", "fiber_batch", "cells_per_step", "abnormal_ratio", "abnormal_fraction", "push_fraction",
    "coupling_blocks", "clamp", "cond_dim", "condition_on_position", "local_aggregation", "calibration",
    "coarse_level_weight", "blur_sigma", "image_score", "precision", "seed",
)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("tf_efficientnet_lite0", "random", STRIDES)


def images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, *IMAGE_SIZE, 3), dtype=torch.uint8, generator=generator)


def trained_like_detector(extractor: FeatureExtractor, config: BGADConfig) -> BGADDetector:
    """Flows moved off their identity-like start, with per-cell constants measured on some images: nothing trivial."""
    seed_everything(0)
    flows = BGADFlows.from_config(list(extractor.channels), config)
    with torch.no_grad():
        for parameter in flows.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    flows.eval()
    with torch.no_grad():
        features = [f.to(torch.float16) for f in extractor.extract(images(6, seed=1))]
        normalization = Normalization.fit(flows(features), "position")
    normalization = replace(normalization, coarse_level_weight=2.0, image_score="top1pct_mean")
    return BGADDetector(flows, normalization, config.blur_sigma, IMAGE_SIZE, config).eval()


def backbone_info(extractor: FeatureExtractor) -> dict:
    """What ``bgad_core.train`` describes the backbone with (version 1: without the channels)."""
    return {"name": extractor.name, "weights_source": extractor.weights_source,
            "weights_digest": extractor.weights_digest, "strides": list(extractor.strides),
            "mean": list(extractor.mean), "std": list(extractor.std)}


def v1_checkpoint(detector: BGADDetector, backbone: dict, threshold: float, metrics: dict, epoch: int,
                  predates_choices: bool) -> dict:
    """The dict the version-1 ``make_checkpoint(model, config, backbone, image_size, normalization, threshold,
    metrics, epoch)`` wrote. ``predates_choices``: as written before the coarse-level weight and the image-score
    reduction were stored with the scoring constants (the training config held them, fixed)."""
    config = detector.config
    normalization = detector.normalization.to_dict()
    if predates_choices:
        del normalization["coarse_level_weight"], normalization["image_score"]
    return {
        "version": 1,
        "flows": {k: v.detach().cpu() for k, v in detector.flows.state_dict().items()},
        "channels": list(detector.flows.channels),
        "train_config": {key: getattr(config, key) for key in V1_TRAIN_CONFIG_KEYS},
        "backbone": dict(backbone),
        "image_size": list(detector.image_size),
        "normalization": normalization,
        "threshold": float(threshold),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "epoch": int(epoch),
    }


@pytest.mark.parametrize("predates_choices", [False, True])
def test_a_version_1_checkpoint_scores_as_the_version_2_checkpoint_of_the_same_model(extractor, tmp_path,
                                                                                       predates_choices):
    # "auto" scoring in the current format; the older version-1 files held the fixed choice in their config
    choices = {"coarse_level_weight": 2.0, "image_score": "top1pct_mean"} if predates_choices else {}
    # version 1 predates nearest-normal distances: its models scored their map, of the likelihoods alone
    config = BGADConfig(coupling_blocks=2, cond_dim=16, blur_sigma=2.0, nearest_normal_weight=0.0,
                        image_score_map="anomaly_map", **choices)
    detector = trained_like_detector(extractor, config)
    backbone, metrics = backbone_info(extractor), {"val_image_auroc": 0.9, "val_aupro": 0.7}
    v2_path = save_checkpoint(make_checkpoint(detector, {**backbone, "channels": list(extractor.channels)}, 3.5,
                                              metrics, 4), tmp_path / "v2" / "model.pt")
    v1_path = tmp_path / "v1" / "model.pt"
    v1_path.parent.mkdir()
    torch.save(v1_checkpoint(detector, backbone, 3.5, metrics, 4, predates_choices), v1_path)

    old, new = load_checkpoint(v1_path), load_checkpoint(v2_path)
    assert old["version"] == new["version"] == CHECKPOINT_VERSION and old["family"] == new["family"] == "bgad"
    assert old["backbone"] == new["backbone"]  # the channels moved into the backbone's description
    assert (old["image_size"], old["threshold"], old["metrics"], old["epoch"]) == (
        new["image_size"], new["threshold"], new["metrics"], new["epoch"])
    assert checkpoint_config(new) == {"family": "bgad", **config.to_dict()}
    assert checkpoint_config(old) == {"family": "bgad", **{key: getattr(config, key) for key in V1_TRAIN_CONFIG_KEYS}}
    restored = detector_from_checkpoint(old)
    assert restored.normalization.describe() == detector.normalization.describe()
    assert restored.config == config

    old_scorer, new_scorer = Scorer(old, extractor), Scorer(new, extractor)
    assert (old_scorer.image_size, old_scorer.threshold, old_scorer.family) == (IMAGE_SIZE, 3.5, "bgad")
    batch = images(5, seed=2)
    with torch.no_grad():
        old_scores, old_maps = old_scorer(batch)
        new_scores, new_maps = new_scorer(batch)
        direct_scores, _ = detector([f.to(torch.float16) for f in extractor.extract(batch)])
    assert torch.equal(old_scores, new_scores) and torch.equal(old_maps, new_maps)
    assert torch.equal(new_scores, direct_scores)
    assert float(new_scores.max() - new_scores.min()) > 0  # the images score differently: the comparison says much


def test_a_version_1_checkpoint_keeps_its_backbone_channel_check(extractor, tmp_path):
    config = BGADConfig(coupling_blocks=2, cond_dim=16)
    checkpoint = v1_checkpoint(trained_like_detector(extractor, config), backbone_info(extractor), 0.0, {}, 1, False)
    checkpoint["channels"] = [c + 1 for c in checkpoint["channels"]]
    torch.save(checkpoint, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="backbone channels .* differ from the"):
        Scorer(load_checkpoint(tmp_path / "model.pt"), extractor)


def test_other_versions_are_refused(tmp_path):
    torch.save({"version": 3}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"not a bgad checkpoint of version 1 or 2 \(found 3\)"):
        load_checkpoint(Path(tmp_path / "model.pt"))
