"""The promoted model serves the trial's own scores: in a fresh process, over REST, in any batch, at any size."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from bgad_core.backbone import FeatureExtractor
from bgad_core.checkpoint import load_checkpoint
from bgad_core.datasets import load_image
from bgad_core.errors import ConfigError, DataError
from bgad_core.inference import Scorer, as_rgb
from registry_fixtures import SWEEP_ID, recorded_sweep, served_scores, trial_evaluation
from sweeper.promote import promote
from sweeper.serving import decode_image, encode_image

NAME = "bgad-tiles"
MODEL_URI = f"models:/{NAME}@champion"
SERVER_START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return recorded_sweep(tmp_path_factory.getbasetemp() / "recorded-sweep")


@pytest.fixture(scope="module")
def promoted(recorded):
    return promote(recorded.tracking_uri, SWEEP_ID, NAME)


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
    assert served["resized_map_shape"] == [40, 72]


def test_scoring_server_answers_a_json_image_with_its_score_and_map(recorded, promoted, scorer, tmp_path):
    image = load_image(trial_evaluation_paths(recorded)[0], None)[:48]  # non-square: 48 x 64
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": recorded.tracking_uri, "MLFLOW_REGISTRY_URI": recorded.tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn of this venv
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", MODEL_URI,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_server(port, server, log_path)
        body = json.dumps({"dataframe_records": [{"image": encode_image(image)}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            prediction = json.loads(response.read())["predictions"][0]
    finally:
        stop(server)
    expected = scorer.score([image])
    assert np.shape(prediction["map"]) == (48, 64)
    assert prediction["score"] == pytest.approx(float(expected.scores[0]), abs=1e-5)
    assert np.abs(np.asarray(prediction["map"]) - expected.maps[0]).max() < 1e-5
    assert prediction["decision"] == bool(expected.decisions[0])


def test_scorer_refuses_backbone_weights_the_flows_were_not_trained_on(recorded):
    checkpoint = load_checkpoint(Path(recorded.root) / "train" / "model.pt")
    with pytest.raises(ConfigError, match="digest"):
        Scorer(checkpoint, FeatureExtractor("tf_efficientnet_lite0", "random", (4, 8, 16)))


def test_scorer_takes_grey_and_any_size_and_rejects_non_uint8(scorer):
    grey = np.full((30, 50), 90, dtype=np.uint8)
    prediction = scorer.score([grey, np.repeat(grey[:, :, None], 3, axis=2)])
    assert prediction.maps[0].shape == (30, 50)
    assert prediction.scores[0] == prediction.scores[1]
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


def test_image_values_decode_from_pixels_png_base64_and_paths(recorded):
    path = trial_evaluation_paths(recorded)[0]
    pixels = load_image(path, None)
    assert np.array_equal(decode_image(encode_image(pixels), "row 0"), pixels)
    assert np.array_equal(decode_image(str(path), "row 0"), pixels)
    assert np.array_equal(decode_image(path.read_bytes(), "row 0"), pixels)
    with pytest.raises(DataError, match="row 3: .*neither an existing file nor base64"):
        decode_image("no/such/file.png", "row 3")
    with pytest.raises(DataError, match="row 4: not a readable image"):
        decode_image("aGVsbG8=", "row 4")


def trial_evaluation_paths(recorded) -> list[Path]:
    """Test images of the recorded category (sorted, so every test picks the same ones)."""
    return sorted(Path(recorded.category_dir, "test").rglob("*.png"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(port: int, server: subprocess.Popen, log_path: Path) -> None:
    """Poll ``/ping`` until the server answers; fail with its log if it exits or takes too long."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"scoring server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"scoring server not up after {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def stop(server: subprocess.Popen) -> None:
    """Stop the server and the uvicorn workers it started (its whole process group)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
