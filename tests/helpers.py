"""Exact reference geometry for tests (independent of the code under test)."""
import numpy as np


def rasterize(points_percent, width: int, height: int) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (even-odd rule), from percent coordinates."""
    pts = np.asarray(points_percent, dtype=np.float64) * [width / 100.0, height / 100.0]
    cy, cx = np.mgrid[:height, :width] + 0.5
    inside = np.zeros((height, width), bool)
    x1, y1 = pts[:, 0], pts[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        if b == d:
            continue
        crosses = (cy >= min(b, d)) & (cy < max(b, d))
        xcross = a + (cy - b) * (c - a) / (d - b)
        inside ^= crosses & (cx < xcross)
    return inside


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))
