"""An evaluation job's work: each claimed task compared with its latest annotation (nothing posted), its result
kept in the store; at the end, the report over every result, with thumbnails of the worst tasks."""
from __future__ import annotations

import logging

from ..annotate.labeller import Labeller
from ..annotate.project import Project
from ..annotate.task import Task
from ..errors import Skip
from ..evaluate import report as reports
from ..evaluate.evaluator import Evaluator
from .heartbeat import Heartbeat
from .lifecycle import Context
from .record import ACTIVE, Job

log = logging.getLogger(__name__)


class EvaluationRun:
    def __init__(self, ctx: Context, job: Job, project: Project, labeller: Labeller, beat: Heartbeat):
        self.ctx, self.job, self.labeller, self.beat = ctx, job, labeller, beat
        self.evaluator = Evaluator(project, labeller)
        self.read_tasks: dict = {}

    def read(self, task: Task) -> Task:
        if task.id not in self.read_tasks:  # once per task, fresh, with its annotations
            self.read_tasks[task.id] = Task.from_json(self.ctx.require_api().task(task.id))
        return self.read_tasks[task.id]

    def run(self, task_ids: list[int]) -> None:
        store, job_id, worker = self.ctx.store, self.job.id, self.ctx.worker
        for task, result, error in self.evaluator.run([Task(t) for t in task_ids], self.read, self.labeller.load):
            if isinstance(error, Skip):
                store.finish(job_id, "skipped", {task.id: 0}, worker)
            elif error is not None:
                message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
                store.add_error(job_id, task.id, message)
                store.put_result(job_id, task.id, {"task": task.id, "error": message})  # listed, not counted
                store.finish(job_id, "failed", {task.id: 0}, worker)
            else:
                store.put_result(job_id, task.id, result)
                regions = sum(len(u["current"]) for u in result["images"])
                store.finish(job_id, "predicted", {task.id: regions}, worker)
            self.beat.release([task.id])
            if store.status(job_id) not in ACTIVE:
                break  # cancelled: stop after the task in hand


def report(ctx: Context, job: Job) -> tuple[dict, str]:
    """The report over every task's result, and its page (thumbnails of the worst tasks fetched again)."""
    project = ctx.project(job)
    stored = ctx.store.results(job.id).values()
    results = [r for r in stored if "images" in r]
    failed = [{"task": r["task"], "error": r["error"]} for r in stored if "error" in r]
    data = reports.build(results, project, job.project, job.request.iou, job.request.target_precision, failed)
    data["extra_params_from"] = job.request.extra_params_from
    by_task = {r["task"]: r for r in results}
    labeller = Labeller(project, ctx.sam3.engine)
    thumbnails = {}
    for w in data["worst"]:
        try:
            result = by_task[w["task"]]
            thumbnails[w["task"]] = reports.thumbnail(labeller.load(Task.from_json(ctx.require_api().task(w["task"])),
                                                                    result["images"][0]["name"]), result)
        except Exception as e:  # a thumbnail is worth a try, not a failed report
            log.warning("job %s: no thumbnail for task %s: %s", job.id, w["task"], e)
    base = ctx.api.ls.url if ctx.api else ""
    page = reports.html_page(data, thumbnails, lambda t: f"{base}/projects/{job.project}/data?task={t}")
    return data, page
