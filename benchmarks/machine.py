"""The machine a figure was measured on: CPU model and the flags that decide matrix speed (standard library only,
so that scripts run in another interpreter, e.g. the anomalib reference, can print it too)."""

from __future__ import annotations

import platform
from pathlib import Path

MATRIX_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description(threads: int) -> str:
    """``<model>; <threads> threads; flags: <those of MATRIX_FLAGS it has>``, printed with every speed figure (the
    CPU model changes between machines, and bf16 wins or loses by 3x with these flags)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{model}; {threads} threads; flags: {' '.join(f for f in MATRIX_FLAGS if f in flags) or 'none of interest'}"
