"""BGAD's nearest-normal weight: validation weighs PatchCore's evidence in where the flows miss, and a detector that
uses it keeps, serves and exports its memory bank."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import pytest
import torch

from bgad_core.data.features import FeatureSet
from bgad_core.engine.checkpoint import detector_from_checkpoint, make_checkpoint
from bgad_core.errors import ConfigError
from bgad_core.evaluation.metrics import PRO_AND_IMAGE_AUROC, compute_metrics
from bgad_core.models.base import evaluate
from bgad_core.models.bgad import BGADConfig, BGADDetector, BGADFlows, BGADTraining
from bgad_core.models.bgad.scoring import Normalization, anomaly_maps, image_scores, scores_and_maps
from bgad_core.models.bgad.scoring_choice import (CORESET_RATIOS, SCORING_MARGIN, Candidate, EpochScoring,
                                                  ScoredSplit, choose_among, choose_bank, choose_image_map,
                                                  choose_scoring, score_split, scored_candidates)
from bgad_core.models.components.memory_bank import NearestNormal
from detector_checks import (assert_fp16_scores_in_float32_in_any_batch, assert_onnx_scores_like_pytorch,
                             exported_session)

SIZE = (32, 32)


def split(n_normal: int, n_abnormal: int, seed: int) -> FeatureSet:
    """Two levels (8 x 8 and 4 x 4 cells); each anomaly is one fine cell far from every normal one, masked."""
    generator = torch.Generator().manual_seed(seed)
    n = n_normal + n_abnormal
    features = [torch.randn(n, 6, 8, 8, generator=generator), torch.randn(n, 6, 4, 4, generator=generator)]
    features[0][n_normal:, :, 2, 5] += 8.0
    pixel_masks = torch.zeros(n, *SIZE, dtype=torch.uint8)
    pixel_masks[n_normal:, 8:12, 20:24] = 1
    return FeatureSet(features, [torch.zeros(n, 8, 8), torch.zeros(n, 4, 4)],
                      torch.tensor([0] * n_normal + [1] * n_abnormal), [f"{seed}-{i}" for i in range(n)],
                      pixel_masks=pixel_masks)


def test_validation_weighs_distances_in_where_the_likelihoods_see_nothing():
    """Log-likelihood maps of pure noise cannot find the defect; the distances can, and validation takes them."""
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, local_aggregation=1)
    training = BGADTraining(BGADFlows.from_config([6, 6], config), config, split(24, 0, seed=0))
    val = split(8, 8, seed=1)
    noise = [torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(2)), torch.randn(16, 4, 4)]
    fits = training.fit_normalizations(("level",))
    alone = choose_scoring(noise, val, fits, (1.0,), ("max",), SIZE, 1.0, "aupro")
    chosen = choose_scoring(noise, val, fits, (1.0,), ("max",), SIZE, 1.0, "aupro", (0.0, 0.5, 1.0),
                            training.nearest_distances(val))
    assert chosen.normalization.nearest_normal_weight > 0
    assert chosen.metrics["aupro"] > alone.metrics["aupro"] + 0.2 and chosen.metrics["image_auroc"] == 1.0
    assert training.nearest_distances(val) is training.nearest_distances(val)  # computed once per split


def test_distances_alone_must_beat_what_the_flows_reached_at_every_selectable_epoch():
    """A map of distances alone scores the same at every epoch: it replaces the flows' choice only where it beats
    this epoch's and every earlier selectable epoch's by more than the margin, never on one epoch's dip."""
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8, local_aggregation=1)
    training = BGADTraining(BGADFlows.from_config([6, 6], config), config, split(24, 0, seed=0))
    val = split(8, 8, seed=1)
    fits, distances = training.fit_normalizations(("level",)), training.nearest_distances(val)
    noise = [torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(2)), torch.randn(16, 4, 4)]
    sharp = [level.clone() for level in noise]  # flows that see the defect exactly where its mask is
    sharp[0][8:, 2, 5] -= 50.0

    def choose(chooser: EpochScoring, logps: list[torch.Tensor], selectable: bool = True):
        return choose_scoring(logps, val, fits, (1.0,), ("max",), SIZE, 1.0, "aupro", (0.0, 1.0), distances,
                              chooser, selectable)

    def flows_only(logps: list[torch.Tensor]) -> float:
        return choose_scoring(logps, val, fits, (1.0,), ("max",), SIZE, 1.0, "aupro").metrics["aupro"]

    alone = choose_scoring(noise, val, fits[:1], (1.0,), ("max",), SIZE, 1.0, "aupro", (1.0,), distances)
    assert alone.metrics["aupro"] > flows_only(noise) + 0.2  # the distances find what noise cannot
    assert flows_only(sharp) >= alone.metrics["aupro"] - SCORING_MARGIN  # sharp flows are as good

    assert choose(EpochScoring(), noise).normalization.nearest_normal_weight == 1.0  # nothing better so far
    chooser = EpochScoring()
    assert choose(chooser, sharp).normalization.nearest_normal_weight == 0.0
    dipped = choose(chooser, noise)  # the flows dip at a later epoch: the earlier epoch stays the better one
    assert dipped.normalization.nearest_normal_weight == 0.0 and dipped.metrics["aupro"] == flows_only(noise)
    resumed = EpochScoring()  # a resumed training keeps the bar, though not the scoring that set it
    resumed.load_state_dict(chooser.state_dict())
    assert choose(resumed, noise).normalization.nearest_normal_weight == 0.0
    unselectable = EpochScoring()  # an epoch selection cannot pick (phase 1) raises no bar
    assert choose(unselectable, sharp, selectable=False).normalization.nearest_normal_weight == 0.0
    assert choose(unselectable, noise).normalization.nearest_normal_weight == 1.0


