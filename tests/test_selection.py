"""The final choice among trials (``sweeper.tuning.selection``): which runners-up count as tied with the best on
validation, which tied configuration wins once trained again, and when a label-free twin replaces the chosen run.
The rules end to end: ``test_promote.py`` (reseed), ``test_sweep_job.py`` (label-free twin)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from bgad_core.evaluation.intervals import bootstrap_distribution
from bgad_core.evaluation.metrics import compute_metrics
from sweeper.job.config import SelectionSpec
from sweeper.tuning.selection import choose, near_ties, reseed_applies
from ray_processes import REPO


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
    ("reseed", "val_aupro_image_auroc_mean", 1, True),
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


def test_the_follow_up_runs_are_each_groups_paper_default_and_the_label_free_twin_of_each_labelled_choice():
    """A twin repeats its chosen run's configuration and seed with no labelled anomaly, also inside a family's own
    sub-space (which overrides the top level); a chosen run that read no label (one-class, or none drawn) has none.
    All share one param space, each run resolving to its own params."""
    from ray.tune.search.variant_generator import generate_variants

    from sweeper.job.config import SweepConfig
    from sweeper.tuning.selection import RERUN_KEY, repeat_space
    from sweeper.tuning.sweep import FOLLOW_UP_KEY, PAPER_DEFAULT, fixed_params, follow_up_runs
    from sweeper.tuning.trainable import merged_params, split_params

    config = SweepConfig.model_validate(yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text()))
    fixed = fixed_params(config)
    chosen = {"a": Finished({"family": "bgad", "bgad": {"beta": 0.02, "num_anomalies": 3, "racp_depth": 0},
                             "category": "a"}, [0.7]),
              "b": Finished({"family": "bgad", "bgad": {"beta": 0.05}, "seed": 2, RERUN_KEY: "t0", "category": "b"},
                            [0.6]),
              "c": Finished({"family": "patchcore", "patchcore": {"coreset_ratio": 0.1}, "category": "c"}, [0.9]),
              "d": Finished({"family": "bgad", "bgad": {"num_anomalies": 0}, "category": "d"}, [0.5])}
    runs = follow_up_runs(config, chosen, shared=False)
    assert set(runs) == {f"paper_default/{g}" for g in chosen} | {"label_free_twin/a", "label_free_twin/b"}
    resolved = {run[FOLLOW_UP_KEY]: run for _, run in generate_variants(repeat_space(runs, FOLLOW_UP_KEY))}
    assert set(resolved) == set(runs) and all(RERUN_KEY not in run or run[RERUN_KEY] is None for run in resolved.values())
    for group in ("a", "b"):
        _, twin, data = split_params(merged_params(fixed, resolved[f"label_free_twin/{group}"]))
        _, original, original_data = split_params(merged_params(fixed, chosen[group].config))
        assert twin == original and data == {**original_data, "num_anomalies": 0} and original_data["num_anomalies"]
        assert resolved[f"label_free_twin/{group}"]["category"] == group
    assert split_params(merged_params(fixed, resolved["label_free_twin/b"]))[1].seed == 2
    for group in chosen:
        family, paper, data = split_params(merged_params(fixed, resolved[f"paper_default/{group}"]))
        assert family.name == "bgad" and paper.beta == PAPER_DEFAULT["beta"] and paper.image_score == "max"
        assert resolved[f"paper_default/{group}"]["category"] == group and data["num_anomalies"] > 0
    shared = follow_up_runs(config, {"shared": Finished({"family": "bgad", "bgad": {"num_anomalies": 2}}, [0.7])},
                            shared=True)  # one group whose runs train every category: no category param
    assert set(shared) == {"paper_default/shared", "label_free_twin/shared"}
    assert all("category" not in run for run in shared.values())
    config.tune.selection.label_free_twin = False
    config.search.compare_paper_default = False
    assert follow_up_runs(config, chosen, shared=False) == {}


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
