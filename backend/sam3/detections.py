"""One small container that the engine fills and the region writers read."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detections:
    """N object masks with scores and the label each belongs to.

    Dense (the usual case): `masks` is [N, H, W] bool at the image's size. Sparse (a tiled or cropped very large
    image, where N full-size masks would cost N x H x W bytes): `masks` is a list of N crops, crop i placed with
    its top-left pixel at `origins[i]` (x, y) on an image of `size` (height, width).
    """

    masks: np.ndarray | list  # [N, H, W] bool, or N 2-D bool crops
    scores: np.ndarray  # [N] float
    labels: list[str] = field(default_factory=list)
    origins: np.ndarray | None = None  # [N, 2] int (x, y) of each crop; None: dense
    size: tuple[int, int] | None = None  # (height, width) of the image; None: the dense masks' own

    def __post_init__(self):
        if not self.labels:
            self.labels = [""] * len(self.scores)
        if not (len(self.masks) == len(self.scores) == len(self.labels)):
            raise ValueError("masks, scores and labels must have the same length")
        if self.origins is None:
            if not isinstance(self.masks, np.ndarray) or self.masks.ndim != 3:
                raise ValueError("masks without origins must be an [N, H, W] array")
            self.size = self.size or tuple(self.masks.shape[1:])
        else:
            self.origins = np.asarray(self.origins, np.int64).reshape(-1, 2)
            if len(self.origins) != len(self.scores) or self.size is None:
                raise ValueError("sparse masks need one origin each and the image's size")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def height(self) -> int:
        return int(self.size[0])

    @property
    def width(self) -> int:
        return int(self.size[1])

    @property
    def sparse(self) -> bool:
        return self.origins is not None

    def __getitem__(self, index) -> "Detections":
        """The detections at `index` (a list of positions, a slice or a boolean mask), as Detections."""
        idx = np.atleast_1d(np.arange(len(self))[index])
        labels = [self.labels[i] for i in idx]
        if self.sparse:
            return Detections([self.masks[i] for i in idx], self.scores[idx], labels, self.origins[idx], self.size)
        return Detections(self.masks[idx], self.scores[idx], labels)

    def origin(self, i: int) -> tuple[int, int]:
        """(x, y) of mask i's top-left pixel on the image."""
        return (0, 0) if self.origins is None else (int(self.origins[i][0]), int(self.origins[i][1]))

    def box(self, i: int) -> tuple[int, int, int, int] | None:
        """Tight (x0, y0, x1, y1) around mask i in image pixels, or None when it is empty."""
        m = self.masks[i]
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if not len(rows):
            return None
        x, y = self.origin(i)
        return x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1

    def full_mask(self, i: int) -> np.ndarray:
        """Mask i at the image's size (a copy for a sparse one: one at a time, it costs H x W bytes)."""
        if not self.sparse:
            return self.masks[i]
        out = np.zeros(self.size, bool)
        (x, y), m = self.origin(i), self.masks[i]
        out[y:y + m.shape[0], x:x + m.shape[1]] = m
        return out

    @classmethod
    def empty(cls, height: int, width: int) -> "Detections":
        return cls(np.zeros((0, height, width), bool), np.zeros(0, np.float32), [])

    @classmethod
    def concat(cls, parts: list["Detections"], height: int, width: int) -> "Detections":
        """`parts` (dense or sparse, all on one image) as one sparse Detections, each mask cropped to its box."""
        masks, origins, scores, labels = [], [], [], []
        for d in parts:
            for i in range(len(d)):
                box = d.box(i)
                if box is None:
                    continue
                x, y = d.origin(i)
                masks.append(d.masks[i][box[1] - y:box[3] - y, box[0] - x:box[2] - x])
                origins.append(box[:2])
                scores.append(float(d.scores[i]))
                labels.append(d.labels[i])
        return cls(masks, np.asarray(scores, np.float32), labels, np.asarray(origins).reshape(-1, 2), (height, width))

    def by_label(self) -> dict[str, "Detections"]:
        """The detections of each label, in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for i, label in enumerate(self.labels):
            groups.setdefault(label, []).append(i)
        return {label: self[ix] for label, ix in groups.items()}