def test_a_resumed_training_keeps_the_flows_best_validation_figure():
    config = BGADConfig(meta_epochs=2, sub_epochs=1, coupling_blocks=2, cond_dim=8)

    def training() -> BGADTraining:
        return BGADTraining(BGADFlows.from_config([6, 6], config), config, split(24, 0, seed=0))

    trained = training()
    for _ in range(2):  # meta-epoch 2 is selectable
        trained.train_meta_epoch()
        trained.validate(split(8, 8, seed=1), SIZE, "aupro")
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    resumed = training()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert math.isfinite(resumed.state_dict()["scoring"]["flows_best_value"])
    assert resumed.state_dict()["scoring"] == trained.state_dict()["scoring"] and resumed.epoch == 2


LABELS = torch.tensor([0] * 10 + [1] * 10)  # 20 validation images, image objective
IMAGE_VAL = FeatureSet([torch.zeros(20, 1, 2, 2)], [torch.zeros(20, 2, 2)], LABELS, [str(i) for i in range(20)])
RANKS = torch.arange(20, dtype=torch.float32)  # every anomaly above every normal
NEAR_CHANCE = torch.tensor([float(i % 2) + 0.01 * i for i in range(20)])


def scored(scores: torch.Tensor, share: float) -> ScoredSplit:
    """A scoring of ``IMAGE_VAL`` with these image scores, from a map with this nearest-normal weight."""
    return ScoredSplit(compute_metrics(LABELS.numpy(), scores.numpy()), scores, torch.zeros(20, 4, 4),
                       Normalization((0.0,), (1.0,), nearest_normal_weight=share))


def moved(normal: int, score: float) -> torch.Tensor:
    """``RANKS`` with one normal image's score moved (above k anomalies: image AUROC 1 - k / 100)."""
    scores = RANKS.clone()
    scores[normal] = score
    return scores


def test_distances_alone_replace_the_flows_only_where_a_paired_bootstrap_tells_them_apart():
    """Image objective, 20 validation images: distances that rank every image right against flows that swap one
    normal with the two weakest anomalies (image AUROC 0.98, a lead of 0.02 over the margin that the resamples
    without those images cannot see), then against flows near chance (a lead no resample hides)."""
    alone = scored(RANKS, 1.0)
    close = scored(moved(9, 11.5), 0)  # the last normal above the two weakest anomalies
    assert alone.metrics["image_auroc"] - close.metrics["image_auroc"] > SCORING_MARGIN
    assert EpochScoring().distances_alone_or_flows(close, alone, IMAGE_VAL, "image_auroc", True) is not alone
    assert EpochScoring().distances_alone_or_flows(scored(NEAR_CHANCE, 0), alone, IMAGE_VAL, "image_auroc",
                                                   True) is alone


