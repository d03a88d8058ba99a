"""cluster/: every YAML parses, and the invariants a multi-node sweep depends on hold in every config.

GPU workers request GPUs and the head none; token authentication is on wherever Ray runs or is called, with the
token from a Secret the README creates; a sweep keeps nothing on one node's disk; the Ray image, the runtime
environment and the MLflow servers match pyproject.toml's pins. Also the config fields that the cluster path
added (``tune.custom_resources_per_trial``, ``mlflow.artifact_location`` for servers).
"""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from sqlalchemy.engine import make_url

from bgad_core.errors import ConfigError
from sweeper.job.config import LOCAL_ARTIFACTS, MlflowSpec, TuneSpec, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPENDENCIES = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
CLUSTER_EXTRA = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["cluster"]]
SWEEP_CONFIG = CLUSTER / "sweep-cluster.yaml"
AUTH_SETTINGS = CLUSTER / "mlflow-auth.ini"  # MLflow's basic-auth app, both platforms
GPU_FAMILIES = re.compile(r"^(g\d|p\d|trn\d|inf\d|dl\d)")  # AWS instance families with accelerators
OBJECT_STORES = ("s3", "gs", "gcs")


def requirement(name: str) -> Requirement:
    return next(r for r in DEPENDENCIES + CLUSTER_EXTRA if r.name.lower() == name)


RAY_VERSION = str(next(iter(requirement("ray").specifier))).removeprefix("==")
PYTHON_TAG = "py" + PYPROJECT["project"]["requires-python"].removeprefix(">=").replace(".", "")


def load_all() -> dict[Path, list[Any]]:
    return {path: list(yaml.safe_load_all(path.read_text())) for path in sorted(CLUSTER.rglob("*.y*ml"))}


DOCUMENTS = load_all()
K8S = [doc for docs in DOCUMENTS.values() for doc in docs if isinstance(doc, dict) and "apiVersion" in doc]
LAUNCHER = next(docs[0] for docs in DOCUMENTS.values() if isinstance(docs[0], dict) and "provider" in docs[0])


