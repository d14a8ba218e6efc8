"""Bulk label jobs against a real Label Studio and a real Redis, with real rq worker processes."""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from conftest import make_image, png_bytes
from faultproxy import FaultProxy
from redis import Redis

from backend.config import Settings
from backend.http.app import create_app

pytestmark = pytest.mark.e2e
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
JOB_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
</View>"""
# The tiny random model scores every instance ~0.25: a zero threshold gives every task regions.
THRESHOLDS = {"confidence": 0.0, "max_detections": 2}


# ---- Label Studio helpers ------------------------------------------------------------------------
def make_project(ls, n=20, config=JOB_CONFIG):
    url, headers, _ = ls
    r = requests.post(f"{url}/api/projects", headers=headers, json={"title": f"jobs {uuid.uuid4().hex[:6]}",
                                                                    "label_config": config})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    for i in range(n):
        r = requests.post(f"{url}/api/projects/{pid}/import", headers=headers,
                          files={"file": (f"img{i}.png", png_bytes(make_image(seed=100 + i)), "image/png")})
        assert r.status_code == 201, r.text
    tasks = requests.get(f"{url}/api/tasks", params={"project": pid, "page_size": 1000}, headers=headers).json()["tasks"]
    assert len(tasks) == n
    return pid, sorted(t["id"] for t in tasks)


def predictions_by_task(ls, task_ids) -> dict[int, list[dict]]:
    url, headers, _ = ls
    return {t: requests.get(f"{url}/api/predictions", params={"task": t}, headers=headers).json() for t in task_ids}


def versions(preds: list[dict], mv: str) -> list[dict]:
    return [p for p in preds if p["model_version"] == mv]


# ---- the service and the workers -----------------------------------------------------------------
def service(engine, checkpoint, ls_url, token, **extra):
    settings = Settings(model=checkpoint, device="cpu", label_studio_url=ls_url, label_studio_api_key=token, **extra)
    return create_app(settings, engine=engine).test_client()


def rq_job(ls, engine, checkpoint, workers, pid, thresholds=THRESHOLDS, **body):
    """The service (in this process, jobs to Redis) and a job it queued for `workers`."""
    client = service(engine, checkpoint, ls[0], ls[2], redis_url=REDIS_URL, queue=workers.env["SAM3_QUEUE"])
    r = client.post("/jobs", json={"project": pid, "thresholds": thresholds, **body})
    assert r.status_code == 202, r.get_json()
    return client, r.get_json()["job_id"]


def wait_job(client, job_id, until=lambda j: j["status"] not in ("queued", "running"), timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}").get_json()
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {job}")


class Workers:
    """`label-studio-sam3 worker` processes, exactly as operators start them."""

    def __init__(self, tmp_path, checkpoint, ls_url, token, queue, **env):
        self.procs, self.logs = {}, {}
        self.env = dict(os.environ, SAM3_MODEL=checkpoint, DEVICE="cpu", REDIS_URL=REDIS_URL, SAM3_QUEUE=queue,
                        LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY=token, SAM3_JOB_HEARTBEAT="3",
                        LOG_LEVEL="INFO", **env)
        self.tmp_path = tmp_path
        self.exe = str(Path(sys.executable).with_name("label-studio-sam3"))

    def start(self, name, **env):
        log = self.tmp_path / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            self.procs[name] = subprocess.Popen([self.exe, "worker", "--name", name], stdout=out,
                                                stderr=subprocess.STDOUT, env={**self.env, **env})

    def terminate(self, name):
        self.procs[name].terminate()
        self.procs[name].wait(60)

    def kill(self, name):
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def log(self, name):
        return self.logs[name].read_text()[-4000:]


@pytest.fixture
def redis_db():
    r = Redis.from_url(REDIS_URL)
    r.ping()  # Redis is part of the test environment (.ci/run starts it): no skip
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture
def workers(tmp_path, checkpoint, label_studio):
    made = []

    def make(ls_url, **env):
        w = Workers(tmp_path, checkpoint, ls_url, label_studio[2], f"q-{uuid.uuid4().hex[:8]}", **env)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def assert_exactly_one(ls, task_ids, mv, skip=()):
    preds = predictions_by_task(ls, task_ids)
    for t in task_ids:
        expected = 0 if t in skip else 1
        assert len(versions(preds[t], mv)) == expected, (t, preds[t])
    return preds


# ---- embedded runner (no Redis) ------------------------------------------------------------------
def test_job_labels_a_project_once_skips_reruns_and_overwrite_replaces(label_studio, engine, checkpoint):
    url, headers, token = label_studio
    pid, task_ids = make_project(label_studio)
    annotated, foreign = task_ids[0], task_ids[1]
    r = requests.post(f"{url}/api/tasks/{annotated}/annotations", headers=headers, json={"result": []})
    assert r.status_code == 201, r.text
    r = requests.post(f"{url}/api/predictions", headers=headers,
                      json={"task": foreign, "result": [], "score": 0.1, "model_version": "someone-else"})
    assert r.status_code == 201, r.text
    client = service(engine, checkpoint, url, token)

    r = client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS})
    assert r.status_code == 202, r.get_json()
    first = r.get_json()
    assert first["status"] == "queued"
    job = wait_job(client, first["job_id"])
    mv = job["model_version"]
    assert job["status"] == "succeeded", job
    assert (job["total"], job["processed"], job["predicted"], job["skipped"], job["failed"]) == (20, 20, 19, 1, 0)
    preds = assert_exactly_one(label_studio, task_ids, mv, skip={annotated})
    regions = sum(len(p["result"]) for ps in preds.values() for p in versions(ps, mv))
    assert job["regions_added"] == regions > 0
    for ps in preds.values():
        for p in versions(ps, mv):
            assert all(reg["value"]["polygonlabels"][0] in ("cat", "dog") for reg in p["result"])
            assert 0 < p["score"] <= 1
    assert job["started_at"] and job["finished_at"] and job["tasks_per_second"] > 0

    again = wait_job(client, client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS}).get_json()["job_id"])
    assert again["model_version"] == mv
    assert (again["status"], again["predicted"], again["skipped"], again["regions_added"]) == ("succeeded", 0, 20, 0)
    assert_exactly_one(label_studio, task_ids, mv, skip={annotated})

    over = client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS, "overwrite": True}).get_json()
    over = wait_job(client, over["job_id"])
    assert (over["status"], over["predicted"], over["skipped"]) == ("succeeded", 19, 1)
    after = assert_exactly_one(label_studio, task_ids, mv, skip={annotated})
    old_ids = {p["id"] for ps in preds.values() for p in versions(ps, mv)}
    new_ids = {p["id"] for ps in after.values() for p in versions(ps, mv)}
    assert not old_ids & new_ids  # replaced, not kept
    assert [p["model_version"] for p in after[foreign] if p["model_version"] != mv] == ["someone-else"]
    ann = requests.get(f"{url}/api/tasks/{annotated}/annotations", headers=headers).json()
    assert len(ann) == 1  # human work untouched

    listed = client.get("/jobs").get_json()
    assert [j["id"] for j in listed["jobs"]][:3] == [over["id"], again["id"], job["id"]]  # newest first
    assert client.get("/jobs?status=failed").get_json()["total"] == 0


def test_dry_run_returns_predictions_and_posts_nothing(label_studio, engine, checkpoint):
    url, _, token = label_studio
    pid, task_ids = make_project(label_studio, n=4)
    client = service(engine, checkpoint, url, token)
    r = client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS, "dry_run": True, "limit": 3})
    job = wait_job(client, r.get_json()["job_id"])
    assert (job["status"], job["total"], job["predicted"]) == ("succeeded", 3, 3)
    assert [p["task"] for p in job["predictions"]] == task_ids[:3]
    assert all(p["result"] and p["model_version"] == job["model_version"] for p in job["predictions"])
    assert all(ps == [] for ps in predictions_by_task(label_studio, task_ids).values())


def test_bad_job_requests_are_refused_before_anything_is_queued(label_studio, engine, checkpoint):
    url, _, token = label_studio
    pid, _ = make_project(label_studio, n=1)
    text_pid, _ = make_project(label_studio, n=0, config='<View><Text name="t" value="$text"/>'
                                                           '<Choices name="c" toName="t"><Choice value="a"/></Choices></View>')
    client = service(engine, checkpoint, url, token)
    cases = [
        ({"project": pid, "ontology": {"a lion": "lion"}}, 400, "lion"),
        ({"project": 999999}, 404, "project 999999 not found"),
        ({"project": "abc"}, 400, "'project'"),
        ({"project": pid, "limit": 0}, 400, "'limit'"),
        ({"project": pid, "tasks": "all"}, 400, "'tasks'"),
        ({"project": pid, "thresholds": {"confidence": 2}}, 400, "between 0 and 1"),
        ({"project": pid, "overwrite": "maybe"}, 400, "overwrite"),
        ({"project": pid, "colour": "red"}, 400, "colour"),
        ({"project": text_pid}, 400, "Image"),
    ]
    for body, status, words in cases:
        r = client.post("/jobs", json=body)
        assert r.status_code == status, (body, r.get_json())
        assert words in r.get_json()["error"], (body, r.get_json())
    assert client.post("/jobs", data="not json", content_type="application/json").status_code == 400
    assert client.get("/jobs").get_json()["total"] == 0  # nothing was queued
    assert client.get("/jobs/nope").status_code == 404
    assert client.delete("/jobs/nope").status_code == 404
    assert client.get("/jobs?status=done").status_code == 400
    assert client.get("/jobs?limit=x").status_code == 400
    job = wait_job(client, client.post("/jobs", json={"project": pid, "dry_run": True}).get_json()["job_id"])
    r = client.delete(f"/jobs/{job['id']}")
    assert r.status_code == 409 and "succeeded" in r.get_json()["error"]


def test_unknown_task_ids_are_reported_as_failed(label_studio, engine, checkpoint):
    url, _, token = label_studio
    pid, task_ids = make_project(label_studio, n=2)
    client = service(engine, checkpoint, url, token)
    r = client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS, "tasks": [task_ids[1], 987654]})
    job = wait_job(client, r.get_json()["job_id"])
    assert (job["status"], job["total"], job["predicted"], job["failed"]) == ("succeeded", 2, 1, 1)
    assert job["errors"][0]["task"] == 987654 and "not in project" in job["errors"][0]["error"]
    assert_exactly_one(label_studio, task_ids, job["model_version"], skip={task_ids[0]})


# ---- rq workers ----------------------------------------------------------------------------------
def test_cancel_stops_the_worker_after_the_task_in_hand(label_studio, engine, checkpoint, redis_db, workers):
    url = label_studio[0]
    pid, task_ids = make_project(label_studio)
    with FaultProxy(url, delay=0.15) as proxy:
        w = workers(proxy.url, SAM3_POST_BATCH="1")
        w.start("w1")
        client, job_id = rq_job(label_studio, engine, checkpoint, w, pid, chunk_size=5)
        wait_job(client, job_id, until=lambda j: j["processed"] >= 3, timeout=120)
        r = client.delete(f"/jobs/{job_id}")
        assert r.status_code == 202 and r.get_json()["status"] == "cancelled"
        job = _settled(client, job_id)
    assert job["status"] == "cancelled"
    assert 3 <= job["processed"] < 20, job
    preds = predictions_by_task(label_studio, task_ids)
    posted = [t for t in task_ids if versions(preds[t], job["model_version"])]
    assert all(len(versions(preds[t], job["model_version"])) == 1 for t in posted)
    assert len(posted) == job["predicted"]  # every post is counted; nothing half-posted

    # run it again: the rest is labelled, nothing twice
    w.terminate("w1")
    job2 = client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS, "chunk_size": 5}).get_json()
    w.env["LABEL_STUDIO_URL"] = url
    w.start("w2")
    job2 = wait_job(client, job2["job_id"])
    assert (job2["status"], job2["predicted"], job2["skipped"]) == ("succeeded", 20 - len(posted), len(posted)), (job2, w.log("w1"), w.log("w2"))
    assert_exactly_one(label_studio, task_ids, job["model_version"])


def _wait_workers(redis, n, timeout=120, names=()):
    """Until `n` workers are registered (and those of `names` among them)."""
    from rq import Worker

    deadline = time.time() + timeout
    while True:
        registered = {w.name for w in Worker.all(connection=redis)}
        if len(registered) >= n and set(names) <= registered:
            return
        assert time.time() < deadline, f"workers did not start: {registered}"
        time.sleep(0.2)


def _settled(client, job_id, quiet=2.0, timeout=60):
    """The job once its counters stop moving (the worker finished the task in hand)."""
    last, since, deadline = None, time.time(), time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}").get_json()
        key = (job["processed"], job["predicted"])
        if key != last:
            last, since = key, time.time()
        elif time.time() - since > quiet:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} kept moving")


def test_killed_worker_is_replaced_and_every_task_gets_exactly_one(label_studio, engine, checkpoint, redis_db,
                                                                    workers):
    url = label_studio[0]
    pid, task_ids = make_project(label_studio)
    with FaultProxy(url, delay=0.1) as proxy:
        w = workers(proxy.url, SAM3_POST_BATCH="2")
        w.start("doomed")
        client, job_id = rq_job(label_studio, engine, checkpoint, w, pid, chunk_size=5)
        wait_job(client, job_id, until=lambda j: j["processed"] >= 4, timeout=120)
        w.kill("doomed")
        killed_at = client.get(f"/jobs/{job_id}").get_json()
        assert killed_at["status"] == "running" and killed_at["processed"] < 20
        time.sleep(4)  # past its heartbeat: its chunk is abandoned
        w.start("rescuer")
        job = wait_job(client, job_id, timeout=180)
    assert job["status"] == "succeeded", (job, w.log("rescuer"))
    assert job["processed"] == 20 and job["failed"] == 0
    assert job["predicted"] + job["skipped"] == 20  # a task posted just before the kill is found, not reposted
    assert job["workers"].get("rescuer", 0) > 0
    assert_exactly_one(label_studio, task_ids, job["model_version"])


def test_faults_between_worker_and_label_studio_lose_and_duplicate_nothing(label_studio, engine, checkpoint,
                                                                           redis_db, workers):
    url = label_studio[0]
    pid, task_ids = make_project(label_studio)
    # 1 request in 3 fails (429, 500, reset before and after the body); the first bulk imports are stored
    # and then reported as failed or dropped.
    script = {"/import/predictions": ["drop-after", "500-after", "429", "drop-before"]}
    with FaultProxy(url, every=3, kinds=("429", "500", "500-after", "drop-before", "drop-after"),
                    script=script) as proxy:
        w = workers(proxy.url, SAM3_POST_BATCH="4", SAM3_API_RETRIES="8")
        w.start("w1")
        client, job_id = rq_job(label_studio, engine, checkpoint, w, pid, chunk_size=10)
        job = wait_job(client, job_id)
        faults = dict(proxy.faults)
    assert job["status"] == "succeeded", (job, w.log("w1"))
    assert (job["processed"], job["predicted"], job["failed"]) == (20, 20, 0), job
    assert_exactly_one(label_studio, task_ids, job["model_version"])
    kinds = {k for (k, method, path) in faults}
    assert kinds == {"429", "500", "500-after", "drop-before", "drop-after"}, faults
    assert sum(n for (k, method, path), n in faults.items() if path.endswith("/import") and k.endswith("after")) >= 2
    assert sum(faults.values()) >= 10


def test_two_workers_share_one_job_and_never_post_a_task_twice(label_studio, engine, checkpoint, redis_db, workers):
    url = label_studio[0]
    pid, task_ids = make_project(label_studio)
    with FaultProxy(url, delay=0.05) as proxy:
        w = workers(proxy.url, SAM3_POST_BATCH="2")
        w.start("a")
        w.start("b")
        _wait_workers(redis_db, 2)  # both hold the model before the chunks arrive
        client, job_id = rq_job(label_studio, engine, checkpoint, w, pid, chunk_size=2)
        job = wait_job(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["predicted"] == 20 and sum(job["workers"].values()) == 20
    assert set(job["workers"]) == {"a", "b"} and min(job["workers"].values()) >= 2, job["workers"]
    assert_exactly_one(label_studio, task_ids, job["model_version"])


# ---- command line --------------------------------------------------------------------------------
def test_label_command_runs_a_job_here_or_queues_it(label_studio, checkpoint, redis_db, tmp_path):
    url, _, token = label_studio
    pid, task_ids = make_project(label_studio, n=3)
    exe = str(Path(sys.executable).with_name("label-studio-sam3"))
    env = dict(os.environ, SAM3_MODEL=checkpoint, DEVICE="cpu", LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY=token,
               REDIS_URL=REDIS_URL, SAM3_QUEUE="cli-test", LOG_LEVEL="WARNING")
    run = subprocess.run([exe, "label", "--project", str(pid), "--limit", "2", "--prompt", "cat", "--threshold", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "succeeded: 2 tasks, 2 predicted" in run.stderr and "tasks/s" in run.stderr
    preds = predictions_by_task(label_studio, task_ids)
    assert [len(preds[t]) for t in task_ids] == [1, 1, 0]
    assert all(r["value"]["polygonlabels"] == ["cat"] for t in task_ids[:2] for r in preds[t][0]["result"])

    bad = subprocess.run([exe, "label", "--project", str(pid), "--prompt", "lion"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "lion" in bad.stderr

    queued = subprocess.run([exe, "label", "--project", str(pid), "--queue"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert queued.returncode == 0, queued.stderr
    job_id = queued.stdout.strip()
    shown = subprocess.run([exe, "jobs", job_id, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and f'"id": "{job_id}"' in shown.stdout and '"status": "queued"' in shown.stdout
    listed = subprocess.run([exe, "jobs"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.stdout.startswith(job_id) and "queued" in listed.stdout


# ---- a task URL written to fool a parser --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["legacy", "pat"])
def test_a_job_never_sends_the_token_to_a_crafted_task_url(label_studio, engine, checkpoint, kind,
                                                           personal_access_token):
    from peers import Capture
    from test_security import hostile_urls

    url, headers, token = label_studio
    if kind == "pat":
        token = personal_access_token  # refreshed, then sent as Bearer
    capture = Capture()
    try:
        pid, real = make_project(label_studio, n=1)
        crafted = hostile_urls(url, capture.url)
        r = requests.post(f"{url}/api/projects/{pid}/import", headers=headers, json=[{"image": u} for u in crafted])
        assert r.status_code == 201, r.text
        client = service(engine, checkpoint, url, token)
        job = wait_job(client, client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS}).get_json()["job_id"])
    finally:
        capture.close()
    assert capture.connections == 0
    assert (job["status"], job["predicted"], job["failed"]) == ("succeeded", 1, len(crafted)), job
    task_ids = sorted(t["id"] for t in requests.get(f"{url}/api/tasks", params={"project": pid, "page_size": 100},
                                                    headers=headers).json()["tasks"])
    preds = predictions_by_task(label_studio, task_ids)
    assert [len(preds[t]) for t in task_ids] == [1] + [0] * len(crafted)  # a failure is not a result


# ---- runs that overlap ---------------------------------------------------------------------------------
def test_a_second_job_on_the_same_project_is_refused_with_the_running_ones_id(label_studio, engine, checkpoint,
                                                                              redis_db, workers, tmp_path):
    url, _, token = label_studio
    pid, task_ids = make_project(label_studio, n=6)
    with FaultProxy(url, delay=0.2) as proxy:  # slow enough that the first job is still running
        w = workers(proxy.url)
        same = {"confidence": 0.0}  # what the command line's --threshold 0 asks for: the same model_version
        client, first = rq_job(label_studio, engine, checkpoint, w, pid, chunk_size=3, thresholds=same)
        r = client.post("/jobs", json={"project": pid, "thresholds": same})  # the double click
        assert r.status_code == 409 and r.get_json()["job_id"] == first, r.get_json()
        assert first in r.get_json()["error"]
        # the command line beside the service, on the same Redis, is refused the same way
        exe = str(Path(sys.executable).with_name("label-studio-sam3"))
        env = dict(os.environ, SAM3_MODEL=checkpoint, DEVICE="cpu", LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY=token,
                   REDIS_URL=REDIS_URL, SAM3_QUEUE=w.env["SAM3_QUEUE"], LOG_LEVEL="WARNING")
        cli = subprocess.run([exe, "label", "--project", str(pid), "--threshold", "0"], env=env, capture_output=True,
                             text=True, timeout=300)
        assert cli.returncode == 2 and f"job {first} is already labelling project {pid}" in cli.stderr, cli.stderr
        dry = client.post("/jobs", json={"project": pid, "thresholds": same, "dry_run": True})
        assert dry.status_code == 202  # a dry run posts nothing: it takes no lock
        w.start("w1")
        job = wait_job(client, first)
        assert job["status"] == "succeeded", job
        again = client.post("/jobs", json={"project": pid, "thresholds": same})  # the lock went with the job
        assert again.status_code == 202, again.get_json()
        wait_job(client, again.get_json()["job_id"])
    assert_exactly_one(label_studio, task_ids, job["model_version"])


def test_the_same_chunk_run_twice_at_once_posts_each_task_once(label_studio, engine, checkpoint, redis_db):
    """What rq does when it thinks a live worker died: a second run of its chunk, beside the first."""
    import threading

    from backend.jobs import lifecycle, runner
    from backend.jobs.redis_store import RedisStore
    from backend.labelstudio import client
    from backend.sam3.model import Sam3Model

    url, _, token = label_studio
    pid, task_ids = make_project(label_studio, n=8)
    with FaultProxy(url, delay=0.05) as proxy:
        settings = Settings(model=checkpoint, device="cpu", label_studio_url=proxy.url, label_studio_api_key=token,
                            post_batch=2, job_heartbeat=3)
        store = RedisStore(Redis.from_url(REDIS_URL))
        api = client.api(settings)
        sam3 = Sam3Model(settings, engine)
        job = lifecycle.create(store, api, settings, sam3, {"project": pid, "thresholds": THRESHOLDS})
        [chunk] = runner.plan(lifecycle.Context(settings, sam3, store, api, worker="planner"), job.id)
        runs = [threading.Thread(target=runner.run_chunk, args=(
            lifecycle.Context(settings, sam3, store, api, worker=f"run{i}"), job.id, 0, chunk)) for i in range(2)]
        for t in runs:
            t.start()
        for t in runs:
            t.join(300)
    job = store.get(job.id)
    assert job.status == "succeeded" and job.chunks_done == 1, job
    assert (job.processed, job.predicted) == (8, 8) and sum(job.workers.values()) == 8, job
    assert_exactly_one(label_studio, task_ids, job.model_version)


@pytest.mark.parametrize("wake", ["after the takeover finished", "while the takeover is mid-chunk"])
def test_a_worker_paused_past_its_lease_never_posts_twice(label_studio, engine, checkpoint, redis_db, workers, wake):
    """SIGSTOP a worker holding labelled, unposted tasks; another worker takes its chunk over; SIGCONT it once
    the takeover has posted everything and released its claims, or while it is labelling. Repeated trials, each
    its own model_version: never a second prediction."""
    url = label_studio[0]
    pid, task_ids = make_project(label_studio, n=6)
    with FaultProxy(url, delay=0.25) as proxy:  # a chunk takes seconds: there is time to act in the middle
        w = workers(proxy.url, SAM3_POST_BATCH="6")  # a chunk's predictions are posted together, at its end
        for trial in range(2):
            sleeper, rescuer = f"sleeper{trial}", f"rescuer{trial}"
            w.start(sleeper, LOG_LEVEL="DEBUG")
            _wait_workers(redis_db, 1, names=[sleeper])
            thresholds = {**THRESHOLDS, "nms_iou": round(0.2 + trial / 100 + wake.startswith("while") / 10, 3)}
            client, job_id = rq_job(label_studio, engine, checkpoint, w, pid, chunk_size=6, thresholds=thresholds)
            deadline = time.time() + 120
            while "labelled, 2 to post" not in w.logs[sleeper].read_text():  # two tasks in hand, unposted
                assert time.time() < deadline, w.log(sleeper)
                time.sleep(0.05)
            w.procs[sleeper].send_signal(signal.SIGSTOP)  # alive, but silent: no heartbeat, no lease renewal
            mv = client.get(f"/jobs/{job_id}").get_json()["model_version"]
            assert all(not versions(ps, mv) for ps in predictions_by_task(label_studio, task_ids).values())
            time.sleep(4)  # past its lease (3 s)
            w.start(rescuer)  # rq hands the abandoned chunk to it
            if wake.startswith("after"):
                job = wait_job(client, job_id, timeout=240)
                assert job["status"] == "succeeded", (job, w.log(rescuer))
                assert_exactly_one(label_studio, task_ids, mv)
            else:
                claims = f"sam3:claim:{pid}:{mv}:*"
                deadline = time.time() + 120
                while not any(redis_db.get(k).startswith(rescuer.encode()) for k in redis_db.scan_iter(claims)
                              if redis_db.get(k)):
                    assert time.time() < deadline, w.log(rescuer)
                    time.sleep(0.05)
                assert client.get(f"/jobs/{job_id}").get_json()["status"] == "running"
            w.procs[sleeper].send_signal(signal.SIGCONT)  # it wakes up with two labelled tasks in hand
            job = wait_job(client, job_id, timeout=240)
            deadline = time.time() + 60  # the sleeper finishes what it had in hand: its log says so
            while "not posting them" not in w.logs[sleeper].read_text() and time.time() < deadline:
                time.sleep(0.2)
            assert "not posting them" in w.logs[sleeper].read_text(), w.log(sleeper)
            assert job["status"] == "succeeded", (trial, job, w.log(sleeper), w.log(rescuer))
            assert job["processed"] == 6 and job["failed"] == 0, (trial, job)
            assert job["workers"].get(rescuer, 0) > 0, job
            assert_exactly_one(label_studio, task_ids, mv)
            w.terminate(sleeper)
            w.terminate(rescuer)


def test_workers_killed_at_random_points_never_post_twice(label_studio, engine, checkpoint, redis_db, workers):
    """20 trials: a worker is SIGKILLed at a random moment of a job; a second worker finishes it."""
    import random

    url = label_studio[0]
    pid, task_ids = make_project(label_studio, n=6)
    rng = random.Random(20261124)
    with FaultProxy(url, delay=0.03) as proxy:
        w = workers(proxy.url, SAM3_POST_BATCH="2")
        w.start("rescuer")
        w.start("victim0")
        _wait_workers(redis_db, 1, names=["rescuer"])
        for trial in range(20):
            victim = f"victim{trial}"
            _wait_workers(redis_db, 2, names=[victim])  # holding the model, ready to take chunks
            # each trial its own model_version (its own thresholds) on the same tasks
            thresholds = {**THRESHOLDS, "nms_iou": round(0.3 + trial / 100, 2)}
            client, job_id = rq_job(label_studio, engine, checkpoint, w, pid, chunk_size=2, thresholds=thresholds)
            time.sleep(rng.uniform(0, 1.5))
            w.kill(victim)
            if trial < 19:
                w.start(f"victim{trial + 1}")  # loads its model while the rescuer finishes this job
            job = wait_job(client, job_id, timeout=120)
            assert job["status"] == "succeeded", (trial, job, w.log("rescuer"))
            assert job["processed"] == 6 and job["failed"] == 0, (trial, job)
            assert_exactly_one(label_studio, task_ids, job["model_version"])


def test_overwrite_never_leaves_a_task_with_neither(label_studio, engine, checkpoint):
    url, _, token = label_studio
    pid, task_ids = make_project(label_studio, n=3)
    client = service(engine, checkpoint, url, token)
    first = wait_job(client, client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS}).get_json()["job_id"])
    before = assert_exactly_one(label_studio, task_ids, first["model_version"])
    # every bulk import refused with a 500 (never applied): the new predictions cannot be posted
    with FaultProxy(url, script={"/import/predictions": ["500"] * 200}) as proxy:
        broken = service(engine, checkpoint, proxy.url, token, api_retries=2)
        r = broken.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS, "overwrite": True})
        job = wait_job(broken, r.get_json()["job_id"])
    assert (job["predicted"], job["failed"]) == (0, 3), job
    after = assert_exactly_one(label_studio, task_ids, first["model_version"])
    assert {p["id"] for ps in after.values() for p in ps} == {p["id"] for ps in before.values() for p in ps}
    job = wait_job(client, client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS,
                                                      "overwrite": True}).get_json()["job_id"])
    assert job["predicted"] == 3
    replaced = assert_exactly_one(label_studio, task_ids, first["model_version"])
    assert not {p["id"] for ps in replaced.values() for p in ps} & {p["id"] for ps in before.values() for p in ps}


def test_a_failed_task_is_not_stored_and_is_labelled_once_the_cause_is_gone(label_studio, engine, checkpoint):
    from imageserver import ImageServer

    url, headers, token = label_studio
    pid, task_ids = make_project(label_studio, n=2)
    images = ImageServer({})  # the image is not there yet: 404
    try:
        r = requests.post(f"{url}/api/projects/{pid}/import", headers=headers,
                          json=[{"image": f"{images.url}/late.png"}])
        assert r.status_code == 201, r.text
        late = max(t["id"] for t in requests.get(f"{url}/api/tasks", params={"project": pid},
                                                 headers=headers).json()["tasks"])
        client = service(engine, checkpoint, url, token, allowed_hosts=images.url.split("//")[1])
        job = wait_job(client, client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS}).get_json()["job_id"])
        assert (job["predicted"], job["failed"]) == (2, 1), job
        assert job["errors"][0]["task"] == late and "could not fetch" in job["errors"][0]["error"]
        assert predictions_by_task(label_studio, [late])[late] == []  # a failure is not stored as a result
        images.files["/late.png"] = png_bytes(make_image(seed=5))  # the cause is gone
        again = wait_job(client, client.post("/jobs", json={"project": pid, "thresholds": THRESHOLDS}).get_json()["job_id"])
        assert (again["predicted"], again["skipped"], again["failed"]) == (1, 2, 0), again
    finally:
        images.close()
    assert_exactly_one(label_studio, task_ids + [late], job["model_version"])


def test_retrieve_predictions_ends_inside_label_studios_limit_and_a_job_labels_the_rest(label_studio, engine,
                                                                                        checkpoint, monkeypatch):
    """The model slowed to 1 s per image, a 3 s budget: Label Studio's Retrieve Predictions on 8 tasks returns
    in time, and within the job's time every task has exactly one prediction (scaled down from the README's
    measurement: 15 s per image, 20 tasks, the default 60 s budget, Label Studio's 100 s limit)."""
    import threading

    from werkzeug.serving import make_server

    url, headers, _ = label_studio
    pid, task_ids = make_project(label_studio, n=8)
    real = engine.encode_many

    def slow(images, keys=None):
        time.sleep(1.0 * len(images))
        return real(images, keys)

    monkeypatch.setattr(engine, "encode_many", slow)
    settings = Settings(model=checkpoint, device="cpu", predict_budget=3.0)
    server = make_server("127.0.0.1", 0, create_app(settings, engine=engine), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = f"http://127.0.0.1:{server.server_port}"
        r = requests.post(f"{url}/api/ml", headers=headers, json={"url": backend, "project": pid, "title": "slow",
                                                                  "extra_params": {"thresholds": THRESHOLDS}})
        assert r.status_code == 201, r.text
        mv = r.json()["model_version"]
        t0 = time.time()
        r = requests.post(f"{url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                          headers=headers, json={"selectedItems": {"all": True, "excluded": []}})
        took = time.time() - t0
        assert r.status_code == 200, r.text
        assert took < 10, took  # the budget, not 8 images' worth of model time
        # what Retrieve stored: the tasks the 3 s budget reached at 1 s a task (the job it handed the rest to
        # posts them together, SAM3_POST_BATCH being larger, once it has labelled them all: seconds later)
        stored_by_retrieve = sum(1 for ps in predictions_by_task(label_studio, task_ids).values() if ps)
        assert 2 <= stored_by_retrieve <= 4
        deadline = time.time() + 120
        while time.time() < deadline:
            preds = predictions_by_task(label_studio, task_ids)
            if all(versions(ps, mv) for ps in preds.values()):
                break
            time.sleep(1)
        time.sleep(2)  # nothing more arrives after that
    finally:
        server.shutdown()
    assert_exactly_one(label_studio, task_ids, mv)


def test_a_batch_answered_after_label_studio_gave_up_is_posted_not_lost(label_studio, engine, checkpoint,
                                                                        monkeypatch):
    """Label Studio's ML_TIMEOUT_PREDICT lowered (conftest: 10 s) and one 6000 x 4000 image that takes 14 s:
    Retrieve Predictions gives up before the backend answers. The answered task is posted through the API, the
    rest go to a job: every task ends with exactly one prediction."""
    import threading

    from conftest import ML_TIMEOUT_PREDICT
    from PIL import Image
    from werkzeug.serving import make_server

    url, headers, _ = label_studio
    pid, _ = make_project(label_studio, n=0)
    big = png_bytes(Image.new("RGB", (6000, 4000), (90, 120, 60)))
    for i in range(10):  # the large image first: Label Studio sends the tasks in id order
        image = big if i == 0 else png_bytes(make_image(seed=900 + i))
        r = requests.post(f"{url}/api/projects/{pid}/import", headers=headers,
                          files={"file": (f"img{i}.png", image, "image/png")})
        assert r.status_code == 201, r.text
    tasks = requests.get(f"{url}/api/tasks", params={"project": pid, "page_size": 100}, headers=headers).json()
    task_ids = sorted(t["id"] for t in tasks["tasks"])
    real = engine.encode_many

    def slow(images, keys=None):
        if any(im.width > 3000 for im in images):
            time.sleep(ML_TIMEOUT_PREDICT + 4)
        return real(images, keys)

    monkeypatch.setattr(engine, "encode_many", slow)
    settings = Settings(model=checkpoint, device="cpu", predict_budget=ML_TIMEOUT_PREDICT / 2,
                        predict_timeout=ML_TIMEOUT_PREDICT)
    server = make_server("127.0.0.1", 0, create_app(settings, engine=engine), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = f"http://127.0.0.1:{server.server_port}"
        r = requests.post(f"{url}/api/ml", headers=headers, json={"url": backend, "project": pid, "title": "slow",
                                                                  "extra_params": {"thresholds": THRESHOLDS}})
        assert r.status_code == 201, r.text
        mv = r.json()["model_version"]
        r = requests.post(f"{url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                          headers=headers, json={"selectedItems": {"all": True, "excluded": []}})
        assert r.status_code == 200, r.text
        assert not any(predictions_by_task(label_studio, task_ids).values())  # it gave up: stored nothing
        deadline = time.time() + 120
        while time.time() < deadline:
            preds = predictions_by_task(label_studio, task_ids)
            if all(versions(ps, mv) for ps in preds.values()):
                break
            time.sleep(1)
        time.sleep(3)  # nothing more arrives after that
    finally:
        server.shutdown()
    assert_exactly_one(label_studio, task_ids, mv)
