"""`label-studio-sam3` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _settings():
    """Settings from the environment; a configuration that cannot work stops the command (exit 2)."""
    from .config import Settings

    settings = Settings.from_env()
    problems = settings.problems()
    if problems:
        for problem in problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return settings


def _serve(args) -> int:
    from gunicorn.app.base import BaseApplication

    from . import serving

    settings = _settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    busy = _port_in_use(args.host, args.port)
    if busy:
        print(f"error: cannot listen on {args.host}:{args.port} ({busy}): stop what holds the port, or choose "
              "another with --port N (PORT=N make run)", file=sys.stderr)
        return 2
    if not settings.basic_auth_user and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("backend.cli").warning(
            "serving on %s without authentication: anyone who can reach port %d can use this backend. "
            "Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and give them in Label Studio's Connect Model form), "
            "or serve on 127.0.0.1", args.host, args.port)
    serving.READ_TIMEOUT = settings.read_timeout

    class App(BaseApplication):
        def load_config(self):
            for key, value in serving.gunicorn_options(args, settings).items():
                self.cfg.set(key, value)

        def load(self):
            from .protocol import create_app

            return serving.ReadWholeBody(create_app(settings), int(settings.max_body_mb * (1 << 20)))

    App().run()
    return 0


def _port_in_use(host: str, port: int) -> str:
    """Why `host:port` cannot be listened on ("" when it can): gunicorn alone retries and says little."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return e.strerror or str(e)
    return ""


