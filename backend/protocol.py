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
import threading
import time

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from . import __version__, dispatch, jobs, metrics
from .config import Settings
from .engine import Sam3Engine
from .errors import BackendError
from .model import Runtime, SAM3Backend, model_version

log = logging.getLogger(__name__)


def _project_key(project) -> str:
    # Label Studio sends "<id>.<created_at timestamp>"; the id names the project.
    return str(project or "").split(".")[0]


class Projects:
    """One backend instance per Label Studio project, rebuilt when its label config changes."""

    def __init__(self, backend_class, settings: Settings, runtime: Runtime):
        self.backend_class = backend_class
        self.settings = settings
        self.runtime = runtime
        self._items: dict[str, SAM3Backend] = {}
        self._lock = threading.Lock()

    def setup(self, project, schema, hostname="", access_token="", extra_params=None):
        model = self.backend_class(
            project_id=_project_key(project), label_config=schema, hostname=hostname, access_token=access_token,
            extra_params=extra_params, settings=self.settings, runtime=self.runtime,
        )
        with self._lock:
            self._items[_project_key(project)] = model
        return model

    def connection(self, project) -> tuple[str, str]:
        """The Label Studio host and token a project's /setup gave, or empty strings."""
        with self._lock:
            model = self._items.get(_project_key(project))
        return (model.hostname, model.access_token) if model else ("", "")

    def get(self, project, label_config):
        key = _project_key(project)
        with self._lock:
            model = self._items.get(key)
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
    runtime = Runtime(settings, engine)
    projects = Projects(backend_class, settings, runtime)
    app = Flask(__name__)
    app.config["runtime"] = runtime
    app.config["projects"] = projects
    runtime.start_loading()
    if runtime.state == "ready":
        metrics.MODEL_LOADED.set(1)
    # Jobs: rq workers when REDIS_URL is set, else one thread of this process.
    redis = store = runner = None
    if settings.redis_url:
        store = dispatch.redis_store(settings)
        redis = store.r
    else:
        from .store import MemoryStore

        store = MemoryStore()
        runner = dispatch.EmbeddedRunner(settings, runtime, store)
    app.config["jobs"] = store

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BackendError("request body must be a JSON object")
        return data

    @app.before_request
    def _start():
        g.t0 = time.perf_counter()
        if settings.basic_auth_user:
            if not _authorized(request.headers.get("Authorization", ""), settings):
                resp = jsonify({"error": "authentication required (HTTP Basic)"})
                resp.status_code = 401
                resp.headers["WWW-Authenticate"] = 'Basic realm="label-studio-sam3"'
                return resp

    @app.after_request
    def _record(resp):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.REQUESTS.labels(route, request.method, str(resp.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return resp

    @app.errorhandler(BackendError)
    def _backend_error(e: BackendError):
        log.info("%s %s -> %d: %s", request.method, request.path, e.status, e.message)
        return jsonify({"error": e.message}), e.status

    @app.errorhandler(RedisError)
    def _redis_error(e: RedisError):
        log.error("Redis error on %s %s: %s", request.method, request.path, e)
        return jsonify({"error": f"the job store (Redis) is not answering: {type(e).__name__}"}), 503

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return jsonify({"error": f"{e.name}: {e.description}"}), e.code

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": f"internal error ({type(e).__name__}); see the backend's log"}), 500

    @app.get("/")
    @app.get("/health")
    def health():
        eng = runtime.engine
        return jsonify(
            {
                "status": "UP",
                "model_class": backend_class.__name__,
                "model_state": runtime.state,  # loading | ready | failed
                "model_loaded": runtime.state == "ready",
                "model": settings.model,
                "model_version": model_version(settings, runtime.fingerprint),
                "device": str(eng.device) if eng else settings.device,
                "error": runtime.error or None,
                "version": __version__,
                "v2": True,
            }
        )

    @app.post("/setup")
    def setup():
        data = body()
        model = projects.setup(
            data.get("project"), data.get("schema"), data.get("hostname") or "", data.get("access_token") or "",
            data.get("extra_params"),
        )
        return jsonify({"model_version": model.model_version})

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BackendError("'tasks' must be a non-empty list of tasks")
        if not all(isinstance(t, dict) for t in tasks):
            raise BackendError("every task must be an object")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise BackendError("'params' must be an object")
        model = projects.get(data.get("project"), data.get("label_config"))
        context = params.get("context")
        predictions = model.predict(tasks, context=context)
        if len(predictions) != len(tasks):  # Label Studio pairs results[i] with tasks[i]
            raise RuntimeError(f"{len(predictions)} predictions for {len(tasks)} tasks")
        return jsonify({"results": predictions, "model_version": model.model_version})

    @app.post("/webhook")
    def webhook():
        data = request.get_json(silent=True) or {}
        action = data.get("action") if isinstance(data, dict) else None
        return jsonify({"status": "ok", "action": action, "trained": False}), 200

    @app.post("/jobs")
    def create_job():
        data = body()
        api = dispatch.api_from(settings, *projects.connection(data.get("project")))
        if api is None:
            raise BackendError("no Label Studio connection for jobs: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, "
                               "or connect this backend to the project in Label Studio first")
        job = jobs.create(store, api, settings, runtime, data)
        if redis is not None:
            dispatch.enqueue(settings, redis, job["id"])
        else:
            runner.submit(job["id"], api)
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


def _authorized(header: str, settings: Settings) -> bool:
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user, settings.basic_auth_user) and hmac.compare_digest(
        password, settings.basic_auth_pass
    )
