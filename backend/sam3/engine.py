"""SAM 3 on transformers: encode an image once, then prompt it many times.

`Sam3Model` answers text prompts (every instance of a concept); `Sam3TrackerModel` answers
clicks and boxes (one object each). Both load from one `sam3_video` checkpoint and share one
ViT: the tracker's embeddings are built from the detector's ViT output through the tracker's
own neck, so an image costs one ViT pass whichever head is asked.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from cachetools import LRUCache
from PIL import Image

from .. import metrics
from ..errors import BackendError
from .detections import Detections

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 32  # SAM 3's text encoder has 32 positions; longer prompts raise in the model
MAX_PROMPT_CHARS = 1000  # nothing this long fits in 32 tokens; refused before the tokenizer sees it
TEXT_CACHE = 4096  # distinct prompts whose text features are kept
SHRINK_ABOVE = 16e6  # pixels; larger images are shrunk with PIL before the processor (`bounded`)


@dataclass
class Encoding:
    """Everything the heads need about one image, computed once."""

    key: str
    height: int
    width: int
    vision: object  # Sam3VisionEncoderOutput (detector features)
    tracker: list[torch.Tensor]  # tracker image embeddings
    nbytes: int


class PriorityLock:
    """The model, one forward at a time; an annotator's click waiting for it goes before waiting bulk work.

    Reentrant per thread. Urgency is per thread (`Sam3Engine.urgent()`), so the engine's methods need no
    extra argument: a click waits at most for the forward pass in progress.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._urgent_waiting = 0
        self._local = threading.local()

    def __enter__(self) -> "PriorityLock":
        me, urgent = threading.get_ident(), getattr(self._local, "urgent", False)
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return self
            self._urgent_waiting += urgent
            try:
                while self._owner is not None or (not urgent and self._urgent_waiting):
                    self._cond.wait()
            finally:
                self._urgent_waiting -= urgent
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._cond.notify_all()

    @contextmanager
    def urgent(self):
        before = getattr(self._local, "urgent", False)
        self._local.urgent = True
        try:
            yield
        finally:
            self._local.urgent = before


