"""The sweep job: validate the config, build or reuse the feature cache, run the sweep, print the summary.

    ray job submit --working-dir . -- python sweeper/run.py --config search_spaces/quickstart.yaml
    python sweeper/run.py --config search_spaces/quickstart.yaml      # one machine: starts a local Ray

Running the same command again after an interruption resumes the sweep: finished trials are not re-run.

Exit codes: 0 done; 1 the sweep ran but no trial produced a usable result; 2 a bad config, dataset or cache (the
message names the key or file; nothing ran, or the cache build stopped without publishing anything); 130
interrupted (resumable). Expected errors print one ``error: ...`` line, never a traceback. Credentials inside URIs
(``user:password@``, ``?secret_key=``) are masked in every log line this process formats and in what the sweep
logs to MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script (``python sweeper/run.py``): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Checkpointing every meta-epoch is the point of the design; Tune's "too frequent snapshots" warning is noise.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune snapshots the experiment state (which trials ended, the searcher) at most every this many seconds; its
# default ("auto", at least 10 s) lets a killed driver lose up to 10 s of bookkeeping, e.g. a trial that finished
# just before and would then train again on resume. The state of a sweep of this size takes milliseconds to write.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")

import ray  # noqa: E402

from bgad_core.errors import ConfigError, DataError  # noqa: E402
from sweeper import tracking  # noqa: E402
from sweeper.cache import build_cache  # noqa: E402
from sweeper.cache_reader import is_uri, open_cache  # noqa: E402
from sweeper.config import SweepConfig, load_config  # noqa: E402
from sweeper.sweep import SweepFailed, SweepInterrupted, run_sweep, summary_table  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="sweep YAML (default: the quickstart)")
    parser.add_argument("--rebuild-cache", action="store_true", help="extract features again even on a cache hit")
    parser.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join; 'local' starts a private instance (default: the running one, else a new one)",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance (implies local)")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        config = load_config(args.config)  # every config error surfaces here, before any Ray work
        if config.search is None:
            raise ConfigError(f"{args.config}: search: a sweep needs a search section (see search_spaces/)")
        check_datasets(config, args.config)
        tracking_uri = tracking.default_tracking_uri(config.mlflow.tracking_uri)
        tracking.check_reachable(tracking_uri)
        if not ray.is_initialized():
            address = args.address or ("local" if args.num_cpus else None)
            ray.init(address=address, num_cpus=args.num_cpus)
        report = build_cache(config, rebuild=args.rebuild_cache)
        print(tracking.redact(report.summary()), flush=True)
        summary = run_sweep(config, report.uri, open_cache(report.uri), tracking_uri)
    except (ConfigError, DataError) as error:  # DataError covers CacheCorruptError
        print(f"error: {tracking.redact(str(error))}", file=sys.stderr)
        return 2
    except SweepFailed as failed:
        print(f"error: {tracking.redact(str(failed))}", file=sys.stderr)
        return 1
    except SweepInterrupted as interrupted:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    print(summary_table(summary))
    print(json.dumps({"sweep_id": summary["sweep_id"], "seconds": summary["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
