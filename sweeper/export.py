"""Export a trained model as one ONNX file for inspection stations, verified against the model it came from.

    .venv/bin/python -m sweeper.export models:/bgad-tiles@champion --format onnx --output exports/bgad-tiles
    .venv/bin/python -m sweeper.export 590935181b3e4e148a5eac089c0a430f --format onnx --output exports/trial
    .venv/bin/python -m sweeper.export runs/mtd/model.pt --weights offline --format onnx --output exports/mtd

The source is a registered version (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the checkpoint and backbone
weights its pyfunc serves), a trial run id (its checkpoint and the sweep's backbone, as ``sweeper.promote``
rebuilds them) or a checkpoint file of ``bgad_core.train`` (backbone from ``--weights``, default ``auto``).
``DIR/model.onnx`` is the graph of ``bgad_core.engine.export`` (uint8 ``[batch, H, W, 3]`` RGB in; ``score``, ``map``,
``decision`` out); ``DIR/README.md`` says how to feed it and what it returns. Before anything is logged,
onnxruntime runs the file on generated images and its outputs must match the PyTorch model's (scores within
``SCORE_TOLERANCE``, maps within ``MAP_TOLERANCE``, the same scores one image at a time as in a batch), per unit of
score: float32 paths through a backbone differ in relative terms, and a model that scores nearest-normal distances
alone reads scores of ~13 on such images, whose ONNX and PyTorch values differed by 1.1e-4.

Both files are then logged next to the source: into a registered version's own model artifacts under ``onnx/``
(tags ``bgad.onnx`` and ``bgad.onnx_sha256`` on the version; fetch with ``mlflow artifacts download -u
models:/NAME@ALIAS/onnx``), or into a trial run under ``onnx/<category>/``. A checkpoint file's export stays in DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from bgad_core.engine.checkpoint import load_checkpoint
from bgad_core.errors import ConfigError, DataError
from bgad_core.engine.export import OPSET, Agreement, ExportableScorer, ExportError, export_onnx, onnx_agreement
from bgad_core.engine.inference import Scorer
from sweeper import promote
from sweeper.registry import serving
from sweeper.tracking import mlflow_runs as tracking

log = logging.getLogger("sweeper.export")

FORMATS = ("onnx",)
ONNX_FILE = "model.onnx"
README_FILE = "README.md"
VERSION_ARTIFACT_PATH = "onnx"
RUN_ARTIFACT_PATH = "onnx/{category}"
ONNX_TAG, DIGEST_TAG = "bgad.onnx", "bgad.onnx_sha256"
SCORE_TOLERANCE = 1e-4  # per unit of score (Agreement.score_scale), as MAP_TOLERANCE
MAP_TOLERANCE = 1e-3
VERIFY_IMAGES = 3
VERIFY_SEED = 0
RUN_ID = re.compile(r"[0-9a-f]{32}")
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


class SourceError(Exception):
    """The export source cannot be found or rebuilt; the message names it."""


@dataclass(frozen=True)
class Source:
    """The model to export, what it is (for the README) and how to log the export next to it (None: nowhere)."""

    scorer: Scorer
    description: str
    publish: Callable[[Path, Path], str] | None  # logs the graph and its README, says where


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote and where it logged it."""

    onnx: Path
    readme: Path
    agreement: Agreement
    logged_to: str | None


def export(
    source: str, output: str | Path, tracking_uri: str, weights: str | None = None, category: str | None = None,
    log_artifacts: bool = True,
) -> Exported:
    """Export ``source`` to ``output``/model.onnx, verify it with onnxruntime, write the README, log both.

    Example::

        >>> export("models:/bgad-tiles@champion", "exports/bgad-tiles", "sqlite:///runs/mlflow.db")  # doctest: +SKIP
    """
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="bgad-export-") as scratch:
        loaded = load_source(source, tracking_uri, weights, category, Path(scratch))
        model = ExportableScorer(loaded.scorer)
        path = export_onnx(model, output / ONNX_FILE, {"bgad.source": loaded.description})
        agreement = onnx_agreement(path, loaded.scorer, verification_images(model.image_size))
        check_agreement(agreement, path)
        readme = output / README_FILE
        readme.write_text(readme_text(model, loaded.description, agreement))
        logged_to = loaded.publish(path, readme) if (log_artifacts and loaded.publish) else None
    return Exported(path, readme, agreement, logged_to)


# ------------------------------------------------------------------------------------------------ the source


