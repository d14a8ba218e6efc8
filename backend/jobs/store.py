"""Where job state lives: Redis when workers share it, memory for the embedded runner.

Both stores keep, per job: its fields, counters that add up across chunks and workers, the set of
tasks it has finished, the set of chunks it has finished, the last errors, and how many tasks each
worker did. They own the operations that must be atomic:
- `create` takes the lock of a (project, model_version) "scope": one active job per scope;
- `claim` gives a task of a scope to one runner for a lease, with a fencing token (a per-task counter that
  every new claim increments); `renew` keeps a claim only for the runner holding that token, and only while
  nobody else has claimed the task since and the job has not finished it. So a runner paused past its lease
  (SIGSTOP, a VM migration, a laptop lid) never takes back a task that another runner claimed, posted and
  released meanwhile: the token it holds is stale;
- `finish` counts a task once however often it is reported; `finish_chunk` counts a chunk once.
"""
from __future__ import annotations

import json
import threading
import time

from .errors import BackendError

COUNTERS = ("total", "processed", "predicted", "skipped", "failed", "regions_added", "chunks_total", "frames",
            "duplicates_removed")
OUTCOMES = ("predicted", "skipped", "failed")
ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ACTIVE + FINAL
MAX_ERRORS = 20


class Conflict(BackendError):
    """Another job already works on this project with this model_version."""

    status = 409

    def __init__(self, message: str, job_id: str):
        super().__init__(message)
        self.job_id = job_id
        self.extra = {"job_id": job_id}


def _conflict(holder: str, scope: str) -> Conflict:
    project, _, version = scope.partition(":")
    return Conflict(f"job {holder} is already labelling project {project} with model_version {version}; "
                    f"follow it at /jobs/{holder}, or cancel it first", holder)


# ---- Redis scripts ------------------------------------------------------------------------------
# KEYS: job hash, index, lock (or the job hash again when unlocked). ARGV: job id, created_at, locked?, fields...
_CREATE = """
if ARGV[3] == '1' then
  local holder = redis.call('GET', KEYS[3])
  if holder then
    local status = redis.call('HGET', KEYS[1]:sub(1, #KEYS[1] - #ARGV[1]) .. holder, 'status')
    if status == '"queued"' or status == '"running"' then return holder end
  end
  redis.call('SET', KEYS[3], ARGV[1])
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return false
"""
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
# Set fields only while the status is one of the expected ones (so a cancel is never overwritten); a final
# status frees the job's scope lock. KEYS: job hash. ARGV: n expected, expected..., field/value pairs.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for i = 2, tonumber(ARGV[1]) + 1 do
  if status == ARGV[i] then
    local final = false
    for j = tonumber(ARGV[1]) + 2, #ARGV, 2 do
      redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
      if ARGV[j] == 'status' and (ARGV[j + 1] == '"succeeded"' or ARGV[j + 1] == '"failed"'
                                  or ARGV[j + 1] == '"cancelled"') then final = true end
    end
    local lock = redis.call('HGET', KEYS[1], 'lock')
    if final and lock then
      local key = cjson.decode(lock)
      if key ~= cjson.null and redis.call('GET', key) == cjson.decode(redis.call('HGET', KEYS[1], 'id')) then
        redis.call('DEL', key)
      end
    end
    return 1
  end
