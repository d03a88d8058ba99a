"""Trainer semantics on small random features: what each arm trains."""

from __future__ import annotations

import torch

from bgad_core.features import FeatureSet
from bgad_core.model import BGADFlows
from bgad_core.training import Trainer, TrainConfig, seed_everything


def normals_only(n: int = 6, scale: float = 1.0) -> FeatureSet:
    generator = torch.Generator().manual_seed(0)
    return FeatureSet(
        features=[scale * torch.randn(n, 8, 6, 6, generator=generator)],
        masks=[torch.zeros(n, 6, 6)],
        labels=torch.zeros(n, dtype=torch.long),
        ids=[str(i) for i in range(n)],
    )


def trained_weights(config: TrainConfig, train: FeatureSet) -> dict[str, torch.Tensor]:
    seed_everything(config.seed)
    trainer = Trainer(BGADFlows.from_config([8], config), config, train)
    for _ in range(config.meta_epochs):
        trainer.train_meta_epoch()
    return trainer.model.state_dict()


def test_without_anomalies_focal_weighting_changes_nothing():
    """K = 0 is plain BGAD: phase 2 must not switch focal weights on for the normals."""
    base = dict(meta_epochs=3, sub_epochs=1, warmup_epochs=1, coupling_blocks=2, cond_dim=8, fiber_batch=64)
    # wide features: per-dim log-likelihoods far below the focal threshold, where focal weights would differ from 1
    with_focal = trained_weights(TrainConfig(focal_weighting=True, **base), normals_only(scale=5.0))
    without = trained_weights(TrainConfig(focal_weighting=False, **base), normals_only(scale=5.0))
    for key in with_focal:
        assert torch.equal(with_focal[key], without[key]), key


def test_local_aggregation_is_applied_to_training_and_evaluation_alike():
    config = TrainConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, local_aggregation=3)
    model = BGADFlows.from_config([8], config)
    train = normals_only()
    trainer = Trainer(model, config, train)
    pooled = torch.nn.functional.avg_pool2d(train.features[0].float(), 3, 1, 1)  # zero-padded, as PatchCore
    torch.testing.assert_close(trainer.levels[0].vectors, pooled.permute(0, 2, 3, 1).reshape(-1, 8))
    # the model's own forward (evaluation, serving) sees the same inputs as the training steps
    model.eval()
    with torch.no_grad():
        logps = model(train.features)[0].reshape(-1)
        cells = torch.arange(36).repeat(len(train))
        direct = model.cell_logps(0, trainer.levels[0].vectors, cells, (6, 6))
    torch.testing.assert_close(logps, direct, rtol=1e-4, atol=1e-4)
