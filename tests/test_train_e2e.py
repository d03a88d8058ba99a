"""End to end on generated defect images: features once, two-phase training, selection on validation."""

import json
import time

import pytest

from bgad_core.data.synthetic import make_synthetic_category
from bgad_core.engine.checkpoint import detector_from_checkpoint, load_checkpoint
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.train import DataConfig, main, run


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return make_synthetic_category(tmp_path_factory.mktemp("data"), size=128, n_train=32, n_test_good=24, n_test_per_defect=12, seed=1)


DATA = {"image_size": 128, "num_anomalies": 3, "racp_per_anomaly": 4}
SCHEDULE = {"meta_epochs": 3, "sub_epochs": 2, "warmup_epochs": 1, "lr": 1e-3, "fiber_batch": 2048}


@pytest.fixture(scope="module")
def fp32_run(category, tmp_path_factory):
    """The short BGAD-FAS run in float32 with its output folder and wall time; the bf16 test compares against it."""
    output = tmp_path_factory.mktemp("fp32-run")
    started = time.perf_counter()
    config = BGADConfig(**SCHEDULE, precision="fp32")
    summary = run(DataConfig(data=str(category), **DATA), config, "tf_efficientnet_lite0", "offline", (4, 8, 16), output)
    return config, summary, output, time.perf_counter() - started


@pytest.mark.slow
def test_bgad_fas_reaches_high_auroc_quickly(fp32_run):
    config, summary, output, elapsed = fp32_run
    assert summary["test"]["image_auroc"] >= 0.95, summary
    assert elapsed < 180
    assert summary["best_epoch"] > config.normal_epochs  # the phase-1 (normal-only) model is never selected
    checkpoint = load_checkpoint(output / "model.pt")
    assert checkpoint["family"] == summary["family"] == "bgad"
    assert detector_from_checkpoint(checkpoint).config == config
    assert checkpoint["backbone"]["weights_digest"]
    assert json.loads((output / "summary.json").read_text())["best_epoch"] == checkpoint["epoch"]


def test_cli_rejects_beta_outside_unit_interval(category, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(category), "--beta", "1.5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: beta must lie in (0, 1)")


@pytest.mark.slow
def test_bf16_training_keeps_fp32_auroc(category, fp32_run):
    """bf16 matmuls in the training steps: the trained model's test AUROCs and PRO stay within 0.02 of fp32's."""
    config = BGADConfig(**SCHEDULE, precision="bf16")
    bf16 = run(DataConfig(data=str(category), **DATA), config, "tf_efficientnet_lite0", "offline", (4, 8, 16), None)["test"]
    fp32 = fp32_run[1]["test"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(bf16[key] - fp32[key]) <= 0.02, (key, bf16, fp32)


def test_too_few_anomalies_for_validation_is_a_one_line_error(tmp_path, capsys):
    """Drawing all but one anomaly of a type leaves it out of validation: exit 2 before any image is decoded."""
    small = make_synthetic_category(tmp_path, size=64, n_train=4, n_test_good=4, n_test_per_defect=3, seed=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(small), "--image-size", "64", "--num-anomalies", "2", "--weights", "random"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "validation has no image of" in err[0], err
    assert "Traceback" not in capsys.readouterr().err


def test_summary_json_is_strict(tmp_path):
    """NaN metrics (a split without masks) are written as null, not as bare NaN that JSON parsers reject."""
    from bgad_core.train import strict_json

    text = json.dumps(strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
