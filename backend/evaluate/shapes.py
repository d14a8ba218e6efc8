"""Label Studio regions as masks at the original image size, rasterised as COCO does (pycocotools), so that an
IoU here means what it means in every paper: polygons (keyhole rings included, under COCO's rule), brush RLE and
rectangles (rotated ones too). Masks travel as COCO RLE with text counts (JSON)."""
from __future__ import annotations

import math

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from pycocotools import mask as coco

COMPARED = ("polygonlabels", "brushlabels", "rectanglelabels")  # what the backend emits for images


def encode(mask: np.ndarray) -> dict:
    rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    return coco.decode(native(rle)).astype(bool)


def native(rle: dict) -> dict:
    """The RLE as pycocotools takes it (bytes counts)."""
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def ious(dts: list[dict], gts: list[dict]) -> np.ndarray:
    """Mask IoU of every detection (rows) with every annotation (columns)."""
    if not dts or not gts:
        return np.zeros((len(dts), len(gts)))
    return np.asarray(coco.iou([native(r) for r in dts], [native(r) for r in gts], [0] * len(gts)), float)


def union(rles: list[dict]) -> dict:
    merged = coco.merge([native(r) for r in rles], intersect=False)
    return {"size": [int(v) for v in merged["size"]], "counts": merged["counts"].decode("ascii")}


def area(rle: dict) -> int:
    return int(coco.area(native(rle)))


def label_of(region: dict) -> str | None:
    value = region.get("value") if isinstance(region.get("value"), dict) else {}
    labels = value.get(region.get("type")) or value.get("labels")
    return labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None


def region_rle(region: dict, width: int, height: int) -> dict | None:
    """The region as a mask of the image's size, or None when it has no area (fewer than three points, zero
    width); ValueError when it cannot be read."""
    kind, value = region.get("type"), region.get("value") or {}
    if kind == "polygonlabels":
        points = np.asarray(value.get("points") or [], float).reshape(-1, 2) * [width / 100.0, height / 100.0]
        return _polygon(points, width, height)
    if kind == "rectanglelabels":
        x, y = float(value["x"]) * width / 100.0, float(value["y"]) * height / 100.0
        w, h = float(value["width"]) * width / 100.0, float(value["height"]) * height / 100.0
        a = math.radians(float(value.get("rotation") or 0))  # Label Studio turns a box about its top-left corner
        corners = [(0, 0), (w, 0), (w, h), (0, h)]
        return _polygon(np.array([(x + cx * math.cos(a) - cy * math.sin(a), y + cx * math.sin(a) + cy * math.cos(a))
                                  for cx, cy in corners]), width, height)
    if kind == "brushlabels":
        ow, oh = int(region.get("original_width") or width), int(region.get("original_height") or height)
        mask = np.reshape(decode_rle(value["rle"]), (oh, ow, 4))[:, :, 3] > 0
        if (ow, oh) != (width, height):  # drawn on another size of the same image: scaled like percentages
            import cv2

            mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        return encode(mask) if mask.any() else None
    raise ValueError(f"regions of type {kind!r} are not compared")


def _polygon(points: np.ndarray, width: int, height: int) -> dict | None:
    if len(points) < 3 or not np.isfinite(points).all():
        return None
    rle = coco.merge(coco.frPyObjects([points.ravel().tolist()], height, width))
    out = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return out if area(out) else None
