"""Retrieve Predictions' hand-off: the tasks a batch could not reach in time go to a job, and answers ready
after Label Studio stopped waiting are posted through its API (see `annotate.retrieve`)."""
from __future__ import annotations

from ..annotate.backend import SAM3Backend
from ..annotate.task import Task
from ..errors import BackendError
from ..jobs import poster
from ..jobs.service import JobService
from ..labelstudio import client
from ..labelstudio.retry import Backoff
from ..validate import whole


class Handoff:
    def __init__(self, jobs: JobService):
        self.jobs = jobs

    def to_job(self, model: SAM3Backend, project: str):
        """A callable that starts a job for the given tasks with the project's own ontology, thresholds and
        outline (so its model_version is the one Label Studio asked for); the job's id."""
        def handoff(rest: list[Task]) -> str | None:
            ids = [t.id for t in rest if whole(t.id, 1, 10**15)]
            if not ids or not project:
                return None
            request = model.project.job_request()
            body = {"project": int(project), "tasks": ids, "ontology": request["ontology"],
                    "thresholds": request["thresholds"], "tiling": request["tiling"]}
            return self.jobs.start(body, model.hostname, model.access_token).id

        return handoff

    def to_api(self, model: SAM3Backend, project: str):
        """A callable that posts late answers ({index: (task, answer)}) through Label Studio's API, the way a
        job posts (a post that may have been applied is checked before it is sent again, and the same rule
        removes duplicates); the indices posted."""
        settings, sam3 = self.jobs.settings, self.jobs.sam3

        def late(ready: dict[int, tuple[Task, dict]]) -> list[int]:
            api = client.api(settings, model.hostname, model.access_token)
            if api is None or not project:
                raise BackendError("no Label Studio connection to post them through")
            by_id = {t.id: (i, t, a) for i, (t, a) in ready.items() if whole(t.id, 1, 10**15)}
            out = poster.save(api, int(project), model.model_version, {tid: a for tid, (_, _, a) in by_id.items()},
                              {tid: {"predictions": t.predictions} for tid, (_, t, _) in by_id.items()},
                              sam3.model_version or "", False, Backoff(settings.api_retries))
            return [by_id[tid][0] for tid in out.posted]

        return late
