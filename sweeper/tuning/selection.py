"""The final choice among a category's trials: the best validation figure, or the near-ties trained again.

A sweep ranks its trials on a validation split of a few dozen images, where an AUROC's standard error is about
0.05: the best validation figure among many trials is as much the luckiest as the best. On a held-out medical set
validation ranked PatchCore above BGAD-FAS (0.860 against 0.807) and test ranked them the other way (0.827
against 0.874). ``tune.selection.rule`` says how the final choice treats that noise:

- ``argmax``: the trial with the best validation objective (its best selectable epoch), as it is.
- ``reseed``:

  1. the top ``max_candidates`` trials are scored on validation again from their checkpoints;
  2. a candidate is *tied* with the best when the paired 95 % bootstrap interval of their difference over the same
     validation images holds 0 (``bgad_core.evaluation.intervals.compare_paired``);
  3. each tied candidate (the best included) is trained again with ``seeds`` more seeds, nothing else changed;
  4. the configuration whose runs average highest on validation wins, ties going to the better-ranked: its
     original run and every re-seeded run but the last count (with ``seeds: 1``, the original alone);
  5. that configuration's last re-seeded run, which took no part in the choice, is the one deployed and tested.

  Without a tie nothing is trained again and the choice is the argmax's. What it cannot fix: the validation images
  are the same for every run (their sampling noise stays). What step 5 fixes: the deployed run's validation figure
  is an honest estimate of its configuration (only its own epoch was chosen on it). The first version deployed the
  first re-seeded run, whose figure had counted in the mean that chose it: on BrainMRI its optimism (validation
  minus test) was twice argmax's, a lucky fresh run both winning the choice and being deployed. An objective without a bootstrap (``pixel_aupr``, ``pixel_f1_max``) or a ``shared``-mode sweep (one
  trial, several categories) keeps the argmax.

  Measured (``benchmarks/bench_selection.py``, BENCHMARKS.md "Noise-aware selection against argmax") over 5 sweep
  seeds on MTD-200 and on BrainMRI, against argmax, for 63 % and 72 % more trial-time: mean test image AUROC
  +0.003 and -0.017 (the first version: +0.006 and -0.019), optimism +0.036 and +0.079 against argmax's +0.037 and
  +0.047 (the first version's: +0.026 and +0.102). ``argmax`` stays the default and ``reseed`` is opt-in.

Whatever the rule, ``tune.selection.label_free_twin`` (on by default) then guards what the labels did: a chosen run
that trained on labelled anomalies is trained once more with the same configuration and seed but none of them
(``without_labels``), and that twin is deployed instead where its best validation figure is higher
(``label_free_choice``). So the deployed model is never worse on validation than its own training without labels
would have been. Labels usually help (on all six shared datasets as they come they raised the selected validation
figure by 0.03-0.15), but image-level ones can hurt: one lowered test image AUROC from 0.843 to 0.826 on held-out
solar cells, and MTD-200 read without masks scored 0.035 lower validation PRO with its labels than without (test PRO
0.657 against 0.700; BENCHMARKS.md, "Labels that never hurt"). It costs one trial per category, in the sweep's
follow-up experiment (``sweeper.tuning.sweep``). Ties keep the labelled run: it was chosen among many trials, the
twin is one run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from ray import tune

from bgad_core.engine.checkpoint import detector_from_checkpoint
from bgad_core.evaluation.intervals import IMAGE_METRICS, PIXEL_METRICS, bootstrap_distribution, compare_paired
from bgad_core.evaluation.metrics import PRO_AND_IMAGE_AUROC
from bgad_core.models.base import evaluate
from sweeper.cache.reader import read_features
from sweeper.job.config import SelectionSpec
from sweeper.tuning.trainable import SELECTION_KEY, UNSELECTABLE, merged_params, saved_model, split_params

MODE = "max"


def reseed_applies(spec: SelectionSpec, metric: str, categories: int) -> bool:
    """Whether the ``reseed`` rule runs: asked for, one category per trial, an objective the bootstrap resamples."""
    resampled = (*IMAGE_METRICS, *PIXEL_METRICS, PRO_AND_IMAGE_AUROC)
    return spec.rule == "reseed" and categories == 1 and metric.removeprefix("val_") in resampled


def best_selectable(result: tune.Result) -> float | None:
    """A trial's best ``selection_score`` over its selectable epochs (None: it reported none, e.g. pruned in BGAD's
    phase 1)."""
    history = result.metrics_dataframe
    values = [] if history is None or SELECTION_KEY not in history else history[SELECTION_KEY].dropna().tolist()
    values = [v for v in values if v != UNSELECTABLE]
    return float(max(values)) if values else None


def ranked(results: Sequence[tune.Result], limit: int) -> list[tune.Result]:
    """The ``limit`` trials with the highest best selectable validation objective, best first (the order Tune's
    ``get_best_result`` would give)."""
    scored = [(value, i, r) for i, r in enumerate(results) if (value := best_selectable(r)) is not None
              and np.isfinite(value)]
    return [r for _, _, r in sorted(scored, key=lambda item: (-item[0], item[1]))[:limit]]


def near_ties(values: Sequence[np.ndarray], points: Sequence[float], images: int) -> list[int]:
    """Indices of the candidates whose paired interval against candidate 0 (the best) holds 0, 0 included.

    ``values``: each candidate's bootstrap values of the objective on the same resamples of the same images;
    ``points``: their point estimates; ``images``: the split's size.
    """
    return [0] + [i for i in range(1, len(values))
                  if compare_paired(values[0], values[i], points[0] - points[i], images).verdict == "undecided"]


def choose(runs: Mapping[str, Sequence[float]]) -> str:
    """The candidate (insertion order = rank) whose runs' validation figures have the highest mean; the first on a
    tie."""
    means = {trial: float(np.mean(values)) for trial, values in runs.items()}
    return max(means, key=lambda trial: (means[trial], -list(means).index(trial)))


def validation_bootstrap(result: tune.Result, manifest: Mapping[str, Any], category: str,
                         metric: str) -> tuple[float, np.ndarray, int]:
    """A trial's best checkpoint on ``category``'s validation split again: the objective, its bootstrap values, the
    split's size."""
    checkpoint = result.get_best_checkpoint(SELECTION_KEY, MODE) or result.checkpoint
    val = read_features(manifest, category, ["val"])
    evaluation = evaluate(detector_from_checkpoint(saved_model(checkpoint, category)), val)
    masks = val.pixel_masks
    resampled = bootstrap_distribution(val.labels, evaluation.scores, masks,
                                       None if masks is None else evaluation.maps)
    key = metric.removeprefix("val_")
    return best_selectable(result), resampled[key], len(val)


