"""The default cross-family sweep on each shared dataset: the validation winner and each family's best (issue 22).

Each run is ``search_spaces/cross_family.yaml`` as shipped (its three families and their spaces, TPE, ASHA, the
plateau rule, the default objective: the mean of validation PRO and image AUROC where masks exist, else image AUROC)
on one shared protocol of ``benchmarks.bench_accuracy`` (the same data settings: anomalies per defect type or in
total, training normals). Only what a 2-core CPU forces is overridden: the image size (128 px by default;
``--image-size 256`` is the YAML's), the trial count, the schedule (meta-epochs x sub-epochs, one warm-up meta-epoch),
two 1-CPU trial slots, the offline lite0 weights, no paper-default run. A protocol with one labelled anomaly in total
fixes ``num_anomalies`` at 1 (the space's range cannot exceed what the data has).

The sweep tests only its validation winner. To say what the pick cost, this script then reads each family's best
trial (its best selectable checkpoint) on the test split as well; that read chooses nothing.

    .venv/bin/python -m benchmarks.bench_cross_family [--datasets mtd kolektor brainmri deeppcb-a deeppcb-b]
        [--trials 8] [--meta-epochs 4] [--sub-epochs 2] [--image-size 128] [--workdir runs/bench-cross-family]

Results (cache, Tune, Optuna, MLflow) stay under ``--workdir``: running the same command again resumes an
interrupted sweep and reprints the table of finished ones.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

# as sweeper/run.py: no Tune header boxes, no warning about checkpointing every meta-epoch
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import ray  # noqa: E402
import yaml  # noqa: E402
from ray import tune  # noqa: E402

from benchmarks.bench_accuracy import PROTOCOLS, SHARED, STRESS, protocol_data  # noqa: E402
from benchmarks.machine import cpu_description  # noqa: E402
from sweeper.cache.build import build_cache  # noqa: E402
from sweeper.cache.reader import open_cache  # noqa: E402
from sweeper.job.config import SweepConfig  # noqa: E402
from sweeper.tuning.sweep import MODE, SEARCH_EXPERIMENT, checkpoint_evaluation, run_sweep  # noqa: E402
from sweeper.tuning.trainable import SELECTION_KEY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "cross_family.yaml"
SHOWN = ("image_auroc", "pixel_auroc", "aupro")


def sweep_config(dataset: str, trials: int, meta_epochs: int, sub_epochs: int, image_size: int, workdir: Path,
                 data_root: Path, space: Path = SPACE, **sections: dict[str, Any]) -> SweepConfig:
    """A sweep YAML (``cross_family.yaml`` by default) on one shared protocol, sized for this CPU, its results under
    ``workdir/<dataset>``; ``sections`` update the YAML's sections last (e.g. ``search={"seed": 3}``)."""
    stress = next((s for s in STRESS if dataset.endswith(f"-{s}")), None)
    protocol = dataset.removesuffix(f"-{stress}") if stress else dataset
    data = protocol_data(protocol, data_root, stress, workdir / "stress")
    raw = yaml.safe_load(space.read_text())
    folder = workdir / dataset
    raw["name"] = f"cross-family-{dataset}"
    raw["datasets"] = [{"path": data.data}]
    raw["data"] = {**raw.get("data", {}), "image_size": image_size, "per_defect_type": data.per_defect_type,
                   "max_train_normals": data.max_train_normals}
    raw["backbone"] = {"weights": "offline"}
    raw["cache"] = {**raw["cache"], "root": str(folder / "cache"), "max_anomalies": data.num_anomalies}
    if data.num_anomalies == 1:
        for searched in [raw["search"].get("space", {}), *raw["search"].get("families", {}).values()]:
            searched.pop("num_anomalies", None)
    raw["train"] = {"meta_epochs": meta_epochs, "sub_epochs": sub_epochs, "warmup_epochs": 1}
    raw["search"] = {**raw["search"], "num_samples": trials, "compare_paper_default": False}
    raw["tune"] = {**raw["tune"], "max_concurrent_trials": 2, "gpus_per_trial": 0, "cpus_per_trial": 1,
                   "storage_path": str(folder / "tune"), "optuna_storage": f"sqlite:///{folder / 'optuna.db'}",
                   "selection": {"label_free_twin": False}}  # which family validation picks, not the guard
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
                     "artifact_location": str(folder / "mlartifacts"), "experiment": "bench-cross-family",
                     "log_plots": False}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return SweepConfig.model_validate(raw)


