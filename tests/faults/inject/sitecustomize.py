"""Test-only fault injector: a disk that fills up while a sweep writes checkpoints.

Inert unless ``BGAD_FAULT_DISK_FULL_AFTER`` is set. Put this directory on ``PYTHONPATH`` of the sweep job: Python
imports ``sitecustomize`` at start-up in the driver and in every Ray worker (they inherit the environment). Once
``torch`` is imported, ``torch.save`` counts its calls in ``$BGAD_FAULT_DIR/saves`` (one file shared by all
processes); after N calls succeeded, each later call writes half of the bytes and raises ``OSError(ENOSPC)``, as a
``write()`` on a full disk does.
"""

from __future__ import annotations

import errno
import importlib.abc
import importlib.util
import io
import os
import sys


def _on_a_full_disk(save):
    def save_on_a_full_disk(obj, f, *args, **kwargs):
        counter = os.path.join(os.environ["BGAD_FAULT_DIR"], "saves")
        with open(counter, "a") as calls:
            calls.write(".")
        if os.path.getsize(counter) <= int(os.environ["BGAD_FAULT_DISK_FULL_AFTER"]):
            return save(obj, f, *args, **kwargs)
        data = io.BytesIO()
        save(obj, data, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(data.getvalue()[: len(data.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    return save_on_a_full_disk


class _PatchTorchOnImport(importlib.abc.MetaPathFinder):
    """Wraps ``torch.save`` right after ``torch`` is imported (importing it here would slow every process)."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.save = _on_a_full_disk(module.save)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("BGAD_FAULT_DISK_FULL_AFTER"):
    sys.meta_path.insert(0, _PatchTorchOnImport())
