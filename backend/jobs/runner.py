"""The run loop of a label job: plan it, run its chunks, finish it; the same loop for the embedded runner and
for rq workers.

A chunk run claims its tasks in the store before labelling them (a lease with a fencing token, renewed by the
`Heartbeat`, which also tells rq the worker is alive), re-checks its claims right before posting, and returns
only when every task of the chunk is finished by someone: a second run of the same chunk (rq retrying a worker
it thought dead) waits for the first instead of labelling a task again. Finished chunks are a set, so a chunk
that finishes twice counts once, and the job succeeds only when every chunk is finished.
"""
from __future__ import annotations

import logging
import random
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from ..annotate.autolabel import Stages
from ..annotate.labeller import Labeller
from ..annotate.project import Project
from ..annotate.task import Task
from ..errors import BackendError, Skip
from ..labelstudio.retry import Backoff, Transient
from ..sam3.model import JOB_WAIT
from . import evaluation, poster
from .evaluation import EvaluationRun
from .heartbeat import Heartbeat
from .lifecycle import Context, fail
from .record import ACTIVE, Job, JobStatus, now

log = logging.getLogger(__name__)


# ---- planning ------------------------------------------------------------------------------------
def plan(ctx: Context, job_id: str) -> list[list[int]]:
    """Which tasks to label, in chunks; annotated tasks are skipped here. Idempotent: a second call
    (an rq retry of the planner) returns the chunks the first one stored."""
    store = ctx.store
    job = store.get(job_id)
    if job is None or not job.active:
        return []
    stored = store.chunks(job_id)
    if stored is not None:
        return stored
    store.transition(job_id, (JobStatus.QUEUED,), status=JobStatus.RUNNING, started_at=now())
    req = job.request
    wanted = set(req.tasks) if req.tasks else None
    seen, todo, skipped = set(), [], {}
    evaluate = req.mode == "evaluate"
    with Heartbeat(ctx):  # paging through a large project takes a while
        for tid, annotated in ctx.require_api().task_ids(job.project):
            if wanted is not None and tid not in wanted:
                continue
            seen.add(tid)
            if bool(annotated) == evaluate:
                todo.append(tid)  # a label job labels what no person has; an evaluation compares with them
            elif not evaluate:
                skipped[tid] = 0  # human work is never touched
    missing = sorted(wanted - seen) if wanted else []
    if evaluate and not todo:
        raise BackendError(f"project {job.project} has no annotated tasks to evaluate against"
                           + (" among the tasks asked for" if wanted else ""))
    if req.limit and evaluate:
        todo = sorted(random.Random(req.seed).sample(todo, min(req.limit, len(todo))))  # a sample, repeatable
    elif req.limit:
        todo = todo[: req.limit]
    size = 10**9 if req.dry_run else (req.chunk_size or ctx.settings.job_chunk)
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    store.finish(job_id, "skipped", skipped)
    for tid in missing:
        store.add_error(job_id, tid, f"task {tid} is not in project {job.project}")
    store.finish(job_id, "failed", {t: 0 for t in missing})
    store.set(job_id, total=len(skipped) + len(todo) + len(missing), chunks_total=len(chunks))
    store.set_chunks(job_id, chunks)  # last: its presence marks the plan complete
    log.info("job %s: %d tasks to label in %d chunks, %d skipped (annotated), %d not found", job_id, len(todo),
             len(chunks), len(skipped), len(missing))
    if not chunks:
        finish(ctx, job_id)
    return chunks


