"""The documented workflow as written (and the main job's end-to-end checks on what it recorded): the ``<!-- local-commands -->`` blocks of cluster/README.md (a token-auth head,
``ray job submit``, a second submit after editing the tree) and README.md (promote by name, serve, POST an image),
run line by line in a fresh checkout with a plain ``PATH`` (no venv on it), an empty ``HOME`` and no MLflow or Ray
variables the docs do not set. Only the head's address and the serving port are substituted; the head itself is
this test's (``ray start`` / ``ray stop`` are skipped: a real ``ray stop`` would end every Ray on the machine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ray_processes import NO_AGENT, REPO, RayHead, free_port
from sweeper.tracking import mlflow_runs as tracking
from sweeper.job.names import match

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"<!-- local-commands -->\s*```bash\n(.*?)```", re.S)
DOCUMENTED_DASHBOARD = "http://127.0.0.1:8265"
DOCUMENTED_PORT = "8080"
SKIPPED = ("ray start", "ray stop")  # the test's own head stands in for the documented one


def local_commands(document: Path) -> list[str]:
    """The command lines of ``document``'s marked block(s), comments and blank lines left out."""
    blocks = BLOCK.findall(document.read_text())
    assert blocks, f"{document} has no <!-- local-commands --> block"
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def fresh_checkout(folder: Path) -> Path:
    """The tracked files of the repository (as a clone has them) plus its venv, linked."""
    checkout = folder / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    (checkout / ".venv").symlink_to(REPO / ".venv")
    return checkout


