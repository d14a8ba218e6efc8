"""A label job's record and lifecycle: the request, creating it (one active job per project and
model_version), its view, cancel and fail. Running it is `backend.runner`; posting, `backend.poster`.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

from .config import Settings, parse_bool
from .errors import BackendError
from .labelstudio import LabelStudioAPI
from .model import SAM3Backend
from .retry import Backoff, Transient
from .runtime import Runtime
from .store import ACTIVE, STATUSES

log = logging.getLogger(__name__)
DRY_RUN_LIMIT = 10


@dataclass
class Context:
    """What running a job needs: settings, the model, the job store and a Label Studio connection."""

    settings: Settings
    runtime: Runtime
    store: object
    api: LabelStudioAPI | None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    heartbeat: Callable[[], None] = lambda: None  # tells rq this worker is alive (see dispatch.Worker)
    job_backend: tuple[str, SAM3Backend] | None = None  # (job id, its backend): chunks of one job share it

    def require_api(self) -> LabelStudioAPI:
        if self.api is None:
            raise BackendError("this worker has no Label Studio connection: set LABEL_STUDIO_URL and "
                               "LABEL_STUDIO_API_KEY in its environment")
        return self.api


def now() -> float:
    return time.time()


# ---- creating a job ------------------------------------------------------------------------------
def _request(body, max_tasks: int = 10000) -> dict:
    """The job request with types checked; every problem named."""
    if not isinstance(body, dict):
        raise BackendError("request body must be a JSON object")
    known = {"project", "ontology", "thresholds", "tasks", "limit", "overwrite", "dry_run", "chunk_size"}
    unknown = set(body) - known
    if unknown:
        raise BackendError(f"unknown job field(s) {sorted(str(u)[:50] for u in unknown)[:10]}; known: {sorted(known)}")
    project = body.get("project")
    if not _whole(project, 1, 10**15) and not (isinstance(project, str) and project.isascii() and project.isdigit()
                                               and len(project) <= 15):
        raise BackendError("'project' must be a Label Studio project id (a number)")
    tasks = body.get("tasks")
    if tasks is not None:
        if not isinstance(tasks, list) or not tasks or not all(_whole(t, 1, 10**15) for t in tasks):
            raise BackendError("'tasks' must be a non-empty list of task ids, or null for the whole project")
        if len(tasks) > max_tasks:
            raise BackendError(f"'tasks' names {len(tasks)} tasks; at most {max_tasks} (SAM3_MAX_JOB_TASKS) in one "
                               "job: split the list, or leave 'tasks' out to label the whole project", 413)
    out = {"project": int(project), "tasks": sorted(set(tasks)) if tasks else None,
           "ontology": body.get("ontology"), "thresholds": body.get("thresholds")}
    for name in ("overwrite", "dry_run"):
        try:
            value = body.get(name)
            out[name] = parse_bool(False if value is None else value, name)
        except ValueError:
            raise BackendError(f"'{name}' must be true or false") from None
    for name, most in (("limit", 10**9), ("chunk_size", 100000)):
        value = body.get(name)
        if value is not None and not _whole(value, 1, most):
            raise BackendError(f"'{name}' must be a whole number from 1 to {most}, or null")
        out[name] = value
    if out["dry_run"] and out["limit"] is None:
        out["limit"] = DRY_RUN_LIMIT
    return out


def _whole(value, least: int, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


def create(store, api: LabelStudioAPI, settings: Settings, runtime: Runtime, body) -> dict:
    """Validate a job request against the project, store the job (queued) and return it.

    Nothing is stored when the request, the project or its ontology is wrong.
    """
    req = _request(body, settings.max_job_tasks)
    # The caller waits: two quick attempts, and Label Studio's trouble is a 424 (Failed Dependency), not ours.
    quick = LabelStudioAPI(api.ls, Backoff(attempts=2, base=0.5), api.timeout)
    try:
        project = quick.project(req["project"])
    except BackendError as e:
        if e.status == 404:
            raise BackendError(f"project {req['project']} not found in Label Studio at {api.ls.url}", 404) from None
        raise BackendError(e.message, 424) from None
    except Transient as e:
        raise BackendError(f"Label Studio at {api.ls.url} is not answering: {e}", 424) from None
    config = project.get("label_config") if isinstance(project, dict) else None
    backend = backend_for(settings, runtime, api, config if isinstance(config, str) else "", req)
    job_id = uuid.uuid4().hex[:12]
    fields = {
        "id": job_id,
        "status": "queued",
        "project": req["project"],
        "model_version": backend.model_version,
        # Resolved here, so every worker labels with exactly these whatever its own environment says.
        "request": {**{k: v for k, v in req.items() if k != "project"},
                    "ontology": [asdict(e) for e in backend.ontology], "thresholds": asdict(backend.thresholds),
                    "outline": backend.outline},
        "label_config": config,
        "created_at": now(),
        # What claims and the one-active-job lock are about; a dry run posts nothing, so it locks nothing.
        "scope": f"dry-{job_id}" if req["dry_run"] else f"{req['project']}:{backend.model_version}",
    }
    store.create(job_id, fields, scope=None if req["dry_run"] else fields["scope"])
    return store.get(job_id)


def backend_for(settings, runtime, api, label_config: str, req: dict) -> SAM3Backend:
    if not label_config.strip():
        raise BackendError("the project has no label config")
    extra = {"ontology": req.get("ontology"), "thresholds": req.get("thresholds")}
    backend = SAM3Backend(label_config=label_config, extra_params=extra, settings=settings, runtime=runtime,
                          hostname=api.ls.url if api else "", access_token=api.ls.token if api else "",
                          outline=req.get("outline"))
    if not backend.ontology:
        raise BackendError("nothing to label: the project's output controls carry no labels")
    # Nobody waits on a job's image: it may retry as long as the API calls do.
    backend.loader.backoff = Backoff(max(settings.fetch_retries, settings.api_retries))
    return backend


def view(job: dict) -> dict:
    """The job as GET /jobs shows it: counters, rate, ETA, ISO times; no internals."""
    out = {k: v for k, v in job.items() if k not in ("label_config", "lock")}
    started, ended = job.get("started_at"), job.get("finished_at")
    if started:
        elapsed = (ended or now()) - started
        done = job.get("processed", 0)
        rate = done / elapsed if elapsed > 0 else 0.0
        out["elapsed_seconds"] = round(elapsed, 1)
        out["tasks_per_second"] = round(rate, 3)
        left = max(job.get("total", 0) - done, 0)
        out["eta_seconds"] = round(left / rate, 1) if rate > 0 and job["status"] in ACTIVE else None
    for key in ("created_at", "started_at", "finished_at", "cancelled_at"):
        if job.get(key):
            out[key] = datetime.fromtimestamp(job[key], timezone.utc).isoformat(timespec="seconds")
    return out


def cancel(store, job_id: str) -> dict:
    job = store.get(job_id)
    if job is None:
        raise BackendError(f"no job {job_id}", 404)
    if not store.transition(job_id, ACTIVE, status="cancelled", cancelled_at=now(), finished_at=now()):
        raise BackendError(f"job {job_id} is {store.get(job_id)['status']}; only queued or running jobs can be "
                           "cancelled", 409)
    return store.get(job_id)


def fail(store, job_id: str, message: str) -> None:
    log.error("job %s failed: %s", job_id, message)
    store.add_error(job_id, None, message)
    store.transition(job_id, ACTIVE, status="failed", error=message, finished_at=now())


def check_status(status: str | None) -> str | None:
    if status and status not in STATUSES:
        raise BackendError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
    return status or None
