"""The main job end to end: ``ray job submit`` of the quickstart to a real token-authenticated head node, and a
sweep interrupted after some trials finished that resumes without re-running them."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ray_processes import REPO, RayHead, token_env
from sweeper import tracking
from sweeper.config import load_config
from sweeper.names import match
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


def trial_runs(config_path: Path, role: str | None = None) -> list:
    """The sweep's MLflow runs: all of them, or those of one role ("sweep" for the parent, "trial")."""
    config = load_config(config_path)
    client = MlflowClient(config.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    if experiment is None:  # the sweep has not reached MLflow yet
        return []
    tags = {tracking.SWEEP_TAG: sweep_id(config)}
    if role is not None:
        tags[tracking.ROLE_TAG] = role
    return client.search_runs([experiment.experiment_id], match(tags), max_results=1000)


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
    finished = [r for r in children if r.data.tags.get("bgad.outcome") == "finished"]
    plots = {a.path for a in client.list_artifacts(finished[0].info.run_id, "plots/synthetic-tiles")}
    assert {f"plots/synthetic-tiles/{n}.png" for n in ("roc_pr", "loglikelihood_hist", "anomaly_maps")} <= plots
    outcomes = [r.data.tags.get("bgad.outcome") for r in children]
    assert "pruned" in outcomes, outcomes  # ASHA stopped at least one trial early
    assert parents[0].data.metrics["synthetic-tiles/best_test_image_auroc"] > 0.5
    # the one-class baseline arm: fitted on the same cache and shown beside the best trial
    assert parents[0].data.metrics["synthetic-tiles/baseline_test_image_auroc"] > 0.5
    assert "PatchCore (no labels)" in job.stdout + job.stderr

    study = optuna.load_study(study_name=f"{sweep_id(config)}/synthetic-tiles", storage=config.tune.optuna_storage)
    assert len(study.trials) == config.search.num_samples
    assert all(t.state.is_finished() for t in study.trials)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    config_path = quickstart_in(tmp_path, tune={"max_concurrent_trials": 1}, search={"compare_paper_default": False})
    config = load_config(config_path)
    env = token_env(tmp_path)
    env.pop("RAY_AUTH_MODE")
    command = [sys.executable, "sweeper/run.py", "--config", str(config_path), "--num-cpus", "2"]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ended: list[str] = []
    output = []
    deadline = time.monotonic() + 600
    for line in first.stdout:
        output.append(line)
        match = ENDED.search(line)
        if match:
            ended.append(match.group(1))
        if len(ended) >= 2 or time.monotonic() > deadline:
            first.send_signal(signal.SIGINT)
            break
    output.append(first.communicate(timeout=300)[0])
    log = "".join(output)
    assert len(ended) >= 2, log[-4000:]
    assert first.returncode == 130, log[-4000:]
    assert "interrupted: " in log and "run the same command again to resume" in log
    assert "| category |" not in log  # no test evaluation, no summary
    [parent] = trial_runs(config_path, role="sweep")
    assert parent.info.status == "KILLED" and parent.data.tags[tracking.INTERRUPTED_TAG] == "stopped by SIGINT"
    assert "summary.json" not in {a.path for a in MlflowClient(config.mlflow.tracking_uri).list_artifacts(parent.info.run_id)}
    assert all(r.info.status != "RUNNING" for r in trial_runs(config_path))
    study = optuna.load_study(study_name=f"{sweep_id(config)}/synthetic-tiles", storage=config.tune.optuna_storage)
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)

    client = MlflowClient(config.mlflow.tracking_uri)
    runs = {r.data.tags[tracking.TRIAL_TAG]: r for r in trial_runs(config_path) if tracking.TRIAL_TAG in r.data.tags}
    steps_before = {t: len(client.get_metric_history(runs[t].info.run_id, "val_aupro")) for t in ended}

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-6000:]
    assert "resuming experiment" in log
    for trial_id in ended:  # a finished trial neither reports again nor gains metric steps
        assert f"| {trial_id} epoch" not in log
        assert len(client.get_metric_history(runs[trial_id].info.run_id, "val_aupro")) == steps_before[trial_id]
    after = [r for r in trial_runs(config_path) if tracking.TRIAL_TAG in r.data.tags]
    assert len(after) == config.search.num_samples
    assert all(r.data.tags.get("bgad.outcome") in ("finished", "pruned") for r in after)
    assert parent.info.run_id == trial_runs(config_path, role="sweep")[0].info.run_id
    study = optuna.load_study(study_name=f"{sweep_id(config)}/synthetic-tiles", storage=config.tune.optuna_storage)
    ended = [t for t in study.trials if not t.user_attrs.get("bgad.interrupted")]  # an interrupted one ran again
    assert len(ended) == config.search.num_samples
    assert {t.state for t in ended} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert all(t.user_attrs.get("mlflow_run_id") and t.user_attrs.get("tune_trial_id") for t in ended)


ENDED = re.compile(r"\| (\w+) (?:finished|pruned) after ")
