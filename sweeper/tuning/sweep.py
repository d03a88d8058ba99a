"""A sweep: one Tune experiment searches every category, then one honest test evaluation per category.

In ``per_category`` mode each trial trains one category, and each category keeps its own Optuna study and its own
ASHA (``sweeper.tuning.categories``), while all categories' trials share the cluster's ``max_concurrent_trials``
slots: no slot waits for a category's last trials. In ``shared`` mode each trial trains every category with one
configuration. After the search one follow-up experiment trains, side by side, the paper default (a run per
category, where compared) and the label-free twin of each chosen run that read labels (``sweeper.tuning.selection``):
one boundary between experiments, where two experiments would leave slots idle twice.
Each experiment is restorable: an interrupted sweep resumes the experiment it was in, and a finished one is never
run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from bgad_core.data.features import FeatureSet
from bgad_core.engine.checkpoint import checkpoint_config, detector_from_checkpoint
from bgad_core.errors import ConfigError
from bgad_core.evaluation.defect_groups import GROUPS, defect_groups
from bgad_core.evaluation.intervals import (bootstrap_distribution, compare_paired, interval_metrics,
                                            percentile_interval)
from bgad_core.evaluation.metrics import compute_metrics, objective_metric as default_objective
from bgad_core.models.base import evaluate
from bgad_core.models.registry import config_for, family
from sweeper.job import credentials
from sweeper.tracking import mlflow_runs as tracking
from sweeper.cache.reader import read_features
from sweeper.job.config import FAMILY_KEY, ParamSpec, SweepConfig
from sweeper.tuning.experiment_state import StateBackup, restore_cut_off_state
from sweeper.job.interrupt import STOP
from sweeper.tuning.progress import SweepProgress
from sweeper.tuning.categories import CategoryScheduler, CategorySearch
from sweeper.tuning.selection import (MODE, best_selectable, label_free_choice, ranked, repeat_space, reseed_applies,
                                      reseeded_choice, trained_on_labels, without_labels)
from sweeper.tuning.trainable import (CATEGORY_KEY, DATA_KEYS, FAILED_KEY, FAILURE_TAG, PLATEAU_KEY, SELECTION_KEY,
                                      UNSELECTABLE, TrialContext, ran_its_course, saved_model, train_detector)

log = logging.getLogger(__name__)

PAPER_DEFAULT = {"family": "bgad", "beta": 0.01, "tau": 0.1, "normalizer": 10.0, "bgspp_lambda": 1.0, "focal_weighting": True,
                 "lr": 2e-4, "local_aggregation": 1, "calibration": "level", "coarse_level_weight": 1.0,
                 "image_score": "max", "nearest_normal_weight": 0.0, "coarse_labels": "all", "num_anomalies": 10,
                 "racp_depth": 3}
SEARCH_EXPERIMENT = "search"  # the experiment of a per_category sweep's search (``shared`` mode: "shared")
FOLLOW_UP_EXPERIMENT = "follow-up"  # after the search: the paper default's runs and the label-free twins
FOLLOW_UP_KEY = "follow_up"  # a follow-up run's param: ``<arm>/<group>``
FITS_FOLDER = "fits"  # under an experiment's storage: single-pass fits that trials reuse (``sweeper.tuning.fit_store``)


def sweep_id(config: SweepConfig) -> str:
    """``<name>-<hash of the validated config>``: rerunning the same file resumes, editing it starts anew."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return f"{config.name}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def objective_metric(config: SweepConfig, manifest: Mapping[str, Any]) -> str:
    """The configured metric, or the default objective (``metrics.objective_metric``) of what the categories have:
    the mean of PRO and image AUROC when every category has pixel masks, image AUROC otherwise."""
    if config.tune.metric != "auto":
        return config.tune.metric
    return "val_" + default_objective(all(c["has_masks"] for c in manifest["categories"].values()))


