"""Which precision the training steps' matmuls run in: ``auto`` picks bfloat16 only where it was measured to win.

On CPUs with bf16 instructions (AVX512-BF16, AMX) bf16 steps ran 1.2-1.7x faster than fp32, but a CPU without them
emulates it, and then a bf16 step runs 3-10x slower (BENCHMARKS.md, sections 1b and 1d). CPU models change from
machine to machine, so the choice is made where the trainer runs, from the CPU's own flags, never hard-coded. On a
GPU ``auto`` keeps fp32: on an H200 bf16 steps ran at 0.82-1.03x of fp32 (the steps are bound by gathers and kernel
launches there, not by matmuls; BENCHMARKS.md, section 5); ``precision: bf16`` still asks for it.

Example::

    >>> resolve_precision("fp32", "cpu")
    'fp32'
    >>> resolve_precision("auto", "cpu") in ("fp32", "bf16")
    True
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISION_CHOICES = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def has_bf16_hardware(device: str | torch.device) -> bool:
    """Whether bfloat16 matmuls run natively on ``device`` (a CUDA GPU that supports them, or a CPU with bf16 flags)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``fp32`` or ``bf16`` for ``device``: ``auto`` takes bf16 on a CPU with bf16 hardware only; a forced ``bf16``
    without the hardware warns."""
    native = precision != "fp32" and has_bf16_hardware(device)
    if precision == "auto":
        return "bf16" if native and torch.device(device).type == "cpu" else "fp32"
    if precision == "bf16" and not native:
        warnings.warn(
            f"precision 'bf16' on {device} without bfloat16 hardware (CPU flags {sorted(BF16_CPU_FLAGS)} absent): "
            "training steps run slower than fp32; use precision 'auto' or 'fp32'", RuntimeWarning, stacklevel=2,
        )
    return precision
