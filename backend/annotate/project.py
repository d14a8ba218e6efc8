"""One Label Studio project as this backend sees it: its label config, ontology, thresholds and outline, the
Label Studio it talks to, and the model_version all of them make."""
from __future__ import annotations

from dataclasses import asdict

from ..config import Settings
from ..errors import BackendError
from ..labelstudio import client, outbound
from ..labelstudio.media import ImageLoader
from ..labelstudio.retry import Backoff
from ..sam3.model import Sam3Model
from . import ontology, versions
from .autolabel import AutoLabeler
from .labelconfig import LabelConfig
from .ontology import Entry, Thresholds
from .regions import Outline
from .tiling import Tiling
from .task import Task


class Project:
    """Built from what /setup (or a job) gives: the label config, the extra params, the Label Studio host and
    token. Everything is checked here, so that /setup reports a bad ontology or threshold where the admin sees it.

    `outline`: a job's own (resolved when it was created); else this process's settings. `fetch_retries`:
    attempts per image (a job, which nobody waits on, retries as long as its API calls do).
    """

    def __init__(self, settings: Settings, sam3: Sam3Model, label_config: str | None, extra_params=None,
                 hostname: str = "", token: str = "", outline: Outline | None = None,
                 fetch_retries: int | None = None):
        s = self.settings = settings
        self.sam3 = sam3
        self.config = LabelConfig.parse(label_config) if label_config else None
        self.connection = client.connect(s, hostname, token)  # the one rule for which Label Studio and token
        self.loader = ImageLoader(
            self.connection, outbound.Policy.parse(s.allow_private_urls, s.allowed_hosts),
            max_bytes=int(s.max_image_mb * (1 << 20)), max_pixels=s.max_image_pixels, timeout=s.fetch_timeout,
            backoff=Backoff(attempts=max(1, fetch_retries or s.fetch_retries)))
        self.outline = outline or Outline.from_settings(s)
        extra = {} if extra_params is None else extra_params
        if not isinstance(extra, dict):
            raise BackendError("extra_params must be a JSON object, e.g. {\"ontology\": {...}, \"thresholds\": {...}}")
        unknown = sorted(str(k)[:50] for k in extra if k not in ontology.EXTRA_KEYS)
        if unknown:
            raise BackendError(f"unknown extra param(s) {unknown}; known: {', '.join(ontology.EXTRA_KEYS)}")
        env_ontology, env_thresholds = ontology.split_extra(s.ontology)  # SAM3_ONTOLOGY, bare or wrapped
        base = Thresholds(confidence=s.text_threshold, max_detections=s.max_detections, min_area=s.min_area,
                          nms=s.nms, nms_iou=s.nms_iou)
        self.thresholds = Thresholds.from_dict(extra.get("thresholds"), Thresholds.from_dict(env_thresholds, base))
        self.tiling = Tiling.parse(extra["tiling"] if extra.get("tiling") is not None else s.tiling, s.tile_merge,
                                   s.max_tiles, "tiling" if extra.get("tiling") is not None else "SAM3_TILING")
        spec = extra.get("ontology") or env_ontology or None
        self.ontology: list[Entry] | None = (
            ontology.parse_ontology(spec, self.config, s.max_ontology, s.max_prompt_chars)
            if self.config is not None else None)

    def require_config(self) -> LabelConfig:
        if self.config is None:
            raise BackendError("no label config: call /setup first or send label_config with the request")
        return self.config

    # ---- identity ----------------------------------------------------------------------------------
    def output_spec(self) -> dict:
        """Everything besides the weights, the ontology and the thresholds that changes what is predicted: the
        output controls (a brush added to a polygon config is a new prediction) and the settings that shape
        their regions, only those that apply to the kinds present. Not the device, dtype, batch sizes, caches
        or limits: a job spread over CPU and GPU workers is one model_version."""
        config, out = self.require_config(), self.outline
        kinds = {c.type for c in config.outputs}
        spec: dict = {"controls": sorted([c.tag, c.name, c.to_name] for c in config.outputs)}
        if kinds & {"polygonlabels", "brushlabels", "rectanglelabels"}:
            spec["mask_threshold"] = out.mask_threshold
            spec["min_area"] = out.min_area
        if "polygonlabels" in kinds:
            spec["polygon"] = [out.tolerance, out.holes, out.max_pieces, out.max_points]
        if "videorectangle" in kinds:
            spec["video"] = [out.video_min_track, out.video_max_objects]
        if self.tiling.mode != "off" and not config.is_video:  # off: the versions untiled projects always had
            spec["tiling"] = self.tiling.spec()
        return spec

    @property
    def model_version(self) -> str:
        """Changes with the checkpoint, the ontology, the thresholds and the outputs (`output_spec`), and only
        with them."""
        base = self.sam3.model_version
        if base is None:
            self.sam3.wait(0)  # raises: loading or failed, with the reason
        if self.ontology is None:
            return base
        return versions.project_version(base, ontology.fingerprint(self.ontology, self.thresholds,
                                                                    self.output_spec()))

    def job_request(self) -> dict:
        """The ontology, thresholds, outline and tiling a job records, so every worker labels exactly as this project
        does whatever its own environment says (and so reaches this model_version)."""
        return {"ontology": [asdict(e) for e in self.ontology or []], "thresholds": asdict(self.thresholds),
                "outline": self.outline.to_dict(), "tiling": self.tiling.spec()}

    # ---- answers -----------------------------------------------------------------------------------
    def prediction(self, regions: list[dict], score: float) -> dict:
        return {"result": regions, "score": round(score, 4), "model_version": self.model_version}

    def failure(self, error: Exception) -> dict:
        """An answer without "result": Label Studio stores nothing, so the task stays visibly unlabelled."""
        return {"model_version": self.model_version, "error": getattr(error, "message", None) or str(error)}

    def image_url(self, task: Task, image: str | None = None) -> str:
        """The URL of the task's Image `image` (the first labelled Image by default)."""
        config = self.require_config()
        key = config.images.get(image, config.value_key) if image else config.value_key
        return task.media(key, "image")

    def entries_on(self, name: str) -> list[Entry]:
        """The ontology entries whose label an output control on the Image or Video `name` carries."""
        labels = set(self.require_config().labels_on(name))
        return [e for e in self.ontology or [] if e.label in labels]

    def auto_labeler(self, engine, encode_batch: int | None = None) -> AutoLabeler:
        return AutoLabeler(engine, self.ontology or [], self.thresholds, self.outline.mask_threshold,
                           encode_batch or self.settings.encode_batch, self.tiling)
