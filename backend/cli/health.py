"""`label-studio-sam3 health`: the container HEALTHCHECK of either role, light enough to run every 15 s (it
imports neither torch nor the model)."""
from __future__ import annotations

import sys

from ..jobs.health import HEALTH_FILE, read_health
from . import common


def run(args) -> int:
    """Exit 0 when this container's role is healthy: `serve` answers with its model loaded; a `worker` reports
    its model loaded and Redis reachable. Without --serve or --worker, a worker's report in this container makes
    it a worker."""
    if args.worker or (not args.serve and HEALTH_FILE.exists()):
        ok, why = read_health()
        print(why, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    return serve_health(args.port)


def serve_health(port: int) -> int:
    import requests

    settings = common.settings()
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    try:
        data = requests.get(f"http://127.0.0.1:{port}/health", auth=auth, timeout=5).json()
    except (requests.RequestException, ValueError) as e:
        print(f"unhealthy: {type(e).__name__}", file=sys.stderr)
        return 1
    state = data.get("model_state")
    print(f"{state}: {data.get('model')} on {data.get('device')}" + (f": {data.get('error')}" if data.get("error")
                                                                       else ""))
    return 0 if state == "ready" else 1
