"""Masks to Label Studio geometry (polygons, brush RLE, boxes) in percent of the original image.

Polygons trace the outline of the mask's pixel squares (not the centres of its border pixels), so
rasterising a polygon by pixel centres gives the mask back. A piece with holes is one polygon: each hole is
joined to the ring around it by a zero-width cut (a "keyhole"), the hole wound opposite to its outer ring,
so the polygon fills to the mask with its holes under both the even-odd and the non-zero rule (Label
Studio's canvas, COCO and YOLO exports alike).
"""
from __future__ import annotations

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle


def _signed_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _edge_points(contour: np.ndarray) -> np.ndarray:
    """A contour traced on the 2x-upsampled, 1-pixel-bordered crop -> points on the original pixel edges.

    2x index k (after the border) is the centre of a half-pixel cell on the rim, (k - 1 + 0.5) / 2 = i + 0.25
    next to a left/top edge at i, or i + 0.75 next to a right/bottom edge at i + 1: rounding moves each
    point onto the pixel edge it belongs to."""
    pts = np.round((contour.reshape(-1, 2).astype(np.float64) - 0.5) / 2.0)
    return pts[np.any(pts != np.roll(pts, 1, axis=0), axis=1)]  # drop repeats made by rounding


def _simplify(pts: np.ndarray, area: float, tolerance: float) -> np.ndarray:
    """Douglas-Peucker at `tolerance` pixels, capped at 7% of the ring's mean thickness (area / perimeter):
    its chords stray about 0.3 x tolerance from the outline, so small shapes keep theirs (loss < 2%)."""
    if tolerance <= 0 or len(pts) < 4:
        return pts
    contour = pts.astype(np.float32).reshape(-1, 1, 2)
    tol = min(tolerance, 0.07 * area / max(cv2.arcLength(contour, True), 1.0))
    simple = cv2.approxPolyDP(contour, tol, True).reshape(-1, 2)
    return simple.astype(np.float64) if len(simple) >= 3 else pts  # a sliver can collapse: keep it whole


def _bridge(ring: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """`ring` with `hole` joined in by a zero-width cut straight up from the hole's topmost vertex.

    Holes are joined topmost first, so the first edge that vertical ray meets belongs to `ring` (the outer
    ring or a hole joined before): the cut crosses nothing."""
    top = int(np.lexsort((hole[:, 0], hole[:, 1]))[0])  # smallest y, then smallest x
    tx, ty = hole[top]
    a, b = ring, np.roll(ring, -1, axis=0)
    spans = (np.minimum(a[:, 0], b[:, 0]) <= tx) & (tx <= np.maximum(a[:, 0], b[:, 0])) & (a[:, 0] != b[:, 0])
    k = np.nonzero(spans)[0]
    y = a[k, 1] + (tx - a[k, 0]) * (b[k, 1] - a[k, 1]) / (b[k, 0] - a[k, 0])
    above = y <= ty
    best, best_y = (int(k[above][np.argmax(y[above])]), float(y[above].max())) if above.any() else (-1, 0.0)
    if best < 0:  # cannot happen for a hole inside its ring; never lose the hole's outline to it
        best, best_y = int(np.argmin(np.abs(ring[:, 0] - tx) + np.abs(ring[:, 1] - ty))), ring[:, 1].min()
    x = np.array([[tx, best_y]])
    around = np.roll(hole, -top, axis=0)  # starts and ends at the top vertex
    return np.concatenate([ring[: best + 1], x, around, around[:1], x, ring[best + 1:]])


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0, min_area: float = 16.0, holes: bool = True,
                     max_pieces: int = 16, max_points: int = 1000) -> list[np.ndarray]:
    """One polygon per connected piece ([K, 2] x, y in continuous pixel coordinates), holes keyholed in.

    Pieces and holes under `min_area` pixels are specks: pieces dropped, holes filled; every other piece is
    kept however small against the largest. `tolerance` is the simplification distance in pixels (0 keeps
    every corner). At most `max_pieces` pieces (the largest) and about `max_points` points per polygon: a
    mask in thousands of fragments (foliage, crowds, untrained weights) stays cheap to send and to draw.
    """
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return []
    x0, y0 = int(cols[0]), int(rows[0])
    crop = np.ascontiguousarray(mask[y0:rows[-1] + 1, x0:cols[-1] + 1], dtype=np.uint8)  # the object's box only
    # Pieces are chosen on connected components (in C): a mask in thousands of fragments costs no Python per speck.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    pieces = [k for k in np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1 if stats[k, cv2.CC_STAT_AREA] >= min_area]
    polygons = []
    for k in pieces[:max_pieces]:
        x, y, w, h = (int(v) for v in stats[k, :4])
        piece = (labels[y:y + h, x:x + w] == k).astype(np.uint8)
        if holes:
            piece = _fill_holes(piece, min_area, max_pieces)
        # Traced upsampled 2x, so that contour points land on pixel edges.
        big = cv2.copyMakeBorder(cv2.resize(piece, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST),
                                 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP if holes else cv2.RETR_EXTERNAL,
                                               cv2.CHAIN_APPROX_SIMPLE)
        hierarchy = hierarchy[0]
        outer = max((i for i in range(len(contours)) if hierarchy[i][3] < 0), key=lambda i: len(contours[i]))
        rings = []
        for i in [outer] + [i for i in range(len(contours)) if hierarchy[i][3] == outer]:
            pts = _edge_points(contours[i])
            if len(pts) >= 3:
                rings.append((pts, abs(_signed_area(pts))))
        if rings and rings[0][1] >= min_area:
            polygons.append(_keyhole(rings, tolerance, max_points) + [x0 + x, y0 + y])
    return polygons


