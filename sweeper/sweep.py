"""A sweep: one Tune experiment per category (or one over all categories), then one honest test evaluation.

Categories run one after another, each experiment using the whole cluster (``max_concurrent_trials`` at a time).
That is equivalent in throughput to concurrent experiments while trials outnumber free slots, and it keeps each
experiment independently restorable: an interrupted sweep resumes exactly the experiment it was in, and a
finished category is never touched again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from bgad_core.checkpoint import load_checkpoint, model_from_checkpoint
from bgad_core.patchcore import PatchCore
from bgad_core.training import TrainConfig, evaluate
from sweeper import tracking
from sweeper.cache_reader import read_features
from sweeper.config import ParamSpec, SweepConfig
from sweeper.progress import SweepProgress
from sweeper.trainable import DATA_KEYS, FAILED_KEY, FAILURE_TAG, MODEL_FILE, TrialContext, train_bgad

log = logging.getLogger(__name__)

PAPER_DEFAULT = {"beta": 0.01, "tau": 0.1, "normalizer": 10.0, "bgspp_lambda": 1.0, "focal_weighting": True,
                 "lr": 2e-4, "local_aggregation": 1, "num_anomalies": 10, "racp_depth": 3}
MODE = "max"


def sweep_id(config: SweepConfig) -> str:
    """``<name>-<hash of the validated config>``: rerunning the same file resumes, editing it starts anew."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return f"{config.name}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def objective_metric(config: SweepConfig, manifest: Mapping[str, Any]) -> str:
    """The configured metric, or PRO when every category has pixel masks and image AUROC otherwise."""
    if config.tune.metric != "auto":
        return config.tune.metric
    masks = all(c["has_masks"] for c in manifest["categories"].values())
    return "val_aupro" if masks else "val_image_auroc"


