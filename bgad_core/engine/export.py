"""The served model as one ONNX graph: uint8 images in, per-image score, anomaly map and decision out.

Inspection stations often run next to the camera without Python or a GPU; an ONNX file runs in onnxruntime (C,
C++, C#, Java, JS), OpenVINO and TensorRT. ``ExportableScorer`` wraps a ``bgad_core.engine.inference.Scorer`` and runs
exactly its code after the image decoding and resizing: the backbone's normalisation, the rounding of the features
to the dtype training stored them in, the detector of whichever family (its ``exportable`` form, which may hold
precomputed constants: BGAD stores each coupling block's condition term, PatchCore searches its memory bank with
a matmul and top-k), and the decision at the stored threshold.

``export_onnx`` traces it with torch's TorchScript-based exporter (``dynamo=False``, deprecated but present in
torch 2.14). The torch.export-based exporter (``dynamo=True``) gave a correct graph with a dynamic batch too
(scores within 1e-6 of the other's) but took 160 s against 8 s for the 64 px test model on 2 shared CPU cores,
nearly all of it translating the exported program. The graph, opset 18:

- input ``images``: uint8 ``[batch, H, W, 3]``, RGB, at the model's ``image_size`` (resize other sizes
  bilinearly first, as training did: PIL ``Image.resize(..., BILINEAR)``); ``batch`` is dynamic. uint8 rather
  than float so that the station's camera pixels go in as they are and the scaling cannot be done twice;
- outputs ``score`` float32 ``[batch]`` (absolute: an image scores the same in any batch), ``map`` float32
  ``[batch, H, W]`` (anomaly map at model resolution), ``decision`` bool ``[batch]`` (``score >= threshold``).

A layer the exporter cannot convert fails with an ``ExportError`` naming it (``failing_layer``), and a detector
that knows it cannot be exported (a BGAD flow that is not ``build_flow``'s AllInOneBlock stack) refuses before
tracing.

Example (``sweeper.export`` is the command line around it, with the registry)::

    >>> from bgad_core.engine.export import ExportableScorer, export_onnx
    >>> from bgad_core.engine.inference import Scorer
    >>> scorer = Scorer.load("model.pt", "backbone.safetensors")          # doctest: +SKIP
    >>> export_onnx(ExportableScorer(scorer), "out/model.onnx")           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from bgad_core.engine.inference import Scorer
from bgad_core.errors import ExportError

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "map", "decision")
BATCH_AXIS = "batch"
TRACE_BATCH = 2  # images in the example batch the graph is traced with (any batch runs: the axis is dynamic)
Arguments = tuple[tuple[Any, ...], dict[str, Any]]


class ExportableScorer(nn.Module):
    """``Scorer`` from uint8 NHWC images to ``(score, map, decision)``, its detector in its ``exportable`` form.

    Args:
        scorer: the served model (backbone, detector, threshold) to export; shared, not copied.
    """

    def __init__(self, scorer: Scorer) -> None:
        super().__init__()
        self.scorer = scorer.eval()
        self.image_size = scorer.image_size
        self.threshold = scorer.threshold
        self.detector = scorer.detector.exportable(feature_grids(scorer))
        # torch.onnx.export puts the module back in the mode it found it in, recursively: in eval mode, so that a
        # detector with BatchNorm (SimpleNet) is not left on batch statistics for the agreement check after it
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 ``[B, H, W, 3]`` at ``image_size`` -> score ``(B,)``, map ``(B, H, W)``, decision ``(B,)``.

        ``Scorer.forward`` without its padding of small CPU batches (a choice of aten's convolution kernels, which
        an ONNX runtime does not share).
        """
        extractor = self.scorer.extractor
        scores, maps = self.scorer.score_features(extractor(extractor.normalize(images)), self.detector)
        return scores, maps, scores >= self.threshold

    def example_input(self, batch: int = TRACE_BATCH) -> torch.Tensor:
        """A mid-grey uint8 batch of the input's shape."""
        return torch.full((batch, *self.image_size, 3), 128, dtype=torch.uint8)


