"""The sweep job: validate the config, build or reuse the feature cache, run the sweep, print the summary.

    .venv/bin/python sweeper/run.py --config search_spaces/quickstart.yaml      # one machine: starts a local Ray
    ray job submit --working-dir . -- "$PWD/.venv/bin/python" sweeper/run.py \
        --config search_spaces/quickstart.yaml --project-dir "$PWD"                # a head on this machine

Relative paths of the config (datasets, ``cache.root``, ``tune.storage_path``, SQLite stores) and the results
folder ``runs/`` resolve against the project directory: the current one, or ``--project-dir``. Under ``ray job
submit`` the current directory is Ray's temporary copy of ``--working-dir``, where results would be lost on the
next submit, so there a relative location without ``--project-dir`` is an error.

Running the same command again after an interruption resumes the sweep: finished trials are not re-run. One process
runs a sweep at a time (``sweeper.job.lock``). The console shows the sweep's own lines; the full log, Ray's and
Optuna's messages included, goes to ``runs/logs/<sweep id>.log``.

Exit codes: 0 done; 1 the sweep ran but no trial produced a usable result; 2 a bad config, dataset or cache, or the
sweep is already running (the message names the key, file or process; nothing ran, or the cache build stopped
without publishing anything); 130 interrupted by Ctrl-C, SIGTERM or ``ray job stop`` (one ``interrupted:`` line;
MLflow runs KILLED and Optuna trials FAIL, tagged interrupted; resumable). Expected errors print one ``error: ...``
line, never a traceback. A config or ``$MLFLOW_TRACKING_URI`` whose URL carries a credential (``user:password@``,
``?secret_key=``) is refused (exit 2, ``sweeper.job.credentials``: the clients read them from the environment); any
that reach a log line this process formats are masked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

if __package__ in (None, ""):  # run as a script (``python sweeper/run.py``): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Checkpointing every meta-epoch is the point of the design; Tune's "too frequent snapshots" warning is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune snapshots the experiment state (which trials ended, the searcher) at most every this many seconds; its
# default ("auto", at least 10 s) lets a killed driver lose up to 10 s of bookkeeping, e.g. a trial that finished
# just before and would then train again on resume. The state of a sweep of this size takes milliseconds to write.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# Tune's legacy console output is silent at verbose=0; the new one still prints a header box per experiment.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import ray  # noqa: E402

from bgad_core.errors import ConfigError, DataError  # noqa: E402
from sweeper.job import credentials  # noqa: E402
from sweeper.tracking import mlflow_runs as tracking  # noqa: E402
from sweeper.cache.build import build_cache  # noqa: E402
from sweeper.cache.reader import absolute_uri, is_uri, open_cache  # noqa: E402
from sweeper.job.config import SweepConfig, load_config  # noqa: E402
from sweeper.job.interrupt import STOP  # noqa: E402
from sweeper.job.lock import SweepLock, SweepLocked  # noqa: E402
from sweeper.tuning.sweep import SweepFailed, SweepInterrupted, run_sweep, summary_table, sweep_id  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RESULTS = Path("runs")  # in the project directory
# The lowest level each logger (and its children) shows on the console; the log file takes everything from INFO.
# The backbone's weights lines (which weights, why the hub was skipped, with the hub's address) are in the cache
# report and the log; other libraries reach the console only with errors (Ray's token-auth notice is a warning).
CONSOLE_LEVELS = {"sweeper": logging.INFO, "bgad_core": logging.INFO, "__main__": logging.INFO,
                  "bgad_core.backbone": logging.WARNING}
OTHERS_CONSOLE_LEVEL = logging.ERROR
# Libraries that print to the console through handlers of their own; their records go to the root's handlers
# instead. MLflow's handler (set up on import) also serves alembic and SQLAlchemy at the levels it gives them.
OWN_CONSOLE_HANDLERS = ("ray", "ray.data", "optuna", "mlflow", "alembic", "sqlalchemy.engine")


class RedactingFormatter(logging.Formatter):
    """Masks credentials in URIs (``tracking.redact``) in every formatted record, whichever module logged it."""

    def format(self, record: logging.LogRecord) -> str:
        return tracking.redact(super().format(record))


def check_datasets(config: SweepConfig, path: Path) -> None:
    """Every local dataset directory exists: a typo must fail before Ray starts, naming the key and the path.

    Storage URIs are checked where they are read (the cache build), as listing them may need credentials.
    """
    for index, spec in enumerate(config.datasets):
        if spec.path is not None and not is_uri(spec.path) and not Path(spec.path).expanduser().is_dir():
            raise ConfigError(f"{path}: datasets[{index}].path: directory not found: {Path(spec.path).resolve()}")


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a ``ray job submit`` (Ray's job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def enter_project_dir(project_dir: Path | None, config: SweepConfig, path: Path) -> None:
    """Make the project directory current, so every relative location of ``config`` resolves against it."""
    if project_dir is None:
        relative = config.relative_locations(tracking.configured_tracking_uri(config.mlflow.tracking_uri))
        if in_ray_job() and relative:
            raise ConfigError(
                f"{path}: {', '.join(relative)}: relative, and under ray job submit the current directory is Ray's "
                "temporary copy of --working-dir (results there are lost on the next submit): pass "
                '--project-dir "$PWD" to resolve them against the directory you submit from (a head on this '
                "machine), or make them absolute paths or storage URIs (cluster/README.md)"
            )
        return
    if not project_dir.is_dir():
        raise ConfigError(f"--project-dir {project_dir}: not a directory")
    os.chdir(project_dir)


def on_console(record: logging.LogRecord) -> bool:
    """Whether ``record`` is one of the sweep's console lines: ``CONSOLE_LEVELS`` of its closest named logger."""
    parts = record.name.split(".")
    for end in range(len(parts), 0, -1):
        level = CONSOLE_LEVELS.get(".".join(parts[:end]))
        if level is not None:
            return record.levelno >= level
    return record.levelno >= OTHERS_CONSOLE_LEVEL


