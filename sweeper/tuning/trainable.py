"""The Ray Tune trainable: train a detector of any family from the feature cache and report every meta-epoch.

Thin by design: data comes from ``sweeper.cache.reader`` (no backbone here, ever), the family, its training and
scoring from ``bgad_core`` (``models.registry``: the trial's ``family`` parameter names it); this module only wires
them to ``ray.tune.report`` checkpoints and the trial's MLflow child run.
A trial trains one category (``per_category`` mode: the one its ``category`` parameter names) or every category
of the sweep with one configuration (``shared`` mode, objective = mean over categories).

Faults. A trial killed mid-way (worker process, node, driver) restarts from its last checkpoint: trainer state
(weights, optimizer, epoch, sampling stream) and its MLflow run id, so it continues the same run and never logs a
meta-epoch twice. The plateau rule's count (``bgad_core.engine.stopping``) is part of that checkpointed state, so a
resumed trial stops where an uninterrupted one would. A diverging loss (NaN/inf) is not a fault but an outcome of
the configuration: the trial ends at once with ``failed`` in its last result (see ``_end_diverged``) instead of
raising, so Tune's retries stay reserved for infrastructure faults and the sweep goes on with the other trials.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from bgad_core.data.features import FeatureSet
from bgad_core.engine.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from bgad_core.engine.selection import decision_threshold, seed_everything
from bgad_core.engine.stopping import PlateauConfig, PlateauRule
from bgad_core.errors import TrainingDivergedError
from bgad_core.evaluation.intervals import bootstrap_distribution, interval_metrics, percentile_interval
from bgad_core.models.base import ONE_CLASS, DetectorConfig, Evaluation, Family, Training
from bgad_core.models.registry import DEFAULT_FAMILY, config_for, family
from sweeper.tracking import plots, mlflow_runs as tracking
from sweeper.cache.reader import load_image_at, open_cache, read_features, row_paths
from sweeper.tuning.fit_store import REUSED_TAG, fetch_fit, fit_key, save_fit

log = logging.getLogger(__name__)

DATA_KEYS = ("num_anomalies", "racp_depth")  # searched like hyperparameters, but select cached rows
FAMILY_KEY = "family"  # the trial's detector family (``bgad_core.models.registry``)
CATEGORY_KEY = "category"  # the one category a trial trains where its experiment searches several (``categories``)
SCHEDULE_END_KEY = "schedule_end"  # 1.0 in the result of the family's last meta-epoch (PatchCore: its first)
# The objective where the epoch may be selected, -1 where it may not (BGAD's phase 1): every objective lies in [0, 1].
# Tune keeps each trial's checkpoint by it and the sweep picks the best trial by it, the rule ``bgad_core.train``
# applies (``engine.selection``).
SELECTION_KEY = "selection_score"
UNSELECTABLE = -1.0
FAILED_KEY = "failed"  # 1.0 in the last result of a trial whose training diverged (its objective is NaN)
FAILURE_TAG = "bgad.failure"  # MLflow tag with the reason a trial failed
PLATEAU_KEY = "plateau_stop"  # 1.0 in the result of the meta-epoch after which the plateau rule ends the trial
PLATEAU_STALE_KEY = "plateau_stale"  # meta-epochs since the validation objective last gained more than min_delta
STATE_FILE = "trial_state.json"
TRAINER_FILE = "trainer.pt"
MODEL_FILE = "model.pt"
OVERLAY_IMAGES = 6


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one Tune experiment shares (passed with ``tune.with_parameters``).

    Attributes:
        sweep_id: id of the sweep (MLflow tag, study name prefix).
        cache_uri: the feature cache (any pyarrow URI reachable from the trial's node).
        categories: the categories one trial trains (all of them in ``shared`` mode); a trial whose params name its
            ``category`` trains that one.
        fixed: training values not searched (``family``, fields of any family's config, ``num_anomalies`` and
            ``racp_depth``); each trial keeps those of its family.
        objective: reported metric the sweep maximises (e.g. ``val_aupro``).
        tracking: MLflow location and parent run, or None to log nothing.
        log_plots: log anomaly-map overlays, histograms and ROC/PR curves at the last meta-epoch.
        threads: torch CPU threads (the trial's CPU share).
        device: "cuda" when the trial holds a GPU, else "cpu".
        plateau: when a trial has stopped gaining (``tune.plateau``; the sweep's Tune stopper acts on the verdict).
        fits_uri: where trials of single-pass families store and reuse their fits (``sweeper.tuning.fit_store``); None to
            fit every time.
    """

    sweep_id: str
    cache_uri: str
    categories: tuple[str, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    objective: str = "val_image_auroc"
    tracking: tracking.Tracking | None = None
    log_plots: bool = True
    threads: int = 1
    device: str = "cpu"
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    fits_uri: str | None = None


def merged_params(fixed: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's searched ``params`` over the ``fixed`` values; a None param (one that another run of a re-run's
    or twin's experiment has and this one lacks, ``sweeper.tuning.selection.repeat_space``) leaves the fixed value."""
    return {**fixed, **{key: value for key, value in params.items() if value is not None}}


def split_params(params: Mapping[str, Any]) -> tuple[Family, DetectorConfig, dict[str, int]]:
    """A trial's family, its config and the data selection (n anomalies, depth S; none for a one-class family).

    ``params``: fixed values merged with the searched ones. A conditional search (``search.families``) gives the
    family's own parameters as a nested mapping under its name (``{"family": "bgad", "bgad": {"beta": ...}}``);
    they override the fixed ones. Values of other families' fields are left out.
    """
    chosen = family(str(params.get(FAMILY_KEY, DEFAULT_FAMILY)))
    # None: a param of another candidate's sub-space in a re-run (``sweeper.tuning.selection.rerun_space``)
    flat = {k: v for k, v in params.items() if not isinstance(v, Mapping) and v is not None}
    flat.update(params.get(chosen.name) or {})
    data = {k: int(flat[k]) for k in DATA_KEYS}
    if chosen.learning_type == ONE_CLASS:
        data["num_anomalies"] = 0  # it reads no anomaly: none are loaded
    return chosen, config_for(chosen.name, flat), data


def trial_params(chosen: Family, config: DetectorConfig, data: Mapping[str, int]) -> dict[str, Any]:
    """What the trial's MLflow run records: its family, its config and (few-shot families) the data selection."""
    values: dict[str, Any] = {FAMILY_KEY: chosen.name, **config.to_dict()}
    if chosen.learning_type != ONE_CLASS:
        values.update(data)
    return values


@dataclass
class _CategoryRun:
    """One category's trainer and validation rows inside a trial."""

    name: str
    training: Training
    val: FeatureSet
    last: Evaluation | None = None
    intervals: dict[str, float] = field(default_factory=dict)  # ``<metric>_lo`` / ``_hi`` of ``last``


def train_detector(params: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: ``params`` are the searched values, everything else comes from ``context``."""
    if params.get(CATEGORY_KEY) is not None:  # one of several categories searched in the same experiment
        context = replace(context, categories=(str(params[CATEGORY_KEY]),))
    torch.set_num_threads(max(1, context.threads))
    chosen, config, data = split_params(merged_params(context.fixed, params))
    seed_everything(config.seed)
    manifest = open_cache(context.cache_uri)
    image_size = (manifest["image_size"], manifest["image_size"])
    restored = tune.get_checkpoint()
    reuse = None
    if chosen.single_pass and context.fits_uri is not None and restored is None:
        reuse = fit_key(chosen.name, config.to_dict(), data, context.categories, manifest["key"])
        if _report_stored_fit(context, reuse, chosen, config, data):
            return
    runs = [_prepare(manifest, name, chosen, config, data, context.device) for name in context.categories]
    meta_epochs = runs[0].training.meta_epochs
    first_selectable = min(runs[0].training.first_selectable_epoch, meta_epochs)

    plateau = PlateauRule(context.plateau, first_selectable)
    state: dict[str, Any] = {"mlflow_run_id": None, "plateau": plateau.state_dict()}
    if restored is not None:
        with restored.as_directory() as folder:
            state = json.loads((Path(folder) / STATE_FILE).read_text())
            for run in runs:
                run.training.load_state_dict(torch.load(Path(folder) / run.name / TRAINER_FILE, weights_only=True))
        plateau.load_state_dict(state["plateau"])
        log.info("resumed from meta-epoch %d", runs[0].training.epoch)

    client, run_id = _trial_run(context, state["mlflow_run_id"], chosen, config, data)
    state["mlflow_run_id"] = run_id
    logged_until = 0
    if client is not None and restored is not None:
        logged_until = _last_logged_step(client, run_id, context.objective)

    try:
        # a trial resumed from the checkpoint of its plateau (stopped before Tune recorded the stop) trains no more
        while runs[0].training.epoch < meta_epochs and not plateau.stopped:
            metrics = _meta_epoch(runs, image_size, context.objective)
            metrics["node_id"] = ray.get_runtime_context().get_node_id()  # where the trial ran (multi-node audits)
            epoch = runs[0].training.epoch
            plateaued = _record_plateau(plateau, state, metrics, epoch, context.objective)
            metrics[SCHEDULE_END_KEY] = float(epoch == meta_epochs)
            final = epoch == meta_epochs or plateaued
            value = metrics.get(context.objective)
            metrics[SELECTION_KEY] = (float("nan") if value is None else float(value)) if epoch >= first_selectable \
                else UNSELECTABLE
            improved = _record_best(state, metrics[SELECTION_KEY])
            if improved:  # the checkpoint the sweep may test and promote also gets pixel-metric intervals
                metrics.update(_validation_intervals(runs, pixels=True))
            with tempfile.TemporaryDirectory(prefix="bgad-ckpt-") as folder:
                _write_checkpoint(Path(folder), runs, manifest, state)
                if client is not None:
                    if epoch > logged_until:
                        tracking.log_metrics(client, run_id, metrics, step=epoch)
                    if improved:  # the run keeps its best-validation checkpoint, the one the sweep tests
                        client.log_artifacts(run_id, folder, artifact_path="checkpoint")
                    if final and context.log_plots:
                        _log_plots(client, run_id, runs, manifest)
                if reuse is not None and final:
                    save_fit(context.fits_uri, reuse, Path(folder), metrics)
                tune.report({**metrics, "mlflow_run_id": run_id}, checkpoint=tune.Checkpoint.from_directory(folder))
    except TrainingDivergedError as error:
        _end_diverged(error, client, run_id, context.objective)
        return
    if client is not None:
        tracking.with_retry(lambda: client.set_terminated(run_id, status="FINISHED"))


def _trial_run(context: TrialContext, run_id: str | None, chosen: Family, config: DetectorConfig,
               data: Mapping[str, int]) -> tuple[Any, str | None]:
    """The trial's MLflow client and child run (``run_id`` when resuming one), its params logged; (None, None)
    when the sweep logs nothing."""
    if context.tracking is None:
        return None, None
    client = context.tracking.client()
    trial = tune.get_context()
    run_id = run_id or tracking.start_child_run(
        context.tracking, trial.get_trial_id(), trial.get_trial_name(),
        {tracking.SWEEP_TAG: context.sweep_id, tracking.CATEGORY_TAG: ",".join(context.categories),
         tracking.FAMILY_TAG: chosen.name},
    )
    tracking.log_params(client, run_id, trial_params(chosen, config, data))
    return client, run_id


def _report_stored_fit(context: TrialContext, key: str, chosen: Family, config: DetectorConfig,
                       data: Mapping[str, int]) -> bool:
    """Report the stored fit ``key`` as this trial's only result (``sweeper.tuning.fit_store``); False when there is none."""
    with tempfile.TemporaryDirectory(prefix="bgad-ckpt-") as folder:
        metrics = fetch_fit(context.fits_uri, key, Path(folder))
        if metrics is None:
            return False
        client, run_id = _trial_run(context, None, chosen, config, data)
        (Path(folder) / STATE_FILE).write_text(json.dumps({"mlflow_run_id": run_id, "reused_fit": key}))
        log.info("same %s fit as an earlier trial (%s): its result is reused", chosen.name, key)
        if client is not None:
            tracking.set_tags(client, run_id, {REUSED_TAG: key})
            tracking.log_metrics(client, run_id, metrics, step=1)  # a single-pass family's one meta-epoch
            client.log_artifacts(run_id, folder, artifact_path="checkpoint")
            tracking.with_retry(lambda: client.set_terminated(run_id, status="FINISHED"))
        tune.report({**metrics, "mlflow_run_id": run_id}, checkpoint=tune.Checkpoint.from_directory(folder))
    return True


def _record_plateau(plateau: PlateauRule, state: dict[str, Any], metrics: dict[str, Any], epoch: int,
                    objective: str) -> bool:
    """Feed the meta-epoch's objective to the plateau rule; its state goes into ``state`` (the checkpoint) and its
    verdict into ``metrics`` (the result the sweep's stopper reads). True when the trial ends after this epoch."""
    value = metrics.get(objective)
    plateaued = plateau.update(epoch, None if value is None else float(value))
    state["plateau"] = plateau.state_dict()
    metrics[PLATEAU_STALE_KEY] = plateau.stale
    metrics[PLATEAU_KEY] = float(plateaued)
    return plateaued


def ran_its_course(result: Mapping[str, Any], max_t: int) -> bool:
    """Whether a trial's last result ends it unpruned: all ``max_t`` meta-epochs (or its family's whole schedule,
    one for PatchCore) trained, or stopped at its plateau."""
    return (result.get("training_iteration", 0) >= max_t or bool(result.get(SCHEDULE_END_KEY))
            or bool(result.get(PLATEAU_KEY)))


def _record_best(state: dict[str, Any], value: float | None) -> bool:
    """Keep the best validation objective so far in ``state``; True at the first epoch and on strict improvement."""
    value = float("nan") if value is None else float(value)
    best = state.get("best_objective")
    improved = best is None or (value == value and (best != best or value > best))
    if improved:
        state["best_objective"] = value
    return improved


def _last_logged_step(client: Any, run_id: str, metric: str) -> int:
    """The last meta-epoch the run has metrics for.

    An attempt killed after logging a meta-epoch but before Tune registered its checkpoint left that step in MLflow;
    the resumed attempt trains it again and must not log it a second time.
    """
    history = tracking.with_retry(lambda: client.get_metric_history(run_id, metric))
    return max((m.step for m in history), default=0)


def _end_diverged(error: TrainingDivergedError, client: Any, run_id: str | None, objective: str) -> None:
    """End a trial whose loss became NaN/inf as failed, without raising.

    Training is seeded and resumes from the same checkpoint, so a retry would diverge again: raising would spend
    ``tune.max_failures`` retries (meant for lost workers and nodes) on a property of the hyperparameters. The
    reason goes to the console (the worker's log, forwarded by Ray) and to the MLflow run (tag ``bgad.failure``,
    status FAILED); the last result carries ``failed`` and a NaN objective, which the sweep's searcher records as an
    Optuna FAIL and which never wins the best-trial selection.
    """
    reason = f"training diverged: {error}"
    log.error("trial failed: %s", reason)
    if client is not None:
        tracking.set_tags(client, run_id, {FAILURE_TAG: reason})
        tracking.with_retry(lambda: client.set_terminated(run_id, status="FAILED"))
    tune.report({objective: float("nan"), FAILED_KEY: 1.0, "failure": reason})


def _prepare(manifest: dict, category: str, chosen: Family, config: DetectorConfig, data: dict[str, int],
             device: str) -> _CategoryRun:
    train = read_features(manifest, category, ["train"], num_anomalies=data["num_anomalies"], depth=data["racp_depth"])
    val = read_features(manifest, category, ["val"])
    strides = [level["stride"] for level in manifest["levels"]]
    return _CategoryRun(category, chosen.training(config, train, strides, device), val)


def _meta_epoch(runs: list[_CategoryRun], image_size: tuple[int, int], objective: str) -> dict[str, float]:
    """Train every category one meta-epoch and evaluate on validation; metrics are means over categories, with the
    image metrics' 95 % intervals (``val_<metric>_lo`` / ``_hi``, see ``_validation_intervals``).

    Each category's scoring choices (made on its validation where "auto": ``Normalization.choice_metrics``, e.g.
    ``coarse_level_weight``) are reported too, per category (``<name>/coarse_level_weight``) when the trial trains
    several.
    """
    per_category: dict[str, dict[str, float]] = {}
    losses, phase = [], 1
    for run in runs:
        epoch = run.training.train_meta_epoch()
        losses.append(epoch["loss"])
        phase = int(epoch.get("phase", 1))
        run.last = run.training.validate(run.val, image_size, objective.removeprefix("val_"))
        per_category[run.name] = run.last.metrics
    keys = sorted(set.intersection(*(set(m) for m in per_category.values())))
    metrics = {f"val_{k}": float(np.nanmean([m[k] for m in per_category.values()])) for k in keys}
    metrics.update(_validation_intervals(runs, pixels=False))
    metrics["train_loss"] = float(np.mean(losses))
    # the loss changes meaning at the phase switch (likelihood of normals -> BG-SPP): one curve per phase in MLflow
    metrics[f"train_loss_phase{phase}"] = metrics["train_loss"]
    choices = {run.name: run.last.choices for run in runs}
    if len(runs) > 1:
        for name, values in per_category.items():
            metrics.update({f"{name}/val_{k}": v for k, v in values.items()})
            metrics.update({f"{name}/{k}": v for k, v in choices[name].items()})
    else:
        metrics.update(choices[runs[0].name])
    return metrics


def _validation_intervals(runs: list[_CategoryRun], pixels: bool) -> dict[str, float]:
    """95 % intervals of the validation metrics (``bgad_core.evaluation.intervals``) as ``val_<metric>_lo`` / ``_hi``.

    Image metrics cost milliseconds and come every meta-epoch; pixel metrics (``pixels``) re-bin every map, so the
    trial asks for them only at a new best epoch. Each category's intervals are kept on its run (for its
    checkpoint); the trial's are those of the mean over categories, from the mean of their bootstrap distributions.
    """
    distributions = []
    for run in runs:
        masks = run.val.pixel_masks if pixels else None
        distribution = bootstrap_distribution(run.val.labels, run.last.scores, masks,
                                              None if masks is None else run.last.maps)
        run.intervals = interval_metrics({k: percentile_interval(v) for k, v in distribution.items()})
        distributions.append(distribution)
    keys = sorted(set.intersection(*(set(d) for d in distributions)))
    with warnings.catch_warnings():  # a metric undefined in every category: NaN, left out of the percentiles
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {k: np.nanmean([d[k] for d in distributions], axis=0) for k in keys}
    trial = interval_metrics({k: percentile_interval(v) for k, v in mean.items()})
    intervals = {f"val_{k}": v for k, v in trial.items()}
    if len(runs) > 1:
        intervals.update({f"{run.name}/val_{k}": v for run in runs for k, v in run.intervals.items()})
    return intervals


def saved_model(checkpoint: tune.Checkpoint, category: str) -> dict[str, Any]:
    """The servable model a trial checkpoint holds for ``category`` (``bgad_core.engine.checkpoint`` format)."""
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / category / MODEL_FILE)


def _write_checkpoint(folder: Path, runs: list[_CategoryRun], manifest: dict, state: dict) -> None:
    """Per category: the servable ``model.pt`` and the resumable ``trainer.pt``; plus the trial state."""
    backbone = {**manifest["backbone"], "channels": [level["channels"] for level in manifest["levels"]]}
    for run in runs:
        target = folder / run.name
        target.mkdir(parents=True)
        evaluation = run.last
        threshold = decision_threshold(evaluation, run.val.labels)
        checkpoint = make_checkpoint(
            evaluation.detector, backbone, threshold,
            {f"val_{k}": v for k, v in {**evaluation.metrics, **run.intervals}.items()}, run.training.epoch,
        )
        checkpoint["cache_key"] = manifest["key"]
        checkpoint["category"] = run.name
        save_checkpoint(checkpoint, target / MODEL_FILE)
        torch.save(run.training.state_dict(), target / TRAINER_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state))


def _log_plots(client: Any, run_id: str, runs: list[_CategoryRun], manifest: dict) -> None:
    """Diagnostics of the last meta-epoch: overlays, ROC and PR, and the family's training-score histogram with its
    boundaries where it has one (BGAD: log-likelihoods with b_n / b_a)."""
    with tempfile.TemporaryDirectory(prefix="bgad-plots-") as folder:
        for run in runs:
            evaluation, labels = run.last, run.val.labels.numpy()
            out = Path(folder) / run.name
            scores = evaluation.scores.numpy()
            plots.save_figure(plots.roc_pr_curves(labels, scores, title=f"{run.name} validation"), out / "roc_pr.png")
            distribution = run.training.score_distribution()
            if distribution is not None:
                figure = plots.score_histogram(distribution.normal, distribution.abnormal, distribution.boundaries,
                                               distribution.label)
                plots.save_figure(figure, out / "training_scores_hist.png")
            chosen = _overlay_rows(labels)
            paths = row_paths(manifest, run.name, [run.val.ids[i] for i in chosen])
            try:
                images = np.stack([load_image_at(paths[run.val.ids[i]], manifest["image_size"]) for i in chosen])
            except (OSError, ValueError, KeyError) as error:
                log.warning("no anomaly-map overlays for %s: %s", run.name, error)
                continue
            masks = None if run.val.pixel_masks is None else run.val.pixel_masks[chosen].numpy()
            figure = plots.anomaly_map_overlays(
                images, evaluation.maps[chosen].numpy(), masks, scores[chosen], labels[chosen]
            )
            plots.save_figure(figure, out / "anomaly_maps.png")
        client.log_artifacts(run_id, folder, artifact_path="plots")


def _overlay_rows(labels: np.ndarray) -> list[int]:
    """A few normal and a few anomalous validation rows, deterministic."""
    normal = np.flatnonzero(labels == 0)[: OVERLAY_IMAGES // 2]
    abnormal = np.flatnonzero(labels == 1)[: OVERLAY_IMAGES - len(normal)]
    return sorted([*normal.tolist(), *abnormal.tolist()])
