"""Test figures per group of defect types: the seen and unseen types of the unseen-defect protocol.

Under ``train_defect_types`` (``bgad_core.data.splits``) the test split holds normals, the undrawn images of the
seen types and every image of the unseen ones, and one figure over all of them mixes two questions: does the
detector find more of what it was shown, and does it still find what nobody labelled? ``defect_groups`` gives each
group's rows: every normal row plus that group's anomalies, so both groups rank their anomalies against the same
normals.

    >>> import torch
    >>> ids = ["test/good/0.png", "test/crack/1.png", "test/fray/2.png"]
    >>> defect_groups(ids, torch.tensor([0, 1, 1]), seen_types=["crack"])
    {'seen': [0, 1], 'unseen': [0, 2]}
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

GROUPS = ("seen", "unseen")


def defect_type_of(record_id: str) -> str:
    """The defect type in an image record's id, ``<split>/<defect_type>/<file name>`` (``ImageRecord.record_id``)."""
    parts = record_id.split("/")
    if len(parts) != 3:
        raise ValueError(f"not an image record id (<split>/<defect_type>/<file name>): {record_id!r}")
    return parts[1]


def defect_groups(ids: Sequence[str], labels: torch.Tensor, seen_types: Collection[str]) -> dict[str, list[int]]:
    """Rows of the ``seen`` and ``unseen`` groups: all normal rows and the anomalies of the types in (or not in)
    ``seen_types``; a group without anomalies is left out (nothing to rank)."""
    seen = set(seen_types)
    normal = [i for i, label in enumerate(labels.tolist()) if label == 0]
    anomalous = [i for i, label in enumerate(labels.tolist()) if label == 1]
    groups = dict(zip(GROUPS, ([i for i in anomalous if defect_type_of(ids[i]) in seen],
                               [i for i in anomalous if defect_type_of(ids[i]) not in seen])))
    return {name: sorted(normal + rows) for name, rows in groups.items() if rows}