end
return 0
"""
# A claim is a key "<prefix><task>" holding "<owner>|<token>" for the lease; the scope's fence hash holds, per
# task, the last token given out. KEYS: fence hash. ARGV: key prefix, owner, lease ms, fence ttl s, task ids...
# Free tasks are taken with a new token; the owner's own claims are renewed. Returns task, token, task, token...
_CLAIM = """
local out = {}
for i = 5, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local cur = redis.call('GET', key)
  if not cur then
    local token = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
    redis.call('SET', key, ARGV[2] .. '|' .. token, 'PX', ARGV[3])
    out[#out + 1] = ARGV[i]; out[#out + 1] = token
  else
    local owner, token = string.match(cur, '^(.*)|(%d+)$')
    if owner == ARGV[2] then
      redis.call('PEXPIRE', key, ARGV[3])
      out[#out + 1] = ARGV[i]; out[#out + 1] = tonumber(token)
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return out
"""
# KEYS: fence hash, the job's done set. ARGV: key prefix, owner, lease ms, task, token, task, token...
# A claim stays the owner's while the key holds its token, or has lapsed with nobody claiming the task since
# (the fence still at its token); never once the job has finished the task. Returns the tasks still held.
_RENEW = """
local out = {}
for i = 4, #ARGV, 2 do
  local key = ARGV[1] .. ARGV[i]
  local mine = ARGV[2] .. '|' .. ARGV[i + 1]
  local cur = redis.call('GET', key)
  local held = cur == mine
  if not cur then held = redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] end
  if held and redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then
    redis.call('SET', key, mine, 'PX', ARGV[3])
    out[#out + 1] = ARGV[i]
  end
end
return out
"""
# ARGV: key prefix, owner, task, token, ...: a claim is deleted only by the owner of that token.
_RELEASE = """
for i = 3, #ARGV, 2 do
  local key = ARGV[1] .. ARGV[i]
  if redis.call('GET', key) == ARGV[2] .. '|' .. ARGV[i + 1] then redis.call('DEL', key) end
end
return 1
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
        self._chunks_done: dict[str, set] = {}
        self._enqueued: dict[str, set] = {}
        self._errors: dict[str, list] = {}
        self._workers: dict[str, dict] = {}
        self._chunks: dict[str, list] = {}
        self._locks: dict[str, str] = {}  # scope -> job id
        self._claims: dict[tuple[str, int], tuple[str, int, float]] = {}  # (scope, task) -> (owner, token, until)
        self._fences: dict[str, dict[int, int]] = {}  # scope -> task -> the last fencing token given out
        self._lock = threading.RLock()

    def create(self, job_id: str, fields: dict, scope: str | None = None) -> None:
        with self._lock:
            self._prune()
            if len(self._jobs) >= self.max_jobs:
                raise BackendError(f"{len(self._jobs)} jobs are queued or running here; wait for some to finish", 429)
            if scope:
                holder = self._locks.get(scope)
                if holder and self._jobs.get(holder, {}).get("status") in ACTIVE:
                    raise _conflict(holder, scope)
                self._locks[scope] = job_id
            self._jobs[job_id] = {**{c: 0 for c in COUNTERS}, **fields, "lock": scope}
            for table in (self._done, self._chunks_done, self._enqueued):
                table[job_id] = set()
            self._errors[job_id], self._workers[job_id] = [], {}

    def _prune(self) -> None:
        now = time.time()
        ended = sorted((j.get("finished_at") or now, k) for k, j in self._jobs.items() if j["status"] not in ACTIVE)
        excess = len(self._jobs) - self.max_jobs + 1
        for i, (finished_at, job_id) in enumerate(ended):
            if i < excess or finished_at < now - self.keep_finished:
                for table in (self._jobs, self._done, self._chunks_done, self._enqueued, self._errors,
                              self._workers, self._chunks):
                    table.pop(job_id, None)
        # Fencing tokens outlive claims (a paused runner's token must stay stale), but not every job of their scope.
        scopes = {j.get("scope") for j in self._jobs.values()}
        for scope in [s for s in self._fences if s not in scopes]:
            del self._fences[scope]
        mono = time.monotonic()
        for key in [k for k, (_, _, until) in self._claims.items() if until < mono and k[0] not in scopes]:
            del self._claims[key]

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            if job_id not in self._jobs:
                return None
            return {**self._jobs[job_id], "chunks_done": len(self._chunks_done[job_id]),
                    "errors": list(self._errors[job_id]), "workers": dict(self._workers[job_id])}

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
            if fields.get("status") in FINAL and job.get("lock") and self._locks.get(job["lock"]) == job_id:
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

    def first_time(self, job_id: str, mark: str) -> bool:
        """True once per (job, mark): for doing a thing exactly once (enqueueing a chunk) across retries."""
        with self._lock:
            seen = mark in self._enqueued[job_id]
            self._enqueued[job_id].add(mark)
            return not seen

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


class RedisStore:
    """Jobs shared by the service and every worker; kept `ttl` seconds after they end.

    The scripts touch keys they build from their arguments: a single Redis (or a primary), not a cluster.
    """

    prefix = "sam3:job:"
    index = "sam3:jobs"

    def __init__(self, redis, ttl: int = 7 * 86400):
        self.r = redis
        self.ttl = ttl
        self._create = redis.register_script(_CREATE)
        self._finish = redis.register_script(_FINISH)
        self._transition = redis.register_script(_TRANSITION)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)

    def _keys(self, job_id: str) -> tuple[str, ...]:
        k = self.prefix + job_id
        return k, k + ":done", k + ":workers", k + ":errors", k + ":chunks", k + ":chunks_done", k + ":enqueued"

    def create(self, job_id: str, fields: dict, scope: str | None = None) -> None:
        key = self._keys(job_id)[0]
        lock = f"sam3:lock:{scope}" if scope else key
        args = [job_id, fields["created_at"], "1" if scope else "0"]
        for k, v in {**{c: 0 for c in COUNTERS}, **{k: json.dumps(v) for k, v in fields.items()},
                     "lock": json.dumps(lock if scope else None)}.items():
            args += [k, v]
        holder = self._create(keys=[key, self.index, lock], args=args)
        if holder:
            raise _conflict(holder.decode(), scope)

    def get(self, job_id: str) -> dict | None:
        key, _, workers, errors, _, chunks_done, _ = self._keys(job_id)
        with self.r.pipeline() as p:
            p.hgetall(key)
            p.hgetall(workers)
            p.lrange(errors, 0, MAX_ERRORS - 1)
            p.scard(chunks_done)
            raw, per_worker, errs, n_chunks = p.execute()
        if not raw:
            return None
        out = {}
        for k, v in raw.items():
            k = k.decode()
            out[k] = int(v) if k in COUNTERS else json.loads(v)
        out["chunks_done"] = int(n_chunks)
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
        if ok and fields.get("status") in FINAL:
            self._expire(job_id)
        return ok

    def finish(self, job_id: str, outcome: str, tasks: dict[int, int], worker: str = "") -> int:
        if not tasks:
            return 0
        key, done, workers = self._keys(job_id)[:3]
        args = [outcome, worker]
        for t, regions in tasks.items():
            args += [int(t), int(regions)]
        return int(self._finish(keys=[key, done, workers], args=args))

    def finish_chunk(self, job_id: str, index: int) -> int:
        key = self._keys(job_id)[5]
        with self.r.pipeline() as p:
            p.sadd(key, int(index))
            p.scard(key)
            return int(p.execute()[1])

    def first_time(self, job_id: str, mark: str) -> bool:
        return bool(self.r.sadd(self._keys(job_id)[6], mark))

    def done(self, job_id: str) -> set[int]:
        return {int(t) for t in self.r.smembers(self._keys(job_id)[1])}

    def add(self, job_id: str, counter: str, n: int) -> None:
        self.r.hincrby(self._keys(job_id)[0], counter, int(n))

    def claim(self, scope: str, tasks, owner: str, lease: float) -> dict[int, int]:
        tasks = [int(t) for t in tasks]
        if not tasks:
            return {}
        out = self._claim(keys=[f"sam3:fence:{scope}"],
                          args=[f"sam3:claim:{scope}:", owner, int(lease * 1000), self.ttl, *tasks])
        return {int(out[i]): int(out[i + 1]) for i in range(0, len(out), 2)}

    def renew(self, scope: str, held: dict[int, int], owner: str, lease: float, job_id: str | None = None) -> set[int]:
        if not held:
            return set()
        args = [f"sam3:claim:{scope}:", owner, int(lease * 1000)]
        for t, token in held.items():
            args += [int(t), int(token)]
        done = self._keys(job_id)[1] if job_id else "sam3:none"
        return {int(t) for t in self._renew(keys=[f"sam3:fence:{scope}", done], args=args)}

    def release(self, scope: str, held: dict[int, int], owner: str) -> None:
        if held:
            args = [f"sam3:claim:{scope}:", owner]
            for t, token in held.items():
                args += [int(t), int(token)]
            self._release(keys=[], args=args)

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
