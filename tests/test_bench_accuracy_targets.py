"""``benchmarks/bench_accuracy.py``'s verdicts on issue 21's inequalities, with paired intervals of the gaps, and
``benchmarks/pool_targets.py``'s mean gap over draws."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import bench_accuracy, pool_targets
from bgad_core.data.features import FeatureSet
from bgad_core.evaluation.metrics import image_auroc


def split_of(images: int) -> FeatureSet:
    """``images`` test rows, half anomalous, without masks (the verdicts read only labels and scores)."""
    labels = torch.arange(images) % 2
    return FeatureSet([torch.zeros(images, 1, 1, 1)], [torch.zeros(images, 1, 1)], labels,
                      [str(i) for i in range(images)])


def arm(split: FeatureSet, scores: torch.Tensor) -> dict:
    """A row as the arms report it, from per-image test scores."""
    return {"test": {"image_auroc": image_auroc(split.labels.numpy(), scores.numpy())},
            "test_outputs": (scores, torch.zeros(len(split), 4, 4))}


def test_a_short_figure_is_told_from_noise_by_its_paired_interval():
    split = split_of(400)
    labels = split.labels.float()
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(len(split), generator=generator)  # both arms err on the same images: a narrow paired interval
    good = labels * 2.0 + shared
    rows = [("PatchCore, no labels", arm(split, good)),
            ("BGAD, no labels", arm(split, labels * 2.0 + shared + 0.3 * torch.randn(len(split), generator=generator))),
            ("BGAD-FAS, n = 1", arm(split, labels * 0.5 + shared))]  # far behind both
    verdicts = {t["against"]: t for t in bench_accuracy.paired_targets(rows, "BGAD-FAS, n = 1", split)}
    assert set(verdicts) == {"PatchCore, no labels", "BGAD, no labels"}  # no PRO: the split has no masks
    against_patchcore = verdicts["PatchCore, no labels"]
    assert against_patchcore["metric"] == "image_auroc" and against_patchcore["bound"] == -0.01
    assert against_patchcore["lo"] <= against_patchcore["gap"] <= against_patchcore["hi"] < -0.01
    assert against_patchcore["verdict"] == "short"

    small = split_of(24)  # the same kind of gap on 24 images, one wrong pair: the interval reaches the bound
    scores = small.labels.float() * 3.0
    worse = scores.clone()
    worse[1] = -1.0  # one anomaly ranked below every normal
    rows = [("PatchCore, no labels", arm(small, scores)), ("BGAD-FAS, n = 1", arm(small, worse))]
    (verdict,) = bench_accuracy.paired_targets(rows, "BGAD-FAS, n = 1", small)
    assert verdict["gap"] < -0.01 and verdict["hi"] >= -0.01 and verdict["verdict"] == "short, within noise"


def test_the_default_policy_stands_for_an_arm_under_compare_scoring_and_missing_arms_are_skipped():
    split = split_of(20)
    scores = split.labels.float()
    default = f"BGAD, no labels, scoring {bench_accuracy.DEFAULT_POLICY} [calibration level]"
    rows = [("BGAD, no labels, scoring auto, likelihoods alone [calibration level]", {"test": {}}),
            (default, arm(split, scores)), ("BGAD-FAS, n = 1", arm(split, scores))]
    (verdict,) = bench_accuracy.paired_targets(rows, "BGAD-FAS, n = 1", split)
    assert verdict["against"] == "BGAD, no labels" and verdict["gap"] == 0.0 and verdict["verdict"] == "met"
    assert bench_accuracy.paired_targets(rows[:1], "BGAD-FAS, n = 1", split) == []


def test_draws_pool_into_a_mean_gap_whose_interval_averages_their_resampled_gaps(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    draws = [(-0.03, "short, within noise"), (0.05, "met")]
    results = [{"dataset": "deeppcb-a", "stress": None, "image_level_labels": True, "split_seed": seed,
                "targets": [{"against": "PatchCore, no labels", "metric": "image_auroc", "gap": gap, "lo": gap - 0.08,
                             "hi": gap + 0.08, "bound": -0.01, "verdict": verdict,
                             "resampled_gaps": (gap + rng.normal(0, 0.04, 1000)).tolist()}]}
               for seed, (gap, verdict) in enumerate(draws)]
    (row,) = pool_targets.pooled(results)
    assert row["gap"] == pytest.approx(0.01) and row["verdict"] == "met" and row["draws_met"] == 1
    # two independent draws: the mean's interval is about 1/sqrt(2) of one draw's (+-0.078), not their union
    assert row["lo"] < 0.01 < row["hi"] and 0.09 < row["hi"] - row["lo"] < 0.13
    assert pool_targets.draw_name(results[1]) == "deeppcb-a (image-level labels), split seed 1"
    files = []
    for i, result in enumerate(results):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(result))
    printed = run_main(monkeypatch, capsys, files)
    assert "| PatchCore, no labels | image_auroc | +0.010 |" in printed and "| met | 1 of 2 |" in printed
    (tmp_path / "old.json").write_text(json.dumps({"dataset": "mtd", "rows": []}))
    with pytest.raises(SystemExit, match="old.json: no 'targets'"):
        run_main(monkeypatch, capsys, [tmp_path / "old.json"])
    (tmp_path / "cut.json").write_text('{"dataset": ')
    with pytest.raises(SystemExit, match="cut.json: not a readable bench_accuracy --json file"):
        run_main(monkeypatch, capsys, [tmp_path / "cut.json"])


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, files: list[Path]) -> str:
    """What ``python -m benchmarks.pool_targets FILES`` prints."""
    monkeypatch.setattr(sys, "argv", ["pool_targets", *map(str, files)])
    pool_targets.main()
    return capsys.readouterr().out
