"""Which precision the training steps' matmuls run in: ``auto`` picks bfloat16 only where the hardware has it.

bfloat16 halves the subnets' matmul cost on GPUs and on CPUs with bf16 instructions (AVX512-BF16, AMX), but a CPU
without them emulates it, and then a bf16 step runs 2-3x slower than fp32 (BENCHMARKS.md). CPU models change from
machine to machine, so the choice is made where the trainer runs, from the CPU's own flags, never hard-coded.

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
    """``fp32`` or ``bf16`` for ``device``: ``auto`` decides from the hardware; a forced ``bf16`` without it warns."""
    native = precision != "fp32" and has_bf16_hardware(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        warnings.warn(
            f"precision 'bf16' on {device} without bfloat16 hardware (CPU flags {sorted(BF16_CPU_FLAGS)} absent): "
            "training steps run slower than fp32; use precision 'auto' or 'fp32'", RuntimeWarning, stacklevel=2,
        )
    return precision
