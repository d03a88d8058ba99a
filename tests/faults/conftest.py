"""Shared pieces of the fault suite: a tiny quickstart sweep, its feature cache built once per session, the sweep
job as a subprocess whose output is read as it runs, and readers of what Tune, MLflow and Optuna recorded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ray_processes import REPO, token_env
import sweeper.run
from sweeper.tracking import mlflow_runs as tracking
from sweeper.cache.build import build_cache
from sweeper.job.config import load_config
from sweeper.tuning.sweep import sweep_id
from test_sweep_job import quickstart_in, trial_runs

CATEGORY = "synthetic-tiles"
OBJECTIVE = "val_aupro_image_auroc_mean"  # the tiny sweep's objective (masks: tune.metric auto)
# The quickstart at its smallest useful size: a few trials of a few meta-epochs, no early stopping, neither ASHA nor
# at a plateau (a trial killed by a test must still be running when killed, and then run all its meta-epochs), no
# plots, no paper-default reference run; BGAD only (``tiny_sweep``), whose trials last long enough to be killed
# mid-way and can diverge.
TINY = {
    "search": {"num_samples": 3, "compare_paper_default": False},
    "train": {"meta_epochs": 3},
    "tune": {"scheduler": {"type": "fifo"}, "plateau": {"enabled": False}},
    "mlflow": {"log_plots": False},
}


def tiny_sweep(folder: Path, **overrides: dict) -> Path:
    """The tiny quickstart config with every output under ``folder``; ``overrides`` update its sections."""
    sections = {k: dict(v) for k, v in TINY.items()}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return edit_config(quickstart_in(folder, **sections), bgad_only)


def bgad_only(raw: dict) -> None:
    """The quickstart's cross-family search as a BGAD search: its ``search.families.bgad`` as ``search.space``."""
    raw["search"]["space"] = raw["search"].pop("families")["bgad"]


@pytest.fixture
def no_ray_work(monkeypatch):
    """Fail the test if the job starts Ray or touches the cache: its checks must stop it before either."""
    def forbidden(*args, **kwargs):
        raise AssertionError("Ray work started although the job's checks should have stopped it")

    monkeypatch.setattr(sweeper.run.ray, "init", forbidden)
    monkeypatch.setattr(sweeper.run, "build_cache", forbidden)


def edit_config(path: Path, edit: Callable[[dict], None]) -> Path:
    """Apply ``edit`` to the raw YAML of ``path`` (for values ``quickstart_in`` cannot set, e.g. ``datasets``)."""
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def tiny_cache(ray_cluster, tmp_path_factory) -> Path:
    """A folder holding the tiny sweep's generated data and complete feature cache, built once per session."""
    folder = tmp_path_factory.mktemp("tiny-cache")
    build_cache(load_config(tiny_sweep(folder)))
    return folder


def with_cache(folder: Path, tiny_cache: Path) -> None:
    """Give a test folder a copy of the session's cache (the key is content-addressed, so it is a hit)."""
    for name in ("cache", "data"):
        shutil.copytree(tiny_cache / name, folder / name)


def local_env(folder: Path, **extra: str) -> dict[str, str]:
    """Environment of a sweep job that starts its own local Ray (token auth as Ray defaults to, own token file)."""
    env = token_env(folder)
    env.pop("RAY_AUTH_MODE")
    env.update(extra)
    return env


class SweepJob:
    """``python sweeper/run.py`` as a subprocess in its own process group; its output is collected as it comes.

    Leaving the ``with`` block kills whatever is left of the group (a driver killed by a test, or one that
    overran), so no Ray instance outlives its test.
    """

    def __init__(self, config_path: Path, env: dict[str, str], *args: str) -> None:
        command = [sys.executable, "sweeper/run.py", "--config", str(config_path), *args]
        self.log_path = _unused(config_path.parent / "job.log")  # kept for post-mortems (pytest --basetemp)
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``condition`` until it holds; fail with the job's output tail if it does not in time."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"sweep exited ({self.process.returncode}) before {what}:\n{self.log[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout_s} s:\n{self.log[-6000:]}")
            time.sleep(0.2)

    def wait(self, timeout_s: float = 600) -> int:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sweep still running after {timeout_s} s:\n{self.log[-6000:]}")
        self._reader.join(timeout=30)
        return code

    def kill(self) -> None:
        """SIGKILL the driver alone, as a crash or the OOM killer would."""
        self.process.kill()
        self.process.wait(timeout=60)

    def __enter__(self) -> SweepJob:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=60)
        self._reader.join(timeout=30)
        self.log_path.write_text(self.log)


