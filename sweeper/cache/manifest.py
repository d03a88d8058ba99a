"""What a feature cache holds: every row to extract (real images and synthetic recipes) and the cache key.

Planning is cheap and runs on the driver: it reads the category folders, draws the few-shot splits, lays out the
synthetic RandAugmented-CutPaste (RACP) recipes and fingerprints the files. Nothing here decodes an image or runs
the backbone, so a cache hit costs only this.

Few-shot anomalies. K_max = ``cache.max_anomalies`` anomalies per defect type are drawn once per sweep with
``bgad_core.data.splits.make_splits`` (seeded by ``data.split_seed``), and validation/test exclude all of them, so every
trial is evaluated on the same rows whatever its n. Each drawn anomaly gets a *rank* within its defect type (within
all types when ``per_defect_type`` is false): the k at which ``make_splits(num_anomalies=k)`` first draws it, minus
one. ``make_splits`` draws are nested in k, so a trial reading ranks < n trains on exactly the anomalies that
``python -m bgad_core.train --num-anomalies n`` would draw.

Synthetic anomalies. For every depth S in ``cache.racp_depths``, M = ``cache.racp_per_anomaly`` RACP samples are
made of each drawn anomaly. Sample i of (category, defect type, rank, S) has its own seed ``aug_seed`` (derived from
``cache.racp_seed`` and those five values), which picks the normal it is pasted on (stream 0) and drives
``bgad_core.data.racp.racp_sample`` (stream 1). Each sample is therefore reproducible on its own, in any worker and
any order, and the samples of an anomaly do not depend on K_max or on the other depths.

Where the files are. Planning reads a category on this machine; extraction reads its files on whichever node a
decode task lands, so rows name files as every node addresses them (``DatasetLocation.shared``):

- ``path`` datasets on a filesystem are read at their absolute path: on a multi-node cluster the folder must be on
  shared storage (NFS) or baked into the image at the same path;
- ``path`` datasets given as a storage URI (``s3://bucket/mvtec/bottle``) are mirrored to ``runs/data/mirrors/``
  for planning (only files whose size or modification time changed are fetched again) and decoded from the URI;
- generated (``synthetic``) categories are written next to a local cache root as before; with a remote cache root
  they are generated locally (``runs/data/generated/``) and uploaded once to ``<cache.root>/datasets/<digest>/``,
  then decoded from there. Generation is deterministic, so uploading what the driver generated is both the simplest
  and the only way that guarantees every node decodes the very bytes that were fingerprinted.

Cost of M: rows = K_max x defect types x len(racp_depths) x M per category (plus the real images); each row is
one backbone pass at build time and ~``sum_l C_l*H_l*W_l`` feature values on disk (lite0 at 256 px, fp16: 328 KiB).
M = 8 (the default) gives a trial with n anomalies 8n synthetic ones per type, close to the reference code's
10 RACP copies while keeping, e.g., a five-defect MVTec AD category with K_max = 10 and four depths at (at most)
1,600 synthetic rows, about 0.5 GiB; sweeps that need more variety raise M, sweeps with many depths lower it.

Cache key: sha256 of a canonical JSON (``key_inputs``) of the format version, the backbone (name, weights digest,
strides, channels, normalisation), image size, dtype, the split/augmentation recipe, the per-category row plan
together with a fingerprint of every image and mask used (sha256 of the bytes, or size+mtime with
``cache.hash_images: stat``), and the source of the decoding/augmentation code plus Pillow and timm versions (any
change to how pixels are produced invalidates the cache: a rebuild is cheaper than silently stale features).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import timm
from tqdm import tqdm

import bgad_core.data.racp
import bgad_core.data.datasets
from bgad_core.backbone import FeatureExtractor
from bgad_core.data.datasets import CategoryIndex, ImageRecord, read_category
from bgad_core.errors import DataError
from bgad_core.data.features import mask_to_grid
from bgad_core.data.splits import make_splits
from bgad_core.data.synthetic import make_synthetic_category
from sweeper.cache.reader import (
    CACHE_FORMAT_VERSION,
    absolute_uri,
    is_uri,
    join,
    local_path,
    mirror_tree,
    upload_tree,
)
from sweeper.job.config import DatasetSpec, SweepConfig, SyntheticSpec

LOCAL_DATA_DIR = Path("runs/data")  # driver-side data: categories generated for a remote cache root, mirrors
SHARED_DATASETS = "datasets"  # <cache.root>/datasets/<digest>/<name>: generated categories every node reads
_PATH_KEYS = ("path", "mask_path", "source_path", "source_mask_path", "base_path")
ALL_TYPES = "all defect types"  # the rank group when anomalies are drawn in total rather than per type
_BASE_STREAM, _RACP_STREAM = 0, 1
_KEY_HEX = 32
_HASH_THREADS = 8


@dataclass
class CategoryPlan:
    """The rows of one category, in cache order, and what identifies them."""

    name: str
    root: str
    has_masks: bool
    items: list[dict[str, Any]]
    anomalies_per_group: dict[str, int]
    digest: str


@dataclass
class CachePlan:
    """Everything needed to decide hit or miss and, on a miss, to build: rows, backbone and key."""

    root_uri: str
    categories: list[CategoryPlan]
    extractor: FeatureExtractor
    key_inputs: dict[str, Any]
    key: str

    @property
    def uri(self) -> str:
        return join(self.root_uri, self.key)

    @property
    def items(self) -> list[dict[str, Any]]:
        return [item for category in self.categories for item in category.items]


def plan_cache(config: SweepConfig) -> CachePlan:
    """Read every category, draw its splits and synthetic recipes, fingerprint its files and compute the key.

    Loads the backbone's weights (for their digest) but never runs it.
    """
    root_uri = absolute_uri(config.cache.root)
    backbone = config.backbone
    extractor = FeatureExtractor(backbone.name, backbone.weights, backbone.strides)
    categories = [plan_category(spec, config, root_uri) for spec in config.datasets]
    row = 0
    for category in categories:
        for item in category.items:
            item["row"] = row
            row += 1
    inputs = key_inputs(config, categories, extractor)
    return CachePlan(root_uri, categories, extractor, inputs, cache_key(inputs))


@dataclass(frozen=True)
class DatasetLocation:
    """A category's folder twice: ``local`` (read here to plan) and ``shared`` (the same files as every node
    addresses them: the same absolute path, or a storage URI)."""

    local: Path
    shared: str

    def relocate(self, item: dict[str, Any]) -> None:
        """Point a row's file fields at the shared copies."""
        if self.shared == self.local.as_posix():
            return
        prefix = self.local.as_posix() + "/"
        for key in _PATH_KEYS:
            if item[key].startswith(prefix):
                item[key] = join(self.shared, item[key][len(prefix):])


