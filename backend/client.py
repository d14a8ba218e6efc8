"""The few Label Studio API calls the jobs make, with retries.

Retries cover what a busy or restarting Label Studio answers: 429 and 5xx (honouring `Retry-After`)
and dropped connections, with exponential backoff. Reads are retried as they are; a write that may
have been applied (a 5xx or a dropped connection after sending) is not retried here: the caller
checks what Label Studio holds first (see `jobs.post_predictions`).
"""
from __future__ import annotations

import logging

import requests

from .errors import BackendError
from .images import LabelStudio
from .retry import RETRY_STATUS, Backoff, Transient, retry_after, with_retries

log = logging.getLogger(__name__)


class LabelStudioAPI:
    """Projects, tasks and predictions of one Label Studio, authenticated as `LabelStudio` does."""

    def __init__(self, ls: LabelStudio, backoff: Backoff | None = None, timeout: float = 60.0):
        if not ls.url:
            raise BackendError("no Label Studio URL: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        self.ls = ls
        self.backoff = backoff or Backoff()
        self.timeout = timeout
        self.session = requests.Session()

    # ---- transport ---------------------------------------------------------------------------
    def once(self, method: str, path: str, **kw) -> requests.Response:
        """One request; Transient on 429/5xx/connection errors, BackendError on other refusals."""
        url = f"{self.ls.url}{path}"
        headers = self.ls.auth_header()  # a failed token refresh raises Transient or BackendError itself
        try:
            resp = self.session.request(method, url, headers=headers, timeout=self.timeout, **kw)
        except requests.RequestException as e:
            raise Transient(f"{method} {path}: {type(e).__name__}") from None
        if resp.status_code in RETRY_STATUS:
            raise Transient(f"{method} {path}: HTTP {resp.status_code}", retry_after(resp))
        if resp.status_code in (401, 403):
            raise BackendError(
                f"Label Studio at {self.ls.url} refused the token ({resp.status_code}) for {path}: "
                "set LABEL_STUDIO_API_KEY to a token of a user with access to the project", 401
            )
        if resp.status_code == 404:
            raise BackendError(f"not found in Label Studio: {path}", 404)
        if resp.status_code >= 400:
            raise BackendError(f"Label Studio answered {resp.status_code} to {method} {path}: {resp.text[:300]}", 502)
        return resp

    def call(self, method: str, path: str, **kw) -> requests.Response:
        return with_retries(lambda: self.once(method, path, **kw), self.backoff, f"{method} {path}")

    # ---- resources ---------------------------------------------------------------------------
    def project(self, project_id: int) -> dict:
        return self.call("GET", f"/api/projects/{int(project_id)}").json()

    def task(self, task_id: int) -> dict:
        """The task with its data, annotations and predictions (each with its model_version)."""
        return self.call("GET", f"/api/tasks/{int(task_id)}").json()

    def task_ids(self, project_id: int, page_size: int = 500):
        """(id, annotations incl. skipped ones) of every task, in id order, page by page.

        `fields=task_only` keeps pages small: no prediction bodies (their model versions are checked
        per task, fresh, just before labelling it).
        """
        page = 1
        while True:
            try:
                resp = self.call("GET", "/api/tasks", params={
                    "project": int(project_id), "page": page, "page_size": page_size, "fields": "task_only",
                })
            except BackendError as e:
                if e.status == 404:  # past the last page
                    return
                raise
            tasks = resp.json().get("tasks", [])
            for t in tasks:
                annotated = int(t.get("total_annotations") or 0) + int(t.get("cancelled_annotations") or 0)
                yield int(t["id"]), annotated
            if len(tasks) < page_size:
                return
            page += 1

    def import_predictions(self, project_id: int, predictions: list[dict]) -> int:
        """One attempt (the caller reconciles before retrying); returns how many Label Studio created."""
        resp = self.once("POST", f"/api/projects/{int(project_id)}/import/predictions", json=predictions)
        return int((resp.json() or {}).get("created", len(predictions)))

    def delete_prediction(self, prediction_id: int) -> None:
        try:
            self.call("DELETE", f"/api/predictions/{int(prediction_id)}")
        except BackendError as e:
            if e.status != 404:  # already gone is what we wanted
                raise
