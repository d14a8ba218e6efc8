"""Where jobs run: one background thread of the service (no Redis), or rq workers on any machines.

rq layout: a planner job per label job, which enqueues one rq job per chunk of tasks. Chunks carry
retries, so a chunk whose worker died (SIGKILL, machine restart) is run again by another worker once
its heartbeat lapses. That second run is harmless even when the first is alive after all (paused past its
heartbeat): tasks are claimed in the store, and finished chunks are a set (`backend.runner`).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path

from . import jobs, labelstudio, runner
from .config import Settings
from .labelstudio import LabelStudioAPI
from .runtime import Runtime
from .store import RedisStore

log = logging.getLogger(__name__)


def redis_store(settings: Settings) -> RedisStore:
    from redis import Redis

    return RedisStore(Redis.from_url(settings.redis_url))


class EmbeddedRunner:
    """Jobs of this service, one at a time, in one daemon thread, in the order they came."""

    def __init__(self, settings: Settings, runtime: Runtime, store):
        self.settings, self.runtime, self.store = settings, runtime, store
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job_id: str, api: LabelStudioAPI) -> None:
        self._queue.put((job_id, api))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sam3-jobs", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            job_id, api = self._queue.get()
            runner.run_all(jobs.Context(self.settings, self.runtime, self.store, api), job_id)


# ---- rq ----------------------------------------------------------------------------------------
_context: jobs.Context | None = None


def worker_context(load: bool = True) -> jobs.Context:
    """This worker process's context: the model loads once, on first use (or by `worker`)."""
    global _context
    if _context is None:
        settings = Settings.from_env()
        api = labelstudio.api_for(settings, labelstudio.connect(settings))
        _context = jobs.Context(settings, Runtime(settings), redis_store(settings), api)
    if load and _context.runtime.state != "ready":
        _context.runtime.load()
    return _context


def enqueue(settings: Settings, redis, job_id: str) -> None:
    from rq import Callback, Queue, Retry

    Queue(settings.queue, connection=redis).enqueue(
        plan_job, job_id, job_id=f"sam3-{job_id}-plan", job_timeout=3600, retry=Retry(max=2),
        on_failure=Callback(on_failure), description=f"plan label job {job_id}",
    )


def plan_job(job_id: str) -> int:
    from rq import Callback, Queue, Retry
    from rq.job import Job

    ctx = worker_context()
    chunks = runner.plan(ctx, job_id)
    q = Queue(ctx.settings.queue, connection=ctx.store.r)
    for i, chunk in enumerate(chunks):
        rq_id = f"sam3-{job_id}-{i}"
        if Job.exists(rq_id, connection=ctx.store.r):
            continue  # enqueued by an earlier run of this planner (a chunk queued twice is harmless)
        q.enqueue(chunk_job, job_id, i, chunk, job_id=rq_id, job_timeout=max(600, 60 * len(chunk)),
                  retry=Retry(max=3), on_failure=Callback(on_failure),
                  description=f"label job {job_id}: chunk {i + 1}/{len(chunks)} ({len(chunk)} tasks)")
    return len(chunks)


def chunk_job(job_id: str, index: int, task_ids: list[int]) -> None:
    runner.run_chunk(worker_context(), job_id, index, task_ids)


def on_failure(job, connection, exc_type, exc_value, tb) -> None:
    """rq gave up on a planner or chunk (it raised, or its worker died) and will not retry it."""
    if job.retries_left:
        log.warning("rq job %s failed (%s); rq will retry it", job.id, exc_type.__name__ if exc_type else "?")
        return
    label_job = job.args[0]
    jobs.fail(RedisStore(connection), label_job, f"{job.description} failed after retries: "
                                                 f"{exc_type.__name__ if exc_type else ''} {exc_value or ''}".strip())


def make_worker(settings: Settings, redis, name: str | None = None):
    """An rq worker that runs jobs in this process (the model stays loaded; CUDA is never forked)."""
    from rq import SimpleWorker

    class Worker(SimpleWorker):
        def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
            return settings.job_heartbeat  # short: a dead worker's chunk is retried within this

        def beat(self) -> None:
            job, execution = self.get_current_job(), getattr(self, "execution", None)
            if job is not None and execution is not None:
                self.maintain_heartbeats(job, execution)

    worker = Worker([settings.queue], connection=redis, name=name, worker_ttl=max(60, settings.job_heartbeat),
                    maintenance_interval=max(1, settings.job_heartbeat // 2))
    return worker


# ---- a worker's health, for its container -------------------------------------------------------
HEALTH_FILE = Path(tempfile.gettempdir()) / "label-studio-sam3-worker.json"
HEALTH_EVERY = 10.0  # seconds between reports; a report older than 3 of these means the worker is stuck or gone


class HealthReport:
    """A worker's state where `label-studio-sam3 health --worker` reads it: its model's state and whether it
    reaches Redis, written every HEALTH_EVERY seconds by a side thread (a worker serves no HTTP to probe)."""

    def __init__(self, runtime: Runtime, redis, path: Path = HEALTH_FILE):
        self.runtime, self.redis, self.path = runtime, redis, path
        self._stop = threading.Event()

    def start(self) -> "HealthReport":
        self.write()
        threading.Thread(target=self._run, name="sam3-health", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self.path.unlink()
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(HEALTH_EVERY):
            self.write()

    def write(self) -> None:
        try:
            self.redis.ping()
            redis = "ok"
        except Exception as e:  # reported, not raised: the worker itself retries
            redis = f"{type(e).__name__}: {e}"[:300]
        report = {"pid": os.getpid(), "at": time.time(), "model_state": self.runtime.state,
                  "model_error": self.runtime.error or None, "redis": redis}
        try:
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}")
            tmp.write_text(json.dumps(report))
            tmp.replace(self.path)  # whole or not at all: the reader never sees half a report
        except OSError as e:
            log.warning("cannot write the health report %s: %s", self.path, e)


def read_health(path: Path = HEALTH_FILE) -> tuple[bool, str]:
    """(healthy, why) from a worker's report: fresh, its model loaded, Redis reachable."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return False, "no worker health report here (is `label-studio-sam3 worker` running in this container?)"
    except (OSError, ValueError) as e:
        return False, f"unreadable health report {path}: {e}"
    age = time.time() - float(report.get("at") or 0)
    if age > 3 * HEALTH_EVERY:
        return False, f"the worker's last report is {age:.0f} s old: it is stuck or gone"
    if report.get("redis") != "ok":
        return False, f"the worker cannot reach Redis: {report.get('redis')}"
    if report.get("model_state") != "ready":
        return False, f"model {report.get('model_state')}: {report.get('model_error') or 'loading'}"
    return True, "ready: connected to Redis, model loaded"