def locate_dataset(spec: DatasetSpec, cache_root_uri: str) -> DatasetLocation:
    """Where the category of ``spec`` is (see the module docstring); generates or mirrors it first when needed."""
    if spec.synthetic is not None:
        return _generated(spec.synthetic, cache_root_uri)
    path = str(spec.path)
    if is_uri(path):
        return DatasetLocation(mirror_tree(path, LOCAL_DATA_DIR.resolve() / "mirrors" / _digest(path)[:16]),
                               path.rstrip("/"))
    local = Path(path).expanduser().resolve()
    return DatasetLocation(local, local.as_posix())


def _generated(spec: SyntheticSpec, cache_root_uri: str) -> DatasetLocation:
    params = spec.model_dump()
    local_root = local_path(cache_root_uri)
    if local_root is not None:
        category = make_synthetic_category(local_root.parent / "data", **params)
        return DatasetLocation(category, category.as_posix())
    digest = _digest(params)[:16]
    category = make_synthetic_category(LOCAL_DATA_DIR.resolve() / "generated" / digest, **params)
    shared = join(cache_root_uri, SHARED_DATASETS, digest, spec.name)
    upload_tree(category, shared)
    return DatasetLocation(category, shared)


def plan_category(spec: DatasetSpec, config: SweepConfig, cache_root_uri: str) -> CategoryPlan:
    """Rows of one category: train normals, drawn anomalies, synthetic recipes, validation, test."""
    data, cache = config.data, config.cache
    location = locate_dataset(spec, cache_root_uri)
    index = read_category(location.local, spec.layout, config.data.on_bad_image)
    split_args = {
        "per_defect_type": data.per_defect_type,
        "val_fraction": data.val_fraction,
        "seed": data.split_seed,
        "train_defect_types": data.train_defect_types,
        "max_train_normals": data.max_train_normals,
    }
    splits = make_splits(index, cache.max_anomalies, **split_args)
    group = (lambda r: r.defect_type) if data.per_defect_type else (lambda r: ALL_TYPES)
    ranks = draw_ranks(index, splits.train_anomalies, cache.max_anomalies, split_args, group)
    name = spec.category
    items = [_real(name, "train_normal", r, -1, False) for r in splits.train_normal]
    anomalies = sorted(splits.train_anomalies, key=lambda r: (group(r), ranks[r.record_id]))
    items += [_real(name, "train_anomaly", r, ranks[r.record_id], False) for r in anomalies]
    items += synthetic_items(name, anomalies, ranks, splits.train_normal, cache.racp_depths,
                             cache.racp_per_anomaly, cache.racp_seed, group)
    for split, records in (("val", splits.val), ("test", splits.test)):
        items += [_real(name, split, r, -1, index.has_masks) for r in records]
    fingerprints = fingerprint_files(_files(items), cache.hash_images)
    digest = _digest([_identity(item, fingerprints) for item in items])
    for item in items:
        location.relocate(item)
    return CategoryPlan(
        name=name,
        root=location.shared,
        has_masks=index.has_masks,
        items=items,
        anomalies_per_group=dict(sorted(Counter(group(r) for r in anomalies).items())),
        digest=digest,
    )


