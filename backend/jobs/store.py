"""Where job state lives: the `JobStore` protocol, and `MemoryStore` for the embedded runner (Redis, shared
by the service and every worker: `redis_store.RedisStore`).

Both stores keep, per job: its record, counters that add up across chunks and workers, the set of tasks it
has finished, the set of chunks it has finished, the last errors, and how many tasks each worker did. They
own the operations that must be atomic:
- `create` takes the lock of a (project, model_version) "scope": one active job per scope;
- `claim` gives a task of a scope to one runner for a lease, with a fencing token (a per-task counter that
  every new claim increments); `renew` keeps a claim only for the runner holding that token, and only while
  nobody else has claimed the task since and the job has not finished it. So a runner paused past its lease
  (SIGSTOP, a VM migration, a laptop lid) never takes back a task that another runner claimed, posted and
  released meanwhile: the token it holds is stale;
- `finish` counts a task once however often it is reported; `finish_chunk` counts a chunk once.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol

from ..errors import BackendError
from .record import ACTIVE, FINAL, Job, JobRequest, JobStatus

MAX_ERRORS = 20  # errors kept per job, newest first


class Conflict(BackendError):
    """Another job already works on this project with this model_version."""

    status = 409

    def __init__(self, message: str, job_id: str):
        super().__init__(message)
        self.job_id = job_id
        self.extra = {"job_id": job_id}


def conflict(holder: str, scope: str) -> Conflict:
    project, _, version = scope.partition(":")
    return Conflict(f"job {holder} is already labelling project {project} with model_version {version}; "
                    f"follow it at /jobs/{holder}, or cancel it first", holder)


def plain(value):
    """A field value as stores keep it (JSON)."""
    if isinstance(value, JobStatus):
        return value.value
    if isinstance(value, JobRequest):
        return value.to_dict()
    return value


class JobStore(Protocol):
    def create(self, job: Job) -> None: ...
    def get(self, job_id: str) -> Job | None: ...
    def list(self, status: JobStatus | None = None, offset: int = 0, limit: int = 20) -> tuple[list[Job], int]: ...
    def set(self, job_id: str, **fields) -> None: ...
    def status(self, job_id: str) -> JobStatus | None: ...
    def set_chunks(self, job_id: str, chunks: list[list[int]]) -> None: ...
    def chunks(self, job_id: str) -> list[list[int]] | None: ...
    def transition(self, job_id: str, expect: tuple[JobStatus, ...], **fields) -> bool: ...
    def finish(self, job_id: str, outcome: str, tasks: dict[int, int], worker: str = "") -> int: ...
    def finish_chunk(self, job_id: str, index: int) -> int: ...
    def done(self, job_id: str) -> set[int]: ...
    def add(self, job_id: str, counter: str, n: int) -> None: ...
    def claim(self, scope: str, tasks, owner: str, lease: float) -> dict[int, int]: ...
    def renew(self, scope: str, held: dict[int, int], owner: str, lease: float,
              job_id: str | None = None) -> set[int]: ...
    def release(self, scope: str, held: dict[int, int], owner: str) -> None: ...
    def add_error(self, job_id: str, task_id, message: str) -> None: ...
    def put_result(self, job_id: str, task_id, result: dict) -> None: ...
    def results(self, job_id: str) -> dict: ...
    def set_report(self, job_id: str, report: dict, page: str) -> None: ...
    def report(self, job_id: str) -> tuple[dict, str] | None: ...


class MemoryStore:
    """Jobs of this process only (the embedded runner); gone when the process ends.

    At most `max_jobs` are kept: finished jobs go a day after they end, or sooner, oldest first, when
    room is needed; when every kept job is still active a new one is refused (HTTP 429).
    """

    def __init__(self, max_jobs: int = 1000, keep_finished: float = 86400.0):
        self.max_jobs, self.keep_finished = max_jobs, keep_finished
        self._jobs: dict[str, dict] = {}  # id -> stored fields (Job.stored())
        self._done: dict[str, set] = {}
        self._chunks_done: dict[str, set] = {}
        self._results: dict[str, dict] = {}  # evaluation: task -> its result
        self._reports: dict[str, tuple[dict, str]] = {}  # evaluation: its report (JSON) and page (HTML)
        self._errors: dict[str, list] = {}
        self._workers: dict[str, dict] = {}
        self._chunks: dict[str, list] = {}
        self._locks: dict[str, str] = {}  # scope -> job id
        self._claims: dict[tuple[str, int], tuple[str, int, float]] = {}  # (scope, task) -> (owner, token, until)
        self._fences: dict[str, dict[int, int]] = {}  # scope -> task -> the last fencing token given out
        self._lock = threading.RLock()

    def create(self, job: Job) -> None:
        scope = job.lock
        with self._lock:
            self._prune()
            if len(self._jobs) >= self.max_jobs:
                raise BackendError(f"{len(self._jobs)} jobs are queued or running here; wait for some to finish", 429)
            if scope:
                holder = self._locks.get(scope)
                if holder and self._jobs.get(holder, {}).get("status") in ACTIVE:
                    raise conflict(holder, scope)
                self._locks[scope] = job.id
            self._jobs[job.id] = job.stored()
            self._done[job.id], self._chunks_done[job.id] = set(), set()
            self._errors[job.id], self._workers[job.id] = [], {}

    def _prune(self) -> None:
        now = time.time()
        ended = sorted((j.get("finished_at") or now, k) for k, j in self._jobs.items() if j["status"] not in ACTIVE)
        excess = len(self._jobs) - self.max_jobs + 1
        for i, (finished_at, job_id) in enumerate(ended):
            if i < excess or finished_at < now - self.keep_finished:
                for table in (self._jobs, self._done, self._chunks_done, self._errors, self._workers, self._chunks,
                              self._results, self._reports):
                    table.pop(job_id, None)
        # Fencing tokens outlive claims (a paused runner's token must stay stale), but not every job of their scope.
        scopes = {j.get("scope") for j in self._jobs.values()}
        for scope in [s for s in self._fences if s not in scopes]:
            del self._fences[scope]
        mono = time.monotonic()
        for key in [k for k, (_, _, until) in self._claims.items() if until < mono and k[0] not in scopes]:
            del self._claims[key]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            if job_id not in self._jobs:
                return None
            return Job.from_stored(self._jobs[job_id], len(self._chunks_done[job_id]), self._errors[job_id],
                                   self._workers[job_id])

    def list(self, status: JobStatus | None = None, offset: int = 0, limit: int = 20) -> tuple[list[Job], int]:
        with self._lock:
            ids = sorted(self._jobs, key=lambda j: self._jobs[j]["created_at"], reverse=True)
            ids = [j for j in ids if status is None or self._jobs[j]["status"] == status]
        return [self.get(j) for j in ids[offset:offset + limit]], len(ids)

    def set(self, job_id: str, **fields) -> None:
        with self._lock:
            self._jobs[job_id].update({k: plain(v) for k, v in fields.items()})

    def status(self, job_id: str) -> JobStatus | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return JobStatus(job["status"]) if job else None

    def set_chunks(self, job_id: str, chunks: list[list[int]]) -> None:
        with self._lock:
            self._chunks[job_id] = [list(c) for c in chunks]

    def chunks(self, job_id: str) -> list[list[int]] | None:
        with self._lock:
            return self._chunks.get(job_id)

    def transition(self, job_id: str, expect: tuple[JobStatus, ...], **fields) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["status"] not in expect:
                return False
            job.update({k: plain(v) for k, v in fields.items()})
            if job["status"] in FINAL and job.get("lock") and self._locks.get(job["lock"]) == job_id:
                del self._locks[job["lock"]]
            return True

    def finish(self, job_id: str, outcome: str, tasks: dict[int, int], worker: str = "") -> int:
        with self._lock:
            done, job = self._done[job_id], self._jobs[job_id]
            new = [t for t in tasks if t not in done]
            done.update(new)
            job["processed"] += len(new)
            job[outcome] += len(new)
            job["regions_added"] += sum(tasks[t] for t in new)
            if worker and new:
                self._workers[job_id][worker] = self._workers[job_id].get(worker, 0) + len(new)
            return len(new)

    def finish_chunk(self, job_id: str, index: int) -> int:
        """Record chunk `index` as finished; how many distinct chunks are."""
        with self._lock:
            self._chunks_done[job_id].add(int(index))
            return len(self._chunks_done[job_id])

    def done(self, job_id: str) -> set[int]:
        with self._lock:
            return set(self._done.get(job_id, ()))

    def add(self, job_id: str, counter: str, n: int) -> None:
        """Add to a counter: video frames tracked (progress within long video tasks), duplicates removed."""
        with self._lock:
            if job_id in self._jobs:
                self._jobs[job_id][counter] = self._jobs[job_id].get(counter, 0) + int(n)

    def claim(self, scope: str, tasks, owner: str, lease: float) -> dict[int, int]:
        """{task: fencing token} of the tasks of `tasks` that `owner` holds now: free ones are taken with a new
        token, its own are renewed."""
        now, held = time.monotonic(), {}
        with self._lock:
            fences = self._fences.setdefault(scope, {})
            for t in map(int, tasks):
                current = self._claims.get((scope, t))
                if current is None or current[2] < now:
                    fences[t] = fences.get(t, 0) + 1
                    self._claims[(scope, t)] = (owner, fences[t], now + lease)
                    held[t] = fences[t]
                elif current[0] == owner:
                    self._claims[(scope, t)] = (owner, current[1], now + lease)
                    held[t] = current[1]
        return held

    def renew(self, scope: str, held: dict[int, int], owner: str, lease: float, job_id: str | None = None) -> set[int]:
        """The tasks of `held` ({task: token}) still `owner`'s: its claim with that token, or lapsed with nobody
        claiming the task since; never a task the job `job_id` has finished. Those are renewed."""
        now, out = time.monotonic(), set()
        with self._lock:
            fences = self._fences.get(scope, {})
            done = self._done.get(job_id, set()) if job_id else set()
            for t, token in held.items():
                current = self._claims.get((scope, int(t)))
                mine = (current[:2] == (owner, token) if current is not None and current[2] >= now
                        else fences.get(int(t)) == token)
                if mine and int(t) not in done:
                    self._claims[(scope, int(t))] = (owner, token, now + lease)
                    out.add(int(t))
        return out

    def release(self, scope: str, held: dict[int, int], owner: str) -> None:
        with self._lock:
            for t, token in held.items():
                if self._claims.get((scope, int(t)), ("", 0))[:2] == (owner, token):
                    del self._claims[(scope, int(t))]

    def add_error(self, job_id: str, task_id, message: str) -> None:
        with self._lock:
            errors = self._errors[job_id]
            errors.insert(0, {"task": task_id, "error": message, "at": time.time()})
            del errors[MAX_ERRORS:]

    def put_result(self, job_id: str, task_id, result: dict) -> None:
        with self._lock:
            self._results.setdefault(job_id, {})[str(task_id)] = result

    def results(self, job_id: str) -> dict:
        with self._lock:
            return dict(self._results.get(job_id, {}))

    def set_report(self, job_id: str, report: dict, page: str) -> None:
        with self._lock:
            self._reports[job_id] = (report, page)

    def report(self, job_id: str) -> tuple[dict, str] | None:
        with self._lock:
            return self._reports.get(job_id)
