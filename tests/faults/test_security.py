"""Security: checkpoints and registry models are only ever read with ``weights_only=True`` (nothing unpickles
code); a config URL carrying a credential is refused, Tune copies no credential into trials' runtime_env, and
credentials inside URIs are masked in the job's log lines. (Ray token auth on the cluster:
``test_driver_killed.py::test_cluster_refuses_clients_without_its_token``; a whole sweep with canary credentials:
``test_secrets.py``.)"""

from __future__ import annotations

import ast
import logging
import pickle
from pathlib import Path

import pytest
import torch
from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, _ActorClassCache

import sweeper.run
from bgad_core.engine.checkpoint import CHECKPOINT_VERSION, load_checkpoint
from faults.conftest import edit_config, tiny_sweep
from ray_processes import REPO
from sweeper.job import credentials
from sweeper.tracking import mlflow_runs as tracking
from sweeper.run import LOG_FORMAT, RedactingFormatter

PACKAGES = ("bgad_core", "sweeper")
SECRETS = ("hunter2", "wJalrXUtnFEMI", "s3cr3t", "AKIAEXAMPLE0000")


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of ``<something>.<name>(...)`` in the product packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                    found.append((path, node))
    return found


def test_every_torch_load_is_weights_only():
    loads = _calls("load")
    torch_loads = [(p, c) for p, c in loads if isinstance(c.func.value, ast.Name) and c.func.value.id == "torch"]
    assert torch_loads, "expected torch.load calls (checkpoints, trainer state, backbone files)"
    unsafe = [f"{p.relative_to(REPO)}:{c.lineno}" for p, c in torch_loads
              if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in c.keywords)]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    pickles = [f"{p.relative_to(REPO)}:{c.lineno}" for p, c in loads
               if isinstance(c.func.value, ast.Name) and c.func.value.id in ("pickle", "cloudpickle", "dill")]
    assert not pickles, f"unpickling in product code: {pickles}"


class _Payload:
    """What a tampered checkpoint could carry: unpickling it would run ``Path.touch``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pt"
    torch.save({"version": CHECKPOINT_VERSION, "flows": {}, "extra": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)  # also what the registry's Scorer.load and the serving model read through
    assert not marker.exists()


@pytest.mark.parametrize("text, expected", [
    ("http://alice:s3cr3t@mlflow.example:5000", "http://***@mlflow.example:5000"),
    ("postgresql+psycopg2://bob:hunter2@db/optuna", "postgresql+psycopg2://***@db/optuna"),
    ("s3://bucket/cache?access_key=AKIAEXAMPLE0000&secret_key=wJalrXUtnFEMI&region=eu",
     "s3://bucket/cache?access_key=***&secret_key=***&region=eu"),
    ('{"uri": "https://tok@host/x?token=s3cr3t"}', '{"uri": "https://***@host/x?token=***"}'),
    *[(clean, clean) for clean in ("sqlite:////tmp/runs/mlflow.db", "s3://bucket/key", "mail a@b.c", "x?tokens")],
])
def test_redact_masks_credentials_in_uris_only(text, expected):
    assert tracking.redact(text) == expected


def test_job_log_lines_mask_credentials():
    record = logging.LogRecord("sweeper.cache.build", logging.WARNING, __file__, 1, "rebuilding feature cache %s: %s",
                               ("s3://AKIAEXAMPLE0000:wJalrXUtnFEMI@bucket/cache/k", "shard missing"), None)
    line = RedactingFormatter(LOG_FORMAT).format(record)
    assert "s3://***@bucket/cache/k" in line and not any(secret in line for secret in SECRETS)


# (config key, a URL there carrying a credential, what the error says to do instead)
SECRET_URLS = [
    ("tune.optuna_storage", "postgresql+psycopg2://bob:hunter2@db.example/optuna", "PGPASSWORD or ~/.pgpass"),
    ("tune.storage_path", "s3://bucket/tune?access_key=AKIAEXAMPLE0000&secret_key=wJalrXUtnFEMI", "IAM role"),
    ("cache.root", "s3://AKIAEXAMPLE0000:wJalrXUtnFEMI@bucket/cache", "AWS_SHARED_CREDENTIALS_FILE"),
    ("mlflow.tracking_uri", "https://alice:s3cr3t@mlflow.example", "MLFLOW_TRACKING_PASSWORD"),
    ("mlflow.artifact_location", "gs://bucket/artifacts?token=s3cr3t", "GOOGLE_APPLICATION_CREDENTIALS"),
    ("datasets[0].path", "s3://bucket/data?X-Amz-Signature=s3cr3t", "AWS_ACCESS_KEY_ID"),
]


def _set(raw: dict, key: str, value: str) -> None:
    if key.startswith("datasets"):
        raw["datasets"] = [{"path": value}]
    else:
        section, field = key.split(".")
        raw.setdefault(section, {})[field] = value


@pytest.mark.parametrize("key, url, instead", SECRET_URLS, ids=[key for key, _, _ in SECRET_URLS])
def test_a_config_url_carrying_a_credential_is_refused_without_echoing_it(key, url, instead, tmp_path, capsys,
                                                                          no_ray_work):
    """Tune pickles the Optuna storage (URL included) into its storage, the config is logged to MLflow and hashed
    into the sweep id: such a URL is refused before anything runs, with where the secret goes instead."""
    config_path = edit_config(tiny_sweep(tmp_path), lambda raw: _set(raw, key, url))
    assert sweeper.run.main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert f"{key}: carries " in err and instead in err, err
    assert not [secret for secret in SECRETS if secret in err], err


@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://bgad@db.example:5432/optuna", "postgresql+psycopg2:///optuna", "sqlite:////tmp/x.db",
    "mysql+pymysql://bgad@db/optuna?read_default_file=~/.my.cnf", "http://mlflow:5000", "s3://bucket/tune?region=eu",
    "runs/tune", "/data/user@host/cache",
])
def test_urls_without_a_secret_are_accepted(url):
    assert credentials.uri_problem(url) is None


def test_a_tracking_uri_with_a_password_from_the_environment_is_refused_before_ray(tmp_path, capsys, monkeypatch,
                                                                                  no_ray_work):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cr3t@127.0.0.1:5000")
    config_path = edit_config(tiny_sweep(tmp_path), lambda raw: raw["mlflow"].pop("tracking_uri"))
    assert sweeper.run.main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert "$MLFLOW_TRACKING_URI: carries a password" in err and "MLFLOW_TRACKING_USERNAME" in err, err
    assert "s3cr3t" not in err


class _Trainable:
    pass


def test_tune_copies_no_credential_into_a_trials_runtime_env(monkeypatch):
    """Tune puts the driver's AWS keys into every trial actor's runtime_env, which Ray logs in plain text
    (``runtime_env_agent.log``); the sweep turns that off and trials read them from their node's environment."""
    for name in credentials.TUNE_FORWARDED:
        monkeypatch.setenv(name, f"canary-{name}")
    credentials.keep_out_of_trial_runtime_env()
    runtime_env = _ActorClassCache().get(_Trainable)._default_options["runtime_env"]
    assert runtime_env["env_vars"] == DEFAULT_ENV_VARS  # Tune's own variables stay


def test_mlflow_prints_no_run_urls():
    """MLflow prints ``View run ... at: <tracking URI>`` (credentials included: seen with a real server and
    ``http://user:password@host``) whenever a run ends; ``sweeper.tracking.mlflow_runs`` turns that off for every process that
    logs (the driver and each trial)."""
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True
