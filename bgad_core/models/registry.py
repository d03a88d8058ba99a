"""The detector families, by name: configs name a family, code asks the registry (as timm's ``create_model``).

A new family is a folder under ``bgad_core/models/`` whose ``__init__`` defines ``FAMILY`` (a ``base.Family``) and
one entry in ``_FAMILIES`` below; nothing else in ``bgad_core`` or ``sweeper`` changes.

    >>> from bgad_core.models.registry import family, family_names
    >>> family_names()
    ('bgad', 'patchcore', 'simplenet')
    >>> family("patchcore").learning_type
    'one_class'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bgad_core.errors import ConfigError
from bgad_core.models import bgad, patchcore, simplenet
from bgad_core.models.base import DetectorConfig, Family

DEFAULT_FAMILY = "bgad"
_FAMILIES: dict[str, Family] = {f.name: f for f in (bgad.FAMILY, patchcore.FAMILY, simplenet.FAMILY)}


def family_names() -> tuple[str, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES)


def family(name: str) -> Family:
    """The family called ``name``; a ``ConfigError`` naming the known ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown detector family {name!r}; known: {list(_FAMILIES)}") from None


def config_for(name: str, values: Mapping[str, Any]) -> DetectorConfig:
    """The family's config from the values that are its fields (others, meant for other families, are left out)."""
    chosen = family(name)
    return chosen.config.from_dict({k: v for k, v in values.items() if k in chosen.parameters()})


def family_of(config: DetectorConfig) -> Family:
    """The family whose config class ``config`` is (a config knows its fields, the registry its family)."""
    for registered in _FAMILIES.values():
        if type(config) is registered.config:
            return registered
    raise ConfigError(f"{type(config).__name__} is no registered family's config; known: {list(_FAMILIES)}")
