"""Plateau stopping: end training once the validation objective has stopped gaining.

At the paper's 25 x 8 schedule validation selects meta-epoch 3 on KolektorSDD, 5 on BrainMRI and 13 on MTD-200 (PRO
flat from 9 on: 0.838 at 9, 0.844 at 13, 0.838 at 25), and after that validation and test fall or stay flat
(BENCHMARKS.md, "Learning curves at the paper's schedule, 25 x 8"), yet every run trained all 25 meta-epochs. The
rule here is the one place that decides when to stop: ``bgad_core.train.train_and_select`` applies it to a single
run, the sweep's trials apply it through ``sweeper.tuning.trainable`` (which checkpoints its state) and the sweep's Tune
stopper. ``benchmarks/bench_plateau.py`` replays the recorded curves through it: with the defaults (patience 3,
min_delta 0.005) the three BGAD-FAS runs stop after meta-epochs 12 (MTD-200), 5 (KolektorSDD) and 8 (BrainMRI),
25 of 75 meta-epochs, and select epochs whose test image AUROC and PRO are within 0.003 of the full runs'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bgad_core.errors import ConfigError


@dataclass(frozen=True)
class PlateauConfig:
    """When a run stops before its last meta-epoch.

    Defaults from the four recorded 25 x 8 validation curves (``benchmarks/bench_plateau.py --grid``). Patience 2
    stops plain BGAD on BrainMRI after meta-epoch 6, in a two-epoch dip of a curve that climbs until 24 (test 0.819
    at its selected epoch where the full run reads 0.882); 3 waits that dip out (test within 0.003 on all four
    curves, 47 of 100 meta-epochs trained) and 4 buys nothing on test for 8 more meta-epochs. A gain counts only
    above 0.005, the validation difference below which the evaluation's scoring choices already call two
    candidates equal (``SCORING_MARGIN``): it ends KolektorSDD one meta-epoch earlier than 0 would (its +0.003 at
    meta-epoch 3 is no gain), while 0.02 stops MTD-200 after meta-epoch 7 (test image AUROC 0.019 below the full
    run) and BrainMRI's plain BGAD after 11 (0.037 below).

    Attributes:
        patience: meta-epochs after phase 1 in a row without a validation gain of more than min_delta before
            training stops; 0 never stops early.
        min_delta: how much the validation objective must rise above the last value that counted as a gain to
            count as one.
    """

    patience: int = 3
    min_delta: float = 0.005

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"patience must be an int >= 0 (0 = never stop early), got {self.patience!r}")
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)) or not (
            math.isfinite(self.min_delta) and self.min_delta >= 0
        ):
            raise ConfigError(f"min_delta must be a finite number >= 0, got {self.min_delta!r}")

    @property
    def enabled(self) -> bool:
        """Whether the rule can stop a run at all."""
        return self.patience > 0


@dataclass
class PlateauRule:
    """The plateau rule's state over one run, fed the validation objective after every meta-epoch.

    Meta-epochs before ``first_epoch`` (phase 1, normal-only training, which the epoch selection skips too) are
    ignored. From there, ``reference`` is the last value that counted as a gain: the first value, then any value
    more than ``min_delta`` above the reference. ``stale`` counts the meta-epochs since; the run stops when it
    reaches ``patience``. The reference is not the maximum: a rise of ``min_delta`` or less leaves it, so that a
    slow creep of small rises still adds up to a gain, and the epoch to keep is selected separately (the strict
    maximum of validation). A NaN (or missing) objective is no gain: it counts as a stale meta-epoch and never
    becomes the reference, so a run whose objective stays undefined stops after ``patience`` meta-epochs.

    Attributes:
        config: patience and min_delta.
        first_epoch: the first meta-epoch the rule watches (the first after phase 1).
        reference: the last value that counted as a gain (None before the first watched meta-epoch).
        reference_epoch: its meta-epoch (0 before).
        stale: meta-epochs since the last gain.
    """

    config: PlateauConfig
    first_epoch: int
    reference: float | None = None
    reference_epoch: int = 0
    stale: int = 0

    def update(self, epoch: int, value: float | None) -> bool:
        """Take meta-epoch ``epoch``'s validation objective; True when the run should stop after it."""
        if epoch < self.first_epoch:
            return False
        finite = value is not None and not math.isnan(value)
        if finite and (self.reference is None or value - self.reference > self.config.min_delta):
            self.reference, self.reference_epoch, self.stale = float(value), epoch, 0
        else:
            self.stale += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        """Whether the objective has gone ``patience`` meta-epochs without a gain (never when disabled)."""
        return self.config.enabled and self.stale >= self.config.patience

    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs to continue the count (JSON-able)."""
        return {"reference": self.reference, "reference_epoch": self.reference_epoch, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of the same run."""
        self.reference = state["reference"]
        self.reference_epoch = int(state["reference_epoch"])
        self.stale = int(state["stale"])


def first_watched_epoch(normal_epochs: int, meta_epochs: int) -> int:
    """The first meta-epoch the rule watches: the first one ``train_and_select`` may select (after phase 1, but at
    the last meta-epoch at the latest)."""
    return min(normal_epochs, meta_epochs - 1) + 1
