"""The on-storage format of a feature cache, its verification, and the fast reader trials use.

This module is all a trial needs: it imports pyarrow, numpy and torch but not Ray, and it takes nothing but a cache
URI (or the manifest ``open_cache`` returned), so it runs unchanged in a Ray Tune trial on any node that can reach
the storage.

Layout (``<uri>`` = ``<cache.root>/<key>``, any pyarrow filesystem: local path, ``s3://``, ``gs://``)::

    <uri>/manifest.json            written last: a cache is complete iff its manifest exists and verifies
    <uri>/shards/part-*.parquet    one row per image (real or synthetic)

Columns (one row per image)::

    row int64 (global order)  id string  category string  split string  label int8  defect_type string
    path string (null for synthetic rows)  source_id string (synthetic: the real anomaly)  base_id string
    (synthetic: the normal it was pasted on)  anomaly_rank int16 (-1 n/a)  depth int8 (-1 n/a)
    aug_seed int64 (-1 n/a)  aug_index int16 (-1 n/a)
    feat_<l>   fixed_size_binary[C_l*H_l*W_l*itemsize]  level l's (C_l, H_l, W_l) map, little-endian float16 or
                                                        float32 (manifest ``dtype``), C-major
    mask_<l>   fixed_size_binary[H_l*W_l*4]             defect fraction per cell of level l, little-endian float32
    pixel_mask fixed_size_binary[ceil(H*W/8)]           np.packbits of the HxW {0,1} mask (val/test rows of
                                                        categories with masks; null otherwise)

Shapes and dtypes live in ``manifest.json`` (``levels``: stride, channels, grid; ``dtype``; ``image_size``), not
in Ray's tensor extension types, whose Parquet metadata is tied to Ray versions: any pyarrow reads these files.
Arrays are stored as fixed-size binary values rather than ``fixed_size_list<halffloat>``: Parquet has no
fixed-size list, so a list column carries repetition/definition levels for every element, and decoding those
dominated reads (measured: 17.5 MiB shard read in 190 ms as lists, 8.5 ms as fixed-size binary, same size on
disk). A fixed-size binary column decodes into one contiguous buffer that numpy and torch view without copying.

``path`` is where the image was when the cache was built, as every node addresses it: a filesystem path or a storage
URI (for plots and audits; the key does not depend on it, so a moved dataset keeps its cache). ``row_paths`` maps
row ids to it and ``load_image_at`` reads it from either.

Split names: ``train_normal``, ``train_anomaly`` (the K_max drawn real anomalies, ranked 0..K_max-1 within their
defect type in draw order), ``synthetic`` (RACP samples of the drawn anomalies, per depth S), ``val``, ``test``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from bgad_core.data.datasets import Size, load_image
from bgad_core.errors import ConfigError, DataError
from bgad_core.data.features import FeatureSet

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
SPLITS: tuple[str, ...] = ("train_normal", "train_anomaly", "synthetic", "val", "test")
TRAIN = "train"  # read_features alias: train_normal + train_anomaly (+ synthetic when a depth is given)
EVALUATION_SPLITS = frozenset({"val", "test"})
FEATURE_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
MASK_DTYPE = np.dtype("<f4")
_HASH_CHUNK = 1 << 22
_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs"})  # object stores whose pyarrow paths are "<bucket>/<key>"


class CacheCorruptError(DataError):
    """A published cache does not match its manifest (missing, truncated or altered shard); names the shard."""


# ----------------------------------------------------------------------------------------------------- storage


def is_uri(location: str) -> bool:
    """Whether ``location`` is a storage URI (``s3://bucket/key``, ``gs://...``, ``file:///...``), not a path."""
    return "://" in location


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path within it; plain paths are local (made absolute).

    Object stores take their endpoint and credentials from the environment (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ... for S3-compatible servers; see cluster/README.md).
    """
    if not is_uri(uri):
        return pafs.LocalFileSystem(), Path(uri).expanduser().resolve().as_posix()
    return pafs.FileSystem.from_uri(uri)


def local_path(uri: str) -> Path | None:
    """The local directory ``uri`` names, or None for remote storage."""
    if not is_uri(uri):
        return Path(uri).expanduser().resolve()
    parsed = urlparse(uri)
    return Path(parsed.path) if parsed.scheme == "file" else None


def absolute_uri(uri: str) -> str:
    """``uri`` with local paths made absolute, so it means the same thing on every node and in every process."""
    return uri.rstrip("/") if is_uri(uri) else Path(uri).expanduser().resolve().as_posix()


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for URIs and filesystem paths alike (pyarrow paths always use '/')."""
    return "/".join([base.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def file_sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """``{relative path: FileInfo}`` of every file under ``root`` (empty when it does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {info.path[len(root.rstrip("/")) + 1:]: info for info in infos if info.type == pafs.FileType.File}


def upload_tree(folder: Path, uri: str) -> None:
    """Copy the files of ``folder`` to ``uri``, skipping those already there with the same size.

    Meant for generated categories, whose content is a deterministic function of their parameters (which name the
    target through its digest): a file of the right size is the right file, so a rerun costs one listing.
    """
    fs, root = filesystem(uri)
    there = _tree(fs, root)
    for relative, info in _tree(pafs.LocalFileSystem(), folder.as_posix()).items():
        if relative not in there or there[relative].size != info.size:
            write_bytes(fs, f"{root}/{relative}", (folder / relative).read_bytes())


def mirror_tree(uri: str, folder: Path) -> Path:
    """Make ``folder`` an exact copy of the files under ``uri`` and return it.

    A file is fetched again when its size or modification time differs (each copy takes its source's mtime), and
    local files that are gone from ``uri`` are removed, so planning sees exactly what decode tasks will read.
    """
    fs, root = filesystem(uri)
    remote = _tree(fs, root)
    if not remote:
        raise DataError(f"category directory not found or empty: {uri}")
    local = _tree(pafs.LocalFileSystem(), folder.as_posix())
    for relative in set(local) - set(remote):
        (folder / relative).unlink()
    for relative, info in remote.items():
        copy = local.get(relative)
        if copy is not None and copy.size == info.size and info.mtime_ns in (None, copy.mtime_ns):
            continue
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(fs, info.path))
        if info.mtime_ns is not None:
            os.utime(target, ns=(info.mtime_ns, info.mtime_ns))
    return folder


class Downloads:
    """Local files for locations that are paths or storage URIs, for decoders that need a local file (PIL).

    A path is used where it is; a URI is downloaded once into ``folder`` (the caller's scratch directory, removed
    with it). Object-store filesystems are reused per bucket: creating one costs a request (the bucket's region),
    which would otherwise double the requests per image. ``named`` rewrites a message that names a download so it
    names the URI instead: an unreadable image is reported where it lives.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._copies: dict[str, str] = {}
        self._buckets: dict[str, pafs.FileSystem] = {}

    def local(self, location: str) -> str:
        """A local path holding the file at ``location``; a missing or unreadable URI is a ``DataError`` naming it."""
        if not is_uri(location):
            return location
        if location not in self._copies:
            fs, path = self._filesystem(location)
            target = self.folder / f"{len(self._copies)}{PurePosixPath(path).suffix}"
            try:
                target.write_bytes(read_bytes(fs, path))
            except OSError as err:
                raise DataError(f"cannot read {location}: {err}") from err
            self._copies[location] = str(target)
        return self._copies[location]

    def named(self, message: str) -> str:
        for uri, copy in self._copies.items():
            message = message.replace(copy, uri)
        return message

    def _filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        parsed = urlparse(uri)
        if parsed.scheme not in _BUCKET_SCHEMES or parsed.query:
            return pafs.FileSystem.from_uri(uri)
        bucket = f"{parsed.scheme}://{parsed.netloc}"
        if bucket not in self._buckets:
            self._buckets[bucket] = pafs.FileSystem.from_uri(uri)[0]
        return self._buckets[bucket], parsed.netloc + parsed.path


def load_image_at(location: str, size: Size | None) -> np.ndarray:
    """``bgad_core.data.datasets.load_image`` of a path or a storage URI (a cache's ``path`` column holds either)."""
    with tempfile.TemporaryDirectory(prefix="bgad-image-") as folder:
        files = Downloads(Path(folder))
        try:
            return load_image(files.local(location), size)
        except DataError as err:
            raise DataError(files.named(str(err))) from err


def parquet_rows(fs: pafs.FileSystem, path: str) -> int:
    """Row count from the Parquet footer (reads only the footer)."""
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


# ------------------------------------------------------------------------------------------------------ schema


def feature_schema(levels: Sequence[Mapping[str, Any]], dtype: str, image_size: int) -> pa.Schema:
    """Schema of every shard for the given levels (``channels``, ``grid``), feature dtype and image size."""
    fields = [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("defect_type", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("base_id", pa.string()),
        pa.field("anomaly_rank", pa.int16(), nullable=False),
        pa.field("depth", pa.int8(), nullable=False),
        pa.field("aug_seed", pa.int64(), nullable=False),
        pa.field("aug_index", pa.int16(), nullable=False),
    ]
    for index, level in enumerate(levels):
        height, width = level["grid"]
        cells = height * width
        fields.append(pa.field(f"feat_{index}", pa.binary(level["channels"] * cells * FEATURE_DTYPES[dtype].itemsize)))
        fields.append(pa.field(f"mask_{index}", pa.binary(cells * MASK_DTYPE.itemsize)))
    fields.append(pa.field("pixel_mask", pa.binary(packed_mask_bytes(image_size))))
    return pa.schema(fields)


def packed_mask_bytes(image_size: int) -> int:
    return (image_size * image_size + 7) // 8


# ------------------------------------------------------------------------------------------------ verification


def verify_cache(uri: str, checksums: bool = True) -> dict[str, Any]:
    """Check a published cache against its manifest and return the manifest (with ``uri`` added).

    Always: the manifest exists and every shard exists with the recorded byte size. With ``checksums``: every
    shard's sha256 and Parquet row count too (reads all bytes once). Raises ``DataError`` when there is no complete
    cache at ``uri`` and ``CacheCorruptError`` naming the shard when one does not match.
    """
    uri = absolute_uri(uri)
    fs, root = filesystem(uri)
    manifest_path = join(root, MANIFEST)
    if fs.get_file_info(manifest_path).type != pafs.FileType.File:
        raise DataError(f"no complete feature cache at {uri}: {MANIFEST} is missing")
    try:
        manifest = json.loads(read_bytes(fs, manifest_path))
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheCorruptError(f"cache {uri}: {MANIFEST} is not valid JSON ({err})") from err
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheCorruptError(
            f"cache {uri}: format version {manifest.get('format_version')!r}, this code reads {CACHE_FORMAT_VERSION}"
        )
    shards = manifest["shards"]
    paths = [join(root, SHARDS, shard["file"]) for shard in shards]
    for shard, info in zip(shards, fs.get_file_info(paths)):
        _check_shard(uri, fs, shard, info, checksums)
    if sum(shard["rows"] for shard in shards) != manifest["total_rows"]:
        raise CacheCorruptError(f"cache {uri}: shard row counts do not add up to total_rows {manifest['total_rows']}")
    manifest["uri"] = uri
    return manifest


def _check_shard(uri: str, fs: pafs.FileSystem, shard: Mapping[str, Any], info: pafs.FileInfo, checksums: bool) -> None:
    name = f"{SHARDS}/{shard['file']}"
    if info.type != pafs.FileType.File:
        raise CacheCorruptError(f"cache {uri}: shard {name} is missing")
    if info.size != shard["bytes"]:
        raise CacheCorruptError(
            f"cache {uri}: shard {name} has {info.size} bytes, the manifest records {shard['bytes']} "
            "(truncated or rewritten)"
        )
    if not checksums:
        return
    if file_sha256(fs, info.path) != shard["sha256"]:
        raise CacheCorruptError(f"cache {uri}: shard {name} does not match its sha256 in the manifest")
    try:
        rows = parquet_rows(fs, info.path)
    except (OSError, pa.ArrowInvalid) as err:
        raise CacheCorruptError(f"cache {uri}: shard {name} is not a readable Parquet file ({err})") from err
    if rows != shard["rows"]:
        raise CacheCorruptError(f"cache {uri}: shard {name} has {rows} rows, the manifest records {shard['rows']}")


def open_cache(uri: str, checksums: bool = False) -> dict[str, Any]:
    """The manifest of the complete cache at ``uri``, checked cheaply (existence and sizes) unless ``checksums``.

    Pass the result to ``read_features`` to read several splits without re-checking the cache each time.
    """
    return verify_cache(uri, checksums=checksums)


# ------------------------------------------------------------------------------------------------------ reader


def read_features(
    cache: str | Mapping[str, Any],
    category: str,
    splits: Sequence[str],
    num_anomalies: int | None = None,
    depth: int | None = None,
    levels: Sequence[int] | None = None,
    synthetic_per_anomaly: int | None = None,
) -> FeatureSet:
    """Rows of one category as a ``FeatureSet``, in cache order (normals, anomalies, synthetic, val, test).

    Args:
        cache: a cache URI, or the manifest ``open_cache`` returned.
        category: the category name (``manifest["categories"]``).
        splits: any of ``SPLITS``, or ``"train"`` = train_normal + train_anomaly (+ synthetic when ``depth`` given).
        num_anomalies: n <= K_max; the train anomalies (and their synthetic rows) of rank < n, i.e. the first n
            drawn per defect type (in total when the cache was drawn with ``per_defect_type: false``). None: all.
        depth: RandAugment depth S of the synthetic rows (one of ``manifest["recipe"]["racp_depths"]``).
        levels: indices of the feature levels to load (default all).
        synthetic_per_anomaly: use only the first m <= M synthetic samples of each anomaly (default all M).

    Features keep the cache dtype; ``pixel_masks`` is set when only val/test rows of a category with masks are read.
    The tensors are built from the Arrow buffers of this read without per-row Python work; nothing else refers
    to those buffers, so the tensors may be modified.
    """
    manifest = open_cache(cache) if isinstance(cache, str) else cache
    info = _category(manifest, category)
    chosen = _expand_splits(splits, depth)
    level_ids = _levels(manifest, levels)
    recipe = manifest["recipe"]
    n = _bounded("num_anomalies", num_anomalies, recipe["max_anomalies"])
    m = _bounded("synthetic_per_anomaly", synthetic_per_anomaly, recipe["racp_per_anomaly"])
    if "synthetic" in chosen and depth not in recipe["racp_depths"]:
        raise ConfigError(f"depth: synthetic rows need one of the cached depths {recipe['racp_depths']}, got {depth!r}")
    want_pixels = info["has_masks"] and set(chosen) <= EVALUATION_SPLITS
    columns = ["row", "id", "label"] + [f"{kind}_{i}" for i in level_ids for kind in ("feat", "mask")]
    table = _scan(manifest, columns + (["pixel_mask"] if want_pixels else []), _filter(category, chosen, n, depth, m))
    size, dtype = manifest["image_size"], FEATURE_DTYPES[manifest["dtype"]]
    return FeatureSet(
        features=[_tensor(table[f"feat_{i}"], dtype, (manifest["levels"][i]["channels"], *_grid(manifest, i)))
                  for i in level_ids],
        masks=[_tensor(table[f"mask_{i}"], MASK_DTYPE, _grid(manifest, i)) for i in level_ids],
        labels=torch.from_numpy(table["label"].to_numpy().astype(np.int64)),
        ids=table["id"].to_pylist(),
        pixel_masks=_unpack_masks(table["pixel_mask"], size) if want_pixels else None,
    )


def row_paths(cache: str | Mapping[str, Any], category: str, ids: Sequence[str]) -> dict[str, str]:
    """``{id: image file}`` of the given real rows of a category (synthetic rows have no file and are left out)."""
    manifest = open_cache(cache) if isinstance(cache, str) else cache
    _category(manifest, category)
    wanted = (pc.field("category") == category) & pc.field("id").isin(list(ids)) & pc.field("path").is_valid()
    table = _scan(manifest, ["row", "id", "path"], wanted)
    return dict(zip(table["id"].to_pylist(), table["path"].to_pylist()))


def _category(manifest: Mapping[str, Any], category: str) -> Mapping[str, Any]:
    if category not in manifest["categories"]:
        raise ConfigError(f"category: {category!r} is not in the cache (cached: {sorted(manifest['categories'])})")
    return manifest["categories"][category]


def _expand_splits(splits: Sequence[str], depth: int | None) -> list[str]:
    if isinstance(splits, str) or not splits:
        raise ConfigError(f"splits: expected a non-empty list of split names, got {splits!r}")
    chosen: list[str] = []
    for name in splits:
        if name == TRAIN:
            chosen += ["train_normal", "train_anomaly"] + (["synthetic"] if depth is not None else [])
        elif name in SPLITS:
            chosen.append(name)
        else:
            raise ConfigError(f"splits: unknown split {name!r} (known: {[*SPLITS, TRAIN]})")
    return list(dict.fromkeys(chosen))


def _levels(manifest: Mapping[str, Any], levels: Sequence[int] | None) -> list[int]:
    count = len(manifest["levels"])
    if levels is None:
        return list(range(count))
    bad = [i for i in levels if not 0 <= i < count]
    if bad or not levels:
        raise ConfigError(f"levels: expected indices in [0, {count}), got {list(levels)}")
    return list(levels)


def _bounded(key: str, value: int | None, limit: int) -> int:
    """``value`` in [0, limit] (None = limit): asking for more than was cached is a configuration error."""
    if value is None:
        return limit
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= limit:
        raise ConfigError(f"{key}: expected an int in [0, {limit}] (the cache holds {limit}), got {value!r}")
    return int(value)


def _filter(category: str, splits: Sequence[str], n: int, depth: int | None, m: int) -> pc.Expression:
    field = pc.field
    conditions = []
    for split in splits:
        condition = field("split") == split
        if split in ("train_anomaly", "synthetic"):
            condition &= field("anomaly_rank") < n
        if split == "synthetic":
            condition &= (field("depth") == depth) & (field("aug_index") < m)
        conditions.append(condition)
    either = conditions[0]
    for condition in conditions[1:]:
        either |= condition
    return (field("category") == category) & either


def _scan(manifest: Mapping[str, Any], columns: list[str], expression: pc.Expression) -> pa.Table:
    """Matching rows of the listed shards only (never whatever else lies in the folder), sorted by ``row``."""
    fs, root = filesystem(manifest["uri"])
    paths = [join(root, SHARDS, shard["file"]) for shard in manifest["shards"]]
    table = pads.dataset(paths, format="parquet", filesystem=fs).to_table(columns=columns, filter=expression)
    rows = table["row"].to_numpy()
    if np.any(rows[1:] < rows[:-1]):
        table = table.take(pa.array(np.argsort(rows, kind="stable")))
    return table


def _grid(manifest: Mapping[str, Any], level: int) -> tuple[int, int]:
    height, width = manifest["levels"][level]["grid"]
    return int(height), int(width)


def _rows(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size binary column as an ``(N, width)`` uint8 view of one contiguous Arrow buffer (nulls included)."""
    array = column.combine_chunks()
    width = array.type.byte_width
    if len(array) == 0:
        return np.zeros((0, width), dtype=np.uint8)
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return data[array.offset * width : (array.offset + len(array)) * width].reshape(len(array), width)


def _tensor(column: pa.ChunkedArray, dtype: np.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``(N, *shape)`` tensor of ``dtype`` values stored as fixed-size binary, without copying them again."""
    values = _rows(column).view(dtype).reshape(len(column), *shape)
    with warnings.catch_warnings():  # Arrow marks its buffers read-only; these belong to this read alone
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)


def _unpack_masks(column: pa.ChunkedArray, image_size: int) -> torch.Tensor | None:
    """Packed bit masks -> ``(N, H, W)`` uint8 {0,1}; None when any row has no mask."""
    if column.null_count:
        return None
    bits = np.unpackbits(_rows(column), axis=1, count=image_size * image_size)
    return torch.from_numpy(bits.reshape(len(column), image_size, image_size))
