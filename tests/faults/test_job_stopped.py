"""``ray job stop`` of a running sweep on a token-authenticated head: a second submission of the same sweep is
refused while it runs, the stop leaves nothing RUNNING or FINISHED that did not finish (MLflow runs KILLED, Optuna
trials FAIL, both tagged interrupted; no summary), and running the same command again completes the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from faults.conftest import (
    OBJECTIVE, assert_every_trial_accounted_for, run_job, tiny_sweep, with_cache,
)
from ray_processes import REPO, VENV_BIN, RayHead
from sweeper.tracking import mlflow_runs as tracking
from sweeper.cache.reader import absolute_uri
from sweeper.job.config import load_config
from sweeper.job.lock import SweepLock
from sweeper.tuning.sweep import sweep_id
from test_sweep_job import trial_runs

pytestmark = pytest.mark.slow


def ray_job(head: RayHead, command: str, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``ray job <command> --address <head> <args>`` (the address before an entrypoint's ``--``)."""
    return subprocess.run([str(VENV_BIN / "ray"), "job", command, "--address", head.dashboard, *args], env=head.env,
                          capture_output=True, text=True, timeout=timeout_s)


def submit(head: RayHead, config_path, *options: str) -> subprocess.CompletedProcess:
    return ray_job(head, "submit", *options, "--working-dir", str(REPO), "--", "python", "sweeper/run.py",
                   "--config", str(config_path))


def has_reported(config_path) -> bool:
    """Some trial has logged a meta-epoch to MLflow (so trials are mid-way)."""
    client = MlflowClient(load_config(config_path).mlflow.tracking_uri)
    return any(client.get_metric_history(r.info.run_id, OBJECTIVE) for r in trial_runs(config_path, role="trial"))


def held_by_a_job(config) -> bool:
    """Whether another live process holds the sweep's lock, read from the holder the lock file names.

    Not by trying the lock: a probe that holds it for an instant makes the job it waits for refuse to start.
    """
    path = SweepLock(sweep_id(config), absolute_uri(config.tune.storage_path)).path
    try:
        pid = json.loads(path.read_text())["pid"]
        os.kill(pid, 0)  # alive (the holder writes its name only once it holds the lock, and keeps it until exit)
    except (OSError, ValueError, KeyError):
        return False
    return pid != os.getpid()


def wait_until(condition, head: RayHead, job_id: str, what: str, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what}:\n" + ray_job(head, "logs", job_id).stdout[-5000:]
        time.sleep(0.5)


def test_stopped_job_is_marked_interrupted_refuses_a_twin_and_resumes(tmp_path, tiny_cache):
    with_cache(tmp_path, tiny_cache)
    config_path = tiny_sweep(tmp_path, train={"meta_epochs": 24})  # outlasts the twin's submission, also on a loaded machine
    config = load_config(config_path)
    with RayHead(tmp_path) as head:
        job_id = f"stop-{int(time.time())}"
        assert submit(head, config_path, "--no-wait", "--submission-id", job_id).returncode == 0
        wait_until(lambda: held_by_a_job(config), head, job_id, "the first job holds the sweep's lock")
        twin = submit(head, config_path)  # the same sweep again, while the first runs
        output = twin.stdout + twin.stderr
        assert twin.returncode != 0, output[-5000:]
        assert f"error: sweep {sweep_id(config)} is already running" in output, output[-5000:]
        wait_until(lambda: has_reported(config_path), head, job_id, "a trial reported a meta-epoch")

        stopped = ray_job(head, "stop", job_id)
        assert stopped.returncode == 0, stopped.stderr
        logs = ray_job(head, "logs", job_id).stdout
        # Ray SIGKILLs the job 3 s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S): the marks below are written at once
        # by the stop handler; the closing "interrupted:" line comes only if Tune's shutdown fits in those 3 s.
        assert "stopping on SIGTERM" in logs, logs[-5000:]
        assert "| category |" not in logs  # no test evaluation, no summary

        runs = trial_runs(config_path)
        assert runs and all(r.info.status != "RUNNING" for r in runs)
        [parent] = trial_runs(config_path, role="sweep")
        assert parent.info.status == "KILLED" and parent.data.tags[tracking.INTERRUPTED_TAG] == "stopped by SIGTERM"
        study = optuna.load_study(study_name=f"{sweep_id(config)}/synthetic-tiles", storage=config.tune.optuna_storage)
        assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
        assert any(t.user_attrs.get("bgad.interrupted") for t in study.trials)

        code, log = run_job(config_path, head.env, "--address", head.address)
    assert code == 0, log[-6000:]
    assert "resuming experiment" in log
    assert_every_trial_accounted_for(config_path)  # the sweep run is FINISHED now, each trial has its outcome
