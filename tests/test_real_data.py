"""Real images from ../shared/data (skipped when absent): the whole single-run path on an image-level dataset.

The BGAD vs BGAD-FAS comparison on magnetic tiles takes minutes and lives in benchmarks/bench_mtd.py (figures in
BENCHMARKS.md); this test checks that real, mixed-format, mask-less data trains and scores sensibly.
"""

import pytest

from bgad_core.models.bgad.config import BGADConfig
from bgad_core.train import DataConfig, run


@pytest.mark.real_data
@pytest.mark.slow
def test_brain_mri_image_level_training(shared_data):
    data = DataConfig(str(shared_data / "brainmri" / "brain"), image_size=128, num_anomalies=5, racp_per_anomaly=2)
    config = BGADConfig(meta_epochs=2, sub_epochs=1, warmup_epochs=1, lr=1e-3, fiber_batch=2048)
    summary = run(data, config, "tf_efficientnet_lite0", "offline", (4, 8, 16), None)
    assert summary["objective"] == "image_auroc"  # no masks: selection on image AUROC, no pixel metrics
    assert "aupro" not in summary["test"]
    assert summary["test"]["image_auroc"] > 0.6, summary
