"""Safe names, and the one way this project writes an MLflow search filter.

MLflow's filter grammar (``tags.`key` = 'value' and ...``) has no escape for a quote inside a string literal: a
value such as ``bob's-sweep`` ends the literal early, and ``x' OR '1'='1`` rewrites the query. So quoting cannot
make an arbitrary value safe; instead every value that reaches a filter is checked to hold only characters that
cannot end a literal. User-chosen names that end up in filters or in MLflow tags (sweep, category, experiment and
registered model names) are held to ``SAFE_NAME`` when they are read, so a bad name fails with a message naming its
key before any Ray work, never deep inside a sweep.

>>> match({"bgad.role": "sweep"}, name="bgad-tiles")
"tags.`bgad.role` = 'sweep' and name = 'bgad-tiles'"
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SAFE_NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
_FILTER_VALUE = re.compile(r"[A-Za-z0-9_.-]{1,256}")  # safe names, sweep ids (<name>-<digest>), run and trial ids
_FILTER_KEY = re.compile(r"[A-Za-z0-9_.]{1,256}")  # tag keys (bgad.role) and attributes (name, run_name)


def is_safe_name(value: str) -> bool:
    """Whether ``value`` follows ``SAFE_NAME_RULE``.

    >>> is_safe_name("quickstart"), is_safe_name("bob's-sweep")
    (True, False)
    """
    return SAFE_NAME.fullmatch(value) is not None


def check_name(value: str) -> str:
    """``value`` if it is a safe name, else a ``ValueError`` saying what is allowed (pydantic names the key)."""
    if not is_safe_name(value):
        raise ValueError(f"must be {SAFE_NAME_RULE}")
    return value


def is_filter_value(value: str) -> bool:
    """Whether ``value`` can stand in a filter's string literal: ids and names, nothing that could end it."""
    return _FILTER_VALUE.fullmatch(value) is not None


def match(tags: Mapping[str, str] | None = None, **attributes: str) -> str:
    """Filter string for MLflow searches: every tag of ``tags`` and every attribute equals its value.

    Raises ``ValueError`` for a key or value outside the safe characters; callers check user input first (with
    ``is_filter_value``) so that the user gets a message about the flag they passed.
    """
    clauses = [_equals(f"tags.`{_key(key)}`", value) for key, value in (tags or {}).items()]
    clauses += [_equals(_key(key), value) for key, value in attributes.items()]
    return " and ".join(clauses)


def _equals(field: str, value: str) -> str:
    if not is_filter_value(value):
        raise ValueError(f"MLflow filter value {value!r} for {field}: only letters, digits, '_', '.' and '-'")
    return f"{field} = '{value}'"


def _key(key: str) -> str:
    if _FILTER_KEY.fullmatch(key) is None:
        raise ValueError(f"MLflow filter key {key!r}: only letters, digits, '_' and '.'")
    return key
