"""A sweep interrupted by Ctrl-C after some trials ended: exit 130, nothing left RUNNING or FINISHED that did not
finish, and the same command resumes without re-running them, also when the saved experiment state was cut off.
(``ray job submit`` of the quickstart to a real token-authenticated head, and what it records:
``test_readme_commands.py``.)"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ray_processes import REPO, token_env
from sweeper.tracking import mlflow_runs as tracking
from sweeper.job.config import load_config
from sweeper.tuning.experiment_state import BACKUP_SUFFIX, newest_state
from sweeper.job.names import match
from sweeper.promote import find_sweep_run, promote, read_summary
from sweeper.run import main as run_sweep
from sweeper.tuning.sweep import sweep_id

pytestmark = pytest.mark.slow


def quickstart_in(folder: Path, **overrides) -> Path:
    """The quickstart config with every output under ``folder`` (absolute: a job runs in its own directory).

    Without the label-free twin (one more experiment per sweep) unless ``tune.selection`` is given: the tests that
    check it ask for it.
    """
    raw = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    raw["backbone"]["weights"] = "offline"
    raw["cache"]["root"] = str(folder / "cache")
    raw["tune"].update(storage_path=str(folder / "tune"), optuna_storage=f"sqlite:///{folder / 'optuna.db'}",
                       selection={"label_free_twin": False})
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "artifact_location": str(folder / "artifacts")}
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trial_runs(config_path: Path, role: str | None = None) -> list:
    """The sweep's MLflow runs: all of them, or those of one role ("sweep" for the parent, "trial")."""
    config = load_config(config_path)
    client = MlflowClient(config.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    if experiment is None:  # the sweep has not reached MLflow yet
        return []
    tags = {tracking.SWEEP_TAG: sweep_id(config)}
    if role is not None:
        tags[tracking.ROLE_TAG] = role
    return client.search_runs([experiment.experiment_id], match(tags), max_results=1000)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    # the quickstart made small (two categories x 3 trials of at most 3 of 4 meta-epochs, no plots): the interruption
    # and resume of the one experiment that searches both categories are the point; a plateau rule that no gain can
    # satisfy (AUROC cannot rise by 1) ends every trial ASHA keeps after meta-epoch 3, one past the first it watches,
    # so a trial stopped at its plateau also ends and resumes here
    plateau = {"patience": 1, "min_delta": 1.0}
    config_path = quickstart_in(tmp_path, tune={"max_concurrent_trials": 1, "plateau": plateau},
                                train={"meta_epochs": 4}, search={"compare_paper_default": False, "num_samples": 3},
                                mlflow={"log_plots": False})
    raw = yaml.safe_load(config_path.read_text())
    [tiles] = raw["datasets"]
    raw["datasets"].append({"synthetic": {**tiles["synthetic"], "name": "other-tiles", "seed": 1}})
    config_path.write_text(yaml.safe_dump(raw))
    config = load_config(config_path)
    env = token_env(tmp_path)
    env.pop("RAY_AUTH_MODE")
    command = [sys.executable, "sweeper/run.py", "--config", str(config_path), "--num-cpus", "2"]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ended: list[str] = []
    output = []
    deadline = time.monotonic() + 600
    for line in first.stdout:
        output.append(line)
        match = ENDED.search(line)
        if match:
            ended.append(match.group(1))
        if len(ended) >= 2 or time.monotonic() > deadline:
            first.send_signal(signal.SIGINT)
            break
    output.append(first.communicate(timeout=300)[0])
    log = "".join(output)
    assert len(ended) >= 2, log[-4000:]
    assert first.returncode == 130, log[-4000:]
    assert "interrupted: " in log and "run the same command again to resume" in log
    assert "| category |" not in log  # no test evaluation, no summary
    [parent] = trial_runs(config_path, role="sweep")
    assert parent.info.status == "KILLED" and parent.data.tags[tracking.INTERRUPTED_TAG] == "stopped by SIGINT"
    assert "summary.json" not in {a.path for a in MlflowClient(config.mlflow.tracking_uri).list_artifacts(parent.info.run_id)}
    assert all(r.info.status != "RUNNING" for r in trial_runs(config_path))
    for category in CATEGORIES:
        study = optuna.load_study(study_name=f"{sweep_id(config)}/{category}", storage=config.tune.optuna_storage)
        assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)

    client = MlflowClient(config.mlflow.tracking_uri)
    runs = {r.data.tags[tracking.TRIAL_TAG]: r for r in trial_runs(config_path) if tracking.TRIAL_TAG in r.data.tags}
    steps_before = {t: len(client.get_metric_history(runs[t].info.run_id, "val_aupro")) for t in ended}

    folder = Path(config.tune.storage_path) / sweep_id(config) / "search"
    saved = newest_state(folder)  # a driver SIGKILLed inside Tune's save leaves it cut off: resume from the copy
    assert saved.with_name(saved.name + BACKUP_SUFFIX).read_bytes() == saved.read_bytes()
    saved.write_bytes(saved.read_bytes()[:100])

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-6000:]
    assert "resuming experiment" in log and f"{saved} was cut off (100 bytes" in log
    for foreign in FOREIGN_LINES:  # the console holds the project's lines only; the sweep's log file the rest
        assert foreign not in log and foreign not in "".join(output), foreign
    for trial_id in ended:  # a finished trial neither reports again nor gains metric steps
        assert f"| {trial_id} epoch" not in log
        assert len(client.get_metric_history(runs[trial_id].info.run_id, "val_aupro")) == steps_before[trial_id]
    after = [r for r in trial_runs(config_path) if tracking.TRIAL_TAG in r.data.tags]
    assert sorted(r.data.tags[tracking.CATEGORY_TAG] for r in after) == sorted(CATEGORIES * config.search.num_samples)
    assert all(r.data.tags.get("bgad.outcome") in ("finished", "pruned") for r in after)
    ran = {r.data.tags[tracking.TRIAL_TAG]: int(r.data.tags["bgad.meta_epochs_run"]) for r in after}
    assert 3 in ran.values() and max(ran.values()) == 3, ran  # no trial trained past its plateau
    assert all(r.data.tags["bgad.outcome"] == "finished" for r in after if ran[r.data.tags[tracking.TRIAL_TAG]] == 3)
    assert parent.info.run_id == trial_runs(config_path, role="sweep")[0].info.run_id
    category_of = {r.info.run_id: r.data.tags[tracking.CATEGORY_TAG] for r in after}
    for category in CATEGORIES:  # each category's study holds its own trials, and all of them
        study = optuna.load_study(study_name=f"{sweep_id(config)}/{category}", storage=config.tune.optuna_storage)
        ended = [t for t in study.trials if not t.user_attrs.get("bgad.interrupted")]  # an interrupted one ran again
        assert len(ended) == config.search.num_samples
        assert {category_of[t.user_attrs["mlflow_run_id"]] for t in ended} == {category}
        assert {t.state for t in ended} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in ended
                   if ran[t.user_attrs["tune_trial_id"]] == 3)
        assert all(t.user_attrs.get("tune_trial_id") for t in ended)
    assert {re.search(r"\| (\S+) \|", line).group(1) for line in log.splitlines()
            if re.match(r"\| \S+ \| \d+/\d+/\d+ \| best trial", line)} == set(CATEGORIES)  # both tested


