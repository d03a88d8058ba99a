"""One console line per event that matters: trials running, finished, pruned, failed, best so far, elapsed."""

from __future__ import annotations

import math
import time
from typing import Any

from ray import tune


class SweepProgress(tune.Callback):
    """Prints the state of an experiment whenever a trial reports or ends (Tune's own table is turned off)."""

    def __init__(self, experiment: str, metric: str, max_t: int) -> None:
        self.experiment = experiment
        self.metric = metric
        self.max_t = max_t
        self.started = time.monotonic()
        self.best: tuple[float, str] | None = None
        self.ended: dict[str, str] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and not math.isnan(value) and (self.best is None or value > self.best[0]):
            self.best = (float(value), trial.trial_id)
        self._print(trials, f"{trial.trial_id} epoch {result.get('training_iteration')} {self.metric}={value:.4f}"
                    if isinstance(value, (int, float)) else f"{trial.trial_id} reported")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = (trial.last_result or {}).get("training_iteration", 0)
        self.ended[trial.trial_id] = "finished" if done >= self.max_t else "pruned"
        self._print(trials, f"{trial.trial_id} {self.ended[trial.trial_id]} after {done} meta-epoch(s)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = "failed"
        self._print(trials, f"{trial.trial_id} FAILED (see its error file and MLflow run)")

    def _print(self, trials: list, event: str) -> None:
        states = [self.ended.get(t.trial_id) for t in trials]
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = "-" if self.best is None else f"{self.best[0]:.4f} ({self.best[1]})"
        print(
            f"[{self.experiment}] {time.monotonic() - self.started:6.0f}s | running {running} "
            f"finished {states.count('finished')} pruned {states.count('pruned')} failed {states.count('failed')} "
            f"| best {self.metric} {best} | {event}",
            flush=True,
        )
