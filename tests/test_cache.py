"""Feature cache: build once, reuse, verify, read back; on generated 64 px images with the offline Lite0 weights.

One cache is built per session (``built``) and shared by the read-only tests; tests that damage a cache work on a
copy or on their own dataset.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

import sweeper.cache.build as cache_module
from bgad_core.backbone import FeatureExtractor
from bgad_core.data.datasets import load_image, load_mask, read_category
from bgad_core.errors import ConfigError, DataError
from bgad_core.data.features import mask_to_grid
from bgad_core.data.splits import make_splits
from bgad_core.data.synthetic import make_synthetic_category
from sweeper.cache.build import build_cache, publish
from sweeper.cache.reader import (
    MANIFEST,
    SHARDS,
    CacheCorruptError,
    open_cache,
    read_features,
    row_paths,
    verify_cache,
)
from sweeper.job.config import SweepConfig, load_config
from sweeper.cache.manifest import plan_cache

SIZE = 64
SYNTHETIC = {"name": "weave", "size": SIZE, "n_train": 6, "n_test_good": 4, "n_test_per_defect": 4}
K_MAX, DEPTHS, M = 2, [0, 2], 2


def make_config(cache_root: Path, datasets: list[dict] | None = None, **sections: dict) -> SweepConfig:
    raw = {
        "name": "test",
        "datasets": datasets or [{"synthetic": SYNTHETIC}],
        "data": {"image_size": SIZE},
        "backbone": {"weights": "offline"},
        "cache": {"root": str(cache_root), "max_anomalies": K_MAX, "racp_depths": DEPTHS, "racp_per_anomaly": M,
                  "batch_size": 8},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return SweepConfig.model_validate(raw)


@pytest.fixture(scope="session")
def built(ray_cluster, tmp_path_factory):
    """(config, report) of the session's shared cache, built once."""
    config = make_config(tmp_path_factory.mktemp("shared") / "cache")
    return config, build_cache(config)


@pytest.fixture(scope="session")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(weights="offline")


def _forbid_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the backbone ran on a cache hit")

    monkeypatch.setattr(cache_module, "_run_pipeline", fail)
    monkeypatch.setattr(FeatureExtractor, "forward", fail)


def test_second_build_is_a_hit_without_backbone_passes(built, monkeypatch):
    config, first = built
    assert not first.hit
    # 6 normals + 2x2 drawn anomalies + 2x2 anomalies x 2 depths x M=2 synthetic + 8 val/test images
    assert (first.images, first.synthetic, first.rows) == (18, 16, 34)
    _forbid_backbone(monkeypatch)
    second = build_cache(config)
    assert second.hit and second.uri == first.uri and second.rows == first.rows
    manifest = open_cache(second.uri)
    assert manifest["key"] == first.key and manifest["total_rows"] == 34
    assert [level["grid"] for level in manifest["levels"]] == [[8, 8], [4, 4]]  # strides 8 and 16


def test_trials_cannot_run_the_backbone():
    """The trainable's whole import graph lacks the backbone: a trial has no way to make a backbone pass."""
    probe = "import sys, sweeper.tuning.trainable; print(sorted(m for m in ('timm', 'bgad_core.backbone') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_features_read_back_equal_a_direct_backbone_call(built, extractor):
    config, report = built
    for splits in (["train_normal"], ["val", "test"]):
        cached = read_features(report.uri, "weave", splits)
        root = Path(open_cache(report.uri)["categories"]["weave"]["root"])
        index = read_category(root)
        records = {r.record_id: r for r in index.train + index.test}
        chosen = [records[i] for i in cached.ids]
        images = np.stack([load_image(r.path, SIZE) for r in chosen])
        masks = torch.from_numpy(np.stack([load_mask(r, SIZE) for r in chosen]))
        direct = extractor.extract(images)
        for got, want in zip(cached.features, direct):
            assert got.dtype == torch.float16
            torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=4e-3)
        for got, feature in zip(cached.masks, direct):
            torch.testing.assert_close(got, mask_to_grid(masks, tuple(feature.shape[2:])))
        assert torch.equal(cached.labels, torch.tensor([r.label for r in chosen]))
        if splits == ["val", "test"]:
            assert torch.equal(cached.pixel_masks, masks)
        else:
            assert cached.pixel_masks is None
        assert row_paths(report.uri, "weave", cached.ids) == {r.record_id: str(r.path) for r in chosen}


