"""The multi-node path with real processes on 127.0.0.1: a sweep whose driver joins a token-authenticated Ray head
runs its trials on a second node, logs to a real MLflow server over HTTP, keeps its feature cache and Tune results
on an S3 API (moto's server) and reads its dataset from it; generated categories reach every node through a remote
cache root; the PostgreSQL URLs of cluster/ work against a real PostgreSQL (where its binaries are installed).
Every process a test starts is stopped when it ends, pass or fail.
"""

from __future__ import annotations

import configparser
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import numpy as np
import optuna
import pytest
import yaml
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient
from moto.server import ThreadedMotoServer
from sqlalchemy.engine import make_url

from bgad_core.data.datasets import load_image
from bgad_core.errors import DataError
from bgad_core.data.synthetic import make_synthetic_category
from ray_processes import REPO, VENV_BIN, RayHead, RayWorker, free_port, stop_group
from sweeper.tracking import mlflow_runs as tracking
from sweeper.cache.build import _decode_batch
from sweeper.cache.reader import MANIFEST, load_image_at, mirror_tree
from sweeper.job.config import SweepConfig, load_config
from sweeper.cache.manifest import SHARED_DATASETS, plan_cache
from sweeper.job.names import match
from sweeper.tuning.sweep import searcher, sweep_id
from test_cluster_configs import AUTH_SETTINGS, SWEEP_CONFIG, k8s
from test_sweep_job import quickstart_in