class Agreement(NamedTuple):
    """How far onnxruntime's outputs are from the PyTorch model's on the same images."""

    images: int
    score_error: float  # max |score_onnx - score_torch|
    map_error: float  # max |map_onnx - map_torch|
    decisions_equal: bool
    batch_error: float  # max |score in one batch of all - score alone|, onnxruntime
    score_scale: float  # max |score_torch|, at least 1: the unit the errors are judged in


def export_onnx(model: ExportableScorer, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as an ONNX graph with a dynamic batch to ``path`` and validate it with ``onnx.checker``.

    ``metadata`` goes into the file's ``metadata_props`` next to the threshold and input size. The file appears
    only once complete and checked. The exporter's own output (deprecation and tracer warnings; on failure an IR
    dump per attempt, which names every operation's module scope) goes to ``<path>.export.log``, kept only when
    the export fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log, partial = path.with_name(path.name + ".export.log"), path.with_name(path.name + ".partial")
    arguments = ((model.example_input(),), {})
    log.unlink(missing_ok=True)  # a failed attempt's log would otherwise be appended to
    with output_to(log):
        try:
            trace(model, arguments, partial, named=True)
            failure = None
        except Exception as err:  # the exporter raises many types (tracing, unsupported operators, shape inference)
            name, layer = failing_layer(model, arguments)
            failure = ExportError(f"cannot export {describe_layer(name, layer)} to ONNX: {first_line(err)} "
                                  f"(exporter log: {log})")
            failure.__cause__ = err
    if failure is not None:
        partial.unlink(missing_ok=True)
        raise failure
    log.unlink()
    complete_graph(partial, model, metadata or {})
    try:
        onnx.checker.check_model(str(partial), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{partial}: the exporter wrote an invalid graph: {first_line(err)}") from err
    os.replace(partial, path)
    return path


def trace(module: nn.Module, arguments: Arguments, target: str | Path | io.BytesIO, named: bool = False) -> None:
    """Export ``module`` called with ``arguments``; ``named``: the model's input/output names and dynamic batch."""
    args, kwargs = arguments
    names: dict[str, Any] = {}
    if named:
        axes = {name: {0: BATCH_AXIS} for name in (INPUT_NAME, *OUTPUT_NAMES)}
        names = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES), "dynamic_axes": axes}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is chosen deliberately (module docstring); tracer warnings are about shapes
        # that are fixed in this graph (all but the batch), and tests check the graph against the model
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the reflect padding's symbolic reverses its pad list with a step -1 Slice, which runtimes fold on load
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(module, args, target, kwargs=kwargs or None, dynamo=False, opset_version=OPSET, **names)


def complete_graph(path: Path, model: ExportableScorer, metadata: Mapping[str, str]) -> None:
    """Declare the outputs' shapes (the exporter loses the map's through the reflect padding of the blur) and
    store the threshold, the input size and ``metadata`` in the file's ``metadata_props``."""
    graph = onnx.load(str(path))
    height, width = model.image_size
    shapes = {"score": [BATCH_AXIS], "map": [BATCH_AXIS, height, width], "decision": [BATCH_AXIS]}
    for output in graph.graph.output:
        for dim, size in zip(output.type.tensor_type.shape.dim, shapes[output.name]):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    properties = {"bgad.threshold": repr(model.threshold), "bgad.image_size": f"{height}x{width}",
                  "bgad.input": f"uint8 [{BATCH_AXIS}, {height}, {width}, 3] RGB", **metadata}
    onnx.helper.set_model_props(graph, properties)
    onnx.save(graph, str(path))


