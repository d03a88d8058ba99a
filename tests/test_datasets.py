"""Layout readers, image / mask loaders and the synthetic category, plus counts on the real data."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgad_core.data.datasets import (
    FOLDER_TEST_EVERY,
    ImageRecord,
    detect_layout,
    load_image,
    load_mask,
    read_category,
)
from bgad_core.errors import ConfigError, DataError
from bgad_core.data.synthetic import make_synthetic_category


def _write(path: Path, array: np.ndarray, **save_kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_kwargs)
    return path


def _rgb(seed: int, height: int = 24, width: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _square_mask(height: int = 24, width: int = 32) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[4:12, 8:20] = 255
    return mask


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_category(root, size=64, n_train=6, n_test_good=4, n_test_per_defect=3,
                                   defect_types=("scratch", "spot", "stain"))


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """A tiny MVTec category with mixed extensions: .JPG/.jpeg/.bmp/.tif images, masks with other extensions."""
    cat = tmp_path / "mixed"
    _write(cat / "train/good/a.JPG", _rgb(0))
    _write(cat / "train/good/b.jpeg", _rgb(1))
    _write(cat / "train/good/c.bmp", _rgb(2))
    _write(cat / "train/good/notes.TIF", _rgb(3))
    (cat / "train/good/readme.txt").write_text("not an image")
    _write(cat / "test/good/g.png", _rgb(4))
    _write(cat / "test/crack/x.bmp", _rgb(5))
    _write(cat / "test/crack/y.JPG", _rgb(6))
    _write(cat / "ground_truth/crack/x_mask.png", _square_mask())
    _write(cat / "ground_truth/crack/y_mask.bmp", _square_mask())
    return cat


def test_synthetic_category_reads_back(synthetic: Path) -> None:
    index = read_category(synthetic)
    assert index.name == "synthetic" and index.has_masks
    assert len(index.train) == 6 and all(r.label == 0 and r.defect_type == "good" for r in index.train)
    assert index.defect_types == ["scratch", "spot", "stain"]
    labels = [r.label for r in index.test]
    assert labels.count(0) == 4 and labels.count(1) == 9
    assert all((r.mask_path is None) == (r.label == 0) for r in index.test)
    ids = [r.record_id for r in index.train + index.test]
    assert len(set(ids)) == len(ids) and "train/good/000.png" in ids and "test/spot/002.png" in ids
    for record in index.test:
        mask = load_mask(record, 64)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert mask.any() == (record.label == 1)


def test_synthetic_is_deterministic_and_cached(tmp_path: Path, synthetic: Path) -> None:
    again = make_synthetic_category(tmp_path, size=64, n_train=6, n_test_good=4, n_test_per_defect=3,
                                    defect_types=("scratch", "spot", "stain"))
    for path in sorted(synthetic.rglob("*.png")):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again / path.relative_to(synthetic))))
    assert make_synthetic_category(tmp_path, size=64, n_train=6, n_test_good=4, n_test_per_defect=3,
                                   defect_types=("scratch", "spot", "stain")) == again
    with pytest.raises(DataError, match="already exists"):
        make_synthetic_category(tmp_path, size=64, n_train=7)
    other = make_synthetic_category(tmp_path / "other", size=64, n_train=6, seed=1)
    assert not np.array_equal(np.asarray(Image.open(other / "train/good/000.png")),
                              np.asarray(Image.open(again / "train/good/000.png")))


def test_synthetic_defects_change_exactly_the_masked_pixels(synthetic: Path) -> None:
    """Defects are visible: inside the mask pixels differ strongly from the surrounding surface."""
    for defect in ("scratch", "spot", "stain"):
        for image_path in sorted((synthetic / "test" / defect).glob("*.png")):
            image = np.asarray(Image.open(image_path), dtype=np.float64)
            mask = np.asarray(Image.open(synthetic / "ground_truth" / defect / f"{image_path.stem}_mask.png")) > 0
            assert 0 < mask.sum() < 0.25 * mask.size
            assert np.abs(image[mask].mean(0) - image[~mask].mean(0)).max() > 40


@pytest.mark.parametrize("kwargs, key", [({"size": 8}, "size"), ({"n_train": 0}, "n_train"),
                                         ({"defect_types": ("dent",)}, "defect_types"), ({"seed": -1}, "seed")])
def test_synthetic_bad_arguments_name_the_key(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        make_synthetic_category(tmp_path, **kwargs)


def test_any_extension_and_masks_with_other_extensions(mvtec: Path) -> None:
    index = read_category(mvtec)
    assert [r.path.name for r in index.train] == ["a.JPG", "b.jpeg", "c.bmp", "notes.TIF"]
    assert [(r.path.name, r.mask_path.name if r.mask_path else None) for r in index.test] == [
        ("g.png", None), ("x.bmp", "x_mask.png"), ("y.JPG", "y_mask.bmp")]
    image = load_image(index.train[0].path, 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert load_image(index.train[2].path, None).shape == (24, 32, 3)
    assert load_image(index.train[2].path, (12, 20)).shape == (12, 20, 3)
    assert np.array_equal(load_image(index.train[2].path, None), _rgb(2))
    mask = load_mask(index.test[1], (24, 32))
    assert np.array_equal(mask, (_square_mask() > 0).astype(np.uint8))
    assert load_mask(index.test[0], 8).sum() == 0


def _bad_entries(cat: Path, monkeypatch: pytest.MonkeyPatch) -> dict[Path, str]:
    """Image-named entries that are no readable file, beside the good images, and the reason each must be named."""
    good = cat / "train/good"
    (good / "dangling.png").symlink_to(cat / "nowhere.png")
    (good / "loop.jpg").symlink_to(good / "loop.jpg")
    (good / "folder.png").mkdir()
    locked = _write(good / "locked.png", _rgb(7))  # tests run as root, who may read anything: os.access says no
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    return {good / "dangling.png": "broken symlink (No such file or directory)",
            good / "folder.png": "a directory, not an image file",
            good / "locked.png": "no read permission",
            good / "loop.jpg": "broken symlink (Too many levels of symbolic links)"}


def test_unreadable_image_entries_are_an_error_naming_the_file(mvtec: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for path, reason in sorted(_bad_entries(mvtec, monkeypatch).items()):  # each one stops the read, in turn
        with pytest.raises(DataError, match=re.escape(f"cannot read image {path}: {reason}")):
            read_category(mvtec)
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    mask = mvtec / "ground_truth/crack/z_mask.png"
    mask.symlink_to(mvtec / "gone.png")
    with pytest.raises(DataError, match=re.escape(f"cannot read mask {mask}: broken symlink")):
        read_category(mvtec)


def test_skip_warns_about_every_unreadable_image_entry(mvtec: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    bad = _bad_entries(mvtec, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="bgad_core.data.datasets"):
        index = read_category(mvtec, on_bad_image="skip")
    assert [r.path.name for r in index.train] == ["a.JPG", "b.jpeg", "c.bmp", "notes.TIF"]
    assert sorted(caplog.messages) == sorted(f"skipping image {path}: {reason}" for path, reason in bad.items())
    with pytest.raises(ConfigError, match="on_bad_image must be one of"):
        read_category(mvtec, on_bad_image="ignore")


def test_grey_palette_rgba_and_16bit_become_rgb(tmp_path: Path) -> None:
    grey = np.arange(24 * 32, dtype=np.uint8).reshape(24, 32)
    paths = {
        "grey": _write(tmp_path / "grey.jpg", grey, quality=100),
        "rgba": _write(tmp_path / "rgba.png", np.dstack([_rgb(0), np.full((24, 32), 7, np.uint8)])),
        "palette": tmp_path / "palette.png",
        "16bit": tmp_path / "deep.png",
    }
    Image.fromarray(_rgb(1)).convert("P").save(paths["palette"])
    Image.fromarray(grey.astype(np.uint16) * 257).save(paths["16bit"])
    for name, path in paths.items():
        image = load_image(path, None)
        assert image.shape == (24, 32, 3) and image.dtype == np.uint8, name
    deep = load_image(paths["16bit"], None)
    assert np.array_equal(deep[..., 0], grey) and np.array_equal(deep[..., 0], deep[..., 2])
    assert np.array_equal(load_image(paths["rgba"], None), _rgb(0))


def test_unreadable_and_truncated_images_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match="garbage.png"):
        load_image(garbage, 8)
    full = _write(tmp_path / "full.jpg", _rgb(0, 64, 64)).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="truncated.jpg"):
        load_image(truncated, 8)
    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png", 8)
    for bad in (0, (8, 8, 3), (8, -1), 2.5):
        with pytest.raises(ConfigError, match="size"):
            load_image(_write(tmp_path / "ok.png", _rgb(0)), bad)


def test_missing_mask_file_is_named_at_read_time(mvtec: Path) -> None:
    (mvtec / "ground_truth/crack/y_mask.bmp").unlink()
    with pytest.raises(DataError, match="y_mask"):
        read_category(mvtec)
    shutil.rmtree(mvtec / "ground_truth/crack")
    with pytest.raises(DataError, match="x_mask"):
        read_category(mvtec)


def test_ambiguous_stems_are_errors(mvtec: Path) -> None:
    _write(mvtec / "ground_truth/crack/y.png", _square_mask())
    with pytest.raises(DataError, match="ambiguous masks"):
        read_category(mvtec)
    (mvtec / "ground_truth/crack/y.png").unlink()
    _write(mvtec / "test/good/g.jpg", _rgb(9))
    assert len({r.record_id for r in read_category(mvtec).test}) == 4
    _write(mvtec / "test/crack/x.jpg", _rgb(9))
    with pytest.raises(DataError, match="same stem"):
        read_category(mvtec)


def test_empty_directories_are_named(mvtec: Path) -> None:
    (mvtec / "test/dent").mkdir()
    with pytest.raises(DataError, match="test/dent"):
        read_category(mvtec)
    (mvtec / "test/dent").rmdir()
    shutil.rmtree(mvtec / "train/good")
    (mvtec / "train/good").mkdir()
    (mvtec / "train/good/.DS_Store").write_bytes(b"x")
    with pytest.raises(DataError, match="train/good"):
        read_category(mvtec)
    with pytest.raises(DataError, match="not found"):
        read_category(mvtec / "nope")
    with pytest.raises(ConfigError, match="layout"):
        read_category(mvtec, layout="kaggle")


def test_mask_of_wrong_size_is_an_error(mvtec: Path) -> None:
    _write(mvtec / "ground_truth/crack/x_mask.png", _square_mask(20, 32))
    record = read_category(mvtec).test[1]
    with pytest.raises(DataError, match=r"x_mask.png is 32x20 .* is 32x24"):
        load_mask(record, 16)


def test_antialiased_mask_is_thresholded_at_128(tmp_path: Path) -> None:
    image = _write(tmp_path / "test/d/a.png", _rgb(0, 4, 4))
    values = np.array([[0, 127, 128, 255]] * 4, dtype=np.uint8)
    mask_path = _write(tmp_path / "ground_truth/d/a_mask.png", values)
    mask = load_mask(ImageRecord(image, 1, "d", mask_path), (4, 4))
    assert mask.tolist() == [[0, 0, 1, 1]] * 4


def test_image_level_dataset_gives_whole_image_masks(mvtec: Path) -> None:
    shutil.rmtree(mvtec / "ground_truth")
    index = read_category(mvtec)
    assert not index.has_masks and all(r.mask_path is None for r in index.test)
    assert load_mask(index.test[1], (6, 5)).tolist() == [[1] * 5] * 6
    assert load_mask(index.test[0], 4).sum() == 0


def test_btad_layout(tmp_path: Path) -> None:
    cat = tmp_path / "01"
    for i in range(3):
        _write(cat / f"train/ok/{i:04d}.bmp", _rgb(i))
    _write(cat / "test/ok/0100.bmp", _rgb(10))
    _write(cat / "test/ko/0200.bmp", _rgb(11))
    _write(cat / "test/ko/0201.bmp", _rgb(12))
    _write(cat / "ground_truth/ko/0200.png", _square_mask())
    _write(cat / "ground_truth/ko/0201.bmp", _square_mask())
    assert detect_layout(cat) == "btad"
    index = read_category(cat)
    assert [r.defect_type for r in index.train + index.test] == ["good"] * 4 + ["ko"] * 2
    assert [r.mask_path.name for r in index.test if r.mask_path] == ["0200.png", "0201.bmp"]
    assert load_mask(index.test[1], (24, 32)).sum() == 8 * 12


def test_folder_layout_splits_normals_every_kth(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    for i in range(12):
        _write(root / f"good/{i:02d}.jpg", _rgb(i))
    _write(root / "dent/d1.png", _rgb(20))
    _write(root / "masks/dent/d1_mask.png", _square_mask())
    index = read_category(root)
    test_good = [r.path.stem for r in index.test if r.label == 0]
    assert test_good == [f"{i:02d}" for i in range(12) if i % FOLDER_TEST_EVERY == FOLDER_TEST_EVERY - 1]
    assert len(index.train) == 12 - len(test_good) and index.has_masks
    assert index.defect_types == ["dent"] and index.test[-1].mask_path.name == "d1_mask.png"
    small = tmp_path / "small"
    for i in range(3):
        _write(small / f"good/{i}.png", _rgb(i))
    _write(small / "dent/d.png", _rgb(9))
    index = read_category(small, layout="folder")
    assert [r.path.stem for r in index.test] == ["2", "d"] and not index.has_masks


# ---------------------------------------------------------------- real data (skipped when absent)

REAL_COUNTS = {
    "mtd/magnetic_tile": (761, 191, {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}, True),
    "kolektorsdd/commutator": (278, 70, {"defect": 52}, True),
    "brainmri/brain": (65, 33, {"tumor": 155}, False),
}


@pytest.mark.real_data
@pytest.mark.parametrize("category", sorted(REAL_COUNTS))
def test_real_data_counts(shared_data: Path, category: str) -> None:
    n_train, n_good, defects, has_masks = REAL_COUNTS[category]
    index = read_category(shared_data / category)
    assert index.has_masks == has_masks and len(index.train) == n_train
    assert sum(r.label == 0 for r in index.test) == n_good
    assert {t: sum(r.defect_type == t for r in index.test) for t in index.defect_types} == defects
    assert all((r.mask_path is not None) == (has_masks and r.label == 1) for r in index.test)


@pytest.mark.real_data
def test_real_brainmri_mixed_formats_load_as_rgb(shared_data: Path) -> None:
    index = read_category(shared_data / "brainmri/brain")
    odd = [r for r in index.train + index.test if r.path.suffix != ".jpg"]
    assert {r.path.suffix for r in odd} >= {".JPG", ".jpeg", ".png"}
    for record in odd:
        assert load_image(record.path, 32).shape == (32, 32, 3)
    tumor = next(r for r in index.test if r.label == 1)
    assert load_mask(tumor, 32).all()


@pytest.mark.real_data
def test_real_masks_align_and_binarise(shared_data: Path) -> None:
    for category in ("mtd/magnetic_tile", "kolektorsdd/commutator"):
        index = read_category(shared_data / category)
        for record in [r for r in index.test if r.label == 1][::25]:
            image = load_image(record.path, 64)
            mask = load_mask(record, 64)
            assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
            assert set(np.unique(mask)) <= {0, 1}
