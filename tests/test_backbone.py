"""Backbone: the offline Lite0/1/2 weights are real ImageNet weights (and lukemelas-format files of them load), and
the extractor is frozen, deterministic, multi-scale, traceable by digest, and fails with messages that name the
stride or file at fault."""

from __future__ import annotations

import importlib.resources
import re
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from bgad_core import backbone
from bgad_core.backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_STRIDES,
    FeatureExtractor,
    OFFLINE_WEIGHTS,
    lukemelas_to_timm,
    offline_state_dict,
)
from bgad_core.errors import ConfigError, DataError

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
EGYPTIAN_CAT, ESPRESSO = 285, 967


@pytest.fixture(scope="module")
def offline() -> FeatureExtractor:
    return FeatureExtractor(weights="offline")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8))


def _sample(name: str) -> np.ndarray:
    """A scikit-image sample photo; skip when this install would have to download it."""
    skdata = pytest.importorskip("skimage.data")
    try:
        return getattr(skdata, name)()
    except Exception as err:  # pooch raises network/IO errors of many kinds when the file is not shipped
        pytest.skip(f"skimage.data.{name}() not available offline: {err}")


def _top5(model: torch.nn.Module, image: np.ndarray) -> list[int]:
    """Whole image resized to 224 and scaled with mean/std 0.5, as timm's pretrained_cfg for Lite0 says."""
    resized = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(resized).permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        return model((x - 0.5) / 0.5).topk(5).indices[0].tolist()


def test_offline_lite0_weights_classify_imagenet_photos() -> None:
    """Positional mapping is right only if the full classifier recognises a cat and an espresso."""
    classifier = timm.create_model(DEFAULT_BACKBONE, pretrained=False, num_classes=1000).eval()
    state_dict, _ = offline_state_dict()
    classifier.load_state_dict(state_dict)
    cat, coffee = _top5(classifier, _sample("chelsea")), _top5(classifier, _sample("coffee"))
    assert cat[0] in CAT_CLASSES and EGYPTIAN_CAT in cat, cat
    assert coffee[0] == ESPRESSO, coffee


def test_lukemelas_mapping_rejects_shape_mismatch() -> None:
    state_dict = offline_state_dict()[0]
    keys = list(state_dict)
    keys[0], keys[1] = keys[1], keys[0]  # a batch-norm weight where the model expects the stem conv
    with torch.device("meta"):
        classifier = timm.create_model(DEFAULT_BACKBONE, pretrained=False)
    with pytest.raises(ConfigError, match="tensor 0 bn1.weight"):
        lukemelas_to_timm({k: state_dict[k] for k in keys}, classifier)


def _lukemelas_file(architecture: str) -> Path:
    """The packaged lukemelas-format checkpoint of ``architecture`` (what a user would pass as a weights file)."""
    offline = OFFLINE_WEIGHTS[architecture]
    return Path(importlib.resources.files(offline.module).joinpath(offline.file))


