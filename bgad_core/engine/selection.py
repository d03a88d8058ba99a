"""Train any family meta-epoch by meta-epoch, select the epoch on validation, evaluate test once.

The rule the command line (``bgad_core.train``) and the sweep (``sweeper.tuning.trainable``) share: an epoch may be
selected from the family's ``first_selectable_epoch`` on, the best validation objective wins, and the test split
is read exactly once, with the selected detector.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from bgad_core.data.features import FeatureSet
from bgad_core.engine.stopping import PlateauConfig, PlateauRule
from bgad_core.evaluation.metrics import f1_max
from bgad_core.models.base import Evaluation, Training, evaluate

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """The outcome of ``train_and_select``: the selected epoch, its validation (whose ``detector`` is the model,
    frozen at that epoch), the single test evaluation, and every meta-epoch's figures."""

    epoch: int
    val: Evaluation
    test: Evaluation
    history: list[dict]


def train_and_select(
    training: Training,
    val: FeatureSet,
    test: FeatureSet,
    image_size: tuple[int, int],
    objective: str,
    test_every_epoch: bool = False,
    stop_after: int | None = None,
    plateau: PlateauConfig | None = None,
) -> Selection:
    """Train meta-epochs, keep the one with the best *validation* ``objective``, evaluate test once with it.

    Only epochs from ``training.first_selectable_epoch`` on are candidates (BGAD: after phase 1); the rule is the
    sweep's too (``sweeper.tuning.trainable``). ``plateau`` ends training once validation has stopped
    gaining (``bgad_core.engine.stopping.PlateauRule``, watching the same epochs the selection considers); the selected
    epoch is still the best one, usually ``patience`` meta-epochs back. None trains the whole schedule, as the
    learning-curve benchmarks need. ``test_every_epoch`` also evaluates test after each meta-epoch, for learning
    curves only: it is recorded in ``history`` and in the meta-epoch's log line (so a stopped run keeps its curve),
    and never used to select. ``stop_after`` ends training after that many meta-epochs of the configured schedule
    (to time a long schedule from its start).
    """
    best: Evaluation | None = None
    best_score, best_epoch = -math.inf, 0
    history = []
    epochs = training.meta_epochs if stop_after is None else max(1, min(stop_after, training.meta_epochs))
    rule = PlateauRule(plateau or PlateauConfig(patience=0), min(training.first_selectable_epoch, epochs))
    for _ in range(epochs):
        started = time.perf_counter()
        figures = training.train_meta_epoch()
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        result = training.validate(val, image_size, objective)
        row = {"epoch": training.epoch, **figures, "train_seconds": round(train_seconds, 2),
               "val_seconds": round(time.perf_counter() - started, 2), **result.choices, "val": result.metrics}
        if test_every_epoch:
            row["test"] = evaluate(result.detector, test).metrics
        history.append(row)
        score = result.metrics.get(objective, float("nan"))
        log.info("meta-epoch %d loss %.4f val %s (%s)%s", training.epoch, figures.get("loss", math.nan),
                 _fmt(result.metrics), _fmt(result.choices),
                 f"; test (curve only) {_fmt(row['test'])}" if test_every_epoch else "")
        if training.epoch >= rule.first_epoch and (best is None or score > best_score):
            # a copy: the detector shares the parameters that the next meta-epochs go on training
            best, best_score, best_epoch = replace(result, detector=copy.deepcopy(result.detector)), score, training.epoch
        if rule.update(training.epoch, score):
            log.info("validation %s has not gained more than %g for %d meta-epochs: training stops after meta-epoch "
                     "%d of %d (best: %d)", objective, rule.config.min_delta, rule.stale, training.epoch, epochs,
                     best_epoch)
            break
    return Selection(best_epoch, best, evaluate(best.detector, test), history)


def decision_threshold(evaluation: Evaluation, labels: torch.Tensor) -> float:
    """Image-score threshold that maximises F1 on a (validation) split: the served model's default decision."""
    return float(f1_max(labels.numpy(), evaluation.scores.numpy())[1])


def seed_everything(seed: int) -> None:
    """Seed torch and numpy so initialisation (incl. FrEIA's random soft permutations) is reproducible."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
