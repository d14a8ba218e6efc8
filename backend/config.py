"""Settings, read once from the environment (see the README's configuration table)."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def parse_bool(value, what: str) -> bool:
    """true/false, 1/0, yes/no, on/off (any case), or a JSON boolean."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{what} must be true or false, got {value!r}")


def _float(name: str, default: float) -> float:
    raw = _env(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise SystemExit(f"{name} must be a finite number, got {raw!r}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = _env(name)
    try:
        return parse_bool(raw, name) if raw else default
    except ValueError as e:
        raise SystemExit(str(e)) from None


@dataclass
class Settings:
    model: str = "facebook/sam3"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | float32 | bfloat16 | float16
    label_studio_url: str = ""
    label_studio_api_key: str = field(default="", repr=False)
    basic_auth_user: str = ""
    basic_auth_pass: str = field(default="", repr=False)
    cache_mb: float = 2048.0  # image encodings kept for warm clicks
    polygon_tolerance: float = 1.0  # pixels; Douglas-Peucker simplification
    min_piece_area: float = 16.0  # pixels; smaller pieces of a mask are dropped, smaller holes filled
    polygon_holes: bool = True  # holes joined into their polygon by a zero-width cut; false: plain outlines
    max_pieces: int = 16  # polygons per instance (the largest pieces) and holes per polygon
    max_polygon_points: int = 1000  # about this many points per polygon at most (simplified harder beyond)
    mask_threshold: float = 0.5  # probability above which a mask pixel is on
    text_threshold: float = 0.5  # score above which a text-prompt instance is kept
    ontology: str = ""  # JSON, in any format `autolabel.parse_ontology` takes
    max_detections: int = 100
    min_area: float = 0.0  # pixels; smaller auto-labelled instances are dropped
    nms: bool = True
    nms_iou: float = 0.5
    max_image_mb: float = 32.0
    max_image_pixels: float = 40e6  # from the header, before decoding; an RGB copy costs 3 bytes a pixel
    fetch_timeout: float = 30.0  # seconds for a whole image fetch: attempts, redirects and waits
    fetch_retries: int = 3  # attempts per image on 429/5xx/dropped connections
    allow_private_urls: bool = False  # fetch images from loopback/private/link-local addresses too
    allowed_hosts: str = ""  # comma-separated hosts, host:port or CIDR networks allowed although private
    max_body_mb: float = 20.0  # request bodies (413 above)
    read_timeout: float = 15.0  # seconds for a client to send a request's headers and body
    max_prompts: int = 64  # prompt regions (points, boxes, texts) in one interactive request
    max_prompt_chars: int = 200  # characters of a text prompt (SAM 3 reads 32 tokens at most)
    max_ontology: int = 256  # prompts in an ontology
    max_projects: int = 256  # projects whose config and connection are kept in memory (least recent go)
    max_job_tasks: int = 10000  # task ids one job request may name
    max_jobs: int = 1000  # jobs the in-memory store keeps (finished ones go first, after a day)
    encode_batch: int = 1  # images per ViT forward in bulk work; 1 keeps a click's wait to one image's forward
    predict_budget: float = 60.0  # seconds a batch /predict labels before handing the rest to a job
    predict_timeout: float = 100.0  # Label Studio's ML_TIMEOUT_PREDICT: answers later than this are posted instead
    max_video_mb: float = 512.0  # a video task's file, downloaded to a temporary file before decoding
    max_video_frames: int = 18000  # frames one video task may have (Label Studio's count at the config's framerate)
    video_window: int = 64  # frames between progress reports and cancel checks; tracker state carries over
    video_min_track: int = 3  # frames a track must be seen in to be kept
    video_max_objects: int = 32  # objects tracked at once in one video (each costs memory every frame)
    redis_url: str = ""  # set: jobs go to rq workers; unset: one background thread in the service
    queue: str = "sam3"
    job_chunk: int = 64  # tasks per rq job; several workers share a project chunk by chunk
    post_batch: int = 16  # predictions per bulk import request
    job_heartbeat: int = 120  # seconds without a sign of life before a worker's chunk is retried elsewhere
    api_retries: int = 6  # attempts per Label Studio API call on 429/5xx/dropped connections
    log_level: str = "INFO"

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            model=_env("SAM3_MODEL", cls.model),
            device=_env("DEVICE", cls.device).lower(),
            dtype=_env("SAM3_DTYPE", cls.dtype).lower(),
            label_studio_url=_env("LABEL_STUDIO_URL").rstrip("/"),
            label_studio_api_key=_env("LABEL_STUDIO_API_KEY"),
            basic_auth_user=_env("BASIC_AUTH_USER"),
            basic_auth_pass=_env("BASIC_AUTH_PASS"),
            cache_mb=_float("SAM3_CACHE_MB", cls.cache_mb),
            polygon_tolerance=_float("SAM3_POLYGON_TOLERANCE", cls.polygon_tolerance),
            min_piece_area=_float("SAM3_MIN_PIECE_AREA", cls.min_piece_area),
            polygon_holes=_bool("SAM3_POLYGON_HOLES", cls.polygon_holes),
            max_pieces=int(_float("SAM3_MAX_PIECES", cls.max_pieces)),
            max_polygon_points=int(_float("SAM3_MAX_POLYGON_POINTS", cls.max_polygon_points)),
            mask_threshold=_float("SAM3_MASK_THRESHOLD", cls.mask_threshold),
            text_threshold=_float("SAM3_TEXT_THRESHOLD", cls.text_threshold),
            ontology=_env("SAM3_ONTOLOGY"),
            max_detections=int(_float("SAM3_MAX_DETECTIONS", cls.max_detections)),
            min_area=_float("SAM3_MIN_AREA", cls.min_area),
            nms=_bool("SAM3_NMS", cls.nms),
            nms_iou=_float("SAM3_NMS_IOU", cls.nms_iou),
            max_image_mb=_float("SAM3_MAX_IMAGE_MB", cls.max_image_mb),
            max_image_pixels=_float("SAM3_MAX_IMAGE_PIXELS", cls.max_image_pixels),
            fetch_timeout=_float("SAM3_FETCH_TIMEOUT", cls.fetch_timeout),
            fetch_retries=int(_float("SAM3_FETCH_RETRIES", cls.fetch_retries)),
            allow_private_urls=_bool("SAM3_ALLOW_PRIVATE_URLS", cls.allow_private_urls),
            allowed_hosts=_env("SAM3_ALLOWED_HOSTS"),
            max_body_mb=_float("SAM3_MAX_BODY_MB", cls.max_body_mb),
            read_timeout=_float("SAM3_READ_TIMEOUT", cls.read_timeout),
            max_prompts=int(_float("SAM3_MAX_PROMPTS", cls.max_prompts)),
            max_prompt_chars=int(_float("SAM3_MAX_PROMPT_CHARS", cls.max_prompt_chars)),
            max_ontology=int(_float("SAM3_MAX_ONTOLOGY", cls.max_ontology)),
            max_projects=int(_float("SAM3_MAX_PROJECTS", cls.max_projects)),
            max_job_tasks=int(_float("SAM3_MAX_JOB_TASKS", cls.max_job_tasks)),
            max_jobs=int(_float("SAM3_MAX_JOBS", cls.max_jobs)),
            encode_batch=int(_float("SAM3_ENCODE_BATCH", cls.encode_batch)),
            predict_budget=_float("SAM3_PREDICT_BUDGET", cls.predict_budget),
            predict_timeout=_float("SAM3_PREDICT_TIMEOUT", cls.predict_timeout),
            max_video_mb=_float("SAM3_MAX_VIDEO_MB", cls.max_video_mb),
            max_video_frames=int(_float("SAM3_MAX_VIDEO_FRAMES", cls.max_video_frames)),
            video_window=int(_float("SAM3_VIDEO_WINDOW", cls.video_window)),
            video_min_track=int(_float("SAM3_VIDEO_MIN_TRACK", cls.video_min_track)),
            video_max_objects=int(_float("SAM3_VIDEO_MAX_OBJECTS", cls.video_max_objects)),
            redis_url=_env("REDIS_URL"),
            queue=_env("SAM3_QUEUE", cls.queue),
            job_chunk=int(_float("SAM3_JOB_CHUNK", cls.job_chunk)),
            post_batch=int(_float("SAM3_POST_BATCH", cls.post_batch)),
            job_heartbeat=int(_float("SAM3_JOB_HEARTBEAT", cls.job_heartbeat)),
            api_retries=int(_float("SAM3_API_RETRIES", cls.api_retries)),
            log_level=_env("LOG_LEVEL", cls.log_level).upper(),
        )

    def problems(self) -> list[str]:
        """What is wrong with these settings; `serve` and `worker` refuse to start on any of it."""
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
        try:
            from .outbound import Policy

            Policy.parse(self.allow_private_urls, self.allowed_hosts)
        except ValueError as e:
            out.append(str(e))
        if self.label_studio_url:
            from .outbound import Refused, parse_url

            try:
                parse_url(self.label_studio_url)
            except Refused as e:
                out.append(f"LABEL_STUDIO_URL is not usable: {e}")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            out.append(f"DEVICE={self.device} is not a device: auto, cpu, cuda or cuda:N")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            out.append(f"SAM3_DTYPE={self.dtype}: one of auto, float32, bfloat16, float16")
        for name in ("mask_threshold", "text_threshold", "nms_iou"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"{name} must be between 0 and 1")
        for name in ("max_image_mb", "max_image_pixels", "fetch_timeout", "max_body_mb", "read_timeout",
                     "max_prompts", "max_prompt_chars", "max_ontology", "max_projects", "max_job_tasks", "max_jobs",
                     "max_pieces", "max_polygon_points", "encode_batch", "predict_budget", "predict_timeout",
                     "max_detections",
                     "fetch_retries", "api_retries", "job_chunk", "post_batch", "job_heartbeat", "max_video_mb",
                     "max_video_frames", "video_window", "video_min_track", "video_max_objects"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive")
        if self.predict_budget >= self.predict_timeout:
            out.append("SAM3_PREDICT_BUDGET must be below SAM3_PREDICT_TIMEOUT (Label Studio's ML_TIMEOUT_PREDICT): "
                       "a batch must stop labelling while Label Studio still waits for its answer")
        return out