CATEGORIES = ["synthetic-tiles", "other-tiles"]
ENDED = re.compile(r"\| (\w+) (?:finished|pruned) after ")
# Ray's C++ actor warning (every Ray Data actor pool), its token-auth notice, MLflow's store set-up lines
FOREIGN_LINES = ("core_worker.cc", "Token authentication", "mlflow.store.db.utils")


def test_a_shared_mode_sweep_trains_every_category_in_each_trial(tmp_path):
    """``mode: shared``: one configuration for all categories, so each trial trains both, one study ranks the trials
    on the mean objective, and the winner is tested on each category; the paper default trains both too."""
    config_path = quickstart_in(tmp_path, train={"meta_epochs": 2}, search={"num_samples": 2},
                                mlflow={"log_plots": False}, tune={"max_concurrent_trials": 1})
    raw = yaml.safe_load(config_path.read_text())
    [tiles] = raw["datasets"]
    raw["datasets"].append({"synthetic": {**tiles["synthetic"], "name": "other-tiles", "seed": 1}})
    raw["mode"] = "shared"
    config_path.write_text(yaml.safe_dump(raw))
    assert run_sweep(["--config", str(config_path), "--num-cpus", "2"]) == 0
    config = load_config(config_path)
    runs = trial_runs(config_path, "trial")
    assert len(runs) == config.search.num_samples + 1  # the search's trials and the paper default's
    assert all(set(run.data.tags[tracking.CATEGORY_TAG].split(",")) == set(CATEGORIES) for run in runs)
    study = optuna.load_study(study_name=f"{sweep_id(config)}/shared", storage=config.tune.optuna_storage)
    assert len(study.trials) == config.search.num_samples
    client = MlflowClient(config.mlflow.tracking_uri)
    summary = read_summary(client, find_sweep_run(client, sweep_id(config)))
    assert set(summary["categories"]) == set(CATEGORIES)
    assert len({entry["best"]["trial_id"] for entry in summary["categories"].values()}) == 1  # one winner for all
    assert all("paper_default" in entry for entry in summary["categories"].values())