def load_source(source: str, tracking_uri: str, weights: str | None, category: str | None, scratch: Path) -> Source:
    """The scorer behind a ``models:/`` URI, a trial run id or a checkpoint file."""
    uri = MODEL_URI.fullmatch(source)
    if uri:
        return registry_source(MlflowClient(tracking_uri, registry_uri=tracking_uri), uri["name"], uri["alias"],
                               uri["version"], scratch)
    if Path(source).is_file():
        return checkpoint_source(Path(source), weights or "auto")
    if RUN_ID.fullmatch(source):
        return run_source(MlflowClient(tracking_uri), source, weights, category, scratch)
    raise SourceError(f"source {source!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id "
                      "or an existing checkpoint file")


def registry_source(
    client: MlflowClient, name: str, alias: str | None, version: str | None, scratch: Path
) -> Source:
    """The registered version's checkpoint and backbone weights, read as its pyfunc reads them (with this
    repository's code, not the copy logged with the model); the export goes into its model artifacts."""
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise SourceError(f"models:/{name}{f'@{alias}' if alias else f'/{version}'}: not in the registry "
                              f"({err.message})") from err
        raise
    location = client.get_model_version_download_uri(name, found.version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(scratch)))
    logged = Model.load(str(local))
    if logged.model_id is None:
        raise SourceError(f"{name} version {found.version} has no logged model (registered before MLflow 3?): "
                          "export its trial run id instead")
    files = logged.flavors["python_function"]["artifacts"]
    scorer = Scorer.load(local / files[serving.CHECKPOINT_ARTIFACT]["path"],
                         local / files[serving.BACKBONE_ARTIFACT]["path"])
    described = f"models:/{name}/{found.version}" + (f" (alias {alias})" if alias else "")

    def publish(graph: Path, readme: Path) -> str:
        for file in (graph, readme):
            client.log_model_artifact(logged.model_id, str(file), artifact_path=VERSION_ARTIFACT_PATH)
        tags = {ONNX_TAG: f"{VERSION_ARTIFACT_PATH}/{graph.name}", DIGEST_TAG: sha256(graph)}
        for key, value in tags.items():
            tracking.with_retry(lambda: client.set_model_version_tag(name, found.version, key, value))
        return f"models:/{name}/{found.version}/{VERSION_ARTIFACT_PATH}"

    return Source(scorer, described, publish)


def run_source(client: MlflowClient, run_id: str, weights: str | None, category: str | None, scratch: Path) -> Source:
    """A sweep trial's checkpoint with the sweep's backbone; the export goes into the run's artifacts."""
    trial = promote.existing_run(client, run_id, f"run {run_id}")
    parent_id = trial.data.tags.get(tracking.PARENT_TAG)
    if not parent_id:
        raise SourceError(f"run {run_id} is not a trial of a sweep (no {tracking.PARENT_TAG} tag)")
    source = promote.trial_source(client, client.get_run(parent_id), run_id, category)
    checkpoint, extractor = promote.trial_model(client, source, scratch, weights)
    artifact_path = RUN_ARTIFACT_PATH.format(category=source.category)

    def publish(graph: Path, readme: Path) -> str:
        for file in (graph, readme):
            client.log_artifact(run_id, str(file), artifact_path=artifact_path)
        return f"runs:/{run_id}/{artifact_path}"

    return Source(Scorer(checkpoint, extractor), f"run {run_id}, category {source.category}", publish)


def checkpoint_source(path: Path, weights: str) -> Source:
    """A ``bgad_core.train`` checkpoint file with the backbone ``weights`` resolve to (checked by digest)."""
    try:
        checkpoint = load_checkpoint(path)
    except Exception as err:  # torch.load raises many types for files that are not checkpoints
        raise SourceError(f"{path}: not a readable bgad checkpoint ({type(err).__name__}: {err})") from err
    missing = [key for key in ("name", "strides", "weights_digest") if key not in checkpoint["backbone"]]
    if missing:
        raise SourceError(f"{path}: its backbone entry lacks {missing} (a sweep trial's checkpoint? export it by "
                          "its run id, which finds them in the sweep's config)")
    extractor = promote.rebuild_backbone(checkpoint["backbone"], weights, str(path))
    return Source(Scorer(checkpoint, extractor), f"checkpoint file {path.resolve()}", None)


# ------------------------------------------------------------------------------------------- checking the file


def verification_images(image_size: tuple[int, int], count: int = VERIFY_IMAGES) -> np.ndarray:
    """Seeded uint8 ``[count, H, W, 3]`` images: noise, which drives every layer far from a constant output."""
    return np.random.default_rng(VERIFY_SEED).integers(0, 256, (count, *image_size, 3), dtype=np.uint8)


