"""The memory bank's coreset ratio: the nearest-normal distances alone, no training, per ratio side by side.

BGAD's nearest-normal distances (``bgad_core.models.components.memory_bank.NearestNormal``) keep a greedy coreset of
the training normals' patches, 1 % of them by default, as PatchCore does. On ~140 DeepPCB images that is 1,400
patches out of 140,000, and which 1,400 moved board_b's test pixel AUROC from 0.912 to 0.847 when the bank stopped
leaving every 8th normal out (BENCHMARKS.md, eleventh session). This script fills one bank per ratio from a shared
protocol's training normals and prints the validation and test figures of a map of distances alone (upsampled and
blurred as BGAD's map of distances alone is, its maximum the image score) and the fill's wall time (the coreset
selection and the calibration), with the CPU it ran on. First it times one greedy pick on the normals' projected
patches held as rows and as columns (``greedy_coreset`` holds columns), side by side; last it fills every ratio's
bank from one greedy run (``fit_banks``, what ``nearest_normal_coreset_ratio: auto`` fills) and times that.

    .venv/bin/python -m benchmarks.bench_memory_bank --dataset deeppcb-b [--ratios 0.01 0.1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench_accuracy import PROTOCOLS, SHARED, cpu_flags, protocol_data
from bgad_core.backbone import DEFAULT_STRIDES, FeatureExtractor
from bgad_core.data.features import FeatureSet
from bgad_core.models.base import split_metrics
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.scoring import image_scores
from bgad_core.models.components.memory_bank import PROJECTION_DIM, NearestNormal, fit_banks, flat_patches
from bgad_core.models.components.postprocess import gaussian_blur, upsample
from bgad_core.train import build_feature_sets

FIGURES = ("image_auroc", "pixel_auroc", "aupro")


def distance_figures(bank: NearestNormal, split: FeatureSet, image_size: tuple[int, int]) -> str:
    """``split``'s image AUROC / pixel AUROC / PRO of a map of ``bank``'s distances alone ("nan" without masks)."""
    maps = gaussian_blur(upsample(bank.predict(split), image_size), BGADConfig.blur_sigma)
    metrics = split_metrics(split, image_scores(maps, "max"), maps)
    return " / ".join(f"{metrics.get(name, float('nan')):.3f}" for name in FIGURES)


def pick_milliseconds(patches: torch.Tensor, repeats: int = 50) -> tuple[float, float]:
    """Milliseconds of one greedy pick's product (a pick against every projected patch) with the patches held as
    rows ``(N, D)`` and as columns ``(D, N)``, the mean of ``repeats`` each."""
    generator = torch.Generator().manual_seed(0)
    rows = patches @ (torch.randn(patches.shape[1], PROJECTION_DIM, generator=generator) / PROJECTION_DIM**0.5)
    columns = rows.T.contiguous()
    center = rows[0].clone()
    times = []
    for product in (lambda: rows @ center, lambda: center @ columns):
        product()
        started = time.perf_counter()
        for _ in range(repeats):
            product()
        times.append((time.perf_counter() - started) / repeats * 1e3)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(PROTOCOLS), default="deeppcb-b", help="which shared protocol")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1],
                        help="coreset ratios to compare, each in (0, 1] (1: every patch; slow on large sets)")
    args = parser.parse_args()
    data = protocol_data(args.dataset, args.data_root)
    extractor = FeatureExtractor("tf_efficientnet_lite0", weights="offline", strides=DEFAULT_STRIDES)
    _, _, train, val, test = build_feature_sets(data, extractor)
    normals = train.select(torch.nonzero(train.labels == 0).flatten())
    size = (data.image_size, data.image_size)
    print(f"machine: {cpu_flags()}")
    as_rows, as_columns = pick_milliseconds(flat_patches(list(normals.features)))
    print(f"one greedy pick over {normals.features[0].shape[0]} normals' patches: rows {as_rows:.2f} ms, "
          f"columns {as_columns:.2f} ms ({as_rows / as_columns:.1f}x)")
    print(f"{args.dataset}: {len(normals)} training normals, val {len(val)}, test {len(test)}; distances alone, "
          f"image AUROC / pixel AUROC / PRO")
    print("| coreset ratio | bank rows | validation | test | fill s |")
    print("|---|---|---|---|---|")
    for ratio in args.ratios:
        started = time.perf_counter()
        bank = NearestNormal().fit(list(normals.features), ratio, BGADConfig.seed)
        seconds = time.perf_counter() - started
        print(f"| {ratio:g} | {bank.bank.shape[0]} | {distance_figures(bank, val, size)} | "
              f"{distance_figures(bank, test, size)} | {seconds:.0f} |", flush=True)
    started = time.perf_counter()
    fit_banks(list(normals.features), args.ratios, BGADConfig.seed)
    print(f"every ratio's bank from one greedy run (fit_banks): {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