def optuna_distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one declarative parameter."""
    if spec.uniform is not None:
        return optuna.distributions.FloatDistribution(*spec.uniform)
    if spec.loguniform is not None:
        return optuna.distributions.FloatDistribution(*spec.loguniform, log=True)
    if spec.randint is not None:
        return optuna.distributions.IntDistribution(*spec.randint)
    return optuna.distributions.CategoricalDistribution(spec.choice)


def suggest(trial: optuna.Trial, name: str, spec: ParamSpec) -> Any:
    """Sample one declarative parameter in a define-by-run trial (the distribution ``optuna_distribution`` names)."""
    if spec.uniform is not None:
        return trial.suggest_float(name, *spec.uniform)
    if spec.loguniform is not None:
        return trial.suggest_float(name, *spec.loguniform, log=True)
    if spec.randint is not None:
        return trial.suggest_int(name, *spec.randint)
    return trial.suggest_categorical(name, spec.choice)


class SweepOptunaSearch(OptunaSearch):
    """OptunaSearch that records in the study how each trial really ended, and where to find it.

    Ray's OptunaSearch tells Optuna COMPLETE for every trial that reported: an ASHA-stopped trial then competes
    with its low-budget value, and a diverged one (NaN objective) is rejected by Optuna and stays RUNNING forever.
    Here a trial whose last result says ``failed`` (or whose objective is NaN: a split where it is undefined) is a
    FAIL, one stopped before ``max_t`` meta-epochs by ASHA is
    PRUNED (TPE reads its intermediate values), one the plateau rule ended is COMPLETE, and every trial carries user
    attributes ``tune_trial_id`` and ``mlflow_run_id``. A trial that an interruption marked FAIL
    (``bgad.interrupted``) and that completes after the resume is recorded again as a new study trial with the same
    parameters, as Optuna never reopens a trial.
    """

    def __init__(self, *args: Any, max_t: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_t = max_t
        self._resumed: dict[str, dict[int, float]] = {}  # intermediate values of interrupted trials that resumed

    def _stored(self, trial_id: str) -> optuna.trial.FrozenTrial:
        return self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials and (trial_id in self._resumed or self._stored(trial_id).state.is_finished()):
            value = result.get(self.metric)
            if value is not None and value == value:
                self._resumed.setdefault(trial_id, {})[int(result["training_iteration"])] = float(value)
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        result = result or {}
        attrs = {"tune_trial_id": trial_id, "mlflow_run_id": result.get("mlflow_run_id")}
        value = result.get(self.metric)
        if error or result.get(FAILED_KEY) or value is None or value != value:  # NaN: no value to rank by
            state, value = optuna.trial.TrialState.FAIL, None
        elif not ran_its_course(result, self.max_t):
            state, value = optuna.trial.TrialState.PRUNED, None
        else:
            state = optuna.trial.TrialState.COMPLETE
        stored = self._stored(trial_id)
        if stored.state.is_finished():  # marked interrupted; it resumed and has now ended
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=state, value=value, params=stored.params, distributions=stored.distributions,
                intermediate_values={**stored.intermediate_values, **self._resumed.pop(trial_id, {})},
                user_attrs={**{k: v for k, v in stored.user_attrs.items() if k != tracking.INTERRUPTED_TAG},
                            **attrs, "resumed_from_trial": stored.number},
            ))
        else:
            for key, attr in attrs.items():
                ot_trial.set_user_attr(key, attr)
            self._ot_study.tell(ot_trial, value, state=state)
        self._completed_trials.add(trial_id)


def mark_study_interrupted(storage: str, study_names: list[str]) -> None:
    """Running trials of the sweep's studies -> FAIL with ``bgad.interrupted`` (Optuna has no "interrupted")."""
    rdb = optuna.storages.RDBStorage(storage)
    for name in study_names:
        try:
            study_id = rdb.get_study_id_from_name(name)
        except KeyError:  # the stop came before this experiment's study existed
            continue
        for trial in rdb.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            rdb.set_trial_user_attr(trial._trial_id, tracking.INTERRUPTED_TAG, True)
            rdb.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


class FamilySpace:
    """Optuna define-by-run over families: ``family`` first, then only that family's parameters.

    Each is named ``<family>/<parameter>``, which Ray's OptunaSearch hands the trial as ``{family: {parameter: ..}}``
    (``sweeper.tuning.trainable.split_params``): two families' parameters of the same name never share a distribution. A
    class, not a closure: Tune pickles the searcher with the experiment state to resume it.
    """

    def __init__(self, families: Mapping[str, Mapping[str, ParamSpec]]) -> None:
        self.families = {name: dict(space) for name, space in families.items()}

    def __call__(self, trial: optuna.Trial) -> None:
        chosen = trial.suggest_categorical(FAMILY_KEY, list(self.families))
        for key, spec in self.families[chosen].items():
            suggest(trial, f"{chosen}/{key}", spec)


def searcher(config: SweepConfig, metric: str, study_name: str, max_t: int) -> OptunaSearch | None:
    """Seeded TPE over the space (or each family's, ``search.families``), its study persisted in
    ``tune.optuna_storage``; None for a grid.

    Across families TPE is multivariate and grouped: it models each family's parameters together and apart from
    the other families', so that one family's good region says nothing about another's.
    """
    if config.search.algorithm != "optuna":
        return None
    if config.search.families:
        space: Any = FamilySpace(config.search.families)
        with warnings.catch_warnings():  # multivariate and group are marked experimental since Optuna 2.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=config.search.seed, multivariate=True, group=True)
    else:
        space = {k: optuna_distribution(v) for k, v in config.search.space.items()}
        sampler = optuna.samplers.TPESampler(seed=config.search.seed)
    return SweepOptunaSearch(
        space=space,
        metric=metric,
        mode=MODE,
        sampler=sampler,
        study_name=study_name,
        storage=optuna.storages.RDBStorage(config.tune.optuna_storage),
        max_t=max_t,
    )


