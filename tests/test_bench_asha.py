"""``benchmarks/bench_asha.py``'s arithmetic: each arm's sweep settings, and when an arm first came within reach of
the best validation score over all arms (the issue-25 figure), in trial-time and in wall time."""

from __future__ import annotations

import math

import pandas as pd

from benchmarks import bench_asha
from sweeper.job.config import load_config


def test_each_arm_sets_its_scheduler_and_plateau_rule_and_nothing_else(tmp_path):
    base = load_config(bench_asha.ROOT / "search_spaces" / "quickstart.yaml").model_dump(mode="json", exclude_none=True)
    configs = {arm: bench_asha.arm_config(base, arm, 5, {"meta_epochs": 7, "sub_epochs": 1}, tmp_path)
               for arm in bench_asha.ARMS}
    assert {arm: (c.tune.scheduler.type, c.tune.plateau.enabled) for arm, c in configs.items()} == {
        "fifo": ("fifo", False), "asha": ("asha", False), "asha+plateau": ("asha", True)}
    for config in configs.values():
        assert config.search.num_samples == 5 and config.train["meta_epochs"] == 7 and config.train["sub_epochs"] == 1
        assert config.cache.root == str(tmp_path / "cache")  # every arm reads the same cached features
        assert config.search.space == configs["fifo"].search.space and config.search.seed == configs["fifo"].search.seed
    assert len({c.tune.optuna_storage for c in configs.values()}) == 3  # one study per arm


def test_reached_is_the_first_report_within_reach_in_trial_and_wall_seconds():
    rows = pd.DataFrame({"trial": ["a", "b", "a", "b"], "training_iteration": [1, 1, 2, 2],
                         "val_aupro": [0.50, 0.70, 0.79, 0.80], "time_this_iter_s": [10.0, 20.0, 30.0, 40.0],
                         "timestamp": [105, 110, 140, 150]})
    found = bench_asha.efficiency(rows, "val_aupro", 0.79, started=100.0)
    assert found["best"] == 0.80 and found["trial_s_total"] == 100.0
    assert found["trial_s_to_target"] == 60.0 and found["wall_s_to_target"] == 40.0  # trial a's second report
    assert found["epochs"] == 4 and found["trials_to_max_t"] == 2
    never = bench_asha.efficiency(rows, "val_aupro", 0.9, started=100.0)
    assert math.isnan(never["trial_s_to_target"]) and math.isnan(never["wall_s_to_target"])


def test_each_search_seed_runs_apart_and_only_the_seed_differs(tmp_path):
    base = load_config(bench_asha.ROOT / "search_spaces" / "quickstart.yaml").model_dump(mode="json", exclude_none=True)
    one, two = (bench_asha.arm_config(base, "asha", 5, {"meta_epochs": 7}, tmp_path, seed) for seed in (1, 2))
    assert (one.search.seed, two.search.seed) == (1, 2) and one.search.space == two.search.space
    assert one.cache.root == two.cache.root == str(tmp_path / "cache")  # features computed once for every seed
    assert one.tune.storage_path != two.tune.storage_path and one.tune.optuna_storage != two.tune.optuna_storage
    assert one.mlflow.tracking_uri != two.mlflow.tracking_uri


def test_time_to_reach_over_seeds_sums_per_arm_and_charges_a_run_that_never_reached_its_whole_time():
    found = pd.DataFrame({"arm": ["fifo", "asha", "fifo", "asha"],
                          "trial_s_to_target": [100.0, 40.0, 300.0, float("nan")],
                          "trial_s_total": [800.0, 400.0, 900.0, 200.0]})
    table = bench_asha.time_to_reach_over_seeds(found)
    assert list(table.index) == ["fifo", "asha"]  # the first arm is the reference
    assert table.loc["asha", "trial_s_to_reach"] == 240.0 and table.loc["asha", "never"] == 1
    assert table.loc["asha", "to_reach_ratio"] == 0.6 and table.loc["fifo", "to_reach_ratio"] == 1.0
    assert table.loc["asha", "total_ratio"] == 600.0 / 1700.0
