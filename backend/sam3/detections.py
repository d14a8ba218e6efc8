"""One small container that the engine fills and the region writers read."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detections:
    """N object masks at the original image resolution, with scores and the label each belongs to."""

    masks: np.ndarray  # [N, H, W] bool
    scores: np.ndarray  # [N] float
    labels: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.labels:
            self.labels = [""] * len(self.scores)
        if not (len(self.masks) == len(self.scores) == len(self.labels)):
            raise ValueError("masks, scores and labels must have the same length")

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index) -> "Detections":
        """The detections at `index` (a list of positions, a slice or a boolean mask), as Detections."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        return Detections(self.masks[idx], self.scores[idx], [self.labels[i] for i in idx])

    @classmethod
    def empty(cls, height: int, width: int) -> "Detections":
        return cls(np.zeros((0, height, width), bool), np.zeros(0, np.float32), [])

    def by_label(self) -> dict[str, "Detections"]:
        """The detections of each label, in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for i, label in enumerate(self.labels):
            groups.setdefault(label, []).append(i)
        return {label: self[ix] for label, ix in groups.items()}
