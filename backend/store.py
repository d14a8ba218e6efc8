"""Where job state lives: Redis when workers share it, memory for the embedded runner.

Both stores keep, per job: its fields, counters that add up across chunks and workers, the set of
tasks it has finished (so a retried chunk never counts or posts a task twice), the last errors,
and how many tasks each worker did.
"""
from __future__ import annotations

import json
import threading
import time

from .errors import BackendError

COUNTERS = ("total", "processed", "predicted", "skipped", "failed", "regions_added", "chunks_total", "chunks_done")
OUTCOMES = ("predicted", "skipped", "failed")
ACTIVE = ("queued", "running")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
MAX_ERRORS = 20

# Tasks are (id, regions) pairs; only ids not yet in the done set count.
_FINISH = """
local n, r = 0, 0
for i = 3, #ARGV, 2 do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then n = n + 1; r = r + tonumber(ARGV[i + 1]) end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[1], 'processed', n)
  redis.call('HINCRBY', KEYS[1], ARGV[1], n)
  if r > 0 then redis.call('HINCRBY', KEYS[1], 'regions_added', r) end
  if ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[2], n) end
end
return n
"""
# Set fields only while the status is one of the expected ones (so a cancel is never overwritten).
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for i = 2, tonumber(ARGV[1]) + 1 do
  if status == ARGV[i] then
    for j = tonumber(ARGV[1]) + 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1]) end
    return 1
  end
