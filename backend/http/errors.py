"""Every error as JSON `{"error": ...}`, with the message also in the HTTP reason phrase: Label Studio drops the
body of a non-2xx answer and shows only requests' "<code> Client Error: <reason> for url: ...", so the reason is
where the person reads it."""
from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from ..errors import BackendError

log = logging.getLogger(__name__)


def reason(message: str) -> str:
    """An HTTP reason phrase carrying the message (printable ASCII, one line, at most 400 characters)."""
    text = "".join(c if " " <= c <= "~" else "?" for c in message.replace("\n", " "))
    return text[:400].strip() or "error"


def error_response(message: str, status: int, **extra) -> Response:
    resp = jsonify({"error": message, **extra})
    resp.status = f"{status} {reason(message)}"
    return resp


def register(app: Flask) -> None:
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
