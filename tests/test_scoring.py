"""Scores are absolute: fixed constants, independent of the batch an image is scored in."""

from dataclasses import replace

import pytest
import torch

from bgad_core.errors import ConfigError
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.data.features import FeatureSet
from bgad_core.models.bgad.scoring import Normalization, anomaly_maps, image_scores, scores_and_maps
from bgad_core.models.bgad.scoring_choice import choose_scoring
from bgad_core.models.components.postprocess import gaussian_blur


def test_score_of_an_image_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    model = BGADFlows([8, 16], cond_dim=8, coupling_blocks=2).eval()
    features = [torch.randn(6, 8, 8, 8), torch.randn(6, 16, 4, 4)]
    norm = Normalization(mean=(-1.0, -2.0), std=(0.5, 2.0))
    with torch.no_grad():
        together = image_scores(anomaly_maps(model(features), norm, (32, 32)))
        alone = image_scores(anomaly_maps(model([f[2:3] for f in features]), norm, (32, 32)))
    assert torch.allclose(together[2:3], alone, atol=1e-6)


def test_lower_likelihood_means_higher_anomaly_score():
    norm = Normalization(mean=(0.0,), std=(1.0,))
    logps = torch.zeros(2, 4, 4)
    logps[1, 1, 1] = -5.0
    maps = anomaly_maps([logps], norm, (16, 16), blur_sigma=1.0)
    scores = image_scores(maps)
    assert scores[1] > scores[0]


def test_normalization_fit_and_blur_keeps_mass():
    norm = Normalization.fit([torch.tensor([[1.0, 3.0]])])
    assert [float(m) for m in norm.mean] == [2.0]
    maps = torch.zeros(1, 21, 21)
    maps[0, 10, 10] = 1.0
    blurred = gaussian_blur(maps, 2.0)
    assert abs(float(blurred.sum()) - 1.0) < 1e-4
    assert blurred[0, 10, 10] == blurred.max()


def test_position_calibration_scores_each_cell_against_its_own_normals():
    # cell (0, 0) is always low in normals: per level it looks anomalous, per position it does not
    normals = torch.randn(200, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    normals[:, 0, 0] -= 3.0
    image = torch.zeros(1, 4, 4)
    image[0, 0, 0] = -3.0
    image[0, 2, 2] = -1.0  # the real anomaly
    for calibration, expected_peak in (("level", (0, 0)), ("position", (2, 2))):
        norm = Normalization.fit([normals], calibration)
        maps = anomaly_maps([image], norm, (4, 4), blur_sigma=0.0)
        peak = divmod(int(maps[0].argmax()), 4)
        assert peak == expected_peak, calibration
    restored = Normalization.from_dict(replace(norm, coarse_level_weight=2.0).to_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.std, norm.std))
    assert restored.coarse_level_weight == 2.0
    assert Normalization.from_dict({"mean": [0.0], "std": [1.0]}, 4.0).coarse_level_weight == 4.0  # an old checkpoint
    assert norm.mean[0].shape == (4, 4)


def test_coarse_level_weight_shifts_the_map_towards_the_coarser_level():
    norm = Normalization(mean=(0.0, 0.0), std=(1.0, 1.0))
    fine, coarse = -torch.rand(1, 8, 8), -torch.rand(1, 4, 4)
    equal = anomaly_maps([fine, coarse], norm, (8, 8), blur_sigma=0.0)
    fine_only = anomaly_maps([fine], norm, (8, 8), blur_sigma=0.0)
    coarse_only = anomaly_maps([coarse], norm, (8, 8), blur_sigma=0.0)
    torch.testing.assert_close(equal, (fine_only + coarse_only) / 2)
    weighted = anomaly_maps([fine, coarse], replace(norm, coarse_level_weight=2.0), (8, 8), blur_sigma=0.0)
    torch.testing.assert_close(weighted, (fine_only + 2 * coarse_only) / 3)


