"""Masks to Label Studio geometry (polygons, brush RLE, boxes) in percent of the original image.

Polygons trace the outline of the mask's pixel squares (not the centres of its border pixels),
so rasterising a polygon by pixel centres gives the mask back.
"""
from __future__ import annotations

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle


def percent_to_pixels(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    return x * width / 100.0, y * height / 100.0


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0, min_area: float = 16.0) -> list[np.ndarray]:
    """Outer outlines of each connected piece, in continuous pixel coordinates ([K, 2] x, y).

    Holes are filled (a Label Studio polygon has none). Pieces smaller than `min_area` pixels, or
    than 1% of the largest piece, are dropped as specks. `tolerance` is the simplification
    (Douglas-Peucker) distance in pixels; 0 keeps every corner.
    """
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    # Work on the object's bounding box only, upsampled 2x so that contour points land on
    # pixel edges (index 2i is the left edge of pixel i, 2i+1 its right half).
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    crop = np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.uint8)
    big = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    big = cv2.copyMakeBorder(big, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    pieces = []
    for contour in contours:
        pts = contour.reshape(-1, 2).astype(np.float64)
        # 2x index k (after the 1-pixel border) is the centre of a half-pixel cell on the rim,
        # (k - 1 + 0.5) / 2 = i + 0.25 next to a left/top edge at i, or i + 0.75 next to a
        # right/bottom edge at i + 1: rounding moves each point onto the pixel edge it belongs to.
        pts = np.round((pts - 0.5) / 2.0)
        pts = pts[np.any(pts != np.roll(pts, 1, axis=0), axis=1)]  # drop repeats made by rounding
        if len(pts) >= 3:
            pieces.append((abs(cv2.contourArea(pts.astype(np.float32))), pts))
    if not pieces:
        return []
    largest = max(area for area, _ in pieces)
    polygons = []
    for area, pts in sorted(pieces, key=lambda p: -p[0]):
        if area < min_area or area < 0.01 * largest:
            continue
        if tolerance > 0:
            # Douglas-Peucker chords stray about 0.3 x tolerance from the outline on average, costing
            # perimeter x that of the area. Capping the tolerance at 7% of the piece's mean thickness
            # (area / perimeter) keeps that loss under 2% (the staircase perimeter overstates the true
            # one), so small objects keep their shape.
            contour = pts.astype(np.float32).reshape(-1, 1, 2)
            tol = min(tolerance, 0.07 * area / max(cv2.arcLength(contour, True), 1.0))
            simple = cv2.approxPolyDP(contour, tol, True).reshape(-1, 2)
            if len(simple) >= 3:  # a tiny piece can collapse to a line: keep its exact outline then
                pts = simple.astype(np.float64)
        polygons.append(pts + [x0, y0])
    return polygons


def polygon_to_percent(points: np.ndarray, width: int, height: int) -> list[list[float]]:
    return [[float(x) * 100.0 / width, float(y) * 100.0 / height] for x, y in points]


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE (the SDK's encoder over RGBA bytes)."""
    return mask2rle(mask.astype(np.uint8) * 255)


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x0, y0, x1, y1) in pixel edges around the mask, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