class SelectableASHA(ASHAScheduler):
    """ASHA that sees a trial only at the meta-epochs its family may select (``SELECTION_KEY`` not ``UNSELECTABLE``).

    A family with a warm-up (BGAD's phase 1, normal-only training) reports objectives that selection will never
    use; plain ASHA ranked them against other families' selectable results at the same rung. Measured in the
    cross-family quickstart: every BGAD trial was pruned after meta-epoch 1 (phase 1, val PRO 0.937) against
    PatchCore's final fit (0.967), so no BGAD trial reached an epoch it could be chosen at and PatchCore won by
    default. Here a trial's first report to ASHA is its first selectable epoch; ASHA records it at the highest rung
    not above that epoch, among the trials that reached that rung.
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get(SELECTION_KEY) == UNSELECTABLE:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def scheduler(config: SweepConfig, metric: str, max_t: int) -> SelectableASHA | FIFOScheduler:
    """ASHA over meta-epochs (``training_iteration``) at selectable epochs, or FIFO (every trial runs its full
    schedule)."""
    spec = config.tune.scheduler
    if spec.type == "fifo":
        return FIFOScheduler()
    return SelectableASHA(
        metric=metric, mode=MODE, max_t=max_t, grace_period=min(spec.grace_period, max_t),
        reduction_factor=spec.reduction_factor,
    )


def fixed_params(config: SweepConfig) -> dict[str, Any]:
    """Values every trial shares: ``train`` (each trial keeps its family's fields; the rest are its config's
    defaults), the family where one is not searched, and the data selection."""
    defaults = {FAMILY_KEY: config.families()[0], "num_anomalies": config.cache.max_anomalies,
                "racp_depth": config.cache.racp_depths[-1]}
    return {**defaults, **config.train}


def schedule_length(config: SweepConfig, fixed: Mapping[str, Any]) -> int:
    """Meta-epochs of the longest schedule among the sweep's families: ASHA's ``max_t`` and the rungs all share (a
    family fitted in one pass reports once and is complete)."""
    lengths = [config_for(name, fixed).meta_epochs for name in config.families() if not family(name).single_pass]
    return max(lengths, default=1)


def paper_default_params(config: SweepConfig) -> dict[str, Any]:
    """The paper's configuration on this sweep's schedule and cache (n and S clipped to what is cached)."""
    params = dict(PAPER_DEFAULT)
    params["num_anomalies"] = min(params["num_anomalies"], config.cache.max_anomalies)
    depths = config.cache.racp_depths
    params["racp_depth"] = min(depths, key=lambda d: abs(d - PAPER_DEFAULT["racp_depth"]))
    return params


class PlateauStopper(Stopper):
    """Ends a trial on the result whose ``plateau_stop`` says its validation objective has plateaued.

    The rule is ``bgad_core.engine.stopping.PlateauRule``, the one ``bgad_core.train`` applies; it runs inside the trial
    (``sweeper.tuning.trainable``), which keeps its state (last gain, meta-epochs since) in ``trial_state.json`` with every
    checkpoint and reports its verdict with every meta-epoch. A stopper cannot keep that state itself: Tune pickles
    the run config, stoppers included, once when the experiment is created and never checkpoints them, so after
    ``Tuner.restore`` a driver-side count would start again from zero for every resumed trial (which would then
    train up to ``patience`` meta-epochs past its plateau), and a trial retried from an older checkpoint reports some
    meta-epochs twice, which a driver-side count would count twice. The trial's checkpointed count has neither
    problem. The trial also leaves its loop on the verdict, so one resumed from the checkpoint of its stopping epoch
    (the driver gone before it recorded the stop) trains nothing more.

    Tune's own ``TrialPlateauStopper`` does not implement the rule: it stops when the standard deviation of the
    last ``num_results`` values falls below ``std``, so a curve falling from its peak does not stop it (KolektorSDD's
    validation PRO after meta-epoch 3, 0.563 0.530 0.505 0.500, has a deviation of 0.025, above its default 0.01),
    while a curve still climbing by 0.008 per meta-epoch is stopped (deviation 0.009 over 4 results), where the
    rule sees a gain above min_delta 0.005 every epoch. It knows nothing of phase 1, and it counts results since
    the driver started, so it too restarts on a restore.

    Tune asks the stopper before the scheduler, so ASHA never sees the stopping result as an intermediate one; it
    gets it through ``on_trial_complete``, as it gets a trial that ran to ``max_t``.
    """

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return bool(result.get(PLATEAU_KEY))

    def stop_all(self) -> bool:
        return False


def reseed_experiment(group: str) -> str:
    """The experiment that holds a group's re-seeded runs (``tune.selection.rule: reseed``)."""
    return f"{group}-reseed"


def run_search(config: SweepConfig, sid: str, name: str, context: TrialContext, metric: str,
               categories: Sequence[str] | None) -> tune.ResultGrid:
    """The sweep's search as one experiment: Optuna or the grid, under ASHA or FIFO.

    Over ``categories``, each trial trains one of them, with a study and a scheduler per category
    (``sweeper.tuning.categories``); with None (``shared`` mode), each trains all of ``context.categories``.
    """
    max_t = schedule_length(config, context.fixed)
    optuna_search = config.search.algorithm == "optuna"
    if categories is None:
        return run_experiment(config, sid, name, context, metric, {} if optuna_search else grid_space(config),
                              searcher(config, metric, f"{sid}/{name}", max_t), config.search.num_samples,
                              scheduler(config, metric, max_t))
    trial_scheduler = FIFOScheduler() if config.tune.scheduler.type == "fifo" else CategoryScheduler(
        {category: scheduler(config, metric, max_t) for category in categories})
    if optuna_search:
        search = CategorySearch({category: searcher(config, metric, f"{sid}/{category}", max_t)
                                 for category in categories}, config.search.num_samples, metric, MODE)
        return run_experiment(config, sid, name, context, metric, {}, search,
                              config.search.num_samples * len(categories), trial_scheduler)
    space = {**grid_space(config), CATEGORY_KEY: tune.grid_search(list(categories))}
    return run_experiment(config, sid, name, context, metric, space, None, config.search.num_samples, trial_scheduler)