@pytest.mark.parametrize("architecture, size", [("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260)])
def test_offline_lite1_lite2_match_lukemelas_own_model(architecture: str, size: int) -> None:
    """The converted timm classifier computes exactly what lukemelas' own EfficientNet-Lite computes.

    At the native input size: lukemelas pads statically for it, timm's ``tf_`` models pad for any size.
    """
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    reference = lite.EfficientNet.from_name(architecture.replace("tf_efficientnet_", "efficientnet-")).eval()
    reference.load_state_dict(torch.load(_lukemelas_file(architecture), weights_only=True))
    converted = timm.create_model(architecture, pretrained=False).eval()
    converted.load_state_dict(offline_state_dict(architecture)[0])
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(x), reference(x))


@pytest.mark.parametrize("architecture", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_lite2_load_offline_and_from_a_lukemelas_file(architecture: str, images: torch.Tensor) -> None:
    offline = FeatureExtractor(architecture, weights="offline")
    from_file = FeatureExtractor(architecture, weights=str(_lukemelas_file(architecture)))
    assert OFFLINE_WEIGHTS[architecture].package in offline.weights_source
    assert "local file" in from_file.weights_source
    assert from_file.weights_digest == offline.weights_digest  # the same tensors (their values: the test above)
    assert all(f.isfinite().all() for f in offline.extract(images[:, :64, :64]))


def test_lukemelas_file_of_another_architecture_is_refused_naming_the_file() -> None:
    path = _lukemelas_file(DEFAULT_BACKBONE)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: lukemelas") + ".* only for tf_efficientnet_lite0, .*"
                                          "not resnet18"):
        FeatureExtractor("resnet18", weights=str(path))
    with pytest.raises(ConfigError, match=re.escape(f"{path} (lukemelas format) has 296 tensors") + ".* has 386"):
        FeatureExtractor("tf_efficientnet_lite1", weights=str(path))  # a Lite0 file for Lite1


def test_levels_channels_and_sizes(offline: FeatureExtractor, images: torch.Tensor) -> None:
    features = offline.extract(images)
    assert offline.strides == DEFAULT_STRIDES == (8, 16)
    assert offline.channels == (40, 112)
    assert [tuple(f.shape) for f in features] == [(2, 40, 16, 16), (2, 112, 8, 8)]
    paper = FeatureExtractor(weights="offline", strides=(4, 8, 16))
    assert paper.channels == (24, 40, 112)
    assert [tuple(f.shape) for f in paper.extract(images)] == [(2, 24, 32, 32), (2, 40, 16, 16), (2, 112, 8, 8)]
    assert offline.mean == offline.std == (0.5, 0.5, 0.5)


def test_frozen_eval_and_deterministic(offline: FeatureExtractor, images: torch.Tensor) -> None:
    assert not any(p.requires_grad for p in offline.parameters())
    offline.train()
    assert not offline.training and not any(m.training for m in offline.modules())
    first, second = offline.extract(images), offline.extract(images)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not first[0].requires_grad


def test_normalize(offline: FeatureExtractor) -> None:
    images = torch.zeros(1, 4, 5, 3, dtype=torch.uint8)
    images[..., 1] = 255
    x = offline.normalize(images)
    assert x.shape == (1, 3, 4, 5) and x.dtype == torch.float32
    assert torch.all(x[:, 0] == -1) and torch.all(x[:, 1] == 1)
    with pytest.raises(DataError, match="uint8"):
        offline.normalize(images.float())


def test_digest_identifies_weights(offline: FeatureExtractor) -> None:
    assert "offline package" in offline.weights_source
    assert FeatureExtractor(weights="offline").weights_digest == offline.weights_digest
    random = FeatureExtractor(weights="random")
    assert random.weights_digest != offline.weights_digest
    assert FeatureExtractor(weights="random").weights_digest == random.weights_digest  # seeded


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_round_trip(offline: FeatureExtractor, images: torch.Tensor, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in offline.model.state_dict().items()}, str(path))
    else:
        torch.save(offline.model.state_dict(), path)
    loaded = FeatureExtractor(weights=str(path))
    assert loaded.weights_digest == offline.weights_digest
    assert str(path) in loaded.weights_source
    assert all(torch.equal(a, b) for a, b in zip(loaded.extract(images), offline.extract(images)))


def test_local_full_classifier_file(offline: FeatureExtractor, tmp_path: Path) -> None:
    """A full ImageNet checkpoint (head included) loads: tensors the features model lacks are dropped."""
    path = tmp_path / "full.pt"
    torch.save({"state_dict": offline_state_dict()[0]}, path)
    assert FeatureExtractor(weights=str(path)).weights_digest == offline.weights_digest


def test_bad_local_files_name_the_file(offline: FeatureExtractor, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt.pth"):
        FeatureExtractor(weights=str(corrupt))
    state_dict = offline.model.state_dict()
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save({**state_dict, "conv_stem.weight": torch.zeros(1)}, wrong_shape)
    with pytest.raises(ConfigError, match="wrong_shape.pth.*conv_stem.weight"):
        FeatureExtractor(weights=str(wrong_shape))
    incomplete = tmp_path / "incomplete.pth"
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("blocks.2")}, incomplete)
    with pytest.raises(ConfigError, match="incomplete.pth.*missing"):
        FeatureExtractor(weights=str(incomplete))
    with pytest.raises(ConfigError, match="nowhere.pth"):
        FeatureExtractor(weights=str(tmp_path / "nowhere.pth"))


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ConfigError, match="stride 64"):
        FeatureExtractor(weights="random", strides=(4, 8, 64))
    with pytest.raises(ConfigError, match="strictly increasing"):
        FeatureExtractor(weights="random", strides=(16, 8))
    with pytest.raises(ConfigError, match="not_a_model"):
        FeatureExtractor("not_a_model", weights="random")
    with pytest.raises(ConfigError, match="no packaged weights for resnet18.*exist for tf_efficientnet_lite0, "
                                          "tf_efficientnet_lite1, tf_efficientnet_lite2"):
        FeatureExtractor("resnet18", weights="offline")


def test_auto_falls_back_to_offline_lite0_fast(offline: FeatureExtractor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone, "hub_unavailable_reason", lambda url, timeout=0: "no network (test)")
    start = time.perf_counter()
    auto = FeatureExtractor()
    assert time.perf_counter() - start < 10
    assert auto.weights_digest == offline.weights_digest
    assert "offline package" in auto.weights_source and "no network (test)" in auto.weights_source


def test_auto_falls_back_when_hub_download_fails(offline: FeatureExtractor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that answers the probe but fails the download (or an empty offline cache) still falls back."""
    monkeypatch.setattr(backbone, "hub_unavailable_reason", lambda url, timeout=0: None)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("connection refused (test)")

    monkeypatch.setattr(backbone, "_hub_model", refuse)
    auto = FeatureExtractor()
    assert auto.weights_digest == offline.weights_digest
    assert "connection refused (test)" in auto.weights_source


def test_auto_without_offline_weights_asks_for_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbone, "hub_unavailable_reason", lambda url, timeout=0: "no network (test)")
    with pytest.raises(ConfigError, match="resnet18.*local"):
        FeatureExtractor("resnet18")


def test_hub_probe_reports_unreachable_server_quickly() -> None:
    start = time.perf_counter()
    reason = backbone.hub_unavailable_reason("http://127.0.0.1:9", timeout=2.0)  # discard port: nothing listens
    assert reason is not None and "127.0.0.1:9" in reason
    assert time.perf_counter() - start < 5
