"""What the main job's console shows and what only its log file gets.

(The main job end to end, whose console holds only the project's lines: ``test_sweep_job.py`` and
``test_readme_commands.py``.)"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from ray_processes import REPO
from sweeper.run import on_console


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


@pytest.mark.parametrize(("name", "level", "shown"), [
    ("sweeper.sweep", logging.INFO, True),
    ("__main__", logging.INFO, True),
    ("bgad_core.precision", logging.WARNING, True),
    ("bgad_core.backbone", logging.INFO, False),  # which weights, why not the hub (with its address): log only
    ("bgad_core.backbone", logging.WARNING, True),
    ("ray._private.authentication.authentication_token_setup", logging.WARNING, False),  # the token-auth notice
    ("mlflow.store.db.utils", logging.INFO, False),
    ("ray.tune", logging.ERROR, True),
])
def test_console_shows_the_projects_lines_and_others_errors(name, level, shown):
    assert on_console(record(name, level)) is shown


def test_native_stderr_goes_to_the_log_file_and_python_stderr_stays_on_the_console(tmp_path):
    log = tmp_path / "sweep.log"
    script = (
        "import os, sys; from pathlib import Path; from sweeper.run import native_stderr_to\n"
        f"native_stderr_to(Path({str(log)!r}))\n"
        "os.write(2, b'[E 1 1] core_worker.cc:1: from C++\\n')\n"  # what Ray's core worker does
        "print('error: for the user', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "error: for the user\n"
    assert log.read_text() == "[E 1 1] core_worker.cc:1: from C++\n"