TINY = {"train": {"meta_epochs": 2}, "search": {"num_samples": 3, "compare_paper_default": False}}


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (SQLite backend store unless ``backend`` says otherwise, artifacts proxied to
    ``artifacts``: a local folder by default, or e.g. an ``s3://`` URI with ``env`` pointing at the S3 API), stopped on
    exit.

    With ``admin_password`` it runs MLflow's basic-auth app with cluster/'s settings (``cluster/mlflow-auth.ini``,
    its users' database moved to ``<folder>/auth.db``), as the cluster does: every request but ``/health`` needs a
    user's password; ``create_user`` adds one. Its job runner (GenAI job execution) is switched off: the sweep does
    not use it and it doubles the start time.
    """

    def __init__(self, folder: Path, artifacts: str | None = None, env: dict[str, str] | None = None,
                 backend: str | None = None, admin_password: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.artifacts = artifacts or str(folder / "mlartifacts")
        self.backend = backend or f"sqlite:///{folder / 'mlflow.db'}"
        self.extra_env = env or {}
        self.admin_password = admin_password
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _auth_settings(self) -> dict[str, str]:
        """The environment of the basic-auth app: the cluster's settings file with a local users' database."""
        settings = configparser.ConfigParser()
        settings.read(AUTH_SETTINGS)
        settings["mlflow"]["database_uri"] = f"sqlite:///{self.folder / 'auth.db'}"
        path = self.folder / "basic_auth.ini"
        with path.open("w") as stream:
            settings.write(stream)
        return {"MLFLOW_AUTH_CONFIG_PATH": str(path), "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}

    def create_user(self, username: str, password: str) -> None:
        """A new user, created by the admin as cluster/README.md does it (MLflow's own client of the auth app)."""
        admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.admin_password}
        with mock.patch.dict(os.environ, admin):
            get_app_client("basic-auth", self.uri).create_user(username, password)

    def __enter__(self) -> MlflowServer:
        command = [
            str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", self.backend,
            "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]
        env = {**os.environ, **self.extra_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.admin_password is not None:
            command += ["--app-name", "basic-auth"]
            env.update(self._auth_settings())
        with open(self.folder / "mlflow-server.log", "w") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_for_health()
        except BaseException:
            stop_group(self.process)
            raise
        return self

    def _wait_for_health(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'mlflow-server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"mlflow server did not answer within {timeout_s} s")

    def __exit__(self, *exc: object) -> None:
        stop_group(self.process)


INITDB = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None) or shutil.which("initdb")


class Postgres:
    """A private PostgreSQL on 127.0.0.1 (user ``bgad`` with a password, databases ``mlflow`` and ``optuna``),
    stopped and deleted on exit. PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` user."""

    password = "bgad-test-password"

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pg-"))  # readable by the postgres user, unlike pytest's tmp
        self.bin = Path(INITDB).parent
        self.env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "bgad",
                    "PGPASSWORD": self.password}
        self.started = False

    def _as_owner(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def __enter__(self) -> Postgres:
        (self.folder / "password").write_text(self.password)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.folder, self.folder / "password"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        try:
            self._as_owner(str(self.bin / "initdb"), "-D", str(self.folder / "data"), "-U", "bgad",
                           f"--pwfile={self.folder / 'password'}", "-A", "scram-sha-256")
            self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "log"),
                           "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "-w", "start")
            self.started = True
            for database in ("mlflow", "optuna"):
                subprocess.run([str(self.bin / "createdb"), database], env=self.env, check=True, timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def postgres_available() -> bool:
    if INITDB is None:
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return shutil.which("runuser") is not None


@dataclass
class S3:
    """A fresh bucket on the moto server and the environment that points S3 clients at it."""

    bucket: str
    env: dict[str, str]
    client: Any

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def upload(self, folder: Path, prefix: str) -> None:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.client.upload_file(str(file), self.bucket, f"{prefix}/{file.relative_to(folder).as_posix()}")


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 API on 127.0.0.1, for the tests of this module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch) -> S3:
    """A new bucket; this process and the subprocesses given ``S3.env`` reach it through ``AWS_ENDPOINT_URL``."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"bgad-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return S3(bucket, env, client)


def assert_stopped(*leaders: subprocess.Popen) -> None:
    """No process of the groups these processes led is left."""
    for leader in leaders:
        with pytest.raises(ProcessLookupError):
            os.killpg(leader.pid, 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_two_node_sweep_keeps_everything_on_s3_and_logs_to_the_mlflow_server(s3, tmp_path):
    """One sweep, as a cluster runs it: the driver joins a token-authenticated head; its trials ask for
    ``trial_node``, which only the worker node has, so every result must come from the worker; dataset, feature
    cache, Tune results and (through the MLflow server, over HTTP) artifacts all live in the bucket, so the worker
    reads and writes nothing on the driver's disk. (One sweep for both: each costs a cache build and a sweep.)"""
    source = make_synthetic_category(tmp_path / "source", name="tiles", size=96, n_train=24, n_test_good=16,
                                     n_test_per_defect=8)
    s3.upload(source, "data/tiles")
    with MlflowServer(tmp_path, artifacts=f"s3://{s3.bucket}/mlartifacts", env=s3.env) as server:
        config_path = quickstart_in(
            tmp_path, **TINY,
            tune={"custom_resources_per_trial": {"trial_node": 1}, "max_concurrent_trials": 2},
            mlflow={"tracking_uri": server.uri, "artifact_location": None},
        )
        raw = yaml.safe_load(config_path.read_text())
        raw["datasets"] = [{"path": f"s3://{s3.bucket}/data/tiles"}]
        raw["cache"]["root"] = f"s3://{s3.bucket}/cache"
        raw["tune"]["storage_path"] = f"s3://{s3.bucket}/tune"
        config_path.write_text(yaml.safe_dump(raw))
        config = load_config(config_path)
        workdir = tmp_path / "workdir"  # the driver's working directory: where the dataset mirror goes
        workdir.mkdir()
        head = RayHead(tmp_path, num_cpus=1)
        head.env.update(s3.env)  # every node reaches the bucket, as a cluster's nodes would through their role
        with head, RayWorker(head, num_cpus=2, resources='{"trial_node": 2}') as worker:
            command = [sys.executable, str(REPO / "sweeper" / "run.py"), "--config", str(config_path),
                       "--address", head.address]
            run = subprocess.run(command, cwd=workdir, env=head.env, capture_output=True, text=True, timeout=540)
        (tmp_path / "job.log").write_text(run.stdout + run.stderr)  # kept for post-mortems (pytest --basetemp)
        assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]

        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name(config.mlflow.experiment)
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server stores the artifacts
        runs = client.search_runs([experiment.experiment_id], match({tracking.SWEEP_TAG: sweep_id(config)}))
        parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "sweep"]
        children = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "trial"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert "tiles/best_test_image_auroc" in parents[0].data.metrics
        assert len(children) == config.search.num_samples
        finished = [r for r in children if r.data.tags.get("bgad.outcome") == "finished"]
        plots = {a.path for a in client.list_artifacts(finished[0].info.run_id, "plots/tiles")}
        assert "plots/tiles/anomaly_maps.png" in plots  # validation images read back from s3:// for the overlays
        assert all(client.get_metric_history(run.info.run_id, "val_aupro") for run in children)
    assert_stopped(server.process, head.process, worker.process)

    tune_keys = s3.keys(f"tune/{sweep_id(config)}/search/")
    assert any(Path(k).name.startswith("experiment_state") for k in tune_keys)
    result_keys = [k for k in tune_keys if Path(k).name == "result.json"]
    assert len(result_keys) == config.search.num_samples
    reported = [json.loads(line) for key in result_keys
                for line in s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read().decode().splitlines()
                if line.strip()]
    assert reported and {r["node_id"] for r in reported} == {worker.node_id}  # the id ray status gave the worker
    assert {r.data.tags[tracking.TRIAL_TAG] for r in children} <= {r["trial_id"] for r in reported}
    for run in children:
        stored = f"mlartifacts/{experiment.experiment_id}/{run.info.run_id}/artifacts/checkpoint/tiles/model.pt"
        assert stored in s3.keys("mlartifacts/"), stored
    assert any("/checkpoint_" in k and k.endswith("/tiles/model.pt") for k in tune_keys)

    manifests = [k for k in s3.keys("cache/") if k.endswith(f"/{MANIFEST}")]
    assert len(manifests) == 1
    cache_prefix = manifests[0].rsplit("/", 1)[0]
    assert any(k.endswith(".parquet") for k in s3.keys(f"{cache_prefix}/shards/"))
    manifest = json.loads(s3.client.get_object(Bucket=s3.bucket, Key=manifests[0])["Body"].read())
    assert manifest["categories"]["tiles"]["root"] == f"s3://{s3.bucket}/data/tiles"
    assert not (tmp_path / "tune").exists() and not (tmp_path / "cache").exists()
    assert (workdir / "runs" / "data" / "mirrors").is_dir()

    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}, **s3.env}
    verify = subprocess.run([sys.executable, "-m", "sweeper.cache", "--config", str(config_path), "--verify"],
                            cwd=workdir, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0, verify.stderr[-3000:]
    assert f"cache OK: s3://{s3.bucket}/cache/" in verify.stdout


def small_config(cache_root: str) -> SweepConfig:
    return SweepConfig.model_validate({
        "name": "remote",
        "datasets": [{"synthetic": {"name": "weave", "size": 64, "n_train": 6, "n_test_good": 4,
                                    "n_test_per_defect": 4}}],
        "data": {"image_size": 64},
        "backbone": {"weights": "offline"},
        "cache": {"root": cache_root, "max_anomalies": 2, "racp_depths": [0, 2], "racp_per_anomaly": 2},
        "search": {"space": {"beta": {"uniform": [0.01, 0.1]}}},
    })


def test_generated_category_is_uploaded_to_a_remote_cache_root_and_decoded_from_it(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_cache(small_config(f"s3://{s3.bucket}/cache"))
    shared = f"s3://{s3.bucket}/cache/{SHARED_DATASETS}/"
    category = plan.categories[0]
    assert category.root.startswith(shared)
    files = {item[key] for item in plan.items for key in ("path", "mask_path", "source_path", "base_path")
             if item[key]}
    assert files and all(f.startswith(shared) for f in files)
    uploaded = {f"s3://{s3.bucket}/{key}" for key in s3.keys(f"cache/{SHARED_DATASETS}/")}
    assert files <= uploaded

    local = plan_cache(small_config(str(tmp_path / "local" / "cache")))
    assert local.key == plan.key  # the key depends on the files' content, not on where they are
    replanned = plan_cache(small_config(f"s3://{s3.bucket}/cache"))
    assert replanned.key == plan.key

    rows = [item for item in plan.items if item["split"] in ("synthetic", "test")][:6]
    batch = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    decoded = _decode_batch(batch, image_size=64, skip_unreadable=False, problems=None)
    local_rows = {item["row"]: item for item in local.items}
    for i, row in enumerate(rows):
        if row["split"] == "test":
            expected = load_image(local_rows[row["row"]]["path"], 64)
            assert np.array_equal(decoded["image"][i], expected)
    assert decoded["image"].shape == (len(rows), 64, 64, 3)

    missing = f"s3://{s3.bucket}/data/missing.png"
    with pytest.raises(DataError, match=missing):
        load_image_at(missing, 64)


def test_remote_dataset_mirror_follows_changes_and_deletions(s3, tmp_path):
    source = make_synthetic_category(tmp_path / "source", name="tiles", size=32, n_train=3, n_test_good=2,
                                     n_test_per_defect=1, defect_types=["spot"])
    s3.upload(source, "data/tiles")
    uri = f"s3://{s3.bucket}/data/tiles"
    mirror = mirror_tree(uri, tmp_path / "mirror")
    names = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())

    first = sorted(p for p in mirror.rglob("*.png") if "train" in p.parts)[0]
    key = f"data/tiles/{first.relative_to(mirror).as_posix()}"
    time.sleep(1.1)  # S3 modification times have one-second resolution
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"changed")
    gone = sorted(p for p in mirror.rglob("*.png") if "test" in p.parts)[0]
    s3.client.delete_object(Bucket=s3.bucket, Key=f"data/tiles/{gone.relative_to(mirror).as_posix()}")
    mirror_tree(uri, mirror)
    assert first.read_bytes() == b"changed"
    assert not gone.exists()

    with pytest.raises(DataError, match="not found or empty"):
        mirror_tree(f"s3://{s3.bucket}/data/nothing", tmp_path / "empty")


