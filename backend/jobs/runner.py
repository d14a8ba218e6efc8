"""The run loop of a label job: plan it, run its chunks, finish it; the same loop for the embedded runner
and for rq workers.

A chunk run claims its tasks in the store before labelling them (a lease, renewed by a side thread that also
tells rq the worker is alive), re-checks its claims right before posting, and returns only when every task
of the chunk is finished by someone: a second run of the same chunk (rq retrying a worker it thought dead)
waits for the first instead of labelling a task again. Finished chunks are a set, so a chunk that finishes
twice counts once, and the job succeeds only when every chunk is finished.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from . import poster
from .autolabel import Stages
from .errors import BackendError
from .jobs import Context, backend_for, fail, now
from .poster import Skip
from .retry import Backoff, Transient
from .store import ACTIVE

log = logging.getLogger(__name__)


class Heartbeat:
    """While a plan or a chunk runs: tell rq the worker is alive and renew the claims it holds.

    A claim is held with its fencing token (`held`: task -> token); renewing checks the token, so a claim that
    lapsed while this process was paused, and that another runner took since, is never taken back.
    """

    def __init__(self, ctx: Context, scope: str | None = None, owner: str = "", job_id: str | None = None):
        self.ctx, self.scope, self.owner, self.job_id = ctx, scope, owner, job_id
        self.held: dict[int, int] = {}
        self.lease = float(ctx.settings.job_heartbeat)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sam3-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.scope and self.held:
            self.ctx.store.release(self.scope, dict(self.held), self.owner)

    def claim(self, tasks) -> set[int]:
        """Take the free tasks of `tasks` and renew the ones held; the ones held now."""
        tasks = set(tasks)
        with self._lock:
            mine = {t: tok for t, tok in self.held.items() if t in tasks}
        kept = self.confirm(mine) if mine else set()
        got = self.ctx.store.claim(self.scope, tasks - set(mine), self.owner, self.lease)
        with self._lock:
            self.held.update(got)
        return kept | set(got)

    def confirm(self, tasks) -> set[int]:
        """The tasks of `tasks` still ours (renewed); the others are forgotten: their fencing token is stale or
        the job has finished them (another runner posted them while this one was paused)."""
        with self._lock:
            mine = {t: self.held[t] for t in tasks if t in self.held}
        kept = self.ctx.store.renew(self.scope, mine, self.owner, self.lease, self.job_id) if mine else set()
        with self._lock:
            for t in set(mine) - kept:
                self.held.pop(t, None)
        return kept

    def release(self, tasks) -> None:
        with self._lock:
            mine = {t: self.held.pop(t) for t in tasks if t in self.held}
        self.ctx.store.release(self.scope, mine, self.owner)

    def _run(self) -> None:
        every = max(0.5, min(self.lease, float(self.ctx.settings.job_heartbeat)) / 4)
        while not self._stop.wait(every):
            try:
                self.ctx.heartbeat()
                if self.scope:
                    with self._lock:
                        held = list(self.held)
                    if held:
                        self.confirm(held)
            except Exception as e:  # Redis away for a moment: the next beat tries again
                log.warning("heartbeat failed: %s", e)


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
    store.transition(job_id, ("queued",), status="running", started_at=now())
    req = job["request"]
    wanted = set(req["tasks"]) if req["tasks"] else None
    seen, todo, skipped = set(), [], {}
    with Heartbeat(ctx):  # paging through a large project takes a while
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
        finish(store, job_id)
    return chunks


# ---- running a chunk -----------------------------------------------------------------------------
def run_chunk(ctx: Context, job_id: str, index: int, task_ids: list[int], wait: float = 2.0) -> Stages | None:
    """Label chunk `index` (its tasks `task_ids`) and post its predictions; stops early when the job is cancelled.

    Returns the seconds spent per stage (None when there was nothing to do)."""
    store = ctx.store
    job = store.get(job_id)
    if job is None or job["status"] not in ACTIVE:
        return None  # cancelled or failed while this chunk waited
    api = ctx.require_api()
    if ctx.job_backend is None or ctx.job_backend[0] != job_id:
        ctx.job_backend = job_id, backend_for(ctx.settings, ctx.runtime, api, job["label_config"], job["request"])
    backend = ctx.job_backend[1]
    if backend.model_version != job["model_version"]:
        fail(store, job_id, f"worker {ctx.worker} has checkpoint {ctx.settings.model!r} "
                            f"(model_version {backend.model_version}); the job needs {job['model_version']}")
        return None
    labeler = backend.auto_labeler(ctx.runtime.wait(timeout=600))
    scope = job["scope"]
    owner = f"{ctx.worker}:{uuid.uuid4().hex[:8]}"  # one per run: two runs in one process are two owners
    with Heartbeat(ctx, scope, owner, job_id) as beat:
        while True:
            left = [t for t in task_ids if t not in store.done(job_id)]
            if not left or store.status(job_id) not in ACTIVE:
                break
            mine = sorted(beat.claim(left))
            if mine:
                _label_and_post(ctx, job, backend, labeler, beat, mine)
            else:  # another runner holds them: wait for it to finish them, or for its lease to lapse
                time.sleep(wait)
    log.info("job %s: chunk %d of %d tasks, seconds per stage: %s", job_id, index, len(task_ids), labeler.stages)
    if store.status(job_id) not in ACTIVE:
        log.info("job %s: chunk %d stopped, the job is %s", job_id, index, store.status(job_id))
        return labeler.stages
    if store.finish_chunk(job_id, index) >= (store.get(job_id)["chunks_total"] or 0):
        finish(store, job_id)
    return labeler.stages


def _label_and_post(ctx: Context, job: dict, backend, labeler, beat: Heartbeat, tasks: list[int]) -> None:
    """Label the claimed `tasks` and post them in batches on a side thread; record each task's outcome."""
    store, job_id, req, mv = ctx.store, job["id"], job["request"], job["model_version"]
    api = ctx.require_api()
    fetched: dict[int, dict] = {}

    def load(tid, image):
        if tid not in fetched:  # read once per task, fresh, however many images it has
            fetched[tid] = api.task(tid)
            # Two runs that shared no store may have both posted it: the rule every run applies, here too.
            removed = poster.remove_duplicates(api, fetched[tid], mv)
            if removed:
                store.add(job_id, "duplicates_removed", removed)
        task = fetched[tid]
        if task.get("annotations"):
            raise Skip("annotated")
        if not req["overwrite"] and poster.has_prediction(task, mv):
            raise Skip("already predicted by this model_version")
        return backend.load_task_image(task, image)

    pending: dict[int, dict] = {}
    # Posting runs on its own thread, one batch at a time and in order, while the model labels the next
    # tasks; "upload" counts only the time the model waited for it.
    posting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam3-post")
    in_flight: list[Future] = []

    def flush(wait: bool = False) -> None:
        t0 = time.perf_counter()
        if in_flight:
            _wait(in_flight.pop(), ctx)  # its errors surface here
        if pending:
            batch = dict(pending)
            pending.clear()
            in_flight.append(posting.submit(_save, ctx, job, backend, beat, batch,
                                            {t: fetched[t] for t in batch}))
        if wait and in_flight:
            _wait(in_flight.pop(), ctx)
        labeler.stages.add("upload", time.perf_counter() - t0)

    try:
        frames = lambda n: store.add(job_id, "frames", n)  # noqa: E731  (video progress, between windows)
        stopped = lambda: store.status(job_id) not in ACTIVE  # noqa: E731  (a video stops between windows)
        for task_id, _, prediction, error in backend.label_tasks(labeler, tasks, load, on_frames=frames,
                                                                 cancelled=stopped):
            if isinstance(error, Skip):
                store.finish(job_id, "skipped", {task_id: 0}, ctx.worker)
                beat.release([task_id])
            elif error is not None:
                store.add_error(job_id, task_id, getattr(error, "message", None) or f"{type(error).__name__}: {error}")
                log.warning("job %s: task %s failed: %s", job_id, task_id, error)
                store.finish(job_id, "failed", {task_id: 0}, ctx.worker)  # recorded, never posted as a result
                beat.release([task_id])
            else:
                pending[task_id] = prediction
                log.debug("job %s: task %s labelled, %d to post", job_id, task_id, len(pending))
            if len(pending) >= ctx.settings.post_batch:
                flush()
            if store.status(job_id) not in ACTIVE:
                break  # cancelled: the task in hand is finished, post it, then stop
        flush(wait=True)
    finally:
        posting.shutdown(wait=True)  # a post in flight completes: nothing is left half-done


