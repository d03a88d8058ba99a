"""The registered model: an MLflow pyfunc around ``bgad_core.inference.Scorer``, logged as code.

``sweeper.promote`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts=...)``
(models-from-code: nothing is pickled; MLflow runs this file at load time and takes the model from
``mlflow.models.set_model`` below). The artifacts are the checkpoint and the backbone's own weights, both read with
``weights_only`` / safetensors, and ``bgad_core`` travels as model code, so loading needs neither the network nor
the offline weights package.

Input: a DataFrame (or list of dicts) with one column ``image``, one row per image, each value either a uint8
``[H, W, 3]`` (or grey ``[H, W]``) array, the encoded bytes of an image file, a path to one, or -- the JSON-friendly
form for the REST server -- a string holding a path or base64-encoded PNG/JPEG/... bytes::

    {"dataframe_records": [{"image": "<base64 PNG>"}]}

Output: one row per image with ``score`` (absolute: the same image always scores the same), ``decision``
(``score >= threshold``, the F1-max threshold of validation) and ``map`` (anomaly map at the image's resolution).
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema
from PIL import Image

from bgad_core.datasets import load_image
from bgad_core.errors import DataError
from bgad_core.inference import Scorer

IMAGE_COLUMN = "image"
CHECKPOINT_ARTIFACT = "checkpoint"
BACKBONE_ARTIFACT = "backbone"
# ``image`` is AnyType because one column carries arrays (Python callers) as well as strings (REST callers).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN)]),
    outputs=Schema([
        ColSpec(DataType.double, "score"),
        ColSpec(DataType.boolean, "decision"),
        ColSpec(Array(Array(DataType.float)), "map"),
    ]),
)


class AnomalyModel(mlflow.pyfunc.PythonModel):
    """Scores images with the promoted BGAD model (see the module docstring for input and output)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.scorer = Scorer.load(context.artifacts[CHECKPOINT_ARTIFACT], context.artifacts[BACKBONE_ARTIFACT])

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input:
            raise DataError(f"input: expected a column {IMAGE_COLUMN!r}, got {list(model_input.columns)}")
        images = [decode_image(value, f"row {index}") for index, value in enumerate(model_input[IMAGE_COLUMN])]
        prediction = self.scorer.score(images)
        return pd.DataFrame({
            "score": prediction.scores.astype(np.float64),
            "decision": prediction.decisions,
            "map": prediction.maps,
        })


def decode_image(value: Any, name: str) -> np.ndarray:
    """One ``image`` value as a uint8 array at its own resolution, decoded exactly as training decoded files."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray)):
        return _decode_bytes(bytes(value), name)
    if isinstance(value, Path) or (isinstance(value, str) and _is_file(value)):
        return load_image(value, None)
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise DataError(
                f"{name}: {value[:80]!r} is neither an existing file nor base64-encoded image bytes"
            ) from err
        return _decode_bytes(data, name)
    raise DataError(f"{name}: expected an array, image bytes, a path or a base64 string, got {type(value).__name__}")


def _is_file(text: str) -> bool:
    """Whether ``text`` names an existing file; a long base64 string is no file name (and makes stat raise)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _decode_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode through a file so bytes get ``load_image``'s conversions (16-bit, palette, grey -> RGB) unchanged."""
    with tempfile.TemporaryDirectory(prefix="bgad-serve-") as folder:
        path = Path(folder) / "image"
        path.write_bytes(data)
        try:
            return load_image(path, None)
        except DataError as err:
            raise DataError(f"{name}: not a readable image ({err})") from err


def encode_image(image: np.ndarray) -> str:
    """A uint8 ``[H, W, 3]`` image as base64 PNG (lossless: the server scores exactly these pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example(image_size: tuple[int, int]) -> pd.DataFrame:
    """A one-image request in the JSON-friendly form (a mid-grey image of the model's size, as base64 PNG)."""
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(np.full((*image_size, 3), 128, dtype=np.uint8))]})


mlflow.models.set_model(AnomalyModel())