def test_key_changes_with_image_size_and_backbone(built):
    config, report = built
    assert plan_cache(config).key == report.key
    resized = make_config(Path(config.cache.root), data={"image_size": 96})
    random_weights = make_config(Path(config.cache.root), backbone={"weights": "random"})
    other_levels = make_config(Path(config.cache.root), backbone={"strides": [4, 8, 16]})
    keys = {report.key, *(plan_cache(c).key for c in (resized, random_weights, other_levels))}
    assert len(keys) == 4


def test_synthetic_rows_are_selectable_and_deterministic(built):
    config, report = built
    train = read_features(report.uri, "weave", ["train"], num_anomalies=1, depth=2)
    synthetic = [i for i in train.ids if i.startswith("racp:")]
    real_anomalies = [i for i, label in zip(train.ids, train.labels) if label == 1 and not i.startswith("racp:")]
    assert len(train) == 6 + 2 + 2 * M and len(synthetic) == 2 * M
    assert all(":S2:" in i for i in synthetic)
    assert {i.split(":")[1] for i in synthetic} == set(real_anomalies)
    assert all(m.sum() > 0 for m, i in zip(train.masks[0], train.ids) if i.startswith("racp:"))
    # the first n drawn anomalies are exactly those make_splits draws for n
    index = read_category(Path(open_cache(report.uri)["categories"]["weave"]["root"]))
    assert set(real_anomalies) == {r.record_id for r in make_splits(index, num_anomalies=1).train_anomalies}
    assert len(read_features(report.uri, "weave", ["synthetic"], depth=0, synthetic_per_anomaly=1)) == 4

    rebuilt = build_cache(config, rebuild=True)
    assert not rebuilt.hit and rebuilt.key == report.key and rebuilt.rebuilt_because == "rebuild requested"
    again = read_features(rebuilt.uri, "weave", ["train"], num_anomalies=1, depth=2)
    assert again.ids == train.ids
    for a, b in zip(again.features + again.masks, train.features + train.masks):
        assert torch.equal(a, b)


def test_reader_rejects_what_the_cache_does_not_hold(built):
    _, report = built
    manifest = open_cache(report.uri)
    for kwargs, key in (
        ({"depth": 1}, "depth"),
        ({"num_anomalies": K_MAX + 1, "depth": 0}, "num_anomalies"),
        ({"levels": [3]}, "levels"),
    ):
        with pytest.raises(ConfigError, match=key):
            read_features(manifest, "weave", ["train"], **kwargs)
    with pytest.raises(ConfigError, match="category"):
        read_features(manifest, "nope", ["val"])
    with pytest.raises(ConfigError, match="splits"):
        read_features(manifest, "weave", ["training"])


