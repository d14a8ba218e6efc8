"""A worker's health, for its container: a worker serves no HTTP to probe, so it reports its own state to a
file that `label-studio-sam3 health --worker` reads."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the health check imports this module: no torch for it
    from ..sam3.model import Sam3Model

log = logging.getLogger(__name__)

HEALTH_FILE = Path(tempfile.gettempdir()) / "label-studio-sam3-worker.json"
HEALTH_EVERY = 10.0  # seconds between reports; a report older than 3 of these means the worker is stuck or gone


class HealthReport:
    """A worker's state where `label-studio-sam3 health --worker` reads it: its model's state and whether it
    reaches Redis, written every HEALTH_EVERY seconds by a side thread (a worker serves no HTTP to probe)."""

    def __init__(self, sam3: Sam3Model, redis, path: Path = HEALTH_FILE):
        self.sam3, self.redis, self.path = sam3, redis, path
        self._stop = threading.Event()

    def start(self) -> "HealthReport":
        self.write()
        threading.Thread(target=self._run, name="sam3-health", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self.path.unlink()
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(HEALTH_EVERY):
            self.write()

    def write(self) -> None:
        try:
            self.redis.ping()
            redis = "ok"
        except Exception as e:  # reported, not raised: the worker itself retries
            redis = f"{type(e).__name__}: {e}"[:300]
        report = {"pid": os.getpid(), "at": time.time(), "model_state": self.sam3.state,
                  "model_error": self.sam3.error or None, "redis": redis}
        try:
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}")
            tmp.write_text(json.dumps(report))
            tmp.replace(self.path)  # whole or not at all: the reader never sees half a report
        except OSError as e:
            log.warning("cannot write the health report %s: %s", self.path, e)


def read_health(path: Path = HEALTH_FILE) -> tuple[bool, str]:
    """(healthy, why) from a worker's report: fresh, its model loaded, Redis reachable."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return False, "no worker health report here (is `label-studio-sam3 worker` running in this container?)"
    except (OSError, ValueError) as e:
        return False, f"unreadable health report {path}: {e}"
    age = time.time() - float(report.get("at") or 0)
    if age > 3 * HEALTH_EVERY:
        return False, f"the worker's last report is {age:.0f} s old: it is stuck or gone"
    if report.get("redis") != "ok":
        return False, f"the worker cannot reach Redis: {report.get('redis')}"
    if report.get("model_state") != "ready":
        return False, f"model {report.get('model_state')}: {report.get('model_error') or 'loading'}"
    return True, "ready: connected to Redis, model loaded"
