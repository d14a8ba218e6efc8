"""The figures: counts at the project's thresholds, a precision/recall curve over score thresholds, the threshold
that serves each label best, and COCO's mask AP computed by pycocotools itself (so AP means what papers mean)."""
from __future__ import annotations

import contextlib
import io

import numpy as np

from . import shapes
from .match import match


def rates(tp: int, fp: int, fn: int) -> dict:
    """precision, recall and F1; None where undefined (nothing predicted, or nothing annotated)."""
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"precision": _round(p), "recall": _round(r), "f1": _round(f1)}


def _round(v):
    return None if v is None else round(float(v), 4)


def counts(dts: list[dict], gts: list[dict], iou: float) -> tuple[int, int, int, list[float]]:
    """(TP, FP, FN, IoUs of the matches) of detections `dts` ({"score", "rle"}, best first) against `gts`."""
    pairs = match(shapes.ious([d["rle"] for d in dts], [g["rle"] for g in gts]), iou)
    return len(pairs), len(dts) - len(pairs), len(gts) - len(pairs), [p[2] for p in pairs]


def curve(units: list[tuple[list[dict], list[dict]]], grid: list[float], iou: float) -> list[dict]:
    """For each score threshold of `grid`: TP, FP, FN and the rates, over every (detections, annotations) unit
    (an image's candidates of one label, best first, and its annotations of that label)."""
    tp, n = np.zeros(len(grid), int), np.zeros(len(grid), int)
    gts = 0
    for dts, anns in units:
        gts += len(anns)
        scores = np.array([d["score"] for d in dts])
        all_ious = shapes.ious([d["rle"] for d in dts], [g["rle"] for g in anns])
        for k, t in enumerate(grid):
            keep = np.nonzero(scores >= t)[0]
            n[k] += len(keep)
            tp[k] += len(match(all_ious[keep], iou)) if len(keep) and anns else 0
    return [{"threshold": round(t, 4), "tp": int(a), "fp": int(b - a), "fn": int(gts - a), **rates(a, b - a, gts - a)}
            for t, a, b in zip(grid, tp, n)]


def recommend(points: list[dict], target_precision: float | None = None) -> dict | None:
    """The threshold that maximises F1 (the highest of equals), or, with `target_precision`, the lowest that reaches
    it (the most recall at that precision). None when no threshold finds anything right."""
    useful = [p for p in points if p["tp"] > 0]
    if not useful:
        return None
    if target_precision is not None:
        reaching = [p for p in useful if p["precision"] is not None and p["precision"] >= target_precision]
        if not reaching:
            return None
        return min(reaching, key=lambda p: p["threshold"])
    return max(useful, key=lambda p: (p["f1"], p["threshold"]))


def coco_ap(units: list[dict], labels: list[str], max_dets: int) -> dict:
    """COCO mask AP@[.5:.95] and AP50 with pycocotools, per label and overall, from every image's annotations
    and candidate detections (units: {"width", "height", "gt": [{"label", "rle"}], "dt": [{"label", "score",
    "rle"}]})."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats = {label: i + 1 for i, label in enumerate(labels)}
    images, anns, dets = [], [], []
    for i, unit in enumerate(units, 1):
        images.append({"id": i, "width": unit["width"], "height": unit["height"]})
        for g in unit["gt"]:
            if g["label"] in cats:
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cats[g["label"]], "iscrowd": 0,
                             "segmentation": shapes.native(g["rle"]), "area": shapes.area(g["rle"]),
                             "bbox": [float(v) for v in _bbox(g["rle"])]})
        dets += [{"image_id": i, "category_id": cats[d["label"]], "segmentation": shapes.native(d["rle"]),
                  "score": float(d["score"])} for d in unit["dt"] if d["label"] in cats]
    out = {label: {"ap": None, "ap50": None} for label in labels}
    if not anns or not dets:
        return {"labels": out, "ap": None, "ap50": None}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": n}
                                                                            for n, c in cats.items()]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.params.maxDets = [1, 10, max(100, max_dets)]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [IoU threshold, recall, category, area, max detections]
    for label, c in cats.items():
        k = ev.params.catIds.index(c)
        out[label] = {"ap": _mean(precision[:, :, k, 0, -1]), "ap50": _mean(precision[0, :, k, 0, -1])}
    return {"labels": out, "ap": _mean(precision[:, :, :, 0, -1]), "ap50": _mean(precision[0, :, :, 0, -1])}


def _mean(values: np.ndarray):
    valid = values[values > -1]  # -1: no annotation of that category
    return round(float(valid.mean()), 4) if valid.size else None


def _bbox(rle: dict) -> list[float]:
    from pycocotools import mask as coco

    return coco.toBbox(shapes.native(rle)).tolist()
