"""A trial whose loss becomes NaN/inf (learning rate 1e3, a natural trigger) ends as failed with the reason in
MLflow and on the console, is recorded as FAIL by Optuna, is not retried, and the sweep goes on."""

from __future__ import annotations

import re

import optuna
import pytest

from faults.conftest import (
    CATEGORY, assert_every_trial_accounted_for, edit_config, local_env, results, run_job, study_of, sweep_runs,
    tiny_sweep, trial_dirs, with_cache,
)

pytestmark = pytest.mark.slow

DIVERGING_LR = 1000.0


def test_diverging_trial_fails_alone_and_is_not_retried(tmp_path, tiny_cache):
    with_cache(tmp_path, tiny_cache)
    # TPE seed 1 draws lr 1e-3, 1e3, 1e-3 for the three trials (random start-up phase, deterministic).
    asha = {"type": "asha", "grace_period": 1, "reduction_factor": 2}  # the quickstart's scheduler sees the NaN too
    config_path = edit_config(tiny_sweep(tmp_path, search={"seed": 1}, tune={"scheduler": asha}),
                              lambda raw: raw["search"]["space"].update(lr={"choice": [1e-3, DIVERGING_LR]}))
    code, log = run_job(config_path, local_env(tmp_path), "--num-cpus", "2")
    assert code == 0, log[-6000:]

    runs = assert_every_trial_accounted_for(config_path)
    diverged = {t for t, r in runs.items() if float(r.data.params["lr"]) == DIVERGING_LR}
    assert diverged and diverged != set(runs), {t: r.data.params["lr"] for t, r in runs.items()}
    for trial_id, run in runs.items():
        if trial_id in diverged:
            assert run.info.status == "FAILED" and run.data.tags["bgad.outcome"] == "failed"
            assert "training diverged: non-finite loss" in run.data.tags["bgad.failure"]
            assert f"{trial_id} FAILED in meta-epoch" in log and "non-finite loss" in log
            assert not (trial_dirs(config_path)[trial_id] / "error.txt").exists()  # ended once, never retried
            assert len({r["pid"] for r in results(trial_dirs(config_path)[trial_id])}) == 1
        else:
            assert run.data.tags["bgad.outcome"] in ("finished", "pruned") and "bgad.failure" not in run.data.tags
    # Optuna agrees with MLflow: the diverged trial FAILs; the others COMPLETE or, stopped by ASHA, are PRUNED
    states = [(float(t.params["lr"]), t.state) for t in study_of(config_path).trials]
    State = optuna.trial.TrialState
    assert all(state == State.FAIL for lr, state in states if lr == DIVERGING_LR), states
    assert all(state in (State.COMPLETE, State.PRUNED) for lr, state in states if lr != DIVERGING_LR), states
    assert any(state == State.COMPLETE for _, state in states), states
    [parent] = sweep_runs(config_path)
    assert parent.data.metrics[f"{CATEGORY}/best_test_image_auroc"] > 0.5  # the best trial is a finite one
    assert re.search(r"\| synthetic-tiles \| \d+/\d+/1 \|", log)  # summary table: finished/pruned/failed
