"""`label-studio-sam3` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _serve(args) -> int:
    from gunicorn.app.base import BaseApplication

    from .config import Settings

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    class App(BaseApplication):
        def load_config(self):
            # One process holds the model (GPU memory is not shared across forks); request threads share it.
            # The app, and with it CUDA, is created in the worker after the fork (no preload).
            options = {
                "bind": f"{args.host}:{args.port}",
                "workers": 1,
                "worker_class": "gthread",
                "threads": args.threads,
                "timeout": args.timeout,  # a large batch predict can take minutes on CPU
                "graceful_timeout": args.graceful_timeout,  # finish the request in hand on SIGTERM
                "keepalive": 5,
                "preload_app": False,
                "accesslog": "-" if args.access_log else None,
                "errorlog": "-",
                "loglevel": settings.log_level.lower(),
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            from .protocol import create_app

            return create_app(settings)

    App().run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="label-studio-sam3", description="SAM 3 ML backend for Label Studio")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the ML backend HTTP service (gunicorn)")
    serve.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")))
    serve.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "8")))
    serve.add_argument("--timeout", type=int, default=int(os.environ.get("GUNICORN_TIMEOUT", "600")))
    serve.add_argument("--graceful-timeout", type=int, default=120)
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
