"""Jobs without Redis: one background thread of the service runs them, one at a time, in the order they came.
The job list lives in memory and is lost when the service restarts (the predictions are not)."""
from __future__ import annotations

import queue
import threading

from ..config import Settings
from ..labelstudio.client import LabelStudioAPI
from ..sam3.model import Sam3Model
from . import runner
from .lifecycle import Context
from .store import MemoryStore


class EmbeddedRunner:
    """Jobs of this service, one at a time, in one daemon thread, in the order they came."""

    def __init__(self, settings: Settings, sam3: Sam3Model, store: MemoryStore):
        self.settings, self.sam3, self.store = settings, sam3, store
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job_id: str, api: LabelStudioAPI) -> None:
        self._queue.put((job_id, api))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sam3-jobs", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            job_id, api = self._queue.get()
            runner.run_all(Context(self.settings, self.sam3, self.store, api), job_id)
