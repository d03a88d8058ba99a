"""MLflow bookkeeping: one parent run per sweep, one child run per trial, found again on resume.

Runs are found by tags rather than remembered in memory, so a restarted driver or a retried trial continues its
run instead of creating a duplicate. Every call goes through an explicit ``MlflowClient`` (no global active run),
which is safe from Ray worker processes, and retries briefly on SQLite's "database is locked".
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bgad_core.errors import ConfigError
from sweeper.job.credentials import SECRET_QUERY_KEY
from sweeper.job.names import match

log = logging.getLogger(__name__)
T = TypeVar("T")
# MLflow prints "View run ... at: <tracking URI>/#/..." on every run it ends, the URI verbatim: with an HTTP server
# given as http://user:password@host that would put the password on the console of the driver and of every trial.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

SWEEP_TAG = "bgad.sweep_id"
SWEEP_NAME_TAG = "bgad.sweep_name"  # the config's name, on the sweep run: what `promote --sweep <name>` finds
ROLE_TAG = "bgad.role"
TRIAL_TAG = "bgad.trial_id"
CATEGORY_TAG = "bgad.category"
FAMILY_TAG = "bgad.family"  # the trial's detector family
PARENT_TAG = "mlflow.parentRunId"
INTERRUPTED_TAG = "bgad.interrupted"
# What the experiment is to MLflow's UI: model training (a runs table), not GenAI development (traces). MLflow 3.17's
# UI opens an experiment as its workflow switch says (the URL's ``workflowType``, default GenAI) and reads the tag
# when that switch is off; MLflow's own API writes the tag. Values: mlflow/server/js, ExperimentKind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# A saved view of the runs table (the UI's "share view": an experiment tag holding its state, opened by
# ``?viewStateShareKey=<key>``): the columns a sweep's results need, which the default table (Source, Models, Dataset)
# does not show.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
DEFAULT_RUN_COLUMNS = ("attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`")
MLFLOW_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise
SQLITE_PREFIX = "sqlite:///"
LOCAL_TRACKING_URI = "sqlite:///runs/mlflow.db"  # relative to the project directory (sweeper/run.py --project-dir)
REACHABILITY_TIMEOUT_S = 5.0  # per socket operation: a silent server is reported well within 10 s
_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@\"']+@")
_SECRET_QUERY = re.compile(rf"(?i)(?P<key>[?&;]{SECRET_QUERY_KEY}=)[^&;\s\"']*")


@dataclass(frozen=True)
class Tracking:
    """Where a sweep logs: tracking server/store, experiment and the sweep's parent run."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)


def with_retry(call: Callable[[], T], attempts: int = 8, delay_s: float = 0.25) -> T:
    """Run an MLflow call, retrying while a SQLite store reports it is locked by another writer."""
    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as error:
            if "locked" not in str(error).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay_s * (attempt + 1))
    raise AssertionError("unreachable")


def redact(text: str) -> str:
    """``text`` with the credentials of any URI in it masked: ``scheme://user:password@host`` becomes
    ``scheme://***@host`` and secret query parameters (``?secret_key=...``, ``&token=...``) become ``***``.

    Applied to everything a sweep writes to MLflow params/tags and to its console log lines: URIs in a config
    (tracking server, Optuna storage, cache or Tune storage on S3) may carry credentials.
    """
    return _SECRET_QUERY.sub(r"\g<key>***", _URI_USERINFO.sub(r"\g<scheme>***@", text))


def check_reachable(tracking_uri: str, timeout_s: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail within ``timeout_s`` with a clear message when an HTTP tracking server does not answer.

    MLflow's own client retries for minutes before giving up; a sweep should not start trials that cannot log.
    The probe (``/health``) needs no credentials, so any ``user:password@`` in the URI is left out of it.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(tracking_uri)
    host = parts.netloc.rpartition("@")[2]
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (user-configured URI)
            response.read()
    except (OSError, ValueError) as error:  # ValueError: http.client.InvalidURL (e.g. a bad port)
        raise ConfigError(
            f"mlflow.tracking_uri: tracking server {redact(tracking_uri)} is unreachable ({redact(str(error))})"
        ) from error


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Id of the experiment ``name``, created (with ``artifact_location``) if it does not exist, tagged as a
    model-training experiment (also one created before sweeps set the tag, unless someone chose another kind)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        if artifact_location and "://" not in artifact_location:
            artifact_location = Path(artifact_location).resolve().as_uri()
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def save_runs_view(client: MlflowClient, experiment_id: str, key: str, metrics: Sequence[str]) -> str:
    """Save a view of the experiment's runs table showing ``metrics`` after the default columns; returns its URL
    under ``mlflow ui`` (model-training workflow, so the runs table rather than the GenAI overview opens)."""
    state = {"selectedColumns": [*DEFAULT_RUN_COLUMNS, *(f"metrics.`{name}`" for name in metrics)]}
    with_retry(lambda: client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG_PREFIX + key, json.dumps(state)))
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "viewStateShareKey": key})
    return f"{MLFLOW_UI_URL}/#/experiments/{experiment_id}/runs?{query}"