def test_once_chosen_the_distances_alone_give_way_only_to_flows_better_by_the_margin():
    """Distances chosen at a selectable epoch (image AUROC 0.90 against flows that rank backwards) stay chosen at later
    epochs whose flows only tie them, also after a resume; flows better by more than the margin replace them for
    good. Chosen at an epoch selection cannot pick, they hold nothing."""
    alone = scored(moved(9, 19.5), 1.0)  # the last normal above all ten anomalies: 0.90
    tie, better = scored(moved(0, 19.5), 0), scored(moved(9, 18.5), 0)  # 0.90 on other images, 0.91
    assert tie.metrics["image_auroc"] == alone.metrics["image_auroc"] == 0.9
    assert better.metrics["image_auroc"] > alone.metrics["image_auroc"] + SCORING_MARGIN

    def choose(chooser: EpochScoring, flows: ScoredSplit, selectable: bool = True) -> ScoredSplit:
        return chooser.distances_alone_or_flows(flows, alone, IMAGE_VAL, "image_auroc", selectable)

    backwards = scored(-RANKS, 0)
    chooser = EpochScoring()
    assert choose(chooser, backwards) is alone
    assert choose(chooser, tie) is alone
    resumed = EpochScoring()
    resumed.load_state_dict(chooser.state_dict())
    assert choose(resumed, tie) is alone
    assert choose(chooser, better) is better and choose(chooser, tie) is tie
    unselectable = EpochScoring()
    assert choose(unselectable, backwards, selectable=False) is alone
    assert choose(unselectable, tie) is tie


@pytest.fixture(scope="module", params=[(0.5, None, "max"), (1.0, None, "max"), (0.0, 1.0, "max"),
                                        (0.0, 1.0, "unsmoothed_max")],
                ids=["mixed", "distances-alone", "likelihoods-scored-by-distances",
                     "likelihoods-scored-by-distances-before-smoothing"])
def detector(request: pytest.FixtureRequest) -> BGADDetector:
    """A trained detector whose map weighs the distances in, or whose map is the likelihoods' and whose image score
    the distances alone's maximum, after or before smoothing (built from the mixed one: validation makes that
    choice on real data only)."""
    share, image_share, reduction = request.param
    config = BGADConfig(meta_epochs=1, sub_epochs=1, coupling_blocks=2, cond_dim=8,
                        nearest_normal_weight=share if image_share is None else 0.5)
    training = BGADTraining(BGADFlows.from_config([6, 6], config), config, split(24, 0, seed=0))
    training.train_meta_epoch()
    evaluation = training.validate(split(8, 8, seed=1), SIZE, "aupro")
    assert evaluation.choices["nearest_normal_weight"] == config.nearest_normal_weight
    detector = evaluation.detector
    assert detector.nearest is not None
    if image_share is not None:
        normalization = replace(detector.normalization, nearest_normal_weight=share,
                                image_nearest_normal_weight=image_share, image_score=reduction)
        detector = BGADDetector(detector.flows, normalization, detector.blur_sigma, SIZE, config, detector.nearest)
    return detector.eval()


def test_a_detector_with_distances_keeps_its_bank_through_a_checkpoint(detector):
    test = split(4, 4, seed=3)
    restored = detector_from_checkpoint(make_checkpoint(detector, {}, 0.0, {}, 1))
    assert isinstance(restored, BGADDetector)
    assert restored.normalization.describe() == detector.normalization.describe()
    torch.testing.assert_close(evaluate(restored, test).maps, evaluate(detector, test).maps)
    torch.testing.assert_close(evaluate(restored, test).scores, evaluate(detector, test).scores)
    without = replace(detector.normalization, nearest_normal_weight=0.0, image_nearest_normal_weight=None)
    plain = BGADDetector(detector.flows, without, detector.blur_sigma, SIZE, detector.config, detector.nearest)
    assert plain.nearest is None and "nearest_normal" not in plain.to_checkpoint()  # kept only where it is used
    with pytest.raises(ConfigError, match="needs the memory bank"):
        BGADDetector(detector.flows, detector.normalization, detector.blur_sigma, SIZE, detector.config)


