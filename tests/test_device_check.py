"""``benchmarks/device_check.sh`` runs on a machine without a GPU (``--tiny``), so that it is ready the day one is
lent: every part records its figures, or why it was skipped or failed, in one JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks import device_check

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_the_flow_and_trial_figures(tmp_path):
    out = tmp_path / "check.json"
    subprocess.run(["bash", "benchmarks/device_check.sh", "--tiny", "--parts", "flow", "trial", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["tiny"] and "flags:" in record["machine"]
    flow, trial = record["parts"]["flow"], record["parts"]["trial"]
    assert flow["status"] == trial["status"] == "ok"
    assert set(flow["vectors_per_s"]["tf_efficientnet_lite0"]) == {"reference fp32", "ours fp32", "ours bf16"}
    assert all(rate > 0 for rate in flow["vectors_per_s"]["tf_efficientnet_lite0"].values())
    assert trial["epoch"] in (1, 2) and "image_auroc" in trial["test"] and trial["training_vectors_per_s"] > 0


def test_the_sweep_part_shares_one_gpu_among_four_trials(tmp_path):
    """The sweep itself is the quickstart's, run end to end by other tests; this checks the part's config, which
    only this script builds (a tiny run of it takes a minute on two cores)."""
    on_gpu = device_check.quickstart_on_device(False, tmp_path)
    assert on_gpu.tune.gpus_per_trial == 0.25 and on_gpu.tune.max_concurrent_trials == 4
    tiny = device_check.quickstart_on_device(True, tmp_path)
    assert tiny.tune.gpus_per_trial == 0 and tiny.search.num_samples == 2 and tiny.train["meta_epochs"] == 1
    assert all(str(tmp_path) in location for location in (tiny.cache.root, tiny.tune.storage_path))


def test_a_missing_package_skips_its_part_and_a_failing_part_stops_no_other(monkeypatch, tmp_path):
    real = device_check.importlib.util.find_spec
    monkeypatch.setattr(device_check.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    skipped = device_check.run_part("sweep", "cpu", True, tmp_path)
    assert skipped["status"] == "skipped" and "ray not installed" in skipped["reason"]

    def broken(device: str, tiny: bool, data_root: Path) -> dict:
        raise RuntimeError("CUDA error: out of memory\nmore lines")
    monkeypatch.setitem(device_check.RUNNERS, "flow", broken)
    assert device_check.run_part("flow", "cpu", True, tmp_path)["error"] == "RuntimeError: CUDA error: out of memory"
    assert device_check.run_part("trial", "cpu", True, tmp_path / "no-data")["status"] == "ok"  # tiny: generated
