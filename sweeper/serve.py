"""Serve a registered model over HTTP: ``python -m sweeper.serve NAME[@ALIAS]``.

    .venv/bin/python -m sweeper.promote --sweep quickstart --best --name bgad-tiles   # version + alias champion
    .venv/bin/python -m sweeper.serve bgad-tiles@champion                             # http://127.0.0.1:8080
    curl -s -H 'Content-Type: image/png' --data-binary @tile.png http://127.0.0.1:8080/invocations

MODEL is ``NAME`` (alias ``champion``), ``NAME@ALIAS``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``. The
registry is the tracking store ``sweeper.promote`` writes to, resolved the same way: ``--tracking-uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///runs/mlflow.db`` under the current directory. A store, model, alias or
version that does not exist is a one-line ``error:`` naming the store and what it does hold (exit 2), and no
empty store is ever created.

The server scores with the repository's ``bgad_core.engine.inference.Scorer`` built from the version's artifacts (its
checkpoint, read ``weights_only``, and backbone weights, safetensors): the object the registered pyfunc wraps, so
scores equal the pyfunc's and the trial's own evaluation, and no code stored in the registry runs here. uvicorn
runs inside this process (no ``uvicorn`` executable on PATH needed; one process, one copy of the model). The port
is 8080, not MLflow's 5000, which the MLflow UI of the same sweep likely holds. Requests, replies, limits and
status codes: ``sweeper.registry.scoring_app``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from bgad_core.errors import ConfigError, DataError
from bgad_core.data.image_input import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageLimits
from bgad_core.engine.inference import Scorer
from sweeper.registry import serving
from sweeper.tracking import mlflow_runs as tracking
from sweeper.job.names import SAFE_NAME_RULE, is_safe_name, match
from sweeper.promote import SOURCE_RUN_TAG
from sweeper.registry.scoring_app import MAP_MODES, ServeLimits, create_app

log = logging.getLogger("sweeper.serve")

DEFAULT_ALIAS = "champion"
DEFAULT_PORT = 8080
MODELS_SCHEME = "models:/"
MLMODEL = "MLmodel"


class ServeError(Exception):
    """The model cannot be served; the message names the store and what it holds."""


@dataclass(frozen=True)
class ModelRef:
    """A registered model and either an alias or a version of it."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:  # a name sweeper.promote could have registered, and a filter can hold
        if not is_safe_name(self.name):
            raise ServeError(f"model name {self.name!r}: a registered model name must be {SAFE_NAME_RULE}")

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@{self.alias}"


