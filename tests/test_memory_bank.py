"""The memory bank of normal patches: PatchCore's evidence, standardised so that BGAD can weigh it in."""

from __future__ import annotations

import pytest
import torch

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError
from bgad_core.models.components import memory_bank
from bgad_core.models.components.memory_bank import NearestNormal, fit_banks


def normal_features(n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 6, 8, 8, generator=generator), torch.randn(n, 6, 4, 4, generator=generator)]


def test_new_normals_read_about_zero_and_a_strange_patch_stands_out():
    """Every training normal is in the bank, and calibrated on each one's distances to the others' bank rows, a new
    normal image's cells average near 0 with a spread near 1; a cell unlike any normal one scores far above them."""
    nearest = NearestNormal().fit(normal_features(64, seed=0), coreset_ratio=0.25)
    assert nearest.bank.shape == (round(64 * 64 * 0.25), 12)
    new = normal_features(16, seed=1)
    scores = nearest(new)
    assert scores.shape == (16, 8, 8) and scores.dtype == torch.float32
    assert abs(float(scores.mean())) < 0.5 and 0.5 < float(scores.std()) < 1.5
    new[0][3, :, 4, 4] += 6.0  # one cell of one image far from every normal
    assert float(nearest(new)[3, 4, 4]) > float(scores.max()) + 2


def test_each_normal_calibrates_against_the_bank_without_its_own_rows():
    """With the whole of every image in the bank (ratio 1), a training normal's calibration distances are its
    distances to a bank of the other images: what it would read as a new image. Training sets thresholds on them."""
    features = normal_features(4, seed=0)
    nearest = NearestNormal().fit(features, coreset_ratio=1.0)
    expected = []
    for image in range(4):
        others = [i for i in range(4) if i != image]
        bank = NearestNormal().fit([level[others] for level in features], coreset_ratio=1.0).bank
        left_out = NearestNormal.from_dict({"bank": bank, "mean": float(nearest.mean), "std": float(nearest.std)})
        expected.append(left_out([level[image:image + 1] for level in features]).flatten())
    torch.testing.assert_close(nearest.calibration_distances, torch.cat(expected))
    assert abs(float(nearest.calibration_distances.mean())) < 1e-5  # standardised on themselves
    bank_rows_read = float(-nearest.mean / nearest.std)  # a training cell in the bank: distance 0, standardised
    assert float(nearest(features).max()) == pytest.approx(bank_rows_read, abs=0.01)


def test_left_out_distances_skip_an_images_own_rows_in_every_block(monkeypatch):
    """Images beyond the first distance block (two images per block here) are matched to their own bank rows too;
    an image that gave every row reads inf."""
    monkeypatch.setattr(memory_bank, "DISTANCE_CHUNK", 6)
    patches = torch.arange(6, dtype=torch.float32).repeat_interleave(3)[:, None]  # 6 images x 3 cells, value = image
    bank = torch.tensor([[0.0], [2.0], [5.0]])
    distances = memory_bank.left_out_distances(patches, 6, bank, torch.tensor([0, 2, 5]))
    torch.testing.assert_close(distances, torch.tensor([2.0, 1, 2, 1, 1, 3]).repeat_interleave(3))
    alone = memory_bank.left_out_distances(patches[:3], 1, bank[:1], torch.tensor([0]))
    assert torch.isinf(alone).all()


def test_a_bank_scores_a_split_in_batches_and_survives_its_checkpoint():
    nearest = NearestNormal().fit(normal_features(16, seed=0), coreset_ratio=0.5)
    features = normal_features(5, seed=2)
    split = FeatureSet(features, [torch.zeros(5, 8, 8), torch.zeros(5, 4, 4)], torch.zeros(5, dtype=torch.long),
                       [str(i) for i in range(5)])
    torch.testing.assert_close(nearest.predict(split, batch_size=2), nearest(features))
    restored = NearestNormal.from_dict(nearest.to_dict())
    torch.testing.assert_close(restored(features), nearest(features))


def test_few_normals_calibrate_on_each_other_a_single_one_on_itself_and_an_empty_bank_says_so():
    few = NearestNormal().fit(normal_features(3, seed=0), coreset_ratio=1.0)
    assert few.bank.shape == (3 * 64, 12) and float(few.mean) > 0.5  # each image's cells are new to the others' rows
    one = NearestNormal().fit(normal_features(1, seed=0), coreset_ratio=1.0)
    assert float(one.mean) == pytest.approx(0.0, abs=1e-2)  # its own cells are in the bank
    with pytest.raises(ConfigError, match="fit\\(\\) the memory bank before scoring"):
        NearestNormal()(normal_features(1, seed=0))
    with pytest.raises(ConfigError, match="coreset_ratio must lie in"):
        NearestNormal().fit(normal_features(2, seed=0), coreset_ratio=0.0)


def test_banks_of_several_shares_from_one_greedy_run_are_the_banks_each_share_fills_alone():
    """A smaller share's bank is the first picks of the larger one's coreset, so one run fills both: the same rows
    and calibration as a fill of its own; a share of every row takes every row."""
    normals = normal_features(32, seed=0)
    ratios = (0.05, 0.25, 1.0)
    for bank, ratio in zip(fit_banks(normals, ratios, seed=3), ratios, strict=True):
        alone = NearestNormal().fit(normals, coreset_ratio=ratio, seed=3)
        assert torch.equal(bank.bank, alone.bank) and bank.mean == alone.mean and bank.std == alone.std
    with pytest.raises(ConfigError, match=r"coreset_ratio must lie in \(0, 1\], got 0"):
        fit_banks(normals, (0.01, 0.0))
