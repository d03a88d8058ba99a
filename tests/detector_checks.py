"""Checks every family's detector must pass, shared by the family tests."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnxruntime
import torch
from torch import nn

from bgad_core.engine.export import OPSET


class FeatureInputs(nn.Module):
    """The detector with one ONNX input per backbone level instead of a list."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector(list(features))


@torch.no_grad()
def assert_fp16_scores_in_float32_in_any_batch(detector: nn.Module, features: Sequence[torch.Tensor],
                                               size: tuple[int, int]) -> None:
    """fp16 features (as the cache stores them) score in float32, exactly as their values held in fp32, and each
    image scores the same alone as in the batch."""
    features = [f.half() for f in features]
    scores, maps = detector(features)
    assert scores.dtype == maps.dtype == torch.float32 and maps.shape == (len(scores), *size)
    expected_scores, expected_maps = detector([f.float() for f in features])  # the fp16 values, held as fp32
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=0)
    torch.testing.assert_close(maps, expected_maps, rtol=0, atol=0)
    alone = torch.cat([detector([f[i : i + 1] for f in features])[0] for i in range(len(scores))])
    torch.testing.assert_close(alone, scores, rtol=0, atol=1e-6 * float(scores.abs().max()))


def exported_session(detector: nn.Module, features: Sequence[torch.Tensor]) -> onnxruntime.InferenceSession:
    """The detector's ``exportable`` form traced with ``features`` (one input ``level_<i>`` per level) and a dynamic
    batch axis, as ``engine.export`` traces (TorchScript exporter, opset 18), opened in onnxruntime."""
    names = [f"level_{level}" for level in range(len(features))]
    graph = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as engine.export uses
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # constants of the model and the grids
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)  # the blur's reflect pad
        module = FeatureInputs(detector.exportable([(f.shape[2], f.shape[3]) for f in features]))
        torch.onnx.export(module, tuple(features), graph, dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["score", "map"],
                          dynamic_axes={name: {0: "batch"} for name in (*names, "score", "map")})
    return onnxruntime.InferenceSession(graph.getvalue(), providers=["CPUExecutionProvider"])


@torch.no_grad()
def assert_onnx_scores_like_pytorch(session: onnxruntime.InferenceSession, detector: nn.Module,
                                    features: Sequence[torch.Tensor], levels: Sequence[int],
                                    size: tuple[int, int]) -> None:
    """The graph reads exactly ``levels`` and scores ``features`` as the detector does, within tests/test_export.py's
    tolerances per unit of score, the same in any batch."""
    inputs = {f"level_{level}": features[level].numpy() for level in levels}
    assert [i.name for i in session.get_inputs()] == list(inputs)  # a level the detector does not read is no input
    scores, maps = session.run(None, inputs)
    expected_scores, expected_maps = detector(features)
    batch = len(expected_scores)
    scale = float(expected_scores.abs().max())
    assert scores.shape == (batch,) and maps.shape == (batch, *size)
    assert np.abs(scores - expected_scores.numpy()).max() < 1e-4 * scale
    assert np.abs(maps - expected_maps.numpy()).max() < 1e-3 * scale
    alone = np.concatenate([session.run(["score"], {name: value[j : j + 1] for name, value in inputs.items()})[0]
                            for j in range(batch)])
    assert np.abs(alone - scores).max() < 1e-6 * scale
