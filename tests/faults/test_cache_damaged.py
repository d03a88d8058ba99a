"""A shard of the feature cache truncated between two sweeps: the next sweep detects it before any trial starts,
rebuilds the cache (saying why) and completes. (A deleted shard takes the same path; ``tests/test_cache.py`` checks
detection of missing, truncated and altered shards at the cache level.) Its three trials on two slots also show
that a finished trial's worker process takes the next trial (``reuse_actors``: no second start of a process)."""

from __future__ import annotations

import pytest

from faults.conftest import (
    assert_every_trial_accounted_for, local_env, results, run_job, tiny_sweep, trial_dirs, with_cache,
)
from sweeper.cache.reader import SHARDS, verify_cache

pytestmark = pytest.mark.slow


def test_truncated_shard_is_rebuilt_before_training(tmp_path, tiny_cache):
    with_cache(tmp_path, tiny_cache)
    config_path = tiny_sweep(tmp_path)  # three trials, two at a time, read the rebuilt cache
    [cache] = [m.parent for m in (tmp_path / "cache").glob("*/manifest.json")]
    shard = cache / SHARDS / verify_cache(str(cache))["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    code, log = run_job(config_path, local_env(tmp_path), "--num-cpus", "2")
    assert code == 0, log[-6000:]
    rebuilt = log.index(f"rebuilt because: cache {cache}: shard {SHARDS}/{shard.name} has ")
    assert "(truncated or rewritten)" in log[rebuilt:]
    assert rebuilt < log.index(" epoch 1 ")  # detected before any trial trained
    verify_cache(str(cache), checksums=True)  # the rebuilt cache is complete
    assert not list((tmp_path / "cache").glob(".tmp-*")) and not list((tmp_path / "cache").glob("*.trash-*"))
    assert_every_trial_accounted_for(config_path)
    workers = {row["pid"] for folder in trial_dirs(config_path).values() for row in results(folder)}
    assert len(trial_dirs(config_path)) == 3 and len(workers) == 2, workers  # the third trial ran in a reused worker
