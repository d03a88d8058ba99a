"""Real Ray processes on loopback for end-to-end tests: a head node with token auth, jobs submitted to it.

Each node runs ``ray start --block`` in its own process group, so stopping it ends exactly the processes it
started (``ray stop`` would also kill the test session's own Ray instance).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token_env(folder: Path) -> dict[str, str]:
    """Environment of a token-authenticated cluster: a fresh token file and ``RAY_AUTH_MODE=token``."""
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


class RayHead:
    """A Ray head node on 127.0.0.1 with its dashboard (job server), stopped on exit."""

    def __init__(self, folder: Path, num_cpus: int = 2, resources: str | None = None) -> None:
        self.folder = folder
        self.env = token_env(folder)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.num_cpus = num_cpus
        self.resources = resources
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> RayHead:
        command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={self.num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
        ]
        if self.resources:
            command.append(f"--resources={self.resources}")
        log = open(self.folder / "ray-head.log", "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_for_jobs_api()
        return self

    def _wait_for_jobs_api(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [str(VENV_BIN / "ray"), "job", "list", "--address", self.dashboard],
                env=self.env, capture_output=True, text=True,
            )
            if probe.returncode == 0:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"ray head exited: {(self.folder / 'ray-head.log').read_text()[-3000:]}")
            time.sleep(2)
        raise TimeoutError(f"ray head's job server did not answer within {timeout_s} s")

    def submit(self, *entrypoint: str, timeout_s: float = 900) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir <repo> -- <entrypoint>``; waits for the job and returns its output."""
        command = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO),
                   "--", *entrypoint]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
