"""The final choice among trials (``sweeper.tuning.selection``): which runners-up count as tied with the best on
validation, which tied configuration wins once trained again, and when a label-free twin replaces the chosen run.
The rules end to end: ``test_promote.py`` (reseed), ``test_sweep_job.py`` (label-free twin)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bgad_core.evaluation.intervals import bootstrap_distribution
from bgad_core.evaluation.metrics import compute_metrics
from sweeper.job.config import SelectionSpec
from sweeper.tuning.selection import choose, near_ties, reseed_applies


def resampled(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    return compute_metrics(labels, scores)["image_auroc"], bootstrap_distribution(labels, scores)["image_auroc"]


def test_a_runner_up_inside_the_best_ones_paired_interval_is_tied_and_one_outside_is_not():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 15)
    signal = labels * 1.0
    best = signal * 1.2 + rng.normal(0, 0.6, labels.size)
    close = best + rng.normal(0, 0.15, labels.size)  # errs on the same images, a little noisier
    poor = rng.normal(0, 1.0, labels.size)  # knows nothing
    measured = [resampled(labels, s) for s in (best, close, poor)]
    points, values = [m[0] for m in measured], [m[1] for m in measured]
    assert points[0] > points[2] + 0.2
    tied = near_ties(values, points, labels.size)
    assert tied == [0, 1]
    # the rule picks among candidates inside the best one's interval only
    chosen = choose({"best": [points[0]], "close": [points[1]]})
    assert chosen in {"best", "close"}


def test_the_tied_configuration_with_the_best_mean_wins_and_ties_go_to_the_better_ranked():
    assert choose({"a": [0.95, 0.80, 0.82], "b": [0.93, 0.91, 0.90]}) == "b"  # a's first run was the lucky one
    assert choose({"a": [0.9, 0.8], "b": [0.8, 0.9]}) == "a"


@pytest.mark.parametrize("rule, metric, categories, applies", [
    ("reseed", "val_aupro", 1, True),
    ("reseed", "val_image_auroc", 1, True),
    ("reseed", "val_pixel_aupr", 1, False),  # no bootstrap for it: argmax
    ("reseed", "val_aupro", 2, False),  # shared mode: one trial, several categories
    ("argmax", "val_aupro", 1, False),
])
def test_when_the_rule_runs(rule, metric, categories, applies):
    assert reseed_applies(SelectionSpec(rule=rule), metric, categories) is applies


def test_one_experiment_reruns_every_tied_configuration_under_every_seed():
    """Each re-run holds its trial's own params (another family's sub-space left out) and a new seed."""
    from ray.tune.search.variant_generator import generate_variants

    from sweeper.tuning.selection import RERUN_KEY, rerun_space
    from sweeper.tuning.trainable import split_params

    originals = {"a1": {"family": "bgad", "bgad": {"beta": 0.02, "num_anomalies": 3, "racp_depth": 1}},
                 "b2": {"family": "patchcore", "patchcore": {"num_neighbors": 1}}}
    runs = [config for _, config in generate_variants(rerun_space(originals, [1, 2]))]
    assert sorted((r[RERUN_KEY], r["seed"]) for r in runs) == [("a1", 1), ("a1", 2), ("b2", 1), ("b2", 2)]
    for run in runs:
        chosen, config, data = split_params({"num_anomalies": 10, "racp_depth": 3, **run})
        assert chosen.name == originals[run[RERUN_KEY]]["family"] and config.seed == run["seed"]
        if chosen.name == "bgad":
            assert config.beta == 0.02 and data == {"num_anomalies": 3, "racp_depth": 1}
        else:
            assert config.num_neighbors == 1 and data["num_anomalies"] == 0


@dataclass
class Finished:
    """What the selection reads of a Tune result: its params, last metrics and every reported selection score."""

    config: dict[str, Any]
    scores: list[float]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"selection_score": self.scores})


FIXED = {"family": "bgad", "num_anomalies": 10, "racp_depth": 3, "meta_epochs": 4}


def test_a_twin_repeats_the_configuration_and_seed_without_any_labelled_anomaly():
    """Also inside a family's own sub-space, which overrides the top level; a re-run's own key is not carried."""
    from ray.tune.search.variant_generator import generate_variants

    from sweeper.tuning.selection import RERUN_KEY, TWIN_KEY, label_free_twins
    from sweeper.tuning.trainable import merged_params, split_params

    chosen = {"a": Finished({"family": "bgad", "bgad": {"beta": 0.02, "num_anomalies": 3, "racp_depth": 1},
                             "category": "a"}, [0.7], {"trial_id": "t1"}),
              "b": Finished({"beta": 0.05, "seed": 2, RERUN_KEY: "t0", "category": "b"}, [0.6], {"trial_id": "t2"}),
              "c": Finished({"family": "patchcore", "patchcore": {"num_neighbors": 1}}, [0.9], {"trial_id": "t3"}),
              "d": Finished({"num_anomalies": 0, "category": "d"}, [0.5], {"trial_id": "t4"})}
    spaces = []

    def train_twins(space):
        spaces.append(space)
        return [Finished(config, [0.1], {"trial_id": f"twin-{config[TWIN_KEY]}"})
                for _, config in generate_variants(space)]

    twins = label_free_twins(chosen, FIXED, train_twins)
    assert len(spaces) == 1 and set(twins) == {"a", "b"}  # one experiment; no labels read by c (one-class) or d
    for group, twin in twins.items():
        assert twin.metrics["trial_id"] == f"twin-{chosen[group].metrics['trial_id']}" and RERUN_KEY not in twin.config
        _, config, data = split_params(merged_params(FIXED, twin.config))
        _, original, original_data = split_params(merged_params(FIXED, chosen[group].config))
        assert data == {**original_data, "num_anomalies": 0} and original_data["num_anomalies"] > 0
        assert config == original and twin.config["category"] == group
    assert label_free_twins({"c": chosen["c"]}, FIXED, train_twins) == {} and len(spaces) == 1


@pytest.mark.parametrize(("labelled", "twin", "deployed"), [
    ([-1.0, 0.80, 0.84], [-1.0, 0.83], False),  # the labelled run's best epoch counts, not its last
    ([0.80], [0.80], False),  # a tie keeps the labelled run
    ([0.80], [0.81], True),
    ([0.80], [float("nan")], False),  # the twin failed
    ([-1.0], [0.55], True),  # the labelled run never reached a selectable epoch
])
def test_the_twin_is_deployed_only_when_its_best_validation_figure_is_higher(labelled, twin, deployed):
    from sweeper.tuning.selection import label_free_choice

    run, twin_run = Finished({}, labelled, {"trial_id": "t1"}), Finished({}, twin, {"trial_id": "t2"})
    chosen, record = label_free_choice(run, twin_run)
    assert (chosen is twin_run) is deployed and record["deployed"] is deployed
    assert record["trial_id"] == "t2" and record["labelled_trial_id"] == "t1"
