"""BGAD's nearest-normal weight: validation weighs PatchCore's evidence in where the flows miss, and a detector that
uses it keeps, serves and exports its memory bank."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bgad_core.data.features import FeatureSet
from bgad_core.engine.checkpoint import detector_from_checkpoint, make_checkpoint
from bgad_core.errors import ConfigError
from bgad_core.models.base import evaluate
from bgad_core.models.bgad import BGADConfig, BGADDetector, BGADFlows, BGADTraining
from bgad_core.models.bgad.scoring_choice import choose_scoring
from detector_checks import (assert_fp16_scores_in_float32_in_any_batch, assert_onnx_scores_like_pytorch,
                             exported_session)

SIZE = (32, 32)


def split(n_normal: int, n_abnormal: int, seed: int) -> FeatureSet:
    """Two levels (8 x 8 and 4 x 4 cells); each anomaly is one fine cell far from every normal one, masked."""
    generator = torch.Generator().manual_seed(seed)
    n = n_normal + n_abnormal
    features = [torch.randn(n, 6, 8, 8, generator=generator), torch.randn(n, 6, 4, 4, generator=generator)]
    features[0][n_normal:, :, 2, 5] += 8.0
    pixel_masks = torch.zeros(n, *SIZE, dtype=torch.uint8)
    pixel_masks[n_normal:, 8:12, 20:24] = 1
    return FeatureSet(features, [torch.zeros(n, 8, 8), torch.zeros(n, 4, 4)],
                      torch.tensor([0] * n_normal + [1] * n_abnormal), [f"{seed}-{i}" for i in range(n)],
                      pixel_masks=pixel_masks)


def test_validation_weighs_distances_in_where_the_likelihoods_see_nothing():
    """Log-likelihood maps of pure noise cannot find the defect; the distances can, and validation takes them."""
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, local_aggregation=1)
    training = BGADTraining(BGADFlows.from_config([6, 6], config), config, split(24, 0, seed=0))
    val = split(8, 8, seed=1)
    noise = [torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(2)), torch.randn(16, 4, 4)]
    fits = training.fit_normalizations(("level",))
    alone = choose_scoring(noise, val, fits, (1.0,), ("max",), SIZE, 1.0, "aupro")
    chosen = choose_scoring(noise, val, fits, (1.0,), ("max",), SIZE, 1.0, "aupro", (0.0, 0.5, 1.0),
                            training.nearest_distances(val))
    assert chosen.normalization.nearest_normal_weight > 0
    assert chosen.metrics["aupro"] > alone.metrics["aupro"] + 0.2 and chosen.metrics["image_auroc"] == 1.0
    assert training.nearest_distances(val) is training.nearest_distances(val)  # computed once per split


@pytest.fixture(scope="module")
def detector() -> BGADDetector:
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, nearest_normal_weight=0.5)
    training = BGADTraining(BGADFlows.from_config([6, 6], config), config, split(24, 0, seed=0))
    training.train_meta_epoch()
    evaluation = training.validate(split(8, 8, seed=1), SIZE, "aupro")
    assert evaluation.choices["nearest_normal_weight"] == 0.5 and evaluation.detector.nearest is not None
    return evaluation.detector.eval()


def test_a_detector_with_distances_keeps_its_bank_through_a_checkpoint(detector):
    test = split(4, 4, seed=3)
    restored = detector_from_checkpoint(make_checkpoint(detector, {}, 0.0, {}, 1))
    assert isinstance(restored, BGADDetector) and restored.normalization.nearest_normal_weight == 0.5
    torch.testing.assert_close(evaluate(restored, test).maps, evaluate(detector, test).maps)
    without = replace(detector.normalization, nearest_normal_weight=0.0)
    plain = BGADDetector(detector.flows, without, detector.blur_sigma, SIZE, detector.config, detector.nearest)
    assert plain.nearest is None and "nearest_normal" not in plain.to_checkpoint()  # kept only where it is used
    with pytest.raises(ConfigError, match="needs the memory bank"):
        BGADDetector(detector.flows, detector.normalization, detector.blur_sigma, SIZE, detector.config)


def test_a_detector_with_distances_scores_in_float32_in_any_batch_and_exports_as_it_scores(detector):
    features = split(3, 1, seed=4).features
    assert_fp16_scores_in_float32_in_any_batch(detector, features, SIZE)
    session = exported_session(detector, split(2, 0, seed=5).features)
    assert_onnx_scores_like_pytorch(session, detector, features, [0, 1], SIZE)


@pytest.mark.parametrize("bad", ["sometimes", -0.1, 1.5, True])
def test_nearest_normal_weight_is_auto_or_a_share(bad):
    assert BGADConfig(nearest_normal_weight="0.5").nearest_normal_weight == 0.5  # as a command line gives it
    with pytest.raises(ConfigError, match=r"nearest_normal_weight must be 'auto' or a number in \[0, 1\], got"):
        BGADConfig(nearest_normal_weight=bad)
