"""A driver killed while Tune saves its experiment state leaves the file cut off: the copy kept beside it lets the
sweep resume (the kill itself, on a real cluster: ``faults/test_driver_killed.py``; a resume from the copy:
``test_sweep_job.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sweeper.tuning.experiment_state import (
    BACKUP_SUFFIX, ExperimentStateError, StateBackup, newest_state, restore_cut_off_state,
)

OLD = "experiment_state-2026-12-01_09-00-00.json"  # an earlier run of the experiment (before a resume)
NEW = "experiment_state-2026-12-01_10-00-00.json"


def state(folder: Path, name: str, trials: int) -> Path:
    path = folder / name
    path.write_text(json.dumps({"trial_data": [[f"trial {i}", {}] for i in range(trials)]}))
    return path


def backup_of(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def test_the_newest_session_is_the_state_tune_restores(tmp_path):
    assert newest_state(tmp_path) is None
    state(tmp_path, NEW, 1)
    state(tmp_path, OLD, 1)
    backup_of(tmp_path / NEW).write_text("{}")  # a copy is never taken for a state
    assert newest_state(tmp_path) == tmp_path / NEW


def test_backup_copies_a_state_that_parses_and_follows_its_changes(tmp_path):
    backup = StateBackup(str(tmp_path))
    backup.on_step_end(iteration=1, trials=[])  # nothing saved yet: nothing to copy
    assert list(tmp_path.iterdir()) == []
    path = state(tmp_path, NEW, 1)
    backup.on_step_end(iteration=2, trials=[])
    assert backup_of(path).read_bytes() == path.read_bytes()
    good = path.read_bytes()
    path.write_text('{"trial_data": [["trial 0", {}], ["tri')  # Tune is rewriting it
    backup.on_step_end(iteration=3, trials=[])
    assert backup_of(path).read_bytes() == good
    state(tmp_path, NEW, 3)
    backup.on_experiment_end(trials=[])
    assert backup_of(path).read_bytes() == path.read_bytes() != good
    assert not list(tmp_path.glob("*.partial"))


def test_a_cut_off_state_is_replaced_by_its_copy(tmp_path, caplog):
    path = state(tmp_path, NEW, 2)
    StateBackup(str(tmp_path)).on_step_end(iteration=1, trials=[])
    good = path.read_bytes()
    path.write_bytes(b"")  # SIGKILL between Tune's truncation and its write
    assert restore_cut_off_state(str(tmp_path)) is True
    assert path.read_bytes() == good
    assert f"{path} was cut off (0 bytes" in caplog.text
    assert restore_cut_off_state(str(tmp_path)) is False  # readable now: left alone


def test_an_unreadable_state_without_a_copy_is_named_and_kept(tmp_path):
    state(tmp_path, OLD, 1)
    path = tmp_path / NEW
    path.write_text('{"trial_da')
    unreadable = re.escape(f"{path}: Tune's saved experiment state is unreadable (10 bytes")
    with pytest.raises(ExperimentStateError, match=unreadable):
        restore_cut_off_state(str(tmp_path))
    assert path.read_text() == '{"trial_da'  # nothing deleted
    backup_of(path).write_text("")  # a copy that does not parse either is no copy
    with pytest.raises(ExperimentStateError, match="Move .* aside"):
        restore_cut_off_state(str(tmp_path))


def test_nothing_to_do_for_a_new_experiment_or_object_storage(tmp_path):
    assert restore_cut_off_state(str(tmp_path / "not yet created")) is False
    assert restore_cut_off_state("s3://bucket/sweep/experiment") is False
    StateBackup("s3://bucket/sweep/experiment").on_step_end(iteration=1, trials=[])  # touches nothing


@pytest.mark.parametrize("saved", [b"csweeper._moved_away\nSweepOptunaSearch\n.", b"csweeper.tuning.sweep\nGoneClass\n."])
def test_state_saved_by_a_version_with_other_module_paths_is_a_clear_error(tmp_path, saved):
    """Tune pickles the searcher and callbacks by module path: an experiment interrupted before an upgrade that
    moved them cannot resume after it, and the user is told so (and what to do) instead of getting a traceback."""
    from bgad_core.errors import ConfigError
    from sweeper.tuning.sweep import restored_tuner

    (tmp_path / "tuner.pkl").write_bytes(saved)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path)) + r": saved by another version.*(sweeper\._moved_away|GoneClass).*new name"):
        restored_tuner(str(tmp_path), lambda config: None, {})
