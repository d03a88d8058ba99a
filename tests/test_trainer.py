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


def test_position_blocked_steps_visit_every_usable_cell_once_per_sub_epoch():
    """cells_per_step draws blocks of cells x images: a partition of the sub-epoch's usable vectors, nothing twice."""
    train = normals_only(n=10)
    train.masks[0][3, 2, 2] = 0.1  # a partly-defect cell of a normal image: ignored by the losses
    config = TrainConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, fiber_batch=48, cells_per_step=8)
    trainer = Trainer(BGADFlows.from_config([8], config), config, train)
    images = trainer._sample_images(with_anomalies=False)
    steps = list(trainer._steps(0, images))
    assert all(len(cells) <= 8 and len(fibers) <= 48 for fibers, cells in steps)
    for fibers, cells in steps:  # image-major blocks: row i * P + p is at cells[p]
        assert torch.equal(fibers % 36, cells.repeat(len(fibers) // len(cells)))
    visited = torch.cat([fibers for fibers, _ in steps]).sort().values
    assert torch.equal(visited, torch.arange(10 * 36))  # blocks hold partly-defect cells too; the loss drops them
    trainer.train_meta_epoch()  # and a blocked epoch trains


def test_a_checkpoint_keeps_the_scoring_it_was_trained_with_when_defaults_change():
    """Options a checkpoint predates load as its model was scored then, not as today's defaults."""
    from bgad_core.checkpoint import make_checkpoint, model_from_checkpoint
    from bgad_core.scoring import Normalization

    config = TrainConfig(coupling_blocks=2, cond_dim=8)
    checkpoint = make_checkpoint(BGADFlows.from_config([8], config), config, {}, (24, 24),
                                 Normalization((0.0,), (1.0,)), 0.0, {}, 1)
    for key in ("local_aggregation", "calibration", "coarse_level_weight"):
        del checkpoint["train_config"][key]
    _, restored, normalization = model_from_checkpoint(checkpoint)
    assert (restored.local_aggregation, restored.calibration, restored.coarse_level_weight) == (1, "level", 1.0)
    assert float(normalization.std[0]) == 1.0