# ---- running a chunk -----------------------------------------------------------------------------
def run_chunk(ctx: Context, job_id: str, index: int, task_ids: list[int], wait: float = 2.0) -> Stages | None:
    """Label chunk `index` (its tasks `task_ids`) and post its predictions; stops early when the job is cancelled.

    Returns the seconds spent per stage (None when there was nothing to do)."""
    store = ctx.store
    job = store.get(job_id)
    if job is None or not job.active:
        return None  # cancelled or failed while this chunk waited
    project = ctx.project(job)
    if project.model_version != job.model_version:
        fail(store, job_id, f"worker {ctx.worker} has checkpoint {ctx.settings.model!r} "
                            f"(model_version {project.model_version}); the job needs {job.model_version}")
        return None
    labeller = Labeller(project, ctx.sam3.wait(timeout=JOB_WAIT))
    owner = f"{ctx.worker}:{uuid.uuid4().hex[:8]}"  # one per run: two runs in one process are two owners
    with Heartbeat(ctx, job.scope, owner, job_id) as beat:
        while True:
            left = [t for t in task_ids if t not in store.done(job_id)]
            if not left or store.status(job_id) not in ACTIVE:
                break
            mine = sorted(beat.claim(left))
            if mine:
                kind = EvaluationRun if job.request.mode == "evaluate" else ChunkRun
                kind(ctx, job, project, labeller, beat).run(mine)
            else:  # another runner holds them: wait for it to finish them, or for its lease to lapse
                time.sleep(wait)
    log.info("job %s: chunk %d of %d tasks, seconds per stage: %s", job_id, index, len(task_ids), labeller.stages)
    if store.status(job_id) not in ACTIVE:
        log.info("job %s: chunk %d stopped, the job is %s", job_id, index, store.status(job_id).value)
        return labeller.stages
    if store.finish_chunk(job_id, index) >= (store.get(job_id).chunks_total or 0):
        finish(ctx, job_id)
    return labeller.stages


class ChunkRun:
    """Label claimed tasks and post their predictions in batches on a side thread (one batch at a time and in
    order, while the model labels the next tasks); record each task's outcome."""

    def __init__(self, ctx: Context, job: Job, project: Project, labeller: Labeller, beat: Heartbeat):
        self.ctx, self.job, self.project, self.labeller, self.beat = ctx, job, project, labeller, beat
        self.read: dict[int, Task] = {}  # tasks as read from Label Studio, once each
        self.pending: dict[int, dict] = {}
        self.posting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam3-post")
        self.in_flight: list[Future] = []

    def load(self, task: Task, name: str):
        """Read the task (once, fresh, however many images it has), skip it if a person or this model_version
        got there first, then fetch its image or video."""
        job, api = self.job, self.ctx.require_api()
        if task.id not in self.read:
            raw = api.task(task.id)
            # Two runs that shared no store may have both posted it: the rule every run applies, here too.
            removed = poster.remove_duplicates(api, raw, job.model_version)
            if removed:
                self.ctx.store.add(job.id, "duplicates_removed", removed)
            self.read[task.id] = Task.from_json(raw)
        full = self.read[task.id]
        if full.annotations:
            raise Skip("annotated")
        if not job.request.overwrite and poster.has_prediction({"predictions": full.predictions}, job.model_version):
            raise Skip("already predicted by this model_version")
        return self.labeller.load(full, name)

    def run(self, task_ids: list[int]) -> None:
        store, job_id = self.ctx.store, self.job.id
        stopped = lambda: store.status(job_id) not in ACTIVE  # noqa: E731  (a video stops between windows)
        try:
            for out in self.labeller.label([Task(t) for t in task_ids], self.load, cancelled=stopped,
                                           on_frames=lambda n: store.add(job_id, "frames", n)):
                self.record(out.task.id, out.prediction, out.error)
                if len(self.pending) >= self.ctx.settings.post_batch:
                    self.flush()
                if stopped():
                    break  # cancelled: the task in hand is finished, post it, then stop
            self.flush(wait=True)
        finally:
            self.posting.shutdown(wait=True)  # a post in flight completes: nothing is left half-done

    def record(self, task_id: int, prediction: dict | None, error: Exception | None) -> None:
        store, job_id, worker = self.ctx.store, self.job.id, self.ctx.worker
        if isinstance(error, Skip):
            store.finish(job_id, "skipped", {task_id: 0}, worker)
            self.beat.release([task_id])
        elif error is not None:
            store.add_error(job_id, task_id, getattr(error, "message", None) or f"{type(error).__name__}: {error}")
            log.warning("job %s: task %s failed: %s", job_id, task_id, error)
            store.finish(job_id, "failed", {task_id: 0}, worker)  # recorded, never posted as a result
            self.beat.release([task_id])
        else:
            self.pending[task_id] = prediction
            log.debug("job %s: task %s labelled, %d to post", job_id, task_id, len(self.pending))

    def flush(self, wait: bool = False) -> None:
        """Hand the pending predictions to the posting thread; "upload" counts only the time the model waited."""
        t0 = time.perf_counter()
        if self.in_flight:
            _result(self.in_flight.pop())  # its errors surface here
        if self.pending:
            batch, self.pending = self.pending, {}
            self.in_flight.append(self.posting.submit(self.save, batch))
        if wait and self.in_flight:
            _result(self.in_flight.pop())
        self.labeller.stages.add("upload", time.perf_counter() - t0)

    def save(self, predictions: dict[int, dict]) -> None:
        """Post a batch (or keep it, for a dry run) and record each task's outcome; only tasks still claimed.

        Two guards, so that a task gets one prediction whatever the order of events: the claim's fencing token
        (checked in the store right before posting, together with the job's finished set), and, after posting,
        a last look at the task's predictions in Label Studio with `poster.remove_duplicates`' rule, for the runs
        the store cannot see (ones that share no store with this one, or posted in the same instant).
        """
        ctx, store, job = self.ctx, self.ctx.store, self.job
        held = self.beat.confirm(list(predictions))
        lost = set(predictions) - held
        if lost:
            log.warning("job %s: tasks %s were claimed or finished by another runner meanwhile; not posting them",
                        job.id, sorted(lost))
        predictions = {t: p for t, p in predictions.items() if t in held}
        if job.request.dry_run:
            kept = store.get(job.id).predictions or []
            store.set(job.id, predictions=kept + [{"task": t, **p} for t, p in predictions.items()])
            store.finish(job.id, "predicted", {t: len(p["result"]) for t, p in predictions.items()}, ctx.worker)
        else:
            out = poster.save(ctx.require_api(), job.project, job.model_version, predictions,
                              {t: {"predictions": self.read[t].predictions} for t in predictions},
                              ctx.sam3.model_version, job.request.overwrite, Backoff(ctx.settings.api_retries))
            store.finish(job.id, "predicted", out.posted, ctx.worker)
            for tid, message in out.failed.items():
                store.add_error(job.id, tid, message)
            store.finish(job.id, "failed", {t: 0 for t in out.failed}, ctx.worker)
            if out.removed:
                store.add(job.id, "duplicates_removed", out.removed)
        self.beat.release(list(predictions))


