"""The plateau rule (``bgad_core.engine.stopping``) on hand-made curves, and ``train_and_select`` stopping with it."""

from __future__ import annotations

import logging
import math

import pytest

from bgad_core.errors import ConfigError
from bgad_core.models.bgad.torch_model import BGADFlows
from bgad_core.engine.stopping import PlateauConfig, PlateauRule, first_watched_epoch
from bgad_core.engine.selection import seed_everything, train_and_select
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.training import BGADTraining
from bgad_core.train import main
from test_trainer import normals_only_two_levels, two_level_split


def stop_epoch(values: list[float], patience: int = 3, min_delta: float = 0.005, first_epoch: int = 2) -> int | None:
    """The meta-epoch (1-based) after which the rule stops on ``values``, or None when it never does."""
    rule = PlateauRule(PlateauConfig(patience, min_delta), first_epoch)
    return next((epoch for epoch, value in enumerate(values, 1) if rule.update(epoch, value)), None)


def test_stops_after_patience_epochs_without_a_gain():
    # reference 0.80 at meta-epoch 2, then three epochs that do not rise more than 0.005 above it
    assert stop_epoch([0.5, 0.80, 0.79, 0.804, 0.70, 0.99]) == 5


def test_keeps_training_while_gains_exceed_min_delta():
    assert stop_epoch([0.5 + 0.006 * k for k in range(25)]) is None
    # a creep of small rises adds up: each +0.003 is no gain alone, but the reference stays put until one is
    assert stop_epoch([0.5] + [0.8 + 0.003 * k for k in range(24)]) is None
    # min_delta 0: any rise counts, equal values do not
    assert stop_epoch([0.5, 0.8, 0.8001, 0.8002, 0.8003, 0.8003, 0.8003, 0.8003], min_delta=0.0) == 8


def test_never_stops_in_phase_one():
    """Epochs before ``first_epoch`` neither count as stale nor set the reference, however flat they are."""
    assert stop_epoch([0.9, 0.9, 0.9, 0.1, 0.2, 0.3], patience=2, first_epoch=4) is None
    rule = PlateauRule(PlateauConfig(1, 0.0), first_epoch=3)
    assert not rule.update(1, 0.9) and not rule.update(2, 0.9) and rule.reference is None and rule.stale == 0
    assert first_watched_epoch(normal_epochs=1, meta_epochs=25) == 2
    assert first_watched_epoch(normal_epochs=3, meta_epochs=3) == 3  # a schedule inside phase 1 selects its last


def test_nan_is_no_gain():
    nan = float("nan")
    assert stop_epoch([0.5, nan, nan, nan]) == 4  # an objective that stays undefined stops after patience
    assert stop_epoch([0.5, 0.8, nan, 0.9, nan, nan, 0.9]) == 7
    rule = PlateauRule(PlateauConfig(3, 0.005), 2)
    for epoch, value in enumerate([0.5, nan, 0.7, None], 1):
        rule.update(epoch, value)
    assert (rule.reference, rule.reference_epoch, rule.stale) == (0.7, 3, 1)


def test_disabled_rule_never_stops_and_the_state_round_trips():
    assert stop_epoch([0.5] + [0.8] * 24, patience=0) is None
    rule = PlateauRule(PlateauConfig(3, 0.005), 2)
    for epoch, value in enumerate([0.5, 0.8, 0.79], 1):
        rule.update(epoch, value)
    resumed = PlateauRule(PlateauConfig(3, 0.005), 2)
    resumed.load_state_dict(rule.state_dict())
    assert not resumed.update(4, 0.80) and resumed.update(5, 0.80)  # the count goes on: stale 2, then 3


@pytest.mark.parametrize("patience, min_delta, message", [
    (-1, 0.005, "patience must be an int >= 0"), (1.5, 0.005, "patience must be an int >= 0"),
    (True, 0.005, "patience must be an int >= 0"), (3, -0.1, "min_delta must be a finite number >= 0"),
    (3, math.inf, "min_delta must be a finite number >= 0"), (3, "0.1", "min_delta must be a finite number >= 0"),
])
def test_bad_settings_are_config_errors(patience, min_delta, message):
    with pytest.raises(ConfigError, match=message):
        PlateauConfig(patience, min_delta)


def test_the_command_line_refuses_a_bad_patience(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--patience", "-2"])
    assert exit_info.value.code == 2
    assert "error: patience must be an int >= 0" in capsys.readouterr().err


def test_train_and_select_stops_at_the_plateau_and_keeps_the_best_epoch(caplog):
    """min_delta 1 makes every AUROC rise no gain: the run stops ``patience`` epochs after phase 1's end, and the
    epoch it hands back (weights included: its test is the curve's test at that epoch) is validation's best."""
    config = BGADConfig(meta_epochs=8, sub_epochs=1, warmup_epochs=1, coupling_blocks=2, cond_dim=8, fiber_batch=64)
    seed_everything(config.seed)
    training = BGADTraining(BGADFlows.from_config([8, 8], config), config, normals_only_two_levels())
    with caplog.at_level(logging.INFO, logger="bgad_core.engine.selection"):
        best = train_and_select(training, two_level_split(16, seed=1), two_level_split(16, seed=2), (24, 24),
                                "image_auroc", test_every_epoch=True, plateau=PlateauConfig(2, 1.0))
    assert [h["epoch"] for h in best.history] == [1, 2, 3, 4] and training.epoch == 4
    scores = {h["epoch"]: h["val"]["image_auroc"] for h in best.history[1:]}
    assert best.epoch == max(scores, key=lambda e: (scores[e], -e))  # the first maximum after phase 1
    assert best.history[best.epoch - 1]["test"] == best.test.metrics
    assert any("training stops after meta-epoch 4 of 8" in r.getMessage() for r in caplog.records)


def test_the_recorded_curves_replay_as_the_defaults_claim():
    """``bench_plateau`` on BENCHMARKS.md's 25 x 8 curves: stop and selected epochs, test within 0.003."""
    from benchmarks.bench_plateau import CURVES, replay

    replays = {r.curve.name: r for r in (replay(curve, PlateauConfig()) for curve in CURVES)}
    assert {name: (r.stopped, r.selected, r.full_selected) for name, r in replays.items()} == {
        "MTD-200 BGAD-FAS": (12, 9, 13), "KolektorSDD BGAD-FAS": (5, 3, 3), "BrainMRI BGAD-FAS": (8, 5, 5),
        "BrainMRI BGAD (no labels)": (22, 19, 24)}
    assert max(r.test_gap() for r in replays.values()) <= 0.003 + 1e-9
