"""SAM 3 on video: every instance of every text prompt, detected and tracked frame by frame with stable ids.

`VideoTracker` runs `Sam3VideoModel` in streaming mode on frames handed to it one at a time; it shares
the image engine's detector (and so its ViT) and takes the engine's lock per frame, so an annotator's
click waits for at most one frame. The session keeps what the tracker reads (the last frames' memories,
a few conditioning frames per object) and nothing older: memory stays flat however long the video.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

from ..errors import BackendError
from .engine import MAX_PROMPT_TOKENS

log = logging.getLogger(__name__)

BOX_SIDE = 1024  # masks are upsampled to at most this many pixels a side before their boxes are read
CANDIDATES = 64  # detections per frame (all prompts together) that may start or match a track


class Concept(NamedTuple):
    """What to track: every instance of `prompt`, labelled `label`, kept when its best score reaches
    `threshold`. (Which prompts and thresholds a project uses is the annotation policy's business.)"""

    prompt: str
    label: str
    threshold: float


@dataclass
class Track:
    id: int
    prompt: str
    label: str
    score: float = 0.0  # the best detection score the object had
    boxes: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)  # frame -> percent x0,y0,x1,y1


@dataclass
class Timing:
    frames: int = 0
    vit: float = 0.0  # seconds in the image encoder
    tracking: float = 0.0  # seconds in detection heads, tracker and memory
    decode: float = 0.0  # seconds decoding and resizing frames (outside the model)

    def per_frame(self) -> dict:
        n = max(self.frames, 1)
        return {"frames": self.frames, "vit_s": self.vit / n, "tracking_s": self.tracking / n,
                "decode_s": self.decode / n}


class Cancelled(Exception):
    """Raised by `on_window` to stop between windows."""


