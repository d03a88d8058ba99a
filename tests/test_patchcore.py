"""The one-class PatchCore baseline: coreset, nearest neighbours, scores and maps on hand-made features."""

from __future__ import annotations

import pytest
import torch

from bgad_core.errors import ConfigError
from bgad_core.data.features import FeatureSet
from bgad_core.models.components import memory_bank
from bgad_core.models.components.cells import patch_embeddings
from bgad_core.models.components.memory_bank import greedy_coreset, nearest_distances
from bgad_core.models.patchcore.torch_model import PatchCore


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


def test_each_greedy_pick_is_the_point_farthest_from_the_picks_before_it():
    points = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))  # narrower than PROJECTION_DIM
    chosen = greedy_coreset(points, 30).tolist()
    for i in range(1, len(chosen)):
        farthest = torch.cdist(points, points[chosen[:i]]).min(dim=1).values.argmax()
        assert chosen[i] == int(farthest)


def test_greedy_coreset_of_everything_is_everything():
    assert greedy_coreset(torch.randn(10, 3), 10).tolist() == list(range(10))


def test_nearest_distances_match_brute_force():
    queries, bank = torch.randn(300, 7), torch.randn(50, 7)
    distances, indices = nearest_distances(queries, bank, k=3)
    brute = torch.cdist(queries, bank)
    expected, expected_indices = brute.sort(dim=1)
    torch.testing.assert_close(distances, expected[:, :3])
    assert torch.equal(indices, expected_indices[:, :3])


def test_nearest_distances_in_blocks_match_one_block(monkeypatch):
    queries, bank = torch.randn(50, 7), torch.randn(20, 7)
    whole = nearest_distances(queries, bank, k=2)
    monkeypatch.setattr(memory_bank, "DISTANCE_CHUNK", 7)  # 8 blocks, the last one short
    blocked = nearest_distances(queries, bank, k=2)
    torch.testing.assert_close(blocked[0], whole[0])
    assert torch.equal(blocked[1], whole[1])


def reference_patch_scores(model: PatchCore, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchCore's scoring written plainly, image by image, with torch.cdist's direct (non-matmul) distances."""
    embedding = patch_embeddings(features, model.levels)
    bank = model.memory_bank
    k = min(model.num_neighbors, bank.shape[0])
    maps, scores = [], []
    for image in embedding:
        patches = image.permute(1, 2, 0).reshape(-1, image.shape[0])
        distance, nearest = torch.cdist(patches, bank, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
        worst = int(distance.argmax())
        anchor = bank[nearest[worst]]
        support = torch.cdist(anchor[None], bank, compute_mode="donot_use_mm_for_euclid_dist")[0].argsort()[:k]
        to_support = torch.cdist(patches[worst][None], bank[support], compute_mode="donot_use_mm_for_euclid_dist")[0]
        weight = 1 - torch.softmax(to_support, dim=0)[0] if k > 1 else 1.0
        maps.append(distance.reshape(image.shape[1:]))
        scores.append(weight * distance[worst])
    return torch.stack(maps), torch.stack(scores)


@pytest.mark.parametrize("num_neighbors", [1, 3, 9])
def test_patch_scores_match_a_plain_cdist_reference(num_neighbors):
    generator = torch.Generator().manual_seed(3)
    def levels(n):
        return [torch.randn(n, 6, 8, 8, generator=generator), torch.randn(n, 10, 4, 4, generator=generator)]
    model = PatchCore(coreset_ratio=0.1, num_neighbors=num_neighbors).fit(feature_set(levels(6)))
    query = [f * 1.5 for f in levels(5)]
    distance, scores = model.patch_scores(query)
    expected_distance, expected_scores = reference_patch_scores(model, query)
    torch.testing.assert_close(distance, expected_distance, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    if num_neighbors > 1:  # the re-weighting took part (it lowers every score)
        assert bool((scores < distance.flatten(1).max(dim=1).values).all())


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
    distance, scores = model.patch_scores(feature_set([torch.cat([normal[:1], anomalous])]).features)
    maps = model.anomaly_maps(distance, (32, 32))
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


def test_anomaly_maps_upsample_to_the_image_and_blur_without_losing_mass():
    distance = torch.zeros(1, 8, 8)
    distance[0, 3, 4] = 1.0  # one anomalous cell at stride 8: pixels 24-32 x 32-40 of a 64 x 64 image
    sharp = PatchCore(blur_sigma=0).anomaly_maps(distance, (64, 64))
    blurred = PatchCore(blur_sigma=4).anomaly_maps(distance, (64, 64))
    assert sharp.shape == blurred.shape == (1, 64, 64)
    assert divmod(int(sharp.argmax()), 64) in {(27, 35), (27, 36), (28, 35), (28, 36)}  # the cell's centre
    assert float(blurred.max()) < 0.5 * float(sharp.max())  # spread out ...
    torch.testing.assert_close(blurred.sum(), sharp.sum(), rtol=1e-3, atol=0)  # ... not lost (far from borders)


@pytest.mark.parametrize("kwargs, message", [
    ({"coreset_ratio": 0.0}, "coreset_ratio"),
    ({"num_neighbors": 0}, "num_neighbors"),
    ({"blur_sigma": -1.0}, "blur_sigma"),
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
