"""Settings, read once from the environment (every one is described in docs/configuration.md)."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields

from .validate import parse_bool

BULK_ENCODE_BATCH = 4  # images per ViT forward where no click waits (workers, `label`): see `Settings.from_env`


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def setting(env: str, default, secret: bool = False):
    """A field of Settings, read from the environment variable `env` (docs/configuration.md describes it)."""
    return field(default=default, repr=not secret, metadata={"env": env})


def _parse(name: str, raw: str, default):
    """`raw` as the type of `default`; SystemExit naming the variable when it is not one."""
    if isinstance(default, bool):
        try:
            return parse_bool(raw, name)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if isinstance(default, (int, float)):
        try:
            value = float(raw)
        except ValueError:
            raise SystemExit(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise SystemExit(f"{name} must be a finite number, got {raw!r}")
        return int(value) if isinstance(default, int) else value
    return raw


@dataclass
class Settings:
    model: str = setting("SAM3_MODEL", "facebook/sam3")
    device: str = setting("DEVICE", "auto")  # auto | cpu | cuda | cuda:N
    # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | float32 | bfloat16 | float16
    dtype: str = setting("SAM3_DTYPE", "auto")
    label_studio_url: str = setting("LABEL_STUDIO_URL", "")
    label_studio_api_key: str = setting("LABEL_STUDIO_API_KEY", "", secret=True)
    basic_auth_user: str = setting("BASIC_AUTH_USER", "")
    basic_auth_pass: str = setting("BASIC_AUTH_PASS", "", secret=True)
    cache_mb: float = setting("SAM3_CACHE_MB", 2048.0)  # image encodings kept for warm clicks
    polygon_tolerance: float = setting("SAM3_POLYGON_TOLERANCE", 1.0)  # pixels; Douglas-Peucker simplification
    # pixels; smaller pieces of a mask are dropped, smaller holes filled
    min_piece_area: float = setting("SAM3_MIN_PIECE_AREA", 16.0)
    # holes joined into their polygon by a zero-width cut; false: plain outlines
    polygon_holes: bool = setting("SAM3_POLYGON_HOLES", True)
    max_pieces: int = setting("SAM3_MAX_PIECES", 16)  # polygons per instance (the largest pieces) and holes per polygon
    # about this many points per polygon at most (simplified harder beyond)
    max_polygon_points: int = setting("SAM3_MAX_POLYGON_POINTS", 1000)
    mask_threshold: float = setting("SAM3_MASK_THRESHOLD", 0.5)  # probability above which a mask pixel is on
    text_threshold: float = setting("SAM3_TEXT_THRESHOLD", 0.5)  # score above which a text-prompt instance is kept
    ontology: str = setting("SAM3_ONTOLOGY", "")  # JSON, in any format `autolabel.parse_ontology` takes
    max_detections: int = setting("SAM3_MAX_DETECTIONS", 100)
    min_area: float = setting("SAM3_MIN_AREA", 0.0)  # pixels; smaller auto-labelled instances are dropped
    nms: bool = setting("SAM3_NMS", True)
    nms_iou: float = setting("SAM3_NMS_IOU", 0.5)
    max_image_mb: float = setting("SAM3_MAX_IMAGE_MB", 32.0)
    # from the header, before decoding; an RGB copy costs 3 bytes a pixel
    max_image_pixels: float = setting("SAM3_MAX_IMAGE_PIXELS", 40e6)
    # seconds for a whole image fetch: attempts, redirects and waits
    fetch_timeout: float = setting("SAM3_FETCH_TIMEOUT", 30.0)
    fetch_retries: int = setting("SAM3_FETCH_RETRIES", 3)  # attempts per image on 429/5xx/dropped connections
    # fetch images from loopback/private/link-local addresses too
    allow_private_urls: bool = setting("SAM3_ALLOW_PRIVATE_URLS", False)
    # comma-separated hosts, host:port or CIDR networks allowed although private
    allowed_hosts: str = setting("SAM3_ALLOWED_HOSTS", "")
    max_body_mb: float = setting("SAM3_MAX_BODY_MB", 20.0)  # request bodies (413 above)
    # seconds for a client to send a request's headers and body
    read_timeout: float = setting("SAM3_READ_TIMEOUT", 15.0)
    # prompt regions (points, boxes, texts) in one interactive request
    max_prompts: int = setting("SAM3_MAX_PROMPTS", 64)
    # characters of a text prompt (SAM 3 reads 32 tokens at most)
    max_prompt_chars: int = setting("SAM3_MAX_PROMPT_CHARS", 200)
    max_ontology: int = setting("SAM3_MAX_ONTOLOGY", 256)  # prompts in an ontology
    # projects whose config and connection are kept in memory (least recent go)
    max_projects: int = setting("SAM3_MAX_PROJECTS", 256)
    max_job_tasks: int = setting("SAM3_MAX_JOB_TASKS", 10000)  # task ids one job request may name
    # jobs the in-memory store keeps (finished ones go first, after a day)
    max_jobs: int = setting("SAM3_MAX_JOBS", 1000)
    # images per ViT forward in bulk work; 1 keeps a click's wait to one image's forward (the service's default;
    # BULK_ENCODE_BATCH where nobody clicks)
    encode_batch: int = setting("SAM3_ENCODE_BATCH", 1)
    # seconds a batch /predict labels before handing the rest to a job
    predict_budget: float = setting("SAM3_PREDICT_BUDGET", 60.0)
    # Label Studio's ML_TIMEOUT_PREDICT: answers later than this are posted instead
    predict_timeout: float = setting("SAM3_PREDICT_TIMEOUT", 100.0)
    # pre-annotation of large images: off | auto (tiles of the model's input size when the long side exceeds twice
    # it) | TILE:OVERLAP (pixels : fraction of a tile); a project's extra params "tiling" overrides it
    tiling: str = setting("SAM3_TILING", "off")
    max_tiles: int = setting("SAM3_MAX_TILES", 256)  # tiles per image (413 above: raise it or use larger tiles)
    # mask IoU at which detections from overlapping tiles (or a tile and the whole image) are one object
    tile_merge: float = setting("SAM3_TILE_MERGE", 0.5)
    # clicks and boxes on an image whose long side exceeds twice the model's input are answered on a crop around
    # the prompt at native resolution (grown while the object reaches the crop's edge): auto | off
    click_crop: str = setting("SAM3_CLICK_CROP", "auto")
    # a video task's file, downloaded to a temporary file before decoding
    max_video_mb: float = setting("SAM3_MAX_VIDEO_MB", 512.0)
    # frames one video task may have (Label Studio's count at the config's framerate)
    max_video_frames: int = setting("SAM3_MAX_VIDEO_FRAMES", 18000)
    # frames between progress reports and cancel checks; tracker state carries over
    video_window: int = setting("SAM3_VIDEO_WINDOW", 64)
    video_min_track: int = setting("SAM3_VIDEO_MIN_TRACK", 3)  # frames a track must be seen in to be kept
    # objects tracked at once in one video (each costs memory every frame)
    video_max_objects: int = setting("SAM3_VIDEO_MAX_OBJECTS", 32)
    redis_url: str = setting("REDIS_URL", "")  # set: jobs go to rq workers; unset: one background thread in the service
    queue: str = setting("SAM3_QUEUE", "sam3")
    job_chunk: int = setting("SAM3_JOB_CHUNK", 64)  # tasks per rq job; several workers share a project chunk by chunk
    post_batch: int = setting("SAM3_POST_BATCH", 16)  # predictions per bulk import request
    # seconds without a sign of life before a worker's chunk is retried elsewhere
    job_heartbeat: int = setting("SAM3_JOB_HEARTBEAT", 120)
    # attempts per Label Studio API call on 429/5xx/dropped connections
    api_retries: int = setting("SAM3_API_RETRIES", 6)
    log_level: str = setting("LOG_LEVEL", "INFO")

    @classmethod
    def from_env(cls, bulk: bool = False) -> "Settings":
        """The environment's settings (each field names its variable). `bulk`: for a process no click waits on
        (a worker, `label`): images are encoded BULK_ENCODE_BATCH per forward unless SAM3_ENCODE_BATCH says
        otherwise."""
        values = {}
        for f in fields(cls):
            name, raw = f.metadata["env"], _env(f.metadata["env"])
            default = BULK_ENCODE_BATCH if bulk and f.name == "encode_batch" else f.default
            values[f.name] = _parse(name, raw, default) if raw else default
        values["device"], values["dtype"] = values["device"].lower(), values["dtype"].lower()
        values["click_crop"] = values["click_crop"].lower()
        values["label_studio_url"] = values["label_studio_url"].rstrip("/")
        values["log_level"] = values["log_level"].upper()
        return cls(**values)

    def problems(self) -> list[str]:
        """What is wrong with these settings by themselves; `serve`, `worker` and `label` refuse to start on any
        of it (with what `labelstudio.settings_problems` finds in the Label Studio URL and the address policy:
        `http.startup.problems` asks both)."""
        out = []
        if bool(self.label_studio_url) != bool(self.label_studio_api_key):
            out.append("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY go together: the key is only ever sent to that URL. "
                       "Set both, or neither (then each project's /setup host and token are used together)")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            out.append("BASIC_AUTH_USER and BASIC_AUTH_PASS go together: set both to require HTTP Basic auth, "
                       "or neither")
        if not all(0x21 <= ord(c) <= 0x7e for c in self.label_studio_api_key):
            out.append("LABEL_STUDIO_API_KEY must be printable ASCII without spaces")
        if ":" in self.basic_auth_user:
            out.append("BASIC_AUTH_USER must not contain ':'")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            out.append(f"DEVICE={self.device} is not a device: auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            out.append(f"SAM3_DTYPE={self.dtype}: one of auto, float32, bfloat16, float16")
        if not re.fullmatch(r"off|auto|[0-9]+(:[0-9.]+)?", self.tiling.lower()):
            out.append(f"SAM3_TILING={self.tiling}: off, auto, or TILE:OVERLAP (e.g. 1008:0.2)")
        if self.click_crop not in ("auto", "off"):
            out.append(f"SAM3_CLICK_CROP={self.click_crop}: auto or off")
        for name in ("mask_threshold", "text_threshold", "nms_iou", "tile_merge"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"{name} must be between 0 and 1")
        for name in ("max_image_mb", "max_image_pixels", "fetch_timeout", "max_body_mb", "read_timeout",
                     "max_prompts", "max_prompt_chars", "max_ontology", "max_projects", "max_job_tasks", "max_jobs",
                     "max_pieces", "max_polygon_points", "encode_batch", "predict_budget", "predict_timeout",
                     "max_detections", "max_tiles",
                     "fetch_retries", "api_retries", "job_chunk", "post_batch", "job_heartbeat", "max_video_mb",
                     "max_video_frames", "video_window", "video_min_track", "video_max_objects"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive")
        if self.predict_budget >= self.predict_timeout:
            out.append("SAM3_PREDICT_BUDGET must be below SAM3_PREDICT_TIMEOUT (Label Studio's ML_TIMEOUT_PREDICT): "
                       "a batch must stop labelling while Label Studio still waits for its answer")
        return out