def test_the_nearest_normal_weight_averages_standardised_distances_into_the_map():
    norm = Normalization(mean=(0.0,), std=(1.0,))
    logps, distances = -torch.rand(2, 4, 4), torch.rand(2, 2, 2)
    likelihoods = anomaly_maps([logps], norm, (8, 8), blur_sigma=0.0)
    alone = anomaly_maps([logps], replace(norm, nearest_normal_weight=1.0), (8, 8), 0.0, distances)
    torch.testing.assert_close(alone, anomaly_maps([], replace(norm, nearest_normal_weight=1.0), (8, 8), 0.0,
                                                   distances))  # distances alone read no likelihood
    half = anomaly_maps([logps], replace(norm, nearest_normal_weight=0.5), (8, 8), 0.0, distances)
    torch.testing.assert_close(half, (likelihoods + alone) / 2)
    restored = Normalization.from_dict(replace(norm, nearest_normal_weight=0.5).to_dict())
    assert restored.nearest_normal_weight == 0.5
    assert Normalization.from_dict({"mean": [0.0], "std": [1.0]}).nearest_normal_weight == 0.0  # an old checkpoint
    with pytest.raises(ConfigError, match="nearest_normal_weight 0.5 needs the nearest-normal distances"):
        anomaly_maps([logps], replace(norm, nearest_normal_weight=0.5), (8, 8))
    with pytest.raises(ConfigError, match=r"nearest_normal_weight must lie in \[0, 1\], got 1.5"):
        replace(norm, nearest_normal_weight=1.5)


def spikes_and_bumps(count: int) -> list[torch.Tensor]:
    """``count`` normal 8 x 8 grids with a broad mild bump (4 x 4 cells at 1.5) and as many anomalous ones with a
    sharp defect (one cell at 3), as log-likelihoods under constants 0 and 1."""
    logps = torch.zeros(2 * count, 8, 8)
    for index in range(count):
        row, col = index % 4, (index // 4) % 4
        logps[index, row:row + 4, col:col + 4] = -1.5
        logps[count + index, row + 2, col + 2] = -3.0
    return [logps]


def test_the_maximum_before_smoothing_keeps_a_small_defects_peak():
    norm = Normalization(mean=(0.0,), std=(1.0,))
    logps = spikes_and_bumps(4)
    smoothed, _ = scores_and_maps(logps, norm, (32, 32), blur_sigma=4.0)
    sharp, maps = scores_and_maps(logps, replace(norm, image_score="unsmoothed_max"), (32, 32), blur_sigma=4.0)
    assert smoothed[4:].max() < smoothed[:4].min()  # smoothing ranks every bump above every defect
    assert sharp[4:].min() > sharp[:4].max()  # before it, every defect ranks first
    torch.testing.assert_close(sharp, anomaly_maps(logps, norm, (32, 32), blur_sigma=0.0).flatten(1).max(1).values)
    torch.testing.assert_close(maps, anomaly_maps(logps, norm, (32, 32), blur_sigma=4.0))  # the map stays smoothed
    restored = Normalization.from_dict(replace(norm, image_score="unsmoothed_max").to_dict())
    assert restored.image_score == "unsmoothed_max" and restored.choice_metrics()["image_score_unsmoothed_max"] == 1
    with pytest.raises(ConfigError, match="needs the map before smoothing"):
        image_scores(maps, "unsmoothed_max")


def test_validation_chooses_the_maximum_before_smoothing_only_where_it_ranks_better():
    norm = Normalization(mean=(0.0,), std=(1.0,))
    logps = spikes_and_bumps(4)
    split = FeatureSet([torch.zeros(8, 1, 8, 8)], [torch.zeros(8, 8, 8)], torch.tensor([0] * 4 + [1] * 4),
                       [str(i) for i in range(8)])
    reductions = ("max", "top1pct_mean", "unsmoothed_max")
    chosen = choose_scoring(logps, split, [norm], (1.0,), reductions, (32, 32), 4.0, "image_auroc")
    assert chosen.normalization.image_score == "unsmoothed_max" and chosen.metrics["image_auroc"] == 1.0
    flipped = FeatureSet(split.features, split.masks, 1 - split.labels, split.ids)  # the bumps are the anomalies
    assert choose_scoring(logps, flipped, [norm], (1.0,), reductions, (32, 32), 4.0,
                          "image_auroc").normalization.image_score == "max"
