"""Job stores: the same behaviour in memory and in a real Redis."""
import os
import time

import pytest
from redis import Redis

from backend.jobs.record import Job, JobRequest, JobStatus
from backend.jobs.redis_store import RedisStore
from backend.jobs.store import Conflict, MemoryStore
from backend.labelstudio.retry import Backoff, Transient, retry_after, with_retries

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    r = Redis.from_url(REDIS_URL)
    r.ping()  # Redis is part of the test environment: no skip
    r.flushdb()
    yield RedisStore(r, ttl=60)
    r.flushdb()


def new(store, job_id, created, status="queued", scope=None):
    store.create(Job(id=job_id, status=JobStatus(status), project=1, model_version="mv", created_at=created,
                     request=JobRequest(tasks=[5, 7], overwrite=True), label_config="<View/>",
                     scope=scope or f"dry-{job_id}", lock=scope))


def test_finish_counts_each_task_once_across_retries(store):
    new(store, "j1", 1.0)
    assert store.finish("j1", "predicted", {1: 3, 2: 0}, "w1") == 2
    assert store.finish("j1", "predicted", {2: 5, 3: 1}, "w2") == 1  # task 2 already finished: not again
    assert store.finish("j1", "failed", {1: 0}, "w2") == 0
    job = store.get("j1")
    assert (job.processed, job.predicted, job.failed, job.regions_added) == (3, 3, 0, 4)
    assert job.workers == {"w1": 2, "w2": 1}
    assert store.done("j1") == {1, 2, 3}
    assert job.request == JobRequest(tasks=[5, 7], overwrite=True)  # fields keep their types
    assert isinstance(job.status, JobStatus) and job.created_at == 1.0 and job.label_config == "<View/>"


def test_transition_never_overwrites_a_cancel(store):
    new(store, "j1", 1.0, status="running")
    assert store.transition("j1", (JobStatus.QUEUED, JobStatus.RUNNING), status=JobStatus.CANCELLED, cancelled_at=5.0)
    assert not store.transition("j1", (JobStatus.RUNNING,), status=JobStatus.SUCCEEDED)
    assert store.get("j1").status == store.status("j1") == JobStatus.CANCELLED
    assert store.get("j1").cancelled_at == 5.0
    assert not store.transition("missing", (JobStatus.RUNNING,), status=JobStatus.FAILED)
    assert store.status("missing") is None


def test_list_is_newest_first_filtered_and_paginated(store):
    for i, status in enumerate(["succeeded", "running", "failed", "running"]):
        new(store, f"j{i}", 100.0 + i, status=status)
    jobs, total = store.list()
    assert total == 4 and [j.id for j in jobs] == ["j3", "j2", "j1", "j0"]
    jobs, total = store.list(JobStatus.RUNNING, 0, 1)
    assert total == 2 and [j.id for j in jobs] == ["j3"]
    assert [j.id for j in store.list(JobStatus.RUNNING, 1, 5)[0]] == ["j1"]


def test_errors_keep_the_latest_twenty_and_chunks_round_trip(store):
    new(store, "j1", 1.0)
    for i in range(25):
        store.add_error("j1", i, f"boom {i}")
    errors = store.get("j1").errors
    assert len(errors) == 20 and errors[0] == {"task": 24, "error": "boom 24", "at": errors[0]["at"]}
    assert store.chunks("j1") is None
    store.set_chunks("j1", [[1, 2], [3]])
    assert store.chunks("j1") == [[1, 2], [3]]
    store.set("j1", total=3, chunks_total=2)
    assert (store.finish_chunk("j1", 0), store.finish_chunk("j1", 0), store.finish_chunk("j1", 1)) == (1, 1, 2)
    assert (store.get("j1").total, store.get("j1").chunks_done) == (3, 2)  # a chunk counts once


@pytest.mark.redis
def test_redis_jobs_expire_after_they_end():
    r = Redis.from_url(REDIS_URL)
    r.flushdb()
    s = RedisStore(r, ttl=1)
    new(s, "j1", 1.0, status="running")
    s.finish("j1", "predicted", {1: 1})
    assert r.ttl("sam3:job:j1") == -1  # running jobs never expire
    s.transition("j1", (JobStatus.RUNNING,), status=JobStatus.SUCCEEDED)
    assert 0 < r.ttl("sam3:job:j1") <= 1 and 0 < r.ttl("sam3:job:j1:done") <= 1
    time.sleep(1.2)
    assert s.get("j1") is None and s.list() == ([], 0)
    r.flushdb()


