"""An in-memory Label Studio REST API that fails the ways a real one does, for fast tests of posting.

It stands in for `labelstudio.LabelStudio` (the connection), so the real `LabelStudioAPI` (retries, error
mapping) and everything above it run unchanged. It serves what jobs use: a project, its tasks (paged, and one
by one with predictions and annotations), bulk prediction imports and prediction deletes. Prediction ids grow,
as a database sequence does.

Faults, set per call in `faults` (a list consumed in order, matched by "METHOD path-fragment"):
- "429", "500": answered so, nothing applied;
- "500-after": applied, then answered 500;
- "drop-before": the connection drops before anything is applied (a Transient, as `LabelStudio.api` raises);
- "drop-after": applied, then the connection drops without an answer.
`hooks` run before a matching call is applied (to interleave another run at an exact point).
"""
from __future__ import annotations

import itertools
import json
import threading
from collections import Counter

from backend.labelstudio.outbound import Reply, parse_url
from backend.labelstudio.retry import Transient


class FakeLabelStudio:
    def __init__(self, label_config: str, url: str = "http://label-studio.test:8080"):
        self.url, self.token = url, "fake-token"
        self.base = parse_url(url)
        self.label_config = label_config
        self.tasks: dict[int, dict] = {}
        self.predictions: dict[int, dict] = {}
        self.annotations: dict[int, list] = {}
        self.ml_backends: list[dict] = []  # what GET /api/ml?project= lists (their extra params)
        self.faults: list[tuple[str, str]] = []  # (method + path fragment, kind)
        self.hooks: list[tuple[str, object]] = []  # (method + path fragment, callable), each runs once
        self.calls: Counter = Counter()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    # ---- the project ---------------------------------------------------------------------------
    def add_task(self, data: dict, annotated: bool = False) -> int:
        with self._lock:
            tid = 1000 + len(self.tasks)
            self.tasks[tid] = {"id": tid, "data": data, "project": 1}
            self.annotations[tid] = [{"id": tid, "result": []}] if annotated else []
            return tid

    def add_annotation(self, task: int, result: list, was_cancelled: bool = False, updated_at: str = "") -> int:
        with self._lock:
            aid = 5000 + sum(len(a) for a in self.annotations.values())
            self.annotations[task].append({"id": aid, "result": result, "was_cancelled": was_cancelled,
                                           "updated_at": updated_at or f"2026-01-01T00:00:{aid % 60:02d}Z"})
            return aid

    def add_prediction(self, task: int, model_version: str, result=None) -> int:
        with self._lock:
            pid = next(self._ids)
            self.predictions[pid] = {"id": pid, "task": task, "model_version": model_version, "result": result or [],
                                     "score": 0.5}
            return pid

    def of(self, task: int, model_version: str | None = None) -> list[dict]:
        with self._lock:
            return [p for p in self.predictions.values()
                    if p["task"] == task and (model_version is None or p["model_version"] == model_version)]

    # ---- what labelstudio.LabelStudio offers -----------------------------------------------------
    def check(self, project, timeout=2.0):
        return None

    def api(self, method: str, path: str, *, params=None, timeout=60.0, json=None, **kw) -> Reply:
        key = f"{method} {path}"
        self.calls[(method, path.rstrip("0123456789/"))] += 1
        with self._lock:
            hook = next((h for h in self.hooks if h[0] in key), None)
            if hook:
                self.hooks.remove(hook)
            fault = next((f for f in self.faults if f[0] in key), None)
            if fault:
                self.faults.remove(fault)
        if hook:
            hook[1]()
        kind = fault[1] if fault else None
        if kind in ("429", "500"):
            return self._reply(int(kind), {"detail": "injected"}, {"Retry-After": "0"} if kind == "429" else {})
        if kind == "drop-before":  # what `LabelStudio.api` makes of a dropped connection
            raise Transient(f"{method} {path}: ConnectionError (injected, before applying)")
        status, body = self._apply(method, path, params or {}, json)
        if kind == "500-after":
            return self._reply(500, {"detail": "injected after applying"})
        if kind == "drop-after":
            raise Transient(f"{method} {path}: ConnectionError (injected, after applying)")
        return self._reply(status, body)

    def _reply(self, status: int, body, headers=None) -> Reply:
        return Reply(status, headers or {}, json.dumps(body).encode(), self.base)

    def _apply(self, method: str, path: str, params: dict, body):
        parts = path.strip("/").split("/")
        with self._lock:
            if method == "GET" and parts[:2] == ["api", "projects"] and len(parts) == 3:
                return 200, {"id": int(parts[2]), "label_config": self.label_config}
            if method == "GET" and path == "/api/tasks":
                ids = sorted(self.tasks)
                page, size = int(params.get("page", 1)), int(params.get("page_size", 100))
                chunk = ids[(page - 1) * size: page * size]
                if not chunk and page > 1:
                    return 404, {"detail": "Invalid page."}
                return 200, {"tasks": [{"id": t, "total_annotations": sum(not a.get("was_cancelled")
                                                                          for a in self.annotations[t]),
                                        "cancelled_annotations": sum(bool(a.get("was_cancelled"))
                                                                     for a in self.annotations[t])}
                                       for t in chunk]}
            if method == "GET" and parts[:2] == ["api", "tasks"] and len(parts) == 3:
                tid = int(parts[2])
                if tid not in self.tasks:
                    return 404, {"detail": "Not found."}
                return 200, {**self.tasks[tid], "annotations": list(self.annotations[tid]),
                             "predictions": [dict(p) for p in self.of(tid)]}
            if method == "GET" and path == "/api/ml":
                return 200, [dict(m) for m in self.ml_backends]
            if method == "GET" and path == "/api/predictions/":
                return 200, [dict(p) for p in self.of(int(params["task"]))]
            if method == "POST" and parts[-2:] == ["import", "predictions"]:
                for p in body:
                    if p["task"] not in self.tasks:
                        return 400, {"detail": f"task {p['task']} does not exist"}
                for p in body:
                    self.add_prediction(p["task"], p["model_version"], p.get("result"))
                return 201, {"created": len(body)}
            if method == "DELETE" and parts[:2] == ["api", "predictions"]:
                return (204, {}) if self.predictions.pop(int(parts[2]), None) else (404, {"detail": "Not found."})
        return 404, {"detail": f"no route {method} {path}"}
