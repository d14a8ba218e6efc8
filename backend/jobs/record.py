"""What a job is: its status (`JobStatus`), the request it was made from (`JobRequest`, checked field by
field), its record (`Job`: identity, counters, times), and the view `GET /jobs` shows."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum

from ..errors import BackendError
from ..validate import number, parse_bool, whole

DRY_RUN_LIMIT = 10  # tasks a dry run labels when it names no limit
COUNTERS = ("total", "processed", "predicted", "skipped", "failed", "regions_added", "chunks_total", "frames",
            "duplicates_removed")


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in ACTIVE

    @classmethod
    def parse(cls, text: str | None) -> "JobStatus | None":
        """A `?status=` filter: None for none, BackendError (400) naming the statuses for an unknown one."""
        if not text:
            return None
        try:
            return cls(text)
        except ValueError:
            raise BackendError(f"unknown status {text!r}; one of {', '.join(s.value for s in cls)}") from None


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
FINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass
class JobRequest:
    """A job request with every field checked (`parse`); `ontology`, `thresholds`, `outline` and `tiling` are resolved
    against the project when the job is created, so every worker labels exactly the same way."""

    tasks: list[int] | None = None  # None: the whole project
    ontology: object = None
    thresholds: dict | None = None
    outline: dict | None = None
    tiling: object = None  # as extra params take it; resolved to `Tiling.spec()` when the job is created
    limit: int | None = None
    overwrite: bool = False
    dry_run: bool = False
    chunk_size: int | None = None
    mode: str = "label"  # label: post predictions; evaluate: compare with the annotations, post nothing
    iou: float = 0.5  # evaluate: the mask IoU a detection needs to match an annotation
    target_precision: float | None = None  # evaluate: recommend the lowest threshold that reaches it
    seed: int = 0  # evaluate: which `limit` annotated tasks are sampled
    extra_params_from: str | None = None  # where the ontology and thresholds came from (set when created)

    FIELDS = ("project", "ontology", "thresholds", "tiling", "tasks", "limit", "overwrite", "dry_run", "chunk_size", "mode",
              "iou", "target_precision", "seed")
    MODES = ("label", "evaluate")

    @classmethod
    def parse(cls, body, max_tasks: int = 10000) -> tuple[int, "JobRequest"]:
        """(project id, request) from a `POST /jobs` body; BackendError naming every problem found first."""
        if not isinstance(body, dict):
            raise BackendError("request body must be a JSON object")
        unknown = set(body) - set(cls.FIELDS)
        if unknown:
            raise BackendError(f"unknown job field(s) {sorted(str(u)[:50] for u in unknown)[:10]}; known: "
                               f"{sorted(cls.FIELDS)}")
        project = body.get("project")
        if not whole(project, 1, 10**15) and not (isinstance(project, str) and project.isascii()
                                                  and project.isdigit() and len(project) <= 15):
            raise BackendError("'project' must be a Label Studio project id (a number)")
        tasks = body.get("tasks")
        if tasks is not None:
            if not isinstance(tasks, list) or not tasks or not all(whole(t, 1, 10**15) for t in tasks):
                raise BackendError("'tasks' must be a non-empty list of task ids, or null for the whole project")
            if len(tasks) > max_tasks:
                raise BackendError(f"'tasks' names {len(tasks)} tasks; at most {max_tasks} (SAM3_MAX_JOB_TASKS) in one "
                                   "job: split the list, or leave 'tasks' out to label the whole project", 413)
        req = cls(tasks=sorted(set(tasks)) if tasks else None, ontology=body.get("ontology"),
                  thresholds=body.get("thresholds"), tiling=body.get("tiling"))
        for name in ("overwrite", "dry_run"):
            try:
                value = body.get(name)
                setattr(req, name, parse_bool(False if value is None else value, name))
            except ValueError:
                raise BackendError(f"'{name}' must be true or false") from None
        for name, most in (("limit", 10**9), ("chunk_size", 100000)):
            value = body.get(name)
            if value is not None and not whole(value, 1, most):
                raise BackendError(f"'{name}' must be a whole number from 1 to {most}, or null")
            setattr(req, name, value)
        req._parse_evaluation(body)
        if req.dry_run and req.limit is None:
            req.limit = DRY_RUN_LIMIT
        return int(project), req

    def _parse_evaluation(self, body: dict) -> None:
        mode = body.get("mode") or "label"
        if mode not in self.MODES:
            raise BackendError(f"'mode' must be one of {', '.join(self.MODES)}")
        self.mode = mode
        for name, least in (("iou", 0.0), ("target_precision", 0.0)):
            value = body.get(name)
            if value is None:
                continue
            if mode != "evaluate":
                raise BackendError(f"'{name}' is for \"mode\": \"evaluate\"")
            v = number(value, f"'{name}'")
            if not least < v <= 1:
                raise BackendError(f"'{name}' must be above {least:g} and at most 1")
            setattr(self, name, v)
        seed = body.get("seed")
        if seed is not None and not whole(seed, 0, 2**31):
            raise BackendError("'seed' must be a whole number from 0")
        self.seed = seed or 0
        if mode == "evaluate" and (self.overwrite or self.dry_run):
            raise BackendError("an evaluation posts nothing: 'overwrite' and 'dry_run' are for label jobs")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobRequest":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass
class Job:
    """A job's record as a store keeps it. `scope` ("<project>:<model_version>") is what its task claims and
    its one-active-job lock are about; `lock` is the scope it locked (None for a dry run, which posts nothing)."""

    id: str
    status: JobStatus
    project: int
    model_version: str
    request: JobRequest
    label_config: str
    created_at: float
    scope: str
    lock: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    cancelled_at: float | None = None
    error: str | None = None
    predictions: list | None = None  # a dry run's, instead of posting them
    total: int = 0
    processed: int = 0
    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    regions_added: int = 0
    chunks_total: int = 0
    frames: int = 0
    duplicates_removed: int = 0
    chunks_done: int = 0
    errors: list[dict] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)

    STORED = ("id", "status", "project", "model_version", "request", "label_config", "created_at", "scope", "lock",
              "started_at", "finished_at", "cancelled_at", "error", "predictions", *COUNTERS)

    def stored(self) -> dict:
        """The fields a store keeps (plain JSON values); counts from other tables are the store's own."""
        out = {name: getattr(self, name) for name in self.STORED}
        out["status"], out["request"] = self.status.value, self.request.to_dict()
        return out

    @classmethod
    def from_stored(cls, data: dict, chunks_done: int = 0, errors=(), workers=None) -> "Job":
        kept = {k: v for k, v in data.items() if k in cls.STORED}
        kept["status"] = JobStatus(kept["status"])
        kept["request"] = JobRequest.from_dict(kept.get("request") or {})
        return cls(**kept, chunks_done=chunks_done, errors=list(errors), workers=dict(workers or {}))

    @property
    def active(self) -> bool:
        return self.status.active


