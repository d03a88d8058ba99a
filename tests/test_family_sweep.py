"""A winner of the one-class family is promoted, served over HTTP and exported exactly as a BGAD winner is
(``test_promote``, ``test_serve`` and ``test_export`` cover BGAD's; ``test_promote``'s quickstart sweep checks that
a cross-family sweep records each family's trials)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from bgad_core.engine.checkpoint import detector_from_checkpoint, load_checkpoint
from bgad_core.models.base import evaluate
from ray_processes import REPO, VENV_BIN, free_port, stop_group
from sweeper.tracking import mlflow_runs as tracking
from sweeper.cache.reader import open_cache, read_features, row_paths
from sweeper.job.config import load_config
from sweeper.export import main as export_main
from sweeper.tuning.fit_store import REUSED_TAG
from sweeper.promote import find_sweep_run, promote
from sweeper.run import main as run_sweep
from sweeper.tuning.sweep import sweep_id
from test_serve import wait_for_server
from test_sweep_job import quickstart_in, trial_runs

pytestmark = pytest.mark.slow
NAME = "tiles-any-family"


def family_sweep(folder: Path, family: str, samples: int, train: dict) -> Path:
    """The quickstart as a sweep of ``family`` alone with nothing of it searched, one trial at a time, run."""
    config_path = quickstart_in(folder, search={"num_samples": samples, "compare_paper_default": False,
                                                "families": {family: {}}})
    raw = yaml.safe_load(config_path.read_text())
    raw["train"] = train  # the quickstart's train keys are BGAD's, refused for another family's sweep
    raw["tune"]["max_concurrent_trials"] = 1
    config_path.write_text(yaml.safe_dump(raw))
    assert run_sweep(["--config", str(config_path), "--num-cpus", "2"]) == 0
    return config_path


def test_a_one_class_winner_is_promoted_served_and_exported_like_any_other(tmp_path):
    """Nothing of PatchCore is searched here: the first trial fits it, the next two reuse that fit (one at a time)."""
    config_path = family_sweep(tmp_path, "patchcore", 3, {"meta_epochs": 4})
    runs = sorted(trial_runs(config_path, "trial"), key=lambda run: run.info.start_time)
    assert [REUSED_TAG in run.data.tags for run in runs] == [False, True, True]
    assert len({run.data.metrics["val_aupro"] for run in runs}) == 1
    assert all(run.info.status == "FINISHED" for run in runs)
    assert_promoted_served_exported(tmp_path, config_path, "patchcore")


def test_a_simplenet_winner_is_promoted_served_and_exported_like_any_other(tmp_path):
    """The third family, added as a folder and a registry entry, goes the same way (issue 23).

    A grid of two learning rates, one at a time: the second (1e-9) leaves the discriminator as initialised, so ASHA
    stops it after its first meta-epoch, below the first trial's at the same rung; a stopped trial ends KILLED and
    tagged ``pruned`` in MLflow, and the first trial wins.
    """
    config_path = quickstart_in(tmp_path, search={"num_samples": 1, "compare_paper_default": False})
    raw = yaml.safe_load(config_path.read_text())
    raw["search"] = {**{k: v for k, v in raw["search"].items() if k != "families"}, "algorithm": "grid",
                     "grid": {"family": ["simplenet"], "lr": [2e-4, 1e-9]}}
    raw["train"] = {"meta_epochs": 2, "sub_epochs": 1, "batch_size": 1024, "num_anomalies": 2}
    raw["tune"]["max_concurrent_trials"] = 1
    config_path.write_text(yaml.safe_dump(raw))
    assert run_sweep(["--config", str(config_path), "--num-cpus", "2"]) == 0
    runs = {float(run.data.params["lr"]): run for run in trial_runs(config_path, "trial")}
    assert runs[1e-9].data.tags["bgad.outcome"] == "pruned" and runs[1e-9].info.status == "KILLED"
    assert runs[1e-9].data.tags["bgad.meta_epochs_run"] == "1"
    assert runs[2e-4].data.tags["bgad.outcome"] == "finished"
    assert_promoted_served_exported(tmp_path, config_path, "simplenet")
    client = MlflowClient(load_config(config_path).mlflow.tracking_uri)
    assert client.get_model_version_by_alias(NAME, "champion").run_id == runs[2e-4].info.run_id


def assert_promoted_served_exported(tmp_path: Path, config_path: Path, family: str) -> None:
    """``promote --best`` registers the sweep's winner of ``family``; ``sweeper.serve`` scores images posted over HTTP
    as the trial's evaluation did; ``sweeper.export``'s ONNX file scores them as the server."""
    config = load_config(config_path)
    uri, sid = config.mlflow.tracking_uri, sweep_id(config)
    version = promote(uri, sid, NAME)
    assert version.tags[tracking.FAMILY_TAG] == family
    client = MlflowClient(uri)
    category = version.tags[tracking.CATEGORY_TAG]
    manifest = open_cache(find_sweep_run(client, sid).data.tags["bgad.cache_uri"])
    test = read_features(manifest, category, ["test"])
    checkpoint = load_checkpoint(client.download_artifacts(version.run_id, f"checkpoint/{category}/model.pt",
                                                           str(tmp_path)))
    assert checkpoint["family"] == family
    expected = evaluate(detector_from_checkpoint(checkpoint), test).scores.numpy()
    paths = row_paths(manifest, category, test.ids)
    images = [str(paths[i]) for i in test.ids[:3]]

    port = free_port()  # README's serve command, an image posted as curl would
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(VENV_BIN / "python"), "-m", "sweeper.serve", f"{NAME}@champion", "--port",
                                    str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_server(port, process, log_path)
        body = json.dumps({"dataframe_records": [{"image": base64.b64encode(Path(p).read_bytes()).decode()}
                                                 for p in images]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            served = json.loads(response.read())
    finally:
        stop_group(process, timeout_s=30)
    scores = [row["score"] for row in served["predictions"]]
    assert scores == pytest.approx(expected[:3].tolist(), abs=1e-4)

    out = tmp_path / "onnx"
    assert export_main([f"models:/{NAME}@champion", "--output", str(out), "--tracking-uri", uri]) == 0
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    size = tuple(checkpoint["image_size"])
    batch = np.stack([np.asarray(Image.open(p).convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR))
                      for p in images])
    onnx_scores = session.run(["score"], {"images": batch})[0]
    assert onnx_scores == pytest.approx(scores, abs=1e-3)
