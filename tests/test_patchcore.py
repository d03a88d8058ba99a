"""The one-class PatchCore baseline: coreset, nearest neighbours, scores and maps on hand-made features."""

from __future__ import annotations

import pytest
import torch

from bgad_core.errors import ConfigError
from bgad_core.data.features import FeatureSet
from bgad_core.models.patchcore.torch_model import PatchCore, greedy_coreset, nearest_distances, patch_embeddings


def feature_set(features: list[torch.Tensor], labels: list[int] | None = None) -> FeatureSet:
    n = features[0].shape[0]
    return FeatureSet(
        features=features,
        masks=[torch.zeros(n, f.shape[2], f.shape[3]) for f in features],
        labels=torch.tensor(labels if labels is not None else [0] * n),
        ids=[str(i) for i in range(n)],
    )


def test_greedy_coreset_covers_every_cluster():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 200, generator=generator) * 50  # wider than PROJECTION_DIM: the projection is used
    points = torch.cat([c + torch.randn(400, 200, generator=generator) for c in centers])
    chosen = greedy_coreset(points, 5)
    assert sorted((chosen // 400).tolist()) == [0, 1, 2, 3, 4]  # farthest-first picks one point per cluster
    assert len(set(chosen.tolist())) == 5


def test_greedy_coreset_of_everything_is_everything():
    assert greedy_coreset(torch.randn(10, 3), 10).tolist() == list(range(10))


def test_nearest_distances_match_brute_force():
    queries, bank = torch.randn(300, 7), torch.randn(50, 7)
    distances, indices = nearest_distances(queries, bank, k=3)
    brute = torch.cdist(queries, bank)
    expected, expected_indices = brute.sort(dim=1)
    torch.testing.assert_close(distances, expected[:, :3])
    assert torch.equal(indices, expected_indices[:, :3])


def test_patch_embeddings_aggregate_and_upsample():
    fine, coarse = torch.ones(2, 4, 8, 8), torch.full((2, 6, 4, 4), 3.0)
    embedding = patch_embeddings([fine, coarse])
    assert embedding.shape == (2, 10, 8, 8)
    # interior cells average a constant neighbourhood: the constant (zero padding only thins the border)
    torch.testing.assert_close(embedding[:, :4, 1:-1, 1:-1], torch.ones(2, 4, 6, 6))
    # coarse interior cells 1-2 (unthinned) upsample to fine cells 3-4 alone
    torch.testing.assert_close(embedding[:, 4:, 3:-3, 3:-3], torch.full((2, 6, 2, 2), 3.0))


def test_full_bank_scores_its_own_training_images_zero_and_finds_an_outlier_patch():
    generator = torch.Generator().manual_seed(0)
    train = feature_set([torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 4, 4, generator=generator)])
    model = PatchCore(coreset_ratio=1.0, num_neighbors=1, blur_sigma=0).fit(train)
    distance, scores = model.patch_scores(train.features)
    assert float(distance.abs().max()) < 1e-3 and float(scores.abs().max()) < 1e-3

    odd = [f[:1].clone() for f in train.features]
    odd[0][0, :, 5, 2] += 25.0  # one far-off cell at (row 5, column 2)
    distance, scores = model.patch_scores(odd)
    row, column = divmod(int(distance[0].argmax()), 8)
    assert abs(row - 5) <= 1 and abs(column - 2) <= 1  # 3x3 aggregation spreads it over its neighbourhood
    assert float(scores[0]) > 1.0


def test_anomalous_training_rows_are_ignored_and_maps_have_the_image_size():
    generator = torch.Generator().manual_seed(1)
    normal = torch.randn(4, 4, 8, 8, generator=generator)
    anomalous = normal[:1] + 100.0
    train = feature_set([torch.cat([normal, anomalous])], labels=[0, 0, 0, 0, 1])
    model = PatchCore(coreset_ratio=1.0).fit(train)
    assert model.memory_bank.shape == (4 * 64, 4)  # only the normal rows' patches
    scores, maps = model.predict(feature_set([torch.cat([normal[:1], anomalous])]), image_size=(32, 32))
    assert maps.shape == (2, 32, 32)
    assert float(scores[1]) > 10 * float(scores[0].abs() + 1e-6)


def test_reweighting_never_raises_the_score_above_the_largest_distance():
    generator = torch.Generator().manual_seed(2)
    train = feature_set([torch.randn(8, 4, 8, 8, generator=generator)])
    query = [torch.randn(3, 4, 8, 8, generator=generator) * 2]
    plain = PatchCore(coreset_ratio=0.2, num_neighbors=1).fit(train)
    weighted = PatchCore(coreset_ratio=0.2, num_neighbors=9).fit(train)
    distance, raw = plain.patch_scores(query)
    _, scaled = weighted.patch_scores(query)
    torch.testing.assert_close(raw, distance.flatten(1).max(dim=1).values)
    assert bool((scaled <= raw + 1e-6).all()) and bool((scaled > 0).all())


@pytest.mark.parametrize("kwargs, message", [
    ({"coreset_ratio": 0.0}, "coreset_ratio"),
    ({"num_neighbors": 0}, "num_neighbors"),
    ({"levels": (0, 0)}, "distinct"),
])
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PatchCore(**kwargs)


def test_missing_level_and_unfitted_bank_are_clear_errors():
    data = feature_set([torch.randn(2, 4, 8, 8)])
    with pytest.raises(ConfigError, match="level 3 does not exist"):
        PatchCore(levels=(3,)).fit(data)
    with pytest.raises(ConfigError, match="fit"):
        PatchCore().patch_scores(data.features)
    with pytest.raises(ConfigError, match="no normal image"):
        PatchCore().fit(feature_set([torch.randn(2, 4, 8, 8)], labels=[1, 1]))
