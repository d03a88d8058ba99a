"""Images/s of the exported ONNX graph in onnxruntime (and OpenVINO, where installed) vs the MLflow pyfunc, CPU.

The model has a real trial's architecture at 256 px: tf_efficientnet_lite0 with the offline ImageNet weights,
strides (8, 16), ``BGADConfig``'s default flows (8 couplings, 3 x 3 local aggregation) -- randomly initialised
(seeded), with unit normalisation constants: speed does not depend on the values. The pyfunc is
``sweeper.registry.serving`` saved with ``mlflow.pyfunc.save_model`` as ``sweeper.promote`` logs it, fed uint8 arrays of
the model's size (no decoding); ``Scorer`` is the PyTorch model inside it called directly, which separates the
model's speed from MLflow's input handling; the graph is fed the same arrays as one uint8 batch. All get
``--threads``.

    .venv/bin/python -m benchmarks.bench_export [--images 32] [--rounds 3] [--threads 2] [--image-size 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pandas as pd
import torch

import bgad_core
from benchmarks.bench_accuracy import cpu_flags
from bgad_core.backbone import DEFAULT_STRIDES, FeatureExtractor
from bgad_core.engine.checkpoint import make_checkpoint, save_checkpoint
from bgad_core.engine.export import INPUT_NAME, ExportableScorer, export_onnx
from bgad_core.engine.inference import Scorer, save_backbone_weights
from bgad_core.engine.selection import seed_everything
from bgad_core.models.bgad.config import BGADConfig
from bgad_core.models.bgad.detector import BGADDetector
from bgad_core.models.bgad.scoring import Normalization
from bgad_core.models.bgad.torch_model import BGADFlows
from sweeper.registry import serving
from sweeper.promote import pip_requirements

BATCHES = (1, 8)


def trial_like_model(image_size: int) -> tuple[Scorer, dict]:
    """A scorer with a default trial's architecture and seeded random flows, and its checkpoint."""
    extractor = FeatureExtractor("tf_efficientnet_lite0", "offline", DEFAULT_STRIDES)
    seed_everything(0)
    config = BGADConfig()
    flows = BGADFlows.from_config(extractor.channels, config)
    backbone = {"name": extractor.name, "weights_source": extractor.weights_source,
                "weights_digest": extractor.weights_digest, "strides": list(extractor.strides),
                "channels": list(extractor.channels)}
    levels = len(extractor.channels)
    detector = BGADDetector(flows, Normalization((0.0,) * levels, (1.0,) * levels), config.blur_sigma,
                            (image_size, image_size), config)
    checkpoint = make_checkpoint(detector, backbone, 0.0, {}, 1)
    return Scorer(checkpoint, extractor), checkpoint


def saved_pyfunc(scorer: Scorer, checkpoint_path: Path, folder: Path) -> mlflow.pyfunc.PyFuncModel:
    """The registry's pyfunc (``sweeper.registry.serving``), saved locally and loaded back."""
    artifacts = {serving.CHECKPOINT_ARTIFACT: str(checkpoint_path),
                 serving.BACKBONE_ARTIFACT: str(save_backbone_weights(scorer.extractor, folder / "backbone.safetensors"))}
    mlflow.pyfunc.save_model(str(folder / "pyfunc"), python_model=serving.__file__, artifacts=artifacts,
                             code_paths=[str(Path(bgad_core.__file__).parent)], signature=serving.SIGNATURE,
                             input_example=serving.input_example(scorer.image_size),
                             pip_requirements=pip_requirements())
    return mlflow.pyfunc.load_model(str(folder / "pyfunc"))


def images_per_second(score: Callable[[np.ndarray], object], images: np.ndarray, batch: int) -> float:
    """Throughput over ``images`` in batches of ``batch``."""
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        score(images[start : start + batch])
    return len(images) / (time.perf_counter() - started)


def best_rates(runners: dict[str, Callable[[np.ndarray], object]], images: np.ndarray, batch: int,
               rounds: int) -> dict[str, float]:
    """Each runner's best throughput over ``rounds`` rounds that alternate the runners, after one warm-up batch
    each: on a shared machine, load that comes and goes then hits every runner alike."""
    for run in runners.values():
        run(images[:batch])
    best = dict.fromkeys(runners, 0.0)
    for _ in range(rounds):
        for name, run in runners.items():
            best[name] = max(best[name], images_per_second(run, images, batch))
    return best


def openvino_runner(path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]] | None:
    """The graph read by OpenVINO's ONNX frontend and compiled for the CPU, or None when OpenVINO is absent."""
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                   "INFERENCE_PRECISION_HINT": "f32"})
    return lambda batch: list(compiled(batch).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="images scored per configuration and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration (the best one counts)")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch, onnxruntime and OpenVINO")
    parser.add_argument("--image-size", type=int, default=256, help="model input size (square)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_flags()}; load average {os.getloadavg()[0]:.1f} (other processes share the cores if > 0)")
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    scorer, checkpoint = trial_like_model(args.image_size)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        graph = export_onnx(ExportableScorer(scorer), folder / "model.onnx")
        print(f"export: {time.perf_counter() - started:.1f} s, {graph.stat().st_size / 2**20:.1f} MiB")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        pyfunc = saved_pyfunc(scorer, save_checkpoint(checkpoint, folder / "model.pt"), folder)
        runners: dict[str, Callable[[np.ndarray], object]] = {
            "pyfunc": lambda batch: pyfunc.predict(pd.DataFrame({serving.IMAGE_COLUMN: list(batch)})),
            "Scorer": scorer.score,  # the pyfunc's PyTorch model without MLflow's input handling
            "onnxruntime": lambda batch: session.run(None, {INPUT_NAME: batch}),
        }
        openvino = openvino_runner(graph, args.threads)
        if openvino is None:
            print("openvino: not installed (optional: pip install openvino)")
        else:
            runners["openvino"] = openvino
            reference = session.run(None, {INPUT_NAME: images[:4]})
            ours = openvino(images[:4])
            print(f"openvino vs onnxruntime on 4 images: scores within {np.abs(ours[0] - reference[0]).max():.2g}, "
                  f"maps within {np.abs(ours[1] - reference[1]).max():.2g}")
        print(f"{args.image_size} px, {args.images} images x best of {args.rounds} rounds, {args.threads} threads")
        for batch in BATCHES:
            figures = best_rates(runners, images, batch, args.rounds)
            print(f"batch {batch}: " + ", ".join(f"{name} {value:.1f} images/s" for name, value in figures.items())
                  + f"; onnxruntime / pyfunc {figures['onnxruntime'] / figures['pyfunc']:.2f}x"
                  + f" (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
