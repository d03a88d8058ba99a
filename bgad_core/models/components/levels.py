"""Which cached backbone levels a family reads, named by stride in its config."""

from __future__ import annotations

from collections.abc import Sequence

from bgad_core.errors import ConfigError


def level_indices(family: str, feature_strides: Sequence[int], strides: Sequence[int]) -> list[int]:
    """The indices, among the backbone's levels of ``strides``, of the configured ``feature_strides``; a
    ``ConfigError`` naming the family's key and the stride when one is not extracted."""
    strides = [int(stride) for stride in strides]
    for stride in feature_strides:
        if stride not in strides:
            raise ConfigError(f"{family} feature_strides: stride {stride} is not among the backbone's {strides}")
    return [strides.index(stride) for stride in feature_strides]
