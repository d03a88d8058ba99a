"""A Ray worker node is removed (its whole process group SIGKILLed) while it runs a trial: Tune reschedules the
trial on the surviving node from its last checkpoint (``tune.max_failures``) and the sweep completes."""

from __future__ import annotations

import pytest

from faults.conftest import (
    EVERY_EPOCH, KILL_AFTER, KILLABLE, SweepJob, assert_every_trial_accounted_for, assert_resumed_after_a_checkpoint,
    metric_steps, results, tiny_sweep, trial_dirs, with_cache,
)
from ray_processes import RayHead, RayWorker

pytestmark = pytest.mark.slow


def test_trials_of_a_lost_node_are_rescheduled(tmp_path, tiny_cache):
    with_cache(tmp_path, tiny_cache)
    config_path = tiny_sweep(tmp_path, search={"num_samples": 2}, train=KILLABLE)
    victim: dict = {}
    # One CPU per node and two concurrent one-CPU trials: one trial runs on each node.
    with RayHead(tmp_path, num_cpus=1) as head, RayWorker(head, num_cpus=1) as worker:

        def worker_trial_reported() -> bool:
            for trial_id, folder in trial_dirs(config_path).items():
                rows = results(folder)
                if rows and rows[-1]["node_id"] == worker.node_id and rows[-1]["training_iteration"] in KILL_AFTER:
                    victim.update(trial_id=trial_id, folder=folder)
                    return True
            return False

        with SweepJob(config_path, head.env, "--address", head.address) as job:
            job.wait_for(worker_trial_reported, 300, "a trial reporting from the worker node")
            worker.kill()
            code = job.wait()
        log = job.log
        survivors = worker.survivors()
    assert code == 0, log[-6000:]
    assert worker.node_id not in survivors and len(survivors) == 1

    rows = results(victim["folder"])
    assert_resumed_after_a_checkpoint(rows, KILLABLE["meta_epochs"])
    assert rows[0]["node_id"] == worker.node_id and rows[-1]["node_id"] in survivors, rows  # moved to the head
    assert "Failure # 1" in (victim["folder"] / "error.txt").read_text()
    assert f"{victim['trial_id']} failed (" in log and "retrying from its last checkpoint" in log

    runs = assert_every_trial_accounted_for(config_path)
    assert metric_steps(config_path, runs[victim["trial_id"]].info.run_id) == EVERY_EPOCH  # no epoch logged twice
    assert runs[victim["trial_id"]].data.tags["bgad.outcome"] == "finished"
