"""Security: checkpoints and registry models are only ever read with ``weights_only=True`` (nothing unpickles
code), and credentials inside URIs never reach MLflow params/tags or the job's log lines. (Ray token auth on the
cluster: ``test_driver_killed.py::test_cluster_refuses_clients_without_its_token``; credentials in the job's
environment: ``test_divergence.py``.)"""

from __future__ import annotations

import ast
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

import sweeper.sweep
from bgad_core.checkpoint import CHECKPOINT_VERSION, load_checkpoint
from faults.conftest import edit_config, sweep_runs, tiny_sweep
from ray_processes import REPO
from sweeper import tracking
from sweeper.config import load_config
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
    record = logging.LogRecord("sweeper.cache", logging.WARNING, __file__, 1, "rebuilding feature cache %s: %s",
                               ("s3://AKIAEXAMPLE0000:wJalrXUtnFEMI@bucket/cache/k", "shard missing"), None)
    line = RedactingFormatter(LOG_FORMAT).format(record)
    assert "s3://***@bucket/cache/k" in line and not any(secret in line for secret in SECRETS)


class _StopAfterParams(Exception):
    pass


def test_sweep_run_params_and_tags_carry_no_credentials(tmp_path, monkeypatch):
    """The sweep's MLflow run logs the whole config; URIs in it (Optuna storage, Tune storage, cache) are masked."""
    config_path = edit_config(tiny_sweep(tmp_path), lambda raw: (
        raw["tune"].update(optuna_storage="postgresql://bob:hunter2@db.example/optuna",
                           storage_path="s3://bucket/tune?access_key=AKIAEXAMPLE0000&secret_key=wJalrXUtnFEMI"),
        raw["cache"].update(root="s3://AKIAEXAMPLE0000:wJalrXUtnFEMI@bucket/cache"),
    ))
    config = load_config(config_path)

    def stop(*args, **kwargs):
        raise _StopAfterParams

    monkeypatch.setattr(sweeper.sweep, "searcher", stop)  # nothing past the sweep run's params and tags
    manifest = {"key": "k", "categories": {"synthetic-tiles": {"has_masks": True}}}
    cache_uri = "s3://AKIAEXAMPLE0000:wJalrXUtnFEMI@bucket/cache/k"
    with pytest.raises(_StopAfterParams):
        sweeper.sweep.run_sweep(config, cache_uri, manifest, config.mlflow.tracking_uri)

    [run] = sweep_runs(config_path)
    written = json.dumps({**run.data.params, **run.data.tags})
    assert not [secret for secret in SECRETS if secret in written], written
    logged = json.loads(run.data.params["config"])
    assert logged["tune"]["optuna_storage"] == "postgresql://***@db.example/optuna"
    assert logged["cache"]["root"] == "s3://***@bucket/cache"
    assert run.data.tags["bgad.cache_uri"] == "s3://***@bucket/cache/k"


def test_mlflow_prints_no_run_urls():
    """MLflow prints ``View run ... at: <tracking URI>`` (credentials included: seen with a real server and
    ``http://user:password@host``) whenever a run ends; ``sweeper.tracking`` turns that off for every process that
    logs (the driver and each trial)."""
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True
