"""The PatchCore family behind the detector contract: config, one-pass training on normals, validation, resumable
state, checkpoints, and an ONNX graph that scores like PyTorch in any batch."""

from __future__ import annotations

import io
import json
import math

import onnxruntime
import pytest
import torch

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError
from bgad_core.models.base import ONE_CLASS, Evaluation, split_metrics
from bgad_core.models.patchcore import FAMILY, PatchCore, PatchCoreConfig, PatchCoreDetector, PatchCoreTraining
from bgad_core.models.components import memory_bank
from detector_checks import (assert_fp16_scores_in_float32_in_any_batch, assert_onnx_scores_like_pytorch,
                             exported_session)

STRIDES = [4, 8, 16]  # the backbone's levels; the default config reads 8 and 16, i.e. levels 1 and 2
SIZE = (64, 64)
SMALL_CHUNK = 50  # query patches per eager distance block in the export tests: a batch of 2 is 3 blocks


def feature_set(n: int, seed: int, labels: list[int] | None = None, pixel_masks: bool = False) -> FeatureSet:
    """``n`` random rows with levels of strides 4, 8, 16 on a 64 x 64 image; anomalous rows' pixel masks mark
    pixels 8-16 (where ``with_defects`` puts their defect)."""
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(n, c, 64 // s, 64 // s, generator=generator) for c, s in zip((4, 8, 16), STRIDES)]
    label_tensor = torch.tensor(labels if labels is not None else [0] * n)
    masks = None
    if pixel_masks:
        masks = torch.zeros(n, *SIZE, dtype=torch.uint8)
        masks[label_tensor == 1, 8:16, 8:16] = 1
    return FeatureSet(features, [torch.zeros(n, f.shape[2], f.shape[3]) for f in features], label_tensor,
                      [str(i) for i in range(n)], masks)


def with_defects(split: FeatureSet) -> FeatureSet:
    """Anomalous rows (label 1) get a far-off block at pixels 8-16, where their pixel masks say."""
    features = [f.clone() for f in split.features]
    anomalous = split.labels == 1
    features[1][anomalous, :, 1:2, 1:2] += 20.0  # stride 8: cell (1, 1) covers pixels 8-16
    return FeatureSet(features, split.masks, split.labels, split.ids, split.pixel_masks)


def fitted(config: PatchCoreConfig | None = None, train: FeatureSet | None = None) -> PatchCoreTraining:
    training = PatchCoreTraining(config or PatchCoreConfig(coreset_ratio=0.25), train or feature_set(6, 0),
                                 STRIDES, "cpu")
    training.train_meta_epoch()
    return training


# ------------------------------------------------------------------------------------------------------- config


def test_config_accepts_lists_and_round_trips_through_json():
    config = PatchCoreConfig.from_dict({"feature_strides": [8, 16, 32], "coreset_ratio": 0.1, "meta_epochs": 4})
    assert config.feature_strides == (8, 16, 32)
    assert PatchCoreConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(("values", "message"), [
    ({"feature_strides": []}, "feature_strides"),
    ({"feature_strides": [8, 8]}, "feature_strides"),
    ({"feature_strides": [0, 8]}, "feature_strides"),
    ({"coreset_ratio": 0.0}, "coreset_ratio"),
    ({"coreset_ratio": 1.5}, "coreset_ratio"),
    ({"num_neighbors": 0}, "num_neighbors"),
    ({"blur_sigma": -0.5}, "blur_sigma"),
    ({"meta_epochs": 0}, "meta_epochs"),
    ({"levels": [0, 1]}, "levels"),  # the module's name for them; the family config speaks strides
])
def test_bad_config_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        PatchCoreConfig.from_dict(values)


def test_the_family_is_one_class_single_pass_and_builds_its_training():
    assert (FAMILY.name, FAMILY.learning_type, FAMILY.single_pass) == ("patchcore", ONE_CLASS, True)
    assert FAMILY.parameters() == {"feature_strides", "coreset_ratio", "num_neighbors", "blur_sigma", "meta_epochs", "seed"}
    assert FAMILY.config is PatchCoreConfig and FAMILY.detector is PatchCoreDetector
    assert isinstance(FAMILY.training(PatchCoreConfig(), feature_set(2, 0), STRIDES, "cpu"), PatchCoreTraining)


# ----------------------------------------------------------------------------------------------------- training


def test_a_stride_the_backbone_lacks_or_no_normal_image_is_refused():
    with pytest.raises(ConfigError, match=r"stride 32 is not among the backbone's \[4, 8, 16\]"):
        PatchCoreTraining(PatchCoreConfig(feature_strides=(8, 32)), feature_set(2, 0), STRIDES, "cpu")
    with pytest.raises(ConfigError, match="no normal image"):
        PatchCoreTraining(PatchCoreConfig(), feature_set(2, 0, labels=[1, 1]), STRIDES, "cpu")
    with pytest.raises(RuntimeError, match="train_meta_epoch"):
        PatchCoreTraining(PatchCoreConfig(), feature_set(2, 0), STRIDES, "cpu").validate(feature_set(2, 1), SIZE, "")


def test_one_meta_epoch_fits_the_bank_on_the_normal_rows_alone():
    normal = feature_set(4, 0)
    poisoned = feature_set(2, 1, labels=[1, 1])
    poisoned.features = [torch.full_like(f, math.nan) for f in poisoned.features]  # read, they would poison the bank
    config = PatchCoreConfig(coreset_ratio=0.25, meta_epochs=4)
    training = PatchCoreTraining(config, FeatureSet.concat([poisoned, normal]), STRIDES, "cpu")
    assert training.meta_epochs == 1 and training.first_selectable_epoch == 1
    log = training.train_meta_epoch()
    assert math.isnan(log["loss"]) and log["phase"] == 1.0 and log["fit_seconds"] >= 0.0
    assert training.epoch == 1 and training.levels == [1, 2]
    expected = PatchCore(levels=[1, 2], coreset_ratio=0.25).fit(normal).memory_bank
    assert torch.equal(training.memory_bank, expected)
    assert training.memory_bank.shape == (4 * 64 // 4, 8 + 16)  # a quarter of the stride-8 8 x 8 grids


def test_validation_scores_the_split_like_the_bare_module_and_finds_the_defects():
    train = feature_set(6, 0)
    val = with_defects(feature_set(6, 1, labels=[0, 1, 0, 1, 0, 1], pixel_masks=True))
    evaluation = fitted(PatchCoreConfig(coreset_ratio=0.25, blur_sigma=1.0), train).validate(val, SIZE, "aupro")
    assert isinstance(evaluation, Evaluation) and evaluation.choices == {}
    assert evaluation.scores.shape == (6,) and evaluation.maps.shape == (6, *SIZE)
    assert evaluation.metrics == pytest.approx(split_metrics(val, evaluation.scores, evaluation.maps), nan_ok=True)
    assert evaluation.metrics["image_auroc"] == 1.0 and evaluation.metrics["pixel_auroc"] > 0.9
    detector = evaluation.detector
    assert isinstance(detector, PatchCoreDetector)
    assert detector.image_size == SIZE and detector.levels == (1, 2) and detector.model.blur_sigma == 1.0
    bare = PatchCore(levels=[1, 2], coreset_ratio=0.25, blur_sigma=1.0).fit(train)
    distance, scores = bare.patch_scores(val.features)  # the plain module, without the detector around it
    torch.testing.assert_close(evaluation.scores, scores)
    torch.testing.assert_close(evaluation.maps, bare.anomaly_maps(distance, SIZE))


def test_a_resumed_training_validates_with_the_saved_bank_without_fitting_again():
    val = feature_set(3, 5, labels=[0, 1, 0])
    original = fitted()
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = PatchCoreTraining(PatchCoreConfig(coreset_ratio=0.25), feature_set(6, 99), STRIDES, "cpu")  # other data
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    torch.testing.assert_close(resumed.validate(val, SIZE, "").scores, original.validate(val, SIZE, "").scores,
                               rtol=0, atol=0)

    unfitted = PatchCoreTraining(PatchCoreConfig(), feature_set(2, 0), STRIDES, "cpu")
    unfitted.load_state_dict(unfitted.state_dict())
    assert unfitted.state_dict() == {"epoch": 0}
    other_backbone = PatchCoreTraining(PatchCoreConfig(coreset_ratio=0.25), feature_set(6, 0), [8, 16, 32], "cpu")
    with pytest.raises(ConfigError, match=r"fitted on levels \[1, 2\].*reads levels \[0, 1\]"):
        other_backbone.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------- detector


def test_the_checkpoint_loads_with_weights_only_and_scores_identically():
    detector = fitted().validate(feature_set(2, 1, labels=[0, 1]), SIZE, "").detector
    buffer = io.BytesIO()
    torch.save(detector.to_checkpoint(), buffer)
    buffer.seek(0)
    entry = torch.load(buffer, weights_only=True)
    assert entry["levels"] == [1, 2] and entry["config"]["coreset_ratio"] == 0.25
    loaded = PatchCoreDetector.from_checkpoint(entry, SIZE)
    assert not loaded.training and loaded.config == detector.config
    features = feature_set(3, 2).features
    for got, expected in zip(loaded(features), detector(features)):
        assert torch.equal(got, expected)


def test_fp16_features_score_in_float32_and_the_same_in_any_batch():
    detector = fitted().validate(feature_set(2, 1, labels=[0, 1]), SIZE, "").detector
    assert_fp16_scores_in_float32_in_any_batch(detector, feature_set(4, 3).features, SIZE)


@pytest.fixture(scope="module")
def exported() -> tuple[PatchCoreDetector, onnxruntime.InferenceSession]:
    """A tiny fitted detector (it reads levels of 8 and 16 channels at 8 x 8 and 4 x 4; num_neighbors 9, blur
    sigma 4) and its graph, traced with a batch of 2 and a dynamic batch axis, with distance blocks small enough
    that an eager call of that batch would be split (the traced call must not be)."""
    detector = fitted().validate(feature_set(2, 1, labels=[0, 1]), SIZE, "").detector
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory_bank, "DISTANCE_CHUNK", SMALL_CHUNK)
        return detector, exported_session(detector, feature_set(2, 7).features)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_scores_like_pytorch(exported, batch, monkeypatch):
    detector, session = exported
    monkeypatch.setattr(memory_bank, "DISTANCE_CHUNK", SMALL_CHUNK)  # PyTorch scores in blocks, the graph in one
    assert [i.shape for i in session.get_inputs()] == [["batch", 8, 8, 8], ["batch", 16, 4, 4]]
    assert_onnx_scores_like_pytorch(session, detector, feature_set(batch, 10 + batch).features, (1, 2), SIZE)
