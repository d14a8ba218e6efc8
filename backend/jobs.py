"""Bulk auto-label jobs: walk a Label Studio project, label each task, post each prediction exactly once.

A job is planned once (which tasks, in chunks) and its chunks run anywhere: in order in one thread, or
as rq jobs on many workers (`backend.dispatch`). State lives in a store (`backend.store`), so the
counters add up across chunks and a chunk that runs again skips what it already finished.

Exactly once, per task and model_version:
- a task with a prediction of this model_version is skipped (read fresh just before labelling it);
- with `overwrite`, this backend's earlier predictions are deleted before the new one is posted;
- a post that may have been applied (5xx, dropped connection) is followed by a look at the task before
  it is posted again; a task finished by this job is never looked at again by it.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

from .config import Settings, parse_bool
from .errors import BackendError
from .labelstudio import LabelStudioAPI
from .model import SAM3Backend
from .runtime import Runtime
from .autolabel import Stages
from .retry import Backoff, Transient
from .store import ACTIVE, STATUSES

log = logging.getLogger(__name__)
DRY_RUN_LIMIT = 10


class Skip(Exception):
    """The task needs no prediction (annotated, or already predicted by this model_version)."""


@dataclass
class Context:
    """What running a job needs: settings, the model, the job store and a Label Studio connection."""

    settings: Settings
    runtime: Runtime
    store: object
    api: LabelStudioAPI | None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    heartbeat: Callable[[], None] = lambda: None  # tells rq this worker is alive (see dispatch.Worker)
    _job_backend: tuple[str, SAM3Backend] | None = None  # (job id, its backend): chunks of one job share it

    def require_api(self) -> LabelStudioAPI:
        if self.api is None:
            raise BackendError("this worker has no Label Studio connection: set LABEL_STUDIO_URL and "
                               "LABEL_STUDIO_API_KEY in its environment")
        return self.api


def _now() -> float:
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
    backend = _backend(settings, runtime, api, config if isinstance(config, str) else "", req)
    job_id = uuid.uuid4().hex[:12]
    fields = {
        "id": job_id,
        "status": "queued",
        "project": req["project"],
        "model_version": backend.model_version,
        # Resolved here, so every worker labels with exactly these whatever its own environment says.
        "request": {**{k: v for k, v in req.items() if k != "project"},
                    "ontology": [asdict(e) for e in backend.ontology], "thresholds": asdict(backend.thresholds)},
        "label_config": config,
        "created_at": _now(),
    }
    store.create(job_id, fields)
    return store.get(job_id)


def _backend(settings, runtime, api, label_config: str, req: dict) -> SAM3Backend:
    if not label_config.strip():
        raise BackendError("the project has no label config")
    extra = {"ontology": req.get("ontology"), "thresholds": req.get("thresholds")}
    backend = SAM3Backend(label_config=label_config, extra_params=extra, settings=settings, runtime=runtime,
                          hostname=api.ls.url if api else "", access_token=api.ls.token if api else "")
    if not backend.ontology:
        raise BackendError("nothing to label: the project's output controls carry no labels")
    # Nobody waits on a job's image: it may retry as long as the API calls do.
    backend.loader.backoff = Backoff(max(settings.fetch_retries, settings.api_retries))
    return backend


def view(job: dict) -> dict:
    """The job as GET /jobs shows it: counters, rate, ETA, ISO times; no internals."""
    out = {k: v for k, v in job.items() if k != "label_config"}
    started, ended = job.get("started_at"), job.get("finished_at")
    if started:
        elapsed = (ended or _now()) - started
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
    if not store.transition(job_id, ACTIVE, status="cancelled", cancelled_at=_now(), finished_at=_now()):
        raise BackendError(f"job {job_id} is {store.get(job_id)['status']}; only queued or running jobs can be "
                           "cancelled", 409)
    return store.get(job_id)


def fail(store, job_id: str, message: str) -> None:
    log.error("job %s failed: %s", job_id, message)
    store.add_error(job_id, None, message)
    store.transition(job_id, ACTIVE, status="failed", error=message, finished_at=_now())


def check_status(status: str | None) -> str | None:
    if status and status not in STATUSES:
        raise BackendError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
    return status or None


# ---- planning ------------------------------------------------------------------------------------
def plan(ctx: Context, job_id: str) -> list[list[int]]:
    """Which tasks to label, in chunks; annotated tasks are skipped here. Idempotent: a second call
    (an rq retry of the planner) returns the chunks the first one stored."""
    store = ctx.store
    job = store.get(job_id)
    if job is None or job["status"] not in ACTIVE:
        return []
    stored = store.chunks(job_id)
    if stored is not None:
        return stored
    store.transition(job_id, ("queued",), status="running", started_at=_now())
    req = job["request"]
    wanted = set(req["tasks"]) if req["tasks"] else None
    seen, todo, skipped = set(), [], {}
    for tid, annotated in ctx.require_api().task_ids(job["project"]):
        if wanted is not None and tid not in wanted:
            continue
        seen.add(tid)
        if annotated:
            skipped[tid] = 0  # human work is never touched
        else:
            todo.append(tid)
    missing = sorted(wanted - seen) if wanted else []
    if req["limit"]:
        todo = todo[: req["limit"]]
    size = 10**9 if req["dry_run"] else (req["chunk_size"] or ctx.settings.job_chunk)
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    store.finish(job_id, "skipped", skipped)
    for tid in missing:
        store.add_error(job_id, tid, f"task {tid} is not in project {job['project']}")
    store.finish(job_id, "failed", {t: 0 for t in missing})
    store.set(job_id, total=len(skipped) + len(todo) + len(missing), chunks_total=len(chunks))
    store.set_chunks(job_id, chunks)  # last: its presence marks the plan complete
    log.info("job %s: %d tasks to label in %d chunks, %d skipped (annotated), %d not found", job_id, len(todo),
             len(chunks), len(skipped), len(missing))
    if not chunks:
        _finish(store, job_id)
    return chunks


# ---- running a chunk -----------------------------------------------------------------------------
def run_chunk(ctx: Context, job_id: str, task_ids: list[int]) -> Stages | None:
    """Label the chunk's tasks and post their predictions; stops early when the job is cancelled.

    Returns the seconds spent per stage (None when there was nothing to do)."""
    store = ctx.store
    job = store.get(job_id)
    if job is None or job["status"] not in ACTIVE:
        return None  # cancelled or failed while this chunk waited
    api = ctx.require_api()
    if ctx._job_backend is None or ctx._job_backend[0] != job_id:
        ctx._job_backend = job_id, _backend(ctx.settings, ctx.runtime, api, job["label_config"], job["request"])
    backend = ctx._job_backend[1]
    if backend.model_version != job["model_version"]:
        fail(store, job_id, f"worker {ctx.worker} has checkpoint {ctx.settings.model!r} "
                            f"(model_version {backend.model_version}); the job needs {job['model_version']}")
        return None
    req, mv = job["request"], job["model_version"]
    own_prefix = ctx.runtime.model_version
    done = store.done(job_id)
    todo = [t for t in task_ids if t not in done]
    fetched: dict[int, dict] = {}

    def load(tid, image):
        if tid not in fetched:  # read once per task, however many images it has
            fetched[tid] = api.task(tid)
        task = fetched[tid]
        if task.get("annotations"):
            raise Skip("annotated")
        if not req["overwrite"] and _has_prediction(task, mv):
            raise Skip("already predicted by this model_version")
        return backend.load_task_image(task, image)

    pending: dict[int, dict] = {}
    cancelled = False
    # Posting runs on its own thread, one batch at a time and in order, while the model labels the next
    # tasks; "upload" counts only the time the model waited for it.
    labeler = backend.auto_labeler(ctx.runtime.wait(timeout=600))
    poster = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam3-post")
    in_flight: list[Future] = []

    def flush(wait: bool = False) -> None:
        t0 = time.perf_counter()
        if in_flight:
            _wait(in_flight.pop(), ctx)  # its errors surface here
        if pending:
            batch = dict(pending)
            pending.clear()
            in_flight.append(poster.submit(_save, ctx, job, {t: fetched[t] for t in batch}, batch, own_prefix))
        if wait and in_flight:
            _wait(in_flight.pop(), ctx)
        labeler.stages.add("upload", time.perf_counter() - t0)

    try:
        for task_id, _, prediction, error in backend.label_tasks(labeler, todo, load):
            ctx.heartbeat()
            if isinstance(error, Skip):
                store.finish(job_id, "skipped", {task_id: 0}, ctx.worker)
            elif error is not None:
                store.add_error(job_id, task_id, getattr(error, "message", None) or f"{type(error).__name__}: {error}")
                log.warning("job %s: task %s failed: %s", job_id, task_id, error)
                store.finish(job_id, "failed", {task_id: 0}, ctx.worker)
            else:
                pending[task_id] = prediction
            if len(pending) >= ctx.settings.post_batch:
                flush()
            if store.status(job_id) not in ACTIVE:
                cancelled = True  # the task in hand is finished: post it, then stop
                break
        flush(wait=True)
    finally:
        poster.shutdown(wait=True)  # a post in flight completes: nothing is left half-done
    log.info("job %s: chunk of %d tasks, seconds per stage: %s", job_id, len(todo), labeler.stages)
    if cancelled:
        log.info("job %s: chunk stopped, the job was cancelled", job_id)
        return labeler.stages
    if store.incr(job_id, "chunks_done") >= store.get(job_id)["chunks_total"]:
        _finish(store, job_id)
    return labeler.stages


def _finish(store, job_id: str) -> None:
    """The last chunk is done: succeeded, unless every task it tried failed (then the errors say why)."""
    job = store.get(job_id)
    status = "failed" if job["failed"] and not job["predicted"] and not job["skipped"] else "succeeded"
    fields = {"error": "every task failed; see errors"} if status == "failed" else {}
    if store.transition(job_id, ("running",), status=status, finished_at=_now(), **fields):
        log.info("job %s %s: %s", job_id, status,
                 {k: job[k] for k in ("total", "predicted", "skipped", "failed", "regions_added")})


def _save(ctx: Context, job: dict, tasks: dict[int, dict], predictions: dict[int, dict], own_prefix: str) -> None:
    """Post a batch of predictions (or keep them, for a dry run) and record each task's outcome."""
    store, job_id, req, mv = ctx.store, job["id"], job["request"], job["model_version"]
    if req["dry_run"]:
        results = store.get(job_id).get("predictions") or []
        store.set(job_id, predictions=results + [{"task": t, **p} for t, p in predictions.items()])
        store.finish(job_id, "predicted", {t: len(p["result"]) for t, p in predictions.items()}, ctx.worker)
        return
    api = ctx.require_api()
    if req["overwrite"]:
        _delete_own(api, list(tasks.values()), mv, own_prefix)
    posted, failed = post_predictions(api, job["project"], mv, predictions, Backoff(ctx.settings.api_retries))
    store.finish(job_id, "predicted", posted, ctx.worker)
    for tid, message in failed.items():
        store.add_error(job_id, tid, message)
    store.finish(job_id, "failed", {t: 0 for t in failed}, ctx.worker)


