"""Rules for values that come from outside (request bodies, extra params, environment), in one place.

Deeper code never sees a list where it expects a string, a number it cannot use (Infinity, NaN), a bool where
it expects a count, or JSON nested deeper than any real request.
"""
from __future__ import annotations

import json
import math

from .errors import BackendError

MAX_DEPTH = 32  # Label Studio's deepest body (a region's value inside a task's annotation) is ~8


def number(value, what: str) -> float:
    """A finite number (JSON number or numeric string), or a 400 naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BackendError(f"{what} must be a number, got {str(value)[:50]!r}")
    try:
        v = float(value)
    except (ValueError, OverflowError):
        raise BackendError(f"{what} must be a number, got {str(value)[:50]!r}") from None
    if not math.isfinite(v):
        raise BackendError(f"{what} must be a finite number, got {str(value)[:50]!r}")
    return v


def whole(value, least: int, most: int) -> bool:
    """Is `value` a whole number (a JSON integer, not a bool) from `least` to `most`?"""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


def parse_bool(value, what: str) -> bool:
    """true/false, 1/0, yes/no, on/off (any case), or a JSON boolean; ValueError naming `what` otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{what} must be true or false, got {value!r}")


def _constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(data) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(raw: bytes | str, what: str = "request body"):
    """JSON without NaN or Infinity, nested at most MAX_DEPTH levels; a 400 naming `what` otherwise."""
    try:
        data = json.loads(raw, parse_constant=_constant)
    except RecursionError:
        raise BackendError(f"{what} is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise BackendError(f"{what} is not valid JSON: {str(e)[:200]}") from None
    if _depth(data) > MAX_DEPTH:
        raise BackendError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return data
