"""Pre-annotation without clicks: every instance of every label, found with text prompts.

The ontology says which prompt finds which label; thresholds say what is kept. `AutoLabeler` runs
images through the engine in chunks: downloads run ahead on threads while the model works, each
chunk's images share one ViT forward, and each image's prompts share one decoder forward.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torchvision.ops import nms

from . import geometry
from .config import parse_bool
from .detections import Detections
from .errors import BackendError
from .labelconfig import LabelConfig
from .wire import number, parse_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    prompt: str
    label: str
    threshold: float | None = None


@dataclass
class Thresholds:
    confidence: float = 0.5  # default minimum score
    per_label: dict[str, float] = field(default_factory=dict)
    max_detections: int = 100  # per image, best first
    min_area: float = 0.0  # pixels; smaller instances are dropped
    nms: bool = True  # across prompts: two prompts finding one object give one region
    nms_iou: float = 0.5

    @classmethod
    def from_dict(cls, data: dict | None, base: "Thresholds | None" = None) -> "Thresholds":
        out = Thresholds(**asdict(base)) if base else Thresholds()
        if not data:
            return out
        if not isinstance(data, dict):
            raise BackendError("thresholds must be an object")
        names = {"confidence", "per_label", "max_detections", "min_area", "nms", "nms_iou"}
        unknown = set(data) - names
        if unknown:
            raise BackendError(f"unknown threshold setting(s) {sorted(unknown)}; known: {sorted(names)}")
        for key, value in data.items():
            if key == "per_label":
                if not isinstance(value, dict) or len(value) > 1000:
                    raise BackendError("thresholds.per_label must map labels to numbers")
                out.per_label = {str(k): number(v, f"thresholds.per_label[{str(k)[:50]!r}]")
                                 for k, v in value.items()}
            elif key == "nms":
                try:
                    out.nms = parse_bool(value, "thresholds.nms")
                except ValueError as e:
                    raise BackendError(str(e)[:200]) from None
            elif key == "max_detections":
                v = number(value, "thresholds.max_detections")
                if v != int(v) or not 1 <= v <= 1000:
                    raise BackendError("thresholds.max_detections must be a whole number from 1 to 1000")
                out.max_detections = int(v)
            else:
                setattr(out, key, number(value, f"thresholds.{key}"))
        for name, v in [("confidence", out.confidence), ("nms_iou", out.nms_iou), *out.per_label.items()]:
            if not 0 <= v <= 1:
                raise BackendError(f"threshold {name[:50]} = {v} must be between 0 and 1")
        if out.min_area < 0:
            raise BackendError("thresholds.min_area must not be negative")
        return out

    def for_label(self, label: str, entry_threshold: float | None) -> float:
        if entry_threshold is not None:
            return entry_threshold
        return self.per_label.get(label, self.confidence)


def parse_ontology(spec, config: LabelConfig, max_entries: int = 256, max_chars: int = 200) -> list[Entry]:
    """Ontology in Roboflow Auto Label's formats, else `predicted_values` synonyms, else the labels.

    - {"a red car": "car", ...}            prompt -> label
    - ["car", "person"]                    each both prompt and label
    - [{"prompt", "label", "threshold"}]   with an optional per-prompt threshold
    """
    if isinstance(spec, str) and spec.strip():
        spec = parse_json(spec, "ontology")
    if isinstance(spec, (dict, list)) and len(spec) > max_entries:
        raise BackendError(f"ontology has {len(spec)} entries; at most {max_entries} (SAM3_MAX_ONTOLOGY)")
    entries: list[Entry] = []
    if not spec:
        for control in config.outputs:
            for label in control.labels:
                for prompt in [label, *control.synonyms.get(label, [])]:
                    entries.append(Entry(prompt, label))
    elif isinstance(spec, dict):
        if not all(isinstance(lbl, str) for lbl in spec.values()):
            raise BackendError("ontology maps prompts to label names (strings)")
        entries = [Entry(p, lbl) for p, lbl in spec.items()]
    elif isinstance(spec, list):
        for i, item in enumerate(spec):
            if isinstance(item, str):
                entries.append(Entry(item, item))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"]:
                th = item.get("threshold")
                th = None if th is None else number(th, f"ontology[{i}].threshold")
                label = item.get("label") or item["prompt"]
                if not isinstance(label, str):
                    raise BackendError(f"ontology[{i}].label must be a string")
                entries.append(Entry(item["prompt"], label, th))
            else:
                raise BackendError(f"ontology[{i}] must be a string or an object with a 'prompt'")
    else:
        raise BackendError("ontology must be an object (prompt -> label), a list of strings or a list of objects")
    valid = set(config.labels)
    bad = sorted({e.label for e in entries} - valid)
    if bad:
        raise BackendError(f"ontology names label(s) {[b[:50] for b in bad[:10]]} that the label config does not "
                           f"have; valid labels: {', '.join(config.labels)}")
    for e in entries:
        if not e.prompt.strip():
            raise BackendError("ontology has an empty prompt")
        if len(e.prompt) > max_chars:
            raise BackendError(f"ontology prompt {e.prompt[:50]!r}... is longer than {max_chars} characters")
        if e.threshold is not None and not 0 <= e.threshold <= 1:
            raise BackendError(f"threshold for prompt {e.prompt!r} must be between 0 and 1")
    return list(dict.fromkeys(entries))


EXTRA_KEYS = ("ontology", "thresholds")


def split_extra(spec) -> tuple[object, dict | None]:
    """(ontology, thresholds) from an ontology in any documented form: bare (Roboflow's three formats)
    or wrapped as in extra params, `{"ontology": ..., "thresholds": ...}`; JSON text or parsed."""
    if isinstance(spec, str):
        spec = parse_json(spec, "ontology") if spec.strip() else None
    if isinstance(spec, dict) and spec and set(spec) <= set(EXTRA_KEYS) and not isinstance(spec.get("ontology"), str):
        return spec.get("ontology"), spec.get("thresholds")
    return spec, None


def fingerprint(entries: list[Entry], thresholds: Thresholds, output: dict | None = None) -> str:
    """What decides a prediction beyond the weights: the ontology, the thresholds and `output` (the output
    controls and the settings that shape their regions)."""
    blob = json.dumps([[asdict(e) for e in entries], asdict(thresholds), output or {}], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:6]


@dataclass
class Stages:
    """Seconds spent per stage (for the benchmark and the logs)."""

    fetch: float = 0.0  # waiting for downloads and decoding (time the model sat idle)
    encode: float = 0.0
    decode: float = 0.0
    post: float = 0.0
    regions: float = 0.0  # masks -> Label Studio regions (jobs)
    upload: float = 0.0  # posting predictions to Label Studio (jobs)
    images: int = 0

    def add(self, name: str, seconds: float) -> None:
        setattr(self, name, getattr(self, name) + seconds)


class AutoLabeler:
    def __init__(self, engine, entries: list[Entry], thresholds: Thresholds, mask_threshold: float = 0.5,
                 chunk: int = 4):
        self.engine = engine
        self.entries = entries
        self.thresholds = thresholds
        self.mask_threshold = mask_threshold
        self.chunk = chunk  # images per ViT forward
        self.stages = Stages()

    def label(self, enc, entries: list[Entry] | None = None, exemplars=()) -> Detections:
        """Every instance on one encoded image, labelled, thresholded, de-duplicated, best first
        (`exemplars`: boxes the instances should look like, or not; see `Sam3Engine.detect`)."""
        t0 = time.perf_counter()
        entries = self.entries if entries is None else entries
        prompts = list(dict.fromkeys(e.prompt for e in entries))
        # The lowest threshold any entry of a prompt uses, so the engine upsamples only what may be kept.
        floor = min(self.thresholds.for_label(e.label, e.threshold) for e in entries)
        found = dict(zip(prompts, self.engine.detect(enc, prompts, floor, self.mask_threshold,
                                                     self.thresholds.max_detections, exemplars)))
        t1 = time.perf_counter()
        masks, scores, labels = [], [], []
        for e in entries:
            d = found[e.prompt]
            th = self.thresholds.for_label(e.label, e.threshold)
            for m, s in zip(d.masks, d.scores):
                if s >= th and m.sum() >= max(self.thresholds.min_area, 1):
                    masks.append(m)
                    scores.append(float(s))
                    labels.append(e.label)
        dets = self._select(masks, scores, labels, enc.height, enc.width)
        self.stages.add("decode", t1 - t0)
        self.stages.add("post", time.perf_counter() - t1)
        return dets

    def _select(self, masks, scores, labels, height, width) -> Detections:
        if not masks:
            return Detections.empty(height, width)
        order = np.argsort(-np.asarray(scores), kind="stable")
        if self.thresholds.nms and len(masks) > 1:
            boxes = torch.tensor([geometry.mask_to_box(m) for m in masks], dtype=torch.float32)
            keep = nms(boxes, torch.tensor(scores, dtype=torch.float32), self.thresholds.nms_iou).numpy()
            order = keep  # nms returns indices sorted by decreasing score
        order = order[: self.thresholds.max_detections]
        return Detections(np.stack([masks[i] for i in order]), np.array([scores[i] for i in order]),
                          [labels[i] for i in order])

    def run(
        self,
        items: Iterable,
        load: Callable[[object], object],
        chunk: int | None = None,
        prefetch: int = 16,
        workers: int = 8,
        entries_for: Callable[[object], list[Entry]] | None = None,
        deadline: float | None = None,
    ) -> Iterator[tuple[object, object, Detections | None, Exception | None]]:
        """(item, image, detections, error) for each item, in input order.

        `load(item)` fetches and decodes an image on a worker thread, once per item; up to `prefetch`
        loads run ahead of the model, so slow image servers overlap with compute. A failed load yields
        its error, not a crash. `entries_for(item)` picks the ontology entries for an item (default all).
        With a `deadline` (time.monotonic()), it stops before a chunk that would end past it at the pace so far:
        the items not yielded are the caller's to hand on.
        """
        items = list(items)
        chunk = chunk or self.chunk
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sam3-fetch")
        started = time.monotonic()
        try:
            futures = {}
            submitted = 0
            for start in range(0, len(items), chunk):
                if deadline is not None and start:
                    # At the pace so far, would this chunk end past the deadline? Then it is not started.
                    per_item = (time.monotonic() - started) / start
                    if time.monotonic() + per_item * min(chunk, len(items) - start) > deadline:
                        return
                while submitted < min(start + chunk + prefetch, len(items)):
                    futures[submitted] = pool.submit(load, items[submitted])
                    submitted += 1
                batch = list(range(start, min(start + chunk, len(items))))
                t0 = time.perf_counter()
                images, errors = {}, {}
                for j in batch:
                    try:
                        images[j] = futures.pop(j).result()
                    except Exception as e:  # reported per task
                        errors[j] = e
                self.stages.add("fetch", time.perf_counter() - t0)
                t1 = time.perf_counter()
                by_index = self._encode(images, errors)
                self.stages.add("encode", time.perf_counter() - t1)
                for j in batch:
                    if j in errors:
                        yield items[j], images.get(j), None, errors[j]
                        continue
                    try:
                        dets = self.label(by_index[j], entries_for(items[j]) if entries_for else None)
                    except Exception as e:
                        log.exception("labelling item %s failed", j)
                        yield items[j], images[j], None, e
                        continue
                    self.stages.images += 1
                    yield items[j], images[j], dets, None
        finally:  # stopped early (deadline, the caller stopped reading): downloads not yet started are dropped
            pool.shutdown(wait=False, cancel_futures=True)

    def _encode(self, images: dict, errors: dict) -> dict:
        """Encodings by index: one batched ViT pass, or, when that fails (out of memory, one bad image),
        one image at a time, so that only the images that fail alone fail."""
        if not images:
            return {}
        try:
            return dict(zip(images, self.engine.encode_many(list(images.values()))))
        except Exception as e:
            if len(images) == 1:
                errors.update({j: e for j in images})
                return {}
            log.warning("batch encode of %d images failed (%s: %s); encoding one at a time", len(images),
                        type(e).__name__, e)
        out = {}
        for j, image in images.items():
            try:
                out[j] = self.engine.encode_many([image])[0]
            except Exception as e:
                errors[j] = e
        return out


def group_by_label(dets: Detections) -> dict[str, Detections]:
    idx = defaultdict(list)
    for i, label in enumerate(dets.labels):
        idx[label].append(i)
    return {
        label: Detections(dets.masks[ix], dets.scores[ix], [label] * len(ix)) for label, ix in idx.items()
    }