def test_damaged_shard_is_detected_and_rebuilt(built, tmp_path):
    config, report = built
    copy_root = tmp_path / "cache"
    shutil.copytree(Path(report.uri), copy_root / report.key)
    copy = make_config(copy_root)
    shard = open_cache(str(copy_root / report.key))["shards"][0]["file"]
    shard_path = copy_root / report.key / SHARDS / shard
    original = shard_path.read_bytes()

    shard_path.write_bytes(original[: len(original) // 2])
    with pytest.raises(CacheCorruptError, match=f"shard {SHARDS}/{shard}.*truncated"):
        verify_cache(str(copy_root / report.key), checksums=False)
    shard_path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(CacheCorruptError, match=f"shard {SHARDS}/{shard}.*sha256"):
        verify_cache(str(copy_root / report.key))
    shard_path.unlink()
    with pytest.raises(CacheCorruptError, match=f"shard {SHARDS}/{shard} is missing"):
        open_cache(str(copy_root / report.key))

    rebuilt = build_cache(copy)
    assert not rebuilt.hit and rebuilt.key == report.key and "is missing" in rebuilt.rebuilt_because
    verify_cache(rebuilt.uri)
    assert not list(copy_root.glob(".tmp-*")) and not list(copy_root.glob("*.trash-*"))


def test_unreadable_image_fails_naming_it_or_is_skipped(ray_cluster, tmp_path):
    category = make_synthetic_category(tmp_path / "src", **{**SYNTHETIC, "name": "broken"})
    bad = category / "test" / "good" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    root = tmp_path / "cache"
    config = make_config(root, datasets=[{"path": str(category)}])

    with pytest.raises(DataError, match=str(bad)):
        build_cache(config)
    assert not root.exists() or not any(root.iterdir())  # nothing published, no temporary directory left

    skipping = make_config(root, datasets=[{"path": str(category)}], data={"on_bad_image": "skip"})
    with pytest.warns(UserWarning, match=str(bad)):
        report = build_cache(skipping)
    assert [p["file"] for p in report.skipped] == [str(bad)] and report.images == 17
    evaluation = read_features(report.uri, "broken", ["val", "test"])
    assert len(evaluation) == 7 and not any(i.endswith("good/001.png") for i in evaluation.ids)
    with pytest.raises(DataError, match=str(bad)):
        build_cache(config)  # an error config must not silently reuse a cache that skipped files


def test_image_named_entries_that_are_no_file_follow_on_bad_image(tmp_path, caplog):
    """A dangling symlink named like an image stops the plan (before any extraction), or is skipped with a warning."""
    category = make_synthetic_category(tmp_path / "src", **{**SYNTHETIC, "name": "linked"})
    dangling = category / "train" / "good" / "999.png"
    dangling.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match=f"cannot read image {dangling}: broken symlink"):
        plan_cache(make_config(tmp_path / "cache", datasets=[{"path": str(category)}]))
    skipping = make_config(tmp_path / "cache", datasets=[{"path": str(category)}], data={"on_bad_image": "skip"})
    plan = plan_cache(skipping)
    assert f"skipping image {dangling}: broken symlink" in caplog.text
    assert len(plan.items) > 0 and not any(i["id"].endswith("999.png") for i in plan.items)


class _RecordingFileSystem:
    """A local filesystem that is not a ``LocalFileSystem`` (so ``publish`` treats it as an object store) and
    records the order of moves and deletes."""

    def __init__(self) -> None:
        self._fs = pafs.LocalFileSystem()
        self.events: list[tuple[str, str]] = []

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def move(self, src: str, dst: str) -> None:
        self.events.append(("move", Path(dst).name))
        self._fs.move(src, dst)

    def delete_file(self, path: str) -> None:
        self.events.append(("delete", Path(path).name))
        self._fs.delete_file(path)


def test_object_store_publish_writes_the_manifest_last(tmp_path):
    """Without directory renames, the old manifest goes first, shards move one by one, the manifest comes last."""
    final, tmp = tmp_path / "key", tmp_path / ".tmp-key-1"
    (final / SHARDS).mkdir(parents=True)
    (final / SHARDS / "part-old.parquet").write_bytes(b"old")
    (final / MANIFEST).write_text("{}")
    (tmp / SHARDS).mkdir(parents=True)
    (tmp / SHARDS / "part-new.parquet").write_bytes(b"new")
    fs = _RecordingFileSystem()
    assert not cache_module.renames_directories(fs)

    publish(fs, tmp.as_posix(), final.as_posix(), b'{"new": true}')

    assert fs.events == [("delete", MANIFEST), ("move", "part-new.parquet")]
    assert sorted(p.name for p in (final / SHARDS).iterdir()) == ["part-new.parquet"]
    assert (final / MANIFEST).read_text() == '{"new": true}' and not tmp.exists()


CONFIG_ERRORS = {
    "unknown key": ("name: x\ndatasets:\n  - synthetic: {size: 64}\ncache:\n  racp_depht: [1]\n",
                    r"(?s)sweep\.yaml.*cache\.racp_depht: unknown key"),
    "wrong type": ("name: x\ndatasets:\n  - {synthetic: {size: 64}}\ndata:\n  image_size: tiny\n",
                   r"(?s)sweep\.yaml.*data\.image_size: .*integer.*'tiny'"),
    "two sources": ("name: x\ndatasets:\n  - {path: a, synthetic: {size: 64}}\n",
                    r"(?s)sweep\.yaml.*datasets\[0\]: give exactly one"),
    "bad YAML": ("name: [x\n", r"sweep\.yaml: invalid YAML"),
    "repeated key": ("name: x\ndatasets: [{synthetic: {}}]\ncache: {max_anomalies: 1}\ncache: {dtype: float32}\n",
                     r"(?s)sweep\.yaml: invalid YAML: repeated key 'cache'.*line 4"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_name_the_file_and_key(case, tmp_path):
    text, pattern = CONFIG_ERRORS[case]
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)
