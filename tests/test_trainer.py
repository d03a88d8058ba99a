"""BGAD training semantics on small random features: what each arm trains."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from bgad_core.errors import ConfigError
from bgad_core.data.features import FeatureSet
from bgad_core.engine.selection import seed_everything, train_and_select
from bgad_core.models.base import evaluate
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.detector import BGADDetector
from bgad_core.models.bgad.scoring_choice import SCORING_MARGIN, scoring_candidates
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.models.bgad.training import BGADTraining


def normals_only(n: int = 6, scale: float = 1.0) -> FeatureSet:
    generator = torch.Generator().manual_seed(0)
    return FeatureSet(
        features=[scale * torch.randn(n, 8, 6, 6, generator=generator)],
        masks=[torch.zeros(n, 6, 6)],
        labels=torch.zeros(n, dtype=torch.long),
        ids=[str(i) for i in range(n)],
    )


def trained_weights(config: BGADConfig, train: FeatureSet) -> dict[str, torch.Tensor]:
    seed_everything(config.seed)
    training = BGADTraining(BGADFlows.from_config([8], config), config, train)
    for _ in range(config.meta_epochs):
        training.train_meta_epoch()
    return training.model.state_dict()


def test_without_anomalies_focal_weighting_changes_nothing():
    """K = 0 is plain BGAD: phase 2 must not switch focal weights on for the normals."""
    base = dict(meta_epochs=3, sub_epochs=1, warmup_epochs=1, coupling_blocks=2, cond_dim=8, fiber_batch=64)
    # wide features: per-dim log-likelihoods far below the focal threshold, where focal weights would differ from 1
    with_focal = trained_weights(BGADConfig(focal_weighting=True, **base), normals_only(scale=5.0))
    without = trained_weights(BGADConfig(focal_weighting=False, **base), normals_only(scale=5.0))
    for key in with_focal:
        assert torch.equal(with_focal[key], without[key]), key


def test_local_aggregation_is_applied_to_training_and_evaluation_alike():
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, local_aggregation=3)
    model = BGADFlows.from_config([8], config)
    train = normals_only()
    training = BGADTraining(model, config, train)
    pooled = torch.nn.functional.avg_pool2d(train.features[0].float(), 3, 1, 1)  # zero-padded, as PatchCore
    torch.testing.assert_close(training.levels[0].vectors, pooled.permute(0, 2, 3, 1).reshape(-1, 8))
    # the model's own forward (evaluation, serving) sees the same inputs as the training steps
    model.eval()
    with torch.no_grad():
        logps = model(train.features)[0].reshape(-1)
        cells = torch.arange(36).repeat(len(train))
        direct = model.cell_logps(0, training.levels[0].vectors, cells, (6, 6))
    torch.testing.assert_close(logps, direct, rtol=1e-4, atol=1e-4)


def test_position_blocked_steps_visit_every_usable_cell_once_per_sub_epoch():
    """cells_per_step draws blocks of cells x images: a partition of the sub-epoch's usable vectors, nothing twice."""
    train = normals_only(n=10)
    train.masks[0][3, 2, 2] = 0.1  # a partly-defect cell of a normal image: ignored by the losses
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, fiber_batch=48, cells_per_step=8)
    training = BGADTraining(BGADFlows.from_config([8], config), config, train)
    images = training._sample_images(with_anomalies=False)
    steps = list(training._steps(0, images))
    assert all(len(cells) <= 8 and len(fibers) <= 48 for fibers, cells in steps)
    for fibers, cells in steps:  # image-major blocks: row i * P + p is at cells[p]
        assert torch.equal(fibers % 36, cells.repeat(len(fibers) // len(cells)))
    visited = torch.cat([fibers for fibers, _ in steps]).sort().values
    assert torch.equal(visited, torch.arange(10 * 36))  # blocks hold partly-defect cells too; the loss drops them
    training.train_meta_epoch()  # and a blocked epoch trains


def test_position_blocked_steps_keep_their_size_with_few_images():
    """Fewer images than fiber_batch // cells_per_step: each step takes more cells instead of shrinking."""
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, fiber_batch=48, cells_per_step=4)
    training = BGADTraining(BGADFlows.from_config([8], config), config, normals_only(n=4))
    steps = list(training._steps(0, training._sample_images(with_anomalies=False)))
    assert [len(cells) for _, cells in steps] == [12, 12, 12]  # 4 images x 12 cells = 48 vectors, 36 cells in all
    assert all(len(fibers) == 48 for fibers, _ in steps)


def test_a_checkpoint_keeps_the_scoring_it_was_trained_with_when_defaults_change():
    """Options a checkpoint predates load as its model was scored then, not as today's defaults."""
    from bgad_core.engine.checkpoint import detector_from_checkpoint, make_checkpoint
    from bgad_core.models.bgad.scoring import Normalization

    config = BGADConfig(coupling_blocks=2, cond_dim=8)
    detector = BGADDetector(BGADFlows.from_config([8], config), Normalization((0.0,), (1.0,)), config.blur_sigma,
                            (24, 24), config)
    checkpoint = make_checkpoint(detector, {}, 0.0, {}, 1)
    entry = checkpoint["detector"]
    for key in ("local_aggregation", "calibration", "coarse_level_weight"):
        del entry["config"][key]
    restored = detector_from_checkpoint(checkpoint)
    assert isinstance(restored, BGADDetector) and not restored.training
    assert (restored.config.local_aggregation, restored.config.calibration,
            restored.config.coarse_level_weight) == (1, "level", 1.0)
    assert float(restored.normalization.std[0]) == 1.0
    assert restored.normalization.coarse_level_weight == 1.0
    # a checkpoint from before the weight moved into the scoring constants scores with its configured weight
    entry["config"]["coarse_level_weight"] = 2.0
    del entry["normalization"]["coarse_level_weight"]
    assert detector_from_checkpoint(checkpoint).normalization.coarse_level_weight == 2.0
    # likewise the image-score reduction, which moved there with the "auto" choice
    assert detector_from_checkpoint(checkpoint).normalization.image_score == "max"
    entry["config"]["image_score"] = "top1pct_mean"
    del entry["normalization"]["image_score"]
    assert detector_from_checkpoint(checkpoint).normalization.image_score == "top1pct_mean"


def normals_only_two_levels(n: int = 6) -> FeatureSet:
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 8, 6, 6, generator=generator), torch.randn(n, 8, 3, 3, generator=generator)]
    return FeatureSet(features=features,
                      masks=[torch.zeros(n, 6, 6), torch.zeros(n, 3, 3)], labels=torch.zeros(n, dtype=torch.long),
                      ids=[str(i) for i in range(n)])


