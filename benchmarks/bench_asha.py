"""Sweep efficiency: FIFO, ASHA and ASHA + plateau stopping at the same trial budget, side by side on the same
cached features (issue 25: time until the final best validation score is reached).

Every arm runs the same sweep (same Optuna space and seed, same number of trials and meta-epochs, same
concurrency) through ``sweeper.tuning.sweep.run_sweep``; only ``tune.scheduler.type`` and ``tune.plateau.enabled``
differ (``fifo`` and ``asha`` train every trial they keep to the last meta-epoch; ``asha+plateau`` also ends each
survivor at its plateau, the default). For each arm it prints the best validation score, the trial-time
(resource-seconds: the sum of all trials' training time, what a GPU-hour bill counts) spent in total, the
trial-time and wall time until a validation score within ``--within`` of the best over all arms was first reported,
and the best trial's test scores.

    .venv/bin/python -m benchmarks.bench_asha [--config search_spaces/quickstart.yaml] [--trials 12]
        [--meta-epochs 6] [--sub-epochs N] [--arms fifo asha asha+plateau] [--within 0.01] [--seeds 0 1 2]

With one search seed, every arm gets the same first suggestions, so "time to reach" mostly says when TPE happened to
propose a good configuration. ``--seeds`` runs every arm once per search seed (arms of one seed side by side, "reached"
measured against that seed's best) and ends with each arm's time to reach summed over the seeds, as a ratio to the
first arm's: the figure a user who cannot choose a lucky seed gets.

The config's datasets, cache, search space and training settings are used; its scheduler, plateau rule, trial count
and schedule are overridden per arm, and results go to a temporary directory (MLflow, Tune, Optuna, cache).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import yaml
from ray import tune

from benchmarks.bench_accuracy import cpu_flags
from sweeper.cache.build import build_cache
from sweeper.cache.reader import open_cache
from sweeper.job.config import SweepConfig, load_config
from sweeper.tuning.sweep import SEARCH_EXPERIMENT, run_sweep
from sweeper.tuning.trainable import CATEGORY_KEY

ROOT = Path(__file__).resolve().parents[1]


# arm -> (scheduler, plateau stopping)
ARMS = {"fifo": ("fifo", False), "asha": ("asha", False), "asha+plateau": ("asha", True)}


def arm_config(base: dict[str, Any], arm: str, trials: int, schedule: dict[str, int], workdir: Path,
               seed: int | None = None) -> SweepConfig:
    """The base sweep as one arm (its scheduler and plateau rule), its results under ``workdir`` (the cache shared
    by every arm); ``schedule`` overrides ``train`` keys (meta_epochs, sub_epochs), ``seed`` the search seed (and
    then each seed's studies and Tune results live apart, under ``workdir/seed-<seed>``)."""
    scheduler, plateau = ARMS[arm]
    name = arm.replace("+", "-")
    raw = yaml.safe_load(yaml.safe_dump(base))
    raw["name"] = f"bench-{name}"
    raw.setdefault("cache", {})["root"] = str(workdir / "cache")
    raw["train"] = {**raw.get("train", {}), **schedule}
    raw["search"] = {**raw["search"], "num_samples": trials, "compare_paper_default": False,
                     **({} if seed is None else {"seed": seed})}
    if seed is not None:
        workdir = workdir / f"seed-{seed}"
        workdir.mkdir(parents=True, exist_ok=True)
    tune_spec = raw.setdefault("tune", {})
    tune_spec["scheduler"] = {**tune_spec.get("scheduler", {}), "type": scheduler}
    tune_spec["plateau"] = {**tune_spec.get("plateau", {}), "enabled": plateau}
    tune_spec["selection"] = {**tune_spec.get("selection", {}), "label_free_twin": False}  # the search alone
    tune_spec["storage_path"] = str(workdir / "tune")
    tune_spec["optuna_storage"] = f"sqlite:///{workdir / f'optuna-{name}.db'}"
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "artifact_location": str(workdir / "mlartifacts"),
                     "experiment": "bench-asha", "log_plots": False}
    return SweepConfig.model_validate(raw)


def trial_rows(path: Path, category: str | None = None) -> pd.DataFrame:
    """Every reported meta-epoch of every trial of one Tune experiment (of ``category`` only, where given: a
    sweep's search experiment holds every category's trials), in the order they were reported."""
    frames = tune.ExperimentAnalysis(str(path)).trial_dataframes
    rows = pd.concat([frame.assign(trial=trial) for trial, frame in frames.items() if len(frame)])
    if category is not None:
        rows = rows[rows[f"config/{CATEGORY_KEY}"] == category]
    return rows.sort_values(["timestamp", "time_total_s"], kind="stable").reset_index(drop=True)


def efficiency(rows: pd.DataFrame, metric: str, target: float, started: float) -> dict[str, float]:
    """Best score, total trial-seconds, and the trial-seconds and wall seconds (from ``started``, the sweep's
    start) spent until a score of at least ``target`` was first reported (NaN when never)."""
    spent = rows["time_this_iter_s"].cumsum()
    reached = rows[metric] >= target
    first = int(reached.idxmax()) if reached.any() else None
    return {"best": float(rows[metric].max()), "trial_s_total": float(spent.iloc[-1]),
            "trial_s_to_target": float("nan") if first is None else float(spent.iloc[first]),
            "wall_s_to_target": float("nan") if first is None else float(rows["timestamp"].iloc[first] - started),
            "epochs": len(rows), "trials_to_max_t": int((rows.groupby("trial")["training_iteration"].max()
                                                         >= rows["training_iteration"].max()).sum())}


