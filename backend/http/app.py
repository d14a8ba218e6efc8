"""The WSGI app: wiring only. The routes are `ml` (the ML-backend contract) and `jobs`; errors, auth and
metrics are hooks here; what starts a job is the one `JobService`."""
from __future__ import annotations

import time

from flask import Flask, g, request

from .. import metrics
from ..config import Settings
from ..jobs.service import JobService
from ..sam3.engine import Sam3Engine
from ..sam3.model import Sam3Model
from . import auth, errors, jobs, ml, startup
from .handoff import Handoff
from .projects import Projects

METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # metric labels come from fixed sets


def create_app(settings: Settings | None = None, engine: Sam3Engine | None = None) -> Flask:
    """The app. Without `engine`, SAM 3 loads in a background thread (inside the serving process)."""
    settings = settings or Settings.from_env()
    problems = startup.problems(settings)
    if problems:
        raise ValueError("; ".join(problems))
    sam3 = Sam3Model(settings, engine)
    sam3.start_loading()
    projects = Projects(settings, sam3)
    job_service = JobService(settings, sam3)  # rq workers when REDIS_URL is set, else a thread of this process
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_mb * (1 << 20))  # 413 beyond, before reading it
    app.config.update(sam3=sam3, projects=projects, jobs=job_service.store)
    app.register_blueprint(ml.blueprint(settings, sam3, projects, Handoff(job_service)))
    app.register_blueprint(jobs.blueprint(job_service, projects))
    errors.register(app)

    @app.before_request
    def _start():
        g.t0, g.started = time.perf_counter(), time.monotonic()
        if settings.basic_auth_user and not auth.authorized(request.headers.get("Authorization", ""), settings):
            return auth.challenge()

    @app.after_request
    def _record(resp):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        method = request.method if request.method in METHODS else "OTHER"
        metrics.REQUESTS.labels(route, method, str(resp.status_code)).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return resp

    return app
