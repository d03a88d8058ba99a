"""Noise-aware selection against plain argmax: optimism and test score over several sweep seeds (issue 24).

Each sweep is ``search_spaces/mtd_benchmark.yaml`` (BGAD / BGAD-FAS, TPE + ASHA, validation image AUROC) on one
shared protocol of ``benchmarks.bench_accuracy``, sized for a 2-core CPU (``--image-size``, ``--trials``,
``--meta-epochs``), run once per Optuna seed with ``tune.selection.rule: reseed``. One run gives three picks:
argmax is the top candidate the rule starts from; the rule's pick is the run it deploys, the held-out re-run of the
configuration chosen on its other runs (the same trial as argmax when nothing ties); the rule's first version,
replayed from the same runs, chose on the mean of all runs and deployed the first re-run. For each pick it reports
the validation figure, the test figure (each trial's best selectable checkpoint, read once) and their gap, the
optimism; and the trial-seconds the re-seeded runs added.

    .venv/bin/python -m benchmarks.bench_selection [--datasets mtd brainmri] [--seeds 5] [--trials 8]
        [--meta-epochs 4] [--image-size 128] [--candidates 3] [--reseeds 2] [--workdir runs/bench-selection]
"""

from __future__ import annotations

import argparse
from statistics import fmean
from pathlib import Path
from typing import Any

import ray
from ray import tune

from benchmarks.bench_accuracy import PROTOCOLS
from benchmarks.bench_asha import trial_rows
from benchmarks.bench_cross_family import ROOT, add_sweep_size_arguments, sweep_config, trial_tests
from benchmarks.machine import cpu_description
from sweeper.cache.build import build_cache
from sweeper.cache.reader import open_cache
from sweeper.tuning.selection import RERUN_KEY, choose
from sweeper.tuning.sweep import SEARCH_EXPERIMENT, reseed_experiment, run_sweep

SPACE = ROOT / "search_spaces" / "mtd_benchmark.yaml"
ARMS = ("argmax", "first", "rule")  # plain argmax, the reseed rule's first version, the rule as it deploys


def trial_seconds(folder: Path, category: str | None = None) -> float:
    """Training seconds of every trial (of ``category``, where given) of the Tune experiment in ``folder``."""
    return float(trial_rows(folder, category)["time_this_iter_s"].sum())


def picks(config: Any, summary: dict[str, Any], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Per category, three picks, each with its validation and test objective: argmax; the ``reseed`` rule as it
    deploys (the held-out re-run of the configuration chosen on the others); and its first version, replayed from
    the same runs (the configuration with the best mean over all its runs, deploying its first re-run)."""
    key = summary["objective"].removeprefix("val_")
    rows = []
    for category, entry in summary["categories"].items():
        selection = entry["selection"]
        argmax = (selection.get("candidates") or [selection["chosen"]])[0]
        deployed = entry["best"]
        reseed = reseed_experiment(category)
        first_version = argmax
        if "runs" in selection:
            everything = {trial: [*runs, selection["held_out"][trial]] for trial, runs in selection["runs"].items()}
            first_version = rerun_of(config, summary["sweep_id"], reseed, choose(everything), seed=1)
        tested = {deployed["trial_id"]: deployed}
        for trial in {argmax, first_version} - set(tested):
            experiment = SEARCH_EXPERIMENT if trial == argmax else reseed
            tested.update(trial_tests(config, summary["sweep_id"], experiment, [trial], manifest, category))
        tune_folder = Path(config.tune.storage_path) / summary["sweep_id"]
        rows.append({"category": category, "tied": len(selection.get("tied", [argmax])),
                     **{arm: (tested[trial]["val"][key], tested[trial]["test"][key])
                        for arm, trial in (("argmax", argmax), ("first", first_version),
                                           ("rule", deployed["trial_id"]))},
                     "sweep_s": trial_seconds(tune_folder / SEARCH_EXPERIMENT, category),
                     "reseed_s": trial_seconds(tune_folder / reseed) if (tune_folder / reseed).is_dir() else 0.0})
    return rows


def rerun_of(config: Any, sweep: str, experiment: str, trial_id: str, seed: int) -> str:
    """The id of the re-run of ``trial_id`` with ``seed`` in the sweep's re-seed experiment."""
    analysis = tune.ExperimentAnalysis(str(Path(config.tune.storage_path) / sweep / experiment))
    [found] = [t.trial_id for t in analysis.trials if t.config.get(RERUN_KEY) == trial_id and t.config["seed"] == seed]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(PROTOCOLS), default=["mtd", "brainmri"],
                        help="shared protocols, one after another")
    parser.add_argument("--seeds", type=int, default=5, help="sweeps per dataset, Optuna seeds 0..N-1")
    add_sweep_size_arguments(parser, ROOT / "runs" / "bench-selection")
    parser.add_argument("--candidates", type=int, default=3, help="tune.selection.max_candidates")
    parser.add_argument("--reseeds", type=int, default=2, help="tune.selection.seeds")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"machine: {cpu_description(1)} per trial, 2 trial slots; {args.trials} trials x up to {args.meta_epochs} "
          f"x {args.sub_epochs}, {args.image_size} px; reseed: top {args.candidates}, {args.reseeds} more seeds")
    print("| data | sweep seed | tied | argmax val / test | first version val / test | rule (held-out run) val / test "
          "| trial-s of the sweep | of the re-runs |")
    print("|---|---|---|---|---|---|---|---|")
    table: dict[str, list[dict[str, Any]]] = {}
    for dataset in args.datasets:
        for seed in range(args.seeds):
            config = sweep_config(dataset, args.trials, args.meta_epochs, args.sub_epochs, args.image_size,
                                  args.workdir, args.data_root, SPACE, name=f"selection-{dataset}-{seed}",
                                  search={"seed": seed},
                                  tune={"selection": {"rule": "reseed", "max_candidates": args.candidates,
                                                      "seeds": args.reseeds, "label_free_twin": False}})
            report = build_cache(config)
            manifest = open_cache(report.uri)
            summary = run_sweep(config, report.uri, manifest, config.mlflow.tracking_uri)
            for row in picks(config, summary, manifest):
                table.setdefault(dataset, []).append(row)
                print(f"| {dataset} | {seed} | {row['tied']} | "
                      + " | ".join(f"{row[arm][0]:.3f} / {row[arm][1]:.3f}" for arm in ARMS)
                      + f" | {row['sweep_s']:.0f} | {row['reseed_s']:.0f} |", flush=True)
    print("\n| data | sweeps | optimism (val - test): argmax / first version / rule | test: argmax / first version / "
          "rule | extra trial-time |")
    print("|---|---|---|---|---|")
    for dataset, rows in table.items():
        optimism = " / ".join(f"{fmean(r[arm][0] - r[arm][1] for r in rows):+.3f}" for arm in ARMS)
        test = " / ".join(f"{fmean(r[arm][1] for r in rows):.3f}" for arm in ARMS)
        extra = 100 * sum(r["reseed_s"] for r in rows) / sum(r["sweep_s"] for r in rows)
        print(f"| {dataset} | {len(rows)} | {optimism} | {test} | {extra:.0f} % |")

if __name__ == "__main__":
    main()
