"""A small trained model recorded in MLflow exactly as a sweep records its trials, without running Ray.

Shared by test_promote.py and test_serving.py: ``recorded_sweep`` builds it once per test session (the second
caller finds it on disk), so both modules promote and serve the same model in a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from bgad_core.backbone import FeatureExtractor
from bgad_core.data.synthetic import make_synthetic_category
from bgad_core.engine.checkpoint import detector_from_checkpoint, load_checkpoint, save_checkpoint
from bgad_core.models.base import evaluate
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.train import DataConfig, build_feature_sets, run
from sweeper.tracking import mlflow_runs as tracking

CATEGORY = "tiles"
SWEEP_NAME = "tiny"
SWEEP_ID = f"{SWEEP_NAME}-0000abcd"
EXPERIMENT = "bgad-registry-test"
CACHE_KEY = "cafe0123cafe0123"
IMAGE_SIZE = 64
OBJECTIVE = "val_aupro"
BEST_TRIAL, OTHER_TRIAL = "trial_best", "trial_other"
DONE = "recorded.json"


@dataclass(frozen=True)
class RecordedSweep:
    """Where the recorded sweep lives and the ids a test needs."""

    root: str
    tracking_uri: str
    category_dir: str
    parent_run_id: str
    best_run_id: str
    other_run_id: str
    data: dict
    test_metrics: dict

    def data_config(self) -> DataConfig:
        return DataConfig(**self.data)


def recorded_sweep(root: Path) -> RecordedSweep:
    """Train once on generated images and record a parent sweep run, two trial runs and the summary."""
    marker = root / DONE
    if marker.exists():
        return RecordedSweep(**json.loads(marker.read_text()))
    root.mkdir(parents=True, exist_ok=True)
    category = make_synthetic_category(root / "data", name=CATEGORY, size=IMAGE_SIZE, n_train=16, n_test_good=8,
                                       n_test_per_defect=4, seed=1)
    data = DataConfig(data=str(category), image_size=IMAGE_SIZE, num_anomalies=2, racp_per_anomaly=2)
    config = BGADConfig(meta_epochs=2, sub_epochs=1, warmup_epochs=1, lr=1e-3, fiber_batch=2048, coupling_blocks=2)
    summary = run(data, config, "tf_efficientnet_lite0", "offline", (4, 8, 16), root / "train")
    checkpoint = sweep_checkpoint(load_checkpoint(root / "train" / "model.pt"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={tracking.SWEEP_TAG: SWEEP_ID, tracking.SWEEP_NAME_TAG: SWEEP_NAME,
                                                 tracking.ROLE_TAG: "sweep", "bgad.categories": CATEGORY}).info.run_id
    sweep_config = {"backbone": {"name": "tf_efficientnet_lite0", "weights": "offline", "strides": [4, 8, 16]},
                    "cache": {"dtype": "float16"}}
    tracking.log_params(client, parent,
                        {"config": json.dumps(sweep_config), "cache_key": CACHE_KEY, "objective": OBJECTIVE})
    params = {"family": summary["family"], **config.to_dict(), "num_anomalies": data.num_anomalies,
              "racp_depth": data.racp_depth}
    best = record_trial(client, experiment, parent, BEST_TRIAL, checkpoint, params, summary["val"]["aupro"])
    other = record_trial(client, experiment, parent, OTHER_TRIAL, checkpoint, params, summary["val"]["aupro"] - 0.2)
    best_entry = {"trial_id": BEST_TRIAL, "epoch": checkpoint["epoch"], "val": summary["val"], "test": summary["test"],
                  "config": params}
    client.log_dict(parent, {"sweep_id": SWEEP_ID, "objective": OBJECTIVE,
                             "categories": {CATEGORY: {"best": best_entry}}}, "summary.json")
    client.set_terminated(parent, "FINISHED")
    recorded = RecordedSweep(str(root), uri, str(category), parent, best, other, asdict(data), summary["test"])
    marker.write_text(json.dumps(asdict(recorded)))
    return recorded


def sweep_checkpoint(checkpoint: dict) -> dict:
    """The checkpoint as a sweep trial writes it: backbone described by the cache manifest (with each level's
    channels, from its levels), plus key and category."""
    backbone = {k: checkpoint["backbone"][k] for k in ("name", "weights_source", "weights_digest", "channels")}
    return {**checkpoint, "backbone": backbone, "cache_key": CACHE_KEY, "category": CATEGORY}


def record_trial(client: MlflowClient, experiment: str, parent: str, trial_id: str, checkpoint: dict, params: dict,
                 objective: float) -> str:
    """A finished trial run with its parameters, per-epoch validation objective and checkpoint artifact."""
    tags = {tracking.SWEEP_TAG: SWEEP_ID, tracking.TRIAL_TAG: trial_id, tracking.CATEGORY_TAG: CATEGORY,
            tracking.ROLE_TAG: "trial", tracking.PARENT_TAG: parent}
    run_id = client.create_run(experiment, tags=tags, run_name=trial_id).info.run_id
    tracking.log_params(client, run_id, params)
    for step in range(1, checkpoint["epoch"] + 1):
        tracking.log_metrics(client, run_id, {OBJECTIVE: objective - 0.01 * (checkpoint["epoch"] - step)}, step)
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(checkpoint, Path(folder) / CATEGORY / "model.pt")
        client.log_artifacts(run_id, folder, artifact_path="checkpoint")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def trial_evaluation(recorded: RecordedSweep) -> tuple[list[Path], np.ndarray, torch.Tensor]:
    """Test images of the recorded trial and the scores and maps its own evaluation gives them.

    Features come from ``build_feature_sets``, i.e. exactly as training extracted them (fp16, batches of 16).
    """
    checkpoint = load_checkpoint(Path(recorded.root) / "train" / "model.pt")
    extractor = FeatureExtractor("tf_efficientnet_lite0", "offline", (4, 8, 16))
    splits, _, _, _, test = build_feature_sets(recorded.data_config(), extractor)
    result = evaluate(detector_from_checkpoint(checkpoint), test)
    paths = {r.record_id: r.path for r in splits.test}
    return [paths[i] for i in test.ids], result.scores.numpy(), result.maps


# Runs in a fresh interpreter: the model must load from the registry alone (it is loaded before anything of the
# repository is imported; images are read with PIL only). Files are passed as pathlib.Path (a string is base64,
# never a path), and as base64 through MLflow's own scoring-server parser, which `mlflow models serve` runs.
SERVE_SCRIPT = """
import base64, json, sys
from pathlib import Path
import mlflow.pyfunc, numpy as np, pandas as pd
from mlflow.pyfunc import scoring_server
from PIL import Image
model_uri, paths = sys.argv[1], [Path(p) for p in json.loads(sys.argv[2])]
model = mlflow.pyfunc.load_model(model_uri)
arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
by_path = model.predict(pd.DataFrame({"image": paths}))
by_array_reversed = model.predict(pd.DataFrame({"image": arrays[::-1]}))
alone = [float(model.predict(pd.DataFrame({"image": [a]}))["score"][0]) for a in arrays[:2]]
small = np.asarray(Image.fromarray(arrays[0]).resize((72, 40), Image.Resampling.BILINEAR))
resized = model.predict([{"image": small}])
body = json.dumps({"dataframe_records": [{"image": base64.b64encode(p.read_bytes()).decode()} for p in paths[:2]]})
reply = scoring_server.invocations(body, "application/json", model, model.metadata.get_input_schema())
try:
    model.predict(pd.DataFrame({"image": [str(paths[0])]}))
    path_string_error = None
except Exception as err:
    path_string_error = str(err)
print(json.dumps({
    "scores": by_path["score"].tolist(),
    "decisions": by_path["decision"].tolist(),
    "map_shapes": [list(np.shape(m)) for m in by_path["map"]],
    "maps": [np.asarray(m).tolist() for m in by_path["map"][:2]],
    "reversed_scores": by_array_reversed["score"].tolist()[::-1],
    "alone_scores": alone,
    "resized_map_shape": list(np.shape(resized["map"][0])),
    "json_scores": [row["score"] for row in json.loads(reply.response)["predictions"]],
    "path_string_error": path_string_error,
}))
"""


def served_scores(tracking_uri: str, model_uri: str, paths: list[str]) -> dict:
    """Load ``model_uri`` with ``mlflow.pyfunc.load_model`` in a new process and score ``paths`` several ways
    (``mlflow models serve`` would answer the ``json_scores`` request the same: it runs the same parser)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    result = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, model_uri, json.dumps(paths)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
