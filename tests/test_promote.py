"""Promotion to the MLflow registry: version tags, aliases, idempotence, clear failures, and a real tiny sweep."""

from __future__ import annotations

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient

from bgad_core.engine.checkpoint import detector_from_checkpoint, load_checkpoint
from bgad_core.models.base import evaluate
from registry_fixtures import (BEST_TRIAL, CACHE_KEY, CATEGORY, EXPERIMENT, SWEEP_ID, SWEEP_NAME,
                               served_scores)
from sweeper.tracking import mlflow_runs as tracking
from sweeper.cache.reader import open_cache, read_features, row_paths
from sweeper.job.config import load_config
from sweeper.job.names import match
from sweeper.promote import (SOURCE_RUN_TAG, SOURCE_SWEEP_TAG, PromoteError, best_source, find_sweep_run, main,
                             promote, read_summary)
from sweeper.run import main as run_sweep
from sweeper.tuning.sweep import sweep_id
from sweeper.tuning.trainable import SELECTION_KEY
from test_sweep_job import quickstart_in, trial_runs

NAME = "bgad-tiles"


def versions(uri: str, name: str) -> list:
    return MlflowClient(uri).search_model_versions(match(name=name))


def test_best_trial_is_registered_with_its_provenance_and_aliased(recorded):
    version = promote(recorded.tracking_uri, SWEEP_ID, NAME)
    tags = version.tags
    assert version.aliases == ["champion"]
    assert version.run_id == recorded.best_run_id
    assert tags[SOURCE_RUN_TAG] == recorded.best_run_id
    assert tags[SOURCE_SWEEP_TAG] == SWEEP_ID
    assert tags[tracking.TRIAL_TAG] == BEST_TRIAL
    assert tags[tracking.CATEGORY_TAG] == CATEGORY
    assert tags["bgad.cache_key"] == CACHE_KEY
    config = json.loads(tags["bgad.config"])
    assert config["coupling_blocks"] == 2 and config["num_anomalies"] == 2
    assert json.loads(tags["bgad.test_metrics"]) == pytest.approx(recorded.test_metrics)
    assert "aupro" in json.loads(tags["bgad.val_metrics"])
    assert MlflowClient(recorded.tracking_uri).get_model_version_by_alias(NAME, "champion").version == version.version


def test_promoting_the_same_run_again_creates_no_new_version(recorded):
    first = promote(recorded.tracking_uri, SWEEP_ID, NAME)
    count = len(versions(recorded.tracking_uri, NAME))
    again = promote(recorded.tracking_uri, EXPERIMENT, NAME, run_id=recorded.best_run_id, alias="challenger")
    assert again.version == first.version
    assert len(versions(recorded.tracking_uri, NAME)) == count
    assert set(again.aliases) == {"champion", "challenger"}


def test_another_trial_becomes_a_new_version_without_test_metrics(recorded):
    version = promote(recorded.tracking_uri, SWEEP_ID, "bgad-tiles-other", run_id=recorded.other_run_id)
    assert version.tags[SOURCE_RUN_TAG] == recorded.other_run_id
    assert "bgad.test_metrics" not in version.tags  # the summary evaluated another trial on test


def test_unfinished_sweep_picks_the_trial_with_the_best_validation_objective(recorded):
    client = MlflowClient(recorded.tracking_uri)
    source = best_source(client, find_sweep_run(client, SWEEP_ID), None, None)
    assert source.trial.info.run_id == recorded.best_run_id
    assert source.category == CATEGORY


def test_unknown_run_id_fails_with_a_message_naming_it(recorded, capsys):
    code = main(["--sweep", SWEEP_ID, "--run-id", "0123456789abcdef", "--name", NAME,
                 "--tracking-uri", recorded.tracking_uri])
    err = capsys.readouterr().err
    assert code == 1
    assert "0123456789abcdef" in err and "no such run" in err
    assert "Traceback" not in err


def test_a_sweep_is_found_by_its_id_its_config_name_or_its_experiment(recorded):
    client = MlflowClient(recorded.tracking_uri)
    for sweep in (SWEEP_ID, SWEEP_NAME, EXPERIMENT):
        assert find_sweep_run(client, sweep).info.run_id == recorded.parent_run_id, sweep