def _unused(path: Path) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3``... when it exists (a test that runs the job twice)."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def run_job(config_path: Path, env: dict[str, str], *args: str, timeout_s: float = 600) -> tuple[int, str]:
    """Run the sweep job to its end; (exit code, output)."""
    with SweepJob(config_path, env, *args) as job:
        code = job.wait(timeout_s)
    return code, job.log


def experiment_dir(config_path: Path) -> Path:
    """Where Tune keeps the search experiment of the sweep (all its categories)."""
    config = load_config(config_path)
    return Path(config.tune.storage_path) / sweep_id(config) / "search"


def trial_dirs(config_path: Path) -> dict[str, Path]:
    """Trial id -> trial directory (``train_detector_<id>_...``)."""
    root = experiment_dir(config_path)
    return {d.name.split("_")[2]: d for d in root.glob("train_detector_*") if d.is_dir()} if root.is_dir() else {}


def results(trial_dir: Path) -> list[dict]:
    """The trial's reported results in order (Tune appends one JSON line per report, across restarts)."""
    path = trial_dir / "result.json"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            break
    return rows


KILL_AFTER = range(2, 4)  # meta-epochs whose report can trigger a kill: checkpoint 1 registered, epochs to go
# Rows reach result.json seconds after the report, and a 1-sub-epoch meta-epoch takes under a second: at 4
# sub-epochs a meta-epoch lasts seconds, so a kill seen at row 2 or 3 lands with three meta-epochs still to go.
KILLABLE = {"meta_epochs": 6, "sub_epochs": 4}
EVERY_EPOCH = list(range(1, KILLABLE["meta_epochs"] + 1))  # the MLflow steps of a killed trial, each once


def assert_resumed_after_a_checkpoint(rows: list[dict], last: int) -> None:
    """One trial's result.json ``rows`` show one attempt, then one retry from a checkpoint, not a restart.

    Tune appends a result's row when the result arrives, then fetches its checkpoint from the trial's actor in a
    second call: an actor killed between the two leaves that meta-epoch in result.json without a checkpoint, so the
    retry trains and reports it again. Tune asks for the next result only once the save is registered, so a kill
    after a trial's second row retries after checkpoint 1 at the earliest.
    """
    attempts: dict[tuple[str, int], list[int]] = {}
    for row in rows:  # a retry runs in another worker process
        attempts.setdefault((row["node_id"], row["pid"]), []).append(row["training_iteration"])
    assert len(attempts) == 2, rows
    first, retry = attempts.values()
    assert first == list(range(1, len(first) + 1)) and retry == list(range(retry[0], last + 1)), rows
    assert 2 <= retry[0] and first[-1] <= retry[0] <= first[-1] + 1, rows  # after the last checkpoint


def metric_steps(config_path: Path, run_id: str, metric: str = OBJECTIVE) -> list[int]:
    client = MlflowClient(load_config(config_path).mlflow.tracking_uri)
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def trial_runs_by_id(config_path: Path) -> dict[str, object]:
    return {r.data.tags[tracking.TRIAL_TAG]: r for r in trial_runs(config_path) if tracking.TRIAL_TAG in r.data.tags}


def sweep_runs(config_path: Path) -> list:
    return [r for r in trial_runs(config_path) if r.data.tags.get(tracking.ROLE_TAG) == "sweep"]


def study_of(config_path: Path) -> optuna.Study:
    config = load_config(config_path)
    return optuna.load_study(study_name=f"{sweep_id(config)}/{CATEGORY}", storage=config.tune.optuna_storage)


def assert_every_trial_accounted_for(config_path: Path) -> dict[str, object]:
    """num_samples trials in MLflow (each with an outcome), one finished sweep run, num_samples ended in Optuna
    (besides the FAIL records an interruption left of trials that then resumed and were recorded again)."""
    config = load_config(config_path)
    runs = trial_runs_by_id(config_path)
    assert len(runs) == config.search.num_samples, sorted(runs)
    outcomes = {t: r.data.tags.get("bgad.outcome") for t, r in runs.items()}
    assert set(outcomes.values()) <= {"finished", "pruned", "failed"} and None not in outcomes.values(), outcomes
    parents = sweep_runs(config_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = study_of(config_path).trials
    interrupted = [t for t in trials if t.user_attrs.get("bgad.interrupted")]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in interrupted), [t.state for t in interrupted]
    trials = [t for t in trials if t not in interrupted]
    assert len(trials) == config.search.num_samples, [t.state for t in trials]
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    return runs