def test_retries_honour_retry_after_and_give_up_with_the_last_error(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    calls = iter([Transient("429", after=2.0), Transient("drop"), "ok"])

    def call():
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    assert with_retries(call, Backoff(attempts=3, base=0.5), "x") == "ok"
    assert slept[0] == 2.0 and 0.5 <= slept[1] <= 1.0  # second retry: 2 x base, with jitter
    with pytest.raises(Transient, match="always"):
        with_retries(lambda: (_ for _ in ()).throw(Transient("always")), Backoff(attempts=2, base=0.01), "x")


def test_retry_after_reads_seconds_and_http_dates():
    def R(value):
        return {"Retry-After": value} if value else {}

    assert retry_after(R("3")) == 3.0
    assert retry_after(R(None)) is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after(R(future)) <= 31


def test_one_active_job_per_scope_and_the_lock_goes_with_the_job(store):
    new(store, "a", 1.0, scope="7:mv1")
    with pytest.raises(Conflict) as e:
        new(store, "b", 2.0, scope="7:mv1")
    assert e.value.status == 409 and e.value.job_id == "a" and "job a" in e.value.message
    assert store.get("b") is None  # nothing stored for the refused job
    new(store, "c", 3.0, scope="7:mv2")  # another version
    new(store, "d", 4.0)  # a dry run locks nothing
    assert store.transition("a", (JobStatus.QUEUED,), status=JobStatus.RUNNING)
    with pytest.raises(Conflict):
        new(store, "b", 2.0, scope="7:mv1")
    assert store.transition("a", (JobStatus.RUNNING,), status=JobStatus.SUCCEEDED)  # final: the lock is free
    new(store, "b", 5.0, scope="7:mv1")
    with pytest.raises(Conflict) as e:
        new(store, "e", 6.0, scope="7:mv1")
    assert e.value.job_id == "b"


def test_claims_give_a_task_to_one_owner_until_released_or_lapsed(store):
    w1 = store.claim("7:mv", [1, 2, 3], "w1", lease=0.5)
    assert set(w1) == {1, 2, 3}
    assert set(store.claim("7:mv", [2, 3, 4], "w2", lease=0.5)) == {4}  # 2 and 3 are w1's
    assert store.claim("7:mv", [1, 2], "w1", lease=0.5) == {1: w1[1], 2: w1[2]}  # renewed, same tokens
    assert set(store.claim("8:mv", [1], "w2", lease=0.5)) == {1}  # another scope
    store.release("7:mv", {1: w1[1]}, "w2")  # not w2's: nothing happens
    assert store.claim("7:mv", [1], "w2", lease=0.5) == {}
    store.release("7:mv", {1: w1[1]}, "w1")
    assert set(store.claim("7:mv", [1], "w2", lease=0.5)) == {1}
    time.sleep(0.7)  # w1 went silent: its leases lapse
    assert set(store.claim("7:mv", [2, 3], "w2", lease=5)) == {2, 3}
    assert store.claim("7:mv", [2, 3], "w1", lease=5) == {}


def test_a_claim_paused_past_its_lease_is_never_taken_back(store):
    """The fencing token: whatever another runner did with the task meanwhile, the paused one cannot renew it."""
    new(store, "j1", 1.0)
    a = store.claim("7:mv", [1, 2, 3, 4], "a", lease=0.3)
    time.sleep(0.4)  # a is paused past its lease
    b = store.claim("7:mv", [1, 2, 3], "b", lease=5)  # b takes over 1, 2 and 3 (4 nobody takes)
    assert set(b) == {1, 2, 3} and all(b[t] > a[t] for t in b)
    store.finish("j1", "predicted", {1: 1}, "b")  # b posted 1 and released it
    store.release("7:mv", {1: b[1]}, "b")
    store.release("7:mv", {3: b[3]}, "b")  # b released 3 unfinished (it failed, or was skipped)
    # a wakes up: 1 (finished, released), 2 (held by b), 3 (released by b): none is a's; 4 lapsed untouched: a's
    assert store.renew("7:mv", a, "a", lease=5, job_id="j1") == {4}
    assert store.renew("7:mv", {2: b[2]}, "b", lease=5, job_id="j1") == {2}  # b's own claim stands
    # a fresh claim is a new token: a may label 3 again (nobody posted it), never 1 with the stale token
    again = store.claim("7:mv", [3], "a", lease=5)
    assert set(again) == {3} and again[3] > b[3]
    assert store.renew("7:mv", {1: a[1]}, "a", lease=5, job_id="j1") == set()
    # finished tasks are never renewed, even by the claim's holder
    store.finish("j1", "predicted", {2: 1}, "b")
    assert store.renew("7:mv", {2: b[2]}, "b", lease=5, job_id="j1") == set()
