"""Feature cache: Ray Data runs the frozen backbone once per image and shards the features to Parquet.

    python -m sweeper.cache --config sweep.yaml [--rebuild] [--verify]

Trials never run the backbone: they read rows of this cache (``sweeper.cache.reader.read_features``). What is in a
cache (rows, synthetic RACP recipes, key) is planned by ``sweeper.cache.manifest``; the on-storage format and the reader
are in ``sweeper.cache.reader``.

Pipeline (``build_cache`` on a miss)::

    ray.data.from_items(rows) -> map_batches(decode)            load_image/load_mask at data.image_size (files on
                                                                 storage URIs are fetched first); synthetic rows are
                                                                 generated from their recipe (racp_sample)
                              -> map_batches(_Extract, ActorPoolStrategy(size=cache.actors), num_gpus=...)
                                                                 FeatureExtractor per actor; fp16/fp32 features,
                                                                 per-level masks (mask_to_grid), packed pixel masks
                              -> write_parquet(<tmp>/shards)     ~ROWS_PER_SHARD rows per file, row groups of
                                                                 ROWS_PER_GROUP so a filtered read skips the rest

Resources. Each actor holds one model replica with ``cache.cpus_per_actor`` CPUs (torch uses that many threads)
and ``cache.gpus_per_actor`` GPUs (default: one when the cluster has GPUs). With GPUs, decoding runs in separate
one-CPU tasks that feed the actors; without, Ray Data fuses decoding into the actors (same resources), which costs
little because a CPU forward pass dominates, and it cannot starve a decode task of the CPUs the actors hold. Parquet
writing runs in one-CPU tasks; when the actors hold every CPU, writes wait for them and the features queue in the
object store (measured on 2 cores: 1 actor x 1 CPU extracts faster than 1 x 2, 13.9 vs 11.3 images/s at 256 px).
``cache.max_cpus`` caps the CPUs the pipeline may take (Ray Data otherwise schedules on all free CPUs); the build
normally runs before any trial starts, so the default is no cap. Row order is preserved (``preserve_order``) so
shards are laid out by category and split, which the reader's row-group statistics exploit. Ray is started with
``ray.init(num_cpus=...)`` only when the caller has not initialised it (connecting to a cluster is the caller's
business).

Publishing is atomic. Everything is written under ``<root>/.tmp-<key>-<uuid>/``, the shards' row ids are checked
against the plan, then: on a local filesystem the directory is renamed to ``<root>/<key>``; on object stores
(no directory rename) the shards are moved into place and ``manifest.json`` is written last, after any old
manifest was deleted first. A cache is complete iff its manifest exists and verifies. Any failure removes the
temporary directory, so nothing half-written is ever published. A process killed mid-build (SIGKILL) can leave
a ``.tmp-*`` directory behind; it is never read and can be deleted. One builder per key at a time: two concurrent
builders of the same key each publish a complete cache and the last one wins. A rebuild replaces the cache under
readers' feet, so do not force one while trials of a sweep read it.

Unreadable images: with ``data.on_bad_image: error`` the build fails with a ``DataError`` naming the file; with
``skip`` the rows that need the file are left out, a warning names it and ``manifest["skipped"]`` lists them.
A synthetic recipe whose anomaly mask is empty at ``image_size`` (a defect thinner than a pixel after resizing)
has nothing to cut and paste: it is always skipped and listed the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import torch
from ray.data import ActorPoolStrategy, ExecutionResources
from ray.data.datasource import FilenameProvider

from bgad_core.data.racp import racp_sample
from bgad_core.backbone import FeatureExtractor
from bgad_core.data.datasets import ImageRecord, load_image, load_mask
from bgad_core.errors import ConfigError, DataError
from bgad_core.data.features import mask_to_grid
from sweeper.cache.reader import (
    CACHE_FORMAT_VERSION,
    FEATURE_DTYPES,
    MANIFEST,
    MASK_DTYPE,
    SHARDS,
    CacheCorruptError,
    Downloads,
    exists,
    feature_schema,
    file_sha256,
    filesystem,
    join,
    parquet_rows,
    verify_cache,
    write_bytes,
)
from sweeper.job.config import CacheSpec, SweepConfig, load_config
from sweeper.cache.manifest import CachePlan, plan_cache, racp_rng, recipe

log = logging.getLogger("sweeper.cache.build")

ROWS_PER_SHARD = 256
ROWS_PER_GROUP = 32
UNREADABLE, EMPTY_MASK = "unreadable", "empty_mask"
_META_COLUMNS = ("row", "id", "category", "split", "label", "defect_type", "path", "source_id", "base_id",
                 "anomaly_rank", "depth", "aug_seed", "aug_index")
_PASSED_ON = (*_META_COLUMNS, "keep_pixel_mask")
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class CacheReport:
    """What ``build_cache`` did."""

    uri: str
    key: str
    hit: bool
    images: int
    synthetic: int
    rows: int
    bytes: int
    shards: int
    seconds: float
    rebuilt_because: str | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        outcome = "hit (reused, no backbone pass)" if self.hit else "miss (built)"
        lines = [
            f"cache {outcome}: {self.uri}",
            f"  key {self.key}",
            f"  {self.images} images + {self.synthetic} synthetic = {self.rows} rows in {self.shards} shards, "
            f"{self.bytes / 2**20:.1f} MiB, {self.seconds:.1f} s",
        ]
        if self.rebuilt_because:
            lines.append(f"  rebuilt because: {self.rebuilt_because}")
        lines += [f"  skipped {p['id']} ({p['category']}): {p['reason']}" for p in self.skipped]
        return "\n".join(lines)


def build_cache(config: SweepConfig, rebuild: bool = False, checksums: bool = True) -> CacheReport:
    """Reuse the complete cache for ``config`` or build it; returns what happened.

    A hit runs no Ray work and no backbone pass. An existing cache is verified first (sizes, and with
    ``checksums`` every shard's sha256 and row count); a corrupt one is rebuilt and the report says why.
    ``rebuild`` forces a rebuild.
    """
    started = time.perf_counter()
    plan = plan_cache(config)
    reason = "rebuild requested" if rebuild else None
    if not rebuild:
        manifest, reason = _reusable(plan.uri, checksums)
        if manifest is not None:
            _check_skipped_allowed(manifest, config.data.on_bad_image)
            return _report(manifest, plan, hit=True, seconds=time.perf_counter() - started)
    if reason is not None:
        log.warning("rebuilding feature cache %s: %s", plan.uri, reason)
    manifest = _build(plan, config)
    return _report(manifest, plan, hit=False, seconds=time.perf_counter() - started, rebuilt_because=reason)


def _reusable(uri: str, checksums: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) for a complete cache; (None, why) for a corrupt one; (None, None) when there is none."""
    try:
        return verify_cache(uri, checksums=checksums), None
    except CacheCorruptError as err:
        return None, str(err)
    except DataError:
        return None, None


def _check_skipped_allowed(manifest: Mapping[str, Any], on_bad_image: str) -> None:
    """A cache built with ``skip`` that did skip files must not be reused silently by an ``error`` config."""
    unreadable = [p for p in manifest["skipped"] if p["kind"] == UNREADABLE]
    if unreadable and on_bad_image == "error":
        raise DataError(
            f"cache {manifest['uri']} was built with on_bad_image=skip and left out unreadable files: "
            + "; ".join(sorted({p["reason"] for p in unreadable}))
        )


def _report(
    manifest: Mapping[str, Any], plan: CachePlan, hit: bool, seconds: float, rebuilt_because: str | None = None
) -> CacheReport:
    synthetic = sum(c["rows"].get("synthetic", 0) for c in manifest["categories"].values())
    return CacheReport(
        uri=plan.uri,
        key=plan.key,
        hit=hit,
        images=manifest["total_rows"] - synthetic,
        synthetic=synthetic,
        rows=manifest["total_rows"],
        bytes=manifest["total_bytes"],
        shards=len(manifest["shards"]),
        seconds=seconds,
        rebuilt_because=rebuilt_because,
        skipped=list(manifest["skipped"]),
    )


# ------------------------------------------------------------------------------------------------------- build


def _build(plan: CachePlan, config: SweepConfig) -> dict[str, Any]:
    """Extract into a temporary directory, check it, describe it, publish it; on any failure remove it."""
    started = time.perf_counter()
    fs, root = filesystem(plan.root_uri)
    tmp = join(root, f".tmp-{plan.key}-{uuid.uuid4().hex[:12]}")
    try:
        levels = probe_levels(plan.extractor, config.data.image_size)
        problems = _run_pipeline(plan, config, levels, fs, join(tmp, SHARDS))
        _warn_skipped(problems)
        shards = _describe_shards(fs, join(tmp, SHARDS))
        _check_rows(fs, tmp, shards, plan, problems)
        manifest = _manifest(plan, config, levels, shards, problems, time.perf_counter() - started)
        publish(fs, tmp, join(root, plan.key), json.dumps(manifest, indent=1).encode())
    except BaseException:
        _remove_dir(fs, tmp)
        raise
    manifest["uri"] = plan.uri
    return manifest


def probe_levels(extractor: FeatureExtractor, image_size: int) -> list[dict[str, Any]]:
    """Stride, channels and grid of each level, from one blank image (the grid depends on the model's padding)."""
    outputs = extractor.extract(torch.zeros((1, image_size, image_size, 3), dtype=torch.uint8))
    return [
        {"stride": stride, "channels": int(out.shape[1]), "grid": [int(out.shape[2]), int(out.shape[3])]}
        for stride, out in zip(extractor.strides, outputs)
    ]


def _ensure_ray(cache: CacheSpec) -> None:
    """Start a local Ray only when the caller has neither started one nor pointed RAY_ADDRESS at a cluster."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=math.ceil(cache.max_cpus) if cache.max_cpus else os.cpu_count())


def _gpus_per_actor(cache: CacheSpec) -> float:
    if cache.gpus_per_actor is not None:
        return cache.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _run_pipeline(
    plan: CachePlan, config: SweepConfig, levels: list[dict[str, Any]], fs: pafs.FileSystem, shards: str
) -> list[dict[str, Any]]:
    """The Ray Data pipeline (the only place the backbone runs); returns the rows it had to leave out."""
    cache, size = config.cache, config.data.image_size
    _ensure_ray(cache)
    gpus = _gpus_per_actor(cache)
    problems = _Problems.remote()
    items = plan.items
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cache.batch_size)))
        ds.context.execution_options.preserve_order = True
        if cache.max_cpus is not None:
            ds.context.execution_options.resource_limits = ExecutionResources.for_limits(cpu=cache.max_cpus)
        ds = ds.map_batches(
            _decode_batch,
            fn_kwargs={"image_size": size, "skip_unreadable": config.data.on_bad_image == "skip", "problems": problems},
            batch_size=cache.batch_size,
            batch_format="numpy",
            num_cpus=cache.cpus_per_actor if gpus == 0 else 1,
        )
        ds = ds.map_batches(
            _Extract,
            fn_constructor_kwargs={
                "backbone": {**config.backbone.model_dump(), "weights": _portable_weights(config.backbone.weights)},
                "digest": plan.extractor.weights_digest,
                "levels": levels,
                "dtype": cache.dtype,
                "image_size": size,
                "gpus": gpus,
                "threads": max(1, int(cache.cpus_per_actor)),
            },
            compute=ActorPoolStrategy(size=cache.actors),
            batch_size=cache.batch_size,
            batch_format="numpy",
            num_cpus=cache.cpus_per_actor,
            num_gpus=gpus,
        )
        ds.write_parquet(
            shards,
            filesystem=fs,
            filename_provider=_ShardNames(),
            min_rows_per_file=ROWS_PER_SHARD,
            row_group_size=ROWS_PER_GROUP,
        )
        return ray.get(problems.found.remote())
    except Exception as err:
        unreadable = [p for p in ray.get(problems.found.remote()) if p["kind"] == UNREADABLE]
        if unreadable:
            raise DataError("; ".join(sorted({p["reason"] for p in unreadable}))) from err
        raise
    finally:
        ray.kill(problems)


def _portable_weights(weights: str) -> str:
    """A weights file as an absolute path (workers do not share the driver's working directory); modes as given."""
    path = Path(weights).expanduser()
    return str(path.resolve()) if path.is_file() else weights


@ray.remote(num_cpus=0)
class _Problems:
    """Collects the rows decode tasks had to leave out: exceptions lose their type on the way through Ray Data."""

    def __init__(self) -> None:
        self._found: list[dict[str, Any]] = []

    def add(self, found: list[dict[str, Any]]) -> None:
        self._found.extend(found)

    def found(self) -> list[dict[str, Any]]:
        return sorted(self._found, key=lambda p: p["row"])


class _ShardNames(FilenameProvider):
    """``part-<task>-<write uuid>-<i>.parquet`` (Ray requires the write uuid in the name)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}-{write_uuid}"


class _Unusable(Exception):
    """A row that cannot be decoded; carries the problem record for the manifest."""

    def __init__(self, kind: str, file: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.file, self.reason = kind, file, reason


class _Decoder:
    """Decodes rows at one size, loading each file at most once per batch (synthetic rows share sources).

    Rows name their files as every node addresses them: paths (shared filesystem or baked into the image) or
    storage URIs, which ``files`` fetches into the batch's scratch directory.
    """

    def __init__(self, size: int, files: Downloads) -> None:
        self.size = size
        self.files = files
        self._images: dict[str, np.ndarray] = {}
        self._masks: dict[str, np.ndarray] = {}

    def row(self, item: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 HxWx3, mask uint8 HxW) of a real row, or the RACP sample a synthetic row describes."""
        if item["split"] != "synthetic":
            mask = self.mask(item["path"], item["label"], item["defect_type"], item["mask_path"])
            return self.image(item["path"]), mask
        anomaly = self.image(item["source_path"])
        anomaly_mask = self.mask(item["source_path"], 1, item["defect_type"], item["source_mask_path"])
        base = self.image(item["base_path"])
        if not anomaly_mask.any():
            raise _Unusable(
                EMPTY_MASK, item["source_mask_path"] or item["source_path"],
                f"defect mask of {item['source_path']} is empty at {self.size} px: nothing to cut and paste",
            )
        return racp_sample(base, anomaly, anomaly_mask, int(item["depth"]), racp_rng(int(item["aug_seed"])))

    def image(self, path: str) -> np.ndarray:
        if path not in self._images:
            self._images[path] = self._readable(path, lambda: load_image(self.files.local(path), self.size))
        return self._images[path]

    def mask(self, path: str, label: int, defect_type: str, mask_path: str) -> np.ndarray:
        if path not in self._masks:
            def load() -> np.ndarray:
                local_mask = Path(self.files.local(mask_path)) if mask_path else None
                record = ImageRecord(Path(self.files.local(path)), int(label), str(defect_type), local_mask)
                return load_mask(record, self.size)

            self._masks[path] = self._readable(mask_path or path, load)
        return self._masks[path]

    def _readable(self, path: str, load: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            return load()
        except DataError as err:
            raise _Unusable(UNREADABLE, path, self.files.named(str(err))) from err


def _decode_batch(
    batch: dict[str, np.ndarray], image_size: int, skip_unreadable: bool, problems: Any
) -> dict[str, np.ndarray]:
    """Ray Data stage 1: rows -> images and masks; unusable rows are reported, then dropped or fatal."""
    kept, images, masks, found = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bgad-decode-") as scratch:
        decoder = _Decoder(image_size, Downloads(Path(scratch)))
        for i in range(len(batch["row"])):
            item = {key: value[i] for key, value in batch.items()}
            try:
                image, mask = decoder.row(item)
            except _Unusable as err:
                found.append({"row": int(item["row"]), "id": str(item["id"]), "category": str(item["category"]),
                              "kind": err.kind, "file": err.file, "reason": err.reason})
                continue
            kept.append(i)
            images.append(image)
            masks.append(mask)
    if found:
        ray.get(problems.add.remote(found))
        fatal = [p for p in found if p["kind"] == UNREADABLE and not skip_unreadable]
        if fatal:
            raise DataError(fatal[0]["reason"])
    out = {key: batch[key][kept] for key in _PASSED_ON}
    out["image"] = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    out["mask"] = np.stack(masks) if masks else np.zeros((0, image_size, image_size), np.uint8)
    return out


class _Extract:
    """Ray Data stage 2 (actor): one frozen backbone replica turning decoded batches into cache rows."""

    def __init__(
        self,
        backbone: dict[str, Any],
        digest: str,
        levels: list[dict[str, Any]],
        dtype: str,
        image_size: int,
        gpus: float,
        threads: int,
    ) -> None:
        torch.set_num_threads(threads)
        if gpus > 0 and not torch.cuda.is_available():
            raise ConfigError(f"cache.gpus_per_actor: {gpus} GPUs requested but torch sees no CUDA device")
        self.device = torch.device("cuda" if gpus > 0 else "cpu")
        self.extractor = FeatureExtractor(backbone["name"], backbone["weights"], backbone["strides"]).to(self.device)
        if self.extractor.weights_digest != digest:
            raise ConfigError(
                f"backbone.weights: {backbone['weights']!r} resolved to other weights on this worker "
                f"({self.extractor.weights_source}, digest {self.extractor.weights_digest}) than on the driver "
                f"(digest {digest}); pass explicit weights"
            )
        self.levels = levels
        self.dtype = _TORCH_DTYPES[dtype]
        self.numpy_dtype = FEATURE_DTYPES[dtype]
        self.schema = feature_schema(levels, dtype, image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["row"])
        if count == 0:
            return self.schema.empty_table()
        features = self.extractor.extract(torch.from_numpy(batch["image"]).to(self.device))
        masks = torch.from_numpy(batch["mask"])
        columns = {key: _meta_column(batch[key], self.schema.field(key)) for key in _META_COLUMNS}
        for index, (level, feature) in enumerate(zip(self.levels, features)):
            grid = tuple(level["grid"])
            if tuple(feature.shape[1:]) != (level["channels"], *grid):
                raise RuntimeError(f"level {index}: backbone gave {list(feature.shape[1:])}, the probe {level}")
            values = feature.to(self.dtype).cpu().numpy().astype(self.numpy_dtype, copy=False)
            columns[f"feat_{index}"] = _fixed_binary(values, self.schema.field(f"feat_{index}").type)
            cells = mask_to_grid(masks, grid).numpy().astype(MASK_DTYPE, copy=False)
            columns[f"mask_{index}"] = _fixed_binary(cells, self.schema.field(f"mask_{index}").type)
        columns["pixel_mask"] = _packed_masks(batch["mask"], batch["keep_pixel_mask"], self.schema)
        return pa.Table.from_pydict(columns, schema=self.schema)


def _meta_column(values: np.ndarray, spec: pa.Field) -> pa.Array:
    """A metadata column of the schema; "" (how plans spell "absent") becomes null in nullable string columns."""
    if pa.types.is_integer(spec.type):
        return pa.array(values.astype(np.int64), type=pa.int64()).cast(spec.type)
    return pa.array([(str(v) or None) if spec.nullable else str(v) for v in values], type=spec.type)


def _fixed_binary(rows: np.ndarray, kind: pa.DataType) -> pa.Array:
    """``(N, ...)`` array -> one fixed-size binary value per row, built on the array's own buffer."""
    return pa.FixedSizeBinaryArray.from_buffers(kind, len(rows), [None, pa.py_buffer(np.ascontiguousarray(rows))])


def _packed_masks(masks: np.ndarray, keep: np.ndarray, schema: pa.Schema) -> pa.Array:
    packed = np.packbits(masks.reshape(len(masks), -1), axis=1)
    kind = schema.field("pixel_mask").type
    return pa.array([row.tobytes() if k else None for row, k in zip(packed, keep)], type=kind)


# ------------------------------------------------------------------------------------------- describe, publish


def _warn_skipped(problems: Sequence[Mapping[str, Any]]) -> None:
    for (kind, file), count in Counter((p["kind"], p["file"]) for p in problems).items():
        reason = next(p["reason"] for p in problems if p["kind"] == kind and p["file"] == file)
        message = f"feature cache: left out {count} row(s) that need {file}: {reason}"
        log.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _describe_shards(fs: pafs.FileSystem, directory: str) -> list[dict[str, Any]]:
    """Name, rows, bytes and sha256 of every shard written, in name order."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    files = sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")),
                   key=lambda i: i.base_name)
    return [
        {"file": i.base_name, "rows": parquet_rows(fs, i.path), "bytes": i.size, "sha256": file_sha256(fs, i.path)}
        for i in files
    ]


def _check_rows(
    fs: pafs.FileSystem, tmp: str, shards: Sequence[Mapping[str, Any]], plan: CachePlan,
    problems: Sequence[Mapping[str, Any]],
) -> None:
    """Every planned row except the left-out ones was written exactly once."""
    expected = {item["row"] for item in plan.items} - {p["row"] for p in problems}
    paths = [join(tmp, SHARDS, s["file"]) for s in shards]
    written = pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=["row"])["row"].to_numpy()
    if len(written) != len(expected) or set(written.tolist()) != expected:
        raise RuntimeError(f"feature cache build wrote {len(written)} rows, expected {len(expected)}: not publishing")


def _manifest(
    plan: CachePlan,
    config: SweepConfig,
    levels: list[dict[str, Any]],
    shards: list[dict[str, Any]],
    problems: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    left_out = {p["row"] for p in problems}
    categories = {}
    for category in plan.categories:
        rows = Counter(item["split"] for item in category.items if item["row"] not in left_out)
        categories[category.name] = {
            "root": str(category.root),
            "has_masks": category.has_masks,
            "anomalies_per_group": category.anomalies_per_group,
            "rows": dict(rows),
        }
    extractor = plan.extractor
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "key": plan.key,
        "key_inputs": plan.key_inputs,
        "image_size": config.data.image_size,
        "dtype": config.cache.dtype,
        "levels": levels,
        "recipe": recipe(config),
        "backbone": {  # what a checkpoint needs to rebuild the backbone (bgad_core.engine.checkpoint / inference)
            "name": extractor.name,
            "weights": config.backbone.weights,
            "weights_source": extractor.weights_source,
            "weights_digest": extractor.weights_digest,
            "strides": list(extractor.strides),
            "channels": list(extractor.channels),
            "mean": list(extractor.mean),
            "std": list(extractor.std),
            "feature_dtype": config.cache.dtype,
        },
        "categories": categories,
        "shards": shards,
        "total_rows": sum(s["rows"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "skipped": problems,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 2),
        "versions": {"ray": ray.__version__, "pyarrow": pa.__version__, "torch": torch.__version__},
    }


def renames_directories(fs: pafs.FileSystem) -> bool:
    """Whether ``fs.move`` of a directory is one atomic rename (local disks) rather than per-object copies."""
    return isinstance(fs, pafs.LocalFileSystem)


def publish(fs: pafs.FileSystem, tmp: str, final: str, manifest: bytes) -> None:
    """Make the verified temporary cache at ``tmp`` the cache at ``final`` (see the module docstring)."""
    if renames_directories(fs):
        write_bytes(fs, join(tmp, MANIFEST), manifest)
        if exists(fs, final):
            trash = f"{final.rstrip('/')}.trash-{uuid.uuid4().hex[:12]}"
            fs.move(final, trash)
            fs.move(tmp, final)
            fs.delete_dir(trash)
        else:
            fs.move(tmp, final)
        return
    if exists(fs, join(final, MANIFEST)):
        fs.delete_file(join(final, MANIFEST))  # the old cache stops counting as complete before it changes
    fs.create_dir(join(final, SHARDS))
    fs.delete_dir_contents(join(final, SHARDS), missing_dir_ok=True)
    for info in fs.get_file_info(pafs.FileSelector(join(tmp, SHARDS))):
        fs.move(info.path, join(final, SHARDS, info.base_name))
    write_bytes(fs, join(final, MANIFEST), manifest)
    fs.delete_dir(tmp)


def _remove_dir(fs: pafs.FileSystem, path: str) -> None:
    try:
        if exists(fs, path):
            fs.delete_dir(path)
    except OSError as err:  # never mask the error that got us here
        log.warning("could not remove the temporary cache directory %s: %s", path, err)


# --------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sweeper.cache", description="Build (or reuse) or verify the feature cache of a sweep config."
    )
    parser.add_argument("--config", required=True, type=Path, help="sweep YAML file")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even when a complete cache exists")
    parser.add_argument("--verify", action="store_true", help="only verify the existing cache (sha256 + row counts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        if args.verify:
            plan = plan_cache(config)
            manifest = verify_cache(plan.uri, checksums=True)
            print(f"cache OK: {plan.uri}\n  key {plan.key}\n  {manifest['total_rows']} rows in "
                  f"{len(manifest['shards'])} shards, {manifest['total_bytes'] / 2**20:.1f} MiB, checksums verified")
            return 0
        print(build_cache(config, rebuild=args.rebuild).summary())
        return 0
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
