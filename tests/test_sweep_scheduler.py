"""ASHA compares trials only at meta-epochs their family may select (``sweeper.tuning.sweep.SelectableASHA``) and only
within a category (``sweeper.tuning.categories``); each category's study records its own trials and how each ended
(``SweepOptunaSearch``)."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from sweeper.tuning.categories import CategoryScheduler, CategorySearch
from sweeper.tuning.sweep import SelectableASHA, SweepOptunaSearch
from sweeper.tuning.trainable import CATEGORY_KEY, FAILED_KEY, PLATEAU_KEY, SELECTION_KEY, UNSELECTABLE

METRIC = "val_aupro"


def result(iteration: int, value: float, selectable: bool) -> dict:
    return {"training_iteration": iteration, METRIC: value, SELECTION_KEY: value if selectable else UNSELECTABLE}


def decisions(asha: ASHAScheduler) -> list[str]:
    """A one-pass trial's final fit at meta-epoch 1 (0.967), then a trial with a two-epoch warm-up whose
    unselectable epochs score lower (0.937, 0.94) and whose first selectable one scores 0.97."""
    fitted, warming = SimpleNamespace(trial_id="fitted"), SimpleNamespace(trial_id="warming")
    for trial in (fitted, warming):
        asha.on_trial_add(None, trial)
    asha.on_trial_result(None, fitted, result(1, 0.967, True))
    asha.on_trial_complete(None, fitted, result(1, 0.967, True))
    return [asha.on_trial_result(None, warming, result(i, v, i >= 3)) for i, v in ((1, 0.937), (2, 0.94), (3, 0.97))]


def test_a_warm_up_epoch_is_never_ranked_against_another_trials_result():
    asha = SelectableASHA(metric=METRIC, mode="max", max_t=4, grace_period=1, reduction_factor=2)
    assert decisions(asha) == [TrialScheduler.CONTINUE] * 3
    rungs = {milestone: dict(recorded) for milestone, recorded in asha._brackets[0]._rungs}
    assert rungs[1] == {"fitted": 0.967}
    assert rungs[2] == {"warming": 0.97}  # its first selectable epoch, at the highest rung not above it


def test_plain_asha_prunes_the_same_trial_in_its_warm_up():
    """What ``SelectableASHA`` is for: the same reports under Tune's ASHA stop the trial at meta-epoch 1."""
    asha = ASHAScheduler(metric=METRIC, mode="max", max_t=4, grace_period=1, reduction_factor=2)
    assert decisions(asha)[0] == TrialScheduler.STOP


def test_a_selectable_result_below_the_rung_is_still_pruned():
    asha = SelectableASHA(metric=METRIC, mode="max", max_t=4, grace_period=1, reduction_factor=2)
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, good, result(1, 0.9, True)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, result(1, 0.5, True)) == TrialScheduler.STOP


def study_search() -> SweepOptunaSearch:
    """A search over one number with an in-memory study, as ``sweeper.tuning.sweep.searcher`` makes them."""
    return SweepOptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric=METRIC,
                             mode="max", max_t=4, sampler=optuna.samplers.RandomSampler(seed=0))


def test_the_study_records_how_each_trial_ended():
    """ASHA-stopped: PRUNED, whatever its last value; the whole schedule or its plateau: COMPLETE; diverged: FAIL."""
    search = study_search()
    ended = {"pruned": {"training_iteration": 2, METRIC: 0.99},
             "full": {"training_iteration": 4, METRIC: 0.9},
             "plateau": {"training_iteration": 3, METRIC: 0.8, PLATEAU_KEY: 1.0},
             "diverged": {"training_iteration": 1, METRIC: float("nan"), FAILED_KEY: 1.0}}
    for trial_id, last in ended.items():
        search.suggest(trial_id)
        search.on_trial_result(trial_id, last)
        search.on_trial_complete(trial_id, last)
    states = {t.user_attrs["tune_trial_id"]: t.state for t in search._ot_study.trials}
    State = optuna.trial.TrialState
    assert states == {"pruned": State.PRUNED, "full": State.COMPLETE, "plateau": State.COMPLETE,
                      "diverged": State.FAIL}


def test_categories_take_turns_and_each_study_sees_its_own_trials(tmp_path):
    search = CategorySearch({"a": study_search(), "b": study_search()}, num_samples=2, metric=METRIC, mode="max")
    suggested = [search.suggest(f"t{i}") for i in range(5)]
    assert [config[CATEGORY_KEY] for config in suggested[:4]] == ["a", "b", "a", "b"]
    assert suggested[4] == Searcher.FINISHED
    for i, value in enumerate((0.1, 0.2, 0.3, 0.4)):
        search.on_trial_complete(f"t{i}", {"training_iteration": 4, METRIC: value})
    search.save(str(tmp_path / "searcher.json"))
    restored = CategorySearch({"a": study_search(), "b": study_search()}, num_samples=2, metric=METRIC, mode="max")
    restored.restore(str(tmp_path / "searcher.json"))
    assert {name: [t.value for t in s._ot_study.trials] for name, s in restored.searchers.items()} == \
        {"a": [0.1, 0.3], "b": [0.2, 0.4]}
    assert restored.suggest("t5") == Searcher.FINISHED


def test_asha_ranks_a_trial_only_among_its_own_categorys():
    """Category b's first trial scores far below category a's, on a harder category: it goes on."""
    asha = CategoryScheduler({name: SelectableASHA(metric=METRIC, mode="max", max_t=4, grace_period=1,
                                                   reduction_factor=2) for name in ("a", "b")})
    trials = [SimpleNamespace(trial_id=f"{name}{i}", config={CATEGORY_KEY: name}) for name in "ab" for i in (0, 1)]
    for trial in trials:
        asha.on_trial_add(None, trial)
    a0, a1, b0, b1 = trials
    assert asha.on_trial_result(None, a0, result(1, 0.95, True)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, b0, result(1, 0.60, True)) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, a1, result(1, 0.70, True)) == TrialScheduler.STOP
    assert asha.on_trial_result(None, b1, result(1, 0.50, True)) == TrialScheduler.STOP


def test_a_category_whose_searcher_has_no_more_leaves_the_others_going():
    class Exhausted(Searcher):
        def suggest(self, trial_id: str) -> str:
            return Searcher.FINISHED

    search = CategorySearch({"a": Exhausted(), "b": study_search()}, num_samples=2, metric=METRIC, mode="max")
    assert [search.suggest(f"t{i}")[CATEGORY_KEY] for i in range(2)] == ["b", "b"]
    assert search.suggest("t2") == Searcher.FINISHED
