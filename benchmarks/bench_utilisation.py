"""Slot utilisation of a multi-category sweep (issue 25, item 2): how much of the cluster's trial slots the sweep
keeps busy from its first trial to its last.

The quickstart sweep over ``--categories`` generated categories (the quickstart's, re-seeded per category), with
``--slots`` concurrent 1-CPU trials on a local Ray of that many logical CPUs. Utilisation is busy slot-seconds over
available slot-seconds: each trial is busy from its start (its first report's timestamp less the time it took,
setup included) to its last report; available is slots x the time from the first trial's start to the last
trial's end. What is not busy is the sweep's tail, where its last trials run while other slots have nothing left to
start. (When each category had its own Tune experiment, the boundary between two experiments also left every slot
idle for 13-14 s per category here: 29.4 % against 90.6 % with one experiment over all categories, BENCHMARKS.md.)

    .venv/bin/python -m benchmarks.bench_utilisation [--categories 3] [--slots 4] [--trials 6] [--meta-epochs 4]

On a 2-core machine 4 slots are 4 logical CPUs: trials run slower side by side, but whether a slot has a trial is
what the figure measures, and that is the scheduler's doing, not the core count's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import yaml

from benchmarks.bench_asha import trial_rows
from benchmarks.machine import cpu_description
from sweeper.cache.build import build_cache
from sweeper.cache.reader import open_cache
from sweeper.job.config import SweepConfig
from sweeper.tuning.sweep import SEARCH_EXPERIMENT, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def multi_category_config(categories: int, slots: int, trials: int, meta_epochs: int, workdir: Path) -> SweepConfig:
    """The quickstart over ``categories`` generated categories (seeds 0, 1, ...), ``slots`` trials at once."""
    raw = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    [generated] = raw["datasets"]
    raw["datasets"] = [{"synthetic": {**generated["synthetic"], "name": f"tiles-{index}", "seed": index}}
                       for index in range(categories)]
    raw["name"] = "bench-utilisation"
    raw["backbone"]["weights"] = "offline"
    raw["train"]["meta_epochs"] = meta_epochs
    raw["search"].update(num_samples=trials, compare_paper_default=False)
    raw["tune"].update(max_concurrent_trials=slots, cpus_per_trial=1, storage_path=str(workdir / "tune"),
                       optuna_storage=f"sqlite:///{workdir / 'optuna.db'}", selection={"label_free_twin": False})
    raw["cache"]["root"] = str(workdir / "cache")
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "artifact_location": str(workdir / "art"),
                     "log_plots": False}
    return SweepConfig.model_validate(raw)


def busy_intervals(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: when it started (first report less its duration) and when it last reported."""
    first = rows.groupby("trial").first()
    return pd.DataFrame({"start": first["timestamp"] - first["time_total_s"],
                         "end": rows.groupby("trial")["timestamp"].max()})


def utilisation(intervals: pd.DataFrame, slots: int) -> dict[str, float]:
    """Busy slot-seconds over available slot-seconds between the first start and the last end."""
    span = float(intervals["end"].max() - intervals["start"].min())
    busy = float((intervals["end"] - intervals["start"]).sum())
    return {"span_s": span, "busy_slot_s": busy, "available_slot_s": slots * span,
            "utilisation": busy / (slots * span) if span > 0 else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", type=int, default=3, help="generated categories the sweep searches")
    parser.add_argument("--slots", type=int, default=4, help="trials at once (logical CPUs of the local Ray)")
    parser.add_argument("--trials", type=int, default=6, help="trials per category")
    parser.add_argument("--meta-epochs", type=int, default=4, help="meta-epochs of a trial that runs to the end")
    args = parser.parse_args()
    ray.init(num_cpus=args.slots, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = multi_category_config(args.categories, args.slots, args.trials, args.meta_epochs, workdir)
        report = build_cache(config)
        started = time.time()
        summary = run_sweep(config, report.uri, open_cache(report.uri), config.mlflow.tracking_uri)
        ended = time.time()
        tested = summary["categories"]
        folder = Path(config.tune.storage_path) / summary["sweep_id"]
        per_category = {category: busy_intervals(trial_rows(folder / SEARCH_EXPERIMENT, category))
                        for category in tested}
    ray.shutdown()
    every = pd.concat(per_category.values())
    overall = utilisation(every, args.slots)
    print(f"{cpu_description(os.cpu_count() or 1)}; {args.categories} categories x {args.trials} trials of up to "
          f"{args.meta_epochs} meta-epochs, {args.slots} slots; sweep wall {ended - started:.0f} s (test evaluation "
          "and baselines included)")
    print("| category | trials | first start s | last end s | busy slot-s |")
    print("|---|---|---|---|---|")
    origin = float(every["start"].min())
    for category, intervals in per_category.items():
        print(f"| {category} | {len(intervals)} | {intervals['start'].min() - origin:.0f} | "
              f"{intervals['end'].max() - origin:.0f} | {(intervals['end'] - intervals['start']).sum():.0f} |")
    print("tested, in the summary's order: " + ", ".join(
        f"{category} ({entry['best']['family']}, test image AUROC {entry['best']['test']['image_auroc']:.3f})"
        for category, entry in tested.items()))
    print(f"utilisation: {overall['busy_slot_s']:.0f} busy of {overall['available_slot_s']:.0f} available slot-s "
          f"= {overall['utilisation']:.1%} (from the first trial's start to the last trial's end, "
          f"{overall['span_s']:.0f} s)")


if __name__ == "__main__":
    main()