RERUN_KEY = "reseed_of"  # a re-run's param naming the trial whose configuration it repeats


def repeat_space(originals: Mapping[str, Mapping[str, Any]], key: str) -> dict[str, Any]:
    """One Tune param space with a run per entry of ``originals`` (trial id: the params that run holds), the trial
    id its param ``key``.

    Tune has no grid over whole configurations, so the trial is a grid value and each of its params is looked up
    from it (``tune.sample_from``); a param another entry has and this one lacks (another family's sub-space)
    resolves to None, which the trainable leaves out.
    """
    keys = sorted({name for params in originals.values() for name in params} - {key})
    def value(name: str) -> Any:
        return tune.sample_from(lambda config: originals[config[key]].get(name))
    return {key: tune.grid_search(list(originals)), **{name: value(name) for name in keys}}


def rerun_space(originals: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One Tune param space for every re-run: a grid over (trial, seed), each run holding that trial's params."""
    return {**repeat_space(originals, RERUN_KEY), "seed": tune.grid_search(list(seeds))}


def reseeded_choice(
    results: Sequence[tune.Result], spec: SelectionSpec, manifest: Mapping[str, Any], category: str, metric: str,
    train_again: Callable[[dict[str, Any]], tune.ResultGrid],
) -> tuple[tune.Result, dict[str, Any]]:
    """The ``reseed`` rule on one category's finished trials: the run to deploy and what the summary records.

    ``train_again(param_space)`` runs (or resumes) the one experiment of every re-run (``rerun_space``).
    """
    candidates = ranked(results, spec.max_candidates)
    measured = [validation_bootstrap(r, manifest, category, metric) for r in candidates]
    tied = near_ties([values for _, values, _ in measured], [point for point, _, _ in measured], measured[0][2])
    ids = [str(r.metrics.get("trial_id")) for r in candidates]
    record: dict[str, Any] = {"rule": "reseed", "candidates": ids, "tied": [ids[i] for i in tied]}
    if len(tied) == 1:
        return candidates[0], {**record, "chosen": ids[0], "reason": "no tie: argmax"}
    seeds = list(range(1, spec.seeds + 1))
    reruns = train_again(rerun_space({ids[i]: dict(candidates[i].config) for i in tied}, seeds))
    runs: dict[str, list[float]] = {}
    held_out: dict[str, tuple[tune.Result, float]] = {}
    for rank in tied:
        trial = ids[rank]
        own = sorted((r for r in reruns if r.config.get(RERUN_KEY) == trial), key=lambda r: r.config.get("seed", 0))
        selectable = [(r, v) for r in own if (v := best_selectable(r)) is not None and np.isfinite(v)]
        # every re-run diverged: the original is all there is, chosen on and deployed
        held_out[trial] = selectable[-1] if selectable else (candidates[rank], measured[rank][0])
        runs[trial] = [measured[rank][0], *(v for _, v in selectable[:-1])]
    winner = choose(runs)
    deployed, honest = held_out[winner]
    return deployed, {**record, "runs": runs, "held_out": {trial: value for trial, (_, value) in held_out.items()},
                      "chosen": winner, "deployed": deployed.metrics.get("trial_id"), "deployed_val": honest,
                      "reason": f"best mean of up to {len(seeds)} runs among {len(tied)} tied; a held-out run deployed"}


LABELS_KEY = "num_anomalies"  # the data selection's count of labelled anomalies (``sweeper.tuning.trainable``)


def without_labels(params: Mapping[str, Any]) -> dict[str, Any]:
    """A run's params with no labelled anomaly: ``num_anomalies`` 0 at the top and in a family's own sub-space
    (which overrides the top, ``trainable.split_params``); the rest, seed included, unchanged (a re-run's own key
    left out)."""
    twin = {key: {**value, LABELS_KEY: 0} if isinstance(value, Mapping) and LABELS_KEY in value else value
            for key, value in params.items() if key != RERUN_KEY}
    twin[LABELS_KEY] = 0
    return twin


def trained_on_labels(result: tune.Result, fixed: Mapping[str, Any]) -> bool:
    """Whether the run read labelled anomalies: a few-shot family with ``num_anomalies`` above 0 (``fixed``: the
    values its params were merged with)."""
    return split_params(merged_params(fixed, result.config))[2][LABELS_KEY] > 0


def label_free_choice(labelled: tune.Result, twin: tune.Result) -> tuple[tune.Result, dict[str, Any]]:
    """The run to deploy, the labelled one or its label-free twin, and what the summary records.

    The twin replaces it only with a strictly higher best selectable validation objective; a twin that reported
    none (it failed) never does, a labelled run that reported none always is replaced by a twin that did.
    """
    labelled_val, twin_val = best_selectable(labelled), best_selectable(twin)
    deployed = twin_val is not None and np.isfinite(twin_val) and (
        labelled_val is None or not np.isfinite(labelled_val) or twin_val > labelled_val)
    record = {"trial_id": twin.metrics.get("trial_id"), "labelled_trial_id": labelled.metrics.get("trial_id"),
              "val": twin_val, "labelled_val": labelled_val, "deployed": bool(deployed)}
    return (twin if deployed else labelled), record