@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed")
@pytest.mark.timeout(300)
def test_the_manifests_postgresql_urls_work_with_the_password_from_the_environment(s3, tmp_path, monkeypatch):
    """The URLs of cluster/ carry no password (libpq takes PGHOST/PGUSER/PGPASSWORD): the sweep config's Optuna
    storage (also through the sweep's searcher, whose pickle then holds no password) and the MLflow server's
    backend store, with artifacts on S3, as the Deployment runs them."""
    (deployment,) = k8s("Deployment", "bgad-mlflow")
    args = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"]).split()
    backend = make_url(args[args.index("--backend-store-uri") + 1])
    with Postgres() as database:
        for key in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD"):
            monkeypatch.setenv(key, database.env[key])
        config = load_config(SWEEP_CONFIG)
        storage = config.tune.optuna_storage
        study = optuna.create_study(study_name="cluster-check", storage=storage, direction="maximize")
        study.optimize(lambda trial: trial.suggest_float("beta", 0.0, 1.0), n_trials=2)
        assert len(optuna.load_study(study_name="cluster-check", storage=storage).trials) == 2
        # The sweep's searcher connects the same way; what Tune pickles of it (searcher-state-*.pkl, in the
        # bucket) holds the password-less URL, never the password.
        searcher(config, "val_aupro", "cluster-check-searcher", config.train["meta_epochs"]).save(
            str(tmp_path / "searcher-state.pkl"))
        pickled = (tmp_path / "searcher-state.pkl").read_bytes()
        assert storage.encode() in pickled and database.password.encode() not in pickled

        local_backend = backend.set(host="127.0.0.1", port=database.port).render_as_string(hide_password=False)
        server_env = {**s3.env, "PGPASSWORD": database.password}
        with MlflowServer(tmp_path, artifacts=f"s3://{s3.bucket}/mlartifacts", env=server_env,
                          backend=local_backend) as server:
            client = MlflowClient(server.uri)
            run = client.create_run(client.create_experiment("cluster-check"))
            (tmp_path / "note.txt").write_text("stored through the server")
            client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
            client.log_metric(run.info.run_id, "val_aupro", 0.5)
            assert client.get_run(run.info.run_id).data.metrics == {"val_aupro": 0.5}
        assert_stopped(server.process)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in s3.keys("mlartifacts/"))
