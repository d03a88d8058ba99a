"""Noise-aware selection against plain argmax: optimism and test score over several sweep seeds (issue 24).

Each sweep is ``search_spaces/mtd_benchmark.yaml`` (BGAD / BGAD-FAS, TPE + ASHA, validation image AUROC) on one
shared protocol of ``benchmarks.bench_accuracy``, sized for a 2-core CPU (``--image-size``, ``--trials``,
``--meta-epochs``), run once per Optuna seed with ``tune.selection.rule: reseed``. One run gives both rules' picks:
argmax is the top candidate the rule starts from, the rule's pick is the run it deploys (the same trial when
nothing ties). For each pick it reports the validation figure, the test figure (each trial's best selectable
checkpoint, read once) and their gap, the optimism; and the trial-seconds the re-seeded runs added.

    .venv/bin/python -m benchmarks.bench_selection [--datasets mtd brainmri] [--seeds 5] [--trials 8]
        [--meta-epochs 4] [--image-size 128] [--candidates 3] [--reseeds 2] [--workdir runs/bench-selection]
"""

from __future__ import annotations

import argparse
from statistics import fmean
from pathlib import Path
from typing import Any

import ray

from benchmarks.bench_accuracy import PROTOCOLS
from benchmarks.bench_asha import trial_rows
from benchmarks.bench_cross_family import ROOT, add_sweep_size_arguments, sweep_config, trial_tests
from benchmarks.machine import cpu_description
from sweeper.cache.build import build_cache
from sweeper.cache.reader import open_cache
from sweeper.tuning.sweep import run_sweep

SPACE = ROOT / "search_spaces" / "mtd_benchmark.yaml"


def trial_seconds(folder: Path) -> float:
    """Training seconds of every trial of the Tune experiment in ``folder``."""
    return float(trial_rows(folder)["time_this_iter_s"].sum())


def picks(config: Any, summary: dict[str, Any], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Per category: argmax's and the rule's pick, each with its validation and test objective."""
    key = summary["objective"].removeprefix("val_")
    rows = []
    for category, entry in summary["categories"].items():
        selection = entry["selection"]
        argmax = (selection.get("candidates") or [selection["chosen"]])[0]
        deployed = entry["best"]
        if argmax == deployed["trial_id"]:
            first = deployed
        else:
            first = trial_tests(config, summary["sweep_id"], category, [argmax], manifest, category)[argmax]
        tune_folder = Path(config.tune.storage_path) / summary["sweep_id"]
        rows.append({"category": category, "tied": len(selection.get("tied", [argmax])),
                     "argmax": (first["val"][key], first["test"][key]),
                     "rule": (deployed["val"][key], deployed["test"][key]),
                     "sweep_s": trial_seconds(tune_folder / category),
                     "reseed_s": sum(trial_seconds(f) for f in tune_folder.glob(f"{category}-reseed-*"))})
    return rows


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
    print("| data | sweep seed | tied | argmax val / test | rule val / test | trial-s of the sweep | of the re-runs |")
    print("|---|---|---|---|---|---|---|")
    table: dict[str, list[dict[str, Any]]] = {}
    for dataset in args.datasets:
        for seed in range(args.seeds):
            config = sweep_config(dataset, args.trials, args.meta_epochs, args.sub_epochs, args.image_size,
                                  args.workdir, args.data_root, SPACE, name=f"selection-{dataset}-{seed}",
                                  search={"seed": seed},
                                  tune={"selection": {"rule": "reseed", "max_candidates": args.candidates,
                                                      "seeds": args.reseeds}})
            report = build_cache(config)
            manifest = open_cache(report.uri)
            summary = run_sweep(config, report.uri, manifest, config.mlflow.tracking_uri)
            for row in picks(config, summary, manifest):
                table.setdefault(dataset, []).append(row)
                print(f"| {dataset} | {seed} | {row['tied']} | {row['argmax'][0]:.3f} / {row['argmax'][1]:.3f} | "
                      f"{row['rule'][0]:.3f} / {row['rule'][1]:.3f} | {row['sweep_s']:.0f} | {row['reseed_s']:.0f} |",
                      flush=True)
    print("\n| data | sweeps | optimism (val - test), argmax | rule | test, argmax | rule | extra trial-time |")
    print("|---|---|---|---|---|---|---|")
    for dataset, rows in table.items():
        optimism = {arm: fmean(r[arm][0] - r[arm][1] for r in rows) for arm in ("argmax", "rule")}
        test = {arm: fmean(r[arm][1] for r in rows) for arm in ("argmax", "rule")}
        extra = 100 * sum(r["reseed_s"] for r in rows) / sum(r["sweep_s"] for r in rows)
        print(f"| {dataset} | {len(rows)} | {optimism['argmax']:+.3f} | {optimism['rule']:+.3f} | "
              f"{test['argmax']:.3f} | {test['rule']:.3f} | {extra:.0f} % |")

if __name__ == "__main__":
    main()