def test_a_detector_with_distances_scores_in_float32_in_any_batch_and_exports_as_it_scores(detector):
    features = split(3, 1, seed=4).features
    assert_fp16_scores_in_float32_in_any_batch(detector, features, SIZE)
    session = exported_session(detector, split(2, 0, seed=5).features)
    assert_onnx_scores_like_pytorch(session, detector, features, [0, 1], SIZE)


@pytest.mark.parametrize("bad", ["sometimes", -0.1, 1.5, True])
def test_nearest_normal_weight_is_auto_or_a_share(bad):
    assert BGADConfig(nearest_normal_weight="0.5").nearest_normal_weight == 0.5  # as a command line gives it
    with pytest.raises(ConfigError, match=r"nearest_normal_weight must be 'auto' or a number in \[0, 1\], got"):
        BGADConfig(nearest_normal_weight=bad)


def test_the_image_score_map_is_auto_or_the_anomaly_map():
    with pytest.raises(ConfigError, match=r"image_score_map must be one of \['auto', 'anomaly_map'\], got 'other'"):
        BGADConfig(image_score_map="other")


@pytest.mark.parametrize("ratio", [0.01, 0.1])
def test_the_bank_keeps_the_configured_share_of_the_training_normals_patches(ratio):
    config = BGADConfig(meta_epochs=1, coupling_blocks=2, cond_dim=8, nearest_normal_coreset_ratio=ratio)
    training = BGADTraining(BGADFlows.from_config([6, 6], config), config, split(24, 0, seed=0))
    assert [bank.bank.shape for bank in training.memory_banks] == [(round(24 * 8 * 8 * ratio), 12)]
    assert training.choose_bank(split(8, 8, seed=1), SIZE, "aupro") is training.memory_banks[0]


@pytest.mark.parametrize("bad", ["often", 0.0, -0.1, 1.5, True])
def test_the_bank_share_is_auto_or_lies_in_0_1(bad):
    assert BGADConfig(nearest_normal_coreset_ratio="0.1").nearest_normal_coreset_ratio == 0.1  # from a command line
    with pytest.raises(ConfigError, match=r"nearest_normal_coreset_ratio must be 'auto' or a number in \(0, 1\], got"):
        BGADConfig(nearest_normal_coreset_ratio=bad)


def defect_distances(val: FeatureSet, strength: float, seed: int) -> torch.Tensor:
    """Standardised distances ``(N, 8, 8)`` of ``split``'s images: noise, plus ``strength`` at the defect's cell of
    every anomaly."""
    distances = torch.randn(len(val), 8, 8, generator=torch.Generator().manual_seed(seed))
    distances[val.labels == 1, 2, 5] += strength
    return distances


def test_validation_takes_the_larger_bank_only_where_its_distances_alone_score_more_than_the_margin_higher():
    val = split(8, 8, seed=1)
    blind, sharp = defect_distances(val, 0.0, seed=2), defect_distances(val, 6.0, seed=2)
    for objective in ("aupro", "image_auroc"):
        assert choose_bank([blind, sharp], val, SIZE, 1.0, objective) == 1
        assert choose_bank([sharp, blind], val, SIZE, 1.0, objective) == 0
        assert choose_bank([sharp, sharp * 1.01], val, SIZE, 1.0, objective) == 0  # a tie keeps the smaller share


def test_under_a_pixel_objective_a_larger_bank_must_not_cost_image_auroc():
    """Distances that find the defect's cell but give the normals a bright spot elsewhere win PRO and lose image
    AUROC: the smaller bank stays."""
    val = split(8, 8, seed=1)
    blind, sharp = defect_distances(val, 0.0, seed=2), defect_distances(val, 6.0, seed=2)
    spotted = sharp.clone()
    spotted[val.labels == 0, 6, 1] += 20.0  # far from the defect's cell: normal pixels, no anomaly's region
    bank_metrics = [score_split((), val, Normalization((), (), nearest_normal_weight=1.0), SIZE, 1.0, d).metrics
                    for d in (blind, spotted)]
    assert bank_metrics[1]["aupro"] > bank_metrics[0]["aupro"] + 0.2
    assert bank_metrics[1]["image_auroc"] < bank_metrics[0]["image_auroc"] - SCORING_MARGIN
    assert choose_bank([blind, spotted], val, SIZE, 1.0, "aupro") == 0
    assert choose_bank([blind, sharp], val, SIZE, 1.0, "aupro") == 1


