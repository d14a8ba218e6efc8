"""Clicks and boxes on a large image, answered at native resolution on a crop around the prompt.

SAM 3 sees an image at its input size: on a 6000 x 4000 photo a click's mask is drawn on a grid six times
coarser than the image. A crop of the model's input size around the prompt is seen pixel for pixel. The crop
grows (x GROW, centred on the object so far) while the object reaches one of its edges that is not the image's,
so a large object is still answered whole. Each crop's encoding is cached like a whole image's, and a later
click whose prompt lies well inside a crop already encoded for that image reuses it (and with it the previous
answer, which Label Studio's next click refines).
"""
from __future__ import annotations

import threading

import numpy as np
from cachetools import LRUCache

from .tiling import AUTO_FACTOR

GROW = 2.0
CONTEXT = 1.25  # the first crop is at least this many times the prompt's extent (a box's, or the clicks')
INSIDE = 0.1  # a prompt reuses a crop when it lies this far (of the crop's side) inside its edges
RECENT = 8  # crops remembered per image


def applies(width: int, height: int, model_size: int) -> bool:
    """Crops pay off (a second encoding for a sharper outline) on images over AUTO_FACTOR model inputs."""
    return max(width, height) > AUTO_FACTOR * model_size


class Picture:
    """One image a request is about: its size known without a download when it was seen before; its pixels
    fetched at most once per request, and only when an encoding must be computed."""

    def __init__(self, url: str, ref: str, load, size: tuple[int, int] | None = None):
        self.url, self.ref, self._load = url, ref, load
        self._image, self._size = None, size

    @property
    def image(self):
        if self._image is None:
            self._image = self._load(self.url)
            self._size = self._image.size
        return self._image

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self._size or self.image.size


class Crops:
    def __init__(self, images: int = 1000):
        self._rects: LRUCache = LRUCache(maxsize=images)  # image ref -> recent crop rects, newest last
        self._lock = threading.Lock()

    def segment(self, engine, picture: Picture, points, labels, box, mask_threshold: float):
        """(mask crop, (x, y) of its top-left pixel, score) for one object from pixel-coordinate clicks and/or box."""
        width, height = picture.size
        positive = [p for p, v in zip(points, labels) if v == 1] or list(points)
        xs = [p[0] for p in positive] + ([box[0], box[2]] if box is not None else [])
        ys = [p[1] for p in positive] + ([box[1], box[3]] if box is not None else [])
        extent = (min(xs), min(ys), max(xs), max(ys))
        rect = self._known(engine, picture.ref, extent) or _around(extent, max(
            engine.image_size, CONTEXT * max(extent[2] - extent[0], extent[3] - extent[1])), width, height)
        while True:
            enc = self._encoding(engine, picture, rect)
            x0, y0 = rect[0], rect[1]
            inside = [(i, (x - x0, y - y0)) for i, (x, y) in enumerate(points)
                      if x0 <= x < rect[2] and y0 <= y < rect[3]]
            mask, score = engine.segment(enc, [p for _, p in inside], [labels[i] for i, _ in inside],
                                         None if box is None else (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0),
                                         mask_threshold)
            edges = _cut_edges(mask, rect, width, height)
            whole = rect == (0, 0, width, height)
            if not edges or whole:
                break
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            found = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
            rect = _around(found, GROW * max(rect[2] - rect[0], rect[3] - rect[1]), width, height)
        return mask, (rect[0], rect[1]), score

    def _known(self, engine, ref: str, extent) -> tuple | None:
        """The smallest crop of this image still cached whose inner part holds the prompt."""
        with self._lock:
            rects = list(self._rects.get(ref, ()))
        fits = []
        for rect in rects:
            margin = INSIDE * max(rect[2] - rect[0], rect[3] - rect[1])
            if (rect[0] + margin <= extent[0] and extent[2] <= rect[2] - margin and rect[1] + margin <= extent[1]
                    and extent[3] <= rect[3] - margin and _key(ref, rect) in engine.cache):
                fits.append(rect)
        return min(fits, key=lambda r: (r[2] - r[0]) * (r[3] - r[1]), default=None)

    def _encoding(self, engine, picture: Picture, rect):
        key = _key(picture.ref, rect)
        enc = engine.cache.get(key)
        if enc is None:
            enc = engine.encode(picture.image.crop(rect), key=key)
        with self._lock:
            rects = [r for r in self._rects.get(picture.ref, ()) if r != rect][-(RECENT - 1):]
            self._rects[picture.ref] = rects + [rect]
        return enc


def _key(ref: str, rect) -> str:
    return f"{ref}:crop:{','.join(map(str, rect))}"


def _around(extent, side: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A square of `side` pixels centred on `extent`, moved inside the image (and cut to it where it is smaller)."""
    side = int(round(side))
    cx, cy = (extent[0] + extent[2]) / 2, (extent[1] + extent[3]) / 2
    w, h = min(side, width), min(side, height)
    x0 = int(min(max(round(cx - w / 2), 0), width - w))
    y0 = int(min(max(round(cy - h / 2), 0), height - h))
    return x0, y0, x0 + w, y0 + h


def _cut_edges(mask: np.ndarray, rect, width: int, height: int) -> bool:
    """Does the object reach an edge of the crop that is not an edge of the image?"""
    if not mask.any():
        return False
    return bool((rect[0] > 0 and mask[:, 0].any()) or (rect[1] > 0 and mask[0].any())
                or (rect[2] < width and mask[:, -1].any()) or (rect[3] < height and mask[-1].any()))
