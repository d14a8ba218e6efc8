"""Interactive prompts from the labelling view (keypoint clicks, positive and negative; rectangles; a typed
phrase; exemplar boxes) answered on one image: one object as a region of the output control that carries the
label, or, for a phrase or an exemplar, every instance under the project's thresholds."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid

import numpy as np
from cachetools import LRUCache

from .. import metrics
from ..errors import BackendError
from ..sam3.detections import Detections
from ..sam3.model import CLICK_WAIT
from . import crops
from .crops import Picture
from .ontology import Entry
from .project import Project
from .prompts import Prompt, parse_context
from .regions import to_regions
from .task import Task

log = logging.getLogger(__name__)


class Clicks:
    URLS = 10000  # image URLs whose encoding key is remembered

    def __init__(self, project: Project):
        self.project = project
        self._url_keys: LRUCache = LRUCache(maxsize=self.URLS)  # image URL digest -> encoding key
        self._sizes: LRUCache = LRUCache(maxsize=self.URLS)  # image URL digest -> (width, height)
        self._crops = crops.Crops(self.URLS)
        self._lock = threading.Lock()

    def answer(self, task: Task, context: dict) -> dict:
        """The prediction for one interactive request; BackendError (4xx) for a prompt that cannot be answered."""
        p, s = self.project, self.project.settings
        config = p.require_config()
        # Checked before the image is fetched or encoded: a bad prompt costs milliseconds.
        prompt = parse_context(context, config, s.max_prompts, s.max_prompt_chars)
        if prompt.empty:
            return p.prediction([], 0.0)  # every prompt was removed: nothing to fetch or encode
        image = prompt.image or config.image  # the Image the annotator clicked on
        label = self._label(prompt, image)
        control = config.output_for(label, image)
        picture = self._picture(p.image_url(task, image))
        engine = p.sam3.wait(timeout=CLICK_WAIT)
        with engine.urgent():  # an annotator waits: this goes before any bulk work queued for the model
            t0 = time.perf_counter()
            dets = self._segment(engine, picture, prompt, label)
        regions = to_regions(dets, control, **p.outline.polygon_settings())
        log.debug("task %s: %d regions in %.3fs", task.id, len(regions), time.perf_counter() - t0)
        return p.prediction(regions, float(dets.scores.max()) if len(dets) else 0.0)

    def _segment(self, engine, picture: Picture, prompt: Prompt, label: str) -> Detections:
        mask_threshold = self.project.outline.mask_threshold
        if prompt.text or prompt.exemplars:
            # every instance (of the phrase, or like the exemplar boxes, named by their label), under the
            # project's thresholds and tiling: the same rules as batch and jobs
            enc = self._encoding(engine, picture)
            tiled = not prompt.exemplars and self.project.tiling.grid(enc.width, enc.height, engine.image_size)
            return self.project.auto_labeler(engine).label(enc, [Entry(prompt.text or label, label)],
                                                           prompt.exemplars_px(enc.width, enc.height),
                                                           image=picture.image if tiled else None)
        width, height = picture.size
        boxes = prompt.boxes_px(width, height) or [None]
        points = prompt.points_px(width, height)
        if self.project.settings.click_crop == "auto" and crops.applies(width, height, engine.image_size):
            # at native resolution, on a crop around the prompt; several boxes: one object each
            parts = [self._crops.segment(engine, picture, points if len(boxes) == 1 else [],
                                         prompt.point_labels if len(boxes) == 1 else [], box, mask_threshold)
                     for box in boxes]
            return Detections([m for m, _, _ in parts], np.array([sc for _, _, sc in parts]), [label] * len(parts),
                              np.array([o for _, o, _ in parts]), (height, width))
        enc = self._encoding(engine, picture)
        if len(boxes) > 1:
            parts = [engine.segment(enc, box=b, mask_threshold=mask_threshold) for b in boxes]
            return Detections(np.stack([m for m, _ in parts]), np.array([sc for _, sc in parts]), [label] * len(parts))
        mask, score = engine.segment(enc, points, prompt.point_labels, boxes[0], mask_threshold)
        return Detections(mask[None], np.array([score]), [label])

    def notice(self, message: str, context: dict) -> dict | None:
        """An error the annotator can read: a line in the config's TextArea, sent as a suggestion.

        Label Studio's editor drops every error a backend sends for a click (its API answers 200 with the
        error in a field the editor never reads) but shows a TextArea suggestion at once, under the prompt box.
        The TextArea holds one value, so the prompt typed there is kept beside the message. None when the
        config has no TextArea: then the error only reaches Label Studio's log.
        """
        config = self.project.require_config()
        area = next((c for c in config.prompts.values() if c.tag == "TextArea"), None)
        if area is None:
            return None
        typed = [t for r in context.get("result") or [] if isinstance(r, dict) and r.get("from_name") == area.name
                 for t in ((r.get("value") or {}).get("text") or []) if isinstance(t, str)]
        region = {"id": uuid.uuid4().hex[:10], "from_name": area.name, "to_name": area.to_name, "type": "textarea",
                  "origin": "prediction", "value": {"text": typed + [f"SAM 3 could not answer: {message}"]}}
        version = self.project.sam3.model_version or "sam3"
        return {"result": [region], "score": 0.0, "model_version": version, "error": message}

    def _label(self, prompt: Prompt, image: str) -> str:
        config = self.project.require_config()
        if prompt.label:
            return prompt.label
        if prompt.text:
            label = config.label_for_text(prompt.text)
            if label:
                return label
        labels = config.labels_on(image)
        if len(labels) == 1:
            return labels[0]
        raise BackendError("no label for this prompt: select a label before clicking, or type a label name "
                           f"(one of: {', '.join(labels)})")

    def _picture(self, url: str) -> Picture:
        ref = hashlib.sha1(url.encode(errors="replace")).hexdigest()  # a data: URI can be megabytes
        with self._lock:
            size = self._sizes.get(ref)
        return Picture(url, ref, lambda u: self._load(u, ref), size)

    def _load(self, url: str, ref: str):
        image = self.project.loader.load(url)
        with self._lock:
            self._sizes[ref] = image.size  # later clicks choose crop or whole image without a download
        return image

    def _encoding(self, engine, picture: Picture):
        """The whole image's cached encoding; a warm click skips the download and the ViT."""
        with self._lock:
            key = self._url_keys.get(picture.ref)
        enc = engine.cache.get(key) if key else None
        if enc is None:
            enc = engine.encode(picture.image)
            with self._lock:
                self._url_keys[picture.ref] = enc.key
        else:
            metrics.CACHE_EVENTS.labels("hit").inc()
        return enc