def _result(future: Future) -> None:
    """The post's result (the heartbeat thread tells rq this worker is alive meanwhile)."""
    while True:
        try:
            return future.result(timeout=10)
        except FutureTimeout:
            continue


def finish(ctx: Context, job_id: str) -> None:
    """Every chunk is done: succeeded, unless every task failed (then the errors say why). An evaluation's report
    is built first (a report that cannot be built fails the job, saying why)."""
    store = ctx.store
    job = store.get(job_id)
    status = JobStatus.FAILED if job.failed and not job.predicted and not job.skipped else JobStatus.SUCCEEDED
    fields = {"error": "every task failed; see errors"} if status == JobStatus.FAILED else {}
    if status == JobStatus.SUCCEEDED and job.request.mode == "evaluate" and job.active:
        try:
            store.set_report(job_id, *evaluation.report(ctx, job))
        except Exception as e:
            log.exception("job %s: the evaluation report could not be built", job_id)
            status, fields = JobStatus.FAILED, {"error": f"the report could not be built: {type(e).__name__}: {e}"}
    if store.transition(job_id, (JobStatus.RUNNING,), status=status, finished_at=now(), **fields):
        log.info("job %s %s: %d tasks, %d predicted (%d regions), %d skipped, %d failed", job_id, status.value,
                 job.total, job.predicted, job.regions_added, job.skipped, job.failed)


def run_all(ctx: Context, job_id: str) -> None:
    """Plan and run every chunk here, in order (the embedded runner and `label-studio-sam3 label`)."""
    try:
        for index, chunk in enumerate(plan(ctx, job_id)):
            run_chunk(ctx, job_id, index, chunk)
    except BackendError as e:
        fail(ctx.store, job_id, e.message)
    except Transient as e:
        fail(ctx.store, job_id, f"Label Studio kept failing: {e}")
    except Exception as e:  # the job fails; the process serving it goes on
        log.exception("job %s crashed", job_id)
        fail(ctx.store, job_id, f"internal error ({type(e).__name__}: {e}); see the log")
