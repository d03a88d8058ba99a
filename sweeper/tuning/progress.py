"""One console line per event that matters: trials ended of the total, best so far, elapsed time and an ETA.

    [search]   31s | 3/6 trials ended (running 2, finished 1, pruned 2, failed 0) | best val_aupro_image_auroc_mean 0.9687 (f69d176c) in synthetic-tiles | ETA <= 52s | 4e1075a2 epoch 2 val_aupro_image_auroc_mean=0.9539

Where the experiment's trials train different categories (``per_category`` mode), the best so far is that of the
reporting trial's category.

The ETA is an upper bound: it assumes every trial still to run or running goes the full ``max_t`` meta-epochs at the
rate measured so far (ASHA and the plateau rule stop most of them earlier).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ray import tune

from sweeper.job.interrupt import STOP
from sweeper.tuning.trainable import CATEGORY_KEY, FAILED_KEY, ran_its_course


class SweepProgress(tune.Callback):
    """Prints the state of an experiment whenever a trial reports or ends (Tune's own table is turned off).

    Counts come from the trials' own states, so they stay right in a resumed experiment (Tune restores this
    callback as it was when the experiment was created).
    """

    def __init__(self, experiment: str, metric: str, max_t: int, total: int) -> None:
        self.experiment = experiment
        self.metric = metric
        self.max_t = max_t
        self.total = total
        self.started = time.monotonic()
        self.reports = 0
        self.best: dict[str | None, tuple[float, str]] = {}  # per category where trials name theirs, else under None

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()  # elapsed time of this run of the experiment, also after a resume
        self.reports = 0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        STOP.forward_to_tune()  # a Ctrl-C / SIGTERM since the last step ends the experiment gracefully

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(FAILED_KEY):
            self._print(trials, trial, f"{trial.trial_id} FAILED in meta-epoch {result.get('training_iteration')}: "
                                       f"{result.get('failure')}", ending={trial.trial_id: "failed"})  # it returns next
            return
        self.reports += 1
        value = result.get(self.metric)
        category = trial.config.get(CATEGORY_KEY)
        best = self.best.get(category)
        if isinstance(value, (int, float)) and not math.isnan(value) and (best is None or value > best[0]):
            self.best[category] = (float(value), trial.trial_id)
        epoch = result.get("training_iteration")
        self._print(trials, trial, f"{trial.trial_id} epoch {epoch} {self.metric}={value:.4f}"
                    if isinstance(value, (int, float)) else f"{trial.trial_id} reported")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if not last.get(FAILED_KEY):  # a diverged trial was announced with its reason by on_trial_result
            outcome = self._outcome(trial, "TERMINATED")  # Tune sets the status after calling back
            event = f"{trial.trial_id} {outcome} after {last.get('training_iteration', 0)} meta-epoch(s)"
            self._print(trials, trial, event, ending={trial.trial_id: outcome})

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials, trial, f"{trial.trial_id} failed ({_last_error(trial)}); retrying from its last "
                                   f"checkpoint (retry {trial.num_failures} of tune.max_failures={trial.max_failures})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials, trial, f"{trial.trial_id} FAILED: {_last_error(trial)} (full error: error.txt in "
                                   f"{trial.path})")

    def _outcome(self, trial: Any, status: str | None = None) -> str | None:
        """finished / pruned / failed for an ended trial, None while it runs or waits."""
        status = status or trial.status
        last = trial.last_result or {}
        if status == "ERROR" or (status == "TERMINATED" and last.get(FAILED_KEY)):
            return "failed"
        if status == "TERMINATED":
            return "finished" if ran_its_course(last, self.max_t) else "pruned"
        return None

    def _print(self, trials: list, trial: Any, event: str, ending: dict[str, str | None] | None = None) -> None:
        """``event`` of ``trial``; ``ending``: outcome of trials ending with this event, whose status Tune has not
        updated yet. The best so far is that of the trial's category where trials name theirs."""
        category = trial.config.get(CATEGORY_KEY)
        ending = ending or {}
        outcomes = [ending.get(t.trial_id) or self._outcome(t) for t in trials]
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in ending)
        ended = sum(o is not None for o in outcomes)
        best = self.best.get(category)
        best = ("-" if best is None else f"{best[0]:.4f} ({best[1]})") + ("" if category is None else f" in {category}")
        elapsed = time.monotonic() - self.started
        print(
            f"[{self.experiment}] {elapsed:6.0f}s | {ended}/{self.total} trials ended (running {running}, "
            f"finished {outcomes.count('finished')}, pruned {outcomes.count('pruned')}, "
            f"failed {outcomes.count('failed')}) | best {self.metric} {best} | ETA {self._eta(trials, outcomes, elapsed)}"
            f" | {event}",
            flush=True,
        )

    def _eta(self, trials: list, outcomes: list[str | None], elapsed: float) -> str:
        """Upper bound on the time left: meta-epochs still possible at the rate of this run's reports so far."""
        if self.reports == 0 or elapsed <= 0:
            return "-"
        left = sum(self.max_t - (t.last_result or {}).get("training_iteration", 0)
                   for t, outcome in zip(trials, outcomes) if outcome is None)
        left += max(0, self.total - len(trials)) * self.max_t
        return "<= " + _duration(left * elapsed / self.reports)


def _last_error(trial: Any) -> str:
    """The last non-empty line of the trial's error file (Tune appends one block per failure), or "unknown"."""
    path = trial.error_file
    lines = Path(path).read_text(errors="replace").strip().splitlines() if path and Path(path).is_file() else []
    return lines[-1].strip()[:300] if lines else "unknown"


def _duration(seconds: float) -> str:
    """``52s``, ``3m05s``, ``2h10m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
