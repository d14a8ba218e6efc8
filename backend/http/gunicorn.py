"""Serving the app with gunicorn so that slow or hostile clients cannot take every request thread.

gunicorn's threaded worker reads a request's headers and body on the request thread with no time
limit: a client that sends a byte a second holds that thread for as long as it likes. Here every
request has `SAM3_READ_TIMEOUT` seconds to arrive whole (headers and body); past that its socket is
shut down and the thread is free again. The body is read up front, with that deadline and the body
limit, so the app never reads from a slow socket.
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading

from gunicorn.workers.gthread import ThreadWorker

from ..labelstudio.watchdog import WATCHDOG

log = logging.getLogger(__name__)
READ_TIMEOUT = 15.0  # set by `serve` from SAM3_READ_TIMEOUT before gunicorn forks its worker
_reading: dict[int, object] = {}  # id(socket) -> the alarm of the request being read on it
_lock = threading.Lock()


def _stop_reading(sock) -> None:
    """The blocked read returns at once; the socket can still carry our 408 back."""
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


class GuardedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker with a deadline for receiving each request."""

    def handle(self, conn):
        sock = conn.sock
        alarm = WATCHDOG.arm(READ_TIMEOUT, lambda: _stop_reading(sock))
        with _lock:
            _reading[id(sock)] = alarm
        try:
            return super().handle(conn)
        finally:
            alarm.cancel()
            with _lock:
                if _reading.get(id(sock)) is alarm:
                    del _reading[id(sock)]


def _json(start_response, status: str, message: str):
    body = json.dumps({"error": message}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Connection", "close")])
    return [body]


class ReadWholeBody:
    """WSGI middleware: the body is read here, whole, within the request's read deadline and size limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def __call__(self, environ, start_response):
        sock = environ.get("gunicorn.socket")
        if sock is None:  # not under our worker (tests, another server): Flask's own limit applies
            return self.app(environ, start_response)
        with _lock:
            alarm = _reading.get(id(sock))
        try:
            length = environ.get("CONTENT_LENGTH") or ""
            if length.isdigit() and int(length) > self.max_bytes:
                return _json(start_response, "413 Request Entity Too Large",
                             f"request body is over the {self.max_bytes >> 20} MB limit (SAM3_MAX_BODY_MB)")
            try:
                body = environ["wsgi.input"].read(self.max_bytes + 1)
            except Exception:  # the client went away, or the deadline stopped the read
                body = None
            if alarm is not None and alarm.fired:
                log.warning("%s sent its request too slowly; cut off after %.0f s", environ.get("REMOTE_ADDR"),
                            READ_TIMEOUT)
                return _json(start_response, "408 Request Timeout",
                             f"request not received within {READ_TIMEOUT:.0f} s (SAM3_READ_TIMEOUT)")
            if body is None or (length.isdigit() and len(body) < int(length)):
                return _json(start_response, "400 Bad Request", "request body ended before its Content-Length")
        finally:
            if alarm is not None:
                alarm.cancel()  # received: what follows (the model) may take as long as it needs
        if len(body) > self.max_bytes:
            return _json(start_response, "413 Request Entity Too Large",
                         f"request body is over the {self.max_bytes >> 20} MB limit (SAM3_MAX_BODY_MB)")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)


def gunicorn_options(args, settings) -> dict:
    """Serving on one GPU: one process holds the model (GPU memory is not shared across forks) and
    request threads share it; the app, and with it CUDA, is created in the worker after the fork."""
    options = {
        "bind": f"{args.host}:{args.port}",
        "workers": 1,
        "worker_class": "backend.http.gunicorn.GuardedThreadWorker",
        "threads": args.threads,  # many: slow peers hold threads, the model lock serialises the real work
        "preload_app": False,  # never initialise CUDA in the master that forks
        "timeout": args.timeout,  # a large batch predict can take minutes
        "graceful_timeout": args.graceful_timeout,  # on SIGTERM, finish the request in hand
        "keepalive": 5,
        "control_socket_disable": True,  # one per user by default: two servers of one user would share it
        "accesslog": "-" if args.access_log else None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
    }
    if os.path.isdir("/dev/shm"):
        options["worker_tmp_dir"] = "/dev/shm"  # heartbeat file off a container's overlay disk
    return options
