"""Jobs in Redis: shared by the service and every worker on any machine, kept `ttl` seconds after they end.

The atomic operations (`store.JobStore`) are Lua scripts. Statuses in the scripts come from `JobStatus`; key
names from `keys`. The scripts touch keys they build from their arguments: a single Redis (or a primary), not
a cluster.
"""
from __future__ import annotations

import json
import time
from string import Template

from . import keys
from .record import ACTIVE, COUNTERS, FINAL, Job, JobStatus
from .store import MAX_ERRORS, conflict, plain


def _any_of(statuses) -> str:
    """A Lua condition: `status` (the JSON text of a hash field) is one of `statuses`."""
    return " or ".join(f"status == '{json.dumps(s.value)}'" for s in statuses)


# KEYS: job hash, index, lock (or the job hash again when unlocked).
# ARGV: job id, created_at, locked?, job key prefix, fields...
_CREATE = Template("""
if ARGV[3] == '1' then
  local holder = redis.call('GET', KEYS[3])
  if holder then
    local status = redis.call('HGET', ARGV[4] .. holder, 'status')
    if $active then return holder end
  end
  redis.call('SET', KEYS[3], ARGV[1])
end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return false
""").substitute(active=_any_of(ACTIVE))
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
# status frees the job's scope lock (the job's `lock` field names the scope). KEYS: job hash.
# ARGV: n expected, expected..., field/value pairs.
_TRANSITION = Template("""
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
for i = 2, tonumber(ARGV[1]) + 1 do
  if current == ARGV[i] then
    local final = false
    for j = tonumber(ARGV[1]) + 2, #ARGV, 2 do
      redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
      local status = ARGV[j + 1]
      if ARGV[j] == 'status' and ($final) then final = true end
    end
    local scope = redis.call('HGET', KEYS[1], 'lock')
    if final and scope then
      scope = cjson.decode(scope)
      local key = '$lock_prefix' .. tostring(scope)
      if scope ~= cjson.null and redis.call('GET', key) == cjson.decode(redis.call('HGET', KEYS[1], 'id')) then
        redis.call('DEL', key)
      end
    end
    return 1
  end
end
return 0
""").substitute(final=_any_of(FINAL), lock_prefix=keys.lock(""))
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


