"""The paper's BGAD-FAS (strides 4/8/16, per-cell features) with 10 anomalies per defect type vs BGAD without
anomalies on real magnetic-tile data: the comparison with the paper's own code. ``bench_accuracy`` measures the
library's defaults against PatchCore.

Reference protocol MTD-200 (../shared/data/README.md): first 200 training normals, 10 anomalies per defect type
excluded from evaluation, lite0 at 256 px, beta 1 %, tau 0.1, normalizer 10, lambda 1, focal weighting,
3 meta-epochs x 2 sub-epochs. Epochs are selected on validation; test is evaluated once.

    .venv/bin/python -m benchmarks.bench_mtd [--data ../shared/data/mtd/magnetic_tile] [--meta-epochs 3]
        [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from bgad_core.models.bgad.config import BGADConfig
from bgad_core.train import DataConfig, run

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd" / "magnetic_tile"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the magnetic-tile category folder")
    parser.add_argument("--image-size", type=int, default=256, help="square input size in pixels")
    parser.add_argument("--meta-epochs", type=int, default=3, help="meta-epochs (validation after each)")
    parser.add_argument("--sub-epochs", type=int, default=2, help="sub-epochs per meta-epoch")
    parser.add_argument("--train-normals", type=int, default=200, help="first N training normals (MTD-200: 200)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="matmuls of the training steps")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"skipped: real data not found at {args.data}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = BGADConfig(meta_epochs=args.meta_epochs, sub_epochs=args.sub_epochs, warmup_epochs=1,
                        precision=args.precision, local_aggregation=1)
    rows = []
    for label, anomalies in (("BGAD, no anomalies", 0), ("BGAD-FAS, 10 anomalies/type", 10)):
        data = DataConfig(str(args.data), image_size=args.image_size, num_anomalies=anomalies,
                          max_train_normals=args.train_normals, held_out_anomalies=10)
        started = time.perf_counter()
        summary = run(data, config, "tf_efficientnet_lite0", "offline", (4, 8, 16), None)
        rows.append((label, summary, time.perf_counter() - started))
    print("| run | best epoch (val) | test image AUROC | test pixel AUROC | test PRO | wall s |")
    print("|---|---|---|---|---|---|")
    for label, summary, seconds in rows:
        test = summary["test"]
        print(f"| {label} | {summary['best_epoch']} | {test['image_auroc']:.3f} | {test['pixel_auroc']:.3f} | "
              f"{test['aupro']:.3f} | {seconds:.0f} |")
    print(json.dumps([{"run": r[0], **r[1]} for r in rows]))


if __name__ == "__main__":
    main()
