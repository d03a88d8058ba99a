"""Accuracy on the shared real data: BGAD-FAS against plain BGAD, the paper's configuration and a no-label PatchCore.

Every arm reads the same backbone features of the same split (extracted once, lite0 offline weights, 256 px):

- ``patchcore``: one-class PatchCore (``bgad_core.models.patchcore.torch_model``), strides 8 + 16, 1 % coreset, k = 9. No labels.
- ``bgad``: plain BGAD: the default flows, trained on the normals only, focal weighting off. No labels.
- ``bgad-fas``: the default BGAD-FAS (``BGADConfig()`` defaults, ``DEFAULT_STRIDES``) with the protocol's anomalies.
  ``--strides`` and ``--set KEY=VALUE`` change what the ``bgad`` and ``bgad-fas`` arms model, for ablations.
- ``paper``: the paper's BGAD-FAS (strides 4, 8, 16, per-cell features, per-level score constants) with the same anomalies
  and schedule.
- ``simplenet``: one-class SimpleNet (``bgad_core.models.simplenet``, its defaults: strides 8 + 16, 8 x 4 passes),
  trained on the normals only. No labels.
- ``simplenet-fs``: the same in few-shot mode, the protocol's anomalies and their RACP rows as extra positives.

Every arm reports its wall time (training and validation, the epoch selection included) and the seconds its selected
detector takes to score 100 test images from their cached features (test rows repeated up to 100; the backbone's
share, the same for every arm, is the feature-extraction time printed above the table, over all images).

Protocols (``../shared/data/README.md``): ``mtd`` = MTD-200 (first 200 training normals, 10 anomalies per defect
type); ``kolektor`` = KolektorSDD with 10 anomalies; ``brainmri`` = BrainMRI with one anomaly in total;
``deeppcb-a`` and ``deeppcb-b`` = the two DeepPCB boards (every image a different board region) with one anomaly in
total. ``--stress shift-rotate`` runs the protocol on an unaligned twin of its category instead: every image rotated
and shifted by its own seeded draw, masks moved with it (``benchmarks.stress_data``). Epochs are selected on
validation, test is evaluated once; ``--curves`` also records test after every meta-epoch (for the learning curves
only, never for selection). ``--anomalies 0 1 2 5 10`` adds a BGAD-FAS row per label count.
``--image-level-labels`` trains on the protocol's category read without its masks (``stress_data.image_level_copy``):
the labelled anomalies mark every cell abnormal and their RACP rows paste whole images, as on a dataset without masks
(held-out solar cells); the same images are drawn, and validation and test keep their masks, so pixel figures and
the pixel objective stay.
``--train-defect-types blowhole`` runs the unseen-defect protocol (``bgad_core.data.splits``): labelled anomalies of
those types only, validation without the other types, and a second table of each arm's test figures on the seen and
on the unseen types.
``--split-seed 1`` draws other labelled anomalies and another validation/test split than the protocols' seed 0: with
one labelled anomaly in total, how much a verdict owes to the one draw.

Issue 21's two inequalities (BGAD-FAS's test image AUROC and PRO at least PatchCore's minus 0.01 and at least plain
BGAD's) are printed below the table for the arms that ran, each with the paired 95 % bootstrap interval of the gap
(``bgad_core.evaluation.intervals.compare_paired``: the same resampled test images for both arms): a figure short of
its bound whose interval still reaches the bound is "short, within noise"; one whose whole interval lies below it,
"short". ``--json`` keeps the resampled gaps, and ``benchmarks.pool_targets`` pools them over draws.

``--compare-scoring`` trains each BGAD arm once and scores it under every policy of ``SCORING_POLICIES`` (the
choices validation makes, ``bgad_core.models.bgad.scoring_choice``, against fixed ones, and the same choices made on
another validation objective, ``POLICY_OBJECTIVES``): each policy selects its own epoch on its own validation figure
and reads test once there. All policies use constants from the same (up to 512) training
normals; the ``auto`` row is what the default training gives.

    .venv/bin/python -m benchmarks.bench_accuracy --dataset mtd [--meta-epochs 8] [--sub-epochs 2] [--curves]
        [--arms patchcore bgad bgad-fas paper simplenet simplenet-fs] [--anomalies 0 1 2 5 10] [--stress shift-rotate]
        [--simplenet-set noise_std=0.3] [--train-defect-types TYPE ...] [--split-seed 1] [--compare-scoring]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import fields, replace
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import cpu_description
from benchmarks.stress_data import image_level_copy, shifted_rotated_copy
from bgad_core.backbone import DEFAULT_STRIDES, FeatureExtractor
from bgad_core.data.datasets import read_category
from bgad_core.data.features import FeatureSet, extract_feature_set
from bgad_core.data.splits import make_splits
from bgad_core.engine.selection import seed_everything, train_and_select
from bgad_core.evaluation.defect_groups import GROUPS, defect_groups
from bgad_core.evaluation.intervals import bootstrap_distribution, compare_paired
from bgad_core.evaluation.metrics import objective_metric
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.scoring import NEAREST_NORMAL_WEIGHTS
from bgad_core.models.bgad.scoring_choice import EpochScoring, choose_scoring, score_split, scoring_candidates
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.bgad.training import BGADTraining, logp_maps
from bgad_core.models.base import Detector, DetectorConfig, split_metrics
from bgad_core.models.patchcore.config import PatchCoreConfig
from bgad_core.models.registry import family
from bgad_core.models.simplenet.config import SimpleNetConfig
from bgad_core.train import DataConfig, build_feature_sets, load_training_images

log = logging.getLogger(__name__)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PROTOCOLS = {
    "mtd": dict(path="mtd/magnetic_tile", num_anomalies=10, per_defect_type=True, max_train_normals=200),
    "kolektor": dict(path="kolektorsdd/commutator", num_anomalies=10, per_defect_type=True, max_train_normals=None),
    "brainmri": dict(path="brainmri/brain", num_anomalies=1, per_defect_type=False, max_train_normals=None),
    "deeppcb-a": dict(path="deeppcb/board_a", num_anomalies=1, per_defect_type=False, max_train_normals=None),
    "deeppcb-b": dict(path="deeppcb/board_b", num_anomalies=1, per_defect_type=False, max_train_normals=None),
}
STRESS = ("shift-rotate",)
# (calibration, coarse_level_weight, image_score, candidate nearest-normal weights, whether distances alone must beat
# the flows' best of earlier epochs too, whether the image score may reduce another map) of each policy
# --compare-scoring reports: each config value as scoring_candidates reads it (image_score may also name the
# candidate reductions), the nearest-normal weights as validation's candidates
SCORING_POLICIES = {
    "auto (default)": ("auto", "auto", "auto", NEAREST_NORMAL_WEIGHTS, True, True),
    "auto, smoothed maps' reductions only": ("auto", "auto", ("max", "top1pct_mean"), NEAREST_NORMAL_WEIGHTS, True,
                                             True),
    "auto, image score of the chosen map": ("auto", "auto", "auto", NEAREST_NORMAL_WEIGHTS, True, False),
    "auto, nearest-normal weight 0 or 0.5": ("auto", "auto", "auto", (0.0, 0.5), True, False),
    "auto, likelihoods alone": ("auto", "auto", "auto", (0.0,), True, False),
    "auto among 0, 0.5, 1, compared within each epoch only": ("auto", "auto", "auto", (0.0, 0.5, 1.0), False, False),
    "distances alone, max": ("level", 1.0, "max", (1.0,), True, False),
    "auto, chosen on PRO alone": ("auto", "auto", "auto", NEAREST_NORMAL_WEIGHTS, True, True),
}
# a policy's validation objective where it is not the protocol's (and the split has masks, as it needs)
POLICY_OBJECTIVES = {"auto, chosen on PRO alone": "aupro"}
EXTRACTED_STRIDES = (4, 8, 16)  # the paper's levels; the default arms read the DEFAULT_STRIDES among them
ARMS = ("patchcore", "bgad", "bgad-fas", "paper", "simplenet", "simplenet-fs")
SCORED_IMAGES = 100  # the scoring wall time of every arm: its selected detector on this many test rows
# issue 21's targets: BGAD-FAS's test figure minus each reference arm's must be at least this
TARGETS = (("PatchCore, no labels", -0.01), ("BGAD, no labels", 0.0))
TARGET_METRICS = ("image_auroc", "aupro")
DEFAULT_POLICY = next(iter(SCORING_POLICIES))


def cpu_flags() -> str:
    """The CPU model, torch's thread count and the matrix-relevant flags, printed with every figure."""
    return cpu_description(torch.get_num_threads())