def optuna_distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one declarative parameter."""
    if spec.uniform is not None:
        return optuna.distributions.FloatDistribution(*spec.uniform)
    if spec.loguniform is not None:
        return optuna.distributions.FloatDistribution(*spec.loguniform, log=True)
    if spec.randint is not None:
        return optuna.distributions.IntDistribution(*spec.randint)
    return optuna.distributions.CategoricalDistribution(spec.choice)


class FailAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records a trial whose last result says ``failed`` (diverged training) as an Optuna FAIL.

    Ray's OptunaSearch would tell Optuna COMPLETE with the trial's NaN objective, which Optuna rejects (Ray only
    logs the error), leaving the trial RUNNING in the study forever.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and result.get(FAILED_KEY):
            result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)


def searcher(config: SweepConfig, metric: str, study_name: str) -> OptunaSearch | None:
    """Seeded TPE over the space, its study persisted in ``tune.optuna_storage``; None for a grid."""
    if config.search.algorithm != "optuna":
        return None
    space = {k: optuna_distribution(v) for k, v in config.search.space.items()}
    return FailAwareOptunaSearch(
        space=space,
        metric=metric,
        mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=config.search.seed),
        study_name=study_name,
        storage=optuna.storages.RDBStorage(config.tune.optuna_storage),
    )


def scheduler(config: SweepConfig, metric: str, max_t: int) -> ASHAScheduler | FIFOScheduler:
    """ASHA over meta-epochs (``training_iteration``), or FIFO (every trial runs its full schedule)."""
    spec = config.tune.scheduler
    if spec.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        metric=metric, mode=MODE, max_t=max_t, grace_period=min(spec.grace_period, max_t),
        reduction_factor=spec.reduction_factor,
    )


def fixed_params(config: SweepConfig) -> dict[str, Any]:
    """Values every trial shares: TrainConfig defaults, overridden by ``train``, plus the data selection."""
    defaults = {"num_anomalies": config.cache.max_anomalies, "racp_depth": config.cache.racp_depths[-1]}
    return {**TrainConfig().to_dict(), **defaults, **config.train}


def paper_default_params(config: SweepConfig) -> dict[str, Any]:
    """The paper's configuration on this sweep's schedule and cache (n and S clipped to what is cached)."""
    params = dict(PAPER_DEFAULT)
    params["num_anomalies"] = min(params["num_anomalies"], config.cache.max_anomalies)
    depths = config.cache.racp_depths
    params["racp_depth"] = min(depths, key=lambda d: abs(d - PAPER_DEFAULT["racp_depth"]))
    return params


@dataclass
class Experiment:
    """One Tune experiment of the sweep and its outcome."""

    name: str
    categories: tuple[str, ...]
    results: tune.ResultGrid | None = None


def run_experiment(
    config: SweepConfig, sid: str, name: str, context: TrialContext, metric: str, param_space: dict[str, Any],
    search: OptunaSearch | None, num_samples: int, use_scheduler: bool,
) -> tune.ResultGrid:
    """Run (or resume) one experiment under ``<storage_path>/<sweep id>/<name>``."""
    storage = f"{config.tune.storage_path.rstrip('/')}/{sid}"
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    path = f"{storage}/{name}"
    trainable = tune.with_resources(
        tune.with_parameters(train_bgad, context=context),
        {"cpu": config.tune.cpus_per_trial, "gpu": config.tune.gpus_per_trial,
         **config.tune.custom_resources_per_trial},
    )
    if tune.Tuner.can_restore(path):
        log.info("resuming experiment %s from %s", name, path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space)
        return _completed(tuner.fit(), name, num_samples * _grid_size(param_space))
    max_t = int(context.fixed["meta_epochs"])
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=scheduler(config, metric, max_t) if use_scheduler else FIFOScheduler(),
            num_samples=num_samples,
            max_concurrent_trials=config.tune.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=MODE
            ),
            callbacks=[SweepProgress(name, metric, max_t)],
            verbose=0,
        ),
    )
    return _completed(tuner.fit(), name, num_samples * _grid_size(param_space))


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


def test_evaluation(result: tune.Result, metric: str, manifest: Mapping[str, Any], category: str) -> dict[str, Any]:
    """Evaluate a trial's best-validation checkpoint on the test split of ``category``: the only test read."""
    checkpoint = result.get_best_checkpoint(metric, MODE) or result.checkpoint
    with checkpoint.as_directory() as folder:
        saved = load_checkpoint(Path(folder) / category / MODEL_FILE)
    model, config, normalization = model_from_checkpoint(saved)
    test = read_features(manifest, category, ["test"])
    size = tuple(saved["image_size"])
    metrics = evaluate(model, test, normalization, size, config).metrics
    return {
        "trial_id": result.metrics.get("trial_id"),
        "epoch": saved["epoch"],
        "val": {k.removeprefix("val_"): v for k, v in saved["metrics"].items()},
        "test": metrics,
        "config": {**saved["train_config"], **{k: result.config.get(k) for k in DATA_KEYS if k in result.config}},
    }


def baseline_evaluation(config: SweepConfig, manifest: Mapping[str, Any], category: str) -> dict[str, Any]:
    """Fit the one-class PatchCore baseline on the category's training normals; its validation and test metrics.

    It reads the same cached features, splits and metrics as the trials, so the difference to the best trial is
    exactly what the labelled anomalies (and BGAD's training) bought. It never influences which trial wins.
    """
    spec = config.baseline
    strides = [level["stride"] for level in manifest["levels"]]
    levels = [strides.index(stride) for stride in spec.strides]
    started = time.monotonic()
    model = PatchCore(coreset_ratio=spec.coreset_ratio, num_neighbors=spec.num_neighbors)
    model.fit(read_features(manifest, category, ["train_normal"], levels=levels))
    size = (manifest["image_size"], manifest["image_size"])
    result = {split: model.evaluate(read_features(manifest, category, [split], levels=levels), size)
              for split in ("val", "test")}
    return {**result, "config": spec.model_dump(mode="json"), "seconds": round(time.monotonic() - started, 1)}


class SweepFailed(RuntimeError):
    """Every trial of an experiment failed or diverged: there is no configuration to evaluate."""


def best_result(results: tune.ResultGrid, metric: str) -> tune.Result:
    """The trial whose best meta-epoch has the highest validation objective (test is never looked at)."""
    try:
        return results.get_best_result(metric=metric, mode=MODE, scope="all", filter_nan_and_inf=True)
    except RuntimeError as error:  # Tune's "No best trial found": no finite value of the metric anywhere
        raise SweepFailed(
            f"no trial of {results.experiment_path} reported a finite {metric} ({len(results)} trials, "
            f"{len(results.errors)} errored; their MLflow runs carry the reason in tag {FAILURE_TAG})"
        ) from error