def _health(args) -> int:
    """Exit 0 when this container's role is healthy (its HEALTHCHECK): `serve` answers with its model loaded;
    a `worker` reports its model loaded and Redis reachable. Without --serve or --worker, a worker's report in
    this container makes it a worker."""
    from .dispatch import HEALTH_FILE, read_health

    if args.worker or (not args.serve and HEALTH_FILE.exists()):
        ok, why = read_health()
        print(why, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    return _serve_health(args)


def _serve_health(args) -> int:
    import requests

    settings = _settings()
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    try:
        data = requests.get(f"http://127.0.0.1:{args.port}/health", auth=auth, timeout=5).json()
    except (requests.RequestException, ValueError) as e:
        print(f"unhealthy: {type(e).__name__}", file=sys.stderr)
        return 1
    state = data.get("model_state")
    print(f"{state}: {data.get('model')} on {data.get('device')}" + (f": {data.get('error')}" if data.get("error")
                                                                       else ""))
    return 0 if state == "ready" else 1


def _predict(args) -> int:
    """The batch pipeline on local files: Label Studio JSON and a preview PNG per image."""
    import json
    from collections import Counter
    from pathlib import Path

    from .errors import BackendError
    from .model import SAM3Backend
    from .preview import draw
    from .runtime import Runtime

    settings = _settings()
    if args.model:
        settings.model = args.model
    if args.device:
        settings.device = args.device
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    ontology = _ontology(args.prompt) or {}
    if not ontology and not args.config:
        print("error: give at least one --prompt (e.g. --prompt cat), or a label config with --config",
              file=sys.stderr)
        return 2
    if args.config:
        xml = Path(args.config).read_text()
    else:
        labels = "".join(f'<Label value="{label}"/>' for label in dict.fromkeys(ontology.values()))
        tag = {"polygon": "PolygonLabels", "brush": "BrushLabels", "box": "RectangleLabels"}[args.output]
        xml = f'<View><Image name="image" value="$image"/><{tag} name="label" toName="image">{labels}</{tag}></View>'
    thresholds = {"confidence": args.threshold} if args.threshold is not None else None
    try:
        runtime = Runtime(settings).load()
        engine = runtime.wait(0)
        model = SAM3Backend(label_config=xml, extra_params={"ontology": ontology or None, "thresholds": thresholds},
                            settings=settings, runtime=runtime)
    except BackendError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2

    video = next(iter(model.config.videos), None)  # a video config: the files are videos
    key = model.config.videos[video][0] if video else model.config.value_key

    def load_file(task, image=None):  # local files here; the HTTP service never reads the local disk
        path = Path(task["data"][key if video else model.config.images.get(image, key)])
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BackendError(f"cannot read {path}: {e.strerror}") from None
        return model.open_video(task, video, data) if video else model.loader.decode(data, name=str(path))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [{"id": i, "data": {key: str(Path(p).resolve())}} for i, p in enumerate(args.images, 1)]
    failed = regions = 0
    for task, images, prediction, error in model.iter_predictions(tasks, load=load_file):
        path = Path(task["data"][key])
        if error is not None:
            failed += 1
            (out / f"{path.stem}.json").write_text(json.dumps({"data": task["data"], "error": str(error)}, indent=1))
            print(f"{path}: {getattr(error, 'message', error)}", file=sys.stderr)
            continue
        doc = {"data": task["data"], "predictions": [prediction]}
        (out / f"{path.stem}.json").write_text(json.dumps(doc, indent=1))
        if images:  # a video has no preview picture: its JSON imports into a video project as is
            draw(next(iter(images.values())), prediction["result"]).save(out / f"{path.stem}.png")
        counts = Counter((r["value"].get(r["type"]) or r["value"]["labels"])[0] for r in prediction["result"])
        regions += len(prediction["result"])
        print(f"{path.name}: {len(prediction['result'])} {'tracks' if video else 'regions'} {dict(counts) or ''} "
              f"-> {out / path.stem}.json{'' if video else '/.png'}")
    print(f"model_version {model.model_version}; {engine.vit_passes} ViT passes for {len(tasks)} "
          f"{'videos' if video else 'images'}")
    if not regions and failed < len(tasks):
        print(f"no instance scored above {model.thresholds.confidence}: try a lower --threshold (a checkpoint with "
              "random weights, like the tiny test one, scores about 0.25)", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(tasks)} {'videos' if video else 'images'} could not be read", file=sys.stderr)
    return 1 if failed == len(tasks) else 0


def _ontology(specs: list[str]) -> dict | None:
    ontology = {}
    for spec in specs:
        prompt, _, label = spec.partition("=")
        ontology[prompt.strip()] = (label or prompt).strip()
    return ontology or None


def _label(args) -> int:
    """A bulk label job over a Label Studio project: here with a progress line, or queued for workers."""
    import threading

    from . import dispatch, jobs, labelstudio, runner
    from .errors import BackendError
    from .runtime import Runtime
    from .store import MemoryStore

    settings = _settings()
    if "SAM3_ENCODE_BATCH" not in os.environ:
        settings.encode_batch = 4  # no clicks wait on this process: batch images per forward
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = labelstudio.api_for(settings, labelstudio.connect(settings))
    if api is None:
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    body = {"project": args.project, "ontology": _ontology(args.prompt), "limit": args.limit,
            "overwrite": args.overwrite, "dry_run": args.dry_run, "chunk_size": args.chunk_size}
    if args.threshold is not None:
        body["thresholds"] = {"confidence": args.threshold}
    if args.tasks:
        body["tasks"] = args.tasks
    if args.queue and not settings.redis_url:
        print("error: --queue needs REDIS_URL (the workers' Redis)", file=sys.stderr)
        return 2
    runtime = Runtime(settings)
    # With Redis, a job run here shares its lock and claims with the service and the workers: two runs on
    # one project never post twice. Without it, only runs in this process see each other.
    store = dispatch.redis_store(settings) if settings.redis_url else MemoryStore()
    try:
        if args.queue:
            runtime.identify()  # the weights' identity is enough to queue: the workers load the model
            job = jobs.create(store, api, settings, runtime, body)
            dispatch.enqueue(settings, store.r, job["id"])
            print(job["id"])
            return 0
        if runtime.load().state != "ready":
            print(f"error: {runtime.error}", file=sys.stderr)
            return 1
        job = jobs.create(store, api, settings, runtime, body)
    except BackendError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print(f"job {job['id']}: project {args.project}, model_version {job['model_version']}", file=sys.stderr)
    finished = threading.Event()
    printer = threading.Thread(target=_progress, args=(store, job["id"], finished), daemon=True)
    printer.start()
    runner.run_all(jobs.Context(settings, runtime, store, api), job["id"])
    finished.set()
    printer.join()
    job = store.get(job["id"])
    print(_summary(job), file=sys.stderr)
    if args.dry_run:
        import json

        print(json.dumps(job.get("predictions") or [], indent=1))
    return 0 if job["status"] == "succeeded" else 1


def _progress(store, job_id: str, finished, every: float = 1.0) -> None:
    """One line, redrawn: done/total, tasks/s, ETA (stderr is a terminal) or a line per 10% (a log)."""
    import time

    from .jobs import view

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


def _summary(job: dict) -> str:
    lines = [f"job {job['id']} {job['status']}: {job['total']} tasks, {job['predicted']} predicted "
             f"({job['regions_added']} regions), {job['skipped']} skipped, {job['failed']} failed"]
    for e in job.get("errors") or []:
        lines.append(f"  task {e['task']}: {e['error']}" if e.get("task") is not None else f"  {e['error']}")
    return "\n".join(lines)


def _jobs(args) -> int:
    """Status of jobs: from Redis (REDIS_URL) or from a running service (--url)."""
    import json

    import requests

    from . import dispatch, jobs

    settings = _settings()
    if settings.redis_url:
        store = dispatch.redis_store(settings)
        if args.id:
            job = store.get(args.id)
            if job is None:
                print(f"error: no job {args.id}", file=sys.stderr)
                return 1
            data = jobs.view(job)
        else:
            items, total = store.list(args.status, 0, args.limit)
            data = {"jobs": [jobs.view(j) for j in items], "total": total}
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
        print(_summary(data))
    else:
        for j in data["jobs"]:
            print(f"{j['id']}  {j['status']:<9}  project {j['project']:<5}  {j['processed']}/{j['total']} tasks  "
                  f"{j['predicted']} predicted  {j['failed']} failed  {j.get('created_at', '')}")
    return 0


def _worker(args) -> int:
    """An rq worker: loads SAM 3 once, then runs label jobs from the queue until stopped."""
    from . import dispatch

    settings = _settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        print("error: the worker needs REDIS_URL", file=sys.stderr)
        return 2
    if not settings.label_studio_url:
        print("error: the worker needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    dispatch.redis_store(settings).r.ping()  # before minutes of model loading: a wrong REDIS_URL fails now
    os.environ.setdefault("SAM3_ENCODE_BATCH", "4")  # no clicks wait on a worker: batch images per forward
    ctx = dispatch.worker_context(load=False)
    report = dispatch.HealthReport(ctx.runtime, ctx.store.r).start()  # `health` reads "loading" meanwhile
    try:
        ctx.runtime.load()  # the model loads now, before any job is taken
        if ctx.runtime.state != "ready":
            print(f"error: SAM 3 model {settings.model!r} failed to load: {ctx.runtime.error}", file=sys.stderr)
            return 1
        worker = dispatch.make_worker(settings, ctx.store.r, name=args.name)
        ctx.heartbeat, ctx.worker = worker.beat, worker.name
        worker.work(burst=args.burst, logging_level=settings.log_level)
    finally:
        report.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="label-studio-sam3", description="SAM 3 ML backend for Label Studio")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the ML backend HTTP service (gunicorn)")
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"),
                       help="address to listen on (HOST; default 0.0.0.0, every interface)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")),
                       help="port to listen on (PORT; default 9090)")
    serve.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "64")),
                       help="request threads sharing the one model (THREADS; default 64: slow clients hold threads, "
                            "the model runs one forward at a time)")
    serve.add_argument("--timeout", type=int, default=int(os.environ.get("GUNICORN_TIMEOUT", "600")),
                       help="seconds a request may run before its worker is restarted (GUNICORN_TIMEOUT; default 600)")
    serve.add_argument("--graceful-timeout", type=int, default=int(os.environ.get("GRACEFUL_TIMEOUT", "120")),
                       help="seconds to finish requests in hand on SIGTERM (GRACEFUL_TIMEOUT; default 120)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=_serve)
    pred = sub.add_parser("predict", help="pre-annotate local images: Label Studio JSON + preview PNG per image")
    pred.add_argument("images", nargs="+")
    pred.add_argument("--prompt", action="append", default=[], metavar="PROMPT[=LABEL]",
                      help='text prompt and the label it gives, e.g. "red car=car" (repeatable)')
    pred.add_argument("--out", required=True, help="output folder")
    pred.add_argument("--config", help="a Label Studio label config file (default: one PolygonLabels of the labels)")
    pred.add_argument("--output", choices=["polygon", "brush", "box"], default="polygon")
    pred.add_argument("--threshold", type=float, help="minimum score (default SAM3_TEXT_THRESHOLD, 0.5)")
    pred.add_argument("--model", help="checkpoint (default SAM3_MODEL)")
    pred.add_argument("--device")
    pred.set_defaults(func=_predict)
    label = sub.add_parser("label", help="auto-label a Label Studio project (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)")
    label.add_argument("--project", type=int, required=True)
    label.add_argument("--limit", type=int, help="label at most N tasks")
    label.add_argument("--tasks", type=int, nargs="+", help="only these task ids")
    label.add_argument("--overwrite", action="store_true", help="replace this backend's earlier predictions")
    label.add_argument("--prompt", action="append", default=[], metavar="PROMPT[=LABEL]",
                       help="text prompt and its label (default: the project's labels)")
    label.add_argument("--threshold", type=float, help="minimum score")
    label.add_argument("--chunk-size", type=int, help="tasks per rq job (default SAM3_JOB_CHUNK)")
    label.add_argument("--dry-run", action="store_true", help="label --limit tasks (default 10), print, post nothing")
    label.add_argument("--queue", action="store_true", help="enqueue for rq workers (REDIS_URL) and print the job id")
    label.set_defaults(func=_label)
    jobs_cmd = sub.add_parser("jobs", help="show label jobs (REDIS_URL, or the service at --url)")
    jobs_cmd.add_argument("id", nargs="?")
    jobs_cmd.add_argument("--status")
    jobs_cmd.add_argument("--limit", type=int, default=20)
    jobs_cmd.add_argument("--url", default=os.environ.get("SAM3_URL", "http://localhost:9090"))
    jobs_cmd.add_argument("--json", action="store_true")
    jobs_cmd.set_defaults(func=_jobs)
    worker = sub.add_parser("worker", help="run an rq worker for label jobs (REDIS_URL)")
    worker.add_argument("--name")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=_worker)
    health = sub.add_parser("health", help="exit 0 when this container's service or worker is healthy")
    health.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    role = health.add_mutually_exclusive_group()
    role.add_argument("--serve", action="store_true", help="the service: answers /health with its model loaded")
    role.add_argument("--worker", action="store_true",
                      help="the worker: its model loaded and Redis reachable (from its own report)")
    health.set_defaults(func=_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    from redis.exceptions import RedisError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RedisError as e:  # one line that says what to fix, not a 50-line traceback
        url = os.environ.get("REDIS_URL", "")
        print(f"error: Redis at REDIS_URL={url} is not answering ({type(e).__name__}: {e}); start Redis or fix "
              "REDIS_URL", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