def two_level_split(n: int, seed: int) -> FeatureSet:
    """Half normal, half anomalous images whose anomaly is visible in both levels, more in the coarse one."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2).long()
    fine, coarse = torch.randn(n, 8, 6, 6, generator=generator), torch.randn(n, 8, 3, 3, generator=generator)
    fine[labels == 1, :, 2, 2] *= 1.5
    coarse[labels == 1, :, 1, 1] *= 2.5
    return FeatureSet(features=[fine, coarse], masks=[torch.zeros(n, 6, 6), torch.zeros(n, 3, 3)], labels=labels,
                      ids=[str(i) for i in range(n)])


@pytest.mark.parametrize("fixed", [{}, {"calibration": "position", "coarse_level_weight": 2.0,
                                          "image_score": "top1pct_mean", "nearest_normal_weight": 0.5}])
def test_validate_keeps_the_simplest_scoring_within_the_margin_of_the_best_or_the_configured_one(fixed):
    """Every "auto" choice (calibration, coarse-level weight, reduction, nearest-normal weight) is made on
    validation by the stated rule."""
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, **fixed)
    training = BGADTraining(BGADFlows.from_config([8, 8], config), config, normals_only_two_levels())
    val = two_level_split(16, seed=1)
    chosen = training.validate(val, (24, 24), "image_auroc")  # the objective of a split without pixel masks
    calibrations, weights, reductions, nearest = scoring_candidates(
        config.calibration, config.coarse_level_weight, config.image_score, config.nearest_normal_weight)
    candidates = []  # (how many choices are not the simplest, evaluation), in the order the rule reads them
    alone = []  # distances alone: one map, whatever the likelihoods' scoring
    for c, fit in enumerate(training.fit_normalizations(calibrations)):
        for w, weight in enumerate(weights):
            for d, share in enumerate(nearest):
                if share == 1 and c + w:
                    continue
                for r, reduction in enumerate(reductions):
                    scoring = replace(fit, coarse_level_weight=weight, image_score=reduction,
                                      nearest_normal_weight=share)
                    detector = BGADDetector(training.model, scoring, config.blur_sigma, (24, 24), config,
                                            training.nearest_normal)
                    (alone if share == 1 else candidates).append((c + w + d + r, evaluate(detector, val)))
    assert (len(candidates), len(alone)) == ((1, 0) if fixed else (24, 3))
    best = max(e.metrics["image_auroc"] for _, e in candidates)
    expected = next(e for _, e in sorted(candidates, key=lambda c: c[0])
                    if e.metrics["image_auroc"] >= best - SCORING_MARGIN)
    # distances alone do not lead here, so the flows' choice stands (where they lead, a paired bootstrap decides:
    # tests/test_nearest_normal_scoring.py)
    assert all(e.metrics["image_auroc"] <= expected.metrics["image_auroc"] + SCORING_MARGIN for _, e in alone)
    described = expected.detector.normalization.describe()
    assert chosen.detector.normalization.describe() == described
    assert chosen.metrics == expected.metrics
    bank = training.memory_banks.index(training.nearest_normal)  # validation's choice of bank, logged with the rest
    assert chosen.choices == {**chosen.detector.normalization.choice_metrics(),  # what the meta-epoch log shows
                              "nearest_normal_coreset_ratio": training.coreset_ratios[bank]}
    if fixed:
        assert described == ("calibration position, coarse level weight 2, image score top1pct_mean, "
                             "nearest-normal weight 0.5")
    # the test split is scored the way validation chose (train_and_select passes its detector on)
    test = evaluate(chosen.detector, two_level_split(16, seed=2))
    assert test.detector.normalization.describe() == described


@pytest.mark.parametrize("bad", ["often", 0.0, -1.0, float("inf"), True])
def test_coarse_level_weight_is_auto_or_a_positive_number(bad):
    assert BGADConfig(coarse_level_weight="2").coarse_level_weight == 2.0  # as a command line gives it
    with pytest.raises(ConfigError, match=r"coarse_level_weight must be 'auto' or a number > 0, got"):
        BGADConfig(coarse_level_weight=bad)


def test_the_curves_test_at_the_selected_epoch_is_the_final_test(caplog):
    """A long run's per-meta-epoch log line carries the curve's test, and at the selected epoch it is the test."""
    config = BGADConfig(meta_epochs=3, sub_epochs=1, warmup_epochs=1, coupling_blocks=2, cond_dim=8, fiber_batch=64)
    seed_everything(config.seed)
    train = normals_only_two_levels()
    training = BGADTraining(BGADFlows.from_config([8, 8], config), config, train)
    with caplog.at_level(logging.INFO, logger="bgad_core.engine.selection"):
        best = train_and_select(training, two_level_split(16, seed=1), two_level_split(16, seed=2), (24, 24),
                                "image_auroc", test_every_epoch=True)
    assert [h["epoch"] for h in best.history] == [1, 2, 3]
    assert best.history[best.epoch - 1]["test"] == best.test.metrics
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("meta-epoch")]
    assert len(lines) == 3 and all("; test (curve only) image_auroc=" in line for line in lines)


def test_flows_without_position_give_a_vector_the_same_likelihood_at_every_cell():
    """``condition_on_position=False``: one density per level; the default's likelihoods depend on the place."""
    vectors = torch.randn(1, 8, 1, 1).expand(1, 8, 4, 4).contiguous()  # the same vector at all 16 cells
    for positional in (True, False):
        seed_everything(0)
        config = BGADConfig(coupling_blocks=2, cond_dim=8, local_aggregation=1, condition_on_position=positional)
        model = BGADFlows.from_config([8], config)
        for parameter in model.parameters():  # FrEIA zero-initialises the last subnet layers: make the condition count
            torch.nn.init.normal_(parameter, std=0.1)
        with torch.no_grad():
            logps = model([vectors])[0].flatten()
        spread = float(logps.max() - logps.min())
        assert (spread > 1e-4) if positional else (spread < 1e-5), (positional, spread)
