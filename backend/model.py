"""SAM 3 as a Label Studio ML backend: prompts -> engine -> masks -> regions."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict

import numpy as np

from . import autolabel, labelstudio, metrics, outbound
from .autolabel import AutoLabeler, Thresholds
from .base import LabelStudioMLBase
from .detections import Detections
from .engine import Sam3Engine
from .errors import BackendError
from .images import ImageLoader
from .labelconfig import LabelConfig
from .prompts import Prompt, parse_context
from .retry import Backoff
from .regions import to_regions
from .runtime import Runtime, model_version

log = logging.getLogger(__name__)


class SAM3Backend(LabelStudioMLBase):
    def __init__(self, *args, runtime: Runtime, **kwargs):
        self.runtime = runtime  # one engine, shared by every project
        super().__init__(*args, **kwargs)

    def setup(self) -> None:
        s = self.settings
        self.config = LabelConfig.parse(self.label_config) if self.label_config else None
        self.connection = labelstudio.connect(s, self.hostname, self.access_token)  # the one rule
        self.loader = ImageLoader(
            self.connection,
            outbound.Policy.parse(s.allow_private_urls, s.allowed_hosts),
            max_bytes=int(s.max_image_mb * (1 << 20)),
            max_pixels=s.max_image_pixels,
            timeout=s.fetch_timeout,
            backoff=Backoff(attempts=max(1, s.fetch_retries)),
        )
        self._url_keys: OrderedDict[str, str] = OrderedDict()  # image URL -> encoding key
        self._lock = threading.Lock()
        # Validated here so that a bad ontology or threshold is reported by /setup.
        extra = self.extra_params
        if not isinstance(extra, dict):
            raise BackendError("extra_params must be a JSON object, e.g. {\"ontology\": {...}, \"thresholds\": {...}}")
        base = Thresholds(confidence=s.text_threshold, max_detections=s.max_detections, min_area=s.min_area,
                          nms=s.nms, nms_iou=s.nms_iou)
        self.thresholds = Thresholds.from_dict(extra.get("thresholds"), base)
        spec = extra.get("ontology") or s.ontology or None
        self.ontology = (autolabel.parse_ontology(spec, self.config, s.max_ontology, s.max_prompt_chars)
                         if self.config is not None else None)

    @property
    def model_version(self) -> str:
        """Changes with the checkpoint, the ontology or the thresholds, and only with them."""
        base = model_version(self.settings, self.runtime.fingerprint)
        if self.ontology is None:
            return base
        return f"{base}-{autolabel.fingerprint(self.ontology, self.thresholds)}"

    # ---- predict ---------------------------------------------------------------------------
    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        if self.config is None:
            raise BackendError("no label config: call /setup first or send label_config with the request")
        if isinstance(context, dict) and context.get("result") is not None:
            # An interactive request, even with no prompt left: answer it, never auto-label instead.
            if len(tasks) != 1:
                raise BackendError(f"an interactive request carries exactly one task, got {len(tasks)}")
            return [self.predict_interactive(tasks[0], context)]
        return self.predict_batch(tasks)

    def predict_batch(self, tasks: list[dict]) -> list[dict]:
        """Every instance of every label in each task's image; one prediction per task, in order.

        A task whose image cannot be read gets an empty prediction (logged with its id); the rest go on.
        """
        return [prediction for _, _, prediction in self.iter_predictions(tasks)]

    def iter_predictions(self, tasks: list[dict], load=None):
        """(task, image or None, prediction) in task order; `load(task)` defaults to fetching its image URL."""
        labeler = self.auto_labeler(self.runtime.wait(timeout=300))
        for task, image, dets, error in labeler.run(tasks, load or self.load_task_image):
            if error is not None:
                log.warning("task %s: no prediction: %s", task.get("id"), getattr(error, "message", error))
                yield task, image, self._prediction([], 0.0)
            else:
                yield task, image, self.prediction_for(dets)
        log.info("predicted %d tasks: %s", len(tasks), labeler.stages)

    def auto_labeler(self, engine) -> AutoLabeler:
        return AutoLabeler(engine, self.ontology, self.thresholds, self.settings.mask_threshold)

    def prediction_for(self, dets: Detections) -> dict:
        """Regions for every output control that carries each label; overall score = mean instance score."""
        s = self.settings
        regions = []
        for label, group in autolabel.group_by_label(dets).items():
            for control in self.config.outputs:
                if label in control.labels:
                    regions += to_regions(group, control, tolerance=s.polygon_tolerance, min_area=s.min_piece_area)
        score = float(np.mean(dets.scores)) if len(dets) else 0.0
        return self._prediction(regions, score)

    def load_task_image(self, task: dict):
        return self.loader.load(self._image_url(task))

    def predict_interactive(self, task: dict, context: dict) -> dict:
        s = self.settings
        # Checked before the image is fetched or encoded: a bad prompt costs milliseconds.
        prompt = parse_context(context, self.config, s.max_prompts, s.max_prompt_chars)
        if prompt.empty:
            return self._prediction([], 0.0)  # every prompt was removed: nothing to fetch or encode
        label = self._label(prompt)
        control = self.config.output_for(label)
        url = self._image_url(task)
        engine = self.runtime.wait(timeout=120)
        enc = self._encoding(engine, url)
        t0 = time.perf_counter()
        if prompt.text:
            dets = engine.detect(enc, [prompt.text], s.text_threshold, s.mask_threshold,
                                 self.thresholds.max_detections)[0].with_label(label)
        elif len(prompt.boxes) > 1:  # several boxes: one object each
            parts = [engine.segment(enc, box=b, mask_threshold=s.mask_threshold)
                     for b in prompt.boxes_px(enc.width, enc.height)]
            dets = Detections(np.stack([m for m, _ in parts]), np.array([sc for _, sc in parts]), [label] * len(parts))
        else:
            box = prompt.boxes_px(enc.width, enc.height)[0] if prompt.boxes else None
            mask, score = engine.segment(enc, prompt.points_px(enc.width, enc.height), prompt.point_labels, box,
                                         s.mask_threshold)
            dets = Detections(mask[None], np.array([score]), [label])
        regions = to_regions(dets, control, tolerance=s.polygon_tolerance, min_area=s.min_piece_area)
        log.debug("task %s: %d regions in %.3fs", task.get("id"), len(regions), time.perf_counter() - t0)
        score = float(dets.scores.max()) if len(dets) else 0.0
        return self._prediction(regions, score)

    def _prediction(self, regions: list[dict], score: float) -> dict:
        return {"result": regions, "score": round(score, 4), "model_version": self.model_version}

    def _label(self, prompt: Prompt) -> str:
        if prompt.label:
            return prompt.label
        if prompt.text:
            label = self.config.label_for_text(prompt.text)
            if label:
                return label
        labels = self.config.labels
        if len(labels) == 1:
            return labels[0]
        raise BackendError(
            "no label for this prompt: select a label before clicking, or type a label name "
            f"(one of: {', '.join(labels)})"
        )

    def _image_url(self, task: dict) -> str:
        data = task.get("data")
        if not isinstance(data, dict):
            raise BackendError(f"task {task.get('id')} has no data object")
        key = self.config.value_key
        if key not in data:
            raise BackendError(f"task {task.get('id')} data has no {key!r} field (the Image's value=\"${key}\")")
        if not isinstance(data[key], str):
            raise BackendError(f"task {task.get('id')} data.{key} must be an image URL (a string)")
        return data[key]

    def _encoding(self, engine: Sam3Engine, url: str):
        """The image's cached encoding; a warm click skips the download and the ViT."""
        ref = hashlib.sha1(url.encode(errors="replace")).hexdigest()  # a data: URI can be megabytes
        with self._lock:
            key = self._url_keys.get(ref)
        enc = engine.cache.get(key) if key else None
        if enc is None:
            enc = engine.encode(self.loader.load(url))
            with self._lock:
                self._url_keys[ref] = enc.key
                while len(self._url_keys) > 10000:
                    self._url_keys.popitem(last=False)
        else:
            metrics.CACHE_EVENTS.labels("hit").inc()
        return enc
