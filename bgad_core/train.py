"""Train one BGAD / BGAD-FAS model on one category and report validation and test metrics.

    python -m bgad_core.train --data ../shared/data/mtd/magnetic_tile --num-anomalies 10

Features are extracted once (backbone frozen), flows train on them until the validation objective stops gaining
(``--patience``, ``--min-delta``: ``bgad_core.engine.stopping``) or the schedule ends; the epoch with the best *validation*
objective is kept and the test split is evaluated exactly once with it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from bgad_core.data.racp import racp_samples
from bgad_core.backbone import DEFAULT_BACKBONE, DEFAULT_STRIDES, FeatureExtractor
from bgad_core.engine.checkpoint import make_checkpoint, save_checkpoint
from bgad_core.errors import ConfigError, DataError, TrainingDivergedError
from bgad_core.data.datasets import ImageRecord, load_image, load_mask, read_category
from bgad_core.data.features import FeatureSet, extract_feature_set
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.data.splits import Splits, check_validation, make_splits
from bgad_core.engine.stopping import PlateauConfig, PlateauRule, first_watched_epoch
from bgad_core.data.synthetic import make_synthetic_category
from bgad_core.models.bgad.training import (Evaluation, Trainer, TrainConfig, decision_threshold, objective_metric,
                                seed_everything)

log = logging.getLogger("bgad_core.train")


def load_records(records: Sequence[ImageRecord], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode images ``(N, size, size, 3)`` and their masks ``(N, size, size)`` (errors name the file)."""
    images = np.stack([load_image(r.path, size) for r in records]) if records else np.zeros((0, size, size, 3), np.uint8)
    masks = np.stack([load_mask(r, size) for r in records]) if records else np.zeros((0, size, size), np.uint8)
    return images, masks


