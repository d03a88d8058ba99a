"""The GPU checks of issue 25 as one prepared run that writes one JSON of figures (``benchmarks/device_check.sh``).

Three parts, each recorded as ``ok`` with its figures and seconds, ``skipped`` with the reason, or ``failed`` with
the error's last line (one part failing does not stop the others, and the JSON is written either way):

- ``flow``: ``bench_flow``'s throughput of the flow step on the device, vectors/s of the reference loop and of our
  trainer in fp32 and bf16, for lite0's and b6's feature widths.
- ``trial``: one default BGAD-FAS trial on MTD-200 at the paper's 25 x 8 schedule on the device
  (``bench_trial.paper_schedule_trial``: loading, training and validation seconds, the selected epoch's test).
  Needs ``../shared/data`` (``--data-root``).
- ``sweep``: the quickstart sweep with ``gpus_per_trial: 0.25`` and four trials at once on one GPU (seconds, best
  validation figure, trial outcomes). Needs Ray, MLflow and Optuna.

``--tiny`` sizes every part for a CPU (the flow on one image for one sub-epoch, the trial on generated tiles at
64 px for 2 x 1 epochs, the sweep with two 1-CPU trials of one meta-epoch), so that a test runs the whole script
on a machine without a GPU and it cannot rot. Without ``--tiny`` the device is ``cuda``.

    bash benchmarks/device_check.sh [--tiny] [--out device_check.json] [--parts flow trial sweep]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from benchmarks.bench_accuracy import SHARED, protocol_data
from benchmarks.bench_flow import BACKBONE_WIDTHS, TRAINER_ARMS, measure
from benchmarks.bench_trial import paper_schedule_trial
from benchmarks.machine import cpu_description
from bgad_core.data.synthetic import make_synthetic_category
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.train import DataConfig

if TYPE_CHECKING:  # the sweep part's packages may be missing where the device check runs
    from sweeper.job.config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
# as sweeper/run.py: no Tune header boxes, no warning about checkpointing every meta-epoch
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
PARTS = ("flow", "trial", "sweep")
FLOW_ARMS = ("ours fp32", "ours bf16")


def flow_part(device: str, tiny: bool, data_root: Path) -> dict[str, Any]:
    """Vectors/s of the flow step: the reference loop and our trainer in fp32 and bf16, per backbone's widths."""
    images, sub_epochs = (1, 1) if tiny else (32, 2)
    widths = {"tf_efficientnet_lite0": BACKBONE_WIDTHS["tf_efficientnet_lite0"]} if tiny else BACKBONE_WIDTHS
    arms = {arm: TRAINER_ARMS[arm] for arm in FLOW_ARMS}
    rates = {backbone: measure(w, images, sub_epochs, torch.device(device), arms) for backbone, w in widths.items()}
    return {"images": images, "sub_epochs": sub_epochs, "vectors_per_s": rates}


def trial_part(device: str, tiny: bool, data_root: Path) -> dict[str, Any]:
    """One default BGAD-FAS trial: MTD-200 at 25 x 8 (generated tiles at 2 x 1 with ``tiny``)."""
    if not tiny:
        return paper_schedule_trial(protocol_data("mtd", data_root), BGADConfig(meta_epochs=25, sub_epochs=8),
                                    device=device)
    with tempfile.TemporaryDirectory(prefix="device-check-") as folder:
        category = make_synthetic_category(folder, size=64, n_train=8, n_test_good=6, n_test_per_defect=4)
        data = DataConfig(str(category), image_size=64, num_anomalies=1, racp_per_anomaly=2)
        return paper_schedule_trial(data, BGADConfig(meta_epochs=2, sub_epochs=1, warmup_epochs=1), device=device)


