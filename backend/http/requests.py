"""Request bodies, checked at the edge into typed values.

Deeper code never sees a list where it expects a string, a number it cannot use (Infinity, NaN),
JSON nested deeper than any real request, or a project id that only looks like a number.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from .errors import BackendError

MAX_DEPTH = 32  # Label Studio's deepest body (a region's value inside a task's annotation) is ~8
_PROJECT = re.compile(r"[0-9]{1,18}(?:\.[0-9]{1,20})?")
TOKEN = re.compile(r"[\x21-\x7e]*")  # what can go in an Authorization header as it is


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
    try:
        data = json.loads(raw, parse_constant=_constant)
    except RecursionError:
        raise BackendError(f"{what} is nested too deeply") from None
    except ValueError as e:  # UnicodeDecodeError included
        raise BackendError(f"{what} is not valid JSON: {str(e)[:200]}") from None
    if _depth(data) > MAX_DEPTH:
        raise BackendError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    return data


def json_object(raw: bytes) -> dict:
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise BackendError("request body must be a JSON object")
    return data


def text(data: dict, key: str, limit: int = 1 << 20) -> str:
    """A string field; absent or null is ""."""
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BackendError(f"'{key}' must be a string")
    if len(value) > limit:
        raise BackendError(f"'{key}' is longer than {limit} characters")
    return value


def project_key(value) -> str:
    """Label Studio sends "<id>.<created_at>"; the id names the project. "" when absent."""
    if value is None or value == "":
        return ""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18:
        return str(value)
    if not isinstance(value, str) or not _PROJECT.fullmatch(value):
        raise BackendError("'project' must be a Label Studio project id, like \"12\" or \"12.1700000000\"")
    return value.split(".")[0]


def extra_params(value) -> dict:
    """The model connection's extra params: an object, or the JSON text the Connect Model form sends."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        if len(value) > 1 << 16:
            raise BackendError("extra_params is longer than 65536 characters")
        value = parse_json(value, "extra_params") if value.strip() else {}
    if not isinstance(value, dict):
        raise BackendError("extra_params must be a JSON object, e.g. {\"ontology\": {...}, \"thresholds\": {...}}")
    return value


@dataclass
class Setup:
    project: str
    schema: str
    hostname: str
    access_token: str
    extra_params: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, data: dict) -> "Setup":
        token = text(data, "access_token", 8192)
        if not TOKEN.fullmatch(token):
            raise BackendError("'access_token' must be printable ASCII without spaces")
        return cls(project_key(data.get("project")), text(data, "schema"), text(data, "hostname", 2048),
                   token, extra_params(data.get("extra_params")))


@dataclass
class Predict:
    tasks: list[dict]
    project: str
    label_config: str
    context: dict | None

    @classmethod
    def parse(cls, data: dict) -> "Predict":
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BackendError("'tasks' must be a non-empty list of tasks")
        for i, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise BackendError("every task must be an object")
            if not isinstance(task.get("data", {}), dict):
                raise BackendError(f"tasks[{i}].data must be an object")
            tid = task.get("id")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, (int, str)) or len(str(tid)) > 40):
                raise BackendError(f"tasks[{i}].id must be a number")
        params = data.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise BackendError("'params' must be an object")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise BackendError("params.context must be an object")
        return cls(tasks, project_key(data.get("project")), text(data, "label_config"), context)