def protocol_data(dataset: str, data_root: Path, stress: str | None = None, scratch: Path | None = None) -> DataConfig:
    """The ``DataConfig`` of a shared protocol at 256 px; exits with "skipped" where the data is absent.

    ``stress``: run it on a stress variant of the category, written under ``scratch``.
    """
    protocol = PROTOCOLS[dataset]
    path = data_root / protocol["path"]
    if not path.is_dir():
        raise SystemExit(f"skipped: real data not found at {path}")
    if stress == "shift-rotate":
        path = shifted_rotated_copy(path, scratch / f"{dataset}-{stress}")
    return DataConfig(str(path), image_size=256, num_anomalies=protocol["num_anomalies"],
                      per_defect_type=protocol["per_defect_type"], max_train_normals=protocol["max_train_normals"],
                      held_out_anomalies=protocol["num_anomalies"])


def parse_overrides(items: list[str], config: type[DetectorConfig] = BGADConfig, flag: str = "--set") -> dict:
    """``KEY=VALUE`` strings as overrides of ``config``'s fields, each value of its field's type (an unknown key
    fails naming ``flag``)."""
    known = {f.name: f for f in fields(config)}
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"{flag} {item}: unknown {config.__name__} key {key!r}; known: {sorted(known)}")
        default = getattr(config, key)
        overrides[key] = value.lower() in ("1", "true") if isinstance(default, bool) else type(default)(value)
    return overrides