def quickstart_on_device(tiny: bool, work: Path) -> SweepConfig:
    """The quickstart sweep's config with four trials sharing one GPU (``tiny``: two 1-CPU trials of one
    meta-epoch), every output under ``work``."""
    from sweeper.job.config import SweepConfig

    raw = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    raw["backbone"]["weights"] = "offline"
    raw["search"].update(compare_paper_default=False, **({"num_samples": 2} if tiny else {}))
    raw["tune"].update(max_concurrent_trials=2 if tiny else 4, gpus_per_trial=0 if tiny else 0.25,
                       storage_path=str(work / "tune"), optuna_storage=f"sqlite:///{work / 'optuna.db'}",
                       selection={"label_free_twin": False})
    if tiny:
        raw["train"]["meta_epochs"] = 1
    raw["cache"]["root"] = str(work / "cache")
    raw["mlflow"] = {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_location": str(work / "art"),
                     "log_plots": False}
    return SweepConfig.model_validate(raw)


def sweep_part(device: str, tiny: bool, data_root: Path) -> dict[str, Any]:
    """The quickstart sweep, four trials sharing one GPU (two 1-CPU trials of one meta-epoch with ``tiny``)."""
    missing = [name for name in ("ray", "mlflow", "optuna") if importlib.util.find_spec(name) is None]
    if missing:
        raise PartSkipped(f"{', '.join(missing)} not installed in this interpreter")
    import ray

    from sweeper.cache.build import build_cache
    from sweeper.cache.reader import open_cache
    from sweeper.tuning.sweep import run_sweep

    with tempfile.TemporaryDirectory(prefix="device-check-sweep-") as folder:
        config = quickstart_on_device(tiny, Path(folder))
        ray.init(num_cpus=2 if tiny else None, num_gpus=0 if tiny else 1, include_dashboard=False,
                 log_to_driver=False)
        try:
            report = build_cache(config)
            summary = run_sweep(config, report.uri, open_cache(report.uri), config.mlflow.tracking_uri)
        finally:
            ray.shutdown()
    [entry] = summary["categories"].values()
    return {"gpus_per_trial": config.tune.gpus_per_trial, "max_concurrent_trials": config.tune.max_concurrent_trials,
            "trials": entry["trials"], "best_val": entry["best"]["val"], "best_family": entry["best"]["family"],
            "sweep_s": summary["seconds"]}


class PartSkipped(RuntimeError):
    """A part cannot run here (a package or the data is missing): recorded as skipped, with why."""


RUNNERS: dict[str, Callable[[str, bool, Path], dict[str, Any]]] = {
    "flow": flow_part, "trial": trial_part, "sweep": sweep_part}


def run_part(name: str, device: str, tiny: bool, data_root: Path) -> dict[str, Any]:
    """One part's record: its figures and seconds, or why it was skipped or failed."""
    started = time.perf_counter()
    try:
        figures = RUNNERS[name](device, tiny, data_root)
        status: dict[str, Any] = {"status": "ok", **figures}
    except (PartSkipped, SystemExit) as skipped:  # protocol_data exits with "skipped: ..." without the data
        status = {"status": "skipped", "reason": str(skipped).removeprefix("skipped: ")}
    except Exception as error:  # noqa: BLE001 - the other parts and the JSON must still come out
        traceback.print_exc()
        status = {"status": "failed", "error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
    return {**status, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized parts, for a test on a machine without a GPU")
    parser.add_argument("--device", default=None, help="torch device (default: cuda, cpu with --tiny)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument("--out", type=Path, default=Path("device_check.json"), help="where the JSON goes")
    parser.add_argument("--data-root", type=Path, default=SHARED, help="the shared data folder (the trial part)")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.tiny else "cuda")
    # the trial's meta-epoch lines as they come: a run stopped at the device's time limit still shows its progress
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here: pass --tiny (or --device cpu) to run the parts on the CPU")
    started = time.perf_counter()
    record: dict[str, Any] = {
        "machine": cpu_description(torch.get_num_threads()), "torch": torch.__version__, "device": device,
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None, "tiny": args.tiny,
        "parts": {},
    }
    for name in args.parts:
        print(f"device check: {name} ...", flush=True)
        record["parts"][name] = run_part(name, device, args.tiny, args.data_root)
        print(f"device check: {name}: {record['parts'][name]['status']} ({record['parts'][name]['seconds']} s)",
              flush=True)
        args.out.write_text(json.dumps({**record, "seconds": round(time.perf_counter() - started, 1)}, indent=1,
                                       default=str))
    print(f"device check: figures in {args.out.resolve()}")


if __name__ == "__main__":
    main()