def _save(ctx: Context, job: dict, backend, beat: Heartbeat, predictions: dict[int, dict],
          tasks: dict[int, dict]) -> None:
    """Post a batch (or keep it, for a dry run) and record each task's outcome; only tasks still claimed.

    Two guards, so that a task gets one prediction whatever the order of events: the claim's fencing token
    (checked in the store right before posting, together with the job's finished set), and, after posting, a
    last look at the task's predictions in Label Studio with `poster.remove_duplicates`' rule, for the runs the
    store cannot see (ones that share no store with this one, or posted in the same instant).
    """
    store, job_id, req, mv = ctx.store, job["id"], job["request"], job["model_version"]
    held = beat.confirm(list(predictions))
    lost = set(predictions) - held
    if lost:
        log.warning("job %s: tasks %s were claimed or finished by another runner meanwhile; not posting them",
                    job_id, sorted(lost))
    predictions = {t: p for t, p in predictions.items() if t in held}
    if req["dry_run"]:
        results = store.get(job_id).get("predictions") or []
        store.set(job_id, predictions=results + [{"task": t, **p} for t, p in predictions.items()])
        store.finish(job_id, "predicted", {t: len(p["result"]) for t, p in predictions.items()}, ctx.worker)
        beat.release(list(predictions))
        return
    own_prefix = ctx.runtime.model_version
    out = poster.save(ctx.require_api(), job["project"], mv, predictions, tasks, own_prefix, req["overwrite"],
                      Backoff(ctx.settings.api_retries))
    store.finish(job_id, "predicted", out.posted, ctx.worker)
    for tid, message in out.failed.items():
        store.add_error(job_id, tid, message)
    store.finish(job_id, "failed", {t: 0 for t in out.failed}, ctx.worker)
    if out.removed:
        store.add(job_id, "duplicates_removed", out.removed)
    beat.release(list(predictions))


def _wait(future: Future, ctx: Context) -> None:
    """The post's result (the heartbeat thread tells rq this worker is alive meanwhile)."""
    while True:
        try:
            return future.result(timeout=10)
        except FutureTimeout:
            continue


def finish(store, job_id: str) -> None:
    """Every chunk is done: succeeded, unless every task failed (then the errors say why)."""
    job = store.get(job_id)
    status = "failed" if job["failed"] and not job["predicted"] and not job["skipped"] else "succeeded"
    fields = {"error": "every task failed; see errors"} if status == "failed" else {}
    if store.transition(job_id, ("running",), status=status, finished_at=now(), **fields):
        log.info("job %s %s: %s", job_id, status,
                 {k: job[k] for k in ("total", "predicted", "skipped", "failed", "regions_added")})


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
