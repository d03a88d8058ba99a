"""The disk fills up while a checkpoint is written: the write fails with ENOSPC, the trial fails cleanly (Tune
retries it once from its last checkpoint, then records the error) and every earlier checkpoint stays valid:
byte for byte unchanged, loadable, and used for the sweep's final test evaluation."""

from __future__ import annotations

import errno
import hashlib
import io
from pathlib import Path

import pytest
import torch

from bgad_core.engine.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from faults.conftest import (
    SweepJob, assert_every_trial_accounted_for, local_env, results, tiny_sweep, trial_dirs, with_cache,
)
from sweeper.tuning.trainable import MODEL_FILE, TRAINER_FILE

INJECTOR = Path(__file__).parent / "inject"  # sitecustomize.py: torch.save on a disk that fills up


def test_failed_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / MODEL_FILE
    save_checkpoint({"version": CHECKPOINT_VERSION, "epoch": 1, "flows": {"w": torch.ones(64)}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):  # what write() on a full disk leaves: a partial file
        data = io.BytesIO()
        real_save(obj, data)
        Path(f).write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", half_then_enospc)

    with pytest.raises(OSError) as failure:
        save_checkpoint({"version": CHECKPOINT_VERSION, "epoch": 2, "flows": {"w": torch.zeros(64)}}, path)
    assert failure.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE]  # the partial temporary file is gone


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_trial_fails_cleanly_when_the_disk_fills_up(tmp_path, tiny_cache):
    with_cache(tmp_path, tiny_cache)
    config_path = tiny_sweep(tmp_path, search={"num_samples": 1})
    env = local_env(tmp_path, PYTHONPATH=str(INJECTOR), BGAD_FAULT_DIR=str(tmp_path),
                    BGAD_FAULT_DISK_FULL_AFTER="2")  # model.pt + trainer.pt of meta-epoch 1, then the disk is full
    first: dict = {}

    def first_checkpoint_registered() -> bool:
        for folder in trial_dirs(config_path).values():
            if results(folder) and (folder / "checkpoint_000000").is_dir():
                first.update(folder=folder / "checkpoint_000000", digests=_digests(folder / "checkpoint_000000"))
                return True
        return False

    with SweepJob(config_path, env, "--num-cpus", "2") as job:
        job.wait_for(first_checkpoint_registered, 300, "the first checkpoint")
        code = job.wait()
    log = job.log
    assert code == 0, log[-6000:]  # the sweep completes on what it has

    [trial_dir] = trial_dirs(config_path).values()
    errors = (trial_dir / "error.txt").read_text()
    assert "Failure # 2" in errors and "No space left on device" in errors  # first attempt + one retry, both full
    assert "retrying from its last checkpoint" in log and "FAILED: OSError: [Errno 28] No space left" in log
    assert [r["training_iteration"] for r in results(trial_dir)] == [1]
    assert sorted(p.name for p in trial_dir.glob("checkpoint_*")) == ["checkpoint_000000"]  # no partial one
    assert _digests(first["folder"]) == first["digests"]  # byte for byte what was registered
    [category] = [p for p in first["folder"].iterdir() if p.is_dir()]
    assert load_checkpoint(category / MODEL_FILE)["epoch"] == 1
    assert torch.load(category / TRAINER_FILE, weights_only=True)["epoch"] == 1
    assert "| 0/0/1 |" in log  # summary: the failed trial's epoch-1 checkpoint was evaluated on test

    [run] = assert_every_trial_accounted_for(config_path).values()
    assert run.info.status == "FAILED" and run.data.tags["bgad.outcome"] == "failed"
    assert "No space left on device" in run.data.tags["bgad.failure"]
