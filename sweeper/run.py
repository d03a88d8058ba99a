"""The sweep job: validate the config, build or reuse the feature cache, run the sweep, print the summary.

    ray job submit --working-dir . -- python sweeper/run.py --config search_spaces/quickstart.yaml
    python sweeper/run.py --config search_spaces/quickstart.yaml      # one machine: starts a local Ray

Running the same command again after an interruption resumes the sweep: finished trials are not re-run.
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

import ray  # noqa: E402

from bgad_core.errors import ConfigError  # noqa: E402
from sweeper import tracking  # noqa: E402
from sweeper.cache import build_cache  # noqa: E402
from sweeper.cache_reader import open_cache  # noqa: E402
from sweeper.config import load_config  # noqa: E402
from sweeper.sweep import SweepInterrupted, run_sweep, summary_table  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)  # every config error surfaces here, before any Ray work
        tracking_uri = tracking.default_tracking_uri(config.mlflow.tracking_uri)
        tracking.check_reachable(tracking_uri)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        address = args.address or ("local" if args.num_cpus else None)
        ray.init(address=address, num_cpus=args.num_cpus)
    report = build_cache(config, rebuild=args.rebuild_cache)
    print(report.summary(), flush=True)
    try:
        summary = run_sweep(config, report.uri, open_cache(report.uri), tracking_uri)
    except SweepInterrupted as interrupted:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    print(summary_table(summary))
    print(json.dumps({"sweep_id": summary["sweep_id"], "seconds": summary["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
