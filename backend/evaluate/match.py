"""Matching as the field does it: one to one, per label, by mask IoU, the highest IoU first."""
from __future__ import annotations

import numpy as np


def match(ious: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """(detection, annotation, IoU) pairs, each detection and each annotation in one pair at most, every IoU at
    least `threshold`; the highest IoU is paired first. Ties go to the earlier detection (the higher score, as
    detections come best first), then to the earlier annotation."""
    if ious.size == 0:
        return []
    d, g = np.nonzero(ious >= threshold)
    order = sorted(zip(-ious[d, g], d, g))
    used_d, used_g, pairs = set(), set(), []
    for neg, i, j in order:
        if i not in used_d and j not in used_g:
            used_d.add(i)
            used_g.add(j)
            pairs.append((int(i), int(j), float(-neg)))
    return pairs
