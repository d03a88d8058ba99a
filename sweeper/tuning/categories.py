"""One Tune run over every category of a ``per_category`` sweep: each category keeps its own study and its own
scheduler, and the trials of all categories share the cluster's slots.

Searching the categories one after another, one Tune run each, left slots idle twice per category: while a
category's last trials ran (nothing else could start) and at the boundary between two runs (the next run's setup
and fresh workers). ``benchmarks/bench_utilisation.py`` measured 30 % of the slot-seconds busy that way (3 categories
x 6 trials on 4 slots). Ray supports one ``Tuner.fit`` at a time per driver, so the categories share one run:

- every trial carries its category as the parameter ``category`` (``CATEGORY_KEY``), and trains that category
  alone (``sweeper.tuning.trainable``);
- ``CategorySearch`` asks each category's searcher in turn (the category with the fewest trials so far), so that
  each category's study sees only its own trials and ends at ``num_samples``;
- ``CategoryScheduler`` hands each trial's results to its category's scheduler, so that ASHA ranks a trial only
  against trials of its own category.

The run is one Tune experiment: Tune saves and restores it, searchers and schedulers included, as any other, so an
interrupted sweep resumes where it stopped; each category's Optuna study and MLflow runs stay its own.
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from sweeper.tuning.trainable import CATEGORY_KEY


class CategorySearch(Searcher):
    """One searcher per category, asked in turn; each ends after ``num_samples`` trials of its category.

    A suggestion is its category's searcher's configuration with ``category`` added. Results go back to the searcher
    that suggested the trial. ``save`` / ``restore`` keep every category's searcher and counts (Tune calls them with
    each experiment checkpoint, on the searcher it unpickled from the experiment's creation).
    """

    def __init__(self, searchers: Mapping[str, Searcher], num_samples: int, metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self.searchers = dict(searchers)
        self.num_samples = num_samples
        self.suggested = dict.fromkeys(self.searchers, 0)
        self.category_of: dict[str, str] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Each category's searcher was built with its metric, mode and space; nothing to set."""
        return False

    def suggest(self, trial_id: str) -> dict | str | None:
        """The next trial of the category with the fewest so far; ``FINISHED`` when every category has all of its."""
        waiting = sorted((name for name, count in self.suggested.items() if count < self.num_samples),
                         key=lambda name: self.suggested[name])
        for category in waiting:
            config = self.searchers[category].suggest(trial_id)
            if config == Searcher.FINISHED:  # this category's searcher has nothing more: the others go on
                self.suggested[category] = self.num_samples
                continue
            if config is None:  # it waits for results before suggesting again
                return None
            self.suggested[category] += 1
            self.category_of[trial_id] = category
            return {**config, CATEGORY_KEY: category}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.category_of:
            self.searchers[self.category_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.category_of:
            self.searchers[self.category_of[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """One JSON file: the counts, and each category's searcher as that searcher saves itself."""
        saved = {}
        with tempfile.TemporaryDirectory(prefix="bgad-searcher-") as folder:
            for name, searcher in self.searchers.items():
                path = Path(folder) / "state"
                searcher.save(str(path))
                saved[name] = base64.b64encode(path.read_bytes()).decode("ascii")
        state = {"suggested": self.suggested, "category_of": self.category_of, "searchers": saved}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        """Back to what ``save`` wrote; the searchers are those this one was built with (Tune rebuilds it first)."""
        state = json.loads(Path(checkpoint_path).read_text())
        self.suggested, self.category_of = state["suggested"], state["category_of"]
        with tempfile.TemporaryDirectory(prefix="bgad-searcher-") as folder:
            for name, saved in state["searchers"].items():
                path = Path(folder) / "state"
                path.write_bytes(base64.b64decode(saved))
                self.searchers[name].restore(str(path))


class CategoryScheduler(FIFOScheduler):
    """One scheduler per category: each trial's events go to its category's, so that early stopping compares a
    trial with the trials of its own category only. Which pending trial starts next is first come, first served
    (``FIFOScheduler``'s choice), whatever the category."""

    def __init__(self, schedulers: Mapping[str, TrialScheduler]) -> None:
        super().__init__()
        self.schedulers = dict(schedulers)

    def _of(self, trial: Any) -> TrialScheduler:
        return self.schedulers[trial.config[CATEGORY_KEY]]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values()])

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{name}: {s.debug_string()}" for name, s in self.schedulers.items())
