"""Fits of single-pass families, kept so that a trial that would fit the same model again reuses it.

A family fitted in one pass (``Family.single_pass``: PatchCore's memory bank) is a deterministic function of its
config, its data selection, the categories and the feature cache. When a search samples it again with the same
values (always, when none of its parameters is searched: TPE may pick the family many times), fitting again would
spend a trial's time to get the same model. The first trial stores its checkpoint files and reported result under
the experiment (``<storage>/<sweep>/<experiment>/fits/<key>/``, any pyarrow URI the trials reach, as Tune's own
storage); a later trial with the same key copies them, reports the same result and logs it to its own MLflow run,
tagged with the key, in a second or so instead of a fit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sweeper.cache.reader import exists, filesystem, join, mirror_tree, read_bytes, write_bytes

# written last, so a fit folder without it is incomplete and ignored (not "result.json": Tune's own results are named so)
RESULT_FILE = "fit_result.json"
REUSED_TAG = "bgad.reused_fit"  # MLflow tag of a trial that reused a stored fit: the fit's key


def fit_key(family: str, config: Mapping[str, Any], data: Mapping[str, int], categories: Sequence[str],
            cache_key: str) -> str:
    """What determines a single-pass fit, hashed."""
    identity = {"family": family, "config": dict(config), "data": dict(data), "categories": list(categories),
                "cache": cache_key}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def fetch_fit(store: str, key: str, folder: Path) -> dict[str, Any] | None:
    """Copy the stored fit ``key`` into ``folder`` and return its reported result; None when there is none yet."""
    fs, root = filesystem(join(store, key))
    if not exists(fs, f"{root}/{RESULT_FILE}"):
        return None
    mirror_tree(join(store, key), folder)
    return json.loads(read_bytes(fs, f"{root}/{RESULT_FILE}"))


def save_fit(store: str, key: str, folder: Path, result: Mapping[str, Any]) -> None:
    """Store a fit's checkpoint ``folder`` and its reported ``result`` (JSON-able values) under ``key``."""
    fs, root = filesystem(join(store, key))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = f"{root}/{path.relative_to(folder).as_posix()}"
        fs.create_dir(target.rpartition("/")[0], recursive=True)  # a no-op on object stores
        write_bytes(fs, target, path.read_bytes())
    write_bytes(fs, f"{root}/{RESULT_FILE}", json.dumps(dict(result), sort_keys=True).encode())