def onnx_agreement(path: str | Path, scorer: Scorer, images: np.ndarray) -> Agreement:
    """Run the graph at ``path`` in onnxruntime (CPU) on uint8 ``[N, H, W, 3]`` images and compare with ``scorer``.

    The batch is also scored one image at a time, which checks that scores do not depend on the batch.
    """
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps, decisions = session.run(None, {INPUT_NAME: images})
    alone = np.concatenate([session.run([OUTPUT_NAMES[0]], {INPUT_NAME: images[i : i + 1]})[0]
                            for i in range(len(images))])
    expected = scorer.score(images)
    return Agreement(
        images=len(images),
        score_error=float(np.abs(scores - expected.scores).max()),
        map_error=float(np.abs(maps - np.stack(expected.maps)).max()),
        decisions_equal=bool(np.array_equal(decisions, expected.decisions)),
        batch_error=float(np.abs(scores - alone).max()),
        score_scale=max(1.0, float(np.abs(expected.scores).max())),
    )


# ------------------------------------------------------------------------------------ naming the failing layer


def failing_layer(model: nn.Module, arguments: Arguments) -> tuple[str, nn.Module]:
    """The innermost submodule (dotted path, module) that fails to export on its own, called as ``model`` calls it.

    One eager call records every submodule's inputs; then, from the top, each called child is exported alone and
    the search descends into the first that fails. The root is returned when every child exports (the failing
    operation is in its own ``forward``). A layer whose eager ``forward`` raises is returned directly.
    """
    inputs, failed = record_inputs(model, arguments)
    if failed is not None:
        return failed, model.get_submodule(failed)
    return _failing_descendant(model, "", inputs) or ("", model)


def record_inputs(model: nn.Module, arguments: Arguments) -> tuple[dict[str, Arguments], str | None]:
    """Each submodule's first call arguments during one call of ``model``, and the one that raised, if any."""
    inputs: dict[str, Arguments] = {}
    running: list[str] = []

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs.setdefault(name, (args, kwargs))
            running.append(name)
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name), with_kwargs=True))
            handles.append(module.register_forward_hook(leave))
    args, kwargs = arguments
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:  # whatever the layer raised, the layer is what the caller needs to know
        return inputs, running[-1] if running else ""
    finally:
        for handle in handles:
            handle.remove()
    return inputs, None


def _failing_descendant(module: nn.Module, path: str, inputs: dict[str, Arguments]) -> tuple[str, nn.Module] | None:
    """The innermost called submodule below ``module`` that does not export alone, or None if all of them do."""
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        if child_path not in inputs:  # not called itself (a container, or called through its children)
            found = _failing_descendant(child, child_path, inputs)
        elif exports(child, inputs[child_path]):
            continue
        else:
            found = _failing_descendant(child, child_path, inputs) or (child_path, child)
        if found is not None:
            return found
    return None


def exports(module: nn.Module, arguments: Arguments) -> bool:
    """Whether ``module`` exports on its own when called with ``arguments``."""
    try:
        trace(module, arguments, io.BytesIO())
    except Exception:  # any exporter failure means "no"; which one is the top-level error's business
        return False
    return True


def describe_layer(name: str, layer: nn.Module) -> str:
    """``layer 'scorer.extractor.model.blocks.3' (Type, in the backbone)`` for an error message."""
    if not name:
        return f"the scoring head ({type(layer).__name__}.forward: normalisation, maps, score, decision)"
    part = {"scorer.extractor": "the backbone", "scorer.detector": "the detector"}.get(".".join(name.split(".")[:2]))
    return f"layer {name!r} ({type(layer).__name__}{f', in {part}' if part else ''})"


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, with its type."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` for the duration.

    The exporter's C++ side prints its IR dumps to stdout, below Python's ``sys.stdout``; Python's warnings go to
    stderr.
    """
    streams = (sys.stdout, sys.stderr)
    for stream in streams:
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                for stream in streams:
                    stream.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def feature_grids(scorer: Scorer) -> list[tuple[int, int]]:
    """``(H_l, W_l)`` of each backbone level at the model's image size (measured: padding rules differ per model)."""
    image = torch.zeros((1, *scorer.image_size, 3), dtype=torch.uint8)
    with torch.no_grad():
        return [(int(f.shape[2]), int(f.shape[3])) for f in scorer.extractor.extract(image)]