def close_child_runs(results: tune.ResultGrid, tracking_info: tracking.Tracking, sid: str, max_t: int) -> dict[str, int]:
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
        outcome = "failed" if failed else ("finished" if iterations >= max_t else "pruned")
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
    tracking.set_tags(client, info.parent_run_id, {"bgad.cache_uri": tracking.redact(cache_uri), "bgad.categories": ",".join(manifest["categories"])})
    fixed = fixed_params(config)
    max_t = int(fixed["meta_epochs"])
    categories = list(manifest["categories"])
    groups = [(c, (c,)) for c in categories] if config.mode == "per_category" else [("shared", tuple(categories))]
    device = "cuda" if config.tune.gpus_per_trial > 0 else "cpu"
    threads = max(1, int(config.tune.cpus_per_trial))
    summary: dict[str, Any] = {"sweep_id": sid, "objective": metric, "categories": {}}
    for name, members in groups:
        context = TrialContext(sid, cache_uri, members, fixed, metric, info, config.mlflow.log_plots, threads, device)
        if config.search.algorithm == "optuna":
            results = run_experiment(config, sid, name, context, metric, {}, searcher(config, metric, f"{sid}/{name}"),
                                     config.search.num_samples, True)
        else:
            results = run_experiment(config, sid, name, context, metric, grid_space(config), None,
                                     config.search.num_samples, True)
        counts = close_child_runs(results, info, sid, max_t)
        reference = None
        if config.search.compare_paper_default:
            reference = run_experiment(config, sid, f"{name}-paper-default", context, metric,
                                       paper_default_params(config), None, 1, False)
            close_child_runs(reference, info, sid, max_t)
        best = best_result(results, metric)
        for category in members:
            entry = {"trials": counts, "best": test_evaluation(best, metric, manifest, category)}
            if reference is not None:
                entry["paper_default"] = test_evaluation(reference[0], metric, manifest, category)
            if config.baseline.enabled:
                entry["baseline"] = baseline_evaluation(config, manifest, category)
            summary["categories"][category] = entry
    summary["seconds"] = round(time.monotonic() - started, 1)
    _log_summary(client, info.parent_run_id, summary)
    return summary


def summary_table(summary: Mapping[str, Any]) -> str:
    """Markdown table: per category and arm (best trial, paper default, one-class baseline), val and test scores."""
    metric = summary["objective"].removeprefix("val_")
    lines = [f"| category | trials (fin/pruned/failed) | arm | val {metric} | test image AUROC | test pixel AUROC | "
             "test PRO |", "|---" * 7 + "|"]
    arms = (("best", "best trial"), ("paper_default", "paper default"), ("baseline", "PatchCore (no labels)"))
    for name, entry in summary["categories"].items():
        t = entry["trials"]
        for key, label in arms:
            if key not in entry:
                continue
            arm = entry[key]
            trials = f"{t['finished']}/{t['pruned']}/{t['failed']}" if key == "best" else "-"
            lines.append(
                f"| {name} | {trials} | {label} | {_num(arm['val'].get(metric))} | "
                f"{_num(arm['test'].get('image_auroc'))} | {_num(arm['test'].get('pixel_auroc'))} | "
                f"{_num(arm['test'].get('aupro'))} |"
            )
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _log_summary(client: Any, run_id: str, summary: Mapping[str, Any]) -> None:
    """Test metrics as parent-run metrics, the full summary and its table as artifacts; mark the run finished."""
    metrics = {}
    for name, entry in summary["categories"].items():
        metrics.update({f"{name}/best_test_{k}": v for k, v in entry["best"]["test"].items()})
        metrics.update({f"{name}/best_val_{k}": v for k, v in entry["best"]["val"].items()})
        if "paper_default" in entry:
            metrics.update({f"{name}/paper_default_test_{k}": v for k, v in entry["paper_default"]["test"].items()})
        if "baseline" in entry:
            metrics.update({f"{name}/baseline_test_{k}": v for k, v in entry["baseline"]["test"].items()})
    tracking.log_metrics(client, run_id, metrics, step=0)
    client.log_dict(run_id, dict(summary), "summary.json")
    client.log_text(run_id, summary_table(summary), "summary.md")
    tracking.with_retry(lambda: client.set_terminated(run_id, status="FINISHED"))
