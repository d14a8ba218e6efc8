"""Video tasks: every instance of every label tracked through each task's video, one VideoRectangle track
per instance, with frames numbered as Label Studio's player numbers them."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import numpy as np

from ..errors import BackendError, Skip
from ..labelstudio.video import VideoFile
from ..sam3.tracking import Cancelled, Timing
from . import ontology
from .project import Project
from .regions import to_video_regions
from .task import Outcome, Task

log = logging.getLogger(__name__)


class Videos:
    def __init__(self, project: Project):
        self.project = project

    def load(self, task: Task, name: str) -> VideoFile:
        """The task's video, fetched within SAM3_MAX_VIDEO_MB (by the same token and address rules as images)."""
        s = self.project.settings
        key = self.project.require_config().videos[name][0]
        url = task.data.get(key)
        if not isinstance(url, str):
            raise BackendError(f"task {task.id} data has no {key!r} video URL (the Video's value=\"${key}\")")
        body = self.project.loader.fetch_bytes(url, max_bytes=int(s.max_video_mb * (1 << 20)), what="video",
                                               timeout=10 * s.fetch_timeout)
        return self.open(task, name, body)

    def open(self, task: Task, name: str, body: bytes) -> VideoFile:
        """`body` as the task's Video `name` on disk, at the config's (or the task's) framerate, checked against
        the frame limit before any frame is decoded."""
        rate = self.project.require_config().videos[name][1]
        if rate.startswith("$"):  # framerate="$fps": the task's own
            rate = task.data.get(rate[1:], "")
        try:
            framerate = float(rate)
        except (TypeError, ValueError):
            raise BackendError(f"task {task.id}: the Video's framerate {str(rate)[:30]!r} is not a number") from None
        if 0 < framerate < 1:
            framerate = 1 / framerate  # Label Studio reads framerate="0.04" as seconds per frame
        video = VideoFile(body, framerate, name=f"task {task.id} video")
        limit = self.project.settings.max_video_frames
        if video.info.frames > limit:
            video.close()
            raise BackendError(f"task {task.id}: the video has {video.info.frames} frames at {framerate:g} fps; "
                               f"at most {limit} (SAM3_MAX_VIDEO_FRAMES)", 413)
        return video

    def label(self, engine, tasks: list[Task], load: Callable[[Task, str], VideoFile], deadline: float | None = None,
              on_frames: Callable[[int], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> Iterator[Outcome]:
        """An Outcome per task, in order. Reports `on_frames(n)` as it goes and stops between windows of frames
        when `cancelled()` (or the deadline) says so: the unfinished task is neither answered nor recorded."""
        for task in tasks:
            if deadline is not None and time.monotonic() > deadline:
                return
            try:
                prediction = self._label_one(engine, task, load, deadline, on_frames, cancelled)
            except Cancelled:
                return
            except Exception as e:  # recorded as this task's failure (or skip); the rest go on
                if not isinstance(e, (BackendError, Skip)):
                    log.exception("task %s: video failed", task.id)
                yield Outcome(task, error=e)
                continue
            yield Outcome(task, prediction=prediction)

    def _label_one(self, engine, task: Task, load, deadline, on_frames, cancelled) -> dict:
        p = self.project
        config, out = p.require_config(), p.outline
        reported = 0

        def window(done: int) -> None:
            nonlocal reported
            if on_frames is not None:
                on_frames(done - reported)
            reported = done
            if (cancelled is not None and cancelled()) or (deadline is not None and time.monotonic() > deadline):
                raise Cancelled()

        regions, scores = [], []
        for name in config.videos:
            entries = p.entries_on(name)
            if not entries:
                continue
            reported = 0
            with load(task, name) as video:
                timing = Timing()
                tracks = engine.video.track(
                    video.frames(), (video.info.width, video.info.height), ontology.concepts(entries, p.thresholds),
                    min_frames=out.video_min_track, window=p.settings.video_window,
                    max_objects=min(p.thresholds.max_detections, out.video_max_objects), on_window=window,
                    timing=timing)
                info = video.info
            log.info("task %s: %d tracks over %d frames; seconds per frame: %s", task.id, len(tracks), timing.frames,
                     timing.per_frame())
            for control in config.outputs_on(name):
                mine = [t for t in tracks if t.label in control.labels]
                regions += to_video_regions(mine, control, info.frames, info.duration, info.framerate)
                scores += [t.score for t in mine]
        return p.prediction(regions, float(np.mean(scores)) if scores else 0.0)
