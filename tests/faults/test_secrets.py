"""No credential in any file a sweep writes: a sweep run with canary values in every credential channel the
project documents (object-store keys, the PostgreSQL password libpq reads, the MLflow user it signs in as on a
basic-auth tracking server, MLflow's token, the Ray token) leaves none of them in Tune's storage (``tuner.pkl``,
``searcher-state-*.pkl``, trial files), the feature cache, the MLflow server's stores (runs, artifacts, users)
and log, the Optuna study, Ray's session directory (the logs of the runtime-env agent, raylet, GCS and workers) or
the console.

Without the sweep's own guard (``sweeper.job.credentials.keep_out_of_trial_runtime_env``), Tune copies the AWS
variables into every trial's runtime_env and Ray writes them to ``runtime_env_agent.log``: this test then fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from faults.conftest import experiment_dir, local_env, run_job, sweep_runs, tiny_sweep, with_cache
from sweeper.job.config import load_config
from sweeper.tuning.sweep import sweep_id
from test_cluster import MlflowServer

pytestmark = pytest.mark.slow

# Each documented channel and a value that cannot occur by chance (shaped like the real thing where it has a shape).
CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACANARY5Q7KXEYID0",
    "AWS_SECRET_ACCESS_KEY": "wJalrCANARYsecretK7MDENGbPxRfiCY3q9xT",
    "AWS_SESSION_TOKEN": "IQoJCANARYsessionTokenB4x9Zk2",
    "PGPASSWORD": "pg-CANARY-password-7f3d1e",
    "MLFLOW_TRACKING_USERNAME": "canary-sweeper-91ab",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-CANARY-password-c41f0e",
    "MLFLOW_TRACKING_TOKEN": "mlflow-CANARY-token-5e2a77",
}
ADMIN_PASSWORD = "mlflow-CANARY-admin-3e8b52"
SIGN_IN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def leaks(files: list[Path], console: str, secrets: dict[str, str]) -> list[str]:
    """``<where>: <channel>`` for every secret found, reading each file as bytes (pickles, SQLite, logs)."""
    found = [f"console: {name}" for name, value in secrets.items() if value in console]
    for path in files:
        data = path.read_bytes()
        found += [f"{path}: {name}" for name, value in secrets.items() if value.encode() in data]
    return found


@pytest.fixture
def ray_temp_dir() -> Iterator[Path]:
    """A private Ray temp dir (``RAY_TMPDIR``): the session directory of this sweep's Ray alone, kept short because
    Ray's socket paths must fit in 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="ray-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_sweep_writes_no_credential_anywhere(tmp_path, tiny_cache, ray_temp_dir):
    with_cache(tmp_path, tiny_cache)
    with MlflowServer(tmp_path, admin_password=ADMIN_PASSWORD) as server:
        server.create_user(*(CANARIES[k] for k in SIGN_IN))
        config_path = tiny_sweep(tmp_path, search={"num_samples": 1}, train={"meta_epochs": 2},
                                 mlflow={"tracking_uri": server.uri, "artifact_location": None})
        env = local_env(tmp_path, RAY_TMPDIR=str(ray_temp_dir), **CANARIES)
        code, console = run_job(config_path, env, "--num-cpus", "2", "--project-dir", str(tmp_path))
        assert code == 0, console[-6000:]
        # The sweep signed in as the canary user (its run is there) on a server that refuses anyone without one.
        with mock.patch.dict(os.environ, {k: CANARIES[k] for k in SIGN_IN}):
            [parent] = sweep_runs(config_path)
        assert parent.info.status == "FINISHED"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
    secrets = {**CANARIES, "MLflow admin password": ADMIN_PASSWORD, "Ray auth token": token_file.read_text().strip()}
    del secrets["MLFLOW_TRACKING_USERNAME"]  # a name, not a secret: the server's users' database holds it
    written = [p for p in files_under(tmp_path, ray_temp_dir) if p != token_file]
    names = {p.name for p in written}
    # The places the issue names were there to be searched: Tune's pickles, the runtime-env agent's log, MLflow's
    # stores and log, a trial's checkpoint artifact, the Optuna study, the console and the sweep's full log
    # (runs/logs/<sweep id>.log in the project directory).
    expected = {"tuner.pkl", "runtime_env_agent.log", "mlflow.db", "auth.db", "mlflow-server.log", "model.pt",
                "optuna.db", "job.log", f"{sweep_id(load_config(config_path))}.log"}
    assert expected <= names, sorted(expected - names)
    assert any(n.startswith("searcher-state-") for n in names) and experiment_dir(config_path).is_dir(), names
    found = leaks(written, console, secrets)
    assert not found, "\n".join(found)
