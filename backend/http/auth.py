"""HTTP Basic auth on every route when BASIC_AUTH_USER and BASIC_AUTH_PASS are set."""
from __future__ import annotations

import base64
import binascii
import hmac

from flask import jsonify

from ..config import Settings


def authorized(header: str, settings: Settings) -> bool:
    """HTTP Basic credentials, compared as UTF-8 bytes in constant time (any characters allowed)."""
    if not header.startswith("Basic ") or len(header) > 4096:
        return False
    try:
        user, _, password = base64.b64decode(header[6:].encode("latin-1"), validate=True).partition(b":")
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    ok_user = hmac.compare_digest(user, settings.basic_auth_user.encode())
    return hmac.compare_digest(password, settings.basic_auth_pass.encode()) and ok_user


def challenge():
    resp = jsonify({"error": "authentication required (HTTP Basic)"})
    resp.status_code = 401
    resp.headers["WWW-Authenticate"] = 'Basic realm="label-studio-sam3"'
    return resp