def _fill_holes(piece: np.ndarray, min_area: float, most: int) -> np.ndarray:
    """The piece with its specks of holes filled, and all but its `most` largest holes."""
    background = cv2.copyMakeBorder(1 - piece, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)  # 4: the piece's are 8
    outside = labels[0, 0]
    holes = sorted((k for k in range(1, n) if k != outside), key=lambda k: -stats[k, cv2.CC_STAT_AREA])
    fill = np.zeros(n, bool)
    fill[[k for i, k in enumerate(holes) if i >= most or stats[k, cv2.CC_STAT_AREA] < min_area]] = True
    return np.maximum(piece, fill[labels[1:-1, 1:-1]].astype(np.uint8)) if fill.any() else piece


def _keyhole(rings: list[tuple[np.ndarray, float]], tolerance: float, max_points: int) -> np.ndarray:
    """The outer ring (counter-clockwise) with its holes (clockwise) joined in; at most about `max_points`
    points (see `_fit`)."""
    simple = _fit(rings, [_simplify(pts, area, tolerance) for pts, area in rings], tolerance, max_points)
    outer, holes = simple[0], simple[1:]
    ring = outer if _signed_area(outer) > 0 else outer[::-1]
    holes = [h if _signed_area(h) < 0 else h[::-1] for h in holes]  # wound opposite to the ring
    for hole in sorted(holes, key=lambda h: (h[:, 1].min(), h[:, 0].min())):  # topmost first
        ring = _bridge(ring, hole)
    return ring


def _fit(rings: list[tuple[np.ndarray, float]], simple: list[np.ndarray], tolerance: float,
         max_points: int) -> list[np.ndarray]:
    """`simple` if it fits in `max_points`, else the rings simplified at the smallest tolerance that fits.

    The smallest, not merely one that fits: a thin structure (a cable, a crack, a 3 px diagonal line) is a
    staircase of thousands of corners that collapses into a few points just past the tolerance that fits it,
    so the tolerance is searched (doubling to bracket it, then bisecting) for the most points under the cap.
    Point counts are not strictly monotonic in the tolerance: the best fit seen wins. No thickness cap here:
    the budget rules; a ring that would collapse keeps its last shape."""
    def count(rs):
        return sum(len(r) for r in rs)

    if count(simple) <= max_points:
        return simple

    def at(tol):
        return [_coarser(pts, r, tol) for (pts, _), r in zip(rings, simple)]

    lo, hi, best = 0.0, max(tolerance, 0.5), None
    while hi < 1e4:
        candidate = at(hi)
        if count(candidate) <= max_points:
            best = candidate
            break
        lo, hi = hi, hi * 2
    if best is None:
        return at(hi)  # nothing fits (thousands of holes at the cap): as coarse as it gets
    for _ in range(12):  # bracket [lo, hi] narrowed to 1/4096 of its width
        mid = (lo + hi) / 2
        candidate = at(mid)
        if count(candidate) <= max_points:
            hi = mid
            if count(candidate) > count(best):
                best = candidate
        else:
            lo = mid
    return best


def _coarser(pts: np.ndarray, current: np.ndarray, tol: float) -> np.ndarray:
    """`pts` simplified at `tol`, or at the largest of tol/2, tol/4, ... where it does not collapse below three
    points; `current` when that is not fewer points."""
    contour = pts.astype(np.float32).reshape(-1, 1, 2)
    while tol > 1e-3:
        simple = cv2.approxPolyDP(contour, tol, True).reshape(-1, 2)
        if len(simple) >= 3:
            return simple.astype(np.float64) if len(simple) < len(current) else current
        tol /= 2
    return current


def polygon_to_percent(points: np.ndarray, width: int, height: int) -> list[list[float]]:
    return (np.asarray(points, np.float64) * [100.0 / width, 100.0 / height]).tolist()


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE (the SDK's encoder over RGBA bytes)."""
    return mask2rle(mask.astype(np.uint8) * 255)


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x0, y0, x1, y1) in pixel edges around the mask, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