def run_experiment(
    config: SweepConfig, sid: str, name: str, context: TrialContext, metric: str, param_space: dict[str, Any],
    search: Searcher | None, num_samples: int, trial_scheduler: TrialScheduler,
) -> tune.ResultGrid:
    """Run (or resume) one experiment under ``<storage_path>/<sweep id>/<name>``."""
    storage = f"{config.tune.storage_path.rstrip('/')}/{sid}"
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    path = f"{storage}/{name}"
    context = replace(context, fits_uri=f"{path}/{FITS_FOLDER}")
    trainable = tune.with_resources(
        tune.with_parameters(train_detector, context=context),
        {"cpu": config.tune.cpus_per_trial, "gpu": config.tune.gpus_per_trial,
         **config.tune.custom_resources_per_trial},
    )
    expected = num_samples * _grid_size(param_space)
    restore_cut_off_state(path)  # a driver killed while Tune saved the state left it cut off
    if tune.Tuner.can_restore(path):
        log.info("resuming experiment %s from %s", name, path)
        return _fit(restored_tuner(path, trainable, param_space), name, expected)
    max_t = schedule_length(config, context.fixed)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=trial_scheduler,
            num_samples=num_samples,
            max_concurrent_trials=config.tune.max_concurrent_trials,
            # a finished trial's worker takes the next trial: no new process importing torch, timm and MLflow
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
            # the best selectable epoch's checkpoint (what test_evaluation reads) and, for resuming, the latest one
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=SELECTION_KEY, checkpoint_score_order=MODE
            ),
            stop=PlateauStopper(),
            callbacks=[SweepProgress(name, metric, max_t, expected), StateBackup(path)],
            verbose=0,
        ),
    )
    return _fit(tuner, name, expected)


def restored_tuner(path: str, trainable: Any, param_space: dict[str, Any]) -> tune.Tuner:
    """The experiment saved at ``path``, ready to resume; a ``ConfigError`` naming the path when its saved state
    refers to code this version does not have (Tune pickles the searcher, scheduler and callbacks by module path,
    so an experiment interrupted before an upgrade that moved them cannot resume after it)."""
    try:
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space)
    except (ImportError, AttributeError) as error:
        missing = error.name if isinstance(error, ImportError) and error.name else str(error)
        raise ConfigError(
            f"{path}: saved by another version of bgad-sweeper (it refers to {missing}, which this version does "
            "not have), so it cannot resume; its finished trials stay in MLflow and Optuna. To start this sweep "
            f"afresh, give it a new name in the config or move {path} away"
        ) from error


def _fit(tuner: tune.Tuner, name: str, expected: int) -> tune.ResultGrid:
    """Run the experiment; a stop request (see ``sweeper.job.interrupt``) ends it resumably as ``SweepInterrupted``."""
    if STOP.requested:
        raise SweepInterrupted(f"experiment {name} was not started: the sweep was asked to stop ({STOP.name})")
    with STOP.forwarded_to_tune():
        results = tuner.fit()
    if STOP.requested:
        raise SweepInterrupted(f"experiment {name} was stopped by {STOP.name}; run the same command again to resume it")
    return _completed(results, name, expected)


class SweepInterrupted(RuntimeError):
    """The experiment stopped before all its trials ended (Ctrl-C, SIGTERM); its state is saved for resuming."""


def _grid_size(param_space: Mapping[str, Any]) -> int:
    size = 1
    for value in param_space.values():
        if isinstance(value, dict) and "grid_search" in value:
            size *= len(value["grid_search"])
    return size


def _completed(results: tune.ResultGrid, name: str, expected: int) -> tune.ResultGrid:
    """The results if every trial ended (finished, stopped early or failed); else the sweep was interrupted."""
    ended = results.num_terminated + results.num_errors
    if ended < len(results) or len(results) < expected:
        raise SweepInterrupted(
            f"experiment {name} was interrupted with {ended} of {expected} trials ended; "
            "run the same command again to resume it"
        )
    return results


def grid_space(config: SweepConfig) -> dict[str, Any]:
    """Tune's param space for a grid search (Optuna cannot take ``tune.grid_search``, so grids bypass it)."""
    return {k: tune.grid_search(v) for k, v in config.search.grid.items()}


def test_evaluation(result: tune.Result, manifest: Mapping[str, Any], category: str) -> Evaluated:
    """Evaluate a trial's best-validation checkpoint on the test split of ``category``: the only test read."""
    evaluated = checkpoint_evaluation(result.get_best_checkpoint(SELECTION_KEY, MODE) or result.checkpoint,
                                      manifest, category)
    params = {**result.config, **(result.config.get(evaluated.entry["family"]) or {})}  # a family's own sub-space
    evaluated.entry["config"].update({k: params[k] for k in DATA_KEYS if k in params})
    return replace(evaluated, entry={"trial_id": result.metrics.get("trial_id"), **evaluated.entry})


def checkpoint_evaluation(checkpoint: tune.Checkpoint, manifest: Mapping[str, Any], category: str) -> Evaluated:
    """A trial checkpoint's detector for ``category`` on its test split: family, epoch, validation and test
    figures, and the detector's config."""
    saved = saved_model(checkpoint, category)
    test = read_features(manifest, category, ["test"])
    evaluation = evaluate(detector_from_checkpoint(saved), test)
    figures, resampled = split_figures(test, evaluation.scores, evaluation.maps, seen_types(manifest))
    return Evaluated({
        "family": saved["family"],
        "epoch": saved["epoch"],
        "val": {k.removeprefix("val_"): v for k, v in saved["metrics"].items()},
        "test": figures,
        "config": checkpoint_config(saved),
    }, resampled, len(test))