class RedisStore:
    """Jobs shared by the service and every worker; kept `ttl` seconds after they end."""

    @classmethod
    def from_settings(cls, settings) -> "RedisStore":
        from redis import Redis

        return cls(Redis.from_url(settings.redis_url))

    def __init__(self, redis, ttl: int = 7 * 86400):
        self.r = redis
        self.ttl = ttl
        self._create = redis.register_script(_CREATE)
        self._finish = redis.register_script(_FINISH)
        self._transition = redis.register_script(_TRANSITION)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)

    def create(self, job: Job) -> None:
        scope = job.lock
        key = keys.job(job.id)
        lock = keys.lock(scope) if scope else key
        args = [job.id, job.created_at, "1" if scope else "0", keys.JOB_PREFIX]
        for k, v in job.stored().items():
            args += [k, v if k in COUNTERS else json.dumps(v)]
        holder = self._create(keys=[key, keys.INDEX, lock], args=args)
        if holder:
            raise conflict(holder.decode(), scope)

    def get(self, job_id: str) -> Job | None:
        with self.r.pipeline() as p:
            p.hgetall(keys.job(job_id))
            p.hgetall(keys.workers(job_id))
            p.lrange(keys.errors(job_id), 0, MAX_ERRORS - 1)
            p.scard(keys.chunks_done(job_id))
            raw, per_worker, errs, n_chunks = p.execute()
        if not raw:
            return None
        data = {}
        for k, v in raw.items():
            k = k.decode()
            data[k] = int(v) if k in COUNTERS else json.loads(v)
        return Job.from_stored(data, int(n_chunks), [json.loads(e) for e in errs],
                               {k.decode(): int(v) for k, v in per_worker.items()})

    def list(self, status: JobStatus | None = None, offset: int = 0, limit: int = 20) -> tuple[list[Job], int]:
        ids = [i.decode() for i in self.r.zrevrange(keys.INDEX, 0, -1)]
        jobs = []
        for job_id in ids:
            job = self.get(job_id)
            if job is None:  # expired: drop it from the index too
                self.r.zrem(keys.INDEX, job_id)
            elif status is None or job.status == status:
                jobs.append(job)
        return jobs[offset:offset + limit], len(jobs)

    def set(self, job_id: str, **fields) -> None:
        self.r.hset(keys.job(job_id), mapping={k: json.dumps(plain(v)) for k, v in fields.items()})

    def status(self, job_id: str) -> JobStatus | None:
        raw = self.r.hget(keys.job(job_id), "status")
        return JobStatus(json.loads(raw)) if raw else None

    def set_chunks(self, job_id: str, chunks: list[list[int]]) -> None:
        self.r.set(keys.chunks(job_id), json.dumps(chunks))

    def chunks(self, job_id: str) -> list[list[int]] | None:
        raw = self.r.get(keys.chunks(job_id))
        return json.loads(raw) if raw else None

    def transition(self, job_id: str, expect: tuple[JobStatus, ...], **fields) -> bool:
        args = [len(expect), *[json.dumps(s.value) for s in expect]]
        for k, v in fields.items():
            args += [k, json.dumps(plain(v))]
        ok = bool(self._transition(keys=[keys.job(job_id)], args=args))
        if ok and fields.get("status") in FINAL:
            self._expire(job_id)
        return ok

    def finish(self, job_id: str, outcome: str, tasks: dict[int, int], worker: str = "") -> int:
        if not tasks:
            return 0
        args = [outcome, worker]
        for t, regions in tasks.items():
            args += [int(t), int(regions)]
        return int(self._finish(keys=[keys.job(job_id), keys.done(job_id), keys.workers(job_id)], args=args))

    def finish_chunk(self, job_id: str, index: int) -> int:
        key = keys.chunks_done(job_id)
        with self.r.pipeline() as p:
            p.sadd(key, int(index))
            p.scard(key)
            return int(p.execute()[1])

    def done(self, job_id: str) -> set[int]:
        return {int(t) for t in self.r.smembers(keys.done(job_id))}

    def add(self, job_id: str, counter: str, n: int) -> None:
        self.r.hincrby(keys.job(job_id), counter, int(n))

    def claim(self, scope: str, tasks, owner: str, lease: float) -> dict[int, int]:
        tasks = [int(t) for t in tasks]
        if not tasks:
            return {}
        out = self._claim(keys=[keys.fence(scope)], args=[keys.claim_prefix(scope), owner, int(lease * 1000), self.ttl,
                                                           *tasks])
        return {int(out[i]): int(out[i + 1]) for i in range(0, len(out), 2)}

    def renew(self, scope: str, held: dict[int, int], owner: str, lease: float, job_id: str | None = None) -> set[int]:
        if not held:
            return set()
        args = [keys.claim_prefix(scope), owner, int(lease * 1000)]
        for t, token in held.items():
            args += [int(t), int(token)]
        done = keys.done(job_id) if job_id else keys.done("-none-")
        return {int(t) for t in self._renew(keys=[keys.fence(scope), done], args=args)}

    def release(self, scope: str, held: dict[int, int], owner: str) -> None:
        if held:
            args = [keys.claim_prefix(scope), owner]
            for t, token in held.items():
                args += [int(t), int(token)]
            self._release(keys=[], args=args)

    def add_error(self, job_id: str, task_id, message: str) -> None:
        key = keys.errors(job_id)
        with self.r.pipeline() as p:
            p.lpush(key, json.dumps({"task": task_id, "error": message, "at": time.time()}))
            p.ltrim(key, 0, MAX_ERRORS - 1)
            p.execute()

    def _expire(self, job_id: str) -> None:
        with self.r.pipeline() as p:
            for key in keys.of_job(job_id):
                p.expire(key, self.ttl)
            p.execute()

    def put_result(self, job_id: str, task_id, result: dict) -> None:
        self.r.hset(keys.results(job_id), str(task_id), json.dumps(result))

    def results(self, job_id: str) -> dict:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(keys.results(job_id)).items()}

    def set_report(self, job_id: str, report: dict, page: str) -> None:
        self.r.hset(keys.report(job_id), mapping={"json": json.dumps(report), "html": page})

    def report(self, job_id: str) -> tuple[dict, str] | None:
        raw = self.r.hgetall(keys.report(job_id))
        return (json.loads(raw[b"json"]), raw[b"html"].decode()) if raw else None