class EncodingCache:
    """Least-recently-used image encodings, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=lambda enc: enc.nbytes)
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return int(self._items.currsize)

    def get(self, key: str) -> Encoding | None:
        with self._lock:
            return self._items.get(key)

    def put(self, enc: Encoding) -> None:
        if enc.nbytes > self.max_bytes:
            return
        with self._lock:
            self._items[enc.key] = enc
        metrics.CACHE_BYTES.set(self.total)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
        metrics.CACHE_BYTES.set(0)

    def __contains__(self, key: str) -> bool:
        return key in self._items


def image_key(image: Image.Image) -> str:
    """Content hash: the same pixels share an encoding whatever URL they came from."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    # In strips: `tobytes()` of a whole 12000 x 9000 photo would copy it (324 MB, twice at its peak).
    step = max(1, (8 << 20) // max(1, image.width * len(image.getbands())))
    for y in range(0, image.height, step):
        h.update(image.crop((0, y, image.width, min(image.height, y + step))).tobytes())
    return h.hexdigest()


def bounded(image: Image.Image, model_size: int) -> Image.Image:
    """RGB, and a very large image first shrunk to twice the model's input with PIL: SAM 3's processor would hold it
    as a full-size tensor only to resize it (a 12000 x 9000 photo: 1.3 GB more), and the model sees it at its
    input size either way."""
    if image.width * image.height > SHRINK_ABOVE:
        image = image.resize((2 * model_size, 2 * model_size), Image.BILINEAR)
    return image.convert("RGB")


def resolve_device(name: str) -> torch.device:
    """The device DEVICE names, or a BackendError that says why it cannot be used and what to set instead."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BackendError(f"DEVICE={name} is not a device: auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no NVIDIA GPU or driver is visible to this process")
            raise BackendError(f"DEVICE={name}, but CUDA is not available ({why}): set DEVICE=auto or DEVICE=cpu, "
                               "or give the container the GPU (docker compose -f docker-compose.yml -f "
                               "docker-compose.gpu.yml, with the NVIDIA container toolkit)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendError(f"DEVICE={name}, but this process sees {torch.cuda.device_count()} GPU(s): "
                               f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise BackendError(f"DEVICE={name}: only auto, cpu, cuda and cuda:N are supported")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX): there bf16 runs the ViT about 2.4x faster than fp32 (README)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; or the dtype named."""
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise BackendError(f"SAM3_DTYPE={name}: one of auto, float32, bfloat16, float16")
    return DTYPES[name]


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


class Sam3Engine:
    """`encode()` an image once, then `segment()` (points/boxes) or `detect()` (text) many times.

    Model calls are serialised by one lock: the service answers requests on several threads but
    the accelerator runs one forward at a time, and the cache keeps clicks on the same image cheap.

    Longer than the other classes because it must be one: every method runs a forward of the same two heads on
    the same encodings under the same lock (loading, encoding, clicks, text, the shared ViT's tracker neck), and
    a split would spread that lock and that cache across classes that all need both.
    """

    def __init__(self, model: str, device: str = "auto", cache_bytes: int = 2 << 30, dtype: str = "auto"):
        self.model_id = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.cache = EncodingCache(cache_bytes)
        self.refinements = Refinements()
        self.vit_passes = 0  # how many times the image encoder ran (tests and metrics read it)
        self._text_cache: LRUCache = LRUCache(maxsize=TEXT_CACHE)  # prompt -> (features, attention mask)
        self._lock = PriorityLock()
        self.detector = self.tracker = self.processor = None
        self.load_kwargs: dict = {}
        self._video = None

    # ---- loading -------------------------------------------------------------------------
    def load(self, local_files_only: bool = False) -> "Sam3Engine":
        from transformers import Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3TrackerProcessor
        from transformers.utils import logging as hf_logging

        t0 = time.perf_counter()
        kw = self.load_kwargs = {"local_files_only": local_files_only}
        detector = Sam3Model.from_pretrained(self.model_id, dtype=self.dtype, **kw)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "sam3_video checkpoint into sam3_tracker" is expected
        try:
            tracker = Sam3TrackerModel.from_pretrained(self.model_id, dtype=self.dtype, **kw)
        finally:
            hf_logging.set_verbosity(verbosity)
        # One ViT for both heads: their weights are equal in the checkpoint.
        tracker.vision_encoder.backbone = detector.vision_encoder.backbone
        self.detector = detector.to(self.device).eval()
        self.tracker = tracker.to(self.device).eval()
        self.processor = Sam3Processor.from_pretrained(self.model_id, **kw)
        self.tracker_processor = Sam3TrackerProcessor.from_pretrained(self.model_id, **kw)
        self.image_size = self.processor.image_processor.size["height"]
        log.info("loaded %s on %s (%s) in %.1fs", self.model_id, self.device, self.dtype, time.perf_counter() - t0)
        return self

    @property
    def video(self):
        """The video tracker (`tracking.VideoTracker`), sharing this engine's detector; its heads load on first use."""
        if self._video is None:
            from .tracking import VideoTracker

            self._video = VideoTracker(self)
        return self._video

    @property
    def loaded(self) -> bool:
        return self.detector is not None

    def urgent(self):
        """`with engine.urgent():` this thread's model calls go before bulk work waiting for the model."""
        return self._lock.urgent()

    def exclusive(self) -> PriorityLock:
        """`with engine.exclusive():` the model to this thread alone (the video tracker takes it per frame, so a
        click waits for one frame at most); reentrant."""
        return self._lock

    # ---- image encoding ------------------------------------------------------------------
    def encode(self, image: Image.Image, key: str | None = None) -> Encoding:
        key = key or image_key(image)
        enc = self.cache.get(key)
        if enc is not None:
            metrics.CACHE_EVENTS.labels("hit").inc()
            return enc
        metrics.CACHE_EVENTS.labels("miss").inc()
        with self._lock:
            enc = self.cache.get(key)  # another thread may have encoded it while we waited
            if enc is not None:
                return enc
            enc = self._encode([image], [key])[0]
            self.cache.put(enc)
        return enc

    def encode_many(self, images: Sequence[Image.Image], keys: Sequence[str] | None = None,
                    cache: bool = True) -> list[Encoding]:
        """Encode several images in one ViT forward; cached ones are not recomputed. `cache=False`: neither
        looked up nor kept (the tiles of a large image: seen once, they would push clicks' encodings out)."""
        keys = list(keys) if keys is not None else [image_key(im) for im in images]
        found = {k: self.cache.get(k) if cache else None for k in keys}
        todo = [(im, k) for im, k in zip(images, keys) if found[k] is None]
        if cache:
            metrics.CACHE_EVENTS.labels("hit").inc(len(images) - len(todo))
            metrics.CACHE_EVENTS.labels("miss").inc(len(todo))
        if todo:
            with self._lock:
                for enc in self._encode([im for im, _ in todo], [k for _, k in todo]):
                    found[enc.key] = enc
                    if cache:
                        self.cache.put(enc)
        return [found[k] for k in keys]

    @torch.inference_mode()
    def _encode(self, images: list[Image.Image], keys: list[str]) -> list[Encoding]:
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        t0 = time.perf_counter()
        px = self.processor.image_processor(images=[bounded(im, self.image_size) for im in images],
                                            return_tensors="pt")
        pixel_values = px["pixel_values"].to(self.device, self.dtype)
        vis = self.detector.get_vision_features(pixel_values=pixel_values)
        tracker = self._tracker_embeddings(vis.last_hidden_state)
        self.vit_passes += 1
        metrics.MODEL_SECONDS.labels("encode").observe(time.perf_counter() - t0)
        out = []
        for i, (im, key) in enumerate(zip(images, keys)):
            one = Sam3VisionEncoderOutput(
                last_hidden_state=vis.last_hidden_state[i : i + 1],
                fpn_hidden_states=tuple(f[i : i + 1] for f in vis.fpn_hidden_states),
                fpn_position_encoding=tuple(p[i : i + 1] for p in vis.fpn_position_encoding),
            )
            trk = [t[i : i + 1] for t in tracker]
            nbytes = _tensor_bytes(
                [one.last_hidden_state, list(one.fpn_hidden_states), list(one.fpn_position_encoding), trk]
            )
            out.append(Encoding(key, im.height, im.width, one, trk, nbytes))
        return out

    def _tracker_embeddings(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        # What Sam3TrackerModel.get_image_embeddings computes, from the shared ViT's output.
        t = self.tracker
        b = hidden.shape[0]
        h, w = t.prompt_encoder.image_embedding_size
        spatial = hidden.view(b, h, w, -1).permute(0, 3, 1, 2)
        fpn, _ = t.vision_encoder.neck(spatial)
        sizes = t.backbone_feature_sizes
        maps = list(fpn[: len(sizes)])
        maps[0] = t.mask_decoder.conv_s0(maps[0])
        maps[1] = t.mask_decoder.conv_s1(maps[1])
        maps[-1] = maps[-1] + t.no_memory_embedding.view(1, -1, 1, 1)
        return [m.reshape(b, -1, *s) for m, s in zip(maps, sizes)]

    # ---- points and boxes (one object each) ----------------------------------------------
    @torch.inference_mode()
    def segment(
        self,
        enc: Encoding,
        points: Sequence[tuple[float, float]] = (),
        labels: Sequence[int] = (),
        box: tuple[float, float, float, float] | None = None,
        mask_threshold: float = 0.5,
    ) -> tuple[np.ndarray, float]:
        """One object from clicks (pixel x, y; label 1 positive, 0 negative) and/or a pixel xyxy box.

        Returns the mask at the original resolution and the model's predicted IoU as its score.
        """
        if not points and box is None:
            raise BackendError("a point or a box is needed to segment an object")
        kwargs = {"original_sizes": [[enc.height, enc.width]], "return_tensors": "pt"}
        if points:
            kwargs["input_points"] = [[[list(map(float, p)) for p in points]]]
            kwargs["input_labels"] = [[[int(v) for v in labels]]]
        if box is not None:
            kwargs["input_boxes"] = [[list(map(float, box))]]
        inputs = self.tracker_processor(images=None, **kwargs)
        # Label Studio resends every click of an object with each new one: when this prompt extends the last
        # one, that answer's logits go in as the mask prompt (SamPredictor's mask_input), so a third click
        # refines what the second made instead of starting over.
        clicks, frame = _prompt_key(points, labels, box)
        previous = self.refinements.get((enc.key, clicks[:-1], frame)) if len(clicks) > 1 else None
        # A single click is ambiguous (part or whole): ask for three masks and keep the best.
        multimask = len(points) == 1 and box is None
        t0 = time.perf_counter()
        with self._lock:
            out = self.tracker(
                image_embeddings=enc.tracker,
                input_points=_to(inputs.get("input_points"), self.device, self.dtype),
                input_labels=_to(inputs.get("input_labels"), self.device),
                input_boxes=_to(inputs.get("input_boxes"), self.device, self.dtype),
                input_masks=None if previous is None else previous.to(self.device, self.dtype)[None],
                multimask_output=multimask,
            )
        metrics.MODEL_SECONDS.labels("segment").observe(time.perf_counter() - t0)
        iou = out.iou_scores[0, 0].float()  # [masks]
        best = int(iou.argmax())
        logits = out.pred_masks[0, 0, best : best + 1].float()  # [1, h, w] low-res logits
        self.refinements.put((enc.key, clicks, frame), logits.detach())
        mask = upsample(logits, enc.height, enc.width, mask_threshold)[0]
        return mask, float(iou[best].clamp(0, 1))

    # ---- text (every instance) -----------------------------------------------------------
    @torch.inference_mode()
    def detect(
        self, enc: Encoding, prompts: Sequence[str], threshold: float = 0.5, mask_threshold: float = 0.5,
        max_keep: int = 100, exemplars: Sequence[tuple[tuple[float, float, float, float], int]] = (),
        size: tuple[int, int] | None = None,
    ) -> list[Detections]:
        """Every instance of each text prompt, decoded together in one forward on the cached image.

        `exemplars`: pixel xyxy boxes with 1 (more like this) or 0 (not like this), given with every prompt:
        SAM 3 then finds the instances like the positive boxes. Returns one `Detections` per prompt, labelled
        with the prompt: its best `max_keep` instances scoring above `threshold`. Only those are upsampled, so
        memory is O(kept), not O(queries). `size` (height, width): the masks' size, when not the image's own (a
        very large image's whole-image pass, at a bounded resolution).
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        if not prompts:
            return []
        text, attn = self._text_features(prompts)
        n = len(prompts)
        v = enc.vision
        # The image's features are expanded (a view, not a copy) to one row per prompt.
        vision = Sam3VisionEncoderOutput(
            last_hidden_state=v.last_hidden_state.expand(n, *v.last_hidden_state.shape[1:]),
            fpn_hidden_states=tuple(f.expand(n, *f.shape[1:]) for f in v.fpn_hidden_states),
            fpn_position_encoding=tuple(p.expand(n, *p.shape[1:]) for p in v.fpn_position_encoding),
        )
        boxes = {}
        if exemplars:  # normalised (cx, cy, w, h), as Sam3Model takes them
            xyxy = torch.tensor([b for b, _ in exemplars], dtype=torch.float32)
            cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / enc.width, (xyxy[:, 1] + xyxy[:, 3]) / 2 / enc.height,
                                  (xyxy[:, 2] - xyxy[:, 0]) / enc.width, (xyxy[:, 3] - xyxy[:, 1]) / enc.height], 1)
            boxes = {"input_boxes": cxcywh.clamp(0, 1)[None].expand(n, -1, -1).to(self.device, self.dtype),
                     "input_boxes_labels": torch.tensor([[int(v) for _, v in exemplars]] * n, device=self.device)}
        t0 = time.perf_counter()
        with self._lock:
            out = self.detector(
                vision_embeds=vision, text_embeds=BaseModelOutputWithPooling(pooler_output=text), attention_mask=attn,
                **boxes,
            )
        metrics.MODEL_SECONDS.labels("detect").observe(time.perf_counter() - t0)
        scores = out.pred_logits.float().sigmoid()
        if out.presence_logits is not None:
            scores = scores * out.presence_logits.float().sigmoid()
        results = []
        for i, prompt in enumerate(prompts):
            keep = (scores[i] > threshold).nonzero().flatten()
            keep = keep[scores[i][keep].argsort(descending=True)][:max_keep]
            # Only the kept queries are upsampled to full resolution.
            height, width = size or (enc.height, enc.width)
            masks = upsample(out.pred_masks[i, keep].float(), height, width, mask_threshold)
            results.append(Detections(masks, scores[i, keep].cpu().numpy(), [prompt] * len(keep)))
        return results

    def _text_features(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text features per prompt, computed once per distinct prompt and kept."""
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts):  # callers bound prompts well below this
            raise BackendError(f"text prompt too long for SAM 3 (at most {MAX_PROMPT_TOKENS - 2} tokens)")
        with self._lock:
            missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            # Tokenised outside the model lock (clicks on other images go on meanwhile); a prompt that
            # another thread encoded in between is encoded again, which is harmless.
            tok = self.processor.tokenizer(
                missing, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=False, return_tensors="pt"
            )
            if tok["input_ids"].shape[1] > MAX_PROMPT_TOKENS:
                raise BackendError(f"text prompt too long for SAM 3 (at most {MAX_PROMPT_TOKENS - 2} tokens)")
        with self._lock:  # the cache and the text encoder, together
            if missing:
                ids = tok["input_ids"].to(self.device)
                attn = tok["attention_mask"].to(self.device)
                feats = self.detector.get_text_features(input_ids=ids, attention_mask=attn).pooler_output
                for j, p in enumerate(missing):
                    self._text_cache[p] = (feats[j : j + 1], attn[j : j + 1])
            text = torch.cat([self._text_cache[p][0] for p in prompts])
            attn = torch.cat([self._text_cache[p][1] for p in prompts])
        return text, attn

class Refinements:
    """The low-res logits of recent click answers, by (image, prompt): small (about 330 KB each), LRU."""

    def __init__(self, size: int = 256):
        self._items: LRUCache = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return self._items.get(key)

    def put(self, key, logits: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = logits


def upsample(logits: torch.Tensor, height: int, width: int, mask_threshold: float) -> np.ndarray:
    """Low-res mask logits [N, h, w] -> bool masks [N, H, W] at the original size."""
    n = logits.shape[0]
    out = np.zeros((n, height, width), bool)
    if n == 0:
        return out
    cut = math.log(mask_threshold / (1 - mask_threshold))  # sigmoid(x) > t  <=>  x > logit(t)
    # Chunked so that a large image with many instances stays within bounded memory.
    step = max(1, int(64e6 // (height * width)))
    for i in range(0, n, step):
        up = F.interpolate(logits[None, i : i + step], size=(height, width), mode="bilinear", align_corners=False)
        out[i : i + step] = (up[0] > cut).cpu().numpy()
    return out


def _prompt_key(points, labels, box) -> tuple[tuple, tuple]:
    """(clicks, box), rounded to 1/100 pixel: the clicks' prefixes with the same box are earlier prompts."""
    clicks = tuple((round(float(x), 2), round(float(y), 2), int(v)) for (x, y), v in zip(points, labels))
    return clicks, tuple(round(float(c), 2) for c in box) if box is not None else ()


def _to(t, device, dtype=None):
    if t is None:
        return None
    return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
