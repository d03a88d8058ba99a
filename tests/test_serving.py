"""The promoted pyfunc serves the trial's own scores: in a fresh process, through MLflow's JSON parser, in any batch,
at any size; its inputs are checked like the scoring server's (tests/test_serve.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bgad_core.backbone import FeatureExtractor
from bgad_core.engine.checkpoint import load_checkpoint
from bgad_core.data.datasets import load_image
from bgad_core.errors import ConfigError, DataError
from bgad_core.data.image_input import ImageLimits, ImageTooLarge, ImageTooSmall
from bgad_core.engine.inference import Scorer, as_rgb
from registry_fixtures import served_scores, trial_evaluation
from sweeper.registry.serving import decode_image, encode_image

NAME = "bgad-tiles"
MODEL_URI = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def scorer(recorded):
    checkpoint = load_checkpoint(Path(recorded.root) / "train" / "model.pt")
    return Scorer(checkpoint, FeatureExtractor("tf_efficientnet_lite0", "offline", (4, 8, 16)))


def test_registered_model_in_a_fresh_process_scores_like_the_trials_evaluation(recorded, promoted):
    paths, expected, expected_maps = trial_evaluation(recorded)
    served = served_scores(recorded.tracking_uri, MODEL_URI, [str(p) for p in paths])
    assert served["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert np.abs(np.asarray(served["maps"]) - expected_maps[:2].numpy()).max() < 1e-5
    threshold = float(promoted.tags["bgad.threshold"])
    assert served["decisions"] == [s >= threshold for s in served["scores"]]
    assert served["map_shapes"] == [[64, 64]] * len(paths)
    # the same image, alone, in a batch of all, in another order, decoded from a file or given as pixels
    assert served["reversed_scores"] == pytest.approx(served["scores"], abs=1e-6)
    assert served["alone_scores"] == pytest.approx(served["scores"][:2], abs=1e-6)
    assert served["resized_map_shape"] == [40, 64]  # the image's rows, no more columns than the model's input
    assert served["json_scores"] == pytest.approx(served["scores"][:2], abs=1e-6)  # base64 via MLflow's parser
    assert "not base64-encoded image bytes" in served["path_string_error"]  # a string path is never opened


def test_scorer_refuses_backbone_weights_the_flows_were_not_trained_on(recorded):
    checkpoint = load_checkpoint(Path(recorded.root) / "train" / "model.pt")
    with pytest.raises(ConfigError, match="digest"):
        Scorer(checkpoint, FeatureExtractor("tf_efficientnet_lite0", "random", (4, 8, 16)))


def test_scorer_takes_grey_and_any_size_and_rejects_non_uint8(scorer):
    grey = np.full((30, 50), 90, dtype=np.uint8)
    prediction = scorer.score([grey, np.repeat(grey[:, :, None], 3, axis=2)])
    assert prediction.maps[0].shape == (30, 50)
    assert prediction.scores[0] == prediction.scores[1]
    assert scorer.score([np.full((100, 200), 90, dtype=np.uint8)]).maps[0].shape == (64, 64)  # the model's input
    with pytest.raises(DataError, match="image 0: expected uint8"):
        scorer.score([grey.astype(np.float32)])
    with pytest.raises(DataError, match="image 0"):
        as_rgb(np.zeros((4, 4, 2), np.uint8), "image 0")


def test_scorer_is_batch_independent_on_one_thread_too(scorer, recorded):
    images = [load_image(p, None) for p in trial_evaluation_paths(recorded)[:5]]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [float(scorer.score([image]).scores[0]) for image in images]
        together = scorer.score(images).scores
    finally:
        torch.set_num_threads(threads)
    assert np.abs(np.asarray(alone) - scorer.score(images).scores).max() < 1e-6
    assert np.abs(np.asarray(alone) - together).max() < 1e-6


def test_image_values_decode_from_pixels_png_base64_and_path_objects_never_path_strings(recorded):
    path = trial_evaluation_paths(recorded)[0]
    pixels = load_image(path, None)
    assert np.array_equal(decode_image(encode_image(pixels), "row 0"), pixels)
    assert np.array_equal(decode_image(path, "row 0"), pixels)
    assert np.array_equal(decode_image(path.read_bytes(), "row 0"), pixels)
    existing, missing = str(path), str(path.with_name("no-such-file.png"))
    messages = []
    for text in (existing, missing, "/etc/passwd", "/etc/passwq"):
        with pytest.raises(DataError, match="row 3: not base64-encoded image bytes") as err:
            decode_image(text, "row 3")
        messages.append(str(err.value))
    assert len(set(messages)) == 1  # nothing tells whether a file exists
    with pytest.raises(DataError, match="row 4: not a PNG, JPEG, BMP or TIFF image"):
        decode_image("aGVsbG8=", "row 4")


def test_image_values_are_checked_against_the_limits_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (300, 200)).save(buffer, format="PNG")
    with pytest.raises(ImageTooLarge, match="row 0: 300 x 200 = 60000 pixels, more than the limit of 50000"):
        decode_image(buffer.getvalue(), "row 0", ImageLimits(max_pixels=50_000))
    with pytest.raises(ImageTooSmall, match="row 1: 300 x 200 pixels, the minimum is 201 per side"):
        decode_image(buffer.getvalue(), "row 1", ImageLimits(min_side=201))
    with pytest.raises(ImageTooSmall, match="row 2: 1 x 1 pixels, the minimum is 32"):
        decode_image(np.zeros((1, 1, 3), np.uint8), "row 2")
    with pytest.raises(ConfigError, match="max_pixels"):
        ImageLimits(max_pixels=10**9)
    assert decode_image(buffer.getvalue(), "row 3").shape == (200, 300, 3)  # grey PNG -> RGB, as training reads it


def trial_evaluation_paths(recorded) -> list[Path]:
    """Test images of the recorded category (sorted, so every test picks the same ones)."""
    return sorted(Path(recorded.category_dir, "test").rglob("*.png"))
