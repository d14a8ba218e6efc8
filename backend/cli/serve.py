"""`label-studio-sam3 serve`: the ML backend under gunicorn, tuned for one GPU."""
from __future__ import annotations

import logging
import socket
import sys

from .. import logs
from . import common

log = logging.getLogger(__name__)


def run(args) -> int:
    from gunicorn.app.base import BaseApplication

    from ..http import gunicorn

    settings = common.settings()
    logs.setup(settings.log_level)
    busy = port_in_use(args.host, args.port)
    if busy:
        print(f"error: cannot listen on {args.host}:{args.port} ({busy}): stop what holds the port, or choose "
              "another with --port N (PORT=N make run)", file=sys.stderr)
        return 2
    if not settings.basic_auth_user and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without authentication: anyone who can reach port %d can use this backend. "
                    "Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and give them in Label Studio's Connect Model form), "
                    "or serve on 127.0.0.1", args.host, args.port)
    gunicorn.READ_TIMEOUT = settings.read_timeout

    class App(BaseApplication):
        def load_config(self):
            for key, value in gunicorn.gunicorn_options(args, settings).items():
                self.cfg.set(key, value)

        def load(self):
            from ..http.app import create_app

            return gunicorn.ReadWholeBody(create_app(settings), int(settings.max_body_mb * (1 << 20)))

    App().run()
    return 0


def port_in_use(host: str, port: int) -> str:
    """Why `host:port` cannot be listened on ("" when it can): gunicorn alone retries and says little."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return e.strerror or str(e)
    return ""
