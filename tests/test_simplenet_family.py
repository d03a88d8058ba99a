"""The SimpleNet family behind the detector contract: config, seeded training in one-class and few-shot mode,
validation, resumable state, checkpoints, and an ONNX graph that scores like PyTorch in any batch.

The family is built from its package directly (``bgad_core.models.simplenet.FAMILY``), not from the registry:
it needs nothing outside its folder but the registry's one entry."""

from __future__ import annotations

import copy
import io
import json
import math

import onnxruntime
import pytest
import torch

from bgad_core.data.features import FeatureSet, mask_to_grid
from bgad_core.errors import ConfigError, TrainingDivergedError
from bgad_core.models.base import FEW_SHOT, Evaluation, split_metrics
from bgad_core.models.components.cells import patch_embeddings
from bgad_core.models.simplenet import FAMILY, SimpleNet, SimpleNetConfig, SimpleNetDetector, SimpleNetTraining
from bgad_core.models.simplenet.training import most_anomalous_cells
from detector_checks import (assert_fp16_scores_in_float32_in_any_batch, assert_onnx_scores_like_pytorch,
                             exported_session)

STRIDES = [4, 8, 16]  # the backbone's levels; the default config reads 8 and 16, i.e. levels 1 and 2
SIZE = (64, 64)
DEFECT = (slice(16, 32), slice(16, 32))  # pixels of the planted defect: cells 2-3 of the stride-8 level
SHIFT = 2.0  # the planted defect: +SHIFT on 4 of the 8 stride-8 channels, within the spread of the normal values
TINY = {"discriminator_hidden": 32, "batch_size": 256, "sub_epochs": 1, "noise_std": 0.1, "lr": 3e-3,
        "blur_sigma": 1.0}  # 3 steps a meta-epoch