def draw_ranks(
    index: CategoryIndex, drawn: Sequence[ImageRecord], k_max: int, split_args: dict[str, Any], group: Any
) -> dict[str, int]:
    """Rank of every drawn anomaly within its group: the k at which ``make_splits`` first draws it, minus one."""
    ranks: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the K_max draw has already warned about small pools
        for k in range(1, k_max + 1):
            if len(ranks) == len(drawn):
                break
            new = [r for r in make_splits(index, k, **split_args).train_anomalies if r.record_id not in ranks]
            if any(count > 1 for count in Counter(group(r) for r in new).values()):
                raise RuntimeError("bgad_core.data.splits.make_splits draws are not nested in num_anomalies any more")
            ranks.update({r.record_id: k - 1 for r in new})
    if set(ranks) != {r.record_id for r in drawn}:
        raise RuntimeError("bgad_core.data.splits.make_splits draws are not nested in num_anomalies any more")
    return ranks


def synthetic_items(
    category: str,
    anomalies: Sequence[ImageRecord],
    ranks: dict[str, int],
    normals: Sequence[ImageRecord],
    depths: Sequence[int],
    per_anomaly: int,
    seed: int,
    group: Any,
) -> list[dict[str, Any]]:
    """RACP recipes, depth-major (so a trial's depth is a contiguous run of rows), each with its own seed."""
    items = []
    for depth in depths:
        for anomaly in anomalies:
            rank = ranks[anomaly.record_id]
            for index in range(per_anomaly):
                aug_seed = racp_seed(seed, category, group(anomaly), rank, depth, index)
                base = normals[base_choice(aug_seed, len(normals))]
                items.append(_item(
                    category, "synthetic", f"racp:{anomaly.record_id}:S{depth}:{index}", 1, anomaly.defect_type,
                    source=anomaly, base=base, anomaly_rank=rank, depth=depth, aug_seed=aug_seed, aug_index=index,
                ))
    return items


