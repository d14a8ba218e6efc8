"""One task at a time, what an evaluation needs of it: SAM 3's detections on each of its images (those the project's
thresholds keep, every candidate down to a floor for the curves, and each prompt's own when a label has several),
and the task's latest human annotation, all as masks. Matching and counting happen over all tasks, later
(`report`)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Callable, Iterator

from ..annotate.labeller import Labeller
from ..annotate.ontology import Entry
from ..annotate.project import Project
from ..annotate.regions import to_regions
from ..annotate.task import Task
from ..errors import BackendError, Skip
from . import shapes

log = logging.getLogger(__name__)

FLOOR = 0.05  # candidates down to this score draw the precision/recall curves and COCO's AP


def latest_annotation(task: Task) -> dict | None:
    """The task's latest annotation that was submitted (not skipped), or None."""
    kept = [a for a in task.annotations if not a.get("was_cancelled") and isinstance(a.get("result"), list)]
    return max(kept, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0),
               default=None)


class Evaluator:
    def __init__(self, project: Project, labeller: Labeller):
        config = project.require_config()
        if config.is_video:
            raise BackendError("evaluation compares image regions (polygons, brush masks, boxes); this project "
                               "labels videos")
        self.project, self.labeller = project, labeller
        th = project.thresholds
        self.floor = min([FLOOR, th.confidence, *th.per_label.values(),
                          *[e.threshold for e in project.ontology or [] if e.threshold is not None]])
        # candidates: every label's prompts at the floor, one selection (NMS across prompts, as labelling does)
        self.floor_thresholds = replace(th, confidence=self.floor, per_label={})

    def run(self, tasks: list[Task], read: Callable[[Task], Task],
            load: Callable[[Task, str], object]) -> Iterator[tuple[Task, dict | None, Exception | None]]:
        """(task, result, error) per task, in order. `read(task)` gives the task with its annotations (a
        `Skip` when it has none to compare with); `load(task, image name)` its decoded image."""
        config, auto = self.project.require_config(), self.labeller.auto
        entries = {name: self.project.entries_on(name) for name in config.images}
        names = [name for name in config.images if entries[name]]
        units = [(i, name) for i in range(len(tasks)) for name in names]
        measured, error = {}, None

        def load_unit(unit):
            full = read(tasks[unit[0]])
            if latest_annotation(full) is None:
                raise Skip("no submitted annotation to compare with")
            return load(full, unit[1])

        for (i, name), image, found, err in auto.run(units, load_unit, entries_for=lambda u: entries[u[1]],
                                                       measure=self.measure):
            error = error or err
            if found is not None:
                measured[name] = found
            if name != names[-1]:
                continue
            result = None
            if error is None:
                try:
                    result = self.assemble(read(tasks[i]), measured)
                except Exception as e:  # this task's failure, listed; the others go on
                    log.exception("task %s: could not compare it with its annotation", tasks[i].id)
                    error = e
            yield tasks[i], result, error
            measured, error = {}, None

    def measure(self, enc, entries: list[Entry], image=None) -> dict:
        """An image's detections as the regions Label Studio would store, rasterised back to masks (RLE): those the
        project keeps, the candidates, and per prompt. Tiled as the project tiles (given the decoded `image`)."""
        auto, th, (h, w) = self.labeller.auto, self.project.thresholds, (enc.height, enc.width)
        found = auto.detect(enc, entries, self.floor, image=image)
        name = self._image_of(entries)
        current = auto.select(found, entries, th, h, w)
        candidates = auto.select(found, [Entry(e.prompt, e.label) for e in entries], self.floor_thresholds, h, w)
        several = {label for label, n in Counter(e.label for e in entries).items() if n > 1}
        prompts = [{"prompt": e.prompt, **d} for e in entries if e.label in several
                   for d in self._rendered(auto.select(found, [e], replace(th, nms=False), h, w), name)]
        return {"width": w, "height": h, "current": self._rendered(current, name),
                "dt": self._rendered(candidates, name), "prompts": prompts}

    def _image_of(self, entries: list[Entry]) -> str:
        config = self.project.require_config()
        labels = {e.label for e in entries}
        return next(name for name in config.images if labels <= set(config.labels_on(name)))

    def _rendered(self, dets, image: str) -> list[dict]:
        """Each detection as the regions the project's output control for its label makes of it (polygon pieces,
        brush, box: simplification, caps and specks included), rasterised back and joined into one mask: an
        instance is what the model found, however many regions Label Studio stores for it."""
        config, shape = self.project.require_config(), self.project.outline.polygon_settings()
        h, w = dets.height, dets.width
        out = []
        for i in range(len(dets)):
            one = dets[[i]]
            regions = to_regions(one, config.output_for(one.labels[0], image), **shape)
            masks = [shapes.region_rle(r, w, h) for r in regions]
            masks = [m for m in masks if m is not None]
            if masks:
                rle = masks[0] if len(masks) == 1 else shapes.union(masks)
                out.append({"label": one.labels[0], "score": round(float(one.scores[0]), 5), "rle": rle})
        return out

    def assemble(self, task: Task, measured: dict[str, dict]) -> dict:
        """The task's result: per image, its annotations beside its detections; and what was not compared."""
        annotation = latest_annotation(task)
        by_image: dict[str, list[dict]] = {}
        for region in annotation["result"]:
            by_image.setdefault(region.get("to_name"), []).append(region)
        not_evaluated, skipped = Counter(), Counter()
        images = []
        for name, m in measured.items():
            labels = {e.label for e in self.project.entries_on(name)}
            gt = []
            for region in by_image.get(name, []):
                kind, label = region.get("type"), shapes.label_of(region)
                if kind not in shapes.COMPARED:
                    skipped[str(kind)] += 1
                elif label not in labels:
                    not_evaluated[str(label)] += 1
                else:
                    rle = _region(region, m["width"], m["height"], task.id)
                    if rle is not None:
                        gt.append({"label": label, "rle": rle})
            images.append({"name": name, **m, "gt": gt})
        return {"task": task.id, "annotation": annotation.get("id"), "images": images,
                "not_evaluated": dict(not_evaluated), "skipped_kinds": dict(skipped)}


def _region(region: dict, width: int, height: int, task_id) -> dict | None:
    try:
        return shapes.region_rle(region, width, height)
    except (KeyError, TypeError, ValueError) as e:  # a malformed region is reported, not a crash
        log.warning("task %s: annotation region %s could not be read: %s", task_id, region.get("id"), e)
        return None