def feature_set(n: int, seed: int, labels: list[int] | None = None, image_level: bool = False) -> FeatureSet:
    """``n`` random rows with levels of strides 4, 8, 16 on a 64 x 64 image. Anomalous rows (label 1) have the
    planted defect at ``DEFECT`` and a mask saying so, or with ``image_level`` a mask covering the whole image."""
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(n, c, 64 // s, 64 // s, generator=generator) for c, s in zip((4, 8, 16), STRIDES)]
    label_tensor = torch.tensor(labels if labels is not None else [0] * n)
    anomalous = label_tensor == 1
    features[1][anomalous, :4, 2:4, 2:4] += SHIFT
    pixel_masks = torch.zeros(n, *SIZE, dtype=torch.uint8)
    pixel_masks[anomalous, DEFECT[0], DEFECT[1]] = 1
    if image_level:
        pixel_masks[anomalous] = 1
    masks = [mask_to_grid(pixel_masks, (f.shape[2], f.shape[3])) for f in features]
    return FeatureSet(features, masks, label_tensor, [str(i) for i in range(n)], pixel_masks)


def train_set(image_level: bool = False) -> FeatureSet:
    """8 normal rows and 3 labelled anomalies."""
    return FeatureSet.concat([feature_set(8, 0), feature_set(3, 1, [1, 1, 1], image_level)])


def trained(epochs: int = 1, train: FeatureSet | None = None, **values: object) -> SimpleNetTraining:
    """A training of the ``TINY`` config (with ``values``) after ``epochs`` meta-epochs on ``train``."""
    config = SimpleNetConfig(**{**TINY, "meta_epochs": epochs, **values})
    training = SimpleNetTraining(config, train if train is not None else train_set(), STRIDES, "cpu")
    for _ in range(epochs):
        training.train_meta_epoch()
    return training


def weights(training: SimpleNetTraining) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in training.model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------- config


def test_config_accepts_lists_and_round_trips_through_json():
    config = SimpleNetConfig.from_dict({"feature_strides": [8, 16, 32], "adaptor_dim": 64, "use_anomalies": False})
    assert config.feature_strides == (8, 16, 32)
    assert SimpleNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    defaults = SimpleNetConfig()
    assert (defaults.adaptor_dim, defaults.discriminator_hidden, defaults.normal_margin, defaults.anomaly_margin,
            defaults.blur_sigma) == (None, 1024, 0.5, 0.5, 4.0)  # the paper's
    assert defaults.noise_std == 0.3  # on standardised features; the paper's 0.015 trains nothing on lite0's


@pytest.mark.parametrize(("values", "message"), [
    ({"feature_strides": []}, "feature_strides"),
    ({"feature_strides": [8, 8]}, "feature_strides"),
    ({"feature_strides": [0, 8]}, "feature_strides"),
    ({"adaptor_dim": -1}, "adaptor_dim"),
    ({"adaptor_dim": 1.5}, "adaptor_dim"),
    ({"discriminator_hidden": 0}, "discriminator_hidden"),
    ({"noise_std": 0.0}, "noise_std"),
    ({"lr": -1e-4}, "lr"),
    ({"lr": math.nan}, "lr"),
    ({"meta_epochs": 0}, "meta_epochs"),
    ({"sub_epochs": 0}, "sub_epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"normal_margin": 0.0}, "normal_margin"),
    ({"anomaly_margin": -0.5}, "anomaly_margin"),
    ({"abnormal_fraction": 0.0}, "abnormal_fraction"),
    ({"push_fraction": 1.5}, "push_fraction"),
    ({"blur_sigma": -1.0}, "blur_sigma"),
    ({"coreset_ratio": 0.1}, "coreset_ratio"),  # another family's key
])
def test_bad_config_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        SimpleNetConfig.from_dict(values)


def test_the_family_is_few_shot_and_builds_its_training():
    assert (FAMILY.name, FAMILY.learning_type, FAMILY.single_pass) == ("simplenet", FEW_SHOT, False)
    assert FAMILY.parameters() == {
        "feature_strides", "adaptor_dim", "discriminator_hidden", "noise_std", "lr", "meta_epochs", "sub_epochs",
        "batch_size", "normal_margin", "anomaly_margin", "use_anomalies", "abnormal_fraction", "push_fraction",
        "blur_sigma", "seed"}
    assert FAMILY.config is SimpleNetConfig and FAMILY.detector is SimpleNetDetector
    training = FAMILY.training(SimpleNetConfig(meta_epochs=3), feature_set(2, 0), STRIDES, "cpu")
    assert isinstance(training, SimpleNetTraining)
    assert (training.meta_epochs, training.first_selectable_epoch, training.epoch, training.levels) == (3, 1, 0, [1, 2])
    assert training.model.width == 8 + 16  # the square adaptor on the embedding's width


# ----------------------------------------------------------------------------------------------------- training


def test_a_stride_the_backbone_lacks_or_no_normal_image_is_refused():
    with pytest.raises(ConfigError, match=r"stride 32 is not among the backbone's \[4, 8, 16\]"):
        SimpleNetTraining(SimpleNetConfig(feature_strides=(8, 32)), feature_set(2, 0), STRIDES, "cpu")
    with pytest.raises(ConfigError, match="no normal image"):
        SimpleNetTraining(SimpleNetConfig(), feature_set(2, 0, labels=[1, 1]), STRIDES, "cpu")


def test_training_is_seeded():
    first, second = trained(), trained()
    assert same_weights(weights(first), weights(second))
    assert first.state_dict()["generator"].equal(second.state_dict()["generator"])
    assert not same_weights(weights(first), weights(trained(seed=1)))


def test_the_features_scale_does_not_change_what_trains():
    """The embeddings are standardised on the training normals, so a backbone whose features are ten times larger
    trains the same detector: the fixed ``noise_std`` means the same thing for every backbone."""
    train, val = train_set(), feature_set(4, 2, [0, 1] * 2)
    scaled_train, scaled_val = train_set(), feature_set(4, 2, [0, 1] * 2)
    for rows in (scaled_train, scaled_val):
        rows.features = [10 * f for f in rows.features]
    plain, scaled = trained(2, train), trained(2, scaled_train)
    assert not torch.allclose(plain.model.feature_scale, scaled.model.feature_scale)
    plain_scores = plain.validate(val, SIZE, "pixel_auroc").scores
    scaled_scores = scaled.validate(scaled_val, SIZE, "pixel_auroc").scores
    torch.testing.assert_close(scaled_scores, plain_scores, rtol=5e-3, atol=5e-3)  # float rounding only


def test_one_class_never_reads_the_anomalous_rows():
    poisoned = feature_set(3, 1, labels=[1, 1, 1])
    poisoned.features = [torch.full_like(f, math.nan) for f in poisoned.features]  # read, they would poison the loss
    poisoned.masks = [torch.full_like(m, math.nan) for m in poisoned.masks]
    normal = feature_set(8, 0)
    training = trained(train=FeatureSet.concat([poisoned, normal]), use_anomalies=False)
    log = training.train_meta_epoch()
    assert math.isfinite(log["loss"]) and log["phase"] == 1.0 and not training.few_shot
    assert same_weights(weights(training), weights(trained(2, normal, use_anomalies=False)))
    with pytest.raises(TrainingDivergedError, match="meta-epoch 0"):  # few-shot reads them
        trained(train=FeatureSet.concat([poisoned, normal]))


def test_few_shot_learns_a_defect_that_noise_alone_does_not_separate():
    """The planted defect lies within the spread of normal values: what training on noise-made anomalies makes of
    it depends on the seed (pixel AUROC 0.27 to 0.83 over seeds 0-4), while three labelled examples teach the
    discriminator to find it in unseen images (0.79 to 0.97)."""
    val = feature_set(8, 2, [0, 1] * 4)
    one_class = trained(2, use_anomalies=False)
    few_shot = trained(2)
    assert one_class.train_meta_epoch()["phase"] == 1.0 and few_shot.train_meta_epoch()["phase"] == 2.0
    alone = one_class.validate(val, SIZE, "pixel_auroc").metrics["pixel_auroc"]
    labelled = few_shot.validate(val, SIZE, "pixel_auroc").metrics["pixel_auroc"]
    assert alone < 0.75 and labelled > 0.9


def test_image_level_rows_train_the_cells_the_model_finds_most_anomalous():
    cells = torch.arange(8).reshape(2, 4)
    normality = torch.tensor([[0.5, -1.0, 0.2, 0.3], [3.0, 2.0, 1.0, -2.0]])
    assert most_anomalous_cells(cells, normality, 0.25).tolist() == [1, 7]
    assert sorted(most_anomalous_cells(cells, normality, 0.5).tolist()) == [1, 2, 6, 7]
    assert most_anomalous_cells(cells, normality, 0.01).tolist() == [1, 7]  # at least one per image

    train = train_set(image_level=True)  # rows 8-10 are anomalous, their masks cover the whole image
    training = trained(2, train, push_fraction=4 / 64)
    assert training.few_shot and training.abnormal_cells.numel() == 0 and training.candidate_cells.shape == (3, 64)
    with torch.no_grad():  # the current model's anomaly scores of their cells, as the detector computes them
        grids = training.model.eval()(patch_embeddings(train.select([8, 9, 10]).features, training.levels))
    expected = grids.flatten(1).topk(4, dim=1).indices + 64 * torch.arange(8, 11).view(3, 1)
    assert sorted(training._abnormal_cells().tolist()) == sorted(expected.flatten().tolist())

    unmasked = train_set()  # an anomalous row whose mask marks nothing is image-level too, not normal
    unmasked.masks = [torch.zeros_like(m) for m in unmasked.masks]
    training = SimpleNetTraining(SimpleNetConfig(**TINY), unmasked, STRIDES, "cpu")
    assert training.candidate_cells.shape == (3, 64) and len(training.normal_cells) == 8 * 64


def test_validation_follows_the_contract():
    val = feature_set(4, 3, [0, 1, 0, 1])
    training = trained()
    evaluation = training.validate(val, SIZE, "aupro")
    assert isinstance(evaluation, Evaluation) and evaluation.choices == {}
    assert evaluation.scores.shape == (4,) and evaluation.maps.shape == (4, *SIZE)
    assert evaluation.scores.dtype == evaluation.maps.dtype == torch.float32
    assert evaluation.metrics == pytest.approx(split_metrics(val, evaluation.scores, evaluation.maps), nan_ok=True)
    torch.testing.assert_close(evaluation.scores, evaluation.maps.flatten(1).amax(dim=1), rtol=0, atol=0)
    detector = evaluation.detector
    assert isinstance(detector, SimpleNetDetector) and not detector.training
    assert detector.image_size == SIZE and detector.levels == (1, 2) and detector.model is training.model


def test_a_resumed_training_continues_exactly():
    uninterrupted = trained(2)
    interrupted = trained(1, meta_epochs=2)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = SimpleNetTraining(interrupted.config, train_set(), STRIDES, "cpu")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epoch == 1
    resumed.train_meta_epoch()
    assert same_weights(weights(resumed), weights(uninterrupted))


def test_the_score_distribution_shows_the_margins():
    distribution = trained(3).score_distribution()
    assert distribution.boundaries == {"normal_margin": 0.5, "anomaly_margin": -0.5}
    normal_cells = 8 * 64 + 3 * (64 - 4)  # the defect-free cells of the anomalous rows are normal too
    assert distribution.normal.shape == (normal_cells,)
    assert distribution.abnormal.shape == (normal_cells + 3 * 4,)  # synthetic copies, then the real defect cells
    assert distribution.normal.mean() > distribution.abnormal[-12:].mean()
    one_class = trained(1, use_anomalies=False).score_distribution()
    assert one_class.normal.shape == one_class.abnormal.shape == (8 * 64,)  # the synthetic copies alone


# ----------------------------------------------------------------------------------------------------- detector


@pytest.fixture(scope="module")
def detector() -> SimpleNetDetector:
    return trained().validate(feature_set(2, 1, labels=[0, 1]), SIZE, "").detector


@torch.no_grad()
def test_the_checkpoint_loads_with_weights_only_and_scores_identically(detector):
    buffer = io.BytesIO()
    torch.save(detector.to_checkpoint(), buffer)
    buffer.seek(0)
    entry = torch.load(buffer, weights_only=True)
    assert entry["levels"] == [1, 2] and entry["channels"] == 24 and entry["config"]["discriminator_hidden"] == 32
    loaded = SimpleNetDetector.from_checkpoint(entry, SIZE)
    assert not loaded.training and loaded.config == detector.config and loaded.family == "simplenet"
    features = feature_set(3, 2).features
    for got, expected in zip(loaded(features), detector(features)):
        assert torch.equal(got, expected)


@torch.no_grad()
def test_fp16_features_score_in_float32_and_the_same_in_any_batch(detector):
    assert_fp16_scores_in_float32_in_any_batch(detector, feature_set(4, 3).features, SIZE)


@pytest.fixture(scope="module")
def exported(detector) -> onnxruntime.InferenceSession:
    """The detector's graph, traced with a batch of 2 and a dynamic batch axis."""
    return exported_session(detector, feature_set(2, 7).features)


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_onnxruntime_scores_like_pytorch(detector, exported, batch):
    assert not detector.model.training  # the exporter set the wrapper back to training mode, not the detector
    assert [i.shape for i in exported.get_inputs()] == [["batch", 8, 8, 8], ["batch", 16, 4, 4]]
    assert_onnx_scores_like_pytorch(exported, detector, feature_set(batch, 10 + batch).features, (1, 2), SIZE)


def test_the_bare_module_scores_minus_the_discriminator():
    model = SimpleNet(24, adaptor_dim=16, discriminator_hidden=8, generator=torch.Generator().manual_seed(0)).eval()
    embedding = torch.randn(2, 24, 3, 5)
    patches = embedding.permute(0, 2, 3, 1).reshape(-1, 24)
    expected = -model.discriminator(model.adaptor(patches)).reshape(2, 3, 5)
    torch.testing.assert_close(model(embedding), expected)
    assert model.width == 16


def test_a_checkpoint_from_before_the_standardisation_scores_as_it_did(detector):
    """Checkpoints written before the features were standardised lack its two buffers: they load with the identity
    standardisation their model was trained with; any other missing weight is still an error."""
    old = copy.deepcopy(detector)  # as the model was before: no standardisation
    old.model.feature_mean.zero_()
    old.model.feature_scale.fill_(1.0)
    entry = old.to_checkpoint()
    entry["model"] = {k: v for k, v in entry["model"].items() if not k.startswith("feature_")}
    features = feature_set(3, 2).features
    for got, expected in zip(SimpleNetDetector.from_checkpoint(entry, SIZE)(features), old(features)):
        assert torch.equal(got, expected)
    del entry["model"]["adaptor.weight"]
    with pytest.raises(RuntimeError, match="adaptor.weight"):
        SimpleNetDetector.from_checkpoint(entry, SIZE)