def plain_env(home: Path) -> dict[str, str]:
    """A new user's shell: system PATH only, an empty home, none of the variables a test session may carry."""
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TMPDIR", "TERM")}
    return {**keep, "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}


def run_line(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """One documented line in bash. A ``ray job submit`` the head's job server refused before any job ran (its
    agent not registered yet, or the connection dropped under load) is sent again, as a user would."""
    for _ in range(5):
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
        output = done.stdout + done.stderr
        refused = NO_AGENT in output or "Remote end closed connection" in output
        if done.returncode == 0 or "ray job submit" not in line or not refused or "Running entrypoint" in output:
            return done
        time.sleep(5)
    return done


def test_documented_local_workflow_runs_as_written(tmp_path):
    checkout = fresh_checkout(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = plain_env(home)
    port = str(free_port())
    commands = local_commands(REPO / "cluster" / "README.md") + local_commands(REPO / "README.md")
    outputs: list[tuple[str, str]] = []  # (line, its stdout and stderr)
    stdouts: list[tuple[str, str]] = []
    background: list[subprocess.Popen] = []
    head = RayHead(tmp_path)
    try:
        for command in commands:
            if command.startswith("export "):
                key, _, value = command.removeprefix("export ").partition("=")
                env[key] = value
                continue
            if any(skipped in command for skipped in SKIPPED):
                if "ray start" in command:  # the documented token, in the documented place, guards the head
                    head.env = dict(env)
                    head.__enter__()
                continue
            line = command.replace(DOCUMENTED_DASHBOARD, head.dashboard).replace(DOCUMENTED_PORT, port)
            if line.endswith("&"):
                background.append(subprocess.Popen(["bash", "-c", line[:-1]], cwd=checkout, env=env,
                                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                   start_new_session=True))
                continue
            done = run_line(line, checkout, env)
            served = "".join(p.stdout.read() for p in background if p.poll() is not None)
            assert done.returncode == 0, f"{line}\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}\n{served[-3000:]}"
            outputs.append((line, done.stdout + done.stderr))
            stdouts.append((line, done.stdout))
    finally:
        for process in background:
            os.killpg(process.pid, signal.SIGKILL)
        if head.process is not None:
            head.__exit__()

    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    submits = [out for line, out in outputs if "ray job submit" in line]
    assert len(submits) == 2
    first, second = submits
    assert "| synthetic-tiles |" in first and "one-class baseline (patchcore)" in first and "best trial for" in first
    assert "verdict synthetic-tiles: on " in first  # whether the winner beats the baseline beyond the interval
    for foreign in ("core_worker.cc", "Token authentication", "huggingface", "mlflow.store.db.utils"):
        assert foreign not in first, foreign  # the job's console holds the project's lines only
    assert "?workflowType=machine_learning&viewStateShareKey=" in first  # the saved view of the runs table
    assert "resuming experiment" in second and " epoch " not in second  # the same sweep: nothing trained again
    sweep = re.search(r'"sweep_id": "([^"]+)"', first).group(1)
    assert f'"sweep_id": "{sweep}"' in second

    runs = checkout / "runs"  # every result in the checkout, none in Ray's temporary working dirs
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bgad-sweeper").experiment_id
    [parent] = client.search_runs([experiment], match({tracking.SWEEP_TAG: sweep, tracking.ROLE_TAG: "sweep"}))
    assert parent.info.status == "FINISHED" and parent.data.tags["bgad.best_trial.synthetic-tiles"]
    tags = client.get_experiment(experiment).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND
    assert "metrics.`synthetic-tiles/best_test_image_auroc`" in tags[f"{tracking.SHARED_VIEW_TAG_PREFIX}{sweep}"]
    assert parent.data.params["best.synthetic-tiles.family"] in ("bgad", "patchcore")  # the winner, of either family
    assert parent.data.metrics["synthetic-tiles/best_test_image_auroc"] > 0.5
    assert parent.data.metrics["synthetic-tiles/baseline_test_image_auroc"] > 0.5  # the one-class arm
    children = client.search_runs([experiment], match({tracking.SWEEP_TAG: sweep, tracking.ROLE_TAG: "trial"}))
    assert len(children) >= 6  # the search's trials and the paper default's
    for run in children:
        assert run.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        history = client.get_metric_history(run.info.run_id, "val_aupro")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint/synthetic-tiles")]
        assert "checkpoint/synthetic-tiles/model.pt" in artifacts
    assert {run.data.tags[tracking.FAMILY_TAG] for run in children} == {"bgad", "patchcore"}  # a cross-family sweep
    finished = [r for r in children if r.data.tags.get("bgad.outcome") == "finished"
                and r.data.tags.get(tracking.FAMILY_TAG) == "bgad"]
    plots = {a.path for a in client.list_artifacts(finished[0].info.run_id, "plots/synthetic-tiles")}
    assert {f"plots/synthetic-tiles/{n}.png" for n in ("roc_pr", "training_scores_hist", "anomaly_maps")} <= plots
    study = optuna.load_study(study_name=f"{sweep}/synthetic-tiles", storage=f"sqlite:///{runs / 'optuna.db'}")
    assert all(t.user_attrs.get("mlflow_run_id") for t in study.trials)
    # MLflow and Optuna agree on how each trial ended (ASHA's stops: test_family_sweep, test_sweep_scheduler)
    outcomes = {r.info.run_id: r.data.tags.get("bgad.outcome") for r in children}
    state = {"finished": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}
    assert all(t.state == state[outcomes[t.user_attrs["mlflow_run_id"]]] for t in study.trials)
    # no BGAD trial is stopped before its first selectable meta-epoch (ASHA skips phase 1)
    assert all(int(r.data.tags["bgad.meta_epochs_run"]) >= 2 for r in children
               if r.data.tags[tracking.FAMILY_TAG] == "bgad")
    assert (runs / "tune" / sweep).is_dir() and list((runs / "logs").glob(f"{sweep}.log"))

    promoted = json.loads([out for line, out in stdouts if "sweeper.promote" in line][0].strip().splitlines()[-1])
    assert promoted["model_uri"] == "models:/bgad-tiles@champion"
    [reply] = [out for line, out in stdouts if line.startswith("curl")]
    [prediction] = json.loads(reply)["predictions"]
    assert isinstance(prediction["score"], float) and isinstance(prediction["decision"], bool)
