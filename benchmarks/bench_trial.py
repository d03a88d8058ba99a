"""Trial wall time: cached features vs the backbone every sub-epoch, and a paper-schedule trial on real data.

``--paper-schedule``: one default BGAD-FAS trial on the shared MTD-200 split at 256 px with the paper's 25 x 8 epochs,
as a sweep trial runs it (features once, validation after every meta-epoch, selection on the default validation
objective, test once). Prints the wall time split into data loading (decode + backbone), training and validation, with
the vectors/s of each, and validation and test (recorded only) after every meta-epoch: the learning curve.

    .venv/bin/python -m benchmarks.bench_trial --paper-schedule [--stop-after K] [--set KEY=VALUE ...] [--json F]
        [--device cuda]

Without it: training on cached features vs recomputing the backbone every sub-epoch, at equal epochs.

The paper's code runs the backbone on every batch of every epoch. Both arms here train the same flows with the
same seeds on the same images (normals, drawn anomalies and their RACP samples, 256 px): "cached"
extracts features once, as the feature cache does, then trains; "recompute" runs the backbone over the training
images before every sub-epoch, resuming the trainer from its state in between. The final flow weights of both
arms are compared, so the speed-up is shown at identical results.

    .venv/bin/python -m benchmarks.bench_trial [--sub-epochs 8] [--image-size 256]
    .venv/bin/python -m benchmarks.bench_trial --backbone tf_efficientnet_b6 --weights random   # the paper's

The backbone's weights do not change its cost: ``--weights random`` times the paper's b6 where no hub is reachable.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_accuracy import SHARED, cpu_flags, parse_overrides, protocol_data
from bgad_core.backbone import DEFAULT_STRIDES, FeatureExtractor
from bgad_core.data.features import extract_feature_set
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.data.synthetic import make_synthetic_category
from bgad_core.engine.selection import seed_everything, train_and_select
from bgad_core.evaluation.metrics import objective_metric
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.training import BGADTraining
from bgad_core.train import DataConfig, TrainingImages, build_feature_sets, load_training_images


def config_for(sub_epochs: int) -> BGADConfig:
    """One sub-epoch per meta-epoch, so the recompute arm can re-extract between them; phase 2 from the second."""
    return BGADConfig(meta_epochs=sub_epochs, sub_epochs=1, normal_epochs=1, warmup_epochs=1, lr=1e-3)


def features_of(extractor: FeatureExtractor, training: TrainingImages):
    return extract_feature_set(extractor, training.images, training.masks, training.labels, training.ids)


def cached_arm(extractor: FeatureExtractor, training: TrainingImages, sub_epochs: int) -> BGADTraining:
    seed_everything(0)
    config = config_for(sub_epochs)
    trainer = BGADTraining(BGADFlows.from_config(extractor.channels, config), config, features_of(extractor, training))
    for _ in range(sub_epochs):
        trainer.train_meta_epoch()
    return trainer


def recompute_arm(extractor: FeatureExtractor, training: TrainingImages, sub_epochs: int) -> BGADTraining:
    seed_everything(0)
    model = BGADFlows.from_config(extractor.channels, config_for(sub_epochs))
    state = None
    for _ in range(sub_epochs):
        trainer = BGADTraining(model, config_for(sub_epochs), features_of(extractor, training))
        if state is not None:
            trainer.load_state_dict(state)
        trainer.train_meta_epoch()
        state = trainer.state_dict()
    return trainer


def paper_schedule_trial(data: DataConfig, config: BGADConfig, stop_after: int | None = None,
                         device: str = "cpu") -> dict:
    """One default trial at ``config``'s schedule (the paper's 25 x 8 on MTD-200 from the command line): where its
    wall time goes, and its learning curve. Prints the table and returns every figure.

    ``stop_after`` trains only the first meta-epochs of that schedule and extrapolates the full trial's time.
    """
    started = time.perf_counter()
    extractor = FeatureExtractor("tf_efficientnet_lite0", weights="offline", strides=DEFAULT_STRIDES).to(device)
    _, has_masks, train, val, test = build_feature_sets(data, extractor)
    loading = time.perf_counter() - started
    images = len(train) + len(val) + len(test)
    seed_everything(config.seed)
    trainer = BGADTraining(BGADFlows.from_config(extractor.channels, config), config, train, device)
    cells = sum(f.shape[2] * f.shape[3] for f in train.features)
    objective = objective_metric(has_masks)
    size = (data.image_size, data.image_size)
    best = train_and_select(trainer, val, test, size, objective, test_every_epoch=True, stop_after=stop_after)
    ran = len(best.history)
    training = sum(h["train_seconds"] for h in best.history)
    validation = sum(h["val_seconds"] for h in best.history)
    # per sub-epoch: every normal once, plus abnormal_ratio as many drawn anomalies from phase 2 on
    normals = int((train.labels == 0).sum())
    phase2_images = normals + max(1, round(normals * config.abnormal_ratio))
    trained = config.sub_epochs * cells * (min(ran, config.normal_epochs) * normals
                                           + max(0, ran - config.normal_epochs) * phase2_images)
    scored = ran * cells * (len(val) + min(normals, 512 if config.calibration == "position" else 64))
    # a stopped run: the remaining meta-epochs cost what its phase-2 ones cost on average
    phase2 = [h for h in best.history if h["phase"] == 2] or best.history
    remaining = (config.meta_epochs - ran) * sum(h["train_seconds"] + h["val_seconds"] for h in phase2) / len(phase2)
    total = time.perf_counter() - started
    print(f"machine: {cpu_flags()}; device {device}")
    print(f"{Path(data.data).name}, lite0 (offline), {data.image_size} px, {config.meta_epochs} x {config.sub_epochs} "
          f"epochs")
    print("| part | wall s | vectors/s |")
    print("|---|---|---|")
    print(f"| data loading (decode + backbone, {images} images) | {loading:.0f} | {images * cells / loading:,.0f} |")
    print(f"| training | {training:.0f} | {trained / training:,.0f} |")
    print(f"| validation (normalisation + val split, every meta-epoch) | {validation:.0f} | {scored / validation:,.0f} |")
    print(f"| total ({ran} of {config.meta_epochs} meta-epochs, with the curve's test after each) | {total:.0f} | |")
    if ran < config.meta_epochs:
        print(f"| estimated full schedule (the rest at this run's phase-2 training + validation mean) | "
              f"{total + remaining:.0f} | |")
    print(f"selected meta-epoch {best.epoch} on val {objective}; test once: " +
          ", ".join(f"{k} {best.test.metrics.get(k, float('nan')):.3f}" for k in ("image_auroc", "pixel_auroc", "aupro")))
    for h in best.history:
        print(f"curve | {h['epoch']} | val image {h['val']['image_auroc']:.3f} PRO {h['val'].get('aupro', float('nan')):.3f} | "
              f"test image {h['test']['image_auroc']:.3f} PRO {h['test'].get('aupro', float('nan')):.3f} | "
              f"train {h['train_seconds']:.0f} s")
    return {"machine": cpu_flags(), "device": device, "config": config.to_dict(), "loading_s": loading,
            "training_s": training, "validation_s": validation, "total_s": total,
            "training_vectors_per_s": trained / training, "remaining_s_estimate": remaining, "epoch": best.epoch,
            "test": best.test.metrics, "history": best.history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sub-epochs", type=int, default=8, help="sub-epochs of the cached/recompute comparison")
    parser.add_argument("--image-size", type=int, default=256, help="synthetic image side of that comparison")
    parser.add_argument("--train-normals", type=int, default=32, help="synthetic training normals of that comparison")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone of that comparison")
    parser.add_argument("--weights", default="offline", help="auto, hub, offline, random or a file")
    parser.add_argument("--paper-schedule", action="store_true",
                        help="instead: one default trial on the shared MTD-200 split at 25 x 8 epochs")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="the shared data folder (--paper-schedule)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="BGADConfig overrides of the paper-schedule trial, e.g. cells_per_step=64")
    parser.add_argument("--stop-after", type=int, default=None, metavar="K",
                        help="train only the first K meta-epochs of the 25 and extrapolate the trial's wall time")
    parser.add_argument("--json", type=Path, default=None, help="also write the paper-schedule figures here")
    parser.add_argument("--device", default="cpu", help="torch device of the paper-schedule trial (cpu, cuda)")
    args = parser.parse_args()
    if args.paper_schedule:
        config = BGADConfig(**{"meta_epochs": 25, "sub_epochs": 8, **parse_overrides(args.set)})
        figures = paper_schedule_trial(protocol_data("mtd", args.data_root), config, args.stop_after, args.device)
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=1))
        return
    with tempfile.TemporaryDirectory() as root:
        category = make_synthetic_category(root, size=args.image_size, n_train=args.train_normals, n_test_good=4,
                                           n_test_per_defect=4)
        training = load_training_images(DataConfig(str(category), image_size=args.image_size, num_anomalies=2,
                                                   racp_per_anomaly=4))
    extractor = FeatureExtractor(args.backbone, weights=args.weights)
    print(f"{len(training.images)} training images ({training.labels.count(0)} normal, "
          f"{training.labels.count(1)} anomalous incl. RACP) at {args.image_size} px, {args.backbone} ({args.weights}), "
          f"{args.sub_epochs} sub-epochs, {torch.get_num_threads()} threads")
    features_of(extractor, training)  # warm-up: first backbone calls pay for allocator and oneDNN setup
    results = {}
    for name, arm in (("cached features", cached_arm), ("backbone every sub-epoch", recompute_arm)):
        started = time.perf_counter()
        trainer = arm(extractor, training, args.sub_epochs)
        results[name] = (time.perf_counter() - started, trainer.model.state_dict())
    base = results["cached features"][0]
    print("| arm | wall s | vs cached |")
    print("|---|---|---|")
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds:.1f} | {seconds / base:.2f}x |")
    cached, recomputed = (state for _, state in results.values())
    difference = max(float((cached[k] - recomputed[k]).abs().max()) for k in cached)
    print(f"max |weight difference| between the arms: {difference:.2e}")


if __name__ == "__main__":
    main()
