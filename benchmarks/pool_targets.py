"""Issue 21's inequalities over several draws: each draw's gap, and the mean gap with its bootstrap interval.

With one labelled anomaly and a test split of about 55 images, one draw's gap of test image AUROC between two arms
whose maps differ has a paired 95 % interval 0.14-0.27 wide (DeepPCB; ``bench_accuracy`` prints it), so a per-draw
inequality with a 0.01 tolerance is met or missed by the draw as much as by the method. Several draws of the same protocol
(``--split-seed``) tell more together: their mean gap. Each draw's ``bench_accuracy --json`` file holds its
resampled gaps (the same test images resampled for both arms); the draws were resampled independently, so the
element-wise mean of their resampled gaps is the bootstrap distribution of the mean gap, and its percentile interval
says whether the mean clears the bound.

    .venv/bin/python -m benchmarks.pool_targets results/deeppcb-a-il-s0.json results/deeppcb-a-il-s1.json ...
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.bench_accuracy import target_verdict
from bgad_core.evaluation.intervals import percentile_interval


def draw_name(result: dict) -> str:
    """``deeppcb-a (image-level labels), split seed 2``: which protocol and draw a result file holds."""
    variant = ", ".join(([] if result.get("stress") is None else [result["stress"]])
                        + (["image-level labels"] if result.get("image_level_labels") else []))
    return f"{result['dataset']}{f' ({variant})' if variant else ''}, split seed {result['split_seed']}"


def pooled(results: Sequence[dict]) -> list[dict]:
    """Per (reference arm, metric) that every result holds: the mean gap over the draws, its interval, the verdict
    against the bound, and how many draws met it alone."""
    keys = [(t["against"], t["metric"]) for t in results[0]["targets"]]
    rows = []
    for against, metric in keys:
        targets = [next((t for t in r["targets"] if (t["against"], t["metric"]) == (against, metric)), None)
                   for r in results]
        if any(t is None for t in targets):
            continue
        gaps = np.mean([np.asarray(t["resampled_gaps"], dtype=np.float64) for t in targets], axis=0)
        mean = float(np.mean([t["gap"] for t in targets]))
        lo, hi = percentile_interval(gaps)
        bound = targets[0]["bound"]
        rows.append({"against": against, "metric": metric, "gap": mean, "lo": lo, "hi": hi, "bound": bound,
                     "verdict": target_verdict(mean, hi, bound), "draws": len(targets),
                     "draws_met": sum(t["verdict"] == "met" for t in targets)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="bench_accuracy --json files, one per draw")
    args = parser.parse_args()
    results = []
    for path in args.results:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: not a readable bench_accuracy --json file ({error})") from error
        if not result.get("targets"):
            raise SystemExit(f"{path}: no 'targets' (run bench_accuracy with the BGAD-FAS arm and a reference arm, "
                             "at or after the version that writes them)")
        results.append(result)
    print("| draw | against | metric | gap | paired 95 % interval | verdict |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for t in result["targets"]:
            print(f"| {draw_name(result)} | {t['against']} | {t['metric']} | {t['gap']:+.3f} | "
                  f"[{t['lo']:+.3f}, {t['hi']:+.3f}] | {t['verdict']} |")
    print(f"\nover the {len(results)} draws: the mean gap, its 95 % interval (the draws' resampled gaps averaged)")
    print("| against | metric | mean gap | interval | bound | verdict | draws met alone |")
    print("|---|---|---|---|---|---|---|")
    for row in pooled(results):
        print(f"| {row['against']} | {row['metric']} | {row['gap']:+.3f} | [{row['lo']:+.3f}, {row['hi']:+.3f}] | "
              f"{row['bound']:+.2f} | {row['verdict']} | {row['draws_met']} of {row['draws']} |")


if __name__ == "__main__":
    main()
