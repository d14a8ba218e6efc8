"""Image tasks labelled without clicks: every instance of every label in each task's images, found with the
ontology's text prompts, one prediction per task."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import numpy as np

from ..sam3.detections import Detections
from .autolabel import AutoLabeler
from .project import Project
from .regions import to_regions
from .task import Outcome, Task

log = logging.getLogger(__name__)


class ImageBatches:
    def __init__(self, project: Project):
        self.project = project

    def label(self, labeler: AutoLabeler, tasks: list[Task], load: Callable[[Task, str], object],
              deadline: float | None = None) -> Iterator[Outcome]:
        """Label each task's images (one per Image object that an output control labels) and assemble one
        prediction per task; `load(task, image name)` gives a decoded image, on the labeller's fetch threads.

        Yields an Outcome per task, in order (with a `deadline`, possibly only the first tasks): its prediction,
        or the error of any of its images (a failure is never turned into an empty result).
        """
        config = self.project.require_config()
        entries = {name: self.project.entries_on(name) for name in config.images}
        names = [name for name in config.images if entries[name]]  # images no prompt labels: not fetched
        if not names:
            for task in tasks:
                yield Outcome(task, prediction=self.project.prediction([], 0.0))
            return
        units = [(i, name) for i in range(len(tasks)) for name in names]
        dets, images, error = {}, {}, None
        for (i, name), image, found, err in labeler.run(units, lambda u: load(tasks[u[0]], u[1]),
                                                          entries_for=lambda u: entries[u[1]], deadline=deadline):
            images[name], dets[name] = image, found
            error = error or err
            if name != names[-1]:
                continue
            task = tasks[i]
            if error is not None:
                log.warning("task %s: no prediction: %s", task.id, getattr(error, "message", error))
                yield Outcome(task, images, error=error)
            else:
                t0 = time.perf_counter()
                prediction = self.prediction_for(dets)
                labeler.stages.add("regions", time.perf_counter() - t0)
                yield Outcome(task, images, prediction)
            dets, images, error = {}, {}, None

    def prediction_for(self, dets: dict[str, Detections]) -> dict:
        """Regions in every output control that labels each image and carries each label; overall score =
        mean instance score."""
        config, shape = self.project.require_config(), self.project.outline.polygon_settings()
        regions, scores = [], []
        for image, found in dets.items():
            scores += list(found.scores)
            for label, group in found.by_label().items():
                for control in config.outputs_on(image):
                    if label in control.labels:
                        regions += to_regions(group, control, **shape)
        return self.project.prediction(regions, float(np.mean(scores)) if scores else 0.0)
