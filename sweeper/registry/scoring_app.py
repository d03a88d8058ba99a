"""The scoring server's HTTP app: ``POST /invocations`` takes image bytes, never paths; errors are one-line JSON.

``sweeper.serve`` builds it around a loaded ``Scorer`` and runs it with uvicorn. A request carries one or more
images as

- the raw bytes of one image: ``Content-Type: image/png``, ``image/jpeg``, ``image/bmp``, ``image/tiff`` or
  ``application/octet-stream``;
- ``multipart/form-data`` with one file part per image (any field names);
- ``application/json`` in the forms MLflow's scoring server reads, with base64 strings:
  ``{"dataframe_records": [{"image": "<base64>"}]}``, ``{"dataframe_split": {"columns": ["image"], "data": [...]}}``,
  ``{"inputs": [{"image": ...}]}`` or ``{"inputs": {"image": [...]}}`` (``instances`` like ``inputs``).

The reply is ``{"predictions": [{"score": 0.91, "decision": true, "map": [[...], ...]}, ...]}`` in request order;
``map`` (omitted with ``map_mode="none"``) has at most the model's input size (``bgad_core.engine.inference.map_size``).
A refused request gets ``{"error": "<one line>"}`` and a 4xx: 400 unreadable image, bad base64 or JSON, a text field
in a form; 413 body over ``max_body_bytes``, more than ``max_images`` images or an image over ``max_pixels``; 415
another content type; 422 an image side under ``min_side``. Anything unexpected is a 500 whose traceback goes to
the server's log only: no stack trace or server path ever reaches a client.

Checks run cheapest first: the declared body size before reading, the bytes read while reading, every image's
header before any image is decoded (an 8000 x 8000 PNG is refused in milliseconds), then decoding and scoring, one
request at a time: a request's memory is then one image at full resolution plus its batch at model size, and
torch already uses every core for one batch.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile  # what forms hold (FastAPI's is a subclass)
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bgad_core.errors import ConfigError, DataError
from bgad_core.data.image_input import ImageLimits, ImageTooLarge, ImageTooSmall, decode, from_base64, open_image
from bgad_core.engine.inference import Prediction, Scorer
from sweeper.registry.serving import IMAGE_COLUMN

log = logging.getLogger("sweeper.serve")

RAW_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "application/octet-stream")
MULTIPART_TYPE = "multipart/form-data"
JSON_TYPE = "application/json"
JSON_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")
MAP_MODES = ("grid", "none")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold, and whether replies carry the anomaly map (``map_mode``: grid or none)."""

    images: ImageLimits = field(default_factory=ImageLimits)
    max_body_bytes: int = 64 * 2**20
    max_images: int = 16
    map_mode: str = "grid"

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_images < 1:
            raise ConfigError(f"max_body_bytes and max_images: expected at least 1, got {self.max_body_bytes} and "
                              f"{self.max_images}")
        if self.map_mode not in MAP_MODES:
            raise ConfigError(f"map_mode: expected one of {MAP_MODES}, got {self.map_mode!r}")