end
return 0
"""


class MemoryStore:
    """Jobs of this process only (the embedded runner); gone when the process ends.

    At most `max_jobs` are kept: finished jobs go a day after they end, or sooner, oldest first, when
    room is needed; when every kept job is still active a new one is refused (HTTP 429).
    """

    def __init__(self, max_jobs: int = 1000, keep_finished: float = 86400.0):
        self.max_jobs, self.keep_finished = max_jobs, keep_finished
        self._jobs: dict[str, dict] = {}
        self._done: dict[str, set] = {}
        self._errors: dict[str, list] = {}
        self._workers: dict[str, dict] = {}
        self._chunks: dict[str, list] = {}
        self._lock = threading.Lock()

    def create(self, job_id: str, fields: dict) -> None:
        with self._lock:
            self._prune()
            if len(self._jobs) >= self.max_jobs:
                raise BackendError(f"{len(self._jobs)} jobs are queued or running here; wait for some to finish", 429)
            self._jobs[job_id] = {**{c: 0 for c in COUNTERS}, **fields}
            self._done[job_id], self._errors[job_id], self._workers[job_id] = set(), [], {}

    def _prune(self) -> None:
        now = time.time()
        ended = sorted((j.get("finished_at") or now, k) for k, j in self._jobs.items() if j["status"] not in ACTIVE)
        excess = len(self._jobs) - self.max_jobs + 1
        for i, (finished_at, job_id) in enumerate(ended):
            if i < excess or finished_at < now - self.keep_finished:
                for table in (self._jobs, self._done, self._errors, self._workers, self._chunks):
                    table.pop(job_id, None)

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            if job_id not in self._jobs:
                return None
            return {**self._jobs[job_id], "errors": list(self._errors[job_id]), "workers": dict(self._workers[job_id])}

    def list(self, status: str | None = None, offset: int = 0, limit: int = 20) -> tuple[list[dict], int]:
        with self._lock:
            ids = sorted(self._jobs, key=lambda j: self._jobs[j]["created_at"], reverse=True)
            ids = [j for j in ids if status is None or self._jobs[j]["status"] == status]
        return [self.get(j) for j in ids[offset:offset + limit]], len(ids)

    def set(self, job_id: str, **fields) -> None:
        with self._lock:
            self._jobs[job_id].update(fields)

    def status(self, job_id: str) -> str | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job["status"] if job else None

    def set_chunks(self, job_id: str, chunks: list[list[int]]) -> None:
        with self._lock:
            self._chunks[job_id] = [list(c) for c in chunks]

    def chunks(self, job_id: str) -> list[list[int]] | None:
        with self._lock:
            return self._chunks.get(job_id)

    def transition(self, job_id: str, expect: tuple[str, ...], **fields) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job["status"] not in expect:
                return False
            job.update(fields)
            return True

    def incr(self, job_id: str, field: str, n: int = 1) -> int:
        with self._lock:
            self._jobs[job_id][field] += n
            return self._jobs[job_id][field]

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

    def done(self, job_id: str) -> set[int]:
        with self._lock:
            return set(self._done.get(job_id, ()))

    def add_error(self, job_id: str, task_id, message: str) -> None:
        with self._lock:
            errors = self._errors[job_id]
            errors.insert(0, {"task": task_id, "error": message, "at": time.time()})
            del errors[MAX_ERRORS:]


class RedisStore:
    """Jobs shared by the service and every worker; kept `ttl` seconds after they end."""

    prefix = "sam3:job:"
    index = "sam3:jobs"

    def __init__(self, redis, ttl: int = 7 * 86400):
        self.r = redis
        self.ttl = ttl
        self._finish = redis.register_script(_FINISH)
        self._transition = redis.register_script(_TRANSITION)

    def _keys(self, job_id: str) -> tuple[str, str, str, str, str]:
        k = self.prefix + job_id
        return k, k + ":done", k + ":workers", k + ":errors", k + ":chunks"

    def create(self, job_id: str, fields: dict) -> None:
        key = self._keys(job_id)[0]
        with self.r.pipeline() as p:
            p.hset(key, mapping={**{c: 0 for c in COUNTERS}, **{k: json.dumps(v) for k, v in fields.items()}})
            p.zadd(self.index, {job_id: fields["created_at"]})
            p.execute()

    def get(self, job_id: str) -> dict | None:
        key, _, workers, errors, _ = self._keys(job_id)
        with self.r.pipeline() as p:
            p.hgetall(key)
            p.hgetall(workers)
            p.lrange(errors, 0, MAX_ERRORS - 1)
            raw, per_worker, errs = p.execute()
        if not raw:
            return None
        out = {}
        for k, v in raw.items():
            k = k.decode()
            out[k] = int(v) if k in COUNTERS else json.loads(v)
        out["workers"] = {k.decode(): int(v) for k, v in per_worker.items()}
        out["errors"] = [json.loads(e) for e in errs]
        return out

    def list(self, status: str | None = None, offset: int = 0, limit: int = 20) -> tuple[list[dict], int]:
        ids = [i.decode() for i in self.r.zrevrange(self.index, 0, -1)]
        jobs = []
        for job_id in ids:
            job = self.get(job_id)
            if job is None:  # expired: drop it from the index too
                self.r.zrem(self.index, job_id)
            elif status is None or job["status"] == status:
                jobs.append(job)
        return jobs[offset:offset + limit], len(jobs)

    def set(self, job_id: str, **fields) -> None:
        self.r.hset(self._keys(job_id)[0], mapping={k: json.dumps(v) for k, v in fields.items()})
        if fields.get("status") in ("succeeded", "failed", "cancelled"):
            self._expire(job_id)

    def status(self, job_id: str) -> str | None:
        raw = self.r.hget(self._keys(job_id)[0], "status")
        return json.loads(raw) if raw else None

    def set_chunks(self, job_id: str, chunks: list[list[int]]) -> None:
        self.r.set(self._keys(job_id)[4], json.dumps(chunks))

    def chunks(self, job_id: str) -> list[list[int]] | None:
        raw = self.r.get(self._keys(job_id)[4])
        return json.loads(raw) if raw else None

    def transition(self, job_id: str, expect: tuple[str, ...], **fields) -> bool:
        args = [len(expect), *[json.dumps(s) for s in expect]]
        for k, v in fields.items():
            args += [k, json.dumps(v)]
        ok = bool(self._transition(keys=[self._keys(job_id)[0]], args=args))
        if ok and fields.get("status") in ("succeeded", "failed", "cancelled"):
            self._expire(job_id)
        return ok

    def incr(self, job_id: str, field: str, n: int = 1) -> int:
        return int(self.r.hincrby(self._keys(job_id)[0], field, n))

    def finish(self, job_id: str, outcome: str, tasks: dict[int, int], worker: str = "") -> int:
        if not tasks:
            return 0
        key, done, workers, _, _ = self._keys(job_id)
        args = [outcome, worker]
        for t, regions in tasks.items():
            args += [int(t), int(regions)]
        return int(self._finish(keys=[key, done, workers], args=args))

    def done(self, job_id: str) -> set[int]:
        return {int(t) for t in self.r.smembers(self._keys(job_id)[1])}

    def add_error(self, job_id: str, task_id, message: str) -> None:
        key = self._keys(job_id)[3]
        with self.r.pipeline() as p:
            p.lpush(key, json.dumps({"task": task_id, "error": message, "at": time.time()}))
            p.ltrim(key, 0, MAX_ERRORS - 1)
            p.execute()

    def _expire(self, job_id: str) -> None:
        with self.r.pipeline() as p:
            for key in self._keys(job_id):
                p.expire(key, self.ttl)
            p.execute()