def trial_tests(config: SweepConfig, sweep: str, experiment: str, trial_ids: list[str], manifest: dict[str, Any],
                category: str) -> dict[str, dict[str, Any]]:
    """Each named trial of one experiment of the sweep, read on test from its best selectable checkpoint (the
    summary's figures for a trial the sweep tested itself)."""
    analysis = tune.ExperimentAnalysis(str(Path(config.tune.storage_path) / sweep / experiment))
    trials = {trial.trial_id: trial for trial in analysis.trials}
    return {trial_id: checkpoint_evaluation(analysis.get_best_checkpoint(trials[trial_id], metric=SELECTION_KEY,
                                                                          mode=MODE), manifest, category).entry
            for trial_id in trial_ids}


def family_tests(config: SweepConfig, summary: dict[str, Any], manifest: dict[str, Any],
                 category: str) -> dict[str, dict[str, Any]]:
    """Each family's best trial (the summary's ``families``) read on test; a family without a selectable epoch
    in any of its trials is left out."""
    bests = {name: best for name, best in summary["categories"][category]["families"].items()
             if best["trial_id"] is not None}
    tested = trial_tests(config, summary["sweep_id"], SEARCH_EXPERIMENT, [best["trial_id"] for best in bests.values()],
                         manifest, category)
    return {name: {**tested[best["trial_id"]], **best} for name, best in bests.items()}


def figures(test: dict[str, float]) -> str:
    """Test image AUROC / pixel AUROC / PRO, "-" where the split has no masks."""
    return " / ".join(f"{test[k]:.3f}" if k in test else "-" for k in SHOWN)


def add_sweep_size_arguments(parser: argparse.ArgumentParser, workdir: Path) -> None:
    """The flags that size a benchmark sweep for this CPU, and where it keeps its results."""
    parser.add_argument("--trials", type=int, default=8, help="trials per sweep (the YAML's num_samples)")
    parser.add_argument("--meta-epochs", type=int, default=4, help="meta-epochs per trial (cross_family.yaml: 25)")
    parser.add_argument("--sub-epochs", type=int, default=2, help="passes per meta-epoch (cross_family.yaml: 8)")
    parser.add_argument("--image-size", type=int, default=128, help="input side in pixels (cross_family.yaml: 256)")
    parser.add_argument("--workdir", type=Path, default=workdir,
                        help="cache, Tune, Optuna and MLflow of every sweep; kept, so a rerun resumes")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="the shared data folder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = sorted([*PROTOCOLS, *(f"{p}-{s}" for p in PROTOCOLS for s in STRESS)])
    parser.add_argument("--datasets", nargs="+", choices=choices,
                        default=["mtd", "kolektor", "brainmri", "deeppcb-a", "deeppcb-b"],
                        help="shared protocols to sweep, one after another (a -shift-rotate suffix: the stress copy)")
    add_sweep_size_arguments(parser, ROOT / "runs" / "bench-cross-family")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"machine: {cpu_description(1)} per trial, 2 trial slots; {args.trials} trials x up to "
          f"{args.meta_epochs} x {args.sub_epochs} per sweep, {args.image_size} px")
    print("| data | objective | family | trials | best val | its test image AUROC / pixel AUROC / PRO | "
          "validation picks |")
    print("|---|---|---|---|---|---|---|")
    costs = []
    for dataset in args.datasets:
        config = sweep_config(dataset, args.trials, args.meta_epochs, args.sub_epochs, args.image_size, args.workdir,
                              args.data_root)
        started = time.monotonic()
        report = build_cache(config)
        manifest = open_cache(report.uri)
        summary = run_sweep(config, report.uri, manifest, config.mlflow.tracking_uri)
        objective = summary["objective"].removeprefix("val_")
        for category, entry in summary["categories"].items():
            tested = family_tests(config, summary, manifest, category)
            winner = entry["best"]["family"]
            for name, row in sorted(tested.items(), key=lambda item: -item[1]["val"]):
                print(f"| {dataset} | {objective} | {name} | {row['trials']} | {row['val']:.3f} | "
                      f"{figures(row['test'])} | {'**yes**' if name == winner else ''} |")
            baseline = entry.get("baseline")
            if baseline is not None:
                print(f"| {dataset} | {objective} | PatchCore at its defaults (baseline, not a candidate) | 1 | "
                      f"{baseline['val'][objective]:.3f} | {figures(baseline['test'])} | |")
            best_test = max(row["test"][objective] for row in tested.values())
            costs.append((dataset, winner, entry["best"]["test"][objective] - best_test, entry["trials"],
                          time.monotonic() - started))
    print()
    for dataset, winner, cost, counts, seconds in costs:
        print(f"{dataset}: validation picks {winner}; test {'cost of the pick ' + format(cost, '.3f') if cost < 0 else 'agrees'}; "
              f"trials finished/pruned/failed {counts['finished']}/{counts['pruned']}/{counts['failed']}; "
              f"{seconds:.0f} s with the cache")


if __name__ == "__main__":
    main()
