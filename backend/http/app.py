"""The Label Studio ML-backend HTTP contract on Flask.

Routes: GET / and /health, POST /setup, POST /predict, POST /webhook, GET /metrics, and the bulk
label jobs: POST /jobs, GET /jobs, GET /jobs/<id>, DELETE /jobs/<id>.
Every error is JSON `{"error": ...}` with a 4xx status where the request is at fault.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import logging
import select
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import asdict

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from . import __version__, dispatch, jobs, labelstudio, metrics, poster, wire
from .config import Settings
from .engine import Sam3Engine
from .errors import BackendError
from .model import SAM3Backend
from .retry import Backoff
from .runtime import Runtime

log = logging.getLogger(__name__)
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # metric labels come from fixed sets


class Projects:
    """One backend instance per Label Studio project (the least recently used go past `max_projects`),
    rebuilt when its label config changes."""

    def __init__(self, backend_class, settings: Settings, runtime: Runtime):
        self.backend_class = backend_class
        self.settings = settings
        self.runtime = runtime
        self._items: OrderedDict[str, SAM3Backend] = OrderedDict()
        self._lock = threading.Lock()

    def setup(self, project: str, schema: str, hostname="", access_token="", extra_params=None):
        model = self.backend_class(
            project_id=project, label_config=schema, hostname=hostname, access_token=access_token,
            extra_params=extra_params, settings=self.settings, runtime=self.runtime,
        )
        with self._lock:
            self._items[project] = model
            self._items.move_to_end(project)
            while len(self._items) > self.settings.max_projects:
                self._items.popitem(last=False)
        return model

    def _find(self, project: str):
        with self._lock:
            model = self._items.get(project)
            if model is not None:
                self._items.move_to_end(project)
            return model

    def connection(self, project: str) -> tuple[str, str]:
        """The Label Studio host and token a project's /setup gave, or empty strings."""
        model = self._find(project)
        return (model.hostname, model.access_token) if model else ("", "")

    def get(self, project: str, label_config: str):
        model = self._find(project)
        if model is not None and (not label_config or label_config == model.label_config):
            return model
        if model is not None:  # the config changed since /setup: keep its connection
            return self.setup(project, label_config, model.hostname, model.access_token, model.extra_params)
        if not label_config:
            raise BackendError("label_config is required (or call /setup for this project first)")
        return self.setup(project, label_config)


