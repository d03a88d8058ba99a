"""The final choice among trials (``sweeper.tuning.selection``): which runners-up count as tied with the best on
validation, and which tied configuration wins once trained again. The rule end to end: ``test_promote.py``."""

from __future__ import annotations

import numpy as np
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
