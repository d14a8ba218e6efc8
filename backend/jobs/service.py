"""Starting a job, in one place for every caller: `POST /jobs`, Retrieve Predictions' hand-off of the tasks it
could not reach, and the command line."""
from __future__ import annotations

from ..config import Settings
from ..errors import BackendError
from ..labelstudio import client
from ..sam3.model import Sam3Model
from . import lifecycle, queue
from .embedded import EmbeddedRunner
from .record import Job
from .redis_store import RedisStore
from .store import JobStore, MemoryStore


class JobService:
    """Jobs go to rq workers when REDIS_URL is set (any number of machines), else to one thread of this process.

    `start` checks the request against the project, stores the job and hands it on; the Label Studio connection
    is the one `client.connect` decides on (the environment's, else the project's /setup host and token)."""

    def __init__(self, settings: Settings, sam3: Sam3Model, store: JobStore | None = None):
        self.settings, self.sam3 = settings, sam3
        self.rq = bool(settings.redis_url)
        if store is None:
            store = RedisStore.from_settings(settings) if self.rq else MemoryStore(max_jobs=settings.max_jobs)
        self.store = store
        self._embedded = None if self.rq else EmbeddedRunner(settings, sam3, store)

    def create(self, body, hostname: str = "", token: str = "") -> tuple[Job, client.LabelStudioAPI]:
        """The job stored (queued), not yet handed on: the command line runs it itself."""
        api = client.api(self.settings, hostname, token)
        if api is None:
            raise BackendError("no Label Studio connection for jobs: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, "
                               "or connect this backend to the project in Label Studio first")
        return lifecycle.create(self.store, api, self.settings, self.sam3, body), api

    def start(self, body, hostname: str = "", token: str = "") -> Job:
        job, api = self.create(body, hostname, token)
        if self.rq:
            queue.enqueue(self.settings, self.store.r, job.id)
        else:
            self._embedded.submit(job.id, api)
        return job