def anomaly_subset(train: FeatureSet, data: DataConfig, n: int) -> FeatureSet:
    """Training rows with only the first ``n`` drawn anomalies (and the RACP samples cut from them).

    Draws are nested in n (``bgad_core.data.splits``), so this is the training set a run with ``num_anomalies=n`` draws,
    evaluated on the very same validation and test images.
    """
    index = read_category(data.data)
    kept = {r.record_id for r in make_splits(index, n, data.per_defect_type, data.val_fraction, data.split_seed,
                                             data.train_defect_types, data.max_train_normals).train_anomalies}
    rows = [i for i, (label, row_id) in enumerate(zip(train.labels.tolist(), train.ids))
            if label == 0 or row_id in kept or (row_id.startswith("racp:") and row_id.split(":")[1] in kept)]
    return train.select(rows)


def family_arm(family_name: str, config: DetectorConfig, train: FeatureSet, val: FeatureSet, test: FeatureSet,
               strides: Sequence[int], objective: str, size: tuple[int, int], curves: bool = False,
               seen_types: Sequence[str] | None = None) -> dict:
    """Train one family's detector, select on validation, test once; figures and wall times of one arm.

    ``seen_types`` (the unseen-defect protocol's ``train_defect_types``): also the test figures of each group of
    types (``test_seen``, ``test_unseen``: the normals with that group's anomalies).
    """
    seed_everything(config.seed)
    started = time.perf_counter()
    training = family(family_name).training(config, train, strides, "cpu")
    best = train_and_select(training, val, test, size, objective, test_every_epoch=curves)
    seconds = time.perf_counter() - started
    groups = {} if seen_types is None else defect_groups(test.ids, test.labels, seen_types)
    return {"epoch": best.epoch, "val": best.val.metrics, "test": best.test.metrics, "seconds": round(seconds, 1),
            "score_seconds": scoring_seconds(best.test.detector, test), "history": best.history,
            "test_outputs": (best.test.scores, best.test.maps),
            **{f"test_{group}": split_metrics(test.select(rows), best.test.scores[rows], best.test.maps[rows])
               for group, rows in groups.items()}}