def test_an_auto_share_fills_both_banks_once_and_validation_chooses_one_for_the_whole_training():
    """Banks whose distances see the defect or cannot (one that holds the defect's own patch): validation takes the
    seeing one, at 1 % or at 10 %, reports its share and deploys it; later validations keep it."""
    config = BGADConfig(meta_epochs=2, sub_epochs=1, coupling_blocks=2, cond_dim=8, local_aggregation=1,
                        nearest_normal_weight=1.0)
    assert config.nearest_normal_coreset_ratio == "auto"
    val = split(8, 8, seed=1)
    for seeing in (0, 1):
        training = BGADTraining(BGADFlows.from_config([6, 6], config), config, split(24, 0, seed=0))
        assert [len(bank.bank) for bank in training.memory_banks] == [round(24 * 64 * r) for r in CORESET_RATIOS]
        blind = NearestNormal().fit(split(24, 8, seed=0).features, coreset_ratio=1.0)  # the defect is "normal"
        training.memory_banks[1 - seeing] = blind
        for _ in range(2):
            training.train_meta_epoch()
            evaluation = training.validate(val, SIZE, "aupro")
            assert evaluation.choices["nearest_normal_coreset_ratio"] == CORESET_RATIOS[seeing]
            assert evaluation.detector.nearest is training.memory_banks[seeing]
            assert evaluation.metrics["aupro"] > 0.9
    unused = replace(config, nearest_normal_weight=0.0, coarse_labels="distant")  # only coarse labels read a bank
    training = BGADTraining(BGADFlows.from_config([6, 6], unused), unused, split(24, 0, seed=0))
    assert [len(bank.bank) for bank in training.memory_banks] == [round(24 * 64 * CORESET_RATIOS[0])]


def test_the_image_score_may_reduce_another_map_than_the_anomaly_map():
    """A map of the likelihoods alone, scored by the maximum of the distances alone: the map is the likelihoods',
    the score the other map's; a checkpoint from before the choice reduces its own map."""
    val = split(8, 8, seed=1)
    distances = defect_distances(val, 6.0, seed=2)
    logps = [torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(3)), torch.randn(16, 4, 4)]
    flows = Normalization((0.0, 0.0), (1.0, 1.0))
    scores, maps = scores_and_maps(logps, replace(flows, image_nearest_normal_weight=1.0), SIZE, 1.0, distances)
    torch.testing.assert_close(maps, anomaly_maps(logps, flows, SIZE, 1.0, distances))
    alone = anomaly_maps((), replace(flows, nearest_normal_weight=1.0), SIZE, 1.0, distances)
    torch.testing.assert_close(scores, image_scores(alone))
    stored = replace(flows, image_nearest_normal_weight=1.0).to_dict()
    assert Normalization.from_dict(stored).image_weight == 1.0
    del stored["image_nearest_normal_weight"]
    assert Normalization.from_dict(stored).image_nearest_normal_weight is None
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ConfigError, match="image_nearest_normal_weight must be None or lie in"):
            replace(flows, image_nearest_normal_weight=bad)


