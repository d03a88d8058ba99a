"""Stop requests: Ctrl-C, SIGTERM and ``ray job stop`` end a sweep resumably (``interrupted:``, exit 130).

Tune stops an experiment gracefully on SIGUSR1: it saves the experiment state with the running trials still
RUNNING (so the same command resumes them), then stops their actors -- and then reports those trials as
TERMINATED, which reads as a finished sweep. So the sweep owns SIGINT and SIGTERM (``ray job stop`` sends SIGTERM
and SIGKILLs three seconds later): the first one is remembered and, while an experiment runs, passed on to Tune as
SIGUSR1 by ``forward_to_tune`` (called from a Tune callback at the next step, when Tune's handler is surely in
place), or raised as ``KeyboardInterrupt`` anywhere else; a second one always raises. Whoever asks ``requested``
afterwards knows the sweep was interrupted, whatever Tune reported.

The callbacks given to ``on_stop`` (marking MLflow runs and Optuna trials as interrupted) start in a thread the
moment the signal arrives, not after Tune's shutdown: they must be done before ``ray job stop``'s SIGKILL, and a
thread cannot deadlock on a database transaction the interrupted main thread holds.

Example::

    from sweeper.job.interrupt import STOP
    STOP.install()
    with STOP.forwarded_to_tune():
        results = tuner.fit()  # with a callback whose on_step_begin calls STOP.forward_to_tune()
    if STOP.requested:
        ...  # report "interrupted", exit 130
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

# Tune's own SIGINT handler would take the first Ctrl-C for itself; the sweep's forwards it (as SIGUSR1) instead.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")


class StopRequest:
    """The process's record of a stop signal, and what to do when one arrives."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._in_tune = False
        self._forwarded = False
        self._callbacks: list[Callable[[], None]] = []
        self._threads: list[threading.Thread] = []

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "-"

    def install(self) -> None:
        """Handle SIGINT and SIGTERM from now on (call from the main thread, before Ray starts)."""
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self._handle)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in a thread when a stop arrives (at once if one already has)."""
        self._callbacks.append(callback)
        if self.requested:
            self._start(callback)

    def wait_for_callbacks(self, timeout_s: float = 30.0) -> None:
        """Let the stop callbacks finish (they write the interrupted state a resume starts from)."""
        for thread in self._threads:
            thread.join(timeout_s)

    @contextmanager
    def forwarded_to_tune(self) -> Iterator[None]:
        """While inside, a stop ends the running Tune experiment gracefully instead of raising."""
        self._in_tune, self._forwarded = True, False
        try:
            yield
        finally:
            self._in_tune = False

    def forward_to_tune(self) -> None:
        """Once per experiment after a stop request: ask the running Tune loop to stop (from its own thread)."""
        if self.requested and self._in_tune and not self._forwarded:
            self._forwarded = True
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's graceful stop: saves its state, then ends its trials

    def _handle(self, number: int, frame: FrameType | None) -> None:
        first = self.signal is None
        self.signal = number
        if first:
            print(f"stopping on {self.name}: saving the sweep's state to resume it (again to stop at once)", flush=True)
            for callback in self._callbacks:
                self._start(callback)
            if self._in_tune:
                return
        raise KeyboardInterrupt

    def _start(self, callback: Callable[[], None]) -> None:
        thread = threading.Thread(target=_logged(callback), name="sweep-stop", daemon=True)
        self._threads.append(thread)
        thread.start()


def _logged(callback: Callable[[], None]) -> Callable[[], None]:
    """``callback`` whose failure is a warning: a stop must go on even when, say, MLflow cannot be reached."""

    def run() -> None:
        try:
            callback()
        except Exception as error:  # noqa: BLE001 - reported, and the resume repairs the state anyway
            log.warning("could not record the interruption: %s", error)

    return run


STOP = StopRequest()
