"""What labels tasks without clicks, for every caller: Retrieve Predictions, jobs and `label-studio-sam3
predict`. Tasks in (`Task`), one `Outcome` per task out, in order."""
from __future__ import annotations

from typing import Callable, Iterator

from .autolabel import Stages
from .batches import ImageBatches
from .project import Project
from .task import Outcome, Task
from .videos import Videos


class Labeller:
    def __init__(self, project: Project, engine, encode_batch: int | None = None):
        self.project, self.engine = project, engine
        self.auto = project.auto_labeler(engine, encode_batch)
        self.images, self.videos = ImageBatches(project), Videos(project)

    @property
    def stages(self) -> Stages:
        """Seconds spent per stage so far (logs and benchmarks)."""
        return self.auto.stages

    def load(self, task: Task, name: str):
        """The task's Image `name` decoded, or its Video `name` on disk, fetched within the settings' bounds."""
        if name in self.project.require_config().videos:
            return self.videos.load(task, name)
        return self.project.loader.load(self.project.image_url(task, name))

    def label(self, tasks: list[Task], load: Callable[[Task, str], object] | None = None,
              deadline: float | None = None, on_frames: Callable[[int], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> Iterator[Outcome]:
        """Label `tasks` in order; `load(task, name)` (default `self.load`) gives an image or a video. With a
        `deadline` (time.monotonic()), only the tasks it reaches come out; videos report `on_frames` and stop
        between windows when `cancelled()`."""
        load = load or self.load
        if self.project.require_config().is_video:
            yield from self.videos.label(self.engine, tasks, load, deadline, on_frames, cancelled)
        else:
            yield from self.images.label(self.auto, tasks, load, deadline)
