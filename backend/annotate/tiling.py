"""Small objects in big images: one pass over the whole image (for large objects) plus overlapping tiles at native
resolution (for small ones), as SAHI does, merged so that every object is one region.

SAM 3 sees every image at its input size (1008 x 1008): a 6000 x 4000 photo is shrunk six times and a 30 px car
becomes 5 px. A tile of the model's input size is seen at native resolution.

Merging, per prompt (`Tiler.merge`):
- two detections from different tiles are one object when, inside the area the two tiles share, their masks
  overlap at IoU >= `merge_iou` (an object cut by one tile's edge is whole, or cut elsewhere, in its
  neighbour; both see the same pixels where the tiles overlap); the object is the union of its pieces;
- a group of tile detections and a whole-image detection with IoU >= `merge_iou` are one object, kept at the
  tiles' native resolution; a group cut by a tile edge that lies mostly (>= `merge_iou` of it) inside a
  whole-image detection is a piece of that detection and is dropped; a whole-image detection that is mostly
  (>= `merge_iou` of it) made of objects the tiles see whole is those objects blurred together, and is dropped.
Objects must fit inside the overlap to be seen whole by some tile: the overlap in pixels is the size of the
largest object the tiles see uncut (larger ones are joined from pieces or come from the whole-image pass).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import BackendError
from ..sam3.detections import Detections
from ..validate import number

AUTO_FACTOR = 2.0  # "auto" tiles an image whose long side exceeds this many model inputs (2016 px for SAM 3)
FULL_PASS_SIDE = 2048  # the whole-image pass's masks are drawn at most this large, then scaled to the image
TILE_RANGE = (64, 16384)  # pixels, an explicit tile's side
OVERLAP_RANGE = (0.05, 0.5)  # of the tile; without overlap an object cut by an edge could not be joined


@dataclass(frozen=True)
class Tiling:
    """`off`; `auto` (tiles of the model's input size when the image's long side exceeds AUTO_FACTOR inputs); or
    `fixed` tiles of `tile` pixels overlapping by `overlap` of a tile, when the image is larger than one tile."""

    mode: str = "off"
    tile: int = 0  # fixed: the side in original pixels; auto: the model's input size
    overlap: float = 0.2
    merge_iou: float = 0.5
    max_tiles: int = 256  # a limit, not part of what is predicted (`spec`)

    @classmethod
    def parse(cls, value, merge_iou: float = 0.5, max_tiles: int = 256, what: str = "tiling") -> "Tiling":
        """From extra params ("off", "auto", {"tile": 1008, "overlap": 0.2}, optionally with "merge_iou"), the
        env ("off", "auto", "1008:0.2", "1008") or a job's record (`spec`)."""
        if value is None or value == "" or value is False:
            return cls("off", merge_iou=merge_iou, max_tiles=max_tiles)
        form = f"{what} must be \"off\", \"auto\", \"TILE:OVERLAP\" or {{\"tile\": pixels, \"overlap\": fraction}}"
        mode, tile, overlap = "fixed", None, 0.2
        if isinstance(value, dict):
            unknown = sorted(str(k)[:30] for k in set(value) - {"mode", "tile", "overlap", "merge_iou"})
            if unknown:
                raise BackendError(f"{form}; unknown key(s) {unknown}")
            mode = value.get("mode", "fixed")
            tile, overlap = value.get("tile"), value.get("overlap", 0.2)
            merge_iou = number(value.get("merge_iou", merge_iou), f"{what} merge_iou")
            if mode not in ("off", "auto", "fixed") or (mode == "fixed" and tile is None):
                raise BackendError(form)
        elif isinstance(value, str) and value.strip().lower() in ("off", "auto"):
            mode = value.strip().lower()
        elif isinstance(value, str):
            tile, _, overlap = value.strip().partition(":")
            overlap = overlap or 0.2
        else:
            raise BackendError(form)
        if not 0 < merge_iou <= 1:
            raise BackendError(f"{what} merge_iou must be above 0 and at most 1")
        if mode == "off":
            return cls("off", merge_iou=merge_iou, max_tiles=max_tiles)
        overlap = number(overlap, f"{what} overlap")
        if not OVERLAP_RANGE[0] <= overlap <= OVERLAP_RANGE[1]:
            raise BackendError(f"{what} overlap must be from {OVERLAP_RANGE[0]} to {OVERLAP_RANGE[1]} of a tile "
                               "(objects cut by a tile's edge are joined where tiles overlap)")
        if mode == "auto":
            return cls("auto", 0, overlap, merge_iou, max_tiles)
        tile = number(tile, f"{what} tile")
        if tile != int(tile) or not TILE_RANGE[0] <= tile <= TILE_RANGE[1]:
            raise BackendError(f"{what} tile must be a whole number of pixels from {TILE_RANGE[0]} to {TILE_RANGE[1]}")
        return cls("fixed", int(tile), overlap, merge_iou, max_tiles)

    def spec(self) -> dict:
        """What changes predictions, as a job records it (`parse` reads it back); not the tile cap, a limit."""
        if self.mode == "off":
            return {"mode": "off"}
        return {"mode": self.mode, "tile": self.tile, "overlap": self.overlap, "merge_iou": self.merge_iou}

    def grid(self, width: int, height: int, model_size: int) -> list[tuple[int, int, int, int]] | None:
        """The tiles (x0, y0, x1, y1) that cover a `width` x `height` image, or None when it is not tiled.
        BackendError (413) when it would take more than `max_tiles`."""
        if self.mode == "off" or (self.mode == "auto" and max(width, height) <= AUTO_FACTOR * model_size):
            return None
        tile = self.tile or model_size
        if width <= tile and height <= tile:
            return None
        xs, ys = _axis(width, tile, self.overlap), _axis(height, tile, self.overlap)
        if len(xs) * len(ys) > self.max_tiles:
            raise BackendError(f"a {width} x {height} image takes {len(xs) * len(ys)} tiles of {tile} px; at most "
                               f"{self.max_tiles} (SAM3_MAX_TILES): raise it, or use larger tiles", 413)
        return [(x0, y0, x1, y1) for y0, y1 in ys for x0, x1 in xs]


