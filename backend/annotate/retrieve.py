"""Label Studio's Retrieve Predictions: one request with every selected task, answered within Label Studio's
limit, every task ending with one prediction.

Label Studio waits SAM3_PREDICT_TIMEOUT seconds (its ML_TIMEOUT_PREDICT, 100 s) for the whole batch and stores
nothing from a later answer. So the batch works to SAM3_PREDICT_BUDGET: a task that would not finish inside
what is left of it (at the pace so far) is not started, and it and the rest go to `handoff` (a background job
that posts their predictions through the API). When the answers are ready too late for Label Studio anyway
(one task ran long past the budget, or Label Studio hung up), `late` posts them through the API instead (or
they are handed on): their answers carry no result, so nothing is stored twice.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from ..errors import BackendError
from ..sam3.model import BATCH_WAIT
from .labeller import Labeller
from .project import Project
from .task import Task

log = logging.getLogger(__name__)

Handoff = Callable[[list[Task]], "str | None"]  # starts a job for these tasks; its id
Late = Callable[[dict[int, tuple[Task, dict]]], list[int]]  # posts {index: (task, answer)}; the indices posted


class Retrieve:
    def __init__(self, project: Project):
        self.project = project

    def answer(self, tasks: list[Task], handoff: Handoff | None = None, late: Late | None = None,
               started: float | None = None, client_gone: Callable[[], bool] | None = None) -> list[dict]:
        """One answer per task, in order. A task that could not be labelled gets an answer without "result"
        (its "error" says why), which Label Studio does not store: the task stays unlabelled and a later
        Retrieve Predictions tries it again, instead of skipping it forever as predicted by this model_version.
        `started` (time.monotonic()) is when the request came in."""
        p, s = self.project, self.project.settings
        started = time.monotonic() if started is None else started
        labeller = Labeller(p, p.sam3.wait(timeout=BATCH_WAIT))
        outcomes = list(labeller.label(tasks, deadline=started + s.predict_budget))
        log.info("predicted %d tasks: %s", len(outcomes), labeller.stages)
        answers: list[dict | None] = [o.prediction if o.error is None else p.failure(o.error) for o in outcomes]
        why = {i: f"not reached within the {s.predict_budget:.0f} s budget of one request"
               for i in range(len(answers), len(tasks))}
        answers += [None] * (len(tasks) - len(answers))
        answered = [i for i, a in enumerate(answers) if a is not None and "result" in a]
        if answered and self._too_late(started, client_gone):
            took = time.monotonic() - started
            posted = self._post_late(tasks, answers, answered, late)
            for i in answered:
                if i in posted:
                    answers[i] = {"model_version": p.model_version,
                                  "error": f"answered after {took:.0f} s, when Label Studio had stopped waiting: "
                                           "posted through the API instead"}
                else:
                    why[i] = f"answered after {took:.0f} s, too late for Label Studio"
        if why:
            handed = sorted(why)
            try:
                job = handoff([tasks[i] for i in handed]) if handoff else None
                then = f"; background job {job} labels it" if job else "; Retrieve Predictions again to label it"
            except BackendError as e:
                then = f"; no background job could take it ({e.message})"
            log.info("batch of %d tasks: %d handed on%s", len(tasks), len(handed), then)
            for i in handed:
                answers[i] = p.failure(BackendError(why[i] + then))
        return answers

    def _too_late(self, started: float, client_gone=None) -> bool:
        """May Label Studio have stopped waiting? Past its limit less a margin for sending the answer, or hung up."""
        limit = self.project.settings.predict_timeout
        if time.monotonic() - started > limit - min(10.0, 0.1 * limit):
            return True
        try:
            return bool(client_gone and client_gone())
        except Exception:  # a socket we cannot ask: judge by the clock alone
            return False

    def _post_late(self, tasks: list[Task], answers: list, answered: list[int], late: Late | None) -> set[int]:
        """The indices of the answers `late` posted through the API (the others are handed on with the rest)."""
        posted: set[int] = set()
        if late is not None:
            try:
                posted = set(late({i: (tasks[i], answers[i]) for i in answered}))
            except BackendError as e:
                log.warning("could not post late answers through the API: %s", e.message)
        log.warning("batch of %d tasks finished past Label Studio's %.0f s limit (or it hung up): %d answers posted "
                    "through the API, %d handed on", len(tasks), self.project.settings.predict_timeout, len(posted),
                    len(answered) - len(posted))
        return posted
