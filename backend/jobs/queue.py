"""rq: jobs run by workers on any number of machines, sharing one Redis.

A planner rq job per label job enqueues one rq job per chunk of tasks. Chunks carry retries, so a chunk whose
worker died (SIGKILL, machine restart) is run again by another worker once its heartbeat lapses. That second
run is harmless even when the first is alive after all (paused past its heartbeat): tasks are claimed in the
store with fencing tokens, and finished chunks are a set (`runner`).
"""
from __future__ import annotations

import logging

from ..config import Settings
from ..labelstudio import client
from ..sam3.model import Sam3Model
from . import runner
from .lifecycle import Context, fail
from .redis_store import RedisStore

log = logging.getLogger(__name__)


_context: Context | None = None


def worker_context(load: bool = True) -> Context:
    """This worker process's context: the model loads once, on first use (or by `worker`)."""
    global _context
    if _context is None:
        settings = Settings.from_env(bulk=True)
        _context = Context(settings, Sam3Model(settings), RedisStore.from_settings(settings), client.api(settings))
    if load and _context.sam3.state != "ready":
        _context.sam3.load()
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
    fail(RedisStore(connection), label_job, f"{job.description} failed after retries: "
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
