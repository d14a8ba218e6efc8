"""`label-studio-sam3 label`: a job over a Label Studio project, run here with a progress line or queued for the
workers; `label-studio-sam3 jobs`: the status of jobs."""
from __future__ import annotations

import json
import sys
import threading
import time

from .. import logs
from ..errors import BackendError
from ..jobs.record import Job, JobStatus, view
from . import common


def request(args) -> dict:
    body = {"project": args.project, "ontology": common.ontology(args.prompt), "limit": args.limit,
            "overwrite": args.overwrite, "dry_run": args.dry_run, "chunk_size": args.chunk_size}
    if args.threshold is not None:
        body["thresholds"] = {"confidence": args.threshold}
    if args.tasks:
        body["tasks"] = args.tasks
    if args.tiling:
        body["tiling"] = args.tiling
    return body


def run(args) -> int:
    settings = common.settings(bulk=True)  # no clicks wait on this process: images are batched per forward
    logs.setup(settings.log_level)
    if not settings.label_studio_url:
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    if args.queue and not settings.redis_url:
        print("error: --queue needs REDIS_URL (the workers' Redis)", file=sys.stderr)
        return 2
    if settings.redis_url:  # before the model loads: a wrong REDIS_URL fails now
        from redis import Redis

        Redis.from_url(settings.redis_url).ping()
    from ..jobs import runner  # torch and the model's code: after the checks that need neither
    from ..jobs.lifecycle import Context
    from ..jobs.service import JobService
    from ..jobs.store import MemoryStore
    from ..sam3.model import Sam3Model

    sam3 = Sam3Model(settings)
    # With Redis, a job run here shares its lock and claims with the service and the workers; without it, only
    # runs in this process see each other (and the poster's rule keeps one prediction per task all the same).
    jobs = JobService(settings, sam3, None if settings.redis_url else MemoryStore())
    try:
        if args.queue:
            sam3.identify()  # the weights' identity is enough to queue: the workers load the model
            print(jobs.start(request(args)).id)
            return 0
        if sam3.load().state != "ready":
            print(f"error: {sam3.error}", file=sys.stderr)
            return 1
        job, api = jobs.create(request(args))
    except BackendError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print(f"job {job.id}: project {args.project}, model_version {job.model_version}", file=sys.stderr)
    finished = threading.Event()
    printer = threading.Thread(target=progress, args=(jobs.store, job.id, finished), daemon=True)
    printer.start()
    runner.run_all(Context(settings, sam3, jobs.store, api), job.id)
    finished.set()
    printer.join()
    job = jobs.store.get(job.id)
    print(summary(view(job)), file=sys.stderr)
    if args.dry_run:
        print(json.dumps(job.predictions or [], indent=1))
    return 0 if job.status == JobStatus.SUCCEEDED else 1


def progress(store, job_id: str, finished: threading.Event, every: float = 1.0) -> None:
    """One line, redrawn: done/total, tasks/s, ETA (stderr is a terminal) or a line per 10% (a log)."""
    tty, last_tenth = sys.stderr.isatty(), -1
    while True:
        stop = finished.wait(every)
        v = view(store.get(job_id))
        total, done = v.get("total", 0), v.get("processed", 0)
        eta = v.get("eta_seconds")
        line = (f"{done}/{total} tasks  {v.get('tasks_per_second', 0):.2f} tasks/s  "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta)) if eta is not None else '--:--:--'}  "
                f"predicted {v['predicted']} skipped {v['skipped']} failed {v['failed']}"
                + (f"  {v['frames']} video frames" if v.get("frames") else ""))
        if tty:
            print("\r" + line, end="\n" if stop else "", file=sys.stderr, flush=True)
        elif total and (done * 10 // total) != last_tenth:
            last_tenth = done * 10 // total
            print(line, file=sys.stderr, flush=True)
        if stop:
            return


def summary(job: dict) -> str:
    """A job's view as a few lines: its outcome, then its errors."""
    lines = [f"job {job['id']} {job['status']}: {job['total']} tasks, {job['predicted']} predicted "
             f"({job['regions_added']} regions), {job['skipped']} skipped, {job['failed']} failed"]
    for e in job.get("errors") or []:
        lines.append(f"  task {e['task']}: {e['error']}" if e.get("task") is not None else f"  {e['error']}")
    return "\n".join(lines)


def show(args) -> int:
    """`jobs [ID]`: from Redis (REDIS_URL) or from a running service (--url)."""
    import requests

    settings = common.settings()
    if settings.redis_url:
        from ..jobs.redis_store import RedisStore

        store = RedisStore.from_settings(settings)
        if args.id:
            job: Job | None = store.get(args.id)
            if job is None:
                print(f"error: no job {args.id}", file=sys.stderr)
                return 1
            data = view(job)
        else:
            items, total = store.list(JobStatus.parse(args.status), 0, args.limit)
            data = {"jobs": [view(j) for j in items], "total": total}
    else:
        url = args.url.rstrip("/") + (f"/jobs/{args.id}" if args.id else "/jobs")
        try:
            auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
            r = requests.get(url, params=None if args.id else {"status": args.status, "limit": args.limit},
                             auth=auth, timeout=10)
        except requests.RequestException as e:
            print(f"error: cannot reach the service at {args.url} ({type(e).__name__}); set REDIS_URL or --url",
                  file=sys.stderr)
            return 1
        data = r.json()
        if r.status_code != 200:
            print(f"error: {data.get('error')}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(data, indent=1))
    elif args.id:
        print(summary(data))
    else:
        for j in data["jobs"]:
            print(f"{j['id']}  {j.get('mode', 'label'):<8}  {j['status']:<9}  project {j['project']:<5}  "
                  f"{j['processed']}/{j['total']} tasks  "
                  f"{j['predicted']} predicted  {j['failed']} failed  {j.get('created_at', '')}")
    return 0