def baseline_evaluation(config: SweepConfig, manifest: Mapping[str, Any], category: str) -> Evaluated:
    """Fit the one-class baseline (``baseline.family``) on the category's training normals; its validation and test
    metrics.

    It reads the same cached features, splits and metrics as the trials, so the difference to the best trial is
    exactly what the labelled anomalies (and the searched training) bought. It never influences which trial wins.
    """
    spec = config.baseline
    chosen = family(spec.family)
    started = time.monotonic()
    strides = [level["stride"] for level in manifest["levels"]]
    training = chosen.training(config_for(spec.family, spec.model_dump(mode="json")),
                               read_features(manifest, category, ["train_normal"]), strides, "cpu")
    size = (manifest["image_size"], manifest["image_size"])
    result = {}
    while training.epoch < training.meta_epochs:
        training.train_meta_epoch()
    objective = "image_auroc"
    val = read_features(manifest, category, ["val"])
    evaluation = training.validate(val, size, objective)
    result["val"] = split_figures(val, evaluation.scores, evaluation.maps)[0]
    test = read_features(manifest, category, ["test"])
    tested = evaluate(evaluation.detector, test)
    result["test"], resampled = split_figures(test, tested.scores, tested.maps, seen_types(manifest))
    return Evaluated({**result, "config": spec.model_dump(mode="json"),
                      "seconds": round(time.monotonic() - started, 1)}, resampled, len(test))