def scoring_seconds(detector: Detector, test: FeatureSet) -> float:
    """Wall seconds ``detector`` takes to score ``SCORED_IMAGES`` test rows (maps and image scores)."""
    rows = test.select([i % len(test) for i in range(SCORED_IMAGES)])
    started = time.perf_counter()
    detector.predict(rows)
    return round(time.perf_counter() - started, 2)


def scoring_arms(config: BGADConfig, train: FeatureSet, val: FeatureSet, test: FeatureSet, objective: str,
                 size: tuple[int, int]) -> dict[str, dict]:
    """Train flows once; per ``SCORING_POLICIES`` entry, the epoch its validation selects and test read there.

    Epochs are selectable from the training's ``first_selectable_epoch`` (after phase 1), as in
    ``train_and_select``. Test log-likelihoods are computed every meta-epoch (to read any policy's test at its own
    epoch) and scored only as each policy chose on validation.
    """
    seed_everything(config.seed)
    started = time.perf_counter()
    training = BGADTraining(BGADFlows.from_config([f.shape[1] for f in train.features], config), config, train)
    bank = training.choose_bank(val, size, objective)  # the configured share's, or validation's choice of shares
    val_distances, test_distances = training.nearest_distances(val), bank.predict(test)  # val's: kept by the choice
    best: dict[str, dict] = {}
    first_epoch = training.first_selectable_epoch
    choosers = {name: EpochScoring() for name in SCORING_POLICIES}
    for _ in range(config.meta_epochs):
        training.train_meta_epoch()
        fits = dict(zip(("level", "position"), training.fit_normalizations(("level", "position"))))
        val_logps, test_logps = logp_maps(training.model, val), logp_maps(training.model, test)
        for name, (*choices, nearest, across_epochs, image_maps) in SCORING_POLICIES.items():
            calibration, weight, reduction = choices
            calibrations, weights, reductions, _ = scoring_candidates(
                calibration, weight, reduction if isinstance(reduction, str) else "auto")
            reductions = reductions if isinstance(reduction, str) else reduction
            own = POLICY_OBJECTIVES.get(name, objective) if val.pixel_masks is not None else objective
            chosen = choose_scoring(val_logps, val, [fits[c] for c in calibrations], weights, reductions, size,
                                    config.blur_sigma, own, nearest, val_distances,
                                    choosers[name] if across_epochs else None, training.epoch >= first_epoch,
                                    image_maps)
            score = chosen.metrics.get(own, float("nan"))
            log.info("meta-epoch %d, %s: val %s %.4f (%s)", training.epoch, name, own, score,
                     chosen.normalization.describe())
            if training.epoch >= first_epoch and (name not in best or score > best[name]["score"]):
                test_result = score_split(test_logps, test, chosen.normalization, size, config.blur_sigma,
                                          test_distances)
                best[name] = {"score": score, "epoch": training.epoch, "val": chosen.metrics,
                              "test": test_result.metrics, "scoring": chosen.normalization.describe(),
                              "test_outputs": (test_result.scores, test_result.maps) if name == DEFAULT_POLICY
                              else None}
    seconds = round(time.perf_counter() - started, 1)
    return {name: {**row, "seconds": seconds} for name, row in best.items()}


