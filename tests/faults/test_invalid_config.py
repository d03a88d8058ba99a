"""Invalid configs (unknown key, beta outside (0, 1), empty search space, missing dataset directory, a quote in the
sweep name) fail with an error naming the key or path before any Ray work starts: no ``ray.init``, no cache build,
exit code 2."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import sweeper.run
from faults.conftest import edit_config, tiny_sweep
from ray_processes import REPO

CASES = {
    "unknown key": (lambda raw: raw["tune"].update(max_concurent_trials=2), "tune.max_concurent_trials: unknown key"),
    "unknown section": (lambda raw: raw.update(tnue={}), "tnue: unknown key"),
    "beta above 1 in the space": (
        lambda raw: raw["search"]["space"].update(beta={"uniform": [0.5, 1.5]}), "search.space.beta: beta"),
    "beta 0 in train": (lambda raw: raw["train"].update(beta=0.0), "train: beta"),
    "empty search space": (lambda raw: raw["search"].update(space={}), "search.space is empty"),
    "missing dataset": (lambda raw: raw.update(datasets=[{"path": "/nonexistent/bottle"}]),
                        "datasets[0].path: directory not found: /nonexistent/bottle"),
    "quote in the sweep name": (lambda raw: raw.update(name="bob's-sweep"),
                                "name: must be 1 to 64 letters, digits, '_', '.' or '-'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_config_is_named_before_any_ray_work(case, tmp_path, capsys, no_ray_work):
    edit, expected = CASES[case]
    config_path = edit_config(tiny_sweep(tmp_path), edit)
    assert sweeper.run.main(["--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config_path}") and expected in err, err


def test_cli_exits_2_without_traceback_or_ray_session(tmp_path):
    config_path = edit_config(tiny_sweep(tmp_path), CASES["missing dataset"][0])
    ray_tmp = tmp_path / "raytmp"
    started = time.monotonic()
    job = subprocess.run([sys.executable, "sweeper/run.py", "--config", str(config_path)], cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "RAY_TMPDIR": str(ray_tmp)}, capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == 2, job.stderr[-3000:]
    assert job.stderr.strip().splitlines()[-1] == f"error: {config_path}: datasets[0].path: directory not found: " \
                                                 "/nonexistent/bottle"
    assert "Traceback" not in job.stderr + job.stdout
    assert not (ray_tmp / "ray").exists()  # no Ray session was ever created
    print(f"invalid config rejected in {time.monotonic() - started:.1f} s (mostly imports)")
