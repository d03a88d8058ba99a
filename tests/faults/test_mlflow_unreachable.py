"""An MLflow tracking server that refuses connections or never answers: a clear error naming
``mlflow.tracking_uri`` within 10 s, before Ray starts or any trial runs."""

from __future__ import annotations

import socket
import time

import pytest

import sweeper.run
from faults.conftest import tiny_sweep
from ray_processes import free_port


@pytest.fixture
def silent_server():
    """A port that accepts TCP connections (the kernel completes the handshake) but never answers a request."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def _run_against(tmp_path, uri: str, capsys) -> tuple[int, str, float]:
    config_path = tiny_sweep(tmp_path, mlflow={"tracking_uri": uri})
    started = time.monotonic()
    code = sweeper.run.main(["--config", str(config_path)])
    return code, capsys.readouterr().err, time.monotonic() - started


def test_refused_connection_fails_fast(tmp_path, capsys, no_ray_work):
    port = free_port()  # nothing listens there
    code, err, seconds = _run_against(tmp_path, f"http://127.0.0.1:{port}", capsys)
    assert code == 2 and seconds < 10, (code, seconds)
    assert f"error: mlflow.tracking_uri: tracking server http://127.0.0.1:{port} is unreachable" in err, err


def test_silent_server_times_out_within_10_s(tmp_path, capsys, no_ray_work, silent_server):
    code, err, seconds = _run_against(tmp_path, f"http://127.0.0.1:{silent_server}", capsys)
    assert code == 2 and seconds < 10, (code, seconds)
    assert f"tracking server http://127.0.0.1:{silent_server} is unreachable" in err and "timed out" in err, err
