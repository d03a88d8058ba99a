"""Keeping an experiment resumable when its driver is killed while Tune saves the experiment state.

Tune saves ``experiment_state-<session>.json`` (trial statuses, searcher state) every few seconds by truncating the
file and writing it again. A driver SIGKILLed inside that window leaves the file empty or cut off, and
``Tuner.restore`` then fails on it: the experiment, its ended trials and their checkpoints, could not be resumed.

``StateBackup`` keeps a copy of the last state that parsed, next to it (``<file>.last-good``, which Tune's
``experiment_state-*.json`` pattern does not match), replaced atomically. ``restore_cut_off_state`` runs before a
resume: if the newest state does not parse, it puts that copy back and says so. The copy is at most one save behind
(``TUNE_GLOBAL_CHECKPOINT_S``); a trial that reported after it resumes from its own checkpoint, which Tune finds
in the trial's folder.

Only local (and NFS) storage needs this: object stores (``s3://``, ``gs://``) replace an object whole.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "experiment_state-2026-12-01_10-00-00.json").write_text('{"trial_data": []}')
    >>> StateBackup(str(folder)).on_step_end(iteration=1, trials=[])
    >>> _ = (folder / "experiment_state-2026-12-01_10-00-00.json").write_text('{"trial_da')  # a kill mid-save
    >>> restore_cut_off_state(str(folder))
    True
    >>> (folder / "experiment_state-2026-12-01_10-00-00.json").read_text()
    '{"trial_data": []}'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from bgad_core.errors import DataError

log = logging.getLogger(__name__)

BACKUP_SUFFIX = ".last-good"
STATE_GLOB = "experiment_state-*.json"  # Tune's TuneController.CKPT_FILE_TMPL; the newest name is the newest save


class ExperimentStateError(DataError):
    """The experiment's saved state cannot be read and no readable copy of it was kept (``run.py`` exits 2)."""


def newest_state(folder: Path) -> Path | None:
    """The state file Tune would restore from: the greatest session name, as ``Tuner.restore`` picks it."""
    files = sorted(folder.glob(STATE_GLOB))
    return files[-1] if files else None


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError):  # missing, being rewritten, empty or cut off
        return False
    return True


def _replace_with_copy(source: Path, target: Path) -> None:
    """Copy ``source`` onto ``target`` so that ``target`` is always either the old or the new file, never half."""
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


class StateBackup(tune.Callback):
    """After each step of the experiment and at its end, copies Tune's saved state aside if it changed and parses.

    Args:
        experiment_path: ``<storage_path>/<sweep id>/<experiment>``; a URI (``s3://...``) turns the backup off.
    """

    def __init__(self, experiment_path: str) -> None:
        self.folder = None if "://" in experiment_path else Path(experiment_path)
        self._copied: tuple[str, int, int] | None = None  # (name, mtime_ns, size) of the last state copied

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._copy_if_changed()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._copy_if_changed()  # Tune has just written (and waited for) its final save: the copy equals it

    def _copy_if_changed(self) -> None:
        state = newest_state(self.folder) if self.folder is not None and self.folder.is_dir() else None
        if state is None:
            return
        try:
            stat = state.stat()
        except OSError:
            return
        seen = (state.name, stat.st_mtime_ns, stat.st_size)
        if seen != self._copied and _parses(state):  # a save in progress does not parse: copied next step
            _replace_with_copy(state, state.with_name(state.name + BACKUP_SUFFIX))
            self._copied = seen


def restore_cut_off_state(experiment_path: str) -> bool:
    """Before resuming: put the last readable copy back if the newest saved state does not parse.

    Returns whether it did. Raises ``ExperimentStateError`` naming the file when the state is unreadable and there
    is no readable copy; nothing is deleted, so the trials' checkpoints stay where they are.
    """
    if "://" in experiment_path:
        return False
    state = newest_state(Path(experiment_path))
    if state is None or _parses(state):
        return False
    backup = state.with_name(state.name + BACKUP_SUFFIX)
    size = state.stat().st_size
    if not _parses(backup):
        raise ExperimentStateError(
            f"{state}: Tune's saved experiment state is unreadable ({size} bytes; the sweep was killed while saving "
            f"it) and no readable copy ({backup.name}) was kept, so the experiment cannot resume. Move "
            f"{state.parent} aside and run the same command again to start this experiment anew."
        )
    log.warning("%s was cut off (%d bytes; the sweep was killed while saving it): resuming from the copy saved "
                "one step earlier, %s", state, size, backup.name)
    _replace_with_copy(backup, state)
    return True
