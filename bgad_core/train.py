"""Train one detector (BGAD / BGAD-FAS by default, or ``--family patchcore``) on one category and report
validation and test metrics.

    python -m bgad_core.train --data ../shared/data/mtd/magnetic_tile --num-anomalies 10

Features are extracted once (backbone frozen), the detector trains on them until the validation objective stops gaining
(``--patience``, ``--min-delta``: ``bgad_core.engine.stopping``) or the schedule ends; the epoch with the best *validation*
objective is kept and the test split is evaluated exactly once with it.
"""

from __future__ import annotations

import argparse
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
from bgad_core.engine.selection import decision_threshold, seed_everything, train_and_select
from bgad_core.errors import ConfigError, DataError, TrainingDivergedError
from bgad_core.data.datasets import ImageRecord, load_image, load_mask, read_category
from bgad_core.data.features import FeatureSet, extract_feature_set
from bgad_core.data.splits import Splits, check_validation, make_splits
from bgad_core.engine.stopping import PlateauConfig
from bgad_core.evaluation.metrics import objective_metric
from bgad_core.models.base import DetectorConfig
from bgad_core.models.registry import DEFAULT_FAMILY, family, family_names, family_of
from bgad_core.data.synthetic import make_synthetic_category

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


def run(data: DataConfig, config: DetectorConfig, backbone: str, weights: str, strides: Sequence[int],
        output: Path | None, plateau: PlateauConfig = PlateauConfig()) -> dict:
    """Train ``config``'s family until validation plateaus (``plateau``) or the schedule ends, select the best epoch
    on validation, evaluate test once; return a JSON-able summary."""
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
    family = family_of(config)
    training = family.training(config, train, list(extractor.strides), "cpu")
    best = train_and_select(training, val, test, image_size, objective, plateau=plateau)
    threshold = decision_threshold(best.val, val.labels)
    summary = {
        "family": family.name,
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
                         "channels": list(extractor.channels), "mean": list(extractor.mean), "std": list(extractor.std)}
        checkpoint = make_checkpoint(best.val.detector, backbone_info, threshold,
                                     {f"val_{k}": v for k, v in best.val.metrics.items()}, best.epoch)
        save_checkpoint(checkpoint, output / "model.pt")
        (output / "summary.json").write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
    return summary


def attribute_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` sections of a dataclass's docstring and its bases' (``a, b: text``
    covers both)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        docs.update(_own_attribute_docs(base))
    return docs


def _own_attribute_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    names: list[str] = []
    in_section = False
    for line in (cls.__dict__.get("__doc__") or "").splitlines():
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
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs="+", default=default, **described)
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
    parser.add_argument("--family", choices=family_names(), default=DEFAULT_FAMILY,
                        help="detector family to train; the options below are its config's (default: %(default)s)")
    chosen = family(parser.parse_known_args(argv)[0].family)
    _add_dataclass_args(parser, DataConfig, skip=("data",))
    _add_dataclass_args(parser, chosen.config)
    _add_dataclass_args(parser, PlateauConfig)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = chosen.config(**{f.name: args[f.name] for f in fields(chosen.config)})
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
