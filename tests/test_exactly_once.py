"""Exactly one prediction per task and model_version, whatever the order of events: the real runner, store and
poster against an in-memory Label Studio that fails the ways a real one does (fast; no server, no Redis).

Each test puts two runs of one chunk in a disorderly order: one paused past its lease while the other takes
over (and finishes, or is mid-chunk, or crashes too), two runs that share no store, faults around posting.
"""
import threading
import time

import pytest
from conftest import data_uri, make_image
from fakels import FakeLabelStudio

from backend.annotate.backend import SAM3Backend
from backend.annotate.task import Task
from backend.config import Settings
from backend.jobs import lifecycle, poster, runner
from backend.jobs.store import MemoryStore
from backend.labelstudio.client import LabelStudioAPI
from backend.labelstudio.retry import Backoff
from backend.sam3.model import Sam3Model

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
</View>"""
THRESHOLDS = {"confidence": 0.0, "max_detections": 2}  # the tiny random model scores everything ~0.25
N = 4  # tasks in the project


class PausableStore:
    """A job store as seen by one process: `pause()` stops every call, as SIGSTOP stops the whole process
    (its heartbeat thread included) until `resume()`."""

    def __init__(self, store):
        self._store, self._running = store, threading.Event()
        self._running.set()

    def pause(self):
        self._running.clear()

    def resume(self):
        self._running.set()

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._running.wait()
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def project(checkpoint, engine):
    ls = FakeLabelStudio(CONFIG)
    tasks = [ls.add_task({"image": data_uri(make_image(seed=700 + i))}) for i in range(N)]
    settings = Settings(model=checkpoint, device="cpu", job_heartbeat=1, post_batch=100, api_retries=4)
    return ls, tasks, settings, Sam3Model(settings, engine)


def api_of(ls):
    return LabelStudioAPI(ls, Backoff(attempts=4, base=0.01))


def start_job(ls, settings, sam3, store, **body):
    job = lifecycle.create(store, api_of(ls), settings, sam3, {"project": 1, "thresholds": THRESHOLDS, **body})
    return job, lifecycle.Context(settings, sam3, store, api_of(ls), worker="planner")


def run(ctx, job_id, chunk, index=0):
    t = threading.Thread(target=runner.run_chunk, args=(ctx, job_id, index, chunk, 0.1), daemon=True)
    t.start()
    return t


def paused_before_posting(monkeypatch, who: str):
    """The run of worker `who` stops once it has labelled its tasks and is about to post them (its store
    paused too); returns (reached, go) events."""
    reached, go = threading.Event(), threading.Event()
    real = runner.ChunkRun.save

    def save(self, *args, **kwargs):
        if self.ctx.worker == who:
            self.ctx.store.pause()
            reached.set()
            go.wait(60)
            self.ctx.store.resume()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(runner.ChunkRun, "save", save)
    return reached, go


def exactly_one(ls, tasks, mv):
    assert {t: len(ls.of(t, mv)) for t in tasks} == {t: 1 for t in tasks}


@pytest.mark.parametrize("takeover", ["finished", "mid-chunk", "crashed"])
def test_a_run_paused_past_its_lease_never_posts_what_another_claimed(project, monkeypatch, takeover):
    ls, tasks, settings, sam3 = project
    shared = MemoryStore()
    job, ctx = start_job(ls, settings, sam3, shared)
    [chunk] = runner.plan(ctx, job.id)
    mv = job.model_version
    reached, go = paused_before_posting(monkeypatch, "A")
    a_store = PausableStore(shared)
    a = run(lifecycle.Context(settings, sam3, a_store, api_of(ls), worker="A"), job.id, chunk)
    assert reached.wait(60)  # A holds every task, labelled, unposted: paused
    time.sleep(1.5)  # past its lease (1 s): nobody renews it
    if takeover == "crashed":
        # B claims the tasks and dies before posting; its claims lapse too
        assert set(shared.claim(job.scope, chunk, "B", lease=0.5)) == set(chunk)
        time.sleep(0.7)
    else:
        b_ctx = lifecycle.Context(settings, sam3, shared, api_of(ls), worker="B")
        if takeover == "mid-chunk":  # B is between labelling and posting when A wakes up
            b_at_post, b_go = threading.Event(), threading.Event()
            ls.hooks.append(("POST /api/projects/1/import", lambda: (b_at_post.set(), b_go.wait(60))))
            b = run(b_ctx, job.id, chunk)
            assert b_at_post.wait(60)
        else:
            b = run(b_ctx, job.id, chunk)
            b.join(60)
            assert shared.get(job.id).status == "succeeded"
            exactly_one(ls, tasks, mv)
    go.set()  # A wakes up with its labelled tasks in hand
    if takeover == "mid-chunk":
        time.sleep(0.5)  # A tries to post while B still holds the claims
        b_go.set()
        b.join(60)
    a.join(60)
    assert not a.is_alive()
    final = shared.get(job.id)
    assert final.status == "succeeded" and final.processed == N, final
    exactly_one(ls, tasks, mv)
    by = final.workers
    if takeover == "crashed":
        assert by == {"A": N}  # A labelled them again under new claims: nobody had posted them
    else:
        assert by == {"B": N}, by  # every post was B's: A's stale claims posted nothing


def test_runs_that_share_no_store_end_with_one_prediction_each(project, monkeypatch):
    """The command line beside a service without Redis: both read every task before either posts."""
    ls, tasks, settings, sam3 = project
    service, cli = MemoryStore(), MemoryStore()
    job1, ctx1 = start_job(ls, settings, sam3, service)
    job2, ctx2 = start_job(ls, settings, sam3, cli)
    assert job1.model_version == job2.model_version
    mv = job1.model_version
    # The service's post waits until the command line has read every task for its last look, and posted.
    cli_done = threading.Event()
    ls.hooks.append(("POST /api/projects/1/import", lambda: cli_done.wait(60)))
    first = threading.Thread(target=runner.run_all, args=(ctx1, job1.id), daemon=True)
    first.start()
    time.sleep(0.5)  # the service has read its tasks and waits on its post
    runner.run_all(ctx2, job2.id)
    cli_done.set()
    first.join(60)
    exactly_one(ls, tasks, mv)
    a, b = service.get(job1.id), cli.get(job2.id)
    assert a.status == b.status == "succeeded"
    assert a.predicted == b.predicted == N  # both posted every task...
    assert a.duplicates_removed == N  # ...and the rule removed the later posts (the service's)
    kept = {p["id"] for t in tasks for p in ls.of(t, mv)}
    assert max(kept) < min(set(ls.predictions) - kept, default=10**9)  # the oldest of each stayed


def test_a_task_another_run_posted_meanwhile_keeps_that_runs_prediction(project):
    ls, tasks, settings, sam3 = project
    job, ctx = start_job(ls, settings, sam3, MemoryStore())
    mv = job.model_version
    other = {}

    def elsewhere():  # after this run read task 0, right before it posts, another run posts task 0
        other["id"] = ls.add_prediction(tasks[0], mv)

    ls.hooks.append(("POST /api/projects/1/import", elsewhere))
    runner.run_all(ctx, job.id)
    done = ctx.store.get(job.id)
    assert (done.predicted, done.duplicates_removed) == (N, 1), done
    exactly_one(ls, tasks, mv)
    assert ls.of(tasks[0], mv)[0]["id"] == other["id"]  # the older one stays


def test_a_task_read_with_duplicates_is_healed_by_the_same_rule(project):
    ls, tasks, settings, sam3 = project
    job, ctx = start_job(ls, settings, sam3, MemoryStore())
    mv = job.model_version
    first, second = ls.add_prediction(tasks[2], mv), ls.add_prediction(tasks[2], mv)
    runner.run_all(ctx, job.id)
    exactly_one(ls, tasks, mv)
    assert [p["id"] for p in ls.of(tasks[2], mv)] == [first] and second not in ls.predictions
    assert ctx.store.get(job.id).duplicates_removed == 1


@pytest.mark.parametrize("fault", ["500-after", "drop-after", "drop-before", "429", "500"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_faults_around_posting_lose_and_duplicate_nothing(project, fault, overwrite):
    ls, tasks, settings, sam3 = project
    job, ctx = start_job(ls, settings, sam3, MemoryStore())
    mv = job.model_version
    old = {t: ls.add_prediction(t, mv) for t in tasks[:3]} if overwrite else {}
    ls.faults += [("POST /api/projects/1/import", fault), ("GET /api/tasks/", "429"),
                  ("DELETE /api/predictions/", "drop-after"), ("GET /api/predictions/", "drop-before"),
                  ("GET /api/predictions/", "500")]
    if overwrite:
        job, ctx = start_job(ls, settings, sam3, MemoryStore(), overwrite=True)
    runner.run_all(ctx, job.id)
    done = ctx.store.get(job.id)
    assert done.status == "succeeded" and done.failed == 0, done
    exactly_one(ls, tasks, mv)
    if overwrite:
        assert not set(old.values()) & set(ls.predictions)  # replaced
        assert done.predicted == N
    else:
        assert done.predicted + done.skipped == N


def test_a_late_batch_is_posted_through_the_api_and_the_rest_handed_on(settings, engine, monkeypatch):
    """Retrieve Predictions: a task that ran past Label Studio's limit is posted, never returned to a caller
    that stopped waiting; every task ends either posted or handed on, none answered with a result."""

    real = engine.encode_many
    slow_first = {"n": 0}

    def slow(images, keys=None):
        slow_first["n"] += 1
        time.sleep(1.3 if slow_first["n"] == 1 else 0.05)
        return real(images, keys)

    monkeypatch.setattr(engine, "encode_many", slow)
    settings.predict_budget, settings.predict_timeout = 0.5, 1.0
    model = SAM3Backend(label_config=CONFIG, settings=settings, sam3=Sam3Model(settings, engine),
                        extra_params={"thresholds": THRESHOLDS})
    tasks = [Task(i, {"image": data_uri(make_image(seed=800 + i))}) for i in range(5)]
    posted, handed = {}, []

    def late(ready):
        posted.update({tasks[i].id: answer for i, (task, answer) in ready.items()})
        return list(ready)

    answers = model.predict(tasks, late=late, handoff=lambda rest: handed.extend(t.id for t in rest) or "j1")
    assert len(answers) == 5 and not any("result" in a for a in answers)
    assert list(posted) == [0] and posted[0]["result"] is not None
    assert handed == [1, 2, 3, 4]
    assert "posted through the API" in answers[0]["error"] and all("job j1" in a["error"] for a in answers[1:])


def test_answers_to_a_caller_that_hung_up_are_posted(settings, engine):

    model = SAM3Backend(label_config=CONFIG, settings=settings, sam3=Sam3Model(settings, engine),
                        extra_params={"thresholds": THRESHOLDS})
    tasks = [Task(i, {"image": data_uri(make_image(seed=810 + i))}) for i in range(2)]
    posted = []
    answers = model.predict(tasks, late=lambda ready: posted.extend(ready) or list(ready), client_gone=lambda: True)
    assert posted == [0, 1] and not any("result" in a for a in answers)
    # not posted (no connection): handed on, never returned as a result to nobody
    handed = []
    answers = model.predict(tasks, client_gone=lambda: True, handoff=lambda rest: handed.extend(rest) or "j2")
    assert len(handed) == 2 and not any("result" in a for a in answers)
    # still there, in time: answered as usual
    answers = model.predict(tasks, late=lambda ready: pytest.fail("posted"), client_gone=lambda: False)
    assert all("result" in a for a in answers)


def test_poster_rule_keeps_the_oldest_of_this_version_only():
    task = {"id": 1, "predictions": [{"id": 9, "model_version": "m"}, {"id": 4, "model_version": "m"},
                                     {"id": 2, "model_version": "other"}, {"id": 7, "model_version": "m"}]}
    assert poster.duplicates(task, "m") == [7, 9]
    assert poster.duplicates(task, "m", before={4}) == [9]  # overwrite: among those made since the read
    assert poster.duplicates(task, "other") == []