def test_under_a_pixel_objective_the_image_score_reduces_another_map_where_it_leads_by_more_than_the_margin():
    """The map chosen on PRO keeps its pixels; its image score gives way to the distances alone's maximum where that
    ranks validation's 16 images better by more than the margin: far better (the chosen map ranks them backwards),
    or by one normal image above the two weakest anomalies (2 of 64 pairs), which no paired bootstrap of 16 images
    tells apart; a tie keeps the chosen map's own score, the simpler."""
    val = split(8, 8, seed=1)
    distances = defect_distances(val, 6.0, seed=2)
    alone = score_split((), val, Normalization((), (), nearest_normal_weight=1.0), SIZE, 1.0, distances)
    assert alone.metrics["image_auroc"] == 1.0

    def chosen_with(scores: torch.Tensor) -> ScoredSplit:  # the likelihoods' map (here: the same pixels)
        image = compute_metrics(val.labels.numpy(), scores.numpy())
        return ScoredSplit({**alone.metrics, **image}, scores, alone.maps, Normalization((0.0,), (1.0,)))

    weakest = alone.scores[8:].sort().values
    close = alone.scores.clone()
    close[0] = (weakest[1] + weakest[2]) / 2  # one normal above the two weakest anomalies: 1 - 2 / 64
    for own in (-alone.scores, close):
        chosen = chosen_with(own)
        assert alone.metrics["image_auroc"] - chosen.metrics["image_auroc"] > SCORING_MARGIN
        taken = choose_image_map(chosen, [], val, (0.0, 1.0), ("max",), SIZE, 1.0, distances)
        assert taken.normalization.nearest_normal_weight == 0.0
        assert taken.normalization.image_nearest_normal_weight == 1.0
        assert taken.maps is chosen.maps and taken.metrics["aupro"] == chosen.metrics["aupro"]
        assert taken.metrics["image_auroc"] == 1.0 and torch.equal(taken.scores, alone.scores)
    tied = chosen_with(alone.scores * 2.0)  # the same ranking from its own map
    assert choose_image_map(tied, [], val, (0.0, 1.0), ("max",), SIZE, 1.0, distances) is tied


def test_the_mean_of_pro_and_image_auroc_is_of_the_image_score_each_scoring_deploys():
    """A map's pixel metrics are computed once and merged with each reduction's image metrics, and a chosen map may
    take another map's image score: the mean must follow the image score, not the first one computed."""
    val = split(8, 8, seed=1)
    distances = defect_distances(val, 6.0, seed=2)
    generator = torch.Generator().manual_seed(3)
    logps = [torch.randn(16, 8, 8, generator=generator), torch.randn(16, 4, 4, generator=generator)]
    candidates = scored_candidates(logps, val, [Normalization((0.0, 0.0), (1.0, 1.0))], (1.0,), (0.0, 1.0),
                                   ("max", "top1pct_mean"), (SIZE, 1.0), distances)

    def consistent(metrics: dict[str, float]) -> bool:
        return metrics[PRO_AND_IMAGE_AUROC] == (metrics["aupro"] + metrics["image_auroc"]) / 2

    assert len({c.evaluation.metrics["image_auroc"] for c in candidates}) > 2
    assert all(consistent(c.evaluation.metrics) for c in candidates)
    likelihoods = next(c.evaluation for c in candidates if c.map == (0, 0, 0) and c.reduction == 0)
    taken = choose_image_map(likelihoods, logps, val, (0.0, 1.0), ("max",), SIZE, 1.0, distances)
    assert taken.normalization.image_nearest_normal_weight == 1.0 and consistent(taken.metrics)
    chosen = choose_scoring(logps, val, [Normalization((0.0, 0.0), (1.0, 1.0))], (1.0,), ("max", "top1pct_mean"),
                            SIZE, 1.0, PRO_AND_IMAGE_AUROC, (0.0, 1.0), distances)
    assert chosen.normalization.nearest_normal_weight == 1.0 and consistent(chosen.metrics)


def test_on_the_mean_of_pro_and_image_auroc_the_map_is_chosen_on_pro_and_its_image_score_on_image_auroc():
    """The map decides the pixels, the image score is chosen apart: a map that ranks images better with its own
    maximum but outlines defects worse is not taken for that; the mean decides what decides both (the epoch)."""
    def candidate(rank: int, map_: int, reduction: int, pro: float, image: float) -> Candidate:
        metrics = {"aupro": pro, "image_auroc": image, PRO_AND_IMAGE_AUROC: (pro + image) / 2}
        scoring = Normalization((0.0,), (1.0,), image_score=("max", "top1pct_mean")[reduction])
        return Candidate(rank, (0, 0, map_), reduction, ScoredSplit(metrics, torch.zeros(1), torch.zeros(1), scoring))

    candidates = [candidate(0, 0, 0, 0.80, 0.70), candidate(1, 0, 1, 0.80, 0.90), candidate(1, 1, 0, 0.70, 0.95),
                  candidate(2, 1, 1, 0.70, 0.96)]
    chosen = choose_among(candidates, PRO_AND_IMAGE_AUROC)
    assert chosen is choose_among(candidates, "aupro") is candidates[1].evaluation
    assert chosen.metrics[PRO_AND_IMAGE_AUROC] == pytest.approx(0.85)


