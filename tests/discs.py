"""A stand-in for SAM 3 at the engine's boundary that finds dark discs by thresholding, at the engine's input
resolution (the image squeezed to `image_size` x `image_size`, as SAM 3's processor does): the tiling, merging,
cropping and coordinate logic can then be checked against known truth, which random weights cannot give.

It answers text prompts (`detect`: every dark blob big enough to see at that resolution) and clicks (`segment`:
the dark blob under the click), and plugs into the app like the real engine (`create_app(engine=...)`)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw

from backend.sam3.detections import Detections


@dataclass
class Seen:
    key: str
    height: int
    width: int
    dark: np.ndarray  # [S, S] bool: what the model "sees"


class DiscEngine:
    MIN_AREA = 6  # pixels at the model's resolution: smaller blobs are not found (as SAM 3 misses tiny objects)
    loaded, device, dtype = True, "cpu", "float32"

    def __init__(self, image_size: int = 1008, model_id: str = ""):
        self.image_size, self.model_id = image_size, model_id
        self.cache: dict[str, Seen] = {}
        self.encoded = []  # (width, height, cached) of every image encoded, in order
        self.batches = []  # images per encode_many call
        self.vit_passes = 0

    def urgent(self):
        return nullcontext()

    def encode_many(self, images, keys=None, cache=True):
        self.batches.append(len(images))
        out = []
        for k, im in enumerate(images):
            key = keys[k] if keys else f"im{len(self.encoded)}-{im.size}"
            if cache and key in self.cache:
                out.append(self.cache[key])
                continue
            self.encoded.append((im.width, im.height, cache))
            self.vit_passes += 1
            small = np.asarray(im.convert("L").resize((self.image_size, self.image_size), Image.BILINEAR))
            seen = Seen(key, im.height, im.width, small < 128)
            if cache:
                self.cache[key] = seen
            out.append(seen)
        return out

    def encode(self, image, key=None):
        return self.encode_many([image], [key] if key else None)[0]

    def _blobs(self, enc):
        return cv2.connectedComponentsWithStats(enc.dark.astype(np.uint8), connectivity=8)

    def _mask(self, labels, k, height, width):
        soft = cv2.resize((labels == k).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        return soft > 0.5

    def detect(self, enc, prompts, threshold=0.5, mask_threshold=0.5, max_keep=100, exemplars=(), size=None):
        height, width = size or (enc.height, enc.width)
        n, labels, stats, _ = self._blobs(enc)
        keep = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= self.MIN_AREA][:max_keep]
        masks = np.zeros((len(keep), height, width), bool)
        for i, k in enumerate(keep):
            masks[i] = self._mask(labels, k, height, width)
        scores = np.linspace(0.9, 0.8, len(keep)).astype(np.float32)
        return [Detections(masks, scores, [p] * len(keep)) for p in prompts]

    def segment(self, enc, points=(), labels=(), box=None, mask_threshold=0.5):
        """The blob under the first positive click (or the box's centre), at the encoding's size."""
        x, y = next((p for p, v in zip(points, labels) if v == 1), None) or ((box[0] + box[2]) / 2,
                                                                           (box[1] + box[3]) / 2)
        _, blobs, _, _ = self._blobs(enc)
        s = self.image_size
        k = blobs[min(s - 1, int(y * s / enc.height)), min(s - 1, int(x * s / enc.width))]
        if k == 0:
            return np.zeros((enc.height, enc.width), bool), 0.0
        return self._mask(blobs, k, enc.height, enc.width), 0.9


def disc_image(width: int, height: int, discs: list[tuple[float, float, float]]) -> Image.Image:
    """White image with black discs (cx, cy, radius) in pixels."""
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    for cx, cy, r in discs:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill="black")
    return im


def disc_mask(width: int, height: int, disc: tuple[float, float, float]) -> np.ndarray:
    """The pixels `disc_image` paints for one disc."""
    return np.asarray(disc_image(width, height, [disc]).convert("L")) < 128