def k8s(kind: str, name: str | None = None) -> list[dict]:
    return [d for d in K8S if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def walk(node: Any) -> Iterator[dict]:
    """Every mapping inside ``node``, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def head_containers(cluster: dict) -> list[dict]:
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]


def launcher_head_start() -> str:
    return " ".join(LAUNCHER["head_start_ray_commands"])


def test_every_yaml_in_cluster_parses():
    assert len(DOCUMENTS) >= 6, sorted(DOCUMENTS)
    for path, docs in DOCUMENTS.items():
        assert docs and all(isinstance(d, dict) for d in docs), path
    for doc in K8S:
        assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "bgad", doc["metadata"]
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet"} <= {d["kind"] for d in K8S}
    load_config(SWEEP_CONFIG)  # the sweep config is valid, not just YAML


def test_ray_launcher_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())))


def test_gpu_workers_request_gpus_and_the_head_none():
    (cluster,) = k8s("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    for container in head_containers(cluster):
        assert "nvidia.com/gpu" not in str(container.get("resources", {}))
    groups = cluster["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1
        for container in group["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]

    head = LAUNCHER["available_node_types"][LAUNCHER["head_node_type"]]
    assert not head.get("resources", {}).get("GPU") and not GPU_FAMILIES.match(head["node_config"]["InstanceType"])
    workers = [t for name, t in LAUNCHER["available_node_types"].items() if name != LAUNCHER["head_node_type"]]
    assert workers
    for worker in workers:
        assert worker["resources"]["GPU"] >= 1 and GPU_FAMILIES.match(worker["node_config"]["InstanceType"])
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= LAUNCHER["max_workers"]


def test_token_authentication_is_on_wherever_ray_runs_or_is_called():
    readme = (CLUSTER / "README.md").read_text()
    (cluster,) = k8s("RayCluster")
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    assert secret_created(readme, auth["secretName"], "auth_token")

    for job in k8s("RayJob"):
        spec = job["spec"]
        if "rayClusterSpec" in spec:
            assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
            secret = spec["rayClusterSpec"]["authOptions"]["secretName"]
        else:
            (target,) = k8s("RayCluster", spec["clusterSelector"]["ray.io/cluster"])
            secret = target["spec"]["authOptions"]["secretName"]
        for container in spec["submitterPodTemplate"]["spec"]["containers"]:
            env = env_of(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}

    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in LAUNCHER[key]
              if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert command.index("RAY_AUTH_MODE=token") < command.index("ray start"), command
    assert LAUNCHER["file_mounts"]["~/.ray/auth_token"]


def secret_created(readme: str, name: str, key: str) -> bool:
    """Whether the README creates Secret ``name`` with ``key`` (``kubectl create secret generic``)."""
    for command in re.findall(r"create secret generic [^\n]*", readme.replace("\\\n", " ")):
        words = shlex.split(command)
        if words[3] == name and any(w.startswith(f"--from-literal={key}=") for w in words):
            return True
    return False


def test_every_secret_the_manifests_use_is_created_in_the_readme():
    readme = (CLUSTER / "README.md").read_text()
    used = set()
    for node in walk(K8S):
        if "secretKeyRef" in node:
            used.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        if "secretRef" in node:
            used.add((node["secretRef"]["name"], None))
    assert used
    for name, key in used:
        if key is not None:
            assert secret_created(readme, name, key), (name, key)
        else:
            assert f"create secret generic {name} " in readme, name
    config_maps = {node["configMap"]["name"] for node in walk(K8S) if "configMap" in node}
    defined = {doc["metadata"]["name"] for doc in k8s("ConfigMap")}
    assert config_maps and all(m in defined or f"create configmap {m} " in readme for m in config_maps), config_maps


def shared_location(uri: str, mounts: set[str]) -> bool:
    """An object-store URI, or a path under a volume mounted on every node."""
    if urlparse(uri).scheme in OBJECT_STORES:
        return True
    return any(Path(uri).is_relative_to(m) for m in mounts)


def mounted_everywhere(cluster: dict) -> set[str]:
    """Mount paths of volumes (other than shared memory) that the head and every worker group mount."""
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    per_template = []
    for template in templates:
        memory = {v["name"] for v in template["spec"].get("volumes", []) if v.get("emptyDir", {}).get("medium")}
        per_template.append({m["mountPath"] for c in template["spec"]["containers"]
                             for m in c.get("volumeMounts", []) if m["name"] not in memory})
    return set.intersection(*per_template)


def test_the_cluster_sweep_keeps_nothing_on_one_nodes_disk():
    config = load_config(SWEEP_CONFIG)
    (cluster,) = k8s("RayCluster")
    mounts = mounted_everywhere(cluster)
    assert shared_location(config.cache.root, mounts)
    assert shared_location(config.tune.storage_path, mounts)
    for dataset in config.datasets:
        assert dataset.synthetic is not None or shared_location(str(dataset.path), mounts), dataset
    study = make_url(config.tune.optuna_storage)
    assert study.get_backend_name() in ("postgresql", "mysql") and study.password is None  # never SQLite on a node


def test_the_head_points_the_driver_at_the_mlflow_server_and_the_database():
    config = load_config(SWEEP_CONFIG)
    assert config.mlflow.tracking_uri is None  # taken from each platform's head: $MLFLOW_TRACKING_URI
    (cluster,) = k8s("RayCluster")
    (head,) = head_containers(cluster)
    env = env_of(head)
    tracking = urlparse(env["MLFLOW_TRACKING_URI"]["value"])
    (service,) = k8s("Service", "bgad-mlflow")
    assert tracking.scheme == "http" and tracking.hostname.split(".")[0] == service["metadata"]["name"]
    assert tracking.port == service["spec"]["ports"][0]["port"]
    (database,) = k8s("Service", "bgad-postgres")
    assert env["PGHOST"]["value"].split(".")[0] == database["metadata"]["name"]
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "bgad-postgres"
    assert "MLFLOW_TRACKING_URI=http://" in launcher_head_start()
    assert ". ~/bgad.env" in launcher_head_start() and "~/bgad.env" in LAUNCHER["file_mounts"]


def test_mlflow_server_stores_runs_in_postgresql_and_artifacts_in_s3():
    (deployment,) = k8s("Deployment", "bgad-mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = shlex.split(" ".join(container["args"]))
    backend = make_url(command[command.index("--backend-store-uri") + 1])
    assert backend.get_backend_name() == "postgresql" and backend.password is None
    assert backend.host.split(".")[0] == "bgad-postgres"
    assert urlparse(command[command.index("--artifacts-destination") + 1]).scheme == "s3"
    assert env_of(container)["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "bgad-postgres"
    assert any(e.get("secretRef", {}).get("name") == "bgad-s3" for e in container["envFrom"])
    (database,) = k8s("StatefulSet", "bgad-postgres")
    assert database["spec"]["volumeClaimTemplates"]  # the database outlives its pod

    launcher = shlex.split(launcher_head_start().replace(";", " ; "))
    assert launcher[launcher.index("--backend-store-uri") + 1].startswith("postgresql")
    assert urlparse(launcher[launcher.index("--artifacts-destination") + 1]).scheme == "s3"


def test_concurrent_trials_fit_the_gpus_at_full_scale():
    config = load_config(SWEEP_CONFIG)
    needed = config.tune.max_concurrent_trials * config.tune.gpus_per_trial
    (cluster,) = k8s("RayCluster")
    kuberay = sum(g["maxReplicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
                  for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    launcher = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in LAUNCHER["available_node_types"].values()
                   if "max_workers" in t)
    assert config.tune.gpus_per_trial > 0 and needed <= kuberay and needed <= launcher


def test_ray_images_match_the_pinned_ray_and_python():
    images = [node["image"] for node in walk(K8S) if str(node.get("image", "")).startswith("rayproject/ray")]
    images += [LAUNCHER["docker"][k] for k in ("image", "head_image", "worker_image") if k in LAUNCHER["docker"]]
    assert images
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-{PYTHON_TAG}(-gpu)?", image), image
    (cluster,) = k8s("RayCluster")
    assert cluster["spec"]["rayVersion"] == RAY_VERSION
    gpu_groups = [c["image"] for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all(image.endswith("-gpu") for image in gpu_groups)


def test_runtime_environments_install_pyprojects_requirements_minus_ray():
    expected = [str(r) for r in DEPENDENCIES if r.name != "ray"] + [str(r) for r in CLUSTER_EXTRA]
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert [str(Requirement(r)) for r in runtime_env["pip"]] == expected
    assert runtime_env["working_dir"] == "."
    for job in k8s("RayJob"):
        embedded = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert [str(Requirement(r)) for r in embedded["pip"]] == expected
        assert urlparse(embedded["working_dir"]).scheme in ("https", "s3", "gs")  # the cluster must download it
        entrypoint = shlex.split(job["spec"]["entrypoint"])
        assert entrypoint[:2] == ["python", "sweeper/run.py"]
        assert REPO / entrypoint[entrypoint.index("--config") + 1] == SWEEP_CONFIG


def test_mlflow_servers_run_versions_pyproject_allows():
    (deployment,) = k8s("Deployment", "bgad-mlflow")
    installs = [" ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"]),
                " ".join(LAUNCHER["head_setup_commands"])]
    for install in installs:
        pins = dict(re.findall(r"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?==([0-9][^\s']*)", install))
        assert Version(pins["mlflow"]) in requirement("mlflow").specifier, install
        assert Version(pins["psycopg2-binary"]) in requirement("psycopg2-binary").specifier, install


def test_custom_resources_per_trial_reject_builtin_names_and_non_positive_amounts():
    assert TuneSpec.model_validate({"custom_resources_per_trial": {"trial_node": 1}}).custom_resources_per_trial \
        == {"trial_node": 1.0}
    for bad in ({"CPU": 1}, {"gpu": 1}, {"trial_node": 0}):
        with pytest.raises(ValueError):
            TuneSpec.model_validate({"custom_resources_per_trial": bad})


def test_custom_resources_errors_name_the_key(tmp_path):
    raw = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    raw["tune"]["custom_resources_per_trial"] = {"CPU": 2}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"tune\.custom_resources_per_trial"):
        load_config(path)


def test_artifacts_default_to_the_server_for_a_tracking_server_and_to_a_folder_otherwise():
    assert MlflowSpec().artifact_location_for("http://mlflow:5000") is None
    assert MlflowSpec().artifact_location_for("sqlite:///runs/mlflow.db") == LOCAL_ARTIFACTS
    assert MlflowSpec(artifact_location="s3://b/a").artifact_location_for("http://mlflow:5000") == "s3://b/a"


# --- security (cluster/README.md, "Security") ---------------------------------------------------------------------

ALL_INTERFACES = re.compile(r"--(?:host|dashboard-host|bind)[= ]+(?:0\.0\.0\.0|::|\[::\])(?:\s|:|$)")
SERVICE_PORTS = {5000, 5432, 6379, 8080, 8265, 10001}  # MLflow, PostgreSQL, GCS, optuna-dashboard, jobs, client


def strings(node: Any) -> Iterator[str]:
    """Every string value inside ``node``."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def documented_commands() -> list[str]:
    """Every shell text of cluster/: the YAML files' strings (container args, launcher commands) and the README's
    code blocks, line continuations joined."""
    readme = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    texts = [t for docs in DOCUMENTS.values() for t in strings(docs)] + blocks
    return [t.replace("\\\n", " ") for t in texts]


def mlflow_servers() -> list[str]:
    return [c for c in documented_commands() if "mlflow server" in c]


def segments(command: str) -> list[str]:
    """The simple commands of a shell text (split at ;, &&, ||, | and newlines)."""
    return [part.strip() for part in re.split(r";|&&|\|\||\||\n", command) if part.strip()]


def test_every_mlflow_server_requires_authentication():
    servers = mlflow_servers()
    assert len(servers) == 2, servers  # the KubeRay Deployment and the launcher's head
    for command in servers:
        (server,) = [s for s in segments(command) if "mlflow server" in s]
        words = shlex.split(server)
        assert words[words.index("--app-name") + 1] == "basic-auth", server
    installs = [c for c in documented_commands() if "pip install" in c and "mlflow" in c]
    assert len(installs) == 2 and all("mlflow[auth]==" in c for c in installs), installs  # what the auth app needs

    settings = configparser.ConfigParser()
    settings.read(AUTH_SETTINGS)
    auth = settings["mlflow"]
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert auth["default_permission"] in ("READ", "NO_PERMISSIONS")  # nobody may change what they did not create
    assert "admin_password" not in auth  # MLFLOW_AUTH_ADMIN_PASSWORD, from a Secret / a mode-600 file
    users = make_url(auth["database_uri"])
    assert users.get_backend_name() == "postgresql" and users.password is None

    (deployment,) = k8s("Deployment", "bgad-mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    for secret in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[secret]["valueFrom"]["secretKeyRef"]["name"] == "bgad-mlflow-auth", secret
    folder = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"]).parent
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == folder]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    readme = (CLUSTER / "README.md").read_text()
    name = volume["configMap"]["name"]
    assert f"create configmap {name} --from-file={Path(env['MLFLOW_AUTH_CONFIG_PATH']['value']).name}=" \
           f"cluster/{AUTH_SETTINGS.name}" in readme

    (launcher,) = [c for c in LAUNCHER["head_start_ray_commands"] if "mlflow server" in c]
    assert "MLFLOW_AUTH_CONFIG_PATH=$HOME/mlflow-auth.ini" in launcher and ". ~/mlflow-server.env" in launcher
    assert LAUNCHER["file_mounts"]["~/mlflow-auth.ini"] == f"cluster/{AUTH_SETTINGS.name}"


def test_no_unauthenticated_listener_on_all_interfaces():
    """Whatever listens on every interface asks each request for a credential: MLflow's basic-auth app, Ray with
    token auth. Anything else binds to 127.0.0.1 and is reached through a tunnel."""
    listeners = 0
    for command in documented_commands():
        for segment in segments(command):
            if not ALL_INTERFACES.search(segment):
                continue
            listeners += 1
            if "mlflow server" in segment:
                assert "--app-name basic-auth" in segment, segment
            else:
                assert "ray start" in segment and "RAY_AUTH_MODE=token" in command.partition(segment)[0], segment
    assert listeners >= 3  # the two MLflow servers and the launcher's Ray head
    for service in k8s("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    (cluster,) = k8s("RayCluster")
    assert cluster["spec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def selects(policy: dict, labels: dict[str, str]) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


def test_network_policies_admit_each_service_from_the_pods_that_use_it_only():
    policies = k8s("NetworkPolicy")
    assert all("Ingress" in p["spec"]["policyTypes"] for p in policies)
    assert not [node for node in walk(policies) if "ipBlock" in node]  # no address range, 0.0.0.0/0 least of all
    ray_pod = {"ray.io/cluster": "bgad-ray", "ray.io/node-type": "head"}  # KubeRay's labels on the head pod
    pods = {"mlflow": k8s("Deployment", "bgad-mlflow")[0], "postgres": k8s("StatefulSet", "bgad-postgres")[0]}
    labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in pods.items()}
    for pod_labels in [*labels.values(), ray_pod]:
        assert any(selects(p, pod_labels) for p in policies), pod_labels

    (mlflow,) = [p for p in policies if selects(p, labels["mlflow"])]
    (rule,) = mlflow["spec"]["ingress"]
    assert [port["port"] for port in rule["ports"]] == [5000]
    assert any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= ray_pod.items() and "namespaceSelector"
               not in peer for peer in rule["from"])
    (postgres,) = [p for p in policies if selects(p, labels["postgres"])]
    assert [port["port"] for rule in postgres["spec"]["ingress"] for port in rule["ports"]] == [5432]


def test_aws_nodes_sit_in_a_group_open_to_each_other_and_to_ssh_from_your_network_only():
    groups = {tuple(t["node_config"].get("SecurityGroupIds", ())) for t in LAUNCHER["available_node_types"].values()}
    assert len(groups) == 1 and all(groups), groups  # one group of your own on every node: no launcher-made one
    assert "security_group" not in LAUNCHER["provider"]  # which would admit SSH from 0.0.0.0/0
    rules = [c for c in documented_commands() if "authorize-security-group-ingress" in c]
    rules = [s for c in rules for s in segments(c) if "authorize-security-group-ingress" in s]
    assert len(rules) == 2, rules
    (own,) = [r for r in rules if "UserIdGroupPairs=[{GroupId=$SG}]" in r]
    (ssh,) = [r for r in rules if r is not own]
    words = shlex.split(ssh.partition("#")[0])
    assert words[words.index("--port") + 1] == "22" and words[words.index("--cidr") + 1] != "0.0.0.0/0", ssh
    assert not any(str(port) in words for port in SERVICE_PORTS)


def test_the_ray_token_file_is_private_in_every_documented_step():
    """``ray get-auth-token --generate`` writes the token with mode 0644 (and prints it): every step that runs it
    runs it under umask 077, out of the terminal, and chmods an older file; every node's copy is chmodded too."""
    lines = [line for path in [REPO / "README.md", CLUSTER / "README.md", *sorted(CLUSTER.rglob("*.y*ml"))]
             for line in path.read_text().splitlines() if "get-auth-token --generate" in line]
    assert len(lines) >= 3, lines  # cluster/README.md (local head, path B) and cluster/aws/cluster.yaml
    for line in lines:
        before, _, after = line.partition("ray get-auth-token --generate")
        assert "umask 077" in before and after.startswith(" > /dev/null)"), line
        assert "chmod 600 ~/.ray/auth_token" in after, line
    (chmod,) = LAUNCHER["setup_commands"]
    assert chmod.startswith("chmod 600 ") and set(LAUNCHER["file_mounts"]) - {"~/mlflow-auth.ini"} <= set(chmod.split())


def test_credentials_reach_the_processes_by_reference_only():
    """No runtime environment carries env vars (Ray logs them in plain text); every secret of the manifests comes
    from a Secret; the pods' S3 identity is a service account; Ray's processes never get the MLflow server's own
    secrets, only the sweep's MLflow user."""
    runtime_envs = [yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())]
    runtime_envs += [yaml.safe_load(job["spec"]["runtimeEnvYAML"]) for job in k8s("RayJob")]
    assert runtime_envs and not [env for env in runtime_envs if "env_vars" in env]
    for node in walk(K8S):
        if "name" in node and re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", str(node["name"])):
            assert "valueFrom" in node and "value" not in node, node

    (account,) = k8s("ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    (cluster,) = k8s("RayCluster")
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"][
        "workerGroupSpecs"]]
    for template in [*templates, k8s("Deployment", "bgad-mlflow")[0]["spec"]["template"]]:
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    for template in templates:
        for container in template["spec"]["containers"]:
            sources = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
            assert "bgad-mlflow-sweeper" in sources and "bgad-mlflow-auth" not in sources, sources

    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in LAUNCHER[key]
              if "ray start" in c]
    for command in starts:
        assert ". ~/mlflow-client.env" in command and "mlflow-server.env" not in command, command
