"""`label-studio-sam3 evaluate`: SAM 3 against a project's own annotations, before it labels 100k images: per-label
figures, a threshold per label to paste into the Connect Model form, a one-page HTML report; nothing posted."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from .. import logs
from ..errors import BackendError
from . import common
from .label import progress, summary

COLUMNS = ("annotations", "tp", "fp", "fn", "precision", "recall", "f1", "mean_iou", "ap", "ap50",
           "current_threshold", "recommended_threshold")


def request(args) -> dict:
    body = {"project": args.project, "mode": "evaluate", "ontology": common.ontology(args.prompt),
            "limit": args.limit, "seed": args.seed, "iou": args.iou, "target_precision": args.target_precision}
    if args.threshold is not None:
        body["thresholds"] = {"confidence": args.threshold}
    if args.tasks:
        body["tasks"] = args.tasks
    if args.tiling:
        body["tiling"] = args.tiling
    return {k: v for k, v in body.items() if v is not None}


def run(args) -> int:
    settings = common.settings(bulk=True)
    logs.setup(settings.log_level)
    if not settings.label_studio_url:
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    if args.queue and not settings.redis_url:
        print("error: --queue needs REDIS_URL (the workers' Redis)", file=sys.stderr)
        return 2
    from ..jobs import runner  # torch and the model's code: after the checks that need neither
    from ..jobs.lifecycle import Context
    from ..jobs.service import JobService
    from ..jobs.store import MemoryStore
    from ..sam3.model import Sam3Model

    sam3 = Sam3Model(settings)
    jobs = JobService(settings, sam3, None if settings.redis_url else MemoryStore())
    try:
        if args.queue:
            sam3.identify()
            job = jobs.start(request(args))
            print(f"{job.id}  (its report, once it has succeeded: /jobs/{job.id}/report on the service)")
            return 0
        if sam3.load().state != "ready":
            print(f"error: {sam3.error}", file=sys.stderr)
            return 1
        job, api = jobs.create(request(args))
    except BackendError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print(f"evaluation {job.id}: project {args.project}, model_version {job.model_version}", file=sys.stderr)
    finished = threading.Event()
    printer = threading.Thread(target=progress, args=(jobs.store, job.id, finished), daemon=True)
    printer.start()
    runner.run_all(Context(settings, sam3, jobs.store, api), job.id)
    finished.set()
    printer.join()
    return write(jobs.store, job.id, args)


def write(store, job_id: str, args) -> int:
    from ..jobs.record import view

    job, ready = store.get(job_id), store.report(job_id)
    if ready is None:
        print(summary(view(job)), file=sys.stderr)
        return 1
    data, page = ready
    print(table(data))
    print("\nRecommended thresholds, as Extra params for the Connect Model form (or SAM3_ONTOLOGY):")
    print(json.dumps(data["recommended_extra_params"]))
    html = Path(args.html or f"sam3-evaluation-project{args.project}.html")
    html.write_text(page)
    print(f"\nreport: {html}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    for line in notes(data):
        print(line, file=sys.stderr)
    return 0


def table(data: dict) -> str:
    def cell(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    rows = [("label", *COLUMNS)] + [(label, *(cell(v[c]) for c in COLUMNS)) for label, v in data["labels"].items()]
    o = data["overall"]
    rows.append(("overall", "", *(cell(o[c]) for c in COLUMNS[1:10]), "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def notes(data: dict) -> list[str]:
    out = []
    if data["not_evaluated"]:
        out.append(f"not evaluated (labels the ontology does not cover): {data['not_evaluated']}")
    if data["skipped_kinds"]:
        out.append(f"skipped (region kinds the backend does not emit): {data['skipped_kinds']}")
    for f in data["tasks"]["failed"]:
        out.append(f"task {f['task']} not counted: {f['error']}")
    return out
