"""What the scoring choices validation makes cost a trial: validation with and without nearest-normal candidates.

A default BGAD-FAS trial validates after every meta-epoch, scoring every candidate of its "auto" choices
(``bgad_core.models.bgad.scoring_choice``). ``nearest_normal_weight: auto`` doubles the candidate maps (0 or 0.5 of
the distances, plus one map of distances alone) and fills a memory bank once per trial (``components.memory_bank``;
``--coreset-ratio`` sets its share of the patches), whose distances to the validation split are computed once too.
Under a pixel objective the image score may then reduce another of those maps (``image_score_map: auto``,
``scoring_choice.choose_image_map``), which scores up to two more maps (image metrics only) per validation.
This script measures all of it on a shared protocol's real features: it trains one meta-epoch at the given
sub-epochs (the paper's 8 by default), then times ``BGADTraining.validate`` on the same flows with
``nearest_normal_weight`` "auto", "auto" with the image score of the output map only, and 0, alternating, and
prints the trial-time ratio at the paper's 25 meta-epochs (the one-off bank fill included).

    .venv/bin/python -m benchmarks.bench_scoring_cost --dataset kolektor [--sub-epochs 8] [--repeats 3] \
        [--coreset-ratio 0.1]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.bench_accuracy import PROTOCOLS, SHARED, cpu_flags, protocol_data
from bgad_core.backbone import DEFAULT_STRIDES, FeatureExtractor
from bgad_core.engine.selection import seed_everything
from bgad_core.evaluation.metrics import objective_metric
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.bgad.training import BGADTraining
from bgad_core.train import build_feature_sets

PAPER_META_EPOCHS = 25


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(PROTOCOLS), default="kolektor", help="which shared protocol")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--sub-epochs", type=int, default=8, help="sub-epochs of the timed training meta-epoch")
    parser.add_argument("--repeats", type=int, default=3, help="validations timed per configuration (alternating)")
    parser.add_argument("--coreset-ratio", default=BGADConfig.nearest_normal_coreset_ratio,
                        help="the memory bank's share of the training normals' patches (nearest_normal_coreset_ratio: "
                             "a number in (0, 1], or auto: 1 %% or 10 %%, chosen on validation)")
    args = parser.parse_args()
    data = protocol_data(args.dataset, args.data_root)
    extractor = FeatureExtractor("tf_efficientnet_lite0", weights="offline", strides=DEFAULT_STRIDES)
    _, has_masks, train, val, _ = build_feature_sets(data, extractor)
    objective, size = objective_metric(has_masks), (data.image_size, data.image_size)
    config = BGADConfig(sub_epochs=args.sub_epochs, normal_epochs=0,  # phase 2 at once: a typical meta-epoch
                        nearest_normal_coreset_ratio=args.coreset_ratio)
    seed_everything(config.seed)
    training = BGADTraining(BGADFlows.from_config([f.shape[1] for f in train.features], config), config, train)
    train_seconds = timed(training.train_meta_epoch)
    own_map, without = replace(config, image_score_map="anomaly_map"), replace(config, nearest_normal_weight=0.0)
    one_off = timed(lambda: training.choose_bank(val, size, objective))  # the banks' fill and choice, once
    seconds: dict[str, list[float]] = {"auto": [], "own map": [], "0": []}
    for _ in range(args.repeats):
        for name, chosen in (("auto", config), ("own map", own_map), ("0", without)):
            training.config = chosen
            seconds[name].append(timed(lambda: training.validate(val, size, objective)))
    training.config = config
    new, old = min(seconds["auto"]), min(seconds["0"])
    ratio = (one_off + PAPER_META_EPOCHS * (train_seconds + new)) / (PAPER_META_EPOCHS * (train_seconds + old))
    print(f"machine: {cpu_flags()}")
    print(f"{args.dataset}: {len(train)} training rows, val {len(val)} images; one meta-epoch of {args.sub_epochs} "
          f"sub-epochs, validation on {objective}")
    print("| part | wall s |")
    print("|---|---|")
    print(f"| training, one meta-epoch | {train_seconds:.1f} |")
    print(f"| validation, nearest_normal_weight 0 (8 candidates; min of {args.repeats}) | {old:.1f} |")
    print(f"| validation, nearest_normal_weight auto, image_score_map anomaly_map (18 candidates; min of "
          f"{args.repeats}) | {min(seconds['own map']):.1f} |")
    print(f"| validation, nearest_normal_weight auto, image_score_map auto (18 candidates, up to 2 more maps' image "
          f"scores; min of {args.repeats}) | {new:.1f} |")
    shares = ", ".join(f"{100 * share:g} %" for share in training.coreset_ratios)
    chosen = training.coreset_ratios[training.memory_banks.index(training.nearest_normal)]
    print(f"| once per trial: memory banks ({shares} of the patches; validation chose {100 * chosen:g} %) and the "
          f"validation split's distances | {one_off:.1f} |")
    print(f"trial time at {PAPER_META_EPOCHS} meta-epochs, auto against 0: {ratio:.3f}x")


if __name__ == "__main__":
    main()