def check_agreement(agreement: Agreement, path: Path) -> None:
    """Refuse a graph whose onnxruntime outputs are not the PyTorch model's (it is then not logged anywhere).

    Tolerances are per unit of score (``agreement.score_scale``, the largest PyTorch score, at least 1).
    """
    problems = []
    scale = agreement.score_scale
    if not agreement.score_error <= SCORE_TOLERANCE * scale:
        problems.append(f"scores differ by up to {agreement.score_error:.3g} "
                        f"(tolerance {SCORE_TOLERANCE * scale:.3g}: {SCORE_TOLERANCE:g} x scores up to {scale:.3g})")
    if not agreement.map_error <= MAP_TOLERANCE * scale:
        problems.append(f"maps differ by up to {agreement.map_error:.3g} (tolerance {MAP_TOLERANCE * scale:.3g})")
    if not agreement.batch_error <= SCORE_TOLERANCE * scale:
        problems.append(f"scores depend on the batch by up to {agreement.batch_error:.3g}")
    if problems:
        raise ExportError(f"{path}: onnxruntime disagrees with the PyTorch model: {'; '.join(problems)}; "
                          "the file was not logged, do not deploy it")


def readme_text(model: ExportableScorer, description: str, agreement: Agreement) -> str:
    """What an inspection station needs to run the file: input layout, preprocessing, outputs, threshold."""
    height, width = model.image_size
    versions = {name: importlib.metadata.version(name) for name in ("torch", "onnx", "onnxruntime")}
    return f"""# Anomaly detector ({model.scorer.family}), ONNX

`{ONNX_FILE}`: exported from {description} by `sweeper.export` (torch {versions['torch']}, onnx
{versions['onnx']}, opset {OPSET}).

## Input

`images`: uint8, shape `[batch, {height}, {width}, 3]` (NHWC), RGB channel order, any batch size.

Preprocessing, as in training: decode to 8-bit RGB (grey images: the one channel three times), then resize to
{width} x {height} (width x height) with bilinear interpolation (Pillow `Image.resize((W, H), BILINEAR)`). Nothing
else: the graph scales to [0, 1] and applies the backbone's mean and standard deviation itself.

## Outputs

| name | type | shape | meaning |
|---|---|---|---|
| `score` | float32 | `[batch]` | anomaly score; absolute: an image scores the same in any batch |
| `map` | float32 | `[batch, {height}, {width}]` | anomaly map at model resolution (resize bilinearly to the image's size to overlay it) |
| `decision` | bool | `[batch]` | `score >= {model.threshold!r}` |

Threshold: `{model.threshold!r}`, the F1-max threshold of the validation split (also in the file's metadata,
`bgad.threshold`). Higher scores are more anomalous.

## Verification

onnxruntime {versions['onnxruntime']} (CPU) against the PyTorch model on {agreement.images} generated images
(scores up to {agreement.score_scale:.3g}):
scores within {agreement.score_error:.2g}, maps within {agreement.map_error:.2g}, decisions
{'equal' if agreement.decisions_equal else 'NOT equal'}; one image at a time vs all in one batch: scores within
{agreement.batch_error:.2g}.

## Run

```python
import numpy as np, onnxruntime
from PIL import Image

session = onnxruntime.InferenceSession("{ONNX_FILE}", providers=["CPUExecutionProvider"])
image = Image.open("part.png").convert("RGB").resize(({width}, {height}), Image.Resampling.BILINEAR)
score, anomaly_map, decision = session.run(None, {{"images": np.asarray(image)[None]}})
```
"""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="models:/NAME@ALIAS, models:/NAME/VERSION, a trial run id or a checkpoint file")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default: onnx)")
    parser.add_argument("--output", required=True, help="folder for model.onnx and README.md (created)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db")
    parser.add_argument("--weights", help="backbone weights (mode or file): for a checkpoint file (default auto), "
                                          "or instead of the sweep's for a run id")
    parser.add_argument("--category", help="category of a run id's checkpoint (needed when the run has several)")
    parser.add_argument("--no-log", action="store_true", help="write DIR only, log nothing to MLflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uri = tracking.default_tracking_uri(args.tracking_uri)
    try:
        exported = export(args.source, args.output, uri, args.weights, args.category, not args.no_log)
    except (SourceError, ExportError, promote.PromoteError, ConfigError, DataError, MlflowException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"onnx": str(exported.onnx), "readme": str(exported.readme), "logged_to": exported.logged_to,
                      "agreement": exported.agreement._asdict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
