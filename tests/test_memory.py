"""retain_freed_memory: large freed blocks stay in the heap (glibc), measured in a fresh process each time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from bgad_core.memory import retain_freed_memory

# 40 MB is above glibc's largest self-adjusted mmap threshold (32 MB), so by default it is always mmapped.
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from bgad_core.memory import retain_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    applied = retain_freed_memory() if sys.argv[1] == "retain" else False
    before = libc.mallinfo2().hblkhd
    block = torch.ones(10 << 20)  # 40 MB, written
    mmapped = libc.mallinfo2().hblkhd - before
    del block
    print(json.dumps({"applied": applied, "mmapped": mmapped, "free_in_heap": libc.mallinfo2().fordblks}))
""")


def probe(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_large_freed_blocks_stay_in_the_heap_only_once_retained():
    if not retain_freed_memory():
        pytest.skip("the C library is not glibc: retain_freed_memory does nothing here")
    default, retained = probe("default"), probe("retain")
    assert default["mmapped"] >= 40 << 20  # glibc's default: its own mapping, returned to the OS on free
    assert retained["applied"]
    assert retained["mmapped"] == 0  # served from the heap...
    assert retained["free_in_heap"] >= 40 << 20  # ...and kept there, free, for the next step