def now() -> float:
    return time.time()


def view(job: Job) -> dict:
    """The job as GET /jobs shows it: counters, rate, ETA, ISO times; no internals."""
    out = {k: v for k, v in job.stored().items() if k not in ("label_config", "lock")}
    out.update(mode=job.request.mode, chunks_done=job.chunks_done, errors=job.errors, workers=job.workers)
    if job.request.mode == "evaluate":  # its figures, once it succeeded; the page at once
        out["report_url"] = f"/jobs/{job.id}/report"
    if job.predictions is None:
        del out["predictions"]
    for key in ("started_at", "finished_at", "cancelled_at", "error"):
        if out[key] is None:
            del out[key]
    if job.started_at:
        elapsed = (job.finished_at or now()) - job.started_at
        rate = job.processed / elapsed if elapsed > 0 else 0.0
        out["elapsed_seconds"] = round(elapsed, 1)
        out["tasks_per_second"] = round(rate, 3)
        left = max(job.total - job.processed, 0)
        out["eta_seconds"] = round(left / rate, 1) if rate > 0 and job.active else None
    for key in ("created_at", "started_at", "finished_at", "cancelled_at"):
        if out.get(key):
            out[key] = datetime.fromtimestamp(out[key], timezone.utc).isoformat(timespec="seconds")
    return out
