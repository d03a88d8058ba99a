"""Bad input files: a truncated image, a mask of the wrong size, a missing ground-truth mask. The job stops with one
``error:`` line naming the file (exit 2, no traceback from our code) or, with ``data.on_bad_image: skip``, leaves
the unreadable image out with a warning naming it; a half-written cache is never published or left behind."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sweeper.run
from bgad_core.data.synthetic import make_synthetic_category
from faults.conftest import edit_config, local_env, run_job, tiny_sweep
from sweeper.cache.build import build_cache
from sweeper.cache.reader import verify_cache
from sweeper.job.config import load_config


@pytest.fixture
def category(tmp_path) -> Path:
    """A small MVTec-layout category on disk (3 anomalies per defect type are drawn for training)."""
    return make_synthetic_category(tmp_path / "src", name="tiles", size=96, n_train=12, n_test_good=8,
                                   n_test_per_defect=6)


def sweep_on(tmp_path: Path, category: Path, **data: str) -> Path:
    return edit_config(tiny_sweep(tmp_path, data=data), lambda raw: raw.update(datasets=[{"path": str(category)}]))


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def assert_nothing_published(config_path: Path) -> None:
    root = Path(load_config(config_path).cache.root)
    assert not root.exists() or not any(root.iterdir()), list(root.iterdir())  # no cache, no .tmp-* directory


def test_truncated_image_stops_the_job_naming_it(tmp_path, category):
    bad = truncate(category / "test" / "good" / "003.png")
    config_path = sweep_on(tmp_path, category)
    code, log = run_job(config_path, local_env(tmp_path), "--num-cpus", "2", timeout_s=300)
    assert code == 2, log[-5000:]
    assert f"error: cannot read image {bad}: image file is truncated" in log, log[-5000:]
    assert "Traceback" not in log
    assert_nothing_published(config_path)


def test_mask_of_the_wrong_size_is_named(tmp_path, category, capsys, ray_cluster):
    mask = category / "ground_truth" / "scratch" / "001_mask.png"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(mask)
    config_path = sweep_on(tmp_path, category)
    assert sweeper.run.main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: mask {mask} is 48x48 but its image {category / 'test' / 'scratch' / '001.png'} is 96x96" in err
    assert_nothing_published(config_path)


def test_missing_ground_truth_is_named(tmp_path, category, capsys, ray_cluster):
    mask = category / "ground_truth" / "spot" / "002_mask.png"
    mask.unlink()
    config_path = sweep_on(tmp_path, category)
    assert sweeper.run.main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(mask.with_suffix("")) in err, err
    assert_nothing_published(config_path)


def test_skip_leaves_the_unreadable_image_out_with_a_warning(tmp_path, category, ray_cluster):
    bad = truncate(category / "test" / "good" / "003.png")
    config = load_config(sweep_on(tmp_path, category, on_bad_image="skip"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_cache(config)
    assert any(str(bad) in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert [p["file"] for p in report.skipped] == [str(bad)]
    verify_cache(report.uri)  # the published cache is complete (checksums of every shard)
    assert not list(Path(config.cache.root).glob(".tmp-*"))