def time_to_reach_over_seeds(found: pd.DataFrame) -> pd.DataFrame:
    """Per arm (``found``: one row per arm, seed and category, columns ``arm``, ``trial_s_to_target``,
    ``trial_s_total``), the trial-seconds to reach summed over every seed and category, and as a ratio to the first
    arm's sum; a run that never reached counts its whole trial-time (a lower bound), and ``never`` counts those."""
    filled = found.assign(never=found["trial_s_to_target"].isna(),
                          to_reach=found["trial_s_to_target"].fillna(found["trial_s_total"]))
    table = filled.groupby("arm", sort=False).agg(runs=("to_reach", "size"), never=("never", "sum"),
                                                 trial_s_to_reach=("to_reach", "sum"),
                                                 trial_s_total=("trial_s_total", "sum"))
    first = table.iloc[0]
    return table.assign(to_reach_ratio=table["trial_s_to_reach"] / first["trial_s_to_reach"],
                        total_ratio=table["trial_s_total"] / first["trial_s_total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "search_spaces" / "quickstart.yaml",
                        help="the sweep every arm runs (datasets, cache, space, training settings)")
    parser.add_argument("--trials", type=int, default=12, help="trials per arm")
    parser.add_argument("--meta-epochs", type=int, default=6, help="meta-epochs of a trial that runs to the end")
    parser.add_argument("--sub-epochs", type=int, default=None, help="sub-epochs per meta-epoch (default: the config's)")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS), help="which arms to run, in order")
    parser.add_argument("--within", type=float, default=0.01,
                        help="'reached' = a validation score within this of the best over all arms (of the same search seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="search seeds: every arm runs once per seed and the figures end with the time to reach "
                             "summed over the seeds (default: the config's seed, once)")
    args = parser.parse_args()
    base = load_config(args.config).model_dump(mode="json", exclude_none=True)
    schedule = {"meta_epochs": args.meta_epochs, **({} if args.sub_epochs is None else {"sub_epochs": args.sub_epochs})}
    ray.init(num_cpus=None, include_dashboard=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for seed in args.seeds or [None]:
            for arm in args.arms:
                config = arm_config(base, arm, args.trials, schedule, workdir, seed)
                report = build_cache(config)
                manifest = open_cache(report.uri)
                started = time.time()
                summary = run_sweep(config, report.uri, manifest, config.mlflow.tracking_uri)
                for category, entry in summary["categories"].items():
                    rows = trial_rows(Path(config.tune.storage_path) / summary["sweep_id"] / SEARCH_EXPERIMENT,
                                      category)
                    runs.append((config.search.seed, arm, category, summary["objective"], rows, started,
                                 entry["best"]["test"], summary["seconds"]))
    best = {(seed, category): max(float(rows[metric].max()) for s_, _, c, metric, rows, *_ in runs
                                  if (s_, c) == (seed, category))
            for seed, _, category, *_ in runs}
    print(f"machine: {cpu_flags()}")
    print(f"{args.trials} trials x up to {schedule} per arm, config {args.config.name}; 'reached' = a validation "
          f"score within {args.within} of the best over all arms of the same search seed")
    print("| search seed | arm | category | best val | trial-s to reached | wall s to reached | trial-s total | "
          "meta-epochs run | trials at max_t | test image AUROC | test PRO | sweep wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    found_rows = []
    for seed, arm, category, metric, rows, started, test, seconds in runs:
        found = efficiency(rows, metric, best[seed, category] - args.within, started)
        found_rows.append({"arm": arm, **found})
        print(f"| {seed} | {arm} | {category} | {metric} {found['best']:.3f} | {found['trial_s_to_target']:.0f} | "
              f"{found['wall_s_to_target']:.0f} | {found['trial_s_total']:.0f} | {found['epochs']} | "
              f"{found['trials_to_max_t']} | {test.get('image_auroc', float('nan')):.3f} | "
              f"{test.get('aupro', float('nan')):.3f} | {seconds:.0f} |")
    if args.seeds and len(args.seeds) > 1:
        table = time_to_reach_over_seeds(pd.DataFrame(found_rows))
        print(f"\nSummed over search seeds {args.seeds} (ratios to {args.arms[0]}; a run that never reached counts "
              "its whole trial-time):")
        print("| arm | runs | never reached | trial-s to reached | ratio | trial-s total | ratio |")
        print("|---|---|---|---|---|---|---|")
        for arm, row in table.iterrows():
            print(f"| {arm} | {row['runs']:.0f} | {row['never']:.0f} | {row['trial_s_to_reach']:.0f} | "
                  f"{row['to_reach_ratio']:.2f} | {row['trial_s_total']:.0f} | {row['total_ratio']:.2f} |")


if __name__ == "__main__":
    main()