def arm_row(rows: Sequence[tuple[str, dict]], label: str) -> dict | None:
    """The row of the arm ``label`` as the default trains it (under ``--compare-scoring``, its default policy's)."""
    return next((row for name, row in rows
                 if name == label or name.startswith(f"{label}, scoring {DEFAULT_POLICY} [")), None)


def paired_targets(rows: Sequence[tuple[str, dict]], label: str, test: FeatureSet) -> list[dict]:
    """Issue 21's inequalities for the arm ``label`` against each ``TARGETS`` arm that ran, per ``TARGET_METRICS``
    figure the test split has: the gap, its paired 95 % bootstrap interval on the test images, the verdict
    (``target_verdict``) and the resampled gaps themselves (for ``benchmarks.pool_targets``, which pools draws)."""
    subject = arm_row(rows, label)
    if subject is None:
        return []
    masks = None if test.pixel_masks is None else test.pixel_masks.numpy()

    def resampled(row: dict) -> dict[str, np.ndarray]:  # the same test resamples for every arm (same labels, seed)
        scores, maps = row["test_outputs"]
        return bootstrap_distribution(test.labels.numpy(), scores.numpy(), masks,
                                      None if masks is None else maps.numpy())

    ours = resampled(subject)
    verdicts = []
    for reference, bound in TARGETS:
        other = arm_row(rows, reference)
        if other is None:
            continue
        theirs = resampled(other)
        for metric in TARGET_METRICS:
            if metric not in subject["test"]:
                continue
            gap = subject["test"][metric] - other["test"][metric]
            paired = compare_paired(ours[metric], theirs[metric], gap, len(test))
            verdicts.append({"against": reference, "metric": metric, "gap": gap, "lo": paired.lo, "hi": paired.hi,
                             "bound": bound, "verdict": target_verdict(gap, paired.hi, bound),
                             "resampled_gaps": (ours[metric] - theirs[metric]).round(5).tolist()})
    return verdicts