class RequestError(Exception):
    """A request refused before scoring, with the HTTP status to answer and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(scorer: Scorer, model_info: Mapping[str, Any], limits: ServeLimits) -> FastAPI:
    """The app scoring with ``scorer``; ``model_info`` (name, version, ...) is part of ``GET /version``."""
    app = FastAPI(title="bgad scoring server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    add_error_handlers(app)
    one_at_a_time = threading.Lock()
    version = {**model_info, "threshold": scorer.threshold, "input_size": list(scorer.image_size),
               "max_pixels": limits.images.max_pixels, "min_side": limits.images.min_side,
               "max_images": limits.max_images, "max_body_bytes": limits.max_body_bytes, "map": limits.map_mode}

    @app.get("/ping")
    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/version")
    def model_version() -> dict[str, Any]:
        return version

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:  # a JSONResponse skips FastAPI's per-float encoder
        blobs = await request_images(request, limits.max_images)
        opened = [open_image(data, f"image {index}", limits.images) for index, data in enumerate(blobs)]

        def score() -> Prediction:
            with one_at_a_time:
                return scorer.score(decode(image, f"image {index}") for index, image in enumerate(opened))

        return JSONResponse({"predictions": prediction_rows(await run_in_threadpool(score), limits.map_mode)})

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"error": message}`` with its status; unexpected errors as a bare 500."""

    @app.exception_handler(DataError)
    async def bad_image(request: Request, err: DataError) -> JSONResponse:
        status = 413 if isinstance(err, ImageTooLarge) else 422 if isinstance(err, ImageTooSmall) else 400
        return refusal(status, str(err))

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, err: RequestError) -> JSONResponse:
        return refusal(err.status, str(err))

    @app.exception_handler(HTTPException)  # Starlette's own: unknown path, wrong method, malformed form
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return refusal(err.status_code, str(err.detail))

    @app.exception_handler(Exception)  # Starlette re-raises it after replying, so uvicorn logs the traceback
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": "internal error while scoring (the server's log has the details)"}, 500)


def refusal(status: int, message: str) -> JSONResponse:
    log.info("refused (%d): %s", status, message)
    return JSONResponse({"error": message}, status_code=status)


async def request_images(request: Request, max_images: int) -> list[bytes]:
    """The encoded images of a request, by its content type."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type in RAW_TYPES:
        images = [await request.body()]
    elif media_type == MULTIPART_TYPE:
        images = await multipart_images(request)
    elif media_type == JSON_TYPE:
        images = json_images(await request.body())
    else:
        raise RequestError(415, f"content type {media_type or '(none)'!r} is not accepted: send one of "
                                f"{', '.join((*RAW_TYPES, MULTIPART_TYPE, JSON_TYPE))}")
    if not images:
        raise RequestError(400, "the request holds no image")
    if len(images) > max_images:
        raise RequestError(413, f"{len(images)} images in one request, the limit is {max_images}")
    return images


async def multipart_images(request: Request) -> list[bytes]:
    """The file parts of a form; a text part is refused (it could only be a path or an unlabelled base64 string).

    The number of parts is left to ``request_images`` (one message for every form of request); the body limit
    already bounds what the parser spools.
    """
    async with request.form() as form:
        images = []
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise RequestError(400, f"form field {name!r} is not a file: send each image as a file part")
            images.append(await value.read())
        return images


def json_images(body: bytes) -> list[bytes]:
    """The base64-decoded ``image`` values of a JSON body in one of MLflow's forms (``JSON_KEYS``)."""
    try:
        payload = json.loads(body)
    except ValueError as err:  # also UnicodeDecodeError
        raise RequestError(400, f"the body is not JSON ({err})") from err
    keys = [key for key in JSON_KEYS if key in payload] if isinstance(payload, dict) else []
    if len(keys) != 1:
        raise RequestError(400, f"JSON body: expected an object with one of the keys {', '.join(JSON_KEYS)}")
    data = payload[keys[0]]
    try:
        table = pd.DataFrame(**data) if keys[0] == "dataframe_split" else pd.DataFrame(data)
    except (TypeError, ValueError) as err:
        raise RequestError(400, f"JSON {keys[0]!r}: not a table of {IMAGE_COLUMN!r} values") from err
    if IMAGE_COLUMN not in table:
        raise RequestError(400, f"JSON {keys[0]!r}: no {IMAGE_COLUMN!r} column (columns: {list(table.columns)})")
    return [base64_value(value, f"image {index}") for index, value in enumerate(table[IMAGE_COLUMN])]


def base64_value(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise DataError(f"{name}: expected a base64 string, got {type(value).__name__}")
    return from_base64(value, name)


def prediction_rows(prediction: Prediction, map_mode: str) -> list[dict[str, Any]]:
    rows = []
    for score, decision, heatmap in zip(prediction.scores, prediction.decisions, prediction.maps):
        row: dict[str, Any] = {"score": float(score), "decision": bool(decision)}
        if map_mode == "grid":
            row["map"] = heatmap.tolist()
        rows.append(row)
    return rows


class BodyLimit:
    """ASGI middleware refusing a body over ``max_bytes``: from its Content-Length before reading a byte, else
    (chunked transfer) as soon as the bytes read pass the limit, so no request body is ever held whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body over the limit of {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await refusal(413, self.message)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise RequestError(413, self.message)
            return message

        await self.app(scope, limited_receive, send)

