"""Checks of the JSON files beft_trainer reads back (adapter config, selection report), in one style.

Each reader keeps a table ``{field: (predicate on its JSON value, what the value must be, in words)}``
built from these predicates, walks it in order and words its own one-line error for the first field that fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any


def required_fields(cls: type) -> list[str]:
    """The fields of dataclass ``cls`` without a default, in declaration order: a file must hold them."""
    return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]


def json_kind(value: Any) -> str:
    """What JSON calls ``value``: "an object", "a list", "null", ..."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


# In JSON ``true`` is a boolean, never the number 1 (Python's bool is an int).
def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_str(value: Any) -> bool:
    return isinstance(value, str)


def is_object(value: Any) -> bool:
    return isinstance(value, dict)


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def map_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A predicate: an object whose every value passes ``check``."""
    return lambda value: isinstance(value, dict) and all(check(item) for item in value.values())


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A predicate: null, or a value that passes ``check``."""
    return lambda value: value is None or check(value)
