"""The main job end to end: ``ray job submit`` of the quickstart to a real token-authenticated head node, and a
sweep interrupted after some trials finished that resumes without re-running them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ray_processes import REPO, RayHead, token_env
from sweeper import tracking
from sweeper.config import load_config
from sweeper.sweep import sweep_id

pytestmark = pytest.mark.slow


def quickstart_in(folder: Path, **overrides) -> Path:
    """The quickstart config with every output under ``folder`` (absolute: a job runs in its own directory)."""
    raw = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    raw["backbone"]["weights"] = "offline"
    raw["cache"]["root"] = str(folder / "cache")
    raw["tune"].update(storage_path=str(folder / "tune"), optuna_storage=f"sqlite:///{folder / 'optuna.db'}")
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "artifact_location": str(folder / "artifacts")}
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trial_runs(config_path: Path) -> list:
    config = load_config(config_path)
    client = MlflowClient(config.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    query = f"tags.`{tracking.SWEEP_TAG}` = '{sweep_id(config)}'"
    return client.search_runs([experiment.experiment_id], query, max_results=1000)


def test_quickstart_job_on_a_token_authenticated_head(tmp_path):
    config_path = quickstart_in(tmp_path)
    with RayHead(tmp_path) as head:
        job = head.submit("python", "sweeper/run.py", "--config", str(config_path))
    assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-3000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()

    config = load_config(config_path)
    runs = trial_runs(config_path)
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "trial"]
    assert len(parents) == 1
    assert len(children) >= 4
    client = MlflowClient(config.mlflow.tracking_uri)
    for run in children:
        assert run.data.tags[tracking.PARENT_TAG] == parents[0].info.run_id
        history = client.get_metric_history(run.info.run_id, "val_aupro")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint/synthetic-tiles")]
        assert "checkpoint/synthetic-tiles/model.pt" in artifacts
    outcomes = [r.data.tags.get("bgad.outcome") for r in children]
    assert "pruned" in outcomes, outcomes  # ASHA stopped at least one trial early
    assert parents[0].data.metrics["synthetic-tiles/best_test_image_auroc"] > 0.5

    study = optuna.load_study(study_name=f"{sweep_id(config)}/synthetic-tiles", storage=config.tune.optuna_storage)
    assert len(study.trials) == config.search.num_samples
    assert all(t.state.is_finished() for t in study.trials)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    config_path = quickstart_in(tmp_path, tune={"max_concurrent_trials": 1}, search={"compare_paper_default": False})
    env = token_env(tmp_path)
    env.pop("RAY_AUTH_MODE")
    command = [sys.executable, "sweeper/run.py", "--config", str(config_path), "--num-cpus", "2"]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ended = 0
    output = []
    deadline = time.monotonic() + 600
    for line in first.stdout:
        output.append(line)
        if " finished after " in line or " pruned after " in line:
            ended += 1
        if ended >= 2 or time.monotonic() > deadline:
            first.send_signal(signal.SIGINT)
            break
    rest, _ = first.communicate(timeout=300)
    assert ended >= 2, "".join(output)[-4000:]

    before = {r.data.tags[tracking.TRIAL_TAG]: r for r in trial_runs(config_path) if r.data.tags.get("bgad.outcome")}
    client = MlflowClient(load_config(config_path).mlflow.tracking_uri)
    steps_before = {t: len(client.get_metric_history(r.info.run_id, "val_aupro")) for t, r in before.items()}
    assert len(steps_before) >= 1, "".join(output)[-4000:] + rest[-2000:]

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
    assert "resuming experiment" in second.stdout + second.stderr

    after = {r.data.tags[tracking.TRIAL_TAG]: r for r in trial_runs(config_path) if r.data.tags.get(tracking.TRIAL_TAG)}
    config = load_config(config_path)
    assert len(after) == config.search.num_samples
    for trial_id, steps in steps_before.items():
        assert len(client.get_metric_history(after[trial_id].info.run_id, "val_aupro")) == steps
    study = optuna.load_study(study_name=f"{sweep_id(config)}/synthetic-tiles", storage=config.tune.optuna_storage)
    assert len(study.trials) == config.search.num_samples
