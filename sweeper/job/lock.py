"""One process per sweep: two runs of the same sweep would share its cache publish, parent run, study and trials.

The lock is an ``flock`` on a file named for the sweep id and where its Tune state lives, in the machine's
temporary directory: two runs collide exactly when they would write the same sweep state, whichever directory (or
copy of ``ray job submit --working-dir``) they started from, and every driver of a cluster runs on its head node, so
they meet there. The kernel drops the lock when the holder exits, however it exits, so a killed driver never leaves
a stale lock; the file's text only names the last holder for the error message.

Example::

    with SweepLock("quickstart-1a2b3c4d", "/home/me/project/runs/tune"):
        ...  # build the cache, run the sweep
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

LOCK_DIR = Path(tempfile.gettempdir()) / "bgad-sweeper-locks"

class SweepLocked(RuntimeError):
    """Another process is running this sweep; the message names it and says what to do."""


class SweepLock:
    """Exclusive, non-blocking lock on one sweep id, held from ``__enter__`` until ``__exit__`` (or exit)."""

    def __init__(self, sweep_id: str, storage: str, folder: Path = LOCK_DIR) -> None:
        digest = hashlib.sha256(storage.encode()).hexdigest()[:8]
        self.path = folder / f"{sweep_id}-{digest}.lock"
        self.sweep_id = sweep_id
        self._file: IO[str] | None = None

    def __enter__(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as busy:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise SweepLocked(
                f"sweep {self.sweep_id} is already running ({holder}; lock {self.path}): wait for it to "
                "end, or stop it (Ctrl-C, or ray job stop <id>) and run this command again to resume it"
            ) from busy
        handle.seek(0)
        handle.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        handle.write(json.dumps(holder))
        handle.flush()
        self._file = handle
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
