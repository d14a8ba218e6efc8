"""Exact reference geometry for tests (independent of the code under test)."""
import numpy as np


def rasterize(points_percent, width: int, height: int, rule: str = "evenodd") -> np.ndarray:
    """Pixels whose centre lies inside the polygon, from percent coordinates, under the even-odd or the
    non-zero winding rule (what canvases and COCO/YOLO tools use)."""
    pts = np.asarray(points_percent, dtype=np.float64) * [width / 100.0, height / 100.0]
    cy, cx = np.mgrid[:height, :width] + 0.5
    winding = np.zeros((height, width), int)
    x1, y1 = pts[:, 0], pts[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        if b == d:
            continue
        up, down = (b <= cy) & (cy < d), (d <= cy) & (cy < b)
        left = cx < a + (cy - b) * (c - a) / (d - b)
        winding += (up & left).astype(int) - (down & left).astype(int)
    return winding % 2 == 1 if rule == "evenodd" else winding != 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))
