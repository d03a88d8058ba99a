"""Keep freed blocks in the process's heap, so that training steps stop paying for fresh pages.

A training step allocates and frees the same few ``(fiber_batch, hidden)`` float32 tensors (4-8 MB each) dozens of
times. glibc's malloc serves blocks that large with ``mmap`` and gives them back to the OS when they are freed, or
trims the heap, so every step writes to fresh pages and takes a page fault per 4 KiB. On a 2-core CPU that cost
10-30 % of a flow step (BENCHMARKS.md, "Speed of a trial"). Raising malloc's mmap and trim thresholds keeps those
blocks in the heap for the next step. This changes how much free memory the process keeps (at most
``trim_threshold`` bytes at the top of the heap), never what it computes. PyTorch has no caching allocator for
CPU tensors, which is why this is set at the C library's level.

Example::

    >>> from bgad_core.memory import retain_freed_memory
    >>> retain_freed_memory()  # Linux with glibc; False elsewhere
    True
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # above every step tensor (b6 widths at 4,096 vectors: 7.5 MB)
TRIM_THRESHOLD = 512 << 20  # free heap kept for reuse, at most


@functools.cache
def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold`` bytes of it free.

    It acts on the whole process, once. Returns whether it took effect: False where the C library is not glibc
    (macOS, musl), where nothing changes.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it, and only glibc's mallopt takes these parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if not applied:
        log.warning("malloc kept its default thresholds: training steps will allocate fresh pages")
    return applied