def _axis(length: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """Evenly spaced spans of `tile` covering 0..length, neighbours overlapping by at least `overlap` of a tile."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - tile) / (tile * (1 - overlap))) + 1
    starts = [round(i * (length - tile) / (n - 1)) for i in range(n)]
    return [(s, s + tile) for s in starts]


@dataclass
class Piece:
    """One tile's detection: its mask cropped to its box, placed at `x`, `y` on the image."""

    mask: np.ndarray
    x: int
    y: int
    score: float
    tile: int  # index in the grid
    cut: bool  # touches an edge of its tile that is not the image's edge

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.mask.shape[1], self.y + self.mask.shape[0]


class Tiler:
    """The detections of each prompt on one large image: the whole-image pass on its (cached) encoding, then the
    tiles, encoded `batch` at a time and not cached (each is seen once), then merged (module docstring)."""

    def __init__(self, engine, tiling: Tiling, mask_threshold: float, max_keep: int, batch: int = 1):
        self.engine, self.tiling = engine, tiling
        self.mask_threshold, self.max_keep, self.batch = mask_threshold, max_keep, max(1, batch)
        self.tiles_seen = 0

    def detect(self, enc, image, grid: list[tuple[int, int, int, int]], prompts: list[str],
               floor: float) -> dict[str, Detections]:
        width, height = enc.width, enc.height
        scale = min(1.0, FULL_PASS_SIDE / max(width, height))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        whole = self.engine.detect(enc, prompts, floor, self.mask_threshold, self.max_keep, size=size)
        whole = {p: _to_image(d, scale, width, height) for p, d in zip(prompts, whole)}
        pieces: dict[str, list[Piece]] = {p: [] for p in prompts}
        for start in range(0, len(grid), self.batch):
            boxes = grid[start:start + self.batch]
            crops = [image.crop(b) for b in boxes]
            encs = self.engine.encode_many(crops, [f"tile{start + k}" for k in range(len(boxes))], cache=False)
            for k, (box, tenc) in enumerate(zip(boxes, encs)):
                found = self.engine.detect(tenc, prompts, floor, self.mask_threshold, self.max_keep)
                for p, d in zip(prompts, found):
                    pieces[p] += _pieces(d, box, start + k, width, height)
            self.tiles_seen += len(boxes)
        return {p: self.merge(whole[p], pieces[p], grid, width, height) for p in prompts}

    def merge(self, whole: Detections, pieces: list[Piece], grid, width: int, height: int) -> Detections:
        """One prompt's objects: tile pieces joined into objects, then matched with the whole-image detections."""
        groups = _join(pieces, grid, self.tiling.merge_iou)
        objects = [_union([pieces[i] for i in g]) for g in groups]  # (mask, x, y, score, cut)
        keep_whole = np.ones(len(whole), bool)
        keep_obj = np.ones(len(objects), bool)
        for j in range(len(whole)):
            wbox, explained = whole.box(j), 0
            for k, (mask, x, y, score, cut) in enumerate(objects):
                if not keep_obj[k] or not _meet(wbox, (x, y, x + mask.shape[1], y + mask.shape[0])):
                    continue
                inter, union = _overlap(mask, x, y, whole.masks[j], *whole.origin(j))
                if union and inter / union >= self.tiling.merge_iou:  # one object: the tiles' sharper view
                    keep_whole[j] = False
                    objects[k] = (mask, x, y, max(score, float(whole.scores[j])), cut)
                elif cut and inter >= self.tiling.merge_iou * mask.sum():  # a piece of the whole-image object
                    keep_obj[k] = False
                elif not cut:
                    explained += inter
            if explained >= self.tiling.merge_iou * whole.masks[j].sum():
                keep_whole[j] = False  # objects the tiles see whole, blurred into one at the whole image's scale
        kept = [o for o, keep in zip(objects, keep_obj) if keep]
        found = Detections([o[0] for o in kept], np.array([o[3] for o in kept], np.float32), [""] * len(kept),
                           np.array([(o[1], o[2]) for o in kept]).reshape(-1, 2), (height, width))
        return Detections.concat([whole[np.flatnonzero(keep_whole)], found], height, width)


def _to_image(d: Detections, scale: float, width: int, height: int) -> Detections:
    """Whole-image detections drawn at `scale`, each scaled to the image's pixels within its own box."""
    if scale == 1.0:
        return Detections.concat([d], height, width)
    masks, origins = [], []
    for i in range(len(d)):
        box = d.box(i)
        if box is None:
            masks.append(np.zeros((0, 0), bool))
            origins.append((0, 0))
            continue
        x0, y0 = math.floor(box[0] / scale), math.floor(box[1] / scale)
        x1, y1 = min(width, math.ceil(box[2] / scale)), min(height, math.ceil(box[3] / scale))
        small = d.masks[i][box[1]:box[3], box[0]:box[2]].astype(np.uint8) * 255
        masks.append(cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR) > 127)
        origins.append((x0, y0))
    return Detections(masks, d.scores, d.labels, np.array(origins).reshape(-1, 2), (height, width))