def create_app(settings: Settings | None = None, engine: Sam3Engine | None = None, backend_class=SAM3Backend) -> Flask:
    """The WSGI app. Without `engine`, SAM 3 loads in a background thread (inside the serving process)."""
    settings = settings or Settings.from_env()
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    runtime = Runtime(settings, engine)
    projects = Projects(backend_class, settings, runtime)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_mb * (1 << 20))  # 413 beyond, before reading it
    app.config["runtime"] = runtime
    app.config["projects"] = projects
    runtime.start_loading()
    if runtime.state == "ready":
        metrics.MODEL_LOADED.set(1)
    # Jobs: rq workers when REDIS_URL is set, else one thread of this process.
    redis = store = embedded = None
    if settings.redis_url:
        store = dispatch.redis_store(settings)
        redis = store.r
    else:
        from .store import MemoryStore

        store = MemoryStore(max_jobs=settings.max_jobs)
        embedded = dispatch.EmbeddedRunner(settings, runtime, store)
    app.config["jobs"] = store

    def body() -> dict:
        return wire.json_object(request.get_data(cache=False))

    @app.before_request
    def _start():
        g.t0, g.started = time.perf_counter(), time.monotonic()
        if settings.basic_auth_user:
            if not _authorized(request.headers.get("Authorization", ""), settings):
                resp = jsonify({"error": "authentication required (HTTP Basic)"})
                resp.status_code = 401
                resp.headers["WWW-Authenticate"] = 'Basic realm="label-studio-sam3"'
                return resp

    @app.after_request
    def _record(resp):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        method = request.method if request.method in METHODS else "OTHER"
        metrics.REQUESTS.labels(route, method, str(resp.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return resp

    @app.errorhandler(BackendError)
    def _backend_error(e: BackendError):
        log.info("%s %s -> %d: %s", request.method, request.path, e.status, e.message)
        return error_response(e.message, e.status, **e.extra)

    @app.errorhandler(RedisError)
    def _redis_error(e: RedisError):
        log.error("Redis error on %s %s: %s", request.method, request.path, e)
        return error_response(f"the job store (Redis) is not answering: {type(e).__name__}", 503)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return error_response(f"{e.name}: {e.description}", e.code)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(f"internal error ({type(e).__name__}); see the backend's log", 500)

    @app.get("/")
    @app.get("/health")
    def health():
        """200 only once the model is loaded: Label Studio and the container health check both read it."""
        eng = runtime.engine
        ready = runtime.state == "ready"
        body = jsonify(
            {
                "status": "UP" if ready else runtime.state.upper(),
                "model_class": backend_class.__name__,
                "model_state": runtime.state,  # loading | ready | failed
                "model_loaded": ready,
                "model": settings.model,
                "model_version": runtime.model_version,
                "device": str(eng.device) if eng else settings.device,
                "dtype": str(eng.dtype).removeprefix("torch.") if eng else settings.dtype,
                "error": runtime.error or None,
                "retry_in_seconds": max(0, round(runtime.retry_at - time.time())) if runtime.retry_at else None,
                "version": __version__,
                "v2": True,
            }
        )
        if ready:
            return body
        reason = runtime.error or "SAM 3 model is loading"
        body.status = f"503 {_reason(reason)}"
        return body

    @app.post("/setup")
    def setup():
        runtime.wait(0)  # Label Studio shows Connected only for a backend that can answer
        req = wire.Setup.parse(body())
        model = projects.setup(req.project, req.schema, req.hostname, req.access_token, req.extra_params)
        if model.connection is not None and req.project:
            model.connection.check(req.project)  # says now, where the admin sees it, if images will be refused
        return jsonify({"model_version": model.model_version})

    @app.post("/predict")
    def predict():
        req = wire.Predict.parse(body())
        model = projects.get(req.project, req.label_config)
        # Label Studio (User-Agent heartex/<version>) drops errors of clicks: tell its editor through a suggestion.
        from_label_studio = request.headers.get("User-Agent", "").startswith("heartex/")

        def handoff(rest: list[dict]) -> str | None:
            """A job for the tasks the batch could not reach in time, with the project's own ontology and
            thresholds (so its model_version is the one Label Studio asked for)."""
            ids = [t["id"] for t in rest if isinstance(t.get("id"), int) and not isinstance(t.get("id"), bool)]
            if not ids or not req.project:
                return None
            job = start_job({"project": int(req.project), "tasks": ids,
                             "ontology": [asdict(e) for e in model.ontology], "thresholds": asdict(model.thresholds)})
            return job["id"]

        def late(ready: dict[int, tuple[dict, dict]]) -> list[int]:
            """Answers ready after Label Studio stopped waiting, posted through its API instead; the indices
            posted (a post that may have been applied is checked before it is sent again)."""
            api = labelstudio.api_for(settings, model.connection)
            if api is None or not req.project:
                raise BackendError("no Label Studio connection to post them through")
            by_id = {t["id"]: (i, t, a) for i, (t, a) in ready.items()
                     if isinstance(t.get("id"), int) and not isinstance(t.get("id"), bool)}
            out = poster.save(api, int(req.project), model.model_version, {tid: a for tid, (_, _, a) in by_id.items()},
                              {tid: t for tid, (_, t, _) in by_id.items()}, runtime.model_version or "", False,
                              Backoff(settings.api_retries))
            return [by_id[tid][0] for tid in out.posted]

        predictions = model.predict(req.tasks, context=req.context, notices=from_label_studio, handoff=handoff,
                                    late=late, started=g.started, client_gone=lambda: _hung_up(request.environ))
        if len(predictions) != len(req.tasks):  # Label Studio pairs results[i] with tasks[i]
            raise RuntimeError(f"{len(predictions)} predictions for {len(req.tasks)} tasks")
        return jsonify({"results": predictions, "model_version": model.model_version})

    @app.post("/webhook")
    def webhook():
        data = body()
        action = data.get("action")
        action = action if isinstance(action, str) and len(action) <= 64 else None
        return jsonify({"status": "ok", "action": action, "trained": False}), 200

    def start_job(data: dict) -> dict:
        """Create a job (checked, stored, its scope locked) and hand it to rq or the embedded runner."""
        connection = projects.connection(wire.project_key(data.get("project")))
        api = labelstudio.api_for(settings, labelstudio.connect(settings, *connection))
        if api is None:
            raise BackendError("no Label Studio connection for jobs: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, "
                               "or connect this backend to the project in Label Studio first")
        job = jobs.create(store, api, settings, runtime, data)
        if redis is not None:
            dispatch.enqueue(settings, redis, job["id"])
        else:
            embedded.submit(job["id"], api)
        return job

    @app.post("/jobs")
    def create_job():
        job = start_job(body())
        return jsonify({"job_id": job["id"], "status": job["status"], "model_version": job["model_version"],
                        "url": f"/jobs/{job['id']}"}), 202

    @app.get("/jobs")
    def list_jobs():
        status = jobs.check_status(request.args.get("status"))
        try:
            offset = int(request.args.get("offset", 0))
            limit = int(request.args.get("limit", 20))
        except ValueError:
            raise BackendError("offset and limit must be integers") from None
        if offset < 0 or not 1 <= limit <= 500:
            raise BackendError("offset must be >= 0 and limit between 1 and 500")
        items, total = store.list(status, offset, limit)
        return jsonify({"jobs": [jobs.view(j) for j in items], "total": total, "offset": offset, "limit": limit})

    @app.get("/jobs/<job_id>")
    def get_job(job_id):
        job = store.get(job_id)
        if job is None:
            raise BackendError(f"no job {job_id}", 404)
        return jsonify(jobs.view(job))

    @app.delete("/jobs/<job_id>")
    def cancel_job(job_id):
        return jsonify(jobs.view(jobs.cancel(store, job_id))), 202

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.REGISTRY), mimetype=CONTENT_TYPE_LATEST)

    return app


def _hung_up(environ) -> bool:
    """Has the client closed its connection (Label Studio gave up waiting)? A closed socket reads as end of file."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is None:
        return False
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False  # nothing to read: still open
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the peer
        return True


def _reason(message: str) -> str:
    """An HTTP reason phrase carrying the message: Label Studio drops the body of a non-2xx answer and shows
    only requests' "<code> Client Error: <reason> for url: ...", so the reason is where the person reads it."""
    text = "".join(c if " " <= c <= "~" else "?" for c in message.replace("\n", " "))
    return text[:400].strip() or "error"


def error_response(message: str, status: int, **extra) -> Response:
    resp = jsonify({"error": message, **extra})
    resp.status = f"{status} {_reason(message)}"
    return resp


def _authorized(header: str, settings: Settings) -> bool:
    """HTTP Basic credentials, compared as UTF-8 bytes in constant time (any characters allowed)."""
    if not header.startswith("Basic ") or len(header) > 4096:
        return False
    try:
        user, _, password = base64.b64decode(header[6:].encode("latin-1"), validate=True).partition(b":")
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    ok_user = hmac.compare_digest(user, settings.basic_auth_user.encode())
    return hmac.compare_digest(password, settings.basic_auth_pass.encode()) and ok_user