def find_run(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """Id of the most recent run whose tags match all of ``tags``, if any."""
    runs = with_retry(lambda: client.search_runs([experiment_id], match(tags), max_results=1,
                                                 order_by=["start_time DESC"]))
    return runs[0].info.run_id if runs else None


def start_parent_run(
    tracking_uri: str, experiment: str, artifact_location: str | None, sweep_id: str, run_name: str
) -> Tracking:
    """Continue the sweep's parent run if one exists (a resumed sweep), else create it."""
    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = with_retry(lambda: ensure_experiment(client, experiment, artifact_location))
    tags = {SWEEP_TAG: sweep_id, ROLE_TAG: "sweep"}
    run_id = find_run(client, experiment_id, tags)
    if run_id is None:
        run_id = with_retry(lambda: client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id)
        log.info("MLflow: created sweep run %s in experiment %s", run_id, experiment)
    else:
        with_retry(lambda: client.update_run(run_id, status="RUNNING"))
        log.info("MLflow: continuing sweep run %s", run_id)
    return Tracking(tracking_uri, experiment_id, run_id)


def start_child_run(tracking: Tracking, trial_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    """The trial's child run: found by trial id (a retried or resumed trial continues it) or created."""
    client = tracking.client()
    key = {SWEEP_TAG: tags[SWEEP_TAG], TRIAL_TAG: trial_id}
    run_id = find_run(client, tracking.experiment_id, key)
    if run_id is not None:
        with_retry(lambda: client.update_run(run_id, status="RUNNING"))
        return run_id
    all_tags = {**tags, **key, ROLE_TAG: "trial", PARENT_TAG: tracking.parent_run_id}
    return with_retry(lambda: client.create_run(tracking.experiment_id, tags=all_tags, run_name=run_name).info.run_id)


def mark_interrupted(tracking: Tracking, sweep_id: str, reason: str) -> None:
    """The sweep run and its still-running trial runs -> KILLED, tagged ``bgad.interrupted`` with ``reason``.

    A resumed sweep reopens them (RUNNING) as it continues them; until then nothing reads as running or finished.
    """
    client = tracking.client()
    query = match({SWEEP_TAG: sweep_id}, status="RUNNING")
    runs = with_retry(lambda: client.search_runs([tracking.experiment_id], query, max_results=10_000))
    for run in runs:
        with_retry(lambda: client.set_tag(run.info.run_id, INTERRUPTED_TAG, reason))
        with_retry(lambda: client.set_terminated(run.info.run_id, status="KILLED"))


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log parameters once; values already logged with the same value (a resumed run) are skipped."""
    existing = with_retry(lambda: client.get_run(run_id)).data.params
    new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    if new:
        with_retry(lambda: client.log_batch(run_id, params=new))


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log finite numeric metrics at ``step``."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _finite(v)]
    if batch:
        with_retry(lambda: client.log_batch(run_id, metrics=batch))


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    with_retry(lambda: client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))


def _finite(value: Any) -> bool:
    try:
        return float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False


def configured_tracking_uri(configured: str | None) -> str:
    """Configured URI, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store (the registry needs a database)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_TRACKING_URI


def default_tracking_uri(configured: str | None) -> str:
    """``resolve_tracking_uri``, with the folder of a relative SQLite file created (writers create the file)."""
    uri = resolve_tracking_uri(configured)
    if uri != configured_tracking_uri(configured):
        Path(uri.removeprefix(SQLITE_PREFIX)).parent.mkdir(parents=True, exist_ok=True)
    return uri


def resolve_tracking_uri(configured: str | None) -> str:
    """``configured_tracking_uri`` with a relative SQLite file made absolute. Creates nothing: a reader
    (``sweeper.serve``) must not leave an empty store or folder behind when it finds none."""
    uri = configured_tracking_uri(configured)
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        uri = f"{SQLITE_PREFIX}{Path(uri.removeprefix(SQLITE_PREFIX)).resolve()}"
    return uri
