"""`label-studio-sam3`: the command line. One module per command, imported when it runs (so `health` in a
container's HEALTHCHECK does not import torch): `serve`, `predict`, `label` (and `jobs`), `worker`, `health`.

May import every part of the backend; nothing imports it.
"""
from __future__ import annotations

import argparse
import os
import sys


def _run(command: str, args) -> int:
    if command == "serve":
        from .serve import run
    elif command == "predict":
        from .predict import run
    elif command == "label":
        from .label import run
    elif command == "jobs":
        from .label import show as run
    elif command == "evaluate":
        from .evaluate import run
    elif command == "worker":
        from .worker import run
    else:
        from .health import run
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="label-studio-sam3", description="SAM 3 ML backend for Label Studio")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_serve, _predict, _label, _evaluate, _jobs, _worker, _health):
        add(sub)
    return parser


def _serve(sub) -> None:
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
    serve.set_defaults(func=lambda a: _run("serve", a))


def _predict(sub) -> None:
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
    pred.add_argument("--tiling", help="off, auto or TILE:OVERLAP, e.g. 1008:0.2 (default: SAM3_TILING)")
    pred.set_defaults(func=lambda a: _run("predict", a))


def _label(sub) -> None:
    label = sub.add_parser("label", help="auto-label a Label Studio project (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)")
    label.add_argument("--project", type=int, required=True)
    label.add_argument("--limit", type=int, help="label at most N tasks")
    label.add_argument("--tasks", type=int, nargs="+", help="only these task ids")
    label.add_argument("--overwrite", action="store_true", help="replace this backend's earlier predictions")
    label.add_argument("--prompt", action="append", default=[], metavar="PROMPT[=LABEL]",
                       help="text prompt and its label (default: the project's labels)")
    label.add_argument("--threshold", type=float, help="minimum score")
    label.add_argument("--tiling", help="off, auto or TILE:OVERLAP, e.g. 1008:0.2 (default: the connected model's "
                                        "extra params, else SAM3_TILING)")
    label.add_argument("--chunk-size", type=int, help="tasks per rq job (default SAM3_JOB_CHUNK)")
    label.add_argument("--dry-run", action="store_true", help="label --limit tasks (default 10), print, post nothing")
    label.add_argument("--queue", action="store_true", help="enqueue for rq workers (REDIS_URL) and print the job id")
    label.set_defaults(func=lambda a: _run("label", a))


def _evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="SAM 3 against the project's annotations: figures per label, a threshold "
                                         "per label, an HTML report (posts nothing)")
    ev.add_argument("--project", type=int, required=True)
    ev.add_argument("--limit", type=int, help="evaluate N annotated tasks, sampled (default: all of them)")
    ev.add_argument("--seed", type=int, help="which N (default 0: the same sample every time)")
    ev.add_argument("--tasks", type=int, nargs="+", help="only these task ids")
    ev.add_argument("--iou", type=float, help="mask IoU a detection needs to match an annotation (default 0.5)")
    ev.add_argument("--target-precision", type=float,
                    help="recommend each label's lowest threshold that reaches this precision (default: best F1)")
    ev.add_argument("--prompt", action="append", default=[], metavar="PROMPT[=LABEL]",
                    help="text prompt and its label (default: the project's own ontology)")
    ev.add_argument("--threshold", type=float, help="the confidence to evaluate at (default: the project's)")
    ev.add_argument("--tiling", help="off, auto or TILE:OVERLAP, e.g. 1008:0.2 (default: the connected model's "
                                     "extra params, else SAM3_TILING)")
    ev.add_argument("--json", help="write the figures as JSON to this file")
    ev.add_argument("--html", help="write the report here (default sam3-evaluation-project<ID>.html)")
    ev.add_argument("--queue", action="store_true", help="enqueue for rq workers (REDIS_URL) and print the job id")
    ev.set_defaults(func=lambda a: _run("evaluate", a))


def _jobs(sub) -> None:
    jobs = sub.add_parser("jobs", help="show label jobs (REDIS_URL, or the service at --url)")
    jobs.add_argument("id", nargs="?")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--url", default=os.environ.get("SAM3_URL", "http://localhost:9090"))
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=lambda a: _run("jobs", a))


def _worker(sub) -> None:
    worker = sub.add_parser("worker", help="run an rq worker for label jobs (REDIS_URL)")
    worker.add_argument("--name")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=lambda a: _run("worker", a))


def _health(sub) -> None:
    health = sub.add_parser("health", help="exit 0 when this container's service or worker is healthy")
    health.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    role = health.add_mutually_exclusive_group()
    role.add_argument("--serve", action="store_true", help="the service: answers /health with its model loaded")
    role.add_argument("--worker", action="store_true",
                      help="the worker: its model loaded and Redis reachable (from its own report)")
    health.set_defaults(func=lambda a: _run("health", a))


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
