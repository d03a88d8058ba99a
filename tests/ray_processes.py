"""Real Ray processes on loopback for end-to-end tests: a head node with token auth, jobs submitted to it, and
extra worker nodes joining it.

Each node runs ``ray start --block`` in its own process group, so stopping it ends exactly the processes it
started (``ray stop`` would also kill the test session's own Ray instance). A node is stopped with SIGKILL to its
group: a SIGTERMed ``ray start --block`` drains for about 30 s (measured: 33.6 s for an idle head), and these
clusters hold nothing worth draining. A head keeps its session files in a
private temp dir: ``ray start`` records the cluster's address in ``<temp dir>/ray_current_cluster``, and in the
shared ``/tmp/ray`` that record would make every later ``ray.init()`` on the machine join this cluster while it runs
and fail once it is stopped.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
NO_AGENT = "No available agent to submit job"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token_env(folder: Path) -> dict[str, str]:
    """Environment of a token-authenticated cluster: a fresh token file and ``RAY_AUTH_MODE=token``."""
    token = folder / "auth_token"
    token.touch(mode=0o600)  # readable by its owner only, as cluster/README.md has it (Ray's own writes 0644)
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
    """A Ray head node on 127.0.0.1 with its dashboard (job server), killed on exit.

    Every port with a fixed default (dashboard agent 52365, Ray client 10001) is a free one instead: another Ray
    instance on the machine (a concurrent test session) holds the defaults, and a head whose agent cannot bind
    refuses every job ("No available agent").
    """

    def __init__(self, folder: Path, num_cpus: int = 2, resources: str | None = None) -> None:
        self.folder = folder
        self.env = token_env(folder)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.num_cpus = num_cpus
        self.resources = resources
        self.process: subprocess.Popen | None = None
        self.temp_dir: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> RayHead:
        self.temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
        command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={self.num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ]
        if self.resources:
            command.append(f"--resources={self.resources}")
        with open(self.folder / "ray-head.log", "w") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_for_jobs_api()
        except BaseException:
            self.__exit__()
            raise
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
        """``ray job submit --working-dir <repo> -- <entrypoint>``; waits for the job and returns its output.

        The job server answers before the head's dashboard agent (which runs jobs) has registered, and gives up
        after 10 s without one ("No available agent"); that refusal creates no job, so it is retried.
        """
        command = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO),
                   "--", *entrypoint]
        deadline = time.monotonic() + timeout_s
        while True:
            job = subprocess.run(command, env=self.env, capture_output=True, text=True,
                                 timeout=max(1.0, deadline - time.monotonic()))
            if job.returncode == 0 or NO_AGENT not in job.stderr or time.monotonic() > deadline:
                return job
            time.sleep(2)

    def active_nodes(self) -> set[str]:
        """Ids of the nodes ``ray status`` lists as active: the GCS's own view (the state API behind ``ray list
        nodes`` has been seen missing a worker that the GCS showed alive)."""
        status = subprocess.run([str(VENV_BIN / "ray"), "status", "--address", self.address], env=self.env,
                                capture_output=True, text=True, timeout=120)
        return set(re.findall(r"node_([0-9a-f]+)", status.stdout.partition("Active:")[2].partition("Pending:")[0]))

    def __exit__(self, *exc: object) -> None:
        kill_group(self.process)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class RayWorker:
    """A worker node joining ``head`` on 127.0.0.1 with its own CPUs and custom resources, killed on exit.

    It shares the head's token (a node without it cannot join) and has what a node on another machine would have
    to itself: a dashboard-agent port (two nodes on one host would both claim the default one) and a temp dir (in a
    shared one, this node's runtime-env cleanup deletes the job's working_dir under the driver on the head).
    """

    def __init__(self, head: RayHead, num_cpus: int = 2, resources: str | None = None) -> None:
        self.head = head
        self.num_cpus = num_cpus
        self.resources = resources
        self.process: subprocess.Popen | None = None
        self.temp_dir: str | None = None

    def __enter__(self) -> RayWorker:
        existing = _wait_for(self.head.active_nodes, "the head node in ray status")
        self.temp_dir = tempfile.mkdtemp(prefix="ray-")
        command = [
            str(VENV_BIN / "ray"), "start", f"--address={self.head.address}", "--block",
            "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
            f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
        ]
        if self.resources:
            command.append(f"--resources={self.resources}")
        self.log = self.head.folder / "ray-worker.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command, env=self.head.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            (self.node_id,) = _wait_for(lambda: self._joined(existing), "the worker node in ray status")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _joined(self, existing: set[str]) -> set[str]:
        if self.process.poll() is not None:
            raise RuntimeError(f"ray worker exited: {self.log.read_text()[-3000:]}")
        return self.head.active_nodes() - existing

    def kill(self) -> None:
        """The node disappears at once, as a machine that loses power: SIGKILL to raylet, agents and workers."""
        kill_group(self.process)

    def survivors(self, timeout_s: float = 180) -> set[str]:
        """The head's active nodes once it has dropped this (killed) node: the GCS marks a node dead only after its
        health checks fail, which can take longer than the work that outlives it."""

        def without_this_node() -> set[str]:
            nodes = self.head.active_nodes()
            return set() if self.node_id in nodes else nodes

        return _wait_for(without_this_node, "removal of the killed worker from ray status", timeout_s)

    def __exit__(self, *exc: object) -> None:
        kill_group(self.process)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _wait_for(probe: Callable[[], set[str]], what: str, timeout_s: float = 120) -> set[str]:
    """The first non-empty answer of ``probe``, polled every 2 s."""
    deadline = time.monotonic() + timeout_s
    while not (found := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(2)
    return found


def stop_group(process: subprocess.Popen | None, timeout_s: float = 60) -> None:
    """End the process group ``process`` leads (started with ``start_new_session``): SIGTERM, then SIGKILL for
    whatever is left after ``timeout_s``; returns once no process of the group remains (or, should an unreaped
    zombie linger, 10 s after the SIGKILL)."""
    if process is None:
        return
    _signal_group(process.pid, signal.SIGTERM)
    if not _wait_for_group(process, timeout_s):
        kill_group(process)


def kill_group(process: subprocess.Popen | None) -> None:
    """SIGKILL the process group ``process`` leads; returns once none of it remains (or 10 s later, should an
    unreaped zombie linger)."""
    if process is None:
        return
    _signal_group(process.pid, signal.SIGKILL)
    _wait_for_group(process, 10)


def _wait_for_group(process: subprocess.Popen, timeout_s: float) -> bool:
    """Whether the group is gone within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while _group_alive(process):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the leader, or it stays a zombie member of its group
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True