def racp_seed(seed: int, category: str, group: str, rank: int, depth: int, index: int) -> int:
    """Seed of one synthetic sample, independent of Python's hash randomisation and of every other sample."""
    entropy = [seed, zlib.crc32(category.encode()), zlib.crc32(group.encode()), rank, depth, index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def base_choice(aug_seed: int, num_normals: int) -> int:
    """Index of the training normal a synthetic sample is pasted on."""
    return int(np.random.default_rng([aug_seed, _BASE_STREAM]).integers(num_normals))


def racp_rng(aug_seed: int) -> np.random.Generator:
    """The generator ``racp_sample`` draws a sample's operations, magnitudes and paste position from."""
    return np.random.default_rng([aug_seed, _RACP_STREAM])


def _real(category: str, split: str, record: ImageRecord, rank: int, keep_pixel_mask: bool) -> dict[str, Any]:
    return _item(category, split, record.record_id, record.label, record.defect_type, image=record,
                 anomaly_rank=rank, keep_pixel_mask=keep_pixel_mask)


def _item(
    category: str,
    split: str,
    row_id: str,
    label: int,
    defect_type: str,
    image: ImageRecord | None = None,
    source: ImageRecord | None = None,
    base: ImageRecord | None = None,
    anomaly_rank: int = -1,
    depth: int = -1,
    aug_seed: int = -1,
    aug_index: int = -1,
    keep_pixel_mask: bool = False,
) -> dict[str, Any]:
    """One row to extract. Absent strings are "" (not None) so every Ray block infers the same Arrow types."""
    return {
        "id": row_id,
        "category": category,
        "split": split,
        "label": label,
        "defect_type": defect_type,
        "path": _path(image and image.path),
        "mask_path": _path(image and image.mask_path),
        "source_id": source.record_id if source else "",
        "source_path": _path(source and source.path),
        "source_mask_path": _path(source and source.mask_path),
        "base_id": base.record_id if base else "",
        "base_path": _path(base and base.path),
        "anomaly_rank": anomaly_rank,
        "depth": depth,
        "aug_seed": aug_seed,
        "aug_index": aug_index,
        "keep_pixel_mask": keep_pixel_mask,
    }


def _path(path: Path | None) -> str:
    return str(path) if path else ""


def _files(items: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({item[key] for item in items for key in ("path", "mask_path") if item[key]})


def fingerprint_files(paths: Sequence[str], mode: str) -> dict[str, str]:
    """``{path: fingerprint}``: sha256 of the bytes (``content``) or size and mtime (``stat``)."""
    fingerprint = _sha256_file if mode == "content" else _stat
    with ThreadPoolExecutor(_HASH_THREADS) as pool:  # hashlib releases the GIL on large buffers
        results = pool.map(fingerprint, paths)
        values = list(tqdm(results, total=len(paths), desc="fingerprinting images", unit="file",
                           disable=None if len(paths) > 500 else True, leave=False))
    return dict(zip(paths, values))


def _sha256_file(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err


def _stat(path: str) -> str:
    try:
        stat = Path(path).stat()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"


def _identity(item: dict[str, Any], fingerprints: dict[str, str]) -> list[Any]:
    """What makes a row's content: its recipe and its files' fingerprints, but not where the files are."""
    return [
        item["id"], item["split"], item["label"], item["defect_type"], item["source_id"], item["base_id"],
        item["anomaly_rank"], item["depth"], item["aug_seed"], item["aug_index"], item["keep_pixel_mask"],
        fingerprints.get(item["path"], ""), fingerprints.get(item["mask_path"], ""),
    ]


def key_inputs(config: SweepConfig, categories: Sequence[CategoryPlan], extractor: FeatureExtractor) -> dict[str, Any]:
    """Everything the cached bytes depend on (see the module docstring); stored in the manifest as is."""
    data, cache = config.data, config.cache
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "backbone": {
            "name": extractor.name,
            "weights_digest": extractor.weights_digest,
            "strides": list(extractor.strides),
            "channels": list(extractor.channels),
            "mean": list(extractor.mean),
            "std": list(extractor.std),
        },
        "image_size": data.image_size,
        "resize": "bilinear to a square, no crop",
        "dtype": cache.dtype,
        "recipe": recipe(config),
        "hash_images": cache.hash_images,
        "code": {
            "bgad_core.data.datasets": _source_digest(bgad_core.data.datasets),
            "bgad_core.data.racp": _source_digest(bgad_core.data.racp),
            "bgad_core.data.features.mask_to_grid": _source_digest(mask_to_grid),
            "bgad_core.backbone.FeatureExtractor.extract": _source_digest(FeatureExtractor.extract),
            "pillow": PIL.__version__,
            "timm": timm.__version__,
        },
        "categories": {c.name: {"rows": len(c.items), "digest": c.digest} for c in categories},
    }


def recipe(config: SweepConfig) -> dict[str, Any]:
    """The split and augmentation settings a reader needs to select rows (also part of the key)."""
    data, cache = config.data, config.cache
    return {
        "max_anomalies": cache.max_anomalies,
        "per_defect_type": data.per_defect_type,
        "split_seed": data.split_seed,
        "val_fraction": data.val_fraction,
        "max_train_normals": data.max_train_normals,
        "train_defect_types": data.train_defect_types,
        "racp_depths": list(cache.racp_depths),
        "racp_per_anomaly": cache.racp_per_anomaly,
        "racp_seed": cache.racp_seed,
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return _digest(inputs)[:_KEY_HEX]


def _digest(value: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _source_digest(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
