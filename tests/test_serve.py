"""``python -m sweeper.serve``, started as README says on 127.0.0.1 with the venv's bin off PATH: it serves the
trial's own scores, refuses paths, bombs and malformed requests with a 4xx and the project's one-line message (no
stack trace), keeps replies small, and reports a missing store or model without creating anything."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ray_processes import REPO, VENV_BIN, free_port, stop_group
from registry_fixtures import trial_evaluation
from sweeper.registry.scoring_app import BodyLimit, RequestError
from sweeper.serve import main

NAME = "bgad-tiles"
SERVER_START_TIMEOUT_S = 180
MULTIPART_BOUNDARY = "bgad-test-boundary"


@dataclass(frozen=True)
class Server:
    port: int
    process: subprocess.Popen
    log_path: Path

    def memory_kb(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the server process, in kB."""
        lines = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in lines)
        return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def records(text: str) -> tuple[bytes, str]:
    """MLflow's JSON request form with ``text`` as the image value."""
    return json.dumps({"dataframe_records": [{"image": text}]}).encode(), "application/json"


def multipart(files: list[bytes], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part per image (and text ``fields``)."""
    parts = [f'Content-Disposition: form-data; name="image"; filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'
             .encode() + data for i, data in enumerate(files)]
    parts += [f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode()
              for name, value in (fields or {}).items()]
    delimiter = f"--{MULTIPART_BOUNDARY}\r\n".encode()
    body = b"".join(delimiter + part + b"\r\n" for part in parts) + f"--{MULTIPART_BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"


def png(size: tuple[int, int]) -> bytes:
    """A grey PNG of ``size`` (width, height)."""
    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(recorded, promoted, tmp_path_factory):
    """README's command, verbatim but for the port: the store comes from $MLFLOW_TRACKING_URI."""
    port = free_port()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    env = {**os.environ, "MLFLOW_TRACKING_URI": recorded.tracking_uri, "PATH": path}
    env.pop("MLFLOW_REGISTRY_URI", None)
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    command = [str(VENV_BIN / "python"), "-m", "sweeper.serve", f"{NAME}@champion", "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_server(port, process, log_path)
        yield Server(port, process, log_path)
    finally:
        stop_group(process, timeout_s=30)


def test_served_scores_equal_the_trials_evaluation_in_every_request_form(server, promoted, recorded):
    paths, expected, expected_maps = trial_evaluation(recorded)
    version = get(server, "/version")
    assert (version["name"], version["version"], version["input_size"]) == (NAME, int(promoted.version), [64, 64])
    assert version["threshold"] == pytest.approx(float(promoted.tags["bgad.threshold"]))
    rows = []
    for start in range(0, len(paths), version["max_images"]):  # multipart: one file part per image
        reply = post(server, *multipart([p.read_bytes() for p in paths[start : start + version["max_images"]]]))
        assert reply.status == 200, reply.body
        rows += reply.json()["predictions"]
    assert [row["score"] for row in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [row["decision"] for row in rows] == [row["score"] >= version["threshold"] for row in rows]
    assert np.abs(np.asarray([rows[0]["map"], rows[1]["map"]]) - expected_maps[:2].numpy()).max() < 1e-5
    raw = post(server, paths[0].read_bytes(), "image/png").json()["predictions"][0]
    as_json = {"dataframe_records": [{"image": base64.b64encode(paths[0].read_bytes()).decode()}]}
    mlflow_form = post(server, json.dumps(as_json).encode(), "application/json").json()["predictions"][0]
    assert raw["score"] == pytest.approx(rows[0]["score"], abs=1e-6)
    assert mlflow_form["score"] == pytest.approx(rows[0]["score"], abs=1e-6)


def test_a_path_is_refused_and_the_reply_tells_nothing_about_the_file_system(server):
    replies = [post(server, *records(text)) for text in ("/etc/passwd", "/etc/passwq")]  # exists, does not
    assert [r.status for r in replies] == [400, 400]
    assert replies[0].json() == replies[1].json() == {
        "error": "image 0: not base64-encoded image bytes (strings are never read as file paths)"}
    form = post(server, *multipart([], fields={"image": "/etc/passwd"}))
    assert (form.status, form.json()) == (400, {"error": "form field 'image' is not a file: send each image as "
                                                          "a file part"})


def test_an_8000x8000_png_is_refused_from_its_header_in_under_a_second(server):
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")  # 8 KB that would decode to 192 MB of RGB
    before = server.memory_kb()
    start = time.monotonic()
    reply = post(server, buffer.getvalue(), "image/png")
    elapsed = time.monotonic() - start
    after = server.memory_kb()
    assert (reply.status, reply.json()) == (413, {"error": "image 0: 8000 x 8000 = 64000000 pixels, more than the "
                                                           "limit of 16777216"})
    assert elapsed < 1.0
    assert after["VmRSS"] - before["VmRSS"] < 200_000 and after["VmHWM"] - before["VmHWM"] < 200_000


@pytest.mark.parametrize(("request_body", "status", "error"), [
    (records("bm90IGJhc2U2NA=#"), 400, "image 0: not base64-encoded image bytes (strings are never read as file "
                                       "paths)"),
    ((b"<html>not an image</html>", "image/png"), 400, "image 0: not a PNG, JPEG, BMP or TIFF image"),
    ((b"", "application/octet-stream"), 400, "image 0: not a PNG, JPEG, BMP or TIFF image"),
    ((png((1, 1)), "image/png"), 422, "image 0: 1 x 1 pixels, the minimum is 32 per side"),
    (multipart([png((64, 64)), png((64, 31))]), 422, "image 1: 64 x 31 pixels, the minimum is 32 per side"),
    ((png((64, 64))[:-40], "image/png"), 400, "image 0: cannot decode the image data (image file is truncated)"),
    (multipart([png((64, 64))] * 17), 413, "17 images in one request, the limit is 16"),
    ((b'{"inputs": [{"picture": ""}]}', "application/json"), 400,
     "JSON 'inputs': no 'image' column (columns: ['picture'])"),
    ((b'{"dataframe_records": [{"image": 7}]}', "application/json"), 400,
     "image 0: expected a base64 string, got int"),
    ((b"[1, 2]", "application/json"), 400,
     "JSON body: expected an object with one of the keys dataframe_records, dataframe_split, inputs, instances"),
    ((b"image=/etc/passwd", "text/plain"), 415, "content type 'text/plain' is not accepted: send one of image/png, "
     "image/jpeg, image/bmp, image/tiff, application/octet-stream, multipart/form-data, application/json"),
], ids=["bad-base64", "non-image", "empty", "1x1", "thin-in-a-batch", "truncated", "17-images", "no-image-column",
        "not-a-string", "not-an-object", "text"])
def test_a_bad_request_gets_a_4xx_with_the_projects_one_line_message(server, request_body, status, error):
    reply = post(server, *request_body)
    assert (reply.status, reply.json()) == (status, {"error": error})  # nothing else: no stack_trace, no path


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(10**10))
    connection.endheaders()
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())) == (413, {"error": "request body over the limit of "
                                                                              "67108864 bytes"})
    connection.close()