class VideoTracker:
    def __init__(self, engine):
        self.engine = engine
        self.model = None
        self._load_lock = threading.Lock()
        self._one_video = threading.Lock()  # the detection thresholds live on the model: one video at a time
        self.held: dict = {}  # what the last session held after its latest frame (frames, memories, objects)

    def load(self) -> "VideoTracker":
        """Loaded on the first video task: projects that label only images never pay for the video heads."""
        with self._load_lock:
            if self.model is None:
                from transformers import Sam3VideoModel

                e = self.engine
                model = Sam3VideoModel.from_pretrained(e.model_id, dtype=e.dtype, **e.load_kwargs)
                model.detector_model = e.detector  # one detector and ViT for images and videos
                # "hitting max_num_objects" every frame once the cap is reached: the cap is ours
                logging.getLogger(type(model).__module__).setLevel(logging.ERROR)
                _bound_candidates(model)
                self._time_vit()
                self.model = model.to(e.device).eval()
                log.info("video tracker loaded from %s", e.model_id)
        return self

    def track(self, frames: Iterable[tuple[int, np.ndarray]], size: tuple[int, int], concepts: list[Concept], *,
              min_frames: int = 3, window: int = 64, max_objects: int = 32,
              on_window: Callable[[int], None] | None = None, timing: Timing | None = None) -> list[Track]:
        """Tracks of every instance of every concept over `frames` ((frame number, RGB) in order), best first, at
        most `max_objects` at once. `size` is the video's (width, height). `on_window(frames done)` runs every
        `window` frames and may raise `Cancelled`."""
        if not concepts:
            return []
        self.load()
        model, timing = self.model, timing or Timing()
        labels, limit = {}, {}  # by prompt: its label, and the score its tracks must reach
        for concept in concepts:
            if concept.prompt not in labels:
                labels[concept.prompt] = concept.label
                limit[concept.prompt] = concept.threshold
        session = self._session(size, labels)
        tracks: dict[int, Track] = {}
        with self._one_video:
            # SAM 3's own rule, moved with the project's threshold: detections above it are candidates, new
            # tracks start 0.2 higher (0.5 and 0.7 by default).
            floor = min(limit.values())
            model.score_threshold_detection = floor
            model.new_det_thresh = min(1.0, floor + 0.2)
            model.max_num_objects = max_objects
            model.candidates_per_prompt = max(4, CANDIDATES // len(labels))
            removed = self._frames(session, frames, _box_size(*size), labels, tracks, window, on_window, timing)
        kept = [t for tid, t in tracks.items()
                if tid not in removed and len(t.boxes) >= min_frames and t.score >= limit[t.prompt]]
        kept.sort(key=lambda t: -t.score)
        return kept[: model.max_num_objects]

    def _session(self, size: tuple[int, int], labels: dict):
        """A streaming session for a video of `size` (width, height), with every prompt tokenized."""
        from transformers import Sam3VideoInferenceSession

        e, (width, height) = self.engine, size
        session = Sam3VideoInferenceSession(
            video_height=height, video_width=width, inference_device=e.device, inference_state_device=e.device,
            video_storage_device=e.device, dtype=e.dtype)
        for prompt in labels:
            pid = session.add_prompt(prompt)
            enc = e.processor.tokenizer(prompt, return_tensors="pt", padding="max_length", max_length=MAX_PROMPT_TOKENS)
            session.prompt_input_ids[pid] = enc.input_ids.to(e.device)
            session.prompt_attention_masks[pid] = enc.attention_mask.to(e.device)
        return session

    def _frames(self, session, frames, box_size, labels, tracks, window, on_window, timing) -> set[int]:
        """Every frame through the model, its visible objects recorded into `tracks`; the ids SAM 3 removed."""
        e, removed, done = self.engine, set(), 0
        t_read = time.perf_counter()
        for number, rgb in frames:
            px = e.processor.image_processor(images=rgb, return_tensors="pt").pixel_values[0].to(e.device, e.dtype)
            timing.decode += time.perf_counter() - t_read
            with e.exclusive(), torch.inference_mode():
                out = self._step(session, px, number - 1, timing)
            removed |= set(out.removed_obj_ids or ())
            hidden = set(out.suppressed_obj_ids or ()) | removed
            self._record(session, out, hidden, number, box_size, labels, tracks)
            self.held = _trim(session, number - 1, self.model)
            done += 1
            timing.frames += 1
            if on_window is not None and done % window == 0:
                on_window(done)
            t_read = time.perf_counter()
        if on_window is not None and done % window:
            on_window(done)
        return removed

    def _step(self, session, px: torch.Tensor, index: int, timing: Timing):
        """One frame through the model (under the engine's lock); the ViT's share of the time is measured apart."""
        self._vit_seconds = 0.0
        t0 = time.perf_counter()
        try:
            out = self.model(inference_session=session, frame=px, frame_idx=index)
        except torch.OutOfMemoryError:
            raise BackendError("out of memory while tracking this video; lower SAM3_VIDEO_MAX_OBJECTS") from None
        timing.vit += self._vit_seconds
        timing.tracking += time.perf_counter() - t0 - self._vit_seconds
        self.engine.vit_passes += 1
        return out

    def _time_vit(self) -> None:
        """Hooks on the shared ViT: they add to `_vit_seconds`, which only a video step reads."""
        encoder = self.engine.detector.vision_encoder
        started = []
        self._vit_seconds = 0.0

        def before(module, args):
            started.append(time.perf_counter())

        def after(module, args, output):
            if started:
                self._vit_seconds += time.perf_counter() - started.pop()

        encoder.register_forward_pre_hook(before)
        encoder.register_forward_hook(after)

    @staticmethod
    def _record(session, out, hidden: set[int], number: int, box_size: tuple[int, int], labels: dict,
                tracks: dict[int, Track]) -> None:
        ids = [i for i in sorted(out.obj_id_to_mask) if i not in hidden]
        if not ids:
            return
        low = torch.cat([out.obj_id_to_mask[i] for i in ids]).float()  # (N, h, w) logits
        bw, bh = box_size
        masks = F.interpolate(low[:, None], size=(bh, bw), mode="bilinear", align_corners=False)[:, 0] > 0
        visible = masks.flatten(1).any(1)
        if not bool(visible.any()):
            return
        boxes = masks_to_boxes(masks[visible]).tolist()
        for obj_id, (x0, y0, x1, y1) in zip([i for i, v in zip(ids, visible.tolist()) if v], boxes):
            prompt = session.prompts[session.obj_id_to_prompt_id[obj_id]]
            t = tracks.get(obj_id)
            if t is None:
                t = tracks[obj_id] = Track(obj_id, prompt, labels[prompt])
            t.score = max(t.score, float(out.obj_id_to_score.get(obj_id, 0.0)))
            # masks_to_boxes gives the last pixel's index; the box ends after it
            t.boxes[number] = (100.0 * x0 / bw, 100.0 * y0 / bh, 100.0 * (x1 + 1) / bw, 100.0 * (y1 + 1) / bh)


def _box_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, BOX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _trim(session, index: int, model) -> dict:
    """Forget what the tracker will not read again: frames before this one, memories older than its memory
    window and object-pointer reach, and conditioning frames beyond the few it attends to (the first, which
    holds the object's detection, and the latest)."""
    cfg = model.tracker_model.config
    reach = max(cfg.num_maskmem, cfg.max_object_pointers_in_encoder) + 1
    keep_cond = max(1, cfg.max_cond_frame_num)
    for key in [k for k in (session.processed_frames or {}) if k < index]:
        del session.processed_frames[key]
    old = index - reach
    for obj in session.output_dict_per_obj.values():
        non_cond = obj["non_cond_frame_outputs"]
        for key in [k for k in non_cond if k < old]:
            del non_cond[key]
        cond = obj["cond_frame_outputs"]
        if len(cond) > keep_cond:
            frames = sorted(cond)
            for key in frames[1: len(frames) - (keep_cond - 1)]:
                del cond[key]
    for per_obj in session.frames_tracked_per_obj.values():
        for key in [k for k in per_obj if k < old]:
            del per_obj[key]
    for per_frame in (session.obj_id_to_tracker_score_frame_wise, session.suppressed_obj_ids):
        for key in [k for k in per_frame if k < old]:
            del per_frame[key]
    horizon = 2 * max(model.hotstart_delay, 1)
    for lists in (session.unmatched_frame_inds, session.overlap_pair_to_frame_inds):
        for key, frames in lists.items():
            if len(frames) > horizon:
                lists[key] = frames[-horizon:]
    outputs = session.output_dict_per_obj.values()
    return {"frames": len(session.processed_frames or ()), "objects": len(session.output_dict_per_obj),
            "memories": sum(len(o["non_cond_frame_outputs"]) + len(o["cond_frame_outputs"]) for o in outputs)}


def _bound_candidates(model) -> None:
    """Keep only each prompt's best `model.candidates_per_prompt` detections of a frame.

    SAM 3's video model compares every detection above the threshold with every other one and with every
    track, as full masks (N x M x 288 x 288 booleans): 200 queries at a low threshold ask for 26 GB. The top
    few per prompt are what can start or match a track anyway, and they cost megabytes.
    """
    import transformers.models.sam3_video.modeling_sam3_video as video_module

    original = video_module.nms_masks
    if getattr(original, "bounded", False):
        return

    def nms_masks(pred_probs, pred_masks, prob_threshold, iou_threshold):
        k = getattr(model, "candidates_per_prompt", CANDIDATES)
        valid = pred_probs > prob_threshold
        if int(valid.sum()) > k:
            ranked = torch.where(valid, pred_probs, torch.full_like(pred_probs, -1.0))
            top = torch.topk(ranked, k).indices
            kept = torch.full_like(pred_probs, -1.0)  # below any threshold: not a candidate
            kept[top] = pred_probs[top]
            pred_probs = kept
        return original(pred_probs, pred_masks, prob_threshold, iou_threshold)

    nms_masks.bounded = True
    video_module.nms_masks = nms_masks