def _pieces(d: Detections, box, tile: int, width: int, height: int) -> list[Piece]:
    x0, y0, x1, y1 = box
    out = []
    for i in range(len(d)):
        b = d.box(i)
        if b is None:
            continue
        bx0, by0, bx1, by1 = b
        cut = ((bx0 == 0 and x0 > 0) or (by0 == 0 and y0 > 0) or (bx1 == x1 - x0 and x1 < width)
               or (by1 == y1 - y0 and y1 < height))
        out.append(Piece(d.masks[i][by0:by1, bx0:bx1], x0 + bx0, y0 + by0, float(d.scores[i]), tile, cut))
    return out


def _meet(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _overlap(a: np.ndarray, ax: int, ay: int, b: np.ndarray, bx: int, by: int, within=None) -> tuple[int, int]:
    """(intersection, union) in pixels of two placed masks, counted inside `within` (x0, y0, x1, y1) if given.
    Only the boxes' common window is drawn: a large whole-image object costs its overlap with each piece."""
    big = (-1 << 40, -1 << 40, 1 << 40, 1 << 40)
    w = within or big
    both = (max(ax, bx, w[0]), max(ay, by, w[1]), min(ax + a.shape[1], bx + b.shape[1], w[2]),
            min(ay + a.shape[0], by + b.shape[0], w[3]))
    inter = 0
    if both[0] < both[2] and both[1] < both[3]:
        inter = int((_placed(a, ax, ay, *both) & _placed(b, bx, by, *both)).sum())
    return inter, _count(a, ax, ay, w) + _count(b, bx, by, w) - inter


def _count(m: np.ndarray, mx: int, my: int, w) -> int:
    """Pixels of mask `m` placed at (mx, my) inside the window `w`."""
    x0, y0 = max(w[0] - mx, 0), max(w[1] - my, 0)
    x1, y1 = min(w[2] - mx, m.shape[1]), min(w[3] - my, m.shape[0])
    return int(m[y0:y1, x0:x1].sum()) if x0 < x1 and y0 < y1 else 0


def _placed(m: np.ndarray, mx: int, my: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Mask `m` placed at (mx, my), seen through the window x0..x1, y0..y1."""
    out = np.zeros((y1 - y0, x1 - x0), bool)
    sx0, sy0 = max(x0, mx), max(y0, my)
    sx1, sy1 = min(x1, mx + m.shape[1]), min(y1, my + m.shape[0])
    if sx0 < sx1 and sy0 < sy1:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = m[sy0 - my:sy1 - my, sx0 - mx:sx1 - mx]
    return out


def _join(pieces: list[Piece], grid, merge_iou: float) -> list[list[int]]:
    """Pieces of one object, as groups of indices: pieces from different tiles whose masks agree (IoU >=
    `merge_iou`) inside the area their two tiles share, joined transitively."""
    parent = list(range(len(pieces)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    boxes = np.array([p.box for p in pieces]).reshape(-1, 4)
    for i, a in enumerate(pieces):
        near = np.flatnonzero((boxes[i + 1:, 0] < boxes[i, 2]) & (boxes[i, 0] < boxes[i + 1:, 2])
                              & (boxes[i + 1:, 1] < boxes[i, 3]) & (boxes[i, 1] < boxes[i + 1:, 3])) + i + 1
        for j in near:
            b = pieces[j]
            if b.tile == a.tile or root(i) == root(j):
                continue
            ta, tb = grid[a.tile], grid[b.tile]
            shared = (max(ta[0], tb[0]), max(ta[1], tb[1]), min(ta[2], tb[2]), min(ta[3], tb[3]))
            inter, union = _overlap(a.mask, a.x, a.y, b.mask, b.x, b.y, within=shared)
            if union and inter / union >= merge_iou:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _union(group: list[Piece]) -> tuple[np.ndarray, int, int, float, bool]:
    """The object a group of pieces makes: their union, the best score, and whether it is still cut (no piece of
    it was seen whole by its tile)."""
    x0, y0 = min(p.x for p in group), min(p.y for p in group)
    x1, y1 = max(p.box[2] for p in group), max(p.box[3] for p in group)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for p in group:
        mask[p.y - y0:p.box[3] - y0, p.x - x0:p.box[2] - x0] |= p.mask
    return mask, x0, y0, max(p.score for p in group), all(p.cut for p in group)
