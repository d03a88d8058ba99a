"""Where a sweep's results go, and who may run it: relative locations under ``ray job submit`` need
``--project-dir``; ``--project-dir`` is what they resolve against; a sweep already running is refused. All of it
is decided before any Ray work (no ``ray.init``, no cache build)."""

from __future__ import annotations

import os

import pytest

import sweeper.run
from faults.conftest import tiny_sweep
from ray_processes import REPO
from sweeper.cache.reader import absolute_uri
from sweeper.job.config import load_config
from sweeper.job.lock import SweepLock, SweepLocked
from sweeper.tuning.sweep import sweep_id

QUICKSTART = str(REPO / "search_spaces" / "quickstart.yaml")


def test_relative_locations_under_ray_job_submit_need_a_project_dir(monkeypatch, capsys, no_ray_work):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor gives its entrypoint
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert sweeper.run.main(["--config", QUICKSTART]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {QUICKSTART}: ") and len(err.strip().splitlines()) == 1
    for named in ("cache.root (runs/cache)", "tune.storage_path (runs/tune)",
                  "tune.optuna_storage (sqlite:///runs/optuna.db)", "mlflow.tracking_uri (sqlite:///runs/mlflow.db)"):
        assert named in err
    assert '--project-dir "$PWD"' in err


def test_project_dir_is_what_relative_locations_resolve_against(tmp_path, monkeypatch, no_ray_work):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(REPO)  # restored after the test: main() enters the project directory
    with pytest.raises(AssertionError, match="Ray work started"):  # it got past every check
        sweeper.run.main(["--config", QUICKSTART, "--project-dir", str(tmp_path)])
    assert os.getcwd() == str(tmp_path)
    assert list((tmp_path / "runs" / "logs").glob("quickstart-*.log"))  # results under the project directory


def test_a_sweep_already_running_is_refused_with_its_holder(tmp_path, capsys, no_ray_work):
    config_path = tiny_sweep(tmp_path)
    config = load_config(config_path)
    with SweepLock(sweep_id(config), absolute_uri(config.tune.storage_path)):
        assert sweeper.run.main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: sweep {sweep_id(config)} is already running (") and f'"pid": {os.getpid()}' in err
    assert "run this command again to resume" in err


def test_lock_is_per_sweep_and_storage_and_released_on_exit(tmp_path):
    with SweepLock("a-1", "/x", folder=tmp_path):
        with pytest.raises(SweepLocked):
            SweepLock("a-1", "/x", folder=tmp_path).__enter__()
        with SweepLock("a-1", "/elsewhere", folder=tmp_path), SweepLock("b-2", "/x", folder=tmp_path):
            pass  # another sweep, or the same config writing other storage: no conflict
    with SweepLock("a-1", "/x", folder=tmp_path):
        pass

