"""Request bodies of the ML-backend contract, checked at the edge into typed values.

Deeper code never sees a list where it expects a string, a task that is not an object, or a project id that only
looks like a number (the rules for numbers and JSON themselves are `validate`'s).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..annotate.ontology import extra_params
from ..annotate.task import Task
from ..errors import BackendError
from ..validate import parse_json, whole

_PROJECT = re.compile(r"[0-9]{1,18}(?:\.[0-9]{1,20})?")
TOKEN = re.compile(r"[\x21-\x7e]*")  # what can go in an Authorization header as it is


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
    if whole(value, 0, 10**18 - 1):
        return str(value)
    if not isinstance(value, str) or not _PROJECT.fullmatch(value):
        raise BackendError("'project' must be a Label Studio project id, like \"12\" or \"12.1700000000\"")
    return value.split(".")[0]


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
    tasks: list[Task]
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
        return cls([Task.from_json(t) for t in tasks], project_key(data.get("project")), text(data, "label_config"),
                   context)
