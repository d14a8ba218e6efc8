"""Bulk label jobs over HTTP: POST /jobs, GET /jobs, GET /jobs/<id>, DELETE /jobs/<id>."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ..errors import BackendError
from ..jobs import lifecycle
from ..jobs.record import JobStatus, view
from ..jobs.service import JobService
from . import requests
from .projects import Projects


def blueprint(jobs: JobService, projects: Projects) -> Blueprint:
    bp = Blueprint("jobs", __name__)
    store = jobs.store

    @bp.post("/jobs")
    def create_job():
        body = requests.json_object(request.get_data(cache=False))
        project = requests.project_key(body.get("project")) if isinstance(body, dict) else ""
        job = jobs.start(body, *projects.connection(project))
        return jsonify({"job_id": job.id, "status": job.status.value, "model_version": job.model_version,
                        "url": f"/jobs/{job.id}"}), 202

    @bp.get("/jobs")
    def list_jobs():
        status = JobStatus.parse(request.args.get("status"))
        try:
            offset = int(request.args.get("offset", 0))
            limit = int(request.args.get("limit", 20))
        except ValueError:
            raise BackendError("offset and limit must be integers") from None
        if offset < 0 or not 1 <= limit <= 500:
            raise BackendError("offset must be >= 0 and limit between 1 and 500")
        items, total = store.list(status, offset, limit)
        return jsonify({"jobs": [view(j) for j in items], "total": total, "offset": offset, "limit": limit})

    @bp.get("/jobs/<job_id>")
    def get_job(job_id):
        job = store.get(job_id)
        if job is None:
            raise BackendError(f"no job {job_id}", 404)
        return jsonify(view(job))

    @bp.get("/jobs/<job_id>/report")
    @bp.get("/jobs/<job_id>/report.json")
    def job_report(job_id):
        """An evaluation's report: the page, or its figures as JSON."""
        job = store.get(job_id)
        if job is None:
            raise BackendError(f"no job {job_id}", 404)
        if job.request.mode != "evaluate":
            raise BackendError(f"job {job_id} is a label job: only evaluations have a report", 404)
        ready = store.report(job_id)
        if ready is None:
            raise BackendError(f"job {job_id} is {job.status.value}: its report is ready when it has succeeded", 404)
        if request.path.endswith(".json"):
            return jsonify(ready[0])
        return Response(ready[1], mimetype="text/html")

    @bp.delete("/jobs/<job_id>")
    def cancel_job(job_id):
        return jsonify(view(lifecycle.cancel(store, job_id))), 202

    return bp