def log_to_file(path: Path) -> None:
    """Everything logged at INFO, whoever logs it, goes to ``path``; the console keeps the sweep's own lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    for name in OWN_CONSOLE_HANDLERS:
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            if isinstance(own, logging.StreamHandler) and not isinstance(own, logging.FileHandler):
                logger.removeHandler(own)  # console handlers only: Ray's session log files keep theirs
        logger.propagate = True


@contextlib.contextmanager
def native_stderr_to(path: Path) -> Iterator[TextIO]:
    """While open, what native code writes to file descriptor 2 goes to ``path``; yields the stream for console lines.

    Ray's C++ core worker inside this (driver) process writes its ERROR-level lines to fd 2 itself, outside
    Python's logging: e.g. ``core_worker.cc``'s warning that an actor with ``max_restarts`` has constructor arguments
    in the object store, which every Ray Data actor pool (the feature cache's) raises. Ray has no setting that sends
    them elsewhere (``RAY_BACKEND_LOG_LEVEL`` would drop them, also from Ray's own session log), so fd 2 goes to the
    sweep's log file, and where ``sys.stderr`` wrote to fd 2 it becomes a copy of the former fd 2: ``error:`` lines,
    tracebacks and the console log handler stay on the console. A ``sys.stderr`` that is no file descriptor (a
    caller capturing it, as pytest's ``capsys``) is left as it is. On exit fd 2 and ``sys.stderr`` are put back,
    so a caller of ``main`` (a test, a notebook) gets its own stderr again.
    """
    original = sys.stderr
    try:
        on_fd2 = original.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        on_fd2 = False
    original.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1, encoding=original.encoding or "utf-8",
                        errors="backslashreplace") if on_fd2 else original
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = console
    try:
        yield console
    finally:
        console.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr = original
        if console is not original:
            console.close()


def closing_lines(summary: dict, config: SweepConfig, tracking_uri: str, log_file: Path) -> str:
    """After the table: each category's best trial and its hyperparameters, where the results are, what to run next."""
    searched = {*config.search.space, *config.search.grid}
    python = sys.executable
    default = tracking_uri == tracking.default_tracking_uri(None)  # what promote and serve read unless told
    store = "" if default else f" --tracking-uri {tracking.redact(tracking_uri)}"
    lines = [""]
    for category, entry in summary["categories"].items():
        best = entry["best"]
        family_name = best["family"]
        own = sorted(searched | set(config.search.families.get(family_name, {})))  # its family's sub-space too
        params = ", ".join(f"{k}={_short(best['config'].get(k))}" for k in own) or "(no searched parameters)"
        family_label = f"{family_name}, " if config.search.families else ""
        lines.append(f"best trial for {category}: {best['trial_id']} ({family_label}meta-epoch {best['epoch']}): "
                     f"{params}")
    lines += [
        f"results: {RESULTS.resolve()} (log: {log_file.resolve()})",
        f"MLflow: sweep run of {summary['sweep_id']} in experiment {config.mlflow.experiment!r} at "
        f"{tracking.redact(tracking_uri)}",
        "next:",
        f"  {python} -m mlflow ui --backend-store-uri {tracking.redact(tracking_uri)}",
        f"  then open {summary['mlflow_view']} (the sweep's runs with the best trial's figures)",
        f"  {python} -m sweeper.promote --sweep {config.name} --best --name {config.name}-model{store}",
        f"  {python} -m sweeper.serve {config.name}-model@champion{store}",
    ]
    return "\n".join(lines)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="sweep YAML (default: the quickstart)")
    parser.add_argument(
        "--project-dir", type=Path, default=os.environ.get("BGAD_PROJECT_DIR"),
        help="directory that the config's relative paths and the results folder runs/ resolve against (default: "
             "$BGAD_PROJECT_DIR, else the current directory); under ray job submit pass --project-dir \"$PWD\"",
    )
    parser.add_argument("--rebuild-cache", action="store_true", help="extract features again even on a cache hit")
    parser.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join; 'local' starts a private instance (default: the running one, else a new one)",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance (implies local)")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    handler.addFilter(on_console)
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    STOP.install()
    with contextlib.ExitStack() as native_stderr:  # fd 2 to the log file from Ray's start until main returns
        return _run(args, handler, native_stderr)


def _run(args: argparse.Namespace, handler: logging.StreamHandler, native_stderr: contextlib.ExitStack) -> int:
    """``main`` after its arguments and console: the sweep, its table and next commands; the exit status."""
    config_path = args.config.resolve()  # before entering the project directory
    try:
        config = load_config(config_path)  # every config error surfaces here, before any Ray work
        if config.search is None:
            raise ConfigError(f"{config_path}: search: a sweep needs a search section (see search_spaces/)")
        enter_project_dir(args.project_dir, config, config_path)
        check_datasets(config, config_path)
        sid = sweep_id(config)
        log_file = RESULTS / "logs" / f"{sid}.log"
        log_to_file(log_file)
        print(f"sweep {sid}: results in {RESULTS.resolve()}, full log in {log_file.resolve()}", flush=True)
        tracking_uri = tracking.default_tracking_uri(config.mlflow.tracking_uri)
        credentials.check_tracking_uri(tracking_uri)  # $MLFLOW_TRACKING_URI too: no password in the URL
        tracking.check_reachable(tracking_uri)
        with SweepLock(sid, absolute_uri(config.tune.storage_path)):
            if not ray.is_initialized():
                address = args.address or ("local" if args.num_cpus else None)
                ray.init(address=address, num_cpus=args.num_cpus, log_to_driver=False)
                STOP.install()  # again: ray.init puts a C-level SIGTERM handler of its own (stack dump, exit) over it
            console = native_stderr.enter_context(native_stderr_to(log_file))
            native_stderr.callback(handler.setStream, handler.setStream(console))  # put back first, on the way out
            report = build_cache(config, rebuild=args.rebuild_cache)
            print(tracking.redact(report.summary()), flush=True)
            summary = run_sweep(config, report.uri, open_cache(report.uri), tracking_uri)
    except (ConfigError, DataError, SweepLocked) as error:  # DataError covers CacheCorruptError
        print(f"error: {tracking.redact(str(error))}", file=sys.stderr)
        return 2
    except SweepFailed as failed:
        print(f"error: {tracking.redact(str(failed))}", file=sys.stderr)
        return 1
    except (SweepInterrupted, KeyboardInterrupt) as interrupted:
        STOP.wait_for_callbacks()
        reason = str(interrupted) or (f"stopped by {STOP.name} before the search started (the feature cache "
                                      "publishes only complete builds); run the same command again")
        print(f"interrupted: {reason}", file=sys.stderr)
        return 130
    print(summary_table(summary))
    print(closing_lines(summary, config, tracking_uri, log_file))
    print(json.dumps({"sweep_id": summary["sweep_id"], "seconds": summary["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