def error_line(stderr: str) -> str:
    """The one line ``main`` prints for a refused promotion (MLflow's own log lines may precede it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def record_sweep(client: MlflowClient, experiment: str, sweep: str, started_ms: int) -> None:
    """A bare sweep run ``<name>-<digest>`` in ``experiment`` (created if need be), as the sweep tags it."""
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {tracking.ROLE_TAG: "sweep", tracking.SWEEP_TAG: sweep, tracking.SWEEP_NAME_TAG: sweep.rsplit("-", 1)[0]}
    client.create_run(experiment_id, start_time=started_ms, tags=tags)


def test_a_name_finds_its_latest_sweep_and_lists_candidates_across_experiments(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    record_sweep(client, "team-a", "quick-00000001", 1_000)
    record_sweep(client, "team-a", "quick-00000002", 2_000)
    assert find_sweep_run(client, "quick").data.tags[tracking.SWEEP_TAG] == "quick-00000002"
    record_sweep(client, "team-b", "quick-00000003", 3_000)
    assert main(["--sweep", "quick", "--best", "--name", NAME, "--tracking-uri", uri]) == 1
    err = error_line(capsys.readouterr().err)
    assert "'quick' finds sweeps in 2 experiments; pass one sweep id" in err
    assert "quick-00000002 (experiment team-a, started 1970-01-01 00:00 UTC, RUNNING)" in err
    assert "quick-00000003 (experiment team-b" in err
    record_sweep(client, "team-a", "team-b-00000004", 4_000)  # a sweep named like another experiment
    with pytest.raises(PromoteError, match="team-b-00000004 .*quick-00000003"):
        find_sweep_run(client, "team-b")


def test_names_with_quotes_are_refused_in_one_line_before_any_search(recorded, capsys):
    uri = recorded.tracking_uri
    assert main(["--sweep", "x' OR '1'='1", "--best", "--name", NAME, "--tracking-uri", uri]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: --sweep \"x' OR '1'='1\": not a sweep id") and "filter" not in err.lower()
    assert main(["--sweep", SWEEP_ID, "--best", "--name", "bob's-model", "--tracking-uri", uri]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: --name \"bob's-model\": a registered model name must be 1 to 64 letters")
    assert not versions(uri, "bob")


def test_unknown_sweep_and_category_fail_clearly(recorded, capsys):
    assert main(["--sweep", "no-such-sweep", "--best", "--name", NAME, "--tracking-uri", recorded.tracking_uri]) == 1
    assert "no-such-sweep" in capsys.readouterr().err
    assert main(["--sweep", SWEEP_ID, "--best", "--category", "bottle", "--name", NAME,
                 "--tracking-uri", recorded.tracking_uri]) == 1
    assert "bottle" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_sweep_then_promote_best_serves_its_own_scores(tmp_path):
    """The whole path: quickstart sweep across families (Ray, cache, MLflow, Optuna), each family's trials recorded,
    the noise-aware choice (``tune.selection: reseed``: the two best trials are tied on this small validation
    split, each trains again with two more seeds, the better mean of the original and the first re-run wins and its
    second re-run is deployed), promote that run, score its cached test rows. The objective is image AUROC, which
    every trial reaches (1.0) on these synthetic tiles, so the tie is certain; on PRO it was a matter of luck."""
    config_path = quickstart_in(tmp_path, search={"num_samples": 4, "compare_paper_default": False},
                                tune={"metric": "image_auroc",
                                      "selection": {"rule": "reseed", "max_candidates": 2, "seeds": 2,
                                                    "label_free_twin": False}})
    assert run_sweep(["--config", str(config_path), "--num-cpus", "2"]) == 0
    config = load_config(config_path)
    uri, sid = config.mlflow.tracking_uri, sweep_id(config)
    assert_each_family_recorded(config_path)
    assert_reseeded(config_path)
    version = promote(uri, sid, "quickstart-tiles")
    assert version.aliases == ["champion"]
    client = MlflowClient(uri)
    parent = find_sweep_run(client, sid)
    assert find_sweep_run(client, config.name).info.run_id == parent.info.run_id  # README: --sweep quickstart
    category = version.tags[tracking.CATEGORY_TAG]
    best = read_summary(client, parent)["categories"][category]["best"]
    assert version.tags[tracking.TRIAL_TAG] == best["trial_id"]
    if int(version.tags["bgad.epoch"]) == best["epoch"]:  # the trial run holds the checkpoint the sweep tested
        assert json.loads(version.tags["bgad.test_metrics"]) == pytest.approx(best["test"])
    validation = json.loads(version.tags["bgad.val_metrics"])  # 95 % intervals beside every figure
    for figures in (validation, best["test"]):
        assert all(figures[f"{key}_lo"] <= figures[f"{key}_hi"] for key in ("image_auroc", "pixel_auroc", "aupro"))
    assert f"{category}/best_test_aupro_lo" in parent.data.metrics

    manifest = open_cache(parent.data.tags["bgad.cache_uri"])
    test = read_features(manifest, category, ["test"])
    artifact = client.download_artifacts(version.run_id, f"checkpoint/{category}/model.pt", str(tmp_path))
    checkpoint = load_checkpoint(artifact)
    expected = evaluate(detector_from_checkpoint(checkpoint), test).scores.numpy()
    paths = row_paths(manifest, category, test.ids)
    served = served_scores(uri, "models:/quickstart-tiles@champion", [str(paths[i]) for i in test.ids])
    assert served["scores"] == pytest.approx(expected.tolist(), abs=1e-5)


def assert_each_family_recorded(config_path) -> None:
    """Both families' trials are in MLflow (tag and param ``family``) and in the Optuna study (each trial holding
    only its own family's parameters), PatchCore's single meta-epoch is never a pruned trial, and the summary names
    each family's best validation figure and tests the overall winner."""
    config = load_config(config_path)
    runs = trial_runs(config_path, "trial")
    assert {run.data.tags[tracking.FAMILY_TAG] for run in runs} == {"bgad", "patchcore"}
    assert all(run.data.params["family"] == run.data.tags[tracking.FAMILY_TAG] for run in runs)
    study = optuna.load_study(study_name=f"{sweep_id(config)}/synthetic-tiles", storage=config.tune.optuna_storage)
    assert {trial.params["family"] for trial in study.trials} == {"bgad", "patchcore"}
    for trial in study.trials:
        assert {key.split("/")[0] for key in trial.params if key != "family"} <= {trial.params["family"]}
        if trial.params["family"] == "patchcore":
            assert trial.state == optuna.trial.TrialState.COMPLETE
    client = MlflowClient(config.mlflow.tracking_uri)
    entry = read_summary(client, find_sweep_run(client, sweep_id(config)))["categories"]["synthetic-tiles"]
    assert set(entry["families"]) == {"bgad", "patchcore"}
    chosen = next(run for run in runs if run.data.tags[tracking.TRIAL_TAG] == entry["selection"]["chosen"])
    assert entry["best"]["family"] == chosen.data.tags[tracking.FAMILY_TAG]


