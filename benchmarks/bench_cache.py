"""Feature cache throughput on real data: Ray Data extraction (images/s) and the trial-side reader (MB/s, rows/s).

Run from the repository root::

    python -m benchmarks.bench_cache [--image-size 256] [--limit 100] [--cpus-per-actor 2]

It builds a fresh cache of ``../shared/data/kolektorsdd/commutator`` (skipped with a message when the data is
absent) in a temporary directory, then reads the splits a trial reads (train with n = K_max anomalies and their
synthetic rows at one depth, val, test) several times. ``--limit`` keeps only the first N training normals (the
anomalies, validation and test images are always all used), to shorten the run.

Extraction throughput is rows (real + synthetic images) per second of the Ray Data pipeline alone: decoding,
RACP generation, backbone, Parquet writing; it includes the actor's start-up (importing torch, loading weights),
which a large build amortises. Reader throughput counts the bytes of the tensors produced (features, masks and,
for val/test, pixel masks), and takes the median of ``--repeat`` reads (the files are in the OS page cache by then,
as they are for the trials of a sweep on one node); Ray is shut down first when the script started it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

import sweeper.cache.build as cache_module
from sweeper.cache.reader import open_cache, read_features
from sweeper.job.config import SweepConfig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kolektorsdd" / "commutator"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="category directory (default: KolektorSDD)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training normals")
    parser.add_argument("--weights", default="offline", help="backbone weights (offline Lite0 by default)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--max-anomalies", type=int, default=10)
    parser.add_argument("--per-anomaly", type=int, default=8, help="M synthetic samples per anomaly (one depth, 3)")
    parser.add_argument("--repeat", type=int, default=5, help="reads per split for the reader median")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (real data lives in ../shared/data on the project's machines)")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        config = SweepConfig.model_validate({
            "name": "bench-cache",
            "datasets": [{"path": str(args.data)}],
            "data": {"image_size": args.image_size, "max_train_normals": args.limit},
            "backbone": {"weights": args.weights},
            "cache": {"root": str(Path(tmp) / "cache"), "dtype": args.dtype, "max_anomalies": args.max_anomalies,
                      "racp_depths": [3], "racp_per_anomaly": args.per_anomaly, "batch_size": args.batch_size,
                      "actors": args.actors, "cpus_per_actor": args.cpus_per_actor},
        })
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(include_dashboard=False)
        pipeline_seconds = time_pipeline()
        report = cache_module.build_cache(config)
        print(report.summary())
        print(f"extraction: {report.rows} rows in {pipeline_seconds[0]:.1f} s of Ray Data pipeline = "
              f"{report.rows / pipeline_seconds[0]:.2f} images/s ({report.seconds:.1f} s build in total, "
              f"{args.image_size} px, {args.actors} actor(s) x {args.cpus_per_actor:g} CPU, "
              f"cluster {ray.cluster_resources().get('CPU', 0):g} CPU / {ray.cluster_resources().get('GPU', 0):g} GPU)")
        if started_ray:
            ray.shutdown()  # the reader needs no Ray; idle Ray processes would only add noise to its timing
        bench_reader(report.uri, args.data.name, args.max_anomalies, args.repeat)
    return 0


def time_pipeline() -> list[float]:
    """Wrap the builder's Ray entry point so its wall time can be reported apart from planning and hashing."""
    seconds: list[float] = []
    run = cache_module._run_pipeline

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    cache_module._run_pipeline = timed
    return seconds


def bench_reader(uri: str, category: str, num_anomalies: int, repeat: int) -> None:
    manifest = open_cache(uri)
    reads = {
        f"train (n={num_anomalies}, S=3)": {"splits": ["train"], "num_anomalies": num_anomalies, "depth": 3},
        "val": {"splits": ["val"]},
        "test": {"splits": ["test"]},
    }
    for name, kwargs in reads.items():
        features = read_features(manifest, category, **kwargs)  # warm-up: page cache, allocator
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            features = read_features(manifest, category, **kwargs)
            times.append(time.perf_counter() - started)
        tensors = [*features.features, *features.masks]
        if features.pixel_masks is not None:
            tensors.append(features.pixel_masks)
        megabytes = sum(t.numel() * t.element_size() for t in tensors) / 1e6
        seconds = statistics.median(times)
        print(f"reader {name}: {len(features)} rows, {megabytes:.1f} MB in {seconds * 1000:.0f} ms (median of "
              f"{repeat}, best {min(times) * 1000:.0f} ms) = {megabytes / seconds:.0f} MB/s, "
              f"{len(features) / seconds:.0f} rows/s")


if __name__ == "__main__":
    sys.exit(main())
