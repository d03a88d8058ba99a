"""The registered model: an MLflow pyfunc around ``bgad_core.engine.inference.Scorer``, logged as code.

``sweeper.promote`` logs this file with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts=...)``
(models-from-code: nothing is pickled; MLflow runs this file at load time and takes the model from
``mlflow.models.set_model`` below). The artifacts are the checkpoint and the backbone's own weights, both read with
``weights_only`` / safetensors, and ``bgad_core`` travels as model code, so loading needs neither the network nor
the offline weights package. The REST server is ``python -m sweeper.serve``, which scores these same artifacts.

Input: a DataFrame (or list of dicts) with one column ``image``, one row per image, each value a uint8
``[H, W, 3]`` (or grey ``[H, W]``) array, the encoded bytes of a PNG/JPEG/BMP/TIFF file, a ``pathlib.Path`` to
one (for Python callers in this process), or -- the JSON-friendly form -- a string of base64-encoded file bytes::

    {"dataframe_records": [{"image": "<base64 PNG>"}]}

A string is never taken for a file path: a JSON client could otherwise make the server read any file it can.
Every image is checked against ``bgad_core.data.image_input.ImageLimits`` (16 MP at most, 32 px per side at least),
encoded ones from their header before decoding.

Output: one row per image with ``score`` (absolute: the same image always scores the same), ``decision``
(``score >= threshold``, the F1-max threshold of validation) and ``map`` (the anomaly map at the image's
resolution, no side longer than the model's input: ``bgad_core.engine.inference.map_size``).

    >>> import mlflow.pyfunc, pandas as pd                                           # doctest: +SKIP
    >>> model = mlflow.pyfunc.load_model("models:/bgad-tiles@champion")              # doctest: +SKIP
    >>> model.predict(pd.DataFrame({"image": [Path("tile.png")]}))["score"]          # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema
from PIL import Image

from bgad_core.errors import DataError
from bgad_core.data.image_input import ImageLimits, check_array, decode, from_base64, open_image
from bgad_core.engine.inference import Scorer

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
    """Scores images with the promoted model, of any detector family (see the module docstring for input and output)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.scorer = Scorer.load(context.artifacts[CHECKPOINT_ARTIFACT], context.artifacts[BACKBONE_ARTIFACT])

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input:
            raise DataError(f"input: expected a column {IMAGE_COLUMN!r}, got {list(model_input.columns)}")
        # a generator: the scorer resizes each image to the model's input before the next one is decoded
        images = (decode_image(value, f"row {index}") for index, value in enumerate(model_input[IMAGE_COLUMN]))
        prediction = self.scorer.score(images)
        return pd.DataFrame({
            "score": prediction.scores.astype(np.float64),
            "decision": prediction.decisions,
            "map": prediction.maps,
        })


def decode_image(value: Any, name: str, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """One ``image`` value as a uint8 array, checked against ``limits`` and decoded as training decoded files."""
    if isinstance(value, np.ndarray):
        return check_array(value, name, limits)
    if isinstance(value, Path):
        try:
            value = value.read_bytes()
        except OSError as err:
            raise DataError(f"{name}: cannot read {value}: {err.strerror}") from err
    if isinstance(value, str):
        value = from_base64(value, name)
    if isinstance(value, (bytes, bytearray)):
        return decode(open_image(bytes(value), name, limits), name)
    raise DataError(f"{name}: expected an array, image bytes, a pathlib.Path or a base64 string, "
                    f"got {type(value).__name__}")


def encode_image(image: np.ndarray) -> str:
    """A uint8 ``[H, W, 3]`` image as base64 PNG (lossless: the server scores exactly these pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example(image_size: tuple[int, int]) -> pd.DataFrame:
    """A one-image request in the JSON-friendly form (a mid-grey image of the model's size, as base64 PNG)."""
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(np.full((*image_size, 3), 128, dtype=np.uint8))]})


mlflow.models.set_model(AnomalyModel())
