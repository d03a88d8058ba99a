"""Trial wall time at equal epochs: training on cached features vs recomputing the backbone every sub-epoch.

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
import tempfile
import time

import torch

from bgad_core.backbone import FeatureExtractor
from bgad_core.features import extract_feature_set
from bgad_core.model import BGADFlows
from bgad_core.synthetic import make_synthetic_category
from bgad_core.train import DataConfig, TrainingImages, load_training_images
from bgad_core.training import Trainer, TrainConfig, seed_everything


def config_for(sub_epochs: int) -> TrainConfig:
    """One sub-epoch per meta-epoch, so the recompute arm can re-extract between them; phase 2 from the second."""
    return TrainConfig(meta_epochs=sub_epochs, sub_epochs=1, normal_epochs=1, warmup_epochs=1, lr=1e-3)


def features_of(extractor: FeatureExtractor, training: TrainingImages):
    return extract_feature_set(extractor, training.images, training.masks, training.labels, training.ids)


def cached_arm(extractor: FeatureExtractor, training: TrainingImages, sub_epochs: int) -> Trainer:
    seed_everything(0)
    config = config_for(sub_epochs)
    trainer = Trainer(BGADFlows.from_config(extractor.channels, config), config, features_of(extractor, training))
    for _ in range(sub_epochs):
        trainer.train_meta_epoch()
    return trainer


def recompute_arm(extractor: FeatureExtractor, training: TrainingImages, sub_epochs: int) -> Trainer:
    seed_everything(0)
    model = BGADFlows.from_config(extractor.channels, config_for(sub_epochs))
    state = None
    for _ in range(sub_epochs):
        trainer = Trainer(model, config_for(sub_epochs), features_of(extractor, training))
        if state is not None:
            trainer.load_state_dict(state)
        trainer.train_meta_epoch()
        state = trainer.state_dict()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sub-epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--train-normals", type=int, default=32)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="offline", help="auto, hub, offline, random or a file")
    args = parser.parse_args()
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
