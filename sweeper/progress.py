"""One console line per event that matters: trials running, finished, pruned, failed, retried, best so far, elapsed."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ray import tune

from sweeper.trainable import FAILED_KEY


class SweepProgress(tune.Callback):
    """Prints the state of an experiment whenever a trial reports or ends (Tune's own table is turned off).

    Counts come from the trials' own states, so they stay right in a resumed experiment (Tune restores this
    callback as it was when the experiment was created).
    """

    def __init__(self, experiment: str, metric: str, max_t: int) -> None:
        self.experiment = experiment
        self.metric = metric
        self.max_t = max_t
        self.started = time.monotonic()
        self.best: tuple[float, str] | None = None

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()  # elapsed time of this run of the experiment, also after a resume

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(FAILED_KEY):
            self._print(trials, f"{trial.trial_id} FAILED in meta-epoch {result.get('training_iteration')}: "
                                f"{result.get('failure')}", ending={trial.trial_id: "failed"})  # it returns right after
            return
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and not math.isnan(value) and (self.best is None or value > self.best[0]):
            self.best = (float(value), trial.trial_id)
        self._print(trials, f"{trial.trial_id} epoch {result.get('training_iteration')} {self.metric}={value:.4f}"
                    if isinstance(value, (int, float)) else f"{trial.trial_id} reported")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if not last.get(FAILED_KEY):  # a diverged trial was announced with its reason by on_trial_result
            outcome = self._outcome(trial, "TERMINATED")  # Tune sets the status after calling back
            self._print(trials, f"{trial.trial_id} {outcome} after {last.get('training_iteration', 0)} meta-epoch(s)",
                        ending={trial.trial_id: outcome})

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials, f"{trial.trial_id} failed ({_last_error(trial)}); retrying from its last checkpoint "
                            f"(retry {trial.num_failures} of tune.max_failures={trial.max_failures})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials, f"{trial.trial_id} FAILED: {_last_error(trial)} (full error: error.txt in {trial.path})")

    def _outcome(self, trial: Any, status: str | None = None) -> str | None:
        """finished / pruned / failed for an ended trial, None while it runs or waits."""
        status = status or trial.status
        last = trial.last_result or {}
        if status == "ERROR" or (status == "TERMINATED" and last.get(FAILED_KEY)):
            return "failed"
        if status == "TERMINATED":
            return "finished" if last.get("training_iteration", 0) >= self.max_t else "pruned"
        return None

    def _print(self, trials: list, event: str, ending: dict[str, str | None] | None = None) -> None:
        """``ending``: outcome of trials ending with this event, whose status Tune has not updated yet."""
        ending = ending or {}
        outcomes = [ending.get(t.trial_id) or self._outcome(t) for t in trials]
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in ending)
        best = "-" if self.best is None else f"{self.best[0]:.4f} ({self.best[1]})"
        print(
            f"[{self.experiment}] {time.monotonic() - self.started:6.0f}s | running {running} "
            f"finished {outcomes.count('finished')} pruned {outcomes.count('pruned')} "
            f"failed {outcomes.count('failed')} | best {self.metric} {best} | {event}",
            flush=True,
        )


def _last_error(trial: Any) -> str:
    """The last non-empty line of the trial's error file (Tune appends one block per failure), or "unknown"."""
    path = trial.error_file
    lines = Path(path).read_text(errors="replace").strip().splitlines() if path and Path(path).is_file() else []
    return lines[-1].strip()[:300] if lines else "unknown"
