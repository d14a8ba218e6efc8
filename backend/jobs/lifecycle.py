"""A job's life outside its run: created from a request checked against the project (one active job per project
and model_version), cancelled, failed; and what running it needs (`Context`, the job's `Project`)."""
from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..annotate.ontology import extra_params
from ..annotate.project import Project
from ..annotate.regions import Outline
from ..config import Settings
from ..errors import BackendError
from ..labelstudio.client import LabelStudioAPI
from ..labelstudio.retry import Backoff, Transient
from ..sam3.model import Sam3Model
from .record import ACTIVE, Job, JobRequest, JobStatus, now
from .store import JobStore

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What running a job needs: settings, the model, the job store and a Label Studio connection."""

    settings: Settings
    sam3: Sam3Model
    store: JobStore
    api: LabelStudioAPI | None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    heartbeat: Callable[[], None] = lambda: None  # tells rq this worker is alive (see queue.make_worker)
    projects: dict[str, Project] = field(default_factory=dict)  # job id -> its project: chunks of one job share it

    def require_api(self) -> LabelStudioAPI:
        if self.api is None:
            raise BackendError("this worker has no Label Studio connection: set LABEL_STUDIO_URL and "
                               "LABEL_STUDIO_API_KEY in its environment")
        return self.api

    def project(self, job: Job) -> Project:
        """The job's project, built once per job in this process (the last one only: a worker runs one job's
        chunks after another's)."""
        if job.id not in self.projects:
            self.projects.clear()
            self.projects[job.id] = project_for(self.settings, self.sam3, self.api, job.label_config, job.request)
        return self.projects[job.id]


def project_for(settings: Settings, sam3: Sam3Model, api: LabelStudioAPI | None, label_config: str,
                req: JobRequest) -> Project:
    """The project a job labels with: its label config, the request's ontology, thresholds, outline and tiling."""
    if not (label_config or "").strip():
        raise BackendError("the project has no label config")
    project = Project(settings, sam3, label_config,
                      {"ontology": req.ontology, "thresholds": req.thresholds, "tiling": req.tiling},
                      api.ls.url if api else "", api.ls.token if api else "",
                      Outline.from_dict(req.outline) if req.outline else None,
                      # nobody waits on a job's image: it may retry as long as the API calls do
                      fetch_retries=max(settings.fetch_retries, settings.api_retries))
    if not project.ontology:
        raise BackendError("nothing to label: the project's output controls carry no labels")
    return project


def create(store: JobStore, api: LabelStudioAPI, settings: Settings, sam3: Sam3Model, body) -> Job:
    """Validate a job request against the project, store the job (queued) and return it.

    Nothing is stored when the request, the project or its ontology is wrong.
    """
    pid, req = JobRequest.parse(body, settings.max_job_tasks)
    # The caller waits: two quick attempts, and Label Studio's trouble is a 424 (Failed Dependency), not ours.
    quick = LabelStudioAPI(api.ls, Backoff(attempts=2, base=0.5), api.timeout)
    try:
        data = quick.project(pid)
    except BackendError as e:
        if e.status == 404:
            raise BackendError(f"project {pid} not found in Label Studio at {api.ls.url}", 404) from None
        raise BackendError(e.message, 424) from None
    except Transient as e:
        raise BackendError(f"Label Studio at {api.ls.url} is not answering: {e}", 424) from None
    config = data.get("label_config") if isinstance(data, dict) else None
    config = config if isinstance(config, str) else ""
    if req.ontology is None and req.thresholds is None:  # what the project uses, as Retrieve Predictions does
        extra, req.extra_params_from = connected_extra_params(quick, pid)
        req.ontology, req.thresholds = extra.get("ontology"), extra.get("thresholds")
        req.tiling = extra.get("tiling") if req.tiling is None else req.tiling
    project = project_for(settings, sam3, api, config, req)
    if req.mode == "evaluate" and project.require_config().is_video:
        raise BackendError("evaluation compares image regions (polygons, brush masks, boxes); this project labels "
                           "videos")
    job_id = uuid.uuid4().hex[:12]
    # Resolved here, so every worker labels with exactly these whatever its own environment says.
    resolved = project.job_request()
    req.ontology, req.thresholds, req.outline, req.tiling = (resolved["ontology"], resolved["thresholds"],
                                                             resolved["outline"], resolved["tiling"])
    mv = project.model_version
    # What claims and the one-active-job lock are about; a dry run or an evaluation posts nothing: no lock.
    posts = not req.dry_run and req.mode == "label"
    scope = f"{pid}:{mv}" if posts else f"{'dry' if req.dry_run else 'eval'}-{job_id}"
    job = Job(id=job_id, status=JobStatus.QUEUED, project=pid, model_version=mv, request=req, label_config=config,
              created_at=now(), scope=scope, lock=scope if posts else None)
    store.create(job)
    return store.get(job_id)


def connected_extra_params(api: LabelStudioAPI, pid: int) -> tuple[dict, str]:
    """(extra params, where from): those of the ML backend connected to the project in Label Studio (the most
    recently updated, if several), else none (the environment's then apply)."""
    try:
        backends = api.ml_backends(pid)
    except (BackendError, Transient) as e:
        raise BackendError(f"could not read the ML backends of project {pid} from Label Studio: "
                           f"{getattr(e, 'message', None) or e}", 424) from None
    if not backends:
        return {}, "environment"
    ml = max(backends, key=lambda m: (str(m.get("updated_at") or ""), m.get("id") or 0))
    try:
        extra = extra_params(ml.get("extra_params"))
    except BackendError as e:
        raise BackendError(f"the extra params of ML backend {ml.get('id')} connected to project {pid} cannot be read: "
                           f"{e.message}") from None
    return extra, f"ml backend {ml.get('id')}"


def cancel(store: JobStore, job_id: str) -> Job:
    if store.get(job_id) is None:
        raise BackendError(f"no job {job_id}", 404)
    if not store.transition(job_id, ACTIVE, status=JobStatus.CANCELLED, cancelled_at=now(), finished_at=now()):
        raise BackendError(f"job {job_id} is {store.status(job_id).value}; only queued or running jobs can be "
                           "cancelled", 409)
    return store.get(job_id)


def fail(store: JobStore, job_id: str, message: str) -> None:
    log.error("job %s failed: %s", job_id, message)
    store.add_error(job_id, None, message)
    store.transition(job_id, ACTIVE, status=JobStatus.FAILED, error=message, finished_at=now())
