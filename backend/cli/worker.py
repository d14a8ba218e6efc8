"""`label-studio-sam3 worker`: an rq worker that loads SAM 3 once and runs job chunks until stopped."""
from __future__ import annotations

import sys

from .. import logs
from . import common


def run(args) -> int:
    settings = common.settings(bulk=True)  # no clicks wait on a worker: images are batched per forward
    logs.setup(settings.log_level)
    if not settings.redis_url:
        print("error: the worker needs REDIS_URL", file=sys.stderr)
        return 2
    if not settings.label_studio_url:
        print("error: the worker needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    from ..jobs.redis_store import RedisStore

    RedisStore.from_settings(settings).r.ping()  # before torch and the model load: a wrong REDIS_URL fails now
    from ..jobs import queue
    from ..jobs.health import HealthReport

    ctx = queue.worker_context(load=False)
    report = HealthReport(ctx.sam3, ctx.store.r).start()  # `health` reads "loading" meanwhile
    try:
        ctx.sam3.load()  # the model loads now, before any job is taken
        if ctx.sam3.state != "ready":
            print(f"error: SAM 3 model {settings.model!r} failed to load: {ctx.sam3.error}", file=sys.stderr)
            return 1
        worker = queue.make_worker(settings, ctx.store.r, name=args.name)
        ctx.heartbeat, ctx.worker = worker.beat, worker.name
        worker.work(burst=args.burst, logging_level=settings.log_level)
    finally:
        report.stop()
    return 0
