"""SAM 3 as a Label Studio ML backend: prompts -> engine -> masks -> regions."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
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
from .poster import Skip
from .prompts import Prompt, parse_context
from .retry import Backoff
from .regions import to_regions, to_video_regions
from .runtime import Runtime
from .tracking import Cancelled, Timing
from .video import VideoFile

log = logging.getLogger(__name__)


OUTLINE_KEYS = ("tolerance", "min_area", "holes", "max_pieces", "max_points", "mask_threshold", "video_min_track",
                "video_max_objects")


class SAM3Backend(LabelStudioMLBase):
    def __init__(self, *args, runtime: Runtime, outline: dict | None = None, **kwargs):
        self.runtime = runtime  # one engine, shared by every project
        self._outline = outline  # a job's own (resolved when it was created), else this process's settings
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
        unknown = sorted(str(k)[:50] for k in extra if k not in autolabel.EXTRA_KEYS)
        if unknown:
            raise BackendError(f"unknown extra param(s) {unknown}; known: {', '.join(autolabel.EXTRA_KEYS)}")
        env_ontology, env_thresholds = autolabel.split_extra(s.ontology)  # SAM3_ONTOLOGY, bare or wrapped
        base = Thresholds(confidence=s.text_threshold, max_detections=s.max_detections, min_area=s.min_area,
                          nms=s.nms, nms_iou=s.nms_iou)
        self.thresholds = Thresholds.from_dict(extra.get("thresholds"), Thresholds.from_dict(env_thresholds, base))
        spec = extra.get("ontology") or env_ontology or None
        self.ontology = (autolabel.parse_ontology(spec, self.config, s.max_ontology, s.max_prompt_chars)
                         if self.config is not None else None)

    @property
    def outline(self) -> dict:
        """How masks become regions: the mask threshold and `regions.to_regions`' settings."""
        if self._outline is not None:
            return {k: self._outline[k] for k in OUTLINE_KEYS}
        s = self.settings
        return {"tolerance": s.polygon_tolerance, "min_area": s.min_piece_area, "holes": s.polygon_holes,
                "max_pieces": s.max_pieces, "max_points": s.max_polygon_points, "mask_threshold": s.mask_threshold,
                "video_min_track": s.video_min_track, "video_max_objects": s.video_max_objects}

    @property
    def shape(self) -> dict:
        """What `regions.to_regions` takes from `outline`."""
        return {k: self.outline[k] for k in ("tolerance", "min_area", "holes", "max_pieces", "max_points")}

    def output_spec(self) -> dict:
        """Everything besides the weights, the ontology and the thresholds that changes what is predicted: the
        output controls (a brush added to a polygon config is a new prediction) and the settings that shape
        their regions, only those that apply to the kinds present. Not the device, dtype, batch sizes, caches
        or limits: a job spread over CPU and GPU workers is one model_version."""
        controls = sorted([c.tag, c.name, c.to_name] for c in self.config.outputs)
        kinds = {c.type for c in self.config.outputs}
        out = self.outline
        spec: dict = {"controls": controls}
        if kinds & {"polygonlabels", "brushlabels", "rectanglelabels"}:
            spec["mask_threshold"] = out["mask_threshold"]
            spec["min_area"] = out["min_area"]
        if "polygonlabels" in kinds:
            spec["polygon"] = [out["tolerance"], out["holes"], out["max_pieces"], out["max_points"]]
        if "videorectangle" in kinds:
            spec["video"] = [out["video_min_track"], out["video_max_objects"]]
        return spec

    @property
    def model_version(self) -> str:
        """Changes with the checkpoint, the ontology, the thresholds and the outputs (`output_spec`), and only
        with them."""
        base = self.runtime.model_version
        if base is None:
            self.runtime.wait(0)  # raises: loading or failed, with the reason
        if self.ontology is None:
            return base
        return f"{base}-{autolabel.fingerprint(self.ontology, self.thresholds, self.output_spec())}"

    # ---- predict ---------------------------------------------------------------------------
    def predict(self, tasks: list[dict], context: dict | None = None, notices: bool = False, handoff=None,
                late=None, started: float | None = None, client_gone=None, **kwargs) -> list[dict]:
        """`notices`: the caller is Label Studio's editor, which shows a refused click only as a suggestion.
        `handoff(tasks)`: starts a background job for the tasks a batch could not reach in time (its id).
        `late(predictions)`: posts answers through the API when Label Studio may no longer be waiting for them
        (see `predict_batch`); `started` (time.monotonic()) is when the request came in; `client_gone()` says
        whether the caller hung up."""
        if self.config is None:
            raise BackendError("no label config: call /setup first or send label_config with the request")
        if isinstance(context, dict) and context.get("result") is not None:
            # An interactive request, even with no prompt left: answer it, never auto-label instead.
            if self.config.is_video:
                raise BackendError("video tasks are labelled by Retrieve Predictions or a job; Label Studio's editor "
                                   "sends no drawn video region to a backend to track from")
            if len(tasks) != 1:
                raise BackendError(f"an interactive request carries exactly one task, got {len(tasks)}")
            try:
                return [self.predict_interactive(tasks[0], context)]
            except BackendError as e:
                notice = self.notice(e.message, context) if notices else None
                if notice is None:
                    raise
                log.info("task %s: interactive request refused: %s", tasks[0].get("id"), e.message)
                return [notice]
        return self.predict_batch(tasks, handoff, late, started, client_gone)

    def notice(self, message: str, context: dict) -> dict | None:
        """An error the annotator can read: a line in the config's TextArea, sent as a suggestion.

        Label Studio's editor drops every error a backend sends for a click (its API answers 200 with the
        error in a field the editor never reads) but shows a TextArea suggestion at once, under the prompt box.
        The TextArea holds one value, so the prompt typed there is kept beside the message. None when the
        config has no TextArea: then the error only reaches Label Studio's log.
        """
        area = next((c for c in self.config.prompts.values() if c.tag == "TextArea"), None)
        if area is None:
            return None
        typed = [t for r in context.get("result") or [] if isinstance(r, dict) and r.get("from_name") == area.name
                 for t in ((r.get("value") or {}).get("text") or []) if isinstance(t, str)]
        region = {"id": uuid.uuid4().hex[:10], "from_name": area.name, "to_name": area.to_name, "type": "textarea",
                  "origin": "prediction", "value": {"text": typed + [f"SAM 3 could not answer: {message}"]}}
        version = self.runtime.model_version or "sam3"
        return {"result": [region], "score": 0.0, "model_version": version, "error": message}

    def predict_batch(self, tasks: list[dict], handoff=None, late=None, started: float | None = None,
                      client_gone=None) -> list[dict]:
        """Every instance of every label in each task's images; one answer per task, in order.

        A task that could not be labelled gets an answer without "result" (its "error" says why), which
        Label Studio does not store: the task stays unlabelled and a later Retrieve Predictions tries it
        again, instead of skipping it forever as predicted by this model_version.

        Label Studio waits SAM3_PREDICT_TIMEOUT seconds (its ML_TIMEOUT_PREDICT, 100 s) for the whole batch and
        stores nothing from a later answer. So the batch works to SAM3_PREDICT_BUDGET: a task that would not
        finish inside what is left of it (at the pace so far) is not started, and it and the rest go to
        `handoff` (a background job that posts their predictions through the API). And when the answers are
        ready too late for Label Studio (one task ran long past the budget, or Label Studio hung up), they are
        posted through the API by `late` instead (or handed on): every task ends with one prediction.
        """
        started = time.monotonic() if started is None else started
        deadline = started + self.settings.predict_budget
        answers: list[dict | None] = [prediction if error is None else self.failure(error)
                                      for _, _, prediction, error in self.iter_predictions(tasks, deadline=deadline)]
        why = {i: f"not reached within the {self.settings.predict_budget:.0f} s budget of one request"
               for i in range(len(answers), len(tasks))}
        answers += [None] * (len(tasks) - len(answers))
        answered = [i for i, a in enumerate(answers) if a is not None and "result" in a]
        if answered and self._too_late(started, client_gone):
            took = time.monotonic() - started
            posted = self._post_late(tasks, answers, answered, late)
            for i in answered:
                if i in posted:
                    answers[i] = {"model_version": self.model_version,
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
                answers[i] = self.failure(BackendError(why[i] + then))
        return answers

    def _too_late(self, started: float, client_gone=None) -> bool:
        """May Label Studio have stopped waiting? Past its limit less a margin for sending the answer, or hung up."""
        limit = self.settings.predict_timeout
        if time.monotonic() - started > limit - min(10.0, 0.1 * limit):
            return True
        try:
            return bool(client_gone and client_gone())
        except Exception:  # a socket we cannot ask: judge by the clock alone
            return False

    def _post_late(self, tasks: list[dict], answers: list, answered: list[int], late) -> set[int]:
        """The indices of the answers `late` posted through the API (the others are handed on with the rest)."""
        posted: set[int] = set()
        if late is not None:
            try:
                posted = set(late({i: (tasks[i], answers[i]) for i in answered}))
            except BackendError as e:
                log.warning("could not post late answers through the API: %s", e.message)
        log.warning("batch of %d tasks finished past Label Studio's %.0f s limit (or it hung up): %d answers posted "
                    "through the API, %d handed on", len(tasks), self.settings.predict_timeout, len(posted),
                    len(answered) - len(posted))
        return posted

    def failure(self, error: Exception) -> dict:
        return {"model_version": self.model_version, "error": getattr(error, "message", None) or str(error)}

    def iter_predictions(self, tasks: list, load=None, deadline: float | None = None):
        """(task, {image name: image}, prediction or None, error or None) in task order (with a `deadline`,
        possibly only the first tasks)."""
        labeler = self.auto_labeler(self.runtime.wait(timeout=300))
        yield from self.label_tasks(labeler, tasks, load or self.load_task_image, deadline)
        log.info("predicted %d tasks: %s", len(tasks), labeler.stages)

    def label_tasks(self, labeler: AutoLabeler, tasks: list, load, deadline: float | None = None,
                    on_frames=None, cancelled=None):
        """Label each task's images (one per Image object that an output control labels) and assemble
        one prediction per task; `load(task, image name)` gives a decoded image (a `VideoFile` for a Video).

        Yields (task, images, prediction, None), or (task, images, None, error) when any of its images
        failed: a failure is never turned into an empty result. Video tasks report `on_frames(n)` as they
        go and stop between windows of frames when `cancelled()` (or the deadline) says so.
        """
        if self.config.is_video:
            yield from self.label_videos(labeler, tasks, load, deadline, on_frames, cancelled)
            return
        entries = {name: [e for e in self.ontology if e.label in self.config.labels_on(name)]
                   for name in self.config.images}
        names = [name for name in self.config.images if entries[name]]  # images no prompt labels: not fetched
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
                tid = task.get("id") if isinstance(task, dict) else task
                log.warning("task %s: no prediction: %s", tid, getattr(error, "message", error))
                yield task, images, None, error
            else:
                t0 = time.perf_counter()
                prediction = self.prediction_for(dets)
                labeler.stages.add("regions", time.perf_counter() - t0)
                yield task, images, prediction, None
            dets, images, error = {}, {}, None
        if not names:
            for task in tasks:
                yield task, {}, self._prediction([], 0.0), None

    def auto_labeler(self, engine) -> AutoLabeler:
        return AutoLabeler(engine, self.ontology, self.thresholds, self.outline["mask_threshold"],
                           self.settings.encode_batch)

    def prediction_for(self, dets: dict[str, Detections]) -> dict:
        """Regions in every output control that labels each image and carries each label; overall score =
        mean instance score."""
        regions, scores = [], []
        for image, found in dets.items():
            scores += list(found.scores)
            for label, group in autolabel.group_by_label(found).items():
                for control in self.config.outputs_on(image):
                    if label in control.labels:
                        regions += to_regions(group, control, **self.shape)
        return self._prediction(regions, float(np.mean(scores)) if scores else 0.0)

    def load_task_image(self, task: dict, image: str | None = None):
        if image in self.config.videos:
            return self.load_task_video(task, image)
        return self.loader.load(self._image_url(task, image))

    def load_task_video(self, task: dict, name: str) -> VideoFile:
        """The task's video, fetched within SAM3_MAX_VIDEO_MB (by the same token and address rules as images)."""
        s = self.settings
        key = self.config.videos[name][0]
        url = (task.get("data") if isinstance(task.get("data"), dict) else {}).get(key)
        if not isinstance(url, str):
            raise BackendError(f"task {task.get('id')} data has no {key!r} video URL (the Video's value=\"${key}\")")
        body = self.loader.fetch_bytes(url, max_bytes=int(s.max_video_mb * (1 << 20)), what="video",
                                       timeout=10 * s.fetch_timeout)
        return self.open_video(task, name, body)

    def open_video(self, task: dict, name: str, body: bytes) -> VideoFile:
        """`body` as the task's Video `name` on disk, at the config's (or the task's) framerate, checked against
        the frame limit before any frame is decoded."""
        rate = self.config.videos[name][1]
        if rate.startswith("$"):  # framerate="$fps": the task's own
            rate = (task.get("data") or {}).get(rate[1:], "")
        try:
            framerate = float(rate)
        except (TypeError, ValueError):
            raise BackendError(f"task {task.get('id')}: the Video's framerate {str(rate)[:30]!r} "
                               "is not a number") from None
        if 0 < framerate < 1:
            framerate = 1 / framerate  # Label Studio reads framerate="0.04" as seconds per frame
        video = VideoFile(body, framerate, name=f"task {task.get('id')} video")
        limit = self.settings.max_video_frames
        if video.info.frames > limit:
            video.close()
            raise BackendError(f"task {task.get('id')}: the video has {video.info.frames} frames at {framerate:g} fps; "
                               f"at most {limit} (SAM3_MAX_VIDEO_FRAMES)", 413)
        return video

    def label_videos(self, labeler: AutoLabeler, tasks: list, load, deadline=None, on_frames=None, cancelled=None):
        """Every instance of every label tracked through each task's video: one VideoRectangle track each."""
        for task in tasks:
            if deadline is not None and time.monotonic() > deadline:
                return
            try:
                prediction = self._label_video_task(labeler.engine, task, load, deadline, on_frames, cancelled)
            except Cancelled:
                return  # this task is not finished: it is neither answered nor recorded
            except Exception as e:  # recorded as this task's failure (or skip); the rest go on
                if not isinstance(e, (BackendError, Skip)):
                    log.exception("task %s: video failed", task.get("id") if isinstance(task, dict) else task)
                yield task, {}, None, e
                continue
            yield task, {}, prediction, None

    def _label_video_task(self, engine, task, load, deadline, on_frames, cancelled) -> dict:
        s = self.settings
        reported = 0

        def window(done: int) -> None:
            nonlocal reported
            if on_frames is not None:
                on_frames(done - reported)
            reported = done
            if (cancelled is not None and cancelled()) or (deadline is not None and time.monotonic() > deadline):
                raise Cancelled()

        regions, scores = [], []
        for name in self.config.videos:
            entries = [e for e in self.ontology if e.label in self.config.labels_on(name)]
            if not entries:
                continue
            reported = 0
            with load(task, name) as video:
                timing = Timing()
                tracks = engine.video.track(
                    video.frames(), (video.info.width, video.info.height), entries, self.thresholds,
                    min_frames=self.outline["video_min_track"], window=s.video_window,
                    max_objects=self.outline["video_max_objects"],
                    on_window=window, timing=timing)
                info = video.info
            log.info("task %s: %d tracks over %d frames; seconds per frame: %s",
                     task.get("id") if isinstance(task, dict) else task, len(tracks), timing.frames, timing.per_frame())
            for control in self.config.outputs_on(name):
                mine = [t for t in tracks if t.label in control.labels]
                regions += to_video_regions(mine, control, info.frames, info.duration, info.framerate)
                scores += [t.score for t in mine]
        return self._prediction(regions, float(np.mean(scores)) if scores else 0.0)

    def predict_interactive(self, task: dict, context: dict) -> dict:
        s = self.settings
        # Checked before the image is fetched or encoded: a bad prompt costs milliseconds.
        prompt = parse_context(context, self.config, s.max_prompts, s.max_prompt_chars)
        if prompt.empty:
            return self._prediction([], 0.0)  # every prompt was removed: nothing to fetch or encode
        image = prompt.image or self.config.image  # the Image the annotator clicked on
        label = self._label(prompt, image)
        control = self.config.output_for(label, image)
        url = self._image_url(task, image)
        engine = self.runtime.wait(timeout=120)
        with engine.urgent():  # an annotator waits: this goes before any bulk work queued for the model
            return self._answer_click(engine, task, url, prompt, label, control)

    def _answer_click(self, engine, task, url, prompt, label, control) -> dict:
        s = self.settings
        enc = self._encoding(engine, url)
        t0 = time.perf_counter()
        if prompt.text or prompt.exemplars:
            # every instance (of the phrase, or like the exemplar boxes, named by their label), under the
            # project's thresholds: the same rule as batch and jobs
            labeler = self.auto_labeler(engine)
            dets = labeler.label(enc, [autolabel.Entry(prompt.text or label, label)],
                                 prompt.exemplars_px(enc.width, enc.height))
        elif len(prompt.boxes) > 1:  # several boxes: one object each
            parts = [engine.segment(enc, box=b, mask_threshold=self.outline["mask_threshold"])
                     for b in prompt.boxes_px(enc.width, enc.height)]
            dets = Detections(np.stack([m for m, _ in parts]), np.array([sc for _, sc in parts]), [label] * len(parts))
        else:
            box = prompt.boxes_px(enc.width, enc.height)[0] if prompt.boxes else None
            mask, score = engine.segment(enc, prompt.points_px(enc.width, enc.height), prompt.point_labels, box,
                                         self.outline["mask_threshold"])
            dets = Detections(mask[None], np.array([score]), [label])
        regions = to_regions(dets, control, **self.shape)
        log.debug("task %s: %d regions in %.3fs", task.get("id"), len(regions), time.perf_counter() - t0)
        score = float(dets.scores.max()) if len(dets) else 0.0
        return self._prediction(regions, score)

    def _prediction(self, regions: list[dict], score: float) -> dict:
        return {"result": regions, "score": round(score, 4), "model_version": self.model_version}

    def _label(self, prompt: Prompt, image: str) -> str:
        if prompt.label:
            return prompt.label
        if prompt.text:
            label = self.config.label_for_text(prompt.text)
            if label:
                return label
        labels = self.config.labels_on(image)
        if len(labels) == 1:
            return labels[0]
        raise BackendError(
            "no label for this prompt: select a label before clicking, or type a label name "
            f"(one of: {', '.join(labels)})"
        )

    def _image_url(self, task: dict, image: str | None = None) -> str:
        data = task.get("data")
        if not isinstance(data, dict):
            raise BackendError(f"task {task.get('id')} has no data object")
        key = self.config.images.get(image, self.config.value_key) if image else self.config.value_key
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
