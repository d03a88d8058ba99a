"""Promote a sweep trial to the MLflow model registry as a servable pyfunc, and point an alias at it.

    python -m sweeper.promote --sweep quickstart --best --name bgad-tiles            # best validation trial
    python -m sweeper.promote --sweep quickstart-1a2b3c4d --run-id <run> --name bgad-tiles --alias challenger

``--sweep`` is a sweep id (``quickstart-1a2b3c4d``), else the ``name`` of a sweep's config or an MLflow experiment
name: the latest sweep of that name or in that experiment. A name that finds sweeps in several experiments (as a
sweep name or as an experiment name) is an error listing them, so that ``--sweep <id>`` can pick one.

``--best`` takes the trial the sweep found best on *validation* (its ``summary.json``; while a sweep is unfinished,
the trial run whose best meta-epoch has the highest objective); test metrics never choose. Promoting a run again
creates no new version: the version whose ``bgad.source_run_id`` tag names the run (and category) gets the alias.
Aliases only, never the deprecated stages.

A version holds the model logged by ``sweeper.registry.serving`` (checkpoint + backbone weights, no network needed) and
tags saying where it came from: sweep, run, trial, category, cache key, configuration, validation metrics of the
promoted checkpoint, and its test metrics when the sweep's summary evaluated exactly that checkpoint. Both carry the
95 % intervals the sweep measured (``<metric>_lo`` / ``<metric>_hi``, ``bgad_core.evaluation.intervals``): one test figure of a
few dozen images is only as sure as its interval.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

import bgad_core
from bgad_core.backbone import FeatureExtractor
from bgad_core.engine.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from bgad_core.errors import ConfigError, DataError
from bgad_core.engine.inference import save_backbone_weights
from sweeper.registry import serving
from sweeper.tracking import mlflow_runs as tracking
from sweeper.job.names import SAFE_NAME_RULE, is_filter_value, is_safe_name, match

log = logging.getLogger("sweeper.promote")

SOURCE_SWEEP_TAG = "bgad.source_sweep_id"
SOURCE_RUN_TAG = "bgad.source_run_id"
CATEGORIES_TAG = "bgad.categories"  # on the sweep run (set by sweeper.tuning.sweep)
CHECKPOINT_ARTIFACT = "checkpoint/{category}/model.pt"
SUMMARY_ARTIFACT = "summary.json"
SWEEP_ROLE = {tracking.ROLE_TAG: "sweep"}
MODEL_NAME = "model"
REQUIREMENTS = ("torch", "timm", "FrEIA", "safetensors", "huggingface_hub", "numpy", "pillow", "scipy",
                "scikit-learn", "pandas", "mlflow")


class PromoteError(Exception):
    """Promotion cannot go ahead; the message says which sweep, run or category and why."""


@dataclass(frozen=True)
class Source:
    """The trial run being promoted, the sweep it belongs to and the category whose checkpoint is taken."""

    parent: Run
    trial: Run
    category: str

    @property
    def sweep_id(self) -> str:
        return self.parent.data.tags[tracking.SWEEP_TAG]


def promote(
    tracking_uri: str,
    sweep: str,
    name: str,
    run_id: str | None = None,
    category: str | None = None,
    alias: str = "champion",
    weights: str | None = None,
) -> ModelVersion:
    """Register the trial ``run_id`` (or the sweep's best trial when None) as a version of ``name``, set ``alias``.

    ``weights`` overrides the sweep's ``backbone.weights`` for rebuilding the backbone (checked by digest).
    The tracking store at ``tracking_uri`` also holds the registry (a database store: ``sqlite:///...`` works).
    """
    if not is_safe_name(name):
        raise PromoteError(f"--name {name!r}: a registered model name must be {SAFE_NAME_RULE}")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    parent = find_sweep_run(client, sweep)
    summary = read_summary(client, parent)
    if run_id:
        source = trial_source(client, parent, run_id, category)
    else:
        source = best_source(client, parent, summary, category)
    version = existing_version(client, name, source)
    if version is None:
        version = register(client, tracking_uri, name, source, summary, weights)
        log.info("registered %s version %s from run %s", name, version.version, source.trial.info.run_id)
    else:
        log.info("run %s is already %s version %s; only the alias moves", source.trial.info.run_id, name,
                 version.version)
    tracking.with_retry(lambda: client.set_registered_model_alias(name, alias, version.version))
    return client.get_model_version(name, version.version)


# ------------------------------------------------------------------------------------------------ which trial


def find_sweep_run(client: MlflowClient, sweep: str) -> Run:
    """The sweep run ``sweep`` names: a sweep id, else the latest sweep of a config name or in an experiment.

    The value is checked before any search, so a quote in it is a one-line error, never a filter parser error.
    """
    if not is_filter_value(sweep):
        raise PromoteError(f"--sweep {sweep!r}: not a sweep id, sweep name or experiment name (those are made of "
                           "letters, digits, '_', '.' and '-')")
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        raise PromoteError(f"--sweep {sweep!r}: the tracking store holds no experiment")
    by_id = _search(client, experiments, match({**SWEEP_ROLE, tracking.SWEEP_TAG: sweep}), 1)
    if by_id:
        return by_id[0]
    named = _search(client, experiments, match({**SWEEP_ROLE, tracking.SWEEP_NAME_TAG: sweep}))
    candidates = _latest_per_experiment(named)
    experiment = client.get_experiment_by_name(sweep)
    if experiment is not None and experiment.experiment_id not in {r.info.experiment_id for r in candidates}:
        candidates += _search(client, [experiment.experiment_id], match(SWEEP_ROLE), 1)
    if not candidates:
        raise PromoteError(f"--sweep {sweep!r}: no sweep with that id or name, and no experiment of that name "
                           "holding a sweep")
    if len(candidates) > 1:
        raise PromoteError(f"--sweep {sweep!r} finds sweeps in {len(candidates)} experiments; pass one sweep id: "
                           + "; ".join(_describe_sweep(client, run) for run in candidates))
    log.info("--sweep %s: promoting from sweep %s", sweep, candidates[0].data.tags[tracking.SWEEP_TAG])
    return candidates[0]


def _search(client: MlflowClient, experiments: list[str], query: str, max_results: int = 1000) -> list[Run]:
    """Runs matching ``query``, latest first."""
    return tracking.with_retry(lambda: client.search_runs(experiments, query, max_results=max_results,
                                                          order_by=["start_time DESC"]))


def _latest_per_experiment(runs: Sequence[Run]) -> list[Run]:
    """The first (latest) of ``runs`` in each experiment, in the order given."""
    latest: dict[str, Run] = {}
    for run in runs:
        latest.setdefault(run.info.experiment_id, run)
    return list(latest.values())


def _describe_sweep(client: MlflowClient, run: Run) -> str:
    """``<sweep id> (experiment <name>, started <UTC time>, <status>)``: what tells candidate sweeps apart."""
    experiment = client.get_experiment(run.info.experiment_id).name
    started = dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{run.data.tags[tracking.SWEEP_TAG]} (experiment {experiment}, started {started}, {run.info.status})"


def trial_source(client: MlflowClient, parent: Run, run_id: str, category: str | None) -> Source:
    """The trial run ``run_id``, checked to be a trial of ``parent``'s sweep."""
    trial = existing_run(client, run_id, f"--run-id {run_id!r}")
    tags = trial.data.tags
    sweep_id = parent.data.tags[tracking.SWEEP_TAG]
    if tags.get(tracking.ROLE_TAG) != "trial" or tags.get(tracking.SWEEP_TAG) != sweep_id:
        raise PromoteError(f"--run-id {run_id!r} is not a trial run of sweep {sweep_id}")
    return Source(parent, trial, pick_category(tags.get(tracking.CATEGORY_TAG, ""), category, f"run {run_id}"))


def existing_run(client: MlflowClient, run_id: str, name: str) -> Run:
    """The run ``run_id``; a PromoteError saying that ``name`` names no run if the store has none."""
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise PromoteError(f"{name}: no such run in the tracking store") from err
        raise


def best_source(client: MlflowClient, parent: Run, summary: Mapping[str, Any] | None, category: str | None) -> Source:
    """The sweep's best trial for the category: from its summary, or (unfinished sweep) by trial objective."""
    sweep_id = parent.data.tags[tracking.SWEEP_TAG]
    chosen = pick_category(parent.data.tags.get(CATEGORIES_TAG, ""), category, f"sweep {sweep_id}")
    if summary is not None and chosen in summary.get("categories", {}):
        trial_id = summary["categories"][chosen]["best"]["trial_id"]
        tags = {tracking.SWEEP_TAG: sweep_id, tracking.TRIAL_TAG: trial_id}
        run_id = tracking.find_run(client, parent.info.experiment_id, tags)
        if run_id is None:
            raise PromoteError(f"sweep {sweep_id}: its summary names trial {trial_id}, which has no MLflow run")
        return Source(parent, client.get_run(run_id), chosen)
    return Source(parent, best_trial_by_objective(client, parent, chosen), chosen)


def best_trial_by_objective(client: MlflowClient, parent: Run, category: str) -> Run:
    """Trial run of ``category`` whose best meta-epoch has the highest validation objective.

    The same choice the sweep makes for its summary (best over all epochs, ``scope="all"``), for sweeps that have
    not written one yet.
    """
    objective = parent.data.params.get("objective")
    if not objective:
        raise PromoteError(f"sweep run {parent.info.run_id} records no 'objective' parameter and no summary")
    sweep_id = parent.data.tags[tracking.SWEEP_TAG]
    query = match({tracking.SWEEP_TAG: sweep_id, tracking.ROLE_TAG: "trial"})
    runs = client.search_runs([parent.info.experiment_id], query, max_results=10000)
    best: dict[str, float] = {}
    for run in runs:
        if category in _categories(run.data.tags.get(tracking.CATEGORY_TAG, "")):
            values = [m.value for m in client.get_metric_history(run.info.run_id, objective) if m.value == m.value]
            if values:
                best[run.info.run_id] = max(values)
    if not best:
        raise PromoteError(f"sweep {sweep_id}: no trial of category {category!r} has reported {objective} yet")
    return next(r for r in runs if r.info.run_id == max(best, key=best.get))


def pick_category(tag: str, requested: str | None, owner: str) -> str:
    """``requested`` if ``owner`` has it, or ``owner``'s only category."""
    available = _categories(tag)
    if requested is not None:
        if requested not in available:
            raise PromoteError(f"--category {requested!r}: {owner} has {available}")
        return requested
    if len(available) != 1:
        raise PromoteError(f"{owner} has categories {available}: pass --category")
    return available[0]


def _categories(tag: str) -> list[str]:
    return [c for c in tag.split(",") if c]


def read_summary(client: MlflowClient, parent: Run) -> dict[str, Any] | None:
    """The sweep's ``summary.json``, or None while the sweep has not written it."""
    if not any(a.path == SUMMARY_ARTIFACT for a in client.list_artifacts(parent.info.run_id)):
        return None
    with tempfile.TemporaryDirectory(prefix="bgad-promote-") as folder:
        return json.loads(Path(client.download_artifacts(parent.info.run_id, SUMMARY_ARTIFACT, folder)).read_text())


def existing_version(client: MlflowClient, name: str, source: Source) -> ModelVersion | None:
    """The version of ``name`` already registered from this run and category, if any."""
    versions = client.search_model_versions(match({SOURCE_RUN_TAG: source.trial.info.run_id}, name=name))
    matching = [v for v in versions if v.tags.get(tracking.CATEGORY_TAG) == source.category]
    return min(matching, key=lambda v: int(v.version)) if matching else None


# -------------------------------------------------------------------------------------------- building the model


def register(
    client: MlflowClient, tracking_uri: str, name: str, source: Source, summary: Mapping[str, Any] | None,
    weights: str | None,
) -> ModelVersion:
    """Log the servable model into the sweep's experiment and register it as a new version of ``name``."""
    run_id = source.trial.info.run_id
    with tempfile.TemporaryDirectory(prefix="bgad-promote-") as scratch:
        folder = Path(scratch)
        checkpoint, extractor = trial_model(client, source, folder / "download", weights)
        served_checkpoint = save_checkpoint(checkpoint, folder / "model.pt")
        artifacts = {
            serving.CHECKPOINT_ARTIFACT: str(served_checkpoint),
            serving.BACKBONE_ARTIFACT: str(save_backbone_weights(extractor, folder / "backbone.safetensors")),
        }
        with fluent_mlflow(tracking_uri, source.parent.info.experiment_id):  # the registry resolves models:/ there too
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=serving.__file__,
                artifacts=artifacts,
                code_paths=[str(Path(bgad_core.__file__).parent)],
                signature=serving.SIGNATURE,
                input_example=serving.input_example(tuple(checkpoint["image_size"])),
                pip_requirements=pip_requirements(),
            )
            ensure_registered_model(client, name)
            return tracking.with_retry(lambda: client.create_model_version(
                name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                tags=version_tags(source, checkpoint, summary),
                description=f"{checkpoint['family']} detector for {source.category} from sweep {source.sweep_id}, trial "
                            f"{source.trial.data.tags.get(tracking.TRIAL_TAG)}, meta-epoch {checkpoint['epoch']}",
            ))


def trial_model(
    client: MlflowClient, source: Source, folder: Path, weights: str | None
) -> tuple[dict[str, Any], FeatureExtractor]:
    """The trial's checkpoint, its backbone description completed from the sweep, and that backbone rebuilt.

    ``weights`` overrides the sweep's ``backbone.weights`` (the digest must still match).
    """
    run_id = source.trial.info.run_id
    checkpoint = download_checkpoint(client, source, folder)
    sweep_config = _sweep_config(source.parent)
    backbone = complete_backbone(checkpoint, sweep_config, f"run {run_id}")
    spec = weights or backbone.get("weights") or _get(sweep_config, "backbone", "weights")
    return {**checkpoint, "backbone": backbone}, rebuild_backbone(backbone, spec, f"run {run_id}")


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model ``name`` unless it exists."""
    try:
        tracking.with_retry(lambda: client.create_registered_model(name))
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


@contextlib.contextmanager
def fluent_mlflow(tracking_uri: str, experiment_id: str) -> Iterator[None]:
    """Point MLflow's fluent API, the only one ``log_model`` speaks, at the sweep's store and experiment.

    Both are process globals that MLflow also exports as environment variables to subprocesses; they are put back
    afterwards, so promoting never changes where the caller or its children log.
    """
    saved = {name: os.environ.get(name) for name in (MLFLOW_TRACKING_URI.name, MLFLOW_EXPERIMENT_ID.name)}
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    os.environ[MLFLOW_EXPERIMENT_ID.name] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def download_checkpoint(client: MlflowClient, source: Source, folder: Path) -> dict[str, Any]:
    """The trial's checkpoint for the category, read with ``weights_only=True``."""
    artifact = CHECKPOINT_ARTIFACT.format(category=source.category)
    run_id = source.trial.info.run_id
    try:
        path = client.download_artifacts(run_id, artifact, str(folder))
    except (MlflowException, OSError) as err:
        raise PromoteError(f"run {run_id} has no {artifact} (has the trial reported a meta-epoch?): {err}") from err
    checkpoint = load_checkpoint(path)
    if checkpoint.get("category", source.category) != source.category:
        raise PromoteError(f"run {run_id}: {artifact} holds category {checkpoint['category']!r}")
    return checkpoint


def complete_backbone(
    checkpoint: Mapping[str, Any], sweep_config: Mapping[str, Any] | None, owner: str
) -> dict[str, Any]:
    """The checkpoint's backbone description, with what a served model needs and older sweep checkpoints lack
    (strides, storage dtype of the training features) taken from the sweep's configuration."""
    backbone = dict(checkpoint["backbone"])
    fallbacks = {"strides": ("backbone", "strides"), "feature_dtype": ("cache", "dtype")}
    for key, (section, field) in fallbacks.items():
        if key not in backbone:
            value = _get(sweep_config, section, field)
            if value is None:
                raise PromoteError(f"{owner}: the checkpoint lacks backbone {key} and the sweep's config is unreadable")
            backbone[key] = value
    return backbone


def rebuild_backbone(backbone: Mapping[str, Any], weights: str | None, owner: str) -> FeatureExtractor:
    """The backbone with exactly the weights the trial was trained on (same digest), or a PromoteError."""
    if weights is None:
        raise PromoteError(f"{owner}: the sweep's backbone weights are unknown; pass --weights")
    try:
        extractor = FeatureExtractor(backbone["name"], weights=weights, strides=backbone["strides"])
    except (ConfigError, DataError) as err:
        raise PromoteError(
            f"{owner}: cannot rebuild backbone {backbone['name']} with weights {weights!r}: {err}"
        ) from err
    if extractor.weights_digest != backbone["weights_digest"]:
        raise PromoteError(
            f"{owner}: weights {weights!r} resolve to {extractor.weights_source} (digest {extractor.weights_digest}), "
            f"but the trial was trained on {backbone.get('weights_source')} (digest {backbone['weights_digest']}); "
            "pass --weights pointing at those weights"
        )
    return extractor


def version_tags(source: Source, checkpoint: Mapping[str, Any], summary: Mapping[str, Any] | None) -> dict[str, str]:
    """Where the version came from and how good it is (validation of this checkpoint; test when evaluated), each
    figure with its interval (``_lo`` / ``_hi``) where the sweep measured one."""
    trial = source.trial
    trial_id = trial.data.tags.get(tracking.TRIAL_TAG, "")
    config = checkpoint_config(checkpoint)
    config.update({k: _parse(v) for k, v in trial.data.params.items() if k not in config})
    tags = {
        SOURCE_SWEEP_TAG: source.sweep_id,
        SOURCE_RUN_TAG: trial.info.run_id,
        tracking.TRIAL_TAG: trial_id,
        tracking.CATEGORY_TAG: source.category,
        tracking.FAMILY_TAG: str(checkpoint["family"]),
        "bgad.cache_key": checkpoint.get("cache_key") or source.parent.data.params.get("cache_key", ""),
        "bgad.config": json.dumps(config, sort_keys=True),
        "bgad.epoch": str(checkpoint["epoch"]),
        "bgad.threshold": str(checkpoint["threshold"]),
        "bgad.backbone": f"{checkpoint['backbone']['name']} {checkpoint['backbone']['weights_digest']}",
        "bgad.val_metrics": json.dumps({k.removeprefix("val_"): v for k, v in checkpoint["metrics"].items()},
                                       sort_keys=True),
    }
    test = summary_test_metrics(summary, source.category, trial_id, int(checkpoint["epoch"]))
    if test is not None:
        tags["bgad.test_metrics"] = json.dumps(test, sort_keys=True)
    return tags


def summary_test_metrics(
    summary: Mapping[str, Any] | None, category: str, trial_id: str, epoch: int
) -> dict[str, float] | None:
    """Test metrics the sweep measured for exactly this trial and meta-epoch (the best trial or another tested trial:
    the paper default, the label-free twin or the labelled run it replaced), if any."""
    entries = (summary or {}).get("categories", {}).get(category, {})
    for entry in (entries.get(arm) for arm in ("best", "paper_default", "label_free_twin", "labelled")):
        if entry and entry.get("trial_id") == trial_id and entry.get("epoch") == epoch:
            return dict(entry["test"])
    return None


def pip_requirements() -> list[str]:
    """The installed versions of what the served model imports (pinned, so a rebuilt environment matches)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def _sweep_config(parent: Run) -> dict[str, Any] | None:
    """The sweep's validated config as logged on its run (None if missing or cut short by the param limit)."""
    try:
        return json.loads(parent.data.params.get("config", ""))
    except ValueError:
        return None


def _get(config: Mapping[str, Any] | None, section: str, key: str) -> Any:
    return ((config or {}).get(section) or {}).get(key)


def _parse(value: str) -> Any:
    """A logged parameter back as the number/bool/list it was (MLflow stores strings)."""
    try:
        return json.loads(value)
    except ValueError:
        return {"True": True, "False": False, "None": None}.get(value, value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True,
                        help="sweep id, sweep name (the config's name: its latest sweep) or MLflow experiment name")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="MLflow run id of the trial to promote")
    which.add_argument("--best", action="store_true", help="the trial with the best validation objective")
    parser.add_argument("--category", help="category to promote (needed when the sweep/trial has several)")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", default="champion", help="alias to point at the version (default: champion)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    parser.add_argument("--weights", help="backbone weights (mode or file) if the sweep's cannot be rebuilt here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uri = tracking.default_tracking_uri(args.tracking_uri)
    try:
        version = promote(uri, args.sweep, args.name, args.run_id, args.category, args.alias, args.weights)
    except (PromoteError, ConfigError, DataError, MlflowException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"name": version.name, "version": version.version, "aliases": list(version.aliases),
                      "source_run_id": version.tags.get(SOURCE_RUN_TAG),
                      "model_uri": f"models:/{version.name}@{args.alias}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