def synthetic_anomalies(
    normals: np.ndarray, anomalies: np.ndarray, masks: np.ndarray, ids: Sequence[str], depth: int, per_anomaly: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``per_anomaly`` RandAugmented-CutPaste samples of each real anomaly, with recipe ids (source, depth, seed, k)."""
    images, pasted, recipe = [], [], []
    for k, (anomaly, mask, source) in enumerate(zip(anomalies, masks, ids)):
        if not mask.any():
            log.warning("%s: mask is empty at this image size; no synthetic anomalies are cut from it", source)
            continue
        for index, (image, new_mask) in enumerate(racp_samples(list(normals), anomaly, mask, depth, per_anomaly, seed + k)):
            images.append(image)
            pasted.append(new_mask)
            recipe.append(f"racp:{source}:S{depth}:seed{seed + k}:{index}")
    if not images:
        return np.zeros((0, *normals.shape[1:]), np.uint8), np.zeros((0, *normals.shape[1:3]), np.uint8), []
    return np.stack(images), np.stack(pasted), recipe


@dataclass
class DataConfig:
    """Which images a run trains and evaluates on.

    Attributes:
        data: category directory (MVTec AD, BTAD or generic folder layout).
        image_size: square input size in pixels.
        num_anomalies: real anomalies drawn for training, per defect type (or in total).
        per_defect_type: draw ``num_anomalies`` per defect type rather than in total.
        racp_depth: RandAugment depth S of the synthetic anomalies (0 = plain CutPaste).
        racp_per_anomaly: synthetic samples generated per real anomaly (0 disables RACP).
        val_fraction: share of the remaining test images used for validation.
        max_train_normals: use only the first N training normals (sorted), e.g. the MTD-200 protocol.
        train_defect_types: unseen-anomaly protocol: draw anomalies of these types only, evaluate on the others.
        split_seed: seeds anomaly drawing and the validation/test split.
        held_out_anomalies: anomalies per type drawn and kept out of evaluation (default ``num_anomalies``); the
            first ``num_anomalies`` of them train. Runs with different ``num_anomalies`` but the same value here
            are evaluated on exactly the same images, so they compare fairly.
    """

    data: str
    image_size: int = 256
    num_anomalies: int = 10
    per_defect_type: bool = True
    racp_depth: int = 3
    racp_per_anomaly: int = 8
    val_fraction: float = 0.3
    max_train_normals: int | None = None
    train_defect_types: list[str] | None = None
    split_seed: int = 0
    held_out_anomalies: int | None = None


@dataclass
class TrainingImages:
    """The decoded training images of a run: normals, drawn real anomalies and their RACP samples, in that order."""

    splits: Splits
    has_masks: bool
    images: np.ndarray
    masks: np.ndarray
    labels: list[int]
    ids: list[str]


def load_training_images(data: DataConfig) -> TrainingImages:
    """Read and split the category, decode the training images and synthesise the RACP anomalies."""
    index = read_category(data.data)
    held_out = data.num_anomalies if data.held_out_anomalies is None else data.held_out_anomalies
    if held_out < data.num_anomalies:
        raise ConfigError(f"held_out_anomalies ({held_out}) must be >= num_anomalies ({data.num_anomalies})")
    split = functools.partial(
        make_splits,
        index,
        per_defect_type=data.per_defect_type,
        val_fraction=data.val_fraction,
        seed=data.split_seed,
        train_defect_types=data.train_defect_types,
        max_train_normals=data.max_train_normals,
    )
    splits = split(num_anomalies=held_out)
    if held_out != data.num_anomalies:  # draws are nested: the first n of a seed are among its first K
        splits.train_anomalies = split(num_anomalies=data.num_anomalies).train_anomalies
    check_validation(splits, data.data)  # before any image is decoded
    size = data.image_size
    normals, normal_masks = load_records(splits.train_normal, size)
    anomalies, anomaly_masks = load_records(splits.train_anomalies, size)
    anomaly_ids = [r.record_id for r in splits.train_anomalies]
    synth, synth_masks, synth_ids = synthetic_anomalies(
        normals, anomalies, anomaly_masks, anomaly_ids, data.racp_depth, data.racp_per_anomaly, data.split_seed
    )
    return TrainingImages(
        splits=splits,
        has_masks=index.has_masks,
        images=np.concatenate([normals, anomalies, synth]),
        masks=np.concatenate([normal_masks, anomaly_masks, synth_masks]),
        labels=[0] * len(normals) + [1] * (len(anomalies) + len(synth)),
        ids=[r.record_id for r in splits.train_normal] + anomaly_ids + synth_ids,
    )


def build_feature_sets(
    data: DataConfig, extractor: FeatureExtractor
) -> tuple[Splits, bool, FeatureSet, FeatureSet, FeatureSet]:
    """Read the category, split it, synthesise anomalies and extract features of train, validation and test."""
    training = load_training_images(data)
    splits, size = training.splits, data.image_size
    train = extract_feature_set(extractor, training.images, training.masks, training.labels, training.ids)
    evaluation = []
    for records in (splits.val, splits.test):
        images, masks = load_records(records, size)
        labels = [r.label for r in records]
        evaluation.append(
            extract_feature_set(extractor, images, masks, labels, [r.record_id for r in records],
                                keep_pixel_masks=training.has_masks)
        )
    return splits, training.has_masks, train, evaluation[0], evaluation[1]


@dataclass
class Selection:
    """The outcome of ``train_and_select`` (whose trainer's model then holds the chosen epoch's weights)."""

    epoch: int
    val: Evaluation
    test: Evaluation
    history: list[dict]


def train_and_select(
    trainer: Trainer,
    val: FeatureSet,
    test: FeatureSet,
    image_size: tuple[int, int],
    objective: str,
    test_every_epoch: bool = False,
    stop_after: int | None = None,
    plateau: PlateauConfig | None = None,
) -> Selection:
    """Train meta-epochs, keep the one with the best *validation* ``objective``, evaluate test once with it.

    Only epochs after phase 1 are candidates: the phase-1 model is plain normal-only BGAD, and a short schedule
    must not hand back the model that BG-SPP never touched. ``plateau`` ends training once validation has stopped
    gaining (``bgad_core.engine.stopping.PlateauRule``, watching the same epochs the selection considers); the selected
    epoch is still the best one, usually ``patience`` meta-epochs back. None trains the whole schedule, as the
    learning-curve benchmarks need. ``test_every_epoch`` also evaluates test after each meta-epoch, for learning
    curves only: it is recorded in ``history`` and in the meta-epoch's log line (so a stopped run keeps its curve),
    and never used to select. ``stop_after`` ends training after that many meta-epochs of the configured schedule
    (to time a long schedule from its start).
    """
    config, model = trainer.config, trainer.model
    best: dict | None = None
    history = []
    epochs = config.meta_epochs if stop_after is None else max(1, min(stop_after, config.meta_epochs))
    rule = PlateauRule(plateau or PlateauConfig(patience=0), first_watched_epoch(config.normal_epochs, epochs))
    for _ in range(epochs):
        started = time.perf_counter()
        losses = trainer.train_meta_epoch()
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = trainer.validate(val, image_size, objective)
        row = {"epoch": trainer.epoch, "phase": int(losses["phase"]), "loss": losses["loss"],
               "train_seconds": round(train_seconds, 2), "val_seconds": round(time.perf_counter() - started, 2),
               **result.normalization.choice_metrics(), "val": result.metrics}
        if test_every_epoch:
            row["test"] = trainer.evaluate(test, result.normalization, image_size).metrics
        history.append(row)
        score = result.metrics.get(objective, float("nan"))
        log.info("meta-epoch %d (phase %d) loss %.4f val %s (%s)%s", trainer.epoch, row["phase"],
                 losses["loss"], _fmt(result.metrics), result.normalization.describe(),
                 f"; test (curve only) {_fmt(row['test'])}" if test_every_epoch else "")
        selectable = trainer.epoch >= rule.first_epoch
        if selectable and (best is None or score > best["score"]):
            best = {"score": score, "epoch": trainer.epoch, "state": copy.deepcopy(model.state_dict()), "val": result}
        if rule.update(trainer.epoch, score):
            log.info("validation %s has not gained more than %g for %d meta-epochs: training stops after meta-epoch "
                     "%d of %d (best: %d)", objective, rule.config.min_delta, rule.stale, trainer.epoch, epochs,
                     best["epoch"])
            break
    model.load_state_dict(best["state"])
    test_result = trainer.evaluate(test, best["val"].normalization, image_size)
    return Selection(best["epoch"], best["val"], test_result, history)


def run(data: DataConfig, config: TrainConfig, backbone: str, weights: str, strides: Sequence[int], output: Path | None,
        plateau: PlateauConfig = PlateauConfig()) -> dict:
    """Train until validation plateaus (``plateau``) or the schedule ends, select the best epoch on validation,
    evaluate test once; return a JSON-able summary."""
    started = time.perf_counter()
    seed_everything(config.seed)
    extractor = FeatureExtractor(backbone, weights=weights, strides=strides)
    log.info("backbone %s, weights: %s", backbone, extractor.weights_source)
    splits, has_masks, train, val, test = build_feature_sets(data, extractor)
    log.info(
        "train %d normals + %d anomalies (+%d synthetic), val %d, test %d images; features in %.1f s",
        len(splits.train_normal), len(splits.train_anomalies), int((train.labels == 1).sum()) - len(splits.train_anomalies),
        len(val), len(test), time.perf_counter() - started,
    )
    objective = objective_metric(has_masks)
    image_size = (data.image_size, data.image_size)
    model = BGADFlows.from_config(extractor.channels, config)
    trainer = Trainer(model, config, train)
    best = train_and_select(trainer, val, test, image_size, objective, plateau=plateau)
    threshold = decision_threshold(best.val, val.labels)
    summary = {
        "objective": objective,
        "best_epoch": best.epoch,
        "meta_epochs_run": len(best.history),
        "val": best.val.metrics,
        "test": best.test.metrics,
        "weights_source": extractor.weights_source,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if output is not None:
        backbone_info = {"name": backbone, "weights_source": extractor.weights_source,
                         "weights_digest": extractor.weights_digest, "strides": list(extractor.strides),
                         "mean": list(extractor.mean), "std": list(extractor.std)}
        checkpoint = make_checkpoint(model, config, backbone_info, image_size, best.val.normalization, threshold,
                                     {f"val_{k}": v for k, v in best.val.metrics.items()}, best.epoch)
        save_checkpoint(checkpoint, output / "model.pt")
        (output / "summary.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
    return summary


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def attribute_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` section of a dataclass docstring (``a, b: text`` covers both)."""
    docs: dict[str, str] = {}
    names: list[str] = []
    in_section = False
    for line in (cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            in_section = True
        elif in_section and text:
            head, colon, rest = text.partition(": ")
            candidates = [n.strip() for n in head.split(",")]
            if colon and all(n.isidentifier() for n in candidates):
                names = candidates
                for name in names:
                    docs[name] = rest
            else:
                for name in names:
                    docs[name] += " " + text
    return docs


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """Expose each dataclass field as ``--field-name`` with its default, type and documented meaning."""
    docs = attribute_docs(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        described = {"help": docs[f.name].replace("%", "%%") + " (default: %(default)s)"}
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=default, metavar="{true,false}", **described)
        elif f.name == "train_defect_types":
            parser.add_argument(flag, nargs="+", default=None, **described)
        elif default is None:
            parser.add_argument(flag, type=int, default=None, **described)
        else:
            parser.add_argument(flag, type=type(default), default=default, **described)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def strict_json(value: object) -> object:
    """``value`` with every non-finite float as None, so that the file is JSON any parser reads (no bare NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line entry point: one-line ``error:`` messages and exit status 2 for bad input or divergence."""
    try:
        return _main(argv)
    except (ConfigError, DataError, TrainingDivergedError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(argv: Sequence[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=None, help="category directory (MVTec AD, BTAD or folder layout); default: generated images"
    )
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="timm model name")
    parser.add_argument("--weights", default="auto", help="auto | hub | offline | random | path to a weights file")
    parser.add_argument("--strides", type=int, nargs="+", default=list(DEFAULT_STRIDES),
                        help="output strides of the backbone levels the flows model (the paper: 4 8 16)")
    parser.add_argument("--output", type=Path, default=None, help="folder for model.pt and summary.json")
    _add_dataclass_args(parser, DataConfig, skip=("data",))
    _add_dataclass_args(parser, TrainConfig)
    _add_dataclass_args(parser, PlateauConfig)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = TrainConfig(**{f.name: args[f.name] for f in fields(TrainConfig)})
    plateau = PlateauConfig(**{f.name: args[f.name] for f in fields(PlateauConfig)})
    with tempfile.TemporaryDirectory(prefix="bgad-synthetic-") as scratch:
        if args["data"] is None:
            args["data"] = str(make_synthetic_category(Path(scratch), size=args["image_size"]))
            log.info("no --data given: training on generated defect images in %s", args["data"])
        data = DataConfig(**{f.name: args[f.name] for f in fields(DataConfig)})
        summary = run(data, config, args["backbone"], args["weights"], args["strides"], args["output"], plateau)
    print(json.dumps(strict_json(summary), indent=2, allow_nan=False))
    return summary


if __name__ == "__main__":
    main()
