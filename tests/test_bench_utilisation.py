"""``benchmarks/bench_utilisation.py``'s arithmetic: busy intervals from Tune's reports, and slot utilisation."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest

from benchmarks import bench_utilisation


def test_a_trial_is_busy_from_its_start_to_its_last_report_and_idle_slots_count_against_the_sweep():
    rows = pd.DataFrame({"trial": ["a", "a", "b"], "timestamp": [110, 130, 140],
                         "time_total_s": [10.0, 30.0, 20.0]})  # a: 100-130, b: 120-140
    intervals = bench_utilisation.busy_intervals(rows)
    assert intervals.loc["a"].tolist() == [100, 130] and intervals.loc["b"].tolist() == [120, 140]
    figures = bench_utilisation.utilisation(intervals, slots=2)
    assert figures["span_s"] == 40 and figures["busy_slot_s"] == 50
    assert figures["utilisation"] == pytest.approx(50 / 80)


def test_each_category_is_its_own_generated_dataset_and_every_slot_a_trial(tmp_path):
    config = bench_utilisation.multi_category_config(3, 4, 5, 2, tmp_path)
    assert [d.synthetic.name for d in config.datasets] == ["tiles-0", "tiles-1", "tiles-2"]
    assert len({d.synthetic.seed for d in config.datasets}) == 3
    assert config.tune.max_concurrent_trials == 4 and config.tune.cpus_per_trial == 1
    assert config.search.num_samples == 5 and config.train["meta_epochs"] == 2


@pytest.mark.slow
def test_a_two_category_sweep_reports_both_categories_and_its_utilisation():
    """The script end to end on a small sweep, which is also the suite's sweep over more than one category: each
    category is searched and its winner tested, and both land in the summary, in the datasets' order."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_utilisation", "--categories", "2", "--slots", "2",
                           "--trials", "2", "--meta-epochs", "1"], cwd=bench_utilisation.ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| tiles-")]
    assert [row.split(" | ")[0] for row in rows] == ["| tiles-0", "| tiles-1"], done.stdout[-3000:]
    assert all(row.split(" | ")[1] == "2" for row in rows)  # both trials of each category reported
    assert re.search(r"utilisation: \d+ busy of \d+ available slot-s = \d+\.\d%", done.stdout), done.stdout[-3000:]
    assert re.search(r"tested, in the summary's order: tiles-0 \(\w+, test image AUROC [\d.]+\), tiles-1 \(", done.stdout)
