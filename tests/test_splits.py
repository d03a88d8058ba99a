"""Few-shot splits: drawn anomalies stay out of evaluation, stratification, seeds, unseen protocol."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from bgad_core.data.datasets import CategoryIndex, ImageRecord, read_category
from bgad_core.errors import ConfigError
from bgad_core.data.splits import Splits, check_validation, make_splits

pytestmark = pytest.mark.filterwarnings("ignore:only .* anomalies of:UserWarning")

COUNTS = {"blowhole": 12, "crack": 7, "fray": 3, "rare": 1}


def _index(n_train: int = 30, n_good: int = 20) -> CategoryIndex:
    """An in-memory index (no files needed: splitting only looks at records)."""
    root = Path("/virtual/cat")
    train = [ImageRecord(root / f"train/good/{i:03d}.png", 0, "good", None, "train") for i in range(n_train)]
    test = [ImageRecord(root / f"test/good/{i:03d}.png", 0, "good", None) for i in range(n_good)]
    for defect, n in sorted(COUNTS.items()):
        test += [ImageRecord(root / f"test/{defect}/{i:03d}.png", 1, defect, root / f"gt/{defect}/{i:03d}_mask.png")
                 for i in range(n)]
    return CategoryIndex("cat", root, train, test, True)


def _ids(records: list[ImageRecord]) -> set[str]:
    return {r.record_id for r in records}


def _types(records: list[ImageRecord]) -> Counter:
    return Counter(r.defect_type for r in records)


def _check_partition(index: CategoryIndex, splits: Splits) -> None:
    drawn, val, test = _ids(splits.train_anomalies), _ids(splits.val), _ids(splits.test)
    assert not drawn & val and not drawn & test and not val & test
    assert drawn | val | test <= _ids(index.test)
    assert all(r.label == 1 for r in splits.train_anomalies)


def test_k_per_defect_type_capped_to_keep_one_for_evaluation() -> None:
    index = _index()
    with pytest.warns(UserWarning, match="'fray'") as caught:
        splits = make_splits(index, num_anomalies=5)
    assert any("'rare'" in str(w.message) for w in caught)
    _check_partition(index, splits)
    assert _types(splits.train_anomalies) == {"blowhole": 5, "crack": 5, "fray": 2}
    evaluated = _types(splits.val + splits.test)
    assert evaluated == {"good": 20, "blowhole": 7, "crack": 2, "fray": 1, "rare": 1}
    assert _ids(splits.val) | _ids(splits.test) | _ids(splits.train_anomalies) == _ids(index.test)
    assert splits.train_normal == index.train


def test_stratified_validation_split() -> None:
    splits = make_splits(_index(), num_anomalies=2, val_fraction=0.3, seed=3)
    val, test = _types(splits.val), _types(splits.test)
    assert val == {"good": 6, "blowhole": 3, "crack": 2}
    assert test == {"good": 14, "blowhole": 7, "crack": 3, "fray": 1, "rare": 1}
    order = [r.record_id for r in _index().test]
    for part in (splits.val, splits.test):
        assert [r.record_id for r in part] == [i for i in order if i in _ids(part)]


def test_k_in_total() -> None:
    index = _index()
    splits = make_splits(index, num_anomalies=6, per_defect_type=False, seed=1)
    assert len(splits.train_anomalies) == 6
    _check_partition(index, splits)
    with pytest.warns(UserWarning, match="drawing 22 instead of 99"):
        splits = make_splits(index, num_anomalies=99, per_defect_type=False)
    assert len(splits.val + splits.test) == 21


def test_zero_anomalies_is_plain_bgad() -> None:
    index = _index()
    splits = make_splits(index, num_anomalies=0)
    assert splits.train_anomalies == []
    assert len(splits.val) + len(splits.test) == len(index.test)


def test_seeded_determinism_and_nesting_in_k() -> None:
    index = _index()
    a = make_splits(index, num_anomalies=3, seed=7)
    b = make_splits(index, num_anomalies=3, seed=7)
    c = make_splits(index, num_anomalies=3, seed=8)
    assert a == b
    assert _ids(a.train_anomalies) != _ids(c.train_anomalies) and _ids(a.val) != _ids(c.val)
    one = make_splits(index, num_anomalies=1, seed=7)
    assert _ids(one.train_anomalies) < _ids(a.train_anomalies)


def test_unseen_anomaly_protocol() -> None:
    index = _index()
    splits = make_splits(index, num_anomalies=4, train_defect_types=["blowhole", "crack"], seed=2)
    _check_partition(index, splits)
    assert _types(splits.train_anomalies) == {"blowhole": 4, "crack": 4}
    assert splits.unseen_types == ["fray", "rare"]
    # validation selects on what a user has: normals and the seen types; every unseen image is in test
    assert set(_types(splits.val)) == {"good", "blowhole", "crack"}
    assert _types(splits.val + splits.test) == {"good": 20, "blowhole": 8, "crack": 3, "fray": 3, "rare": 1}
    assert {"fray": 3, "rare": 1}.items() <= _types(splits.test).items()
    assert [r.record_id for r in splits.test] == [r.record_id for r in index.test if r in splits.test]  # index order
    check_validation(splits, "cat")  # unseen types are meant to be missing from validation
    assert make_splits(index, num_anomalies=4, seed=2).unseen_types == []
    same_draw = make_splits(index, num_anomalies=4, seed=2)
    assert {r.record_id for r in same_draw.train_anomalies if r.defect_type == "blowhole"} == {
        r.record_id for r in splits.train_anomalies if r.defect_type == "blowhole"}


def test_max_train_normals_takes_the_first_sorted() -> None:
    index = _index()
    splits = make_splits(index, num_anomalies=1, max_train_normals=10)
    assert splits.train_normal == index.train[:10]
    assert make_splits(index, 1, max_train_normals=1000).train_normal == index.train


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_anomalies": -1}, "num_anomalies"),
        ({"num_anomalies": 1.5}, "num_anomalies"),
        ({"num_anomalies": 1, "val_fraction": 0.0}, "val_fraction"),
        ({"num_anomalies": 1, "val_fraction": 1.0}, "val_fraction"),
        ({"num_anomalies": 1, "seed": -3}, "seed"),
        ({"num_anomalies": 1, "max_train_normals": 0}, "max_train_normals"),
        ({"num_anomalies": 1, "train_defect_types": ["scratch"]}, "scratch"),
        ({"num_anomalies": 1, "train_defect_types": "crack"}, "train_defect_types"),
        ({"num_anomalies": 1, "train_defect_types": sorted(COUNTS)}, "train_defect_types"),
    ],
)
def test_bad_arguments_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        make_splits(_index(), **kwargs)


@pytest.mark.real_data
def test_real_mtd200_protocol(shared_data: Path) -> None:
    """Reference protocol MTD-200: first 200 sorted normals, 10 per type, evaluation on 191 good + 342 defects."""
    index = read_category(shared_data / "mtd/magnetic_tile")
    splits = make_splits(index, num_anomalies=10, max_train_normals=200, seed=0)
    assert [r.path.name for r in splits.train_normal] == sorted(r.path.name for r in index.train)[:200]
    assert _types(splits.train_anomalies) == {t: 10 for t in index.defect_types}
    evaluated = splits.val + splits.test
    assert sum(r.label == 0 for r in evaluated) == 191 and sum(r.label == 1 for r in evaluated) == 342
    _check_partition(index, splits)
