"""Sweep efficiency: ASHA vs FIFO at the same trial budget, side by side on the same cached features.

Both arms run the same sweep (same Optuna space and seed, same number of trials and meta-epochs, same
concurrency) through ``sweeper.tuning.sweep.run_sweep``; only ``tune.scheduler.type`` differs. For each arm it prints the
best validation score, the trial-time (resource-seconds: the sum of all trials' training time, what a GPU-hour
bill counts) spent in total and until the final best score was first reported, and the best trial's test scores.

    .venv/bin/python -m benchmarks.bench_asha [--config search_spaces/quickstart.yaml] [--trials 12]
        [--meta-epochs 6]

The config's datasets, cache, search space and training settings are used; its scheduler, trial count and
meta-epochs are overridden per arm, and results go to a temporary directory (MLflow, Tune, Optuna, cache).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune

from sweeper.cache.build import build_cache
from sweeper.cache.reader import open_cache
from sweeper.job.config import SweepConfig, load_config
from sweeper.tuning.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]


def arm_config(base: dict[str, Any], scheduler: str, trials: int, meta_epochs: int, workdir: Path) -> SweepConfig:
    """The base sweep with one scheduler, its results under ``workdir`` (the cache shared by both arms)."""
    raw = yaml.safe_load(yaml.safe_dump(base))
    raw["name"] = f"bench-{scheduler}"
    raw.setdefault("cache", {})["root"] = str(workdir / "cache")
    raw["train"] = {**raw.get("train", {}), "meta_epochs": meta_epochs}
    raw["search"] = {**raw["search"], "num_samples": trials, "compare_paper_default": False}
    tune_spec = raw.setdefault("tune", {})
    tune_spec["scheduler"] = {**tune_spec.get("scheduler", {}), "type": scheduler}
    tune_spec["storage_path"] = str(workdir / "tune")
    tune_spec["optuna_storage"] = f"sqlite:///{workdir / f'optuna-{scheduler}.db'}"
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "artifact_location": str(workdir / "mlartifacts"),
                     "experiment": "bench-asha", "log_plots": False}
    return SweepConfig.model_validate(raw)


def trial_rows(path: Path) -> pd.DataFrame:
    """Every reported meta-epoch of every trial of one Tune experiment, in the order they were reported."""
    frames = tune.ExperimentAnalysis(str(path)).trial_dataframes
    rows = pd.concat([frame.assign(trial=trial) for trial, frame in frames.items() if len(frame)])
    return rows.sort_values(["timestamp", "time_total_s"], kind="stable").reset_index(drop=True)


def efficiency(rows: pd.DataFrame, metric: str) -> dict[str, float]:
    """Best score, total trial-seconds, and trial-seconds spent until the best score was first reported."""
    spent = rows["time_this_iter_s"].cumsum()
    best = rows[metric].max()
    first = int((rows[metric] >= best).idxmax())
    return {"best": float(best), "trial_s_total": float(spent.iloc[-1]), "trial_s_to_best": float(spent.iloc[first]),
            "epochs": len(rows), "trials_to_max_t": int((rows.groupby("trial")["training_iteration"].max()
                                                         >= rows["training_iteration"].max()).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "search_spaces" / "quickstart.yaml")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--meta-epochs", type=int, default=6)
    args = parser.parse_args()
    base = load_config(args.config).model_dump(mode="json", exclude_none=True)
    ray.init(num_cpus=None, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        table = []
        for scheduler in ("asha", "fifo"):
            config = arm_config(base, scheduler, args.trials, args.meta_epochs, workdir)
            report = build_cache(config)
            manifest = open_cache(report.uri)
            summary = run_sweep(config, report.uri, manifest, config.mlflow.tracking_uri)
            metric = summary["objective"]
            for category, entry in summary["categories"].items():
                rows = trial_rows(Path(config.tune.storage_path) / summary["sweep_id"] / category)
                found = efficiency(rows, metric)
                test = entry["best"]["test"]
                table.append((scheduler, category, metric, found, test, summary["seconds"]))
    print(f"{args.trials} trials x up to {args.meta_epochs} meta-epochs per arm, config {args.config.name}")
    print("| scheduler | category | best val | trial-s to best | trial-s total | meta-epochs run | trials at max_t | "
          "test image AUROC | test PRO | sweep wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scheduler, category, metric, found, test, seconds in table:
        print(f"| {scheduler} | {category} | {metric} {found['best']:.3f} | {found['trial_s_to_best']:.0f} | "
              f"{found['trial_s_total']:.0f} | {found['epochs']} | {found['trials_to_max_t']} | "
              f"{test.get('image_auroc', float('nan')):.3f} | {test.get('aupro', float('nan')):.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