def test_on_the_mean_distances_alone_are_weighed_against_the_image_score_the_flows_would_deploy():
    """Flows that outline the defect exactly but rank images backwards (a hot spot in every normal image) lose to
    the distances alone on their own image score; with the distances' image score, which they would deploy, they
    win on the mean, so they are kept with it."""
    val = split(8, 8, seed=1)
    distances = defect_distances(val, 3.0, seed=2)  # they outline it less well
    fits = [Normalization((0.0, 0.0), (1.0, 1.0))]
    generator = torch.Generator().manual_seed(3)
    logps = [torch.randn(16, 8, 8, generator=generator), torch.randn(16, 4, 4, generator=generator)]
    logps[0][8:, 2, 5] -= 50.0  # the defect's cell
    logps[0][:8, 6, 1] -= 80.0  # a hot spot of every normal image, away from any defect
    own = choose_scoring(logps, val, fits, (1.0,), ("max",), SIZE, 1.0, PRO_AND_IMAGE_AUROC)
    alone = choose_scoring(logps, val, fits, (1.0,), ("max",), SIZE, 1.0, PRO_AND_IMAGE_AUROC, (1.0,), distances)
    assert own.metrics["aupro"] > alone.metrics["aupro"] and own.metrics["image_auroc"] < 0.5
    assert alone.metrics[PRO_AND_IMAGE_AUROC] > own.metrics[PRO_AND_IMAGE_AUROC] + 0.2
    chosen = choose_scoring(logps, val, fits, (1.0,), ("max",), SIZE, 1.0, PRO_AND_IMAGE_AUROC, (0.0, 1.0),
                            distances, EpochScoring())
    assert chosen.normalization.nearest_normal_weight == 0.0 and chosen.normalization.image_nearest_normal_weight == 1.0
    assert chosen.metrics[PRO_AND_IMAGE_AUROC] > alone.metrics[PRO_AND_IMAGE_AUROC]


@pytest.mark.parametrize("objective", ["aupro", PRO_AND_IMAGE_AUROC])
def test_distances_alone_once_chosen_keep_their_own_image_score(objective):
    """Distances that outline the defect but rank two normals (hot spots) above every anomaly win against flows that
    rank every image right and outline nothing; the flows' image score leads theirs by far more than the margin,
    and is still not borrowed: it changes with the epoch, and would let epoch selection pick the flows' luckiest
    epoch behind the guard that keeps the distances alone epoch-independent."""
    val = split(8, 8, seed=1)
    distances = defect_distances(val, 6.0, seed=2)
    distances[:2, 6, 1] += 12.0  # two normal images with a hot spot, above every anomaly
    fits = [Normalization((0.0, 0.0), (1.0, 1.0))]
    generator = torch.Generator().manual_seed(3)
    logps = [torch.randn(16, 8, 8, generator=generator), torch.randn(16, 4, 4, generator=generator)]
    logps[0][8:, 6, 6] -= 50.0  # every anomaly flagged, away from its defect
    flows = choose_scoring(logps, val, fits, (1.0,), ("max",), SIZE, 1.0, objective)
    alone = choose_scoring(logps, val, fits, (1.0,), ("max",), SIZE, 1.0, objective, (1.0,), distances)
    assert flows.metrics["image_auroc"] == 1.0 and alone.metrics["image_auroc"] < 1.0 - 0.1
    assert alone.metrics["aupro"] > flows.metrics["aupro"] + 0.5
    borrowed = choose_image_map(alone, logps, val, (0.0, 1.0), ("max",), SIZE, 1.0, distances)
    assert borrowed.normalization.image_nearest_normal_weight == 0.0  # what a within-epoch choice would take
    chosen = choose_scoring(logps, val, fits, (1.0,), ("max",), SIZE, 1.0, objective, (0.0, 1.0), distances,
                            EpochScoring())
    assert chosen.normalization.nearest_normal_weight == 1.0
    assert chosen.normalization.image_nearest_normal_weight is None
    assert chosen.metrics["image_auroc"] == alone.metrics["image_auroc"]
