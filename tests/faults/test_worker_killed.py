"""A trial's worker process is SIGKILLed mid-trial: the trial resumes from its last checkpoint and the sweep
finishes with every trial accounted for."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from faults.conftest import (
    EVERY_EPOCH, KILL_AFTER, KILLABLE, SweepJob, assert_every_trial_accounted_for, assert_resumed_after_a_checkpoint,
    local_env, metric_steps, results, tiny_sweep, trial_dirs, with_cache,
)

pytestmark = pytest.mark.slow


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def test_killed_worker_resumes_its_trial_from_the_last_checkpoint(tmp_path, tiny_cache):
    with_cache(tmp_path, tiny_cache)
    config_path = tiny_sweep(tmp_path, search={"num_samples": 2}, train=KILLABLE)
    victim: dict = {}

    def reported_one_epoch() -> bool:  # a trial with a checkpoint and at least two meta-epochs to go
        for trial_id, folder in trial_dirs(config_path).items():
            rows = results(folder)
            if rows and rows[-1]["training_iteration"] in KILL_AFTER:
                victim.update(trial_id=trial_id, folder=folder, pid=rows[-1]["pid"])
                return True
        return False

    with SweepJob(config_path, local_env(tmp_path), "--num-cpus", "2") as job:
        job.wait_for(reported_one_epoch, 300, "trial that reported a meta-epoch")
        assert "ray::" in _cmdline(victim["pid"]), _cmdline(victim["pid"])  # Tune's pid is the trial's worker
        os.kill(victim["pid"], signal.SIGKILL)
        code = job.wait()
    log = job.log
    assert code == 0, log[-6000:]

    rows = results(victim["folder"])
    assert_resumed_after_a_checkpoint(rows, KILLABLE["meta_epochs"])
    assert "Failure # 1" in (victim["folder"] / "error.txt").read_text()
    assert f"{victim['trial_id']} failed (" in log and "retrying from its last checkpoint" in log

    runs = assert_every_trial_accounted_for(config_path)
    assert metric_steps(config_path, runs[victim["trial_id"]].info.run_id) == EVERY_EPOCH  # no epoch logged twice
    assert runs[victim["trial_id"]].data.tags["bgad.outcome"] == "finished"
