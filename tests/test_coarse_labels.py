"""Coarse labels (image-level, or a mask over most of the image) narrowed to the cells far from every normal patch."""

from __future__ import annotations

import pytest
import torch

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError
from bgad_core.models.bgad.coarse_labels import (DISTANT_QUANTILE, coarse_rows, distant_threshold,
                                                 narrow_coarse_labels)
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.bgad.training import BGADTraining
from bgad_core.models.components.cells import IGNORED
from sweeper.tuning.sweep import PAPER_DEFAULT

NORMALS = 16


def with_one_image_level_anomaly(defect_shift: float) -> FeatureSet:
    """16 normals and one anomalous image whose top-left 2x2 fine cells (and the coarse cell over them) are shifted,
    labelled at image level: its masks cover every cell."""
    generator = torch.Generator().manual_seed(0)
    fine = torch.randn(NORMALS + 1, 8, 8, 8, generator=generator)
    coarse = torch.randn(NORMALS + 1, 8, 4, 4, generator=generator)
    fine[NORMALS, :, :2, :2] += defect_shift
    coarse[NORMALS, :, 0, 0] += defect_shift
    masks = [torch.zeros(NORMALS + 1, 8, 8), torch.zeros(NORMALS + 1, 4, 4)]
    for mask in masks:
        mask[NORMALS] = 1.0
    labels = torch.zeros(NORMALS + 1, dtype=torch.long)
    labels[NORMALS] = 1
    return FeatureSet(features=[fine, coarse], masks=masks, labels=labels, ids=[str(i) for i in range(NORMALS + 1)])


def training(coarse_labels: str, train: FeatureSet) -> BGADTraining:
    config = BGADConfig(meta_epochs=2, sub_epochs=1, coupling_blocks=2, cond_dim=8, fiber_batch=256,
                        local_aggregation=1, coarse_labels=coarse_labels)
    return BGADTraining(BGADFlows.from_config([8, 8], config), config, train)


def test_an_image_level_label_trains_only_its_cells_far_from_every_normal_patch_and_leaves_out_the_rest():
    train = with_one_image_level_anomaly(defect_shift=8.0)
    narrowed = training("distant", train)
    fine = narrowed.levels[0].labels.reshape(NORMALS + 1, 8, 8)
    assert bool((fine[NORMALS, :2, :2] == 1).all())  # the defect
    assert bool((fine[NORMALS, 5:, 5:] == IGNORED).all())  # normal-looking cells of the labelled image
    assert set(fine[NORMALS].unique().tolist()) == {1, IGNORED}
    assert bool((fine[:NORMALS] == 0).all())
    coarse = narrowed.levels[1].labels.reshape(NORMALS + 1, 4, 4)
    assert coarse[NORMALS, 0, 0] == 1 and coarse[NORMALS, 3, 3] == IGNORED
    # "all", the paper's: every cell of the labelled image is abnormal
    assert bool((training("all", train).levels[0].labels.reshape(NORMALS + 1, 8, 8)[NORMALS] == 1).all())


def test_a_label_whose_cells_all_look_normal_keeps_its_most_distant_cell_and_phase_2_trains():
    trainer = training("distant", with_one_image_level_anomaly(defect_shift=0.0))
    fine = trainer.levels[0].labels.reshape(NORMALS + 1, 8, 8)[NORMALS]
    assert int((fine == 1).sum()) >= 1
    for _ in range(2):  # phase 1, then phase 2 with the narrowed label
        assert torch.isfinite(torch.tensor(trainer.train_meta_epoch()["loss"]))


def test_pixel_masks_are_not_coarse_and_stay_as_they_are():
    labels = [torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 2, 2, dtype=torch.long)]
    labels[0][0, :2, :2] = 1  # a quarter of the image: a pixel mask
    labels[0][1, :, :3] = 1  # three quarters: coarse
    labels[1][0, 0, 0] = 1
    labels[1][1] = 1
    rows = coarse_rows(labels[0])
    assert rows.tolist() == [False, True]
    distances = torch.zeros(1, 4, 4)
    distances[0, 3, 0] = 9.0
    narrowed = narrow_coarse_labels(labels, rows, distances, threshold=1.0, abnormal_fraction=0.25)
    assert torch.equal(narrowed[0][0], labels[0][0]) and torch.equal(narrowed[1][0], labels[1][0])
    assert narrowed[0][1].tolist() == [[IGNORED] * 3 + [0]] * 3 + [[1, IGNORED, IGNORED, 0]]
    assert narrowed[1][1].tolist() == [[IGNORED, IGNORED], [1, IGNORED]]


def test_the_threshold_is_a_high_quantile_of_normal_distances():
    # the value of rank round(q * n) among n (ranks from 1)
    assert distant_threshold(torch.arange(1000.0).reshape(10, 10, 10)) == round(DISTANT_QUANTILE * 1000) - 1
    assert distant_threshold(torch.tensor([3.0])) == 3.0


def test_image_level_labels_are_narrowed_by_default_and_the_paper_default_pushes_them_all():
    assert BGADConfig().coarse_labels == "distant" and PAPER_DEFAULT["coarse_labels"] == "all"


def test_an_unknown_coarse_labels_value_names_the_key():
    with pytest.raises(ConfigError, match="coarse_labels"):
        BGADConfig(coarse_labels="some")
