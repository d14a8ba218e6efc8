"""The ML-backend contract Label Studio speaks: GET / and /health, POST /setup, POST /predict, POST /webhook;
and GET /metrics for Prometheus."""
from __future__ import annotations

import select
import socket
import time

from flask import Blueprint, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__, metrics
from ..config import Settings
from ..sam3.model import Sam3Model
from . import requests
from .errors import reason
from .handoff import Handoff
from .projects import Projects


def blueprint(settings: Settings, sam3: Sam3Model, projects: Projects, handoff: Handoff) -> Blueprint:
    bp = Blueprint("ml", __name__)

    @bp.get("/")
    @bp.get("/health")
    def health():
        """200 only once the model is loaded: Label Studio and the container health check both read it."""
        return health_response(settings, sam3)

    @bp.post("/setup")
    def setup():
        sam3.wait(0)  # Label Studio shows Connected only for a backend that can answer
        req = requests.Setup.parse(requests.json_object(request.get_data(cache=False)))
        model = projects.setup(req.project, req.schema, req.hostname, req.access_token, req.extra_params)
        if model.project.connection is not None and req.project:
            model.project.connection.check(req.project)  # says now, where the admin sees it, if images will fail
        return jsonify({"model_version": model.model_version})

    @bp.post("/predict")
    def predict():
        req = requests.Predict.parse(requests.json_object(request.get_data(cache=False)))
        model = projects.get(req.project, req.label_config)
        # Label Studio (User-Agent heartex/<version>) drops errors of clicks: tell its editor through a suggestion.
        from_label_studio = request.headers.get("User-Agent", "").startswith("heartex/")
        predictions = model.predict(req.tasks, context=req.context, notices=from_label_studio,
                                    handoff=handoff.to_job(model, req.project), late=handoff.to_api(model, req.project),
                                    started=g.started, client_gone=lambda: hung_up(request.environ))
        if len(predictions) != len(req.tasks):  # Label Studio pairs results[i] with tasks[i]
            raise RuntimeError(f"{len(predictions)} predictions for {len(req.tasks)} tasks")
        return jsonify({"results": predictions, "model_version": model.model_version})

    @bp.post("/webhook")
    def webhook():
        data = requests.json_object(request.get_data(cache=False))
        action = data.get("action")
        action = action if isinstance(action, str) and len(action) <= 64 else None
        return jsonify({"status": "ok", "action": action, "trained": False}), 200

    @bp.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.REGISTRY), mimetype=CONTENT_TYPE_LATEST)

    return bp


def health_response(settings: Settings, sam3: Sam3Model):
    eng = sam3.engine
    ready = sam3.state == "ready"
    body = jsonify({
        "status": "UP" if ready else sam3.state.upper(),
        "model_class": "SAM3Backend",
        "model_state": sam3.state,  # loading | ready | failed
        "model_loaded": ready,
        "model": settings.model,
        "model_version": sam3.model_version,
        "device": str(eng.device) if eng else settings.device,
        "dtype": str(eng.dtype).removeprefix("torch.") if eng else settings.dtype,
        "error": sam3.error or None,
        "retry_in_seconds": max(0, round(sam3.retry_at - time.time())) if sam3.retry_at else None,
        "version": __version__,
        "v2": True,
    })
    if not ready:
        body.status = f"503 {reason(sam3.error or 'SAM 3 model is loading')}"
    return body


def hung_up(environ) -> bool:
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