def target_verdict(gap: float, hi: float, bound: float) -> str:
    """"met" (the gap at least the bound), "short, within noise" (below it, but the upper end of its paired
    interval reaches it) or "short" (the whole interval below the bound)."""
    if gap >= bound:
        return "met"
    return "short, within noise" if hi >= bound else "short"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(PROTOCOLS), default="mtd", help="which shared protocol to run")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--meta-epochs", type=int, default=BGADConfig.meta_epochs, help="meta-epochs of every arm")
    parser.add_argument("--sub-epochs", type=int, default=BGADConfig.sub_epochs, help="sub-epochs per meta-epoch")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which arms to run")
    parser.add_argument("--anomalies", type=int, nargs="*", default=[],
                        help="extra BGAD-FAS rows with this many anomalies (per type where the protocol draws per type)")
    parser.add_argument("--curves", action="store_true", help="record test after every meta-epoch (curves only)")
    parser.add_argument("--strides", type=int, nargs="+", choices=EXTRACTED_STRIDES, default=list(DEFAULT_STRIDES),
                        help="levels the bgad and bgad-fas arms model (PatchCore keeps 8 16, the paper arm 4 8 16)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="BGADConfig overrides of the BGAD arms, e.g. image_score=top1pct_mean")
    parser.add_argument("--simplenet-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SimpleNetConfig overrides of the SimpleNet arms, e.g. noise_std=0.3 meta_epochs=4 "
                             "(their schedule is SimpleNet's own, not --meta-epochs)")
    parser.add_argument("--stress", choices=STRESS, default=None,
                        help="run on a stress variant of the category (shift-rotate: every image moved by its own "
                             "seeded shift and rotation, masks with it)")
    parser.add_argument("--train-defect-types", nargs="+", default=None, metavar="TYPE",
                        help="unseen-defect protocol: labelled anomalies of these types only; validation holds no "
                             "other type, test reports seen and unseen types apart")
    parser.add_argument("--image-level-labels", action="store_true",
                        help="train on the category read without its masks (labelled anomalies and their RACP rows "
                             "whole-image abnormal); validation and test keep their masks")
    parser.add_argument("--racp-per-anomaly", type=int, default=DataConfig.racp_per_anomaly,
                        help="RandAugmented CutPaste rows cut from each labelled anomaly (0: none)")
    parser.add_argument("--split-seed", type=int, default=DataConfig.split_seed,
                        help="seeds which anomalies are labelled and the validation/test split (the protocols: 0); "
                             "another seed measures how much a verdict owes to one draw")
    parser.add_argument("--compare-scoring", action="store_true",
                        help="score the bgad and bgad-fas arms under every scoring policy (one training each)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure and history here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as scratch:
        data = protocol_data(args.dataset, args.data_root, args.stress, Path(scratch))
        image_level = (image_level_copy(Path(data.data), Path(scratch) / "image-level") if args.image_level_labels
                       else None)
        run(args, replace(data, train_defect_types=args.train_defect_types, racp_per_anomaly=args.racp_per_anomaly,
                          split_seed=args.split_seed), image_level)


def run(args: argparse.Namespace, data: DataConfig, image_level: Path | None = None) -> None:
    """The arms ``args`` name on the protocol's data; prints the table (and writes the JSON).

    ``image_level``: the category without masks (``stress_data.image_level_copy``), read for the training rows only.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = parse_overrides(args.set)
    base = BGADConfig(meta_epochs=args.meta_epochs, sub_epochs=args.sub_epochs, **overrides)
    started = time.perf_counter()
    extractor = FeatureExtractor("tf_efficientnet_lite0", weights="offline", strides=EXTRACTED_STRIDES)
    _, has_masks, train_all, val_all, test_all = build_feature_sets(data, extractor)
    extraction = time.perf_counter() - started
    objective, size = objective_metric(has_masks), (256, 256)
    strides = sorted(args.strides)
    levels = [EXTRACTED_STRIDES.index(s) for s in strides]
    if image_level is not None:  # the same training images, read without masks
        with_masks = train_all
        images = load_training_images(replace(data, data=str(image_level)))
        train_all = extract_feature_set(extractor, images.images, images.masks, images.labels, images.ids)
        if train_all.ids != with_masks.ids:
            raise SystemExit(f"{image_level}: read without masks, the category drew other training images")
    train, val, test = (s.with_levels(levels) for s in (train_all, val_all, test_all))
    normals = train.select(torch.nonzero(train.labels == 0).flatten())
    seen = data.train_defect_types
    rows: list[tuple[str, dict]] = []
    if "patchcore" in args.arms:
        rows.append(("PatchCore, no labels", family_arm("patchcore", PatchCoreConfig(), train_all, val_all, test_all,
                                                        EXTRACTED_STRIDES, objective, size, seen_types=seen)))
    simplenet = SimpleNetConfig(**parse_overrides(args.simplenet_set, SimpleNetConfig, "--simplenet-set"))
    simplenet_arms = [("simplenet", "SimpleNet, no labels", replace(simplenet, use_anomalies=False)),
                      ("simplenet-fs", f"SimpleNet few-shot, n = {data.num_anomalies}", simplenet)]
    for arm, label, config in simplenet_arms:
        if arm in args.arms:
            rows.append((label, family_arm("simplenet", config, train_all, val_all, test_all, EXTRACTED_STRIDES,
                                           objective, size, args.curves, seen)))
    arms = [("bgad", "BGAD, no labels", replace(base, focal_weighting=False), normals),
            ("bgad-fas", f"BGAD-FAS, n = {data.num_anomalies}", base, train)]
    for arm, label, config, rows_of in arms:
        if arm not in args.arms:
            continue
        if args.compare_scoring:
            for policy, row in scoring_arms(config, rows_of, val, test, objective, size).items():
                rows.append((f"{label}, scoring {policy} [{row['scoring']}]", row))
        else:
            rows.append((label, family_arm("bgad", config, rows_of, val, test, strides, objective, size,
                                           args.curves, seen)))
    if "paper" in args.arms:
        paper = replace(base, local_aggregation=1, image_score="max", calibration="level", coarse_level_weight=1.0,
                        nearest_normal_weight=0.0)
        rows.append(("paper BGAD-FAS (strides 4/8/16, per cell)",
                     family_arm("bgad", paper, train_all, val_all, test_all, EXTRACTED_STRIDES, objective, size,
                                args.curves, seen)))
    for n in args.anomalies:
        subset = anomaly_subset(train, data, n)
        config = base if n else replace(base, focal_weighting=False)
        rows.append((f"BGAD-FAS, n = {n}", family_arm("bgad", config, subset, val, test, strides, objective, size,
                                                      args.curves, seen)))
    variant = ", ".join(([] if args.stress is None else [args.stress])
                        + (["image-level labels"] if args.image_level_labels else [])
                        + ([f"split seed {data.split_seed}"] if data.split_seed else []))
    print(f"\n{args.dataset}{f' ({variant})' if variant else ''}: {len(train_all)} training rows, val {len(val)}, test {len(test)}; features "
          f"{extraction:.0f} s; {args.meta_epochs} x {args.sub_epochs} epochs; selection on val {objective}")
    print(f"machine: {cpu_flags()}")
    print(f"| arm | epoch | val {objective} | test image AUROC | test pixel AUROC | test PRO | wall s "
          f"| scoring {SCORED_IMAGES} images s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, row in rows:
        test_m = row["test"]
        print(f"| {label} | {row['epoch']} | {row['val'].get(objective, float('nan')):.3f} | "
              f"{test_m['image_auroc']:.3f} | {test_m.get('pixel_auroc', float('nan')):.3f} | "
              f"{test_m.get('aupro', float('nan')):.3f} | {row['seconds']:.0f} | {row.get('score_seconds', '-')} |")
    fas = f"BGAD-FAS, n = {data.num_anomalies}"
    targets = paired_targets(rows, fas, test)
    if targets:
        print(f"\nissue 21's targets for {fas} (test; paired 95 % bootstrap interval of the gap over the "
              f"{len(test)} test images)")
        print("| against | metric | gap | interval | bound | verdict |")
        print("|---|---|---|---|---|---|")
        for t in targets:
            print(f"| {t['against']} | {t['metric']} | {t['gap']:+.3f} | [{t['lo']:+.3f}, {t['hi']:+.3f}] | "
                  f"{t['bound']:+.2f} | {t['verdict']} |")
    if seen is not None:
        print(f"\nunseen-defect protocol: labels from {seen} only; test per group (normals + that group's anomalies)")
        print("| arm | seen types: image AUROC / pixel AUROC / PRO | unseen types: image AUROC / pixel AUROC / PRO |")
        print("|---|---|---|")
        for label, row in rows:
            print(f"| {label} | " + " | ".join(" / ".join(f"{row.get(f'test_{group}', {}).get(k, float('nan')):.3f}"
                                                          for k in ("image_auroc", "pixel_auroc", "aupro"))
                                               for group in GROUPS) + " |")
    if args.curves:
        for label, row in rows:
            for h in row.get("history", []):
                t = h.get("test", {})
                print(f"curve | {label} | {h['epoch']} | val {h['val'].get(objective, float('nan')):.3f} | "
                      f"test image {t.get('image_auroc', float('nan')):.3f} | test PRO {t.get('aupro', float('nan')):.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"dataset": args.dataset, "stress": args.stress,
                                         "image_level_labels": args.image_level_labels,
                                         "split_seed": data.split_seed, "machine": cpu_flags(),
                                         "targets": targets,
                                         "rows": [{"arm": label, **{k: v for k, v in row.items()
                                                                    if k != "test_outputs"}}
                                                  for label, row in rows]}, indent=1))


if __name__ == "__main__":
    main()
