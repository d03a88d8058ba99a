"""The sweep's plateau stopping without starting Ray: what a trial reports, what it checkpoints, what Tune's stopper
decides on it, also across a resume (``Tuner.restore`` builds a fresh stopper from the pickled run config)."""

from __future__ import annotations

import json

from benchmarks.bench_plateau import CURVES
from bgad_core.engine.stopping import PlateauConfig, PlateauRule, first_watched_epoch
from sweeper.tuning.sweep import PlateauStopper
from sweeper.tuning.trainable import PLATEAU_KEY, PLATEAU_STALE_KEY, _record_plateau, ran_its_course

KOLEKTOR = next(c for c in CURVES if c.name.startswith("KolektorSDD")).val  # peaks at meta-epoch 3, then falls
OBJECTIVE = "val_aupro"


def trial(values: list[float], first: int = 1, checkpoint: str | None = None,
          config: PlateauConfig = PlateauConfig()) -> tuple[list[dict], list[str]]:
    """A trial's results for meta-epochs ``first``.. (objective ``values``), as ``train_detector`` reports them, and the
    ``trial_state.json`` it checkpoints after each; ``checkpoint`` is the state it resumes from."""
    rule = PlateauRule(config, first_watched_epoch(normal_epochs=1, meta_epochs=25))
    state = {"mlflow_run_id": None, "plateau": rule.state_dict()}
    if checkpoint is not None:
        state = json.loads(checkpoint)
        rule.load_state_dict(state["plateau"])
    results, saved = [], []
    for epoch, value in enumerate(values, first):
        metrics = {OBJECTIVE: value}
        _record_plateau(rule, state, metrics, epoch, OBJECTIVE)
        results.append({**metrics, "training_iteration": epoch})
        saved.append(json.dumps(state))
    return results, saved


def stopped_at(stopper: PlateauStopper, results: list[dict]) -> int | None:
    return next((r["training_iteration"] for r in results if stopper("t1", r)), None)


def test_the_stopper_ends_a_trial_whose_objective_plateaus():
    results, _ = trial(list(KOLEKTOR))
    assert stopped_at(PlateauStopper(), results) == 5  # reference 0.560 at 2; 3, 4 and 5 gain no more than 0.005
    assert [r[PLATEAU_STALE_KEY] for r in results[:5]] == [0, 0, 1, 2, 3]
    assert ran_its_course(results[4], max_t=25) and not ran_its_course(results[3], max_t=25)
    climbing, _ = trial([0.5 + 0.01 * k for k in range(25)])
    assert stopped_at(PlateauStopper(), climbing) is None and ran_its_course(climbing[-1], max_t=25)


def test_a_resumed_trial_continues_its_count():
    """Resumed from the checkpoint of meta-epoch 3 (stale 1), under a new stopper: it stops after 5, as without the
    interruption, also when it re-reports meta-epoch 4, which the first attempt reported before being killed."""
    first_attempt, saved = trial(list(KOLEKTOR[:4]))
    assert stopped_at(PlateauStopper(), first_attempt) is None
    resumed, _ = trial(list(KOLEKTOR[3:]), first=4, checkpoint=saved[2])
    assert stopped_at(PlateauStopper(), resumed) == 5
    assert json.loads(saved[2])["plateau"] == {"reference": 0.56, "reference_epoch": 2, "stale": 1}


def test_disabled_plateau_never_stops_a_trial():
    results, _ = trial([0.5] + [0.8] * 24, config=PlateauConfig(patience=0))
    assert stopped_at(PlateauStopper(), results) is None and not any(r[PLATEAU_KEY] for r in results)
    assert not ran_its_course(results[10], max_t=25)