def parse_model(spec: str) -> ModelRef:
    """``NAME``, ``NAME@ALIAS``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` as a ``ModelRef``."""
    is_uri = spec.startswith(MODELS_SCHEME)
    text = spec.removeprefix(MODELS_SCHEME)
    name, at, alias = text.partition("@")
    if is_uri and not at:
        name, slash, version = text.rpartition("/")
        if slash and name and version.isdigit():
            return ModelRef(name, version=version)
        raise ServeError(f"model {spec!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if not name or (at and not alias) or "/" in name:
        raise ServeError(f"model {spec!r}: expected NAME, NAME@ALIAS, models:/NAME@ALIAS or models:/NAME/VERSION")
    return ModelRef(name, alias=alias or DEFAULT_ALIAS)


def check_store_exists(uri: str) -> None:
    """Refuse a local store (SQLite file or folder) that does not exist: MLflow would create an empty one."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "sqlite":
        path = Path(uri.removeprefix(tracking.SQLITE_PREFIX))
    elif parts.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(parts.path))
    else:
        return
    if not path.exists():
        raise ServeError(f"tracking store {uri} does not exist: promote a model into it first (sweeper.promote), "
                         "or name the sweep's store with --tracking-uri or $MLFLOW_TRACKING_URI")


def find_version(client: MlflowClient, ref: ModelRef, uri: str) -> ModelVersion:
    """The version ``ref`` names, or a ``ServeError`` listing the models, aliases or versions the store has."""
    try:
        model = client.get_registered_model(ref.name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise ServeError(f"{uri}: no registered model {ref.name!r}; registered models: "
                         f"{', '.join(names) or 'none'}") from err
    if ref.alias is not None:
        if ref.alias not in model.aliases:
            held = ", ".join(f"{alias} (version {version})" for alias, version in sorted(model.aliases.items()))
            raise ServeError(f"{uri}: model {ref.name!r} has no alias {ref.alias!r}; aliases: {held or 'none'}")
        return client.get_model_version(ref.name, model.aliases[ref.alias])
    try:
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        versions = sorted(int(v.version) for v in client.search_model_versions(match(name=ref.name)))
        raise ServeError(f"{uri}: model {ref.name!r} has no version {ref.version}; versions: "
                         f"{', '.join(map(str, versions)) or 'none'}") from err


def load_scorer(client: MlflowClient, version: ModelVersion, uri: str) -> Scorer:
    """The ``Scorer`` of a version promoted by ``sweeper.promote``, from its checkpoint and backbone artifacts."""
    model_dir = client.get_model_version_download_uri(version.name, version.version)
    with tempfile.TemporaryDirectory(prefix="bgad-serve-") as folder:

        def download(path: str) -> str:
            return download_artifacts(artifact_uri=f"{model_dir}/{path}", dst_path=folder, tracking_uri=uri)

        artifacts = Model.load(download(MLMODEL)).flavors.get("python_function", {}).get("artifacts", {})
        missing = {serving.CHECKPOINT_ARTIFACT, serving.BACKBONE_ARTIFACT} - set(artifacts)
        if missing:
            raise ServeError(f"{version.name} version {version.version}: not a model promoted by sweeper.promote "
                             f"(it lacks the artifacts {sorted(missing)})")
        # read into memory here, so the folder can go
        return Scorer.load(download(artifacts[serving.CHECKPOINT_ARTIFACT]["path"]),
                           download(artifacts[serving.BACKBONE_ARTIFACT]["path"]))


def model_info(version: ModelVersion, ref: ModelRef) -> dict[str, Any]:
    return {"name": version.name, "version": version.version, "alias": ref.alias,
            "model_uri": f"{MODELS_SCHEME}{version.name}/{version.version}",
            "source_run_id": version.tags.get(SOURCE_RUN_TAG), "category": version.tags.get(tracking.CATEGORY_TAG)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweeper.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="NAME (alias champion), NAME@ALIAS, models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--tracking-uri", help="store holding the registry (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///runs/mlflow.db under the current directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; "
                                                            "0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"largest image, width x height, checked from its header before decoding "
                             f"(default: {DEFAULT_MAX_PIXELS}, 16 MP)")
    parser.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE,
                        help=f"shortest image side accepted, in pixels (default: {DEFAULT_MIN_SIDE})")
    defaults = ServeLimits()
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help=f"largest request body (default: {defaults.max_body_bytes}, 64 MiB)")
    parser.add_argument("--max-images", type=int, default=defaults.max_images,
                        help=f"most images in one request (default: {defaults.max_images})")
    parser.add_argument("--map", choices=MAP_MODES, default=defaults.map_mode,
                        help="grid: each reply carries the anomaly map, at most the model's input size per side; "
                             "none: scores and decisions only (default: grid)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false")  # three small files: no bars
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    try:
        limits = ServeLimits(ImageLimits(args.max_pixels, args.min_side), args.max_body_bytes, args.max_images,
                             args.map)
        ref = parse_model(args.model)
        check_store_exists(uri)
        client = MlflowClient(uri, registry_uri=uri)
        version = find_version(client, ref, uri)
        scorer = load_scorer(client, version, uri)
    except (ServeError, ConfigError, DataError, MlflowException) as err:
        print(f"error: {tracking.redact(str(err))}", file=sys.stderr)
        return 2
    log.info("serving %s (version %s, threshold %.4f) on http://%s:%d", ref, version.version, scorer.threshold,
             args.host, args.port)
    uvicorn.run(create_app(scorer, model_info(version, ref), limits), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
