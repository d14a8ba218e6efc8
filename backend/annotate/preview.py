"""Draw Label Studio regions over an image: what the model will do to a project, before it does it."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image


def _color(label: str) -> tuple[int, int, int]:
    hue = (sum(map(ord, label)) * 0.618) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw(image: Image.Image, regions: list[dict]) -> Image.Image:
    canvas = np.array(image.convert("RGB"))
    h, w = canvas.shape[:2]
    overlay = canvas.copy()
    thickness = max(1, round(max(h, w) / 500))
    captions = []
    for region in regions:
        value, kind = region["value"], region["type"]
        label = value[kind][0]
        color = _color(label)
        if kind == "polygonlabels":
            pts = np.round(np.array(value["points"]) * [w / 100.0, h / 100.0]).astype(np.int32)
            cv2.fillPoly(overlay, [pts], color)
            cv2.polylines(canvas, [pts], True, color, thickness, cv2.LINE_AA)
            anchor = tuple(pts.min(axis=0))
        elif kind == "brushlabels":
            mask = np.reshape(decode_rle(value["rle"]), (h, w, 4))[:, :, 3] > 0
            overlay[mask] = color
            ys, xs = np.nonzero(mask)
            anchor = (int(xs.min()), int(ys.min())) if len(xs) else (0, 0)
        else:
            x0, y0 = round(value["x"] * w / 100), round(value["y"] * h / 100)
            x1, y1 = round((value["x"] + value["width"]) * w / 100), round((value["y"] + value["height"]) * h / 100)
            cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness)
            anchor = (x0, y0)
        captions.append((f"{label} {region.get('score', 0):.2f}", anchor, color))
    canvas = cv2.addWeighted(overlay, 0.35, canvas, 0.65, 0)
    scale = max(0.4, max(h, w) / 1600)
    for text, (x, y), color in captions:
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        y = max(y, th + 4)
        cv2.rectangle(canvas, (x, y - th - 4), (x + tw + 4, y), color, -1)
        cv2.putText(canvas, text, (x + 2, y - 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return Image.fromarray(canvas)