def split_figures(split: FeatureSet, scores: torch.Tensor, maps: torch.Tensor,
                  seen_types: Sequence[str] | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A split's metrics (``compute_metrics``; pixel ones where it has masks) and their 95 % intervals from a seeded
    stratified bootstrap over its images (``<metric>_lo`` / ``<metric>_hi``, ``bgad_core.evaluation.intervals``),
    with the bootstrap values themselves: the same seed resamples the same images for every detector scored on the
    split, so two detectors' values compare pairwise (``verdicts``).

    ``seen_types`` (the unseen-defect protocol's ``train_defect_types``): also each group's figures, the normals
    with the seen types' anomalies (``seen_<metric>``) and with the other types' (``unseen_<metric>``).
    """
    masks = split.pixel_masks
    maps = None if masks is None else maps
    metrics = compute_metrics(split.labels, scores, masks, maps)
    resampled = bootstrap_distribution(split.labels, scores, masks, maps)
    intervals = {key: percentile_interval(values) for key, values in resampled.items()}
    figures = {**metrics, **interval_metrics(intervals)}
    for group, rows in ({} if seen_types is None else defect_groups(split.ids, split.labels, seen_types)).items():
        part, _ = split_figures(split.select(rows), scores[rows], None if maps is None else maps[rows])
        figures.update({f"{group}_{key}": value for key, value in part.items()})
    return figures, resampled


def seen_types(manifest: Mapping[str, Any]) -> list[str] | None:
    """The defect types the cache drew labelled anomalies from under the unseen-defect protocol (None: all)."""
    return manifest["recipe"].get("train_defect_types")


@dataclass(frozen=True)
class Evaluated:
    """One arm's summary entry (figures, config, ...), its test split's bootstrap values and the split's size."""

    entry: dict[str, Any]
    test_resampled: dict[str, np.ndarray]
    test_images: int


def verdicts(best: Evaluated, others: Mapping[str, Evaluated], metric: str) -> dict[str, dict[str, Any]]:
    """The best trial against each other arm on test ``metric`` (the objective's test counterpart), paired over the
    same test images (``compare_paired``): {arm: gap, interval, verdict, images that would separate them}."""
    compared = {}
    for arm, other in others.items():
        if metric not in best.test_resampled or metric not in other.test_resampled:
            continue
        gap = best.entry["test"][metric] - other.entry["test"][metric]
        if not math.isfinite(gap):  # undefined on this split for either arm: nothing to compare
            continue
        comparison = compare_paired(best.test_resampled[metric], other.test_resampled[metric], gap, best.test_images)
        compared[arm] = {"metric": metric, **asdict(comparison), "verdict": comparison.verdict}
    return compared


class SweepFailed(RuntimeError):
    """Every trial of an experiment failed or diverged: there is no configuration to evaluate."""


def best_result(results: Sequence[tune.Result], group: str, metric: str) -> tune.Result:
    """The trial whose best selectable meta-epoch has the highest validation objective (test is never looked at).

    Where no trial reached a selectable epoch (every one failed during BGAD's phase 1, e.g. on a full disk), the first
    one that reported a finite objective: the sweep completes on what it has, and says so in the trial counts.
    """
    best = ranked(results, 1) or [result for result in results if _reported_finite(result)][:1]
    if not best:
        errored = sum(result.error is not None for result in results)
        raise SweepFailed(
            f"no trial of {group} reported a finite {metric} ({len(results)} trials, "
            f"{errored} errored; their MLflow runs carry the reason in tag {FAILURE_TAG})"
        )
    return best[0]


def _reported_finite(result: tune.Result) -> bool:
    """Whether the trial reported a finite ``selection_score`` (``UNSELECTABLE`` included) at some meta-epoch."""
    history = result.metrics_dataframe
    return history is not None and SELECTION_KEY in history and bool(np.isfinite(history[SELECTION_KEY]).any())


def family_bests(results: Iterable[tune.Result], fixed: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each family's best trial on validation (``selection_score``, its best selectable epoch) and its trial
    count: the summary shows them beside the overall winner, which alone is evaluated on test."""
    bests: dict[str, dict[str, Any]] = {}
    for result in results:
        name = str(result.config.get(FAMILY_KEY, fixed.get(FAMILY_KEY)))
        value = best_selectable(result)  # None: a trial pruned in BGAD's phase 1 has no selectable epoch
        entry = bests.setdefault(name, {"trials": 0, "val": None, "trial_id": None})
        entry["trials"] += 1
        if value is not None and (entry["val"] is None or value > entry["val"]):
            entry.update(val=value, trial_id=result.metrics.get("trial_id"))
    return bests


def close_child_runs(results: Iterable[tune.Result], tracking_info: tracking.Tracking, sid: str,
                     max_t: int) -> dict[str, int]:
    """Mark each trial's MLflow run with how it ended; ASHA kills pruned trials before they can do it themselves."""
    client = tracking_info.client()
    counts = {"finished": 0, "pruned": 0, "failed": 0}
    for result in results:
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        if trial_id is None:
            counts["failed"] += 1
            continue
        run_id = tracking.find_run(client, tracking_info.experiment_id, {tracking.SWEEP_TAG: sid, tracking.TRIAL_TAG: trial_id})
        iterations = result.metrics.get("training_iteration", 0)
        failed = result.error is not None or bool(result.metrics.get(FAILED_KEY))
        outcome = "failed" if failed else ("finished" if ran_its_course(result.metrics, max_t) else "pruned")
        counts[outcome] += 1
        if run_id is not None:
            tags = {"bgad.outcome": outcome, "bgad.meta_epochs_run": iterations}
            if result.error is not None:  # the exception's own last line, e.g. "OSError: [Errno 28] No space ..."
                tags[FAILURE_TAG] = str(result.error).strip().splitlines()[-1][:500]
            tracking.set_tags(client, run_id, tags)
            status = {"failed": "FAILED", "finished": "FINISHED", "pruned": "KILLED"}[outcome]
            tracking.with_retry(lambda: client.set_terminated(run_id, status=status))
    return counts


def run_sweep(config: SweepConfig, cache_uri: str, manifest: Mapping[str, Any], tracking_uri: str) -> dict[str, Any]:
    """Search every category (or all at once in ``shared`` mode), evaluate winners on test, log the summary."""
    started = time.monotonic()
    credentials.keep_out_of_trial_runtime_env()  # trials read credentials from their node, not from Ray's logs
    sid = sweep_id(config)
    metric = objective_metric(config, manifest)
    info = tracking.start_parent_run(
        tracking_uri, config.mlflow.experiment, config.mlflow.artifact_location_for(tracking_uri), sid,
        run_name=config.name,
    )
    client = info.client()
    tracking.log_params(client, info.parent_run_id, {
        "config": tracking.redact(json.dumps(config.model_dump(mode="json"), sort_keys=True))[:6000],
        "cache_key": manifest["key"], "objective": metric, "mode": config.mode,
    })
    tracking.set_tags(client, info.parent_run_id, {"bgad.cache_uri": tracking.redact(cache_uri), "bgad.categories": ",".join(manifest["categories"]),
                                                   tracking.SWEEP_NAME_TAG: config.name})
    categories = list(manifest["categories"])
    groups = [(c, (c,)) for c in categories] if config.mode == "per_category" else [("shared", tuple(categories))]
    summary: dict[str, Any] = {"sweep_id": sid, "objective": metric, "categories": {}}
    studies = [f"{sid}/{name}" for name, _ in groups] if config.search.algorithm == "optuna" else []
    STOP.on_stop(lambda: _mark_interrupted(info, sid, config.tune.optuna_storage, studies))
    try:
        _search_groups(config, sid, metric, manifest, info, cache_uri, groups, summary)
    except (SweepInterrupted, KeyboardInterrupt) as stop:
        if STOP.requested:  # once more now that Tune has ended every trial: a trial whose worker was reused opens
            _mark_interrupted(info, sid, config.tune.optuna_storage, studies)  # its run within a second of the stop
        if isinstance(stop, SweepInterrupted):
            raise
        # a stop outside an experiment (test evaluation, baseline, ...)
        raise SweepInterrupted(f"sweep {sid} was stopped by {STOP.name}; run the same command again to resume it") from stop
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["mlflow_view"] = tracking.save_runs_view(client, info.experiment_id, sid,
                                                     [metric, *_best_trial_metrics(summary)])
    _log_summary(client, info.parent_run_id, summary)
    return summary


def _mark_interrupted(info: tracking.Tracking, sid: str, optuna_storage: str, studies: list[str]) -> None:
    """What a stop request leaves behind: MLflow runs KILLED and Optuna trials FAIL, both tagged interrupted."""
    tracking.mark_interrupted(info, sid, f"stopped by {STOP.name}")
    mark_study_interrupted(optuna_storage, studies)


def _search_groups(
    config: SweepConfig, sid: str, metric: str, manifest: Mapping[str, Any], info: tracking.Tracking, cache_uri: str,
    groups: list[tuple[str, tuple[str, ...]]], summary: dict[str, Any],
) -> None:
    """Search every group in one experiment (``per_category``: a group per category, each trial training one;
    ``shared``: one group whose trials train every category), choose each group's run (``tune.selection``), train
    the follow-up runs (``follow_up_runs``) in one more experiment, deploy each label-free twin that validation
    scores higher than its labelled run, and evaluate each group's deployed run and the other arms into ``summary``."""
    fixed = fixed_params(config)
    max_t = int(fixed["meta_epochs"])
    device = "cuda" if config.tune.gpus_per_trial > 0 else "cpu"
    threads = max(1, int(config.tune.cpus_per_trial))
    shared = config.mode == "shared"
    names = [name for name, _ in groups]
    context = TrialContext(sid, cache_uri, tuple(c for _, members in groups for c in members), fixed, metric, info,
                           config.mlflow.log_plots, threads, device, config.tune.plateau.rule())
    results = run_search(config, sid, "shared" if shared else SEARCH_EXPERIMENT, context, metric,
                         None if shared else names)
    chosen: dict[str, tuple[tune.Result, dict[str, Any], dict[str, int], dict[str, Any]]] = {}
    for name, members in groups:
        own = _of_group(results, name, shared)
        counts = close_child_runs(own, info, sid, max_t)
        best = best_result(own, name, metric)
        selection = {"rule": "argmax", "chosen": best.metrics.get("trial_id")}
        if reseed_applies(config.tune.selection, metric, len(members)):
            def train_again(param_space: dict[str, Any]) -> tune.ResultGrid:
                rerun = run_experiment(config, sid, reseed_experiment(name), replace(context, categories=members), metric,
                                       param_space, None, 1, FIFOScheduler())
                close_child_runs(rerun, info, sid, max_t)
                return rerun
            best, selection = reseeded_choice(own, config.tune.selection, manifest, members[0], metric, train_again)
        chosen[name] = (best, selection, counts, family_bests(own, context.fixed))
    planned = follow_up_runs(config, {name: best for name, (best, *_) in chosen.items()}, shared)
    follow_ups: dict[str, tune.Result] = {}
    if planned:
        done = run_experiment(config, sid, FOLLOW_UP_EXPERIMENT, context, metric, repeat_space(planned, FOLLOW_UP_KEY),
                              None, 1, FIFOScheduler())
        close_child_runs(done, info, sid, max_t)
        follow_ups = {str(result.config[FOLLOW_UP_KEY]): result for result in done}
    for name, members in groups:
        best, selection, counts, per_family = chosen[name]
        tested: dict[str, tune.Result] = {}
        if f"paper_default/{name}" in follow_ups:
            tested["paper_default"] = follow_ups[f"paper_default/{name}"]
        if (twin := follow_ups.get(f"label_free_twin/{name}")) is not None:
            # the labelled run or its label-free twin is deployed; the other is a tested arm
            deployed, selection["label_free_twin"] = label_free_choice(best, twin)
            tested.update({"labelled": best} if deployed is twin else {"label_free_twin": twin})
            best = deployed
        for category in members:
            winner = test_evaluation(best, manifest, category)
            others = {arm: test_evaluation(result, manifest, category) for arm, result in tested.items()}
            if config.baseline.enabled:
                others["baseline"] = baseline_evaluation(config, manifest, category)
            summary["categories"][category] = {
                "trials": counts, "families": per_family, "selection": selection, "best": winner.entry,
                **{arm: evaluated.entry for arm, evaluated in others.items()},
                "verdicts": verdicts(winner, others, metric.removeprefix("val_")),
            }


def follow_up_runs(config: SweepConfig, chosen: Mapping[str, tune.Result], shared: bool) -> dict[str, dict[str, Any]]:
    """The params of every run of the follow-up experiment, by ``<arm>/<group>``: the paper default of each group
    (``search.compare_paper_default``, where the paper's family is searched) and the label-free twin of each group's
    chosen run that read labels (``tune.selection.label_free_twin``)."""
    runs: dict[str, dict[str, Any]] = {}
    if config.search.compare_paper_default and PAPER_DEFAULT[FAMILY_KEY] in config.families():
        for name in chosen:
            runs[f"paper_default/{name}"] = {**paper_default_params(config), **({} if shared else {CATEGORY_KEY: name})}
    if config.tune.selection.label_free_twin:
        fixed = fixed_params(config)
        runs.update({f"label_free_twin/{name}": without_labels(best.config) for name, best in chosen.items()
                     if trained_on_labels(best, fixed)})
    return runs


def _of_group(results: tune.ResultGrid, name: str, shared: bool) -> list[tune.Result]:
    """The trials of one group: all of them in ``shared`` mode, else those of the category ``name``."""
    return [result for result in results if shared or result.config.get(CATEGORY_KEY) == name]


TEST_COLUMNS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "PRO"}


def summary_table(summary: Mapping[str, Any]) -> str:
    """Markdown table: per category and arm (best trial, paper default, one-class baseline), val and test scores.

    Each figure shows its 95 % interval where one was measured (``0.874 [0.81, 0.93]``): on a few dozen images the
    interval, not the third decimal, says whether two arms differ. The objective gets a test column too.
    """
    metric = summary["objective"].removeprefix("val_")
    columns = dict(TEST_COLUMNS)
    columns.setdefault(metric, metric)
    lines = [f"| category | trials (fin/pruned/failed) | arm | val {metric} | "
             + " | ".join(f"test {label}" for label in columns.values()) + " |", "|---" * (4 + len(columns)) + "|"]
    arms = (("best", "best trial"), ("paper_default", "paper default"), ("baseline", "one-class baseline"),
            ("label_free_twin", "label-free twin"), ("labelled", "labelled run it replaced"))
    for name, entry in summary["categories"].items():
        t = entry["trials"]
        for key, label in arms:
            if key not in entry:
                continue
            arm = entry[key]
            trials = f"{t['finished']}/{t['pruned']}/{t['failed']}" if key == "best" else "-"
            family_name = arm.get("family") or arm.get("config", {}).get("family")
            if family_name:
                label = f"{label} ({family_name})"
            lines.append(f"| {name} | {trials} | {label} | {_figure(arm['val'], metric)} | "
                         + " | ".join(_figure(arm["test"], column) for column in columns) + " |")
            for group in GROUPS:  # the unseen-defect protocol: test read per group of types
                part = {k.removeprefix(f"{group}_"): v for k, v in arm["test"].items() if k.startswith(f"{group}_")}
                if part:
                    lines.append(f"| {name} | - | {label}, {group} defect types | - | "
                                 + " | ".join(_figure(part, column) for column in columns) + " |")
        families = entry.get("families", {})
        for family_name, best in families.items() if len(families) > 1 else ():
            value = "-" if best["val"] is None else f"{best['val']:.3f}"
            lines.append(f"| {name} | {best['trials']} | best {family_name} trial (not tested) | {value} | "
                         + " | ".join("-" for _ in columns) + " |")
    notes = [selection_line(name, entry["selection"]) for name, entry in summary["categories"].items()
             if entry.get("selection", {}).get("rule") == "reseed"]
    notes += [twin_line(name, entry["selection"]["label_free_twin"]) for name, entry in summary["categories"].items()
              if "label_free_twin" in entry.get("selection", {})]
    notes += [verdict_line(name, entry["verdicts"], dict(arms), columns)
              for name, entry in summary["categories"].items() if entry.get("verdicts")]
    return "\n".join(lines + ([""] + notes if notes else []))


def selection_line(category: str, record: Mapping[str, Any]) -> str:
    """What the ``reseed`` rule saw and did for one category (``sweeper.tuning.selection``)."""
    tied, candidates = record["tied"], record["candidates"]
    head = (f"selection {category}: {len(tied) - 1} of the {len(candidates) - 1} runners-up tied with the best on "
            "validation (paired 95 % interval)")
    if "runs" not in record:
        return f"{head}; the best stands"
    means = ", ".join(f"{trial} {sum(v) / len(v):.3f}" for trial, v in record["runs"].items())
    return (f"{head}; each trained again, mean validation over {len(next(iter(record['runs'].values())))} run(s): "
            f"{means}; deployed {record['deployed']}, a held-out run of {record['chosen']} (validation "
            f"{record['deployed_val']:.3f}, not used for the choice)")


def twin_line(category: str, record: Mapping[str, Any]) -> str:
    """What the label-free twin of a category's chosen run scored, and which of the two is deployed."""
    def value(figure: float | None) -> str:
        return "none (failed)" if figure is None else f"{figure:.3f}"
    outcome = ("the twin is deployed: here the labels did not help" if record["deployed"]
               else "the labelled run stays deployed")
    return (f"labels {category}: trained again without its labelled anomalies, run {record['labelled_trial_id']} "
            f"scored {value(record['val'])} on validation (twin {record['trial_id']}) against "
            f"{value(record['labelled_val'])} with them; {outcome}")


def verdict_line(category: str, compared: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str],
                 columns: Mapping[str, str]) -> str:
    """One line per category: is the best trial better or worse than each other arm on test beyond the paired 95 %
    interval, or can the test images not tell them apart (and roughly how many images would, at this gap)?"""
    parts = []
    for arm, c in compared.items():
        figure = f"{c['gap']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"
        if c["verdict"] != "undecided":
            parts.append(f"{c['verdict']} than the {labels[arm]} ({figure})")
        elif c["images_to_separate"] is None:
            parts.append(f"no different from the {labels[arm]} ({figure})")
        else:
            parts.append(f"not told apart from the {labels[arm]} ({figure}; about {c['images_to_separate']} images "
                         f"would separate them at this gap)")
    first = next(iter(compared.values()))
    metric = columns.get(first["metric"], first["metric"])
    return (f"verdict {category}: on {first['images']} test images (test {metric}, paired 95 % interval of the "
            f"difference), the best trial is " + "; ".join(parts))


def _figure(figures: Mapping[str, Any], metric: str) -> str:
    """``0.874 [0.81, 0.93]``: the metric and its interval; the metric alone where no interval was measured."""
    value = figures.get(metric)
    if value is None:
        return "-"
    lo, hi = figures.get(f"{metric}_lo"), figures.get(f"{metric}_hi")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.2f}, {hi:.2f}]"