def test_a_2000x2000_image_is_scored_with_a_reply_of_kilobytes(server):
    rows, cols = np.mgrid[0:2000, 0:2000]
    image = Image.fromarray(((rows + cols) % 256).astype(np.uint8)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    reply = post(server, buffer.getvalue(), "image/jpeg")
    assert reply.status == 200
    assert np.shape(reply.json()["predictions"][0]["map"]) == (64, 64)  # the model's input size, not 2000 x 2000
    assert len(reply.body) < 200_000  # was 82 MB with the map at input resolution


def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit():
    chunks = [b"x" * 1000] * 5
    passed_on = []

    async def receive() -> dict:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def app(scope, receive, send) -> None:
        while True:
            passed_on.append(await receive())
            if not passed_on[-1]["more_body"]:
                return

    with pytest.raises(RequestError, match="request body over the limit of 2500 bytes") as err:
        asyncio.run(BodyLimit(app, max_bytes=2500)({"type": "http", "headers": []}, receive, None))
    assert err.value.status == 413 and len(passed_on) == 2  # the third chunk is never handed to the app


def test_a_missing_store_model_or_alias_is_a_one_line_error_and_creates_nothing(recorded, promoted, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([NAME]) == 2
    assert capsys.readouterr().err == (f"error: tracking store sqlite:///{tmp_path}/runs/mlflow.db does not exist: "
                                       "promote a model into it first (sweeper.promote), or name the sweep's store "
                                       "with --tracking-uri or $MLFLOW_TRACKING_URI\n")
    assert list(tmp_path.iterdir()) == []
    uri = recorded.tracking_uri
    assert main([f"{NAME}@nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err  # other test modules may have set more aliases on the shared recorded store
    assert f"model '{NAME}' has no alias 'nope'; aliases: " in err and f"champion (version {promoted.version})" in err
    assert main(["models:/no-such-model/1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {uri}: no registered model 'no-such-model'; registered models: ")
    assert NAME in err and err.count("\n") == 1
    assert main(["bob's-model", "--tracking-uri", uri]) == 2  # would break out of an MLflow filter's quotes
    assert "model name \"bob's-model\": a registered model name must be 1 to 64 letters" in capsys.readouterr().err


def post(server: Server, body: bytes, content_type: str) -> Reply:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/invocations", data=body,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read())


def get(server: Server, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as response:
        return json.loads(response.read())


def wait_for_server(port: int, process: subprocess.Popen, log_path: Path) -> None:
    """Poll ``/ping`` until the server answers; fail with its log if it exits or takes too long."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"scoring server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"scoring server not up after {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")