def test_each_chosen_run_is_trained_again_without_labels_and_the_better_on_validation_deployed(tmp_path, capsys):
    """``tune.selection.label_free_twin`` (the default): the run chosen for each category trained on labelled
    anomalies, so one more experiment trains its configuration (seed included) without them, a run per category;
    the twin is deployed exactly when its best validation figure is higher, the other run is a tested arm, and the
    table says which. The twins stay out of the Optuna studies."""
    config_path = quickstart_in(tmp_path, train={"meta_epochs": 2}, search={"num_samples": 1,
                                "compare_paper_default": False}, mlflow={"log_plots": False},
                                tune={"selection": {"label_free_twin": True}}, baseline={"enabled": False})
    raw = yaml.safe_load(config_path.read_text())
    raw["search"]["space"] = raw["search"].pop("families")["bgad"]  # BGAD only: every chosen run read labels
    [tiles] = raw["datasets"]
    raw["datasets"].append({"synthetic": {**tiles["synthetic"], "name": "other-tiles", "seed": 1}})
    config_path.write_text(yaml.safe_dump(raw))
    assert run_sweep(["--config", str(config_path), "--num-cpus", "2"]) == 0
    printed = capsys.readouterr().out
    config = load_config(config_path)
    client = MlflowClient(config.mlflow.tracking_uri)
    summary = read_summary(client, find_sweep_run(client, sweep_id(config)))
    runs = {r.data.tags[tracking.TRIAL_TAG]: r for r in trial_runs(config_path, "trial")}
    assert len(runs) == 2 * len(CATEGORIES)  # a search trial and its twin per category
    for category in CATEGORIES:
        entry = summary["categories"][category]
        twin = entry["selection"]["label_free_twin"]
        labelled, trained = runs[twin["labelled_trial_id"]], runs[twin["trial_id"]]
        assert twin["labelled_trial_id"] == entry["selection"]["chosen"]
        assert int(labelled.data.params["num_anomalies"]) > 0 and trained.data.params["num_anomalies"] == "0"
        assert {k: v for k, v in trained.data.params.items() if k != "num_anomalies"} == \
            {k: v for k, v in labelled.data.params.items() if k != "num_anomalies"}
        assert trained.data.tags[tracking.CATEGORY_TAG] == category
        for record_key, run in (("val", trained), ("labelled_val", labelled)):
            history = client.get_metric_history(run.info.run_id, "selection_score")
            assert twin[record_key] == pytest.approx(max(m.value for m in history))
        assert twin["deployed"] == (twin["val"] > twin["labelled_val"])
        deployed, other = ("trial_id", "labelled") if twin["deployed"] else ("labelled_trial_id", "label_free_twin")
        assert entry["best"]["trial_id"] == twin[deployed]
        assert entry[other]["test"]["aupro"] >= 0 and other in entry["verdicts"]
        other_run = trained if other == "label_free_twin" else labelled  # promotable, with the test it was given
        version = promote(config.mlflow.tracking_uri, sweep_id(config), f"{category}-{other}",
                          run_id=other_run.info.run_id)
        assert json.loads(version.tags["bgad.test_metrics"]) == pytest.approx(entry[other]["test"])
        assert f"labels {category}: trained again without its labelled anomalies" in printed
        study = optuna.load_study(study_name=f"{sweep_id(config)}/{category}", storage=config.tune.optuna_storage)
        assert len(study.trials) == config.search.num_samples