def _best_trial_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Each category's best trial's validation and test figures, named as the sweep run logs them (the saved runs
    view shows these columns)."""
    return {f"{name}/best_{split}_{k}": v for name, entry in summary["categories"].items()
            for split in ("val", "test") for k, v in entry["best"][split].items()}


def _log_summary(client: Any, run_id: str, summary: Mapping[str, Any]) -> None:
    """Test metrics as parent-run metrics, the full summary and its table as artifacts; mark the run finished."""
    metrics = _best_trial_metrics(summary)
    for name, entry in summary["categories"].items():
        for arm in ("paper_default", "baseline", "label_free_twin", "labelled"):
            if arm in entry:
                metrics.update({f"{name}/{arm}_test_{k}": v for k, v in entry[arm]["test"].items()})
    tracking.log_metrics(client, run_id, metrics, step=0)
    tracking.set_tags(client, run_id, {f"bgad.best_trial.{name}": entry["best"]["trial_id"]
                                       for name, entry in summary["categories"].items()})
    tracking.set_tags(client, run_id, {f"bgad.verdict.{name}.{arm}": compared["verdict"]
                                       for name, entry in summary["categories"].items()
                                       for arm, compared in entry.get("verdicts", {}).items()})
    tracking.log_params(client, run_id, {f"best.{name}.{key}": value for name, entry in summary["categories"].items()
                                         for key, value in entry["best"]["config"].items()})
    client.log_dict(run_id, dict(summary), "summary.json")
    client.log_text(run_id, summary_table(summary), "summary.md")
    tracking.with_retry(lambda: client.set_terminated(run_id, status="FINISHED"))
