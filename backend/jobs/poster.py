"""Posting predictions to Label Studio, exactly once per (task, model_version).

- A post that may have been applied (a 5xx, a connection dropped after sending) is followed by a look at the
  tasks before anything is posted again; only predictions Label Studio did not hold before count as ours.
- After posting, a last look at the task's predictions in Label Studio, and the rule every run applies the same
  way (`remove_duplicates`): of the predictions of this model_version made since the task was read, the oldest
  (lowest id) stays and the others are deleted. It guards what the job store cannot see: runs that share no
  store (the command line beside a service without Redis, two services on one project) or that posted the
  same task in the same instant all end with the same one prediction.
- `overwrite` posts the new prediction first and deletes this backend's older ones afterwards, so a task never
  has neither.
Who may post a task at all is decided before (the runner's claim on it, with its fencing token).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..annotate.versions import made_with
from ..errors import BackendError
from ..labelstudio.client import LabelStudioAPI
from ..labelstudio.retry import Backoff, Transient

log = logging.getLogger(__name__)


def has_prediction(task: dict, mv: str, besides: set[int] = frozenset()) -> bool:
    """Does the task hold a prediction of `mv` (other than the ids in `besides`)?"""
    return any(p.get("model_version") == mv and p.get("id") not in besides for p in task.get("predictions") or [])


def own_predictions(task: dict, mv: str, checkpoint_version: str) -> list[int]:
    """Ids of this backend's predictions of the task made with the same checkpoint (any ontology)."""
    return [p["id"] for p in task.get("predictions") or []
            if str(p.get("model_version") or "") == mv or made_with(str(p.get("model_version") or ""),
                                                                     checkpoint_version)]


def post_predictions(api: LabelStudioAPI, project: int, mv: str, predictions: dict[int, dict], backoff: Backoff,
                     before: dict[int, set[int]] | None = None) -> tuple[dict[int, int], dict[int, str]]:
    """Bulk-import predictions; returns ({task: regions} posted, {task: error} given up on).

    `before` holds the prediction ids each task had when it was read: a prediction of `mv` that is not among
    them after a failed attempt is the one this attempt stored.
    """
    before = before or {}
    remaining = dict(predictions)
    posted: dict[int, int] = {}
    last = ""
    for attempt in range(1, backoff.attempts + 1):
        try:
            api.import_predictions(project, [{"task": t, **p} for t, p in remaining.items()])
            posted.update({t: len(p["result"]) for t, p in remaining.items()})
            return posted, {}
        except BackendError as e:  # refused outright: find the task(s) it refuses
            if len(remaining) == 1:
                return posted, {t: f"Label Studio refused the prediction: {e.message}" for t in remaining}
            failed = {}
            for t, p in remaining.items():
                one_posted, one_failed = post_predictions(api, project, mv, {t: p}, backoff, before)
                posted.update(one_posted)
                failed.update(one_failed)
            return posted, failed
        except Transient as e:
            last = str(e)
            if attempt == backoff.attempts:
                break
            time.sleep(backoff.delay(attempt, e.after))
        try:
            for t in list(remaining):
                if has_prediction(_held(api, t), mv, before.get(t, set())):
                    posted[t] = len(remaining.pop(t)["result"])
        except (Transient, BackendError) as e:
            # Cannot tell what was stored: posting again could duplicate. A later run finishes them.
            return posted, {t: f"could not verify the prediction was stored: {e}" for t in remaining}
        if not remaining:
            return posted, {}
    return posted, {t: f"gave up posting after {backoff.attempts} attempts: {last}" for t in remaining}


def _held(api: LabelStudioAPI, task_id: int) -> dict:
    """What Label Studio holds for the task now, in the shape of a task read (only its predictions)."""
    return {"id": task_id, "predictions": api.predictions(task_id)}


@dataclass
class Outcome:
    posted: dict[int, int] = field(default_factory=dict)  # task -> regions
    failed: dict[int, str] = field(default_factory=dict)  # task -> why
    removed: int = 0  # duplicate predictions deleted


def duplicates(task: dict, mv: str, before: set[int] = frozenset()) -> list[int]:
    """Ids of the task's predictions of `mv` (made since `before` was read) that the rule deletes: all but the
    oldest. Every run applies the same rule, so two runs that both posted keep the same one."""
    ids = sorted(p["id"] for p in task.get("predictions") or []
                 if p.get("model_version") == mv and p.get("id") not in before and isinstance(p.get("id"), int))
    return ids[1:]


def remove_duplicates(api: LabelStudioAPI, task: dict, mv: str, before: set[int] = frozenset()) -> int:
    """Delete `duplicates(task, mv, before)`; how many went (a failed delete is left for a later run)."""
    removed = 0
    for pid in duplicates(task, mv, before):
        try:
            api.delete_prediction(pid)
            removed += 1
        except (Transient, BackendError) as e:
            log.warning("task %s: could not delete duplicate prediction %s: %s", task.get("id"), pid, e)
    if removed:
        log.warning("task %s: deleted %d duplicate prediction(s) of %s (another run posted it too)",
                    task.get("id"), removed, mv)
    return removed


def save(api: LabelStudioAPI, project: int, mv: str, predictions: dict[int, dict], tasks: dict[int, dict],
         checkpoint_version: str, overwrite: bool, backoff: Backoff) -> Outcome:
    """Post, look at what Label Studio holds and apply the rule, then (with `overwrite`) delete the older
    predictions of this backend that were read with the task.

    The look comes after posting, not before: it catches another run's post however close in time the two
    were, and it costs one read of the task's predictions per task (a look before as well adds a second read
    to every task, for no case this one misses: 2.2-2.4 tasks/s instead of 2.8-3.3 in `bench/jobs.py` with
    the tiny model and Label Studio on the same two cores). Which of two posts stays is the rule's choice:
    both runs count the task as predicted, and `removed` says how many were deleted."""
    out = Outcome()
    before = {t: {p.get("id") for p in tasks[t].get("predictions") or []} for t in predictions}
    out.posted, out.failed = post_predictions(api, project, mv, predictions, backoff, before)
    for t in out.posted:
        try:
            out.removed += remove_duplicates(api, _held(api, t), mv, before[t])
        except (Transient, BackendError) as e:  # the next run that reads the task applies the rule
            log.warning("task %s: could not check for duplicates after posting: %s", t, e)
    if overwrite:
        for t in out.posted:
            for old in own_predictions(tasks[t], mv, checkpoint_version):
                try:
                    api.delete_prediction(old)
                except (Transient, BackendError) as e:  # the new one stands; the old one stays beside it
                    log.warning("task %s: could not delete the replaced prediction %s: %s", t, old, e)
    return out
