"""SAM 3 as a Label Studio ML backend, one instance per project: prompts -> engine -> masks -> regions.

Thin on purpose: the project (`Project`) holds what was set up; clicks (`Clicks`) and batches (`Retrieve`,
through the `Labeller` that jobs use too) do the work.
"""
from __future__ import annotations

import logging

from ..errors import BackendError
from ..sam3.model import Sam3Model
from .base import LabelStudioMLBase
from .clicks import Clicks
from .project import Project
from .regions import Outline
from .retrieve import Handoff, Late, Retrieve
from .task import Task

log = logging.getLogger(__name__)


class SAM3Backend(LabelStudioMLBase):
    def __init__(self, *args, sam3: Sam3Model, outline: Outline | None = None, **kwargs):
        self.sam3 = sam3  # one engine, shared by every project
        self._outline = outline
        super().__init__(*args, **kwargs)

    def setup(self) -> None:
        self.project = Project(self.settings, self.sam3, self.label_config, self.extra_params, self.hostname,
                               self.access_token, self._outline)
        self.clicks = Clicks(self.project)

    @property
    def model_version(self) -> str:
        return self.project.model_version

    def predict(self, tasks: list[Task], context: dict | None = None, notices: bool = False,
                handoff: Handoff | None = None, late: Late | None = None, started: float | None = None,
                client_gone=None, **kwargs) -> list[dict]:
        """One answer per task, in order. An interactive request (a context with a "result", even an empty one)
        is answered on its one task, never auto-labelled; anything else is a batch (`Retrieve`).

        `notices`: the caller is Label Studio's editor, which shows a refused click only as a suggestion (see
        `Clicks.notice`). `handoff`, `late`, `started`, `client_gone`: see `Retrieve.answer`."""
        config = self.project.require_config()
        if isinstance(context, dict) and context.get("result") is not None:
            if config.is_video:
                raise BackendError("video tasks are labelled by Retrieve Predictions or a job; Label Studio's editor "
                                   "sends no drawn video region to a backend to track from")
            if len(tasks) != 1:
                raise BackendError(f"an interactive request carries exactly one task, got {len(tasks)}")
            try:
                return [self.clicks.answer(tasks[0], context)]
            except BackendError as e:
                notice = self.clicks.notice(e.message, context) if notices else None
                if notice is None:
                    raise
                log.info("task %s: interactive request refused: %s", tasks[0].id, e.message)
                return [notice]
        return Retrieve(self.project).answer(tasks, handoff, late, started, client_gone)