def assert_reseeded(config_path) -> None:
    """The two tied candidates each have two re-seeded runs (same parameters, seeds 1 and 2, outside the Optuna
    study); the configuration with the better mean validation figure of its original and seed-1 runs wins, and its
    seed-2 run, whose figure took no part in the choice, is the deployed (tested) trial."""
    config = load_config(config_path)
    client = MlflowClient(config.mlflow.tracking_uri)
    entry = read_summary(client, find_sweep_run(client, sweep_id(config)))["categories"]["synthetic-tiles"]
    selection = entry["selection"]
    assert selection["rule"] == "reseed" and len(selection["candidates"]) == 2
    assert selection["tied"] == selection["candidates"]
    assert set(selection["runs"]) == set(selection["tied"]) and all(len(v) == 2 for v in selection["runs"].values())
    means = {trial: sum(v) / 2 for trial, v in selection["runs"].items()}
    assert means[selection["chosen"]] == max(means.values())
    runs = {run.data.tags[tracking.TRIAL_TAG]: run for run in trial_runs(config_path, "trial")}
    deployed, chosen = runs[selection["deployed"]], runs[selection["chosen"]]
    assert entry["best"]["trial_id"] == selection["deployed"] != selection["chosen"]
    assert deployed.data.params["seed"] == "2" and chosen.data.params["seed"] == "0"
    history = client.get_metric_history(deployed.info.run_id, SELECTION_KEY)  # the deployed run's own best epoch
    assert selection["deployed_val"] == pytest.approx(max(m.value for m in history))
    assert {k: v for k, v in deployed.data.params.items() if k != "seed"} == \
        {k: v for k, v in chosen.data.params.items() if k != "seed"}