def _wait(future: Future, ctx: Context) -> None:
    """The post's result, telling rq this worker is alive while Label Studio takes its time."""
    while True:
        try:
            return future.result(timeout=10)
        except FutureTimeout:
            ctx.heartbeat()


def run_all(ctx: Context, job_id: str) -> None:
    """Plan and run every chunk here, in order (the embedded runner and `label-studio-sam3 label`)."""
    try:
        for chunk in plan(ctx, job_id):
            run_chunk(ctx, job_id, chunk)
    except BackendError as e:
        fail(ctx.store, job_id, e.message)
    except Transient as e:
        fail(ctx.store, job_id, f"Label Studio kept failing: {e}")
    except Exception as e:  # the job fails; the process serving it goes on
        log.exception("job %s crashed", job_id)
        fail(ctx.store, job_id, f"internal error ({type(e).__name__}: {e}); see the log")


# ---- posting -------------------------------------------------------------------------------------
def post_predictions(api: LabelStudioAPI, project: int, mv: str, predictions: dict[int, dict],
                     backoff: Backoff) -> tuple[dict[int, int], dict[int, str]]:
    """Bulk-import predictions; returns ({task: regions} posted, {task: error} given up on).

    Before each retry it looks at which tasks now hold a prediction of `mv` (the failed attempt may have
    been stored) and posts only the others, so nothing is posted twice.
    """
    remaining = dict(predictions)
    posted: dict[int, int] = {}
    last = ""
    for attempt in range(1, backoff.attempts + 1):
        try:
            api.import_predictions(project, [{"task": t, **p} for t, p in remaining.items()])
            posted.update({t: len(p["result"]) for t, p in remaining.items()})
            return posted, {}
        except BackendError as e:  # refused outright: find the task(s) it refuses
            if len(remaining) == 1:
                return posted, {t: f"Label Studio refused the prediction: {e.message}" for t in remaining}
            failed = {}
            for t, p in remaining.items():
                one_posted, one_failed = post_predictions(api, project, mv, {t: p}, backoff)
                posted.update(one_posted)
                failed.update(one_failed)
            return posted, failed
        except Transient as e:
            last = str(e)
            if attempt == backoff.attempts:
                break
            time.sleep(backoff.delay(attempt, e.after))
        try:
            for t in list(remaining):
                if _has_prediction(api.task(t), mv):
                    posted[t] = len(remaining.pop(t)["result"])
        except (Transient, BackendError) as e:
            # Cannot tell what was stored: posting again could duplicate. A later run finishes them.
            return posted, {t: f"could not verify the prediction was stored: {e}" for t in remaining}
        if not remaining:
            return posted, {}
    return posted, {t: f"gave up posting after {backoff.attempts} attempts: {last}" for t in remaining}


def _has_prediction(task: dict, mv: str) -> bool:
    return any(p.get("model_version") == mv for p in task.get("predictions") or [])


def _delete_own(api: LabelStudioAPI, tasks: list[dict], mv: str, own_prefix: str) -> None:
    """Delete this backend's earlier predictions (same checkpoint) of these tasks; others stay."""
    for task in tasks:
        for p in task.get("predictions") or []:
            version = str(p.get("model_version") or "")
            if version == mv or version == own_prefix or version.startswith(own_prefix + "-"):
                api.delete_prediction(p["id"])
