"""The memory bank of normal patches: PatchCore's evidence, standardised so that BGAD can weigh it in."""

from __future__ import annotations

import pytest
import torch

from bgad_core.data.features import FeatureSet
from bgad_core.errors import ConfigError
from bgad_core.models.components.memory_bank import CALIBRATION_EVERY, NearestNormal, calibration_rows


def normal_features(n: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 6, 8, 8, generator=generator), torch.randn(n, 6, 4, 4, generator=generator)]


def test_new_normals_read_about_zero_and_a_strange_patch_stands_out():
    """Calibrated on training normals the bank has not seen, a new normal image's cells average near 0 with a
    spread near 1, and a cell unlike any normal one scores far above them."""
    nearest = NearestNormal().fit(normal_features(64, seed=0), coreset_ratio=0.25)
    assert nearest.bank.shape == (round(64 * (CALIBRATION_EVERY - 1) / CALIBRATION_EVERY * 64 * 0.25), 12)
    new = normal_features(16, seed=1)
    scores = nearest(new)
    assert scores.shape == (16, 8, 8) and scores.dtype == torch.float32
    assert abs(float(scores.mean())) < 0.5 and 0.5 < float(scores.std()) < 1.5
    new[0][3, :, 4, 4] += 6.0  # one cell of one image far from every normal
    assert float(nearest(new)[3, 4, 4]) > float(scores.max()) + 2


def test_the_calibration_cells_distances_are_kept_as_they_score_standardised():
    """Training sets thresholds on the held-out normals' distances: the kept ones are what scoring those images gives."""
    features = normal_features(16, seed=0)
    nearest = NearestNormal().fit(features, coreset_ratio=0.5)
    held_out = torch.nonzero(calibration_rows(16)).flatten()
    scored = nearest([level[held_out] for level in features])
    torch.testing.assert_close(nearest.calibration_distances, scored.flatten())
    assert abs(float(nearest.calibration_distances.mean())) < 1e-5  # standardised on themselves


def test_a_bank_scores_a_split_in_batches_and_survives_its_checkpoint():
    nearest = NearestNormal().fit(normal_features(16, seed=0), coreset_ratio=0.5)
    features = normal_features(5, seed=2)
    split = FeatureSet(features, [torch.zeros(5, 8, 8), torch.zeros(5, 4, 4)], torch.zeros(5, dtype=torch.long),
                       [str(i) for i in range(5)])
    torch.testing.assert_close(nearest.predict(split, batch_size=2), nearest(features))
    restored = NearestNormal.from_dict(nearest.to_dict())
    torch.testing.assert_close(restored(features), nearest(features))


def test_few_normals_keep_the_last_one_out_a_single_one_calibrates_on_itself_and_an_empty_bank_says_so():
    few = NearestNormal().fit(normal_features(3, seed=0), coreset_ratio=1.0)
    assert few.bank.shape == (2 * 64, 12) and float(few.mean) > 0.5  # the third image's cells are new to the bank
    one = NearestNormal().fit(normal_features(1, seed=0), coreset_ratio=1.0)
    assert float(one.mean) == pytest.approx(0.0, abs=1e-2)  # its own cells are in the bank
    with pytest.raises(ConfigError, match="fit\\(\\) the memory bank before scoring"):
        NearestNormal()(normal_features(1, seed=0))
    with pytest.raises(ConfigError, match="coreset_ratio must lie in"):
        NearestNormal().fit(normal_features(2, seed=0), coreset_ratio=0.0)
