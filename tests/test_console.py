"""What the main job's console shows and what only its log file gets, and how its MLflow experiment opens in the UI.

(The main job end to end, whose console holds only the project's lines: ``test_sweep_job.py`` and
``test_readme_commands.py``.)"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.parse

import pytest
from mlflow.tracking import MlflowClient

from ray_processes import REPO
from sweeper.tracking import mlflow_runs as tracking
from sweeper.run import on_console


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


@pytest.mark.parametrize(("name", "level", "shown"), [
    ("sweeper.tuning.sweep", logging.INFO, True),
    ("__main__", logging.INFO, True),
    ("bgad_core.precision", logging.WARNING, True),
    ("bgad_core.backbone", logging.INFO, False),  # which weights, why not the hub (with its address): log only
    ("bgad_core.backbone", logging.WARNING, True),
    ("ray._private.authentication.authentication_token_setup", logging.WARNING, False),  # the token-auth notice
    ("mlflow.store.db.utils", logging.INFO, False),
    ("ray.tune", logging.ERROR, True),
])
def test_console_shows_the_projects_lines_and_others_errors(name, level, shown):
    assert on_console(record(name, level)) is shown


def test_native_stderr_goes_to_the_log_file_and_python_stderr_stays_on_the_console(tmp_path):
    log = tmp_path / "sweep.log"
    script = (
        "import os, sys; from pathlib import Path; from sweeper.run import native_stderr_to\n"
        f"with native_stderr_to(Path({str(log)!r})):\n"
        "    os.write(2, b'[E 1 1] core_worker.cc:1: from C++\\n')\n"  # what Ray's core worker does
        "    print('error: for the user', file=sys.stderr)\n"
        "os.write(2, b'after the sweep\\n')\n"  # fd 2 is the caller's again once the sweep is over
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "error: for the user\nafter the sweep\n"
    assert log.read_text() == "[E 1 1] core_worker.cc:1: from C++\n"


def test_experiment_opens_as_model_training_with_a_view_of_the_best_trial(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = tracking.ensure_experiment(client, "sweeps", str(tmp_path / "artifacts"))
    assert client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.ensure_experiment(client, "sweeps", None) == experiment_id

    older = client.create_experiment("older")  # created before sweeps tagged their experiment: tagged on reuse
    tracking.ensure_experiment(client, "older", None)
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.ensure_experiment(client, "chosen", None)  # a kind someone chose in the UI stays
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"

    url = tracking.save_runs_view(client, experiment_id, "quick-1234abcd", ["val_aupro", "tiles/best_test_aupro"])
    parts = urllib.parse.urlsplit(url.replace("/#/", "/"))
    assert parts.path == f"/experiments/{experiment_id}/runs"
    assert urllib.parse.parse_qs(parts.query) == {"workflowType": ["machine_learning"],
                                                  "viewStateShareKey": ["quick-1234abcd"]}
    state = json.loads(client.get_experiment(experiment_id).tags["mlflow.sharedViewState.quick-1234abcd"])
    assert state["selectedColumns"][-2:] == ["metrics.`val_aupro`", "metrics.`tiles/best_test_aupro`"]
