"""Few-shot train / validation / test splits of a category (BGAD's semi-supervised protocol).

Protocol implemented by ``make_splits``:

1. Training normals are ``index.train`` (optionally only the first ``max_train_normals`` in sorted order, as in
   the reference protocol MTD-200).
2. ``num_anomalies`` (K) anomalies are drawn from ``index.test`` - K per defect type (``per_defect_type``) or K in
   total - and become training anomalies. They never appear in validation or test. A pool of n images gives at
   most n - 1 (with a warning) so that every type keeps at least one image for evaluation. K = 0 is plain BGAD.
3. The remaining test images are split into validation (model selection) and test (reported once), stratified per
   defect type including "good": ``val_fraction`` of each group goes to validation, with at least one image on
   each side when the group has two or more; a group of one stays in test.

Unseen-defect protocol (the paper's Tables 5 / 13, AHL's "hard" setting): with ``train_defect_types`` anomalies are
drawn only from those (*seen*) types, and the other (*unseen*) types go to test alone: validation holds the normals
and the undrawn images of the seen types, as a user's validation set would (a type nobody has labelled is a type
nobody can select on), and test holds the rest of them plus every unseen image, so that test figures can be read
separately for seen and unseen types (``Splits.unseen_types``). The paper instead drops the seen types' undrawn
images and evaluates, and selects, on the unseen types alone.

Randomness is seeded per group from ``(seed, role, defect type)`` rather than from one shared stream, so the draw
for one type does not depend on which other types exist or are selected, and the drawn sets are nested in K:
the anomalies drawn for K = 1 are among those drawn for K = 5 with the same seed.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bgad_core.data.datasets import CategoryIndex, ImageRecord
from bgad_core.errors import ConfigError


@dataclass
class Splits:
    """Records per role; lists keep the sorted order of the category index."""

    train_normal: list[ImageRecord]
    train_anomalies: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    unseen_types: list[str] = field(default_factory=list)  # the unseen-defect protocol's types, in test only


def make_splits(
    index: CategoryIndex,
    num_anomalies: int,
    per_defect_type: bool = True,
    val_fraction: float = 0.3,
    seed: int = 0,
    train_defect_types: Sequence[str] | None = None,
    max_train_normals: int | None = None,
) -> Splits:
    """Split ``index`` following the protocol in the module docstring."""
    _validate(num_anomalies, val_fraction, seed, max_train_normals)
    seen = _seen_types(index, train_defect_types)
    train_normal = index.train if max_train_normals is None else index.train[:max_train_normals]
    anomalies = [r for r in index.test if r.label == 1 and r.defect_type in seen]
    drawn = _draw(anomalies, num_anomalies, per_defect_type, seed)
    drawn_ids = {r.record_id for r in drawn}
    evaluated = [r for r in index.test if r.record_id not in drawn_ids]
    selectable = [r for r in evaluated if r.label == 0 or r.defect_type in seen]
    val, test = _stratified_split(selectable, val_fraction, seed)
    order = {r.record_id: i for i, r in enumerate(index.test)}
    test = sorted([*test, *(r for r in evaluated if r.label == 1 and r.defect_type not in seen)],
                  key=lambda r: order[r.record_id])
    return Splits(list(train_normal), drawn, val, test, sorted(set(index.defect_types) - seen))


def check_validation(splits: Splits, name: str) -> None:
    """Raise unless validation holds normals and every defect type that is evaluated.

    A group of one image stays in test, so drawing nearly all anomalies of a type (or a category with very few)
    leaves that type out of validation: epoch selection is then blind to it, or, without any anomaly or normal in
    validation, every validation metric is NaN and so is the decision threshold.
    """
    evaluated = splits.val + splits.test
    missing = sorted({r.defect_type for r in evaluated} - {r.defect_type for r in splits.val} - set(splits.unseen_types))
    if missing:
        counts = {kind: sum(r.defect_type == kind for r in evaluated) for kind in missing}
        raise ConfigError(
            f"{name}: validation has no image of {missing} (left for evaluation: {counts}); draw fewer anomalies "
            "(num_anomalies / held_out_anomalies) or add images of these types"
        )


def _validate(num_anomalies: int, val_fraction: float, seed: int, max_train_normals: int | None) -> None:
    if not _is_int(num_anomalies) or num_anomalies < 0:
        raise ConfigError(f"num_anomalies must be an int >= 0, got {num_anomalies!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    if max_train_normals is not None and (not _is_int(max_train_normals) or max_train_normals < 1):
        raise ConfigError(f"max_train_normals must be None or an int >= 1, got {max_train_normals!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _seen_types(index: CategoryIndex, train_defect_types: Sequence[str] | None) -> set[str]:
    """Types anomalies may be drawn from; unknown names and 'nothing left unseen' are configuration errors."""
    known = index.defect_types
    if train_defect_types is None:
        return set(known)
    if isinstance(train_defect_types, str):
        raise ConfigError(f"train_defect_types must be a list of names, got the string {train_defect_types!r}")
    for name in train_defect_types:
        if name not in known:
            raise ConfigError(f"train_defect_types: unknown defect type {name!r} in {index.name} (known: {known})")
    seen = set(train_defect_types)
    if seen == set(known):
        raise ConfigError(
            f"train_defect_types lists every defect type of {index.name}; the unseen-anomaly protocol then has "
            "no anomalies to evaluate (pass None to train and evaluate on all types)"
        )
    return seen


def _rng(seed: int, role: str, group: str) -> np.random.Generator:
    """Generator for one (role, group): independent of other groups and of Python's hash randomisation."""
    return np.random.default_rng([seed, zlib.crc32(role.encode()), zlib.crc32(group.encode())])


def _draw(anomalies: list[ImageRecord], k: int, per_defect_type: bool, seed: int) -> list[ImageRecord]:
    """Draw the training anomalies (sorted in index order)."""
    if k == 0:
        return []
    if per_defect_type:
        groups = _group(anomalies)
    else:
        groups = {"all defect types": anomalies}
    chosen: set[str] = set()
    for name, pool in groups.items():
        take = min(k, len(pool) - 1)
        if take < k:
            warnings.warn(
                f"only {len(pool)} anomalies of {name!r}: drawing {max(take, 0)} instead of {k} to keep at least "
                "one for evaluation",
                UserWarning,
                stacklevel=3,
            )
        order = _rng(seed, "draw", name).permutation(len(pool))
        chosen.update(pool[i].record_id for i in order[: max(take, 0)])
    return [r for r in anomalies if r.record_id in chosen]


def _group(records: list[ImageRecord]) -> dict[str, list[ImageRecord]]:
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        groups.setdefault(record.defect_type, []).append(record)
    return dict(sorted(groups.items()))


def _stratified_split(
    records: list[ImageRecord], val_fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Per group (defect type or "good"), ``val_fraction`` to validation, the rest to test."""
    val_ids: set[str] = set()
    for name, group in _group(records).items():
        n = len(group)
        n_val = min(max(int(np.floor(val_fraction * n + 0.5)), 1), n - 1) if n >= 2 else 0
        order = _rng(seed, "val", name).permutation(n)
        val_ids.update(group[i].record_id for i in order[:n_val])
    val = [r for r in records if r.record_id in val_ids]
    test = [r for r in records if r.record_id not in val_ids]
    return val, test

