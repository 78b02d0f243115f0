"""Checks of single option values: a wrong value is refused with one line naming the option.

Shared by the configs (``config``) and the functions that take the same kinds of values
(``add_missing_biases``): a type list is a tuple or a comma list, a count is whole, a flag is a bool.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from .errors import BeftConfigError

__all__ = ["parse_type_list", "require_bool", "require_count_or_share", "require_int"]


def parse_type_list(value: str | Sequence[str] | None, option: str, known: Sequence[str]) -> tuple[str, ...] | None:
    """``"q,v"``, ``("q", "v")`` or ``["q,v"]`` (a command line) as ``("q", "v")``; ``None`` stays ``None``.

    Every name must be one of ``known``, once: ``"qkv"`` is refused, not split into characters.
    """
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(item, str) for item in items):
        raise BeftConfigError(f"{option}={value!r}: give bias type names as strings, e.g. ('q', 'v') or 'q,v'.")
    names = tuple(name.strip() for item in items for name in item.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown or not names or len(set(names)) != len(names):
        problem = f"unknown bias types {unknown}" if unknown else "empty" if not names else "a repeated name"
        raise BeftConfigError(
            f"{option}={value!r} has {problem}: use distinct vector types among {', '.join(known)}, "
            "as a tuple ('q', 'v') or a comma list 'q,v'."
        )
    return names


def require_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BeftConfigError(f"{owner}: {name} must be a whole number, got {value!r}.")
    if value < minimum:
        raise BeftConfigError(f"{owner}: {name} must be >= {minimum}, got {value}.")
    return int(value)


def require_count_or_share(
    owner: str, name: str, value: Any, counted: str = "step", whole: str = "run"
) -> int | float:
    """A whole count of ``counted`` >= 1, or a finite share of the ``whole`` in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not value > 0:
        raise BeftConfigError(
            f"{owner}: {name} must be a {counted} count (>= 1) or a share of the {whole} (< 1), got {value!r}."
        )
    if value < 1:
        return float(value)
    if value != int(value):
        raise BeftConfigError(f"{owner}: {name} must be a whole number of {counted}s when >= 1, got {value!r}.")
    return int(value)


def require_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BeftConfigError(f"{owner}: {name} must be True or False, got {value!r}.")
    return value
