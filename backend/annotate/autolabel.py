"""Pre-annotation without clicks: every instance of every label, found with text prompts.

The ontology says which prompt finds which label; thresholds say what is kept (`ontology`). `AutoLabeler`
runs images through the engine in chunks: downloads run ahead on threads while the model works, each
chunk's images share one ViT forward, and each image's prompts share one decoder forward.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torchvision.ops import nms

from ..errors import BackendError
from ..sam3.detections import Detections
from . import geometry
from .ontology import Entry, Thresholds
from .tiling import Tiler, Tiling

log = logging.getLogger(__name__)


@dataclass
class Stages:
    """Seconds spent per stage (for the benchmark and the logs)."""

    fetch: float = 0.0  # waiting for downloads and decoding (time the model sat idle)
    encode: float = 0.0
    decode: float = 0.0
    select: float = 0.0  # thresholds, NMS and the cap on detections (not posting: that is "upload")
    regions: float = 0.0  # masks -> Label Studio regions (jobs)
    upload: float = 0.0  # posting predictions to Label Studio (jobs)
    images: int = 0

    def add(self, name: str, seconds: float) -> None:
        setattr(self, name, getattr(self, name) + seconds)


class AutoLabeler:
    def __init__(self, engine, entries: list[Entry], thresholds: Thresholds, mask_threshold: float = 0.5,
                 chunk: int = 4, tiling: Tiling | None = None):
        self.engine = engine
        self.entries = entries
        self.thresholds = thresholds
        self.mask_threshold = mask_threshold
        self.chunk = chunk  # images per ViT forward
        self.tiling = tiling or Tiling()
        self.stages = Stages()

    def label(self, enc, entries: list[Entry] | None = None, exemplars=(), image=None) -> Detections:
        """Every instance on one encoded image, labelled, thresholded, de-duplicated, best first
        (`exemplars`: boxes the instances should look like, or not; see `Sam3Engine.detect`). With the decoded
        `image`, a large one is also looked at tile by tile when the project tiles (`detect`)."""
        entries = self.entries if entries is None else entries
        # The lowest threshold any entry of a prompt uses, so the engine upsamples only what may be kept.
        floor = min(self.thresholds.for_label(e.label, e.threshold) for e in entries)
        found = self.detect(enc, entries, floor, exemplars, image)
        return self.select(found, entries, self.thresholds, enc.height, enc.width)

    def detect(self, enc, entries: list[Entry], floor: float, exemplars=(), image=None) -> dict[str, Detections]:
        """Each distinct prompt's instances scoring above `floor` (at most max_detections each, per tile when
        tiled), in one forward per image or tile. Tiled when `image` is given, the project tiles and the image is
        large enough (`tiling.Tiling.grid`); exemplar boxes are drawn on the whole image, so they are not tiled."""
        t0 = time.perf_counter()
        prompts = list(dict.fromkeys(e.prompt for e in entries))
        grid = None
        if image is not None and not exemplars and self.tiling.mode != "off":
            grid = self.tiling.grid(enc.width, enc.height, self.engine.image_size)
        if grid:
            found = Tiler(self.engine, self.tiling, self.mask_threshold, self.thresholds.max_detections,
                          self.chunk).detect(enc, image, grid, prompts, floor)
        else:
            found = dict(zip(prompts, self.engine.detect(enc, prompts, floor, self.mask_threshold,
                                                         self.thresholds.max_detections, exemplars)))
        self.stages.add("decode", time.perf_counter() - t0)
        return found

    def select(self, found: dict[str, Detections], entries: list[Entry], thresholds: Thresholds, height: int,
               width: int) -> Detections:
        """What `thresholds` keep of `found`: each entry's instances above its threshold and `min_area`, labelled
        with its label, then (with `nms`) duplicates across prompts suppressed, best first, at most
        `max_detections`."""
        t0 = time.perf_counter()
        picks = []  # (detections, index, label)
        for e in entries:
            d = found[e.prompt]
            th = thresholds.for_label(e.label, e.threshold)
            picks += [(d, i, e.label) for i, s in enumerate(d.scores)
                      if s >= th and d.masks[i].sum() >= max(thresholds.min_area, 1)]
        dets = self._best(picks, height, width, thresholds)
        self.stages.add("select", time.perf_counter() - t0)
        return dets

    @staticmethod
    def _best(picks: list, height: int, width: int, thresholds: Thresholds) -> Detections:
        if not picks:
            return Detections.empty(height, width)
        scores = [float(d.scores[i]) for d, i, _ in picks]
        order = np.argsort(-np.asarray(scores), kind="stable")
        if thresholds.nms and len(picks) > 1:
            boxes = torch.tensor([d.box(i) for d, i, _ in picks], dtype=torch.float32)
            keep = nms(boxes, torch.tensor(scores, dtype=torch.float32), thresholds.nms_iou).numpy()
            order = keep  # nms returns indices sorted by decreasing score
        chosen = [picks[k] for k in order[: thresholds.max_detections]]
        masks, labels = [d.masks[i] for d, i, _ in chosen], [label for _, _, label in chosen]
        kept = np.array([scores[k] for k in order[: thresholds.max_detections]])
        if any(d.sparse for d, _, _ in chosen):
            return Detections(masks, kept, labels, [d.origin(i) for d, i, _ in chosen], (height, width))
        return Detections(np.stack(masks), kept, labels)

    PREFETCH = 16  # loads that may run ahead of the model
    PREFETCH_TILED = 2  # when the project tiles: its images are large, and each keeps the model busy for long
    FETCH_THREADS = 8

    def run(
        self,
        items: Iterable,
        load: Callable[[object], object],
        entries_for: Callable[[object], list[Entry]] | None = None,
        deadline: float | None = None,
        measure: Callable | None = None,
    ) -> Iterator[tuple[object, object, Detections | None, Exception | None]]:
        """(item, image, detections, error) for each item, in input order.

        `measure(enc, entries, image)` replaces `label` (what an evaluation records of an image instead of its
        regions).

        `load(item)` fetches and decodes an image on a worker thread, once per item; up to PREFETCH loads run
        ahead of the model, so slow image servers overlap with compute. A failed load yields
        its error, not a crash. `entries_for(item)` picks the ontology entries for an item (default all).
        With a `deadline` (time.monotonic()), it stops before a chunk that would end past it at the pace so far:
        the items not yielded are the caller's to hand on.
        """
        items = list(items)
        chunk = self.chunk
        pool = ThreadPoolExecutor(max_workers=self.FETCH_THREADS, thread_name_prefix="sam3-fetch")
        started, futures, submitted = time.monotonic(), {}, 0
        try:
            for start in range(0, len(items), chunk):
                if deadline is not None and start:
                    # At the pace so far, would this chunk end past the deadline? Then it is not started.
                    per_item = (time.monotonic() - started) / start
                    if time.monotonic() + per_item * min(chunk, len(items) - start) > deadline:
                        return
                ahead = self.PREFETCH if self.tiling.mode == "off" else self.PREFETCH_TILED
                while submitted < min(start + chunk + ahead, len(items)):
                    futures[submitted] = pool.submit(load, items[submitted])
                    submitted += 1
                batch = range(start, min(start + chunk, len(items)))
                yield from self._chunk([(items[j], futures.pop(j)) for j in batch], entries_for, measure or self._label)
        finally:  # stopped early (deadline, the caller stopped reading): downloads not yet started are dropped
            pool.shutdown(wait=False, cancel_futures=True)

    def _chunk(self, loading: list, entries_for, measure) -> Iterator[tuple]:
        """One chunk: its images awaited, encoded in one ViT forward, then each labelled with its entries."""
        t0 = time.perf_counter()
        images, errors = {}, {}
        for j, (_, future) in enumerate(loading):
            try:
                images[j] = future.result()
            except Exception as e:  # reported per task
                errors[j] = e
        self.stages.add("fetch", time.perf_counter() - t0)
        t1 = time.perf_counter()
        by_index = self._encode(images, errors)
        self.stages.add("encode", time.perf_counter() - t1)
        for j, (item, _) in enumerate(loading):
            if j in errors:
                yield item, images.get(j), None, errors[j]
                continue
            try:
                dets = measure(by_index[j], entries_for(item) if entries_for else None, images[j])
            except BackendError as e:  # a rule the item breaks (too many tiles): reported per task, no traceback
                yield item, images[j], None, e
                continue
            except Exception as e:
                log.exception("labelling item %s failed", item)
                yield item, images[j], None, e
                continue
            self.stages.images += 1
            yield item, images[j], dets, None

    def _label(self, enc, entries, image) -> Detections:
        return self.label(enc, entries, image=image)

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
