"""Detections -> Label Studio result regions for an output control (polygon, brush or box), shaped by an
`Outline`."""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass

from ..sam3.detections import Detections
from . import geometry
from .labelconfig import Control


@dataclass(frozen=True)
class Outline:
    """How masks become regions: the mask threshold, the polygon settings, the speck size, and for video the
    shortest track kept and the most objects tracked at once. A job records its own (every worker draws the
    same regions whatever its environment says); elsewhere they come from the settings."""

    tolerance: float = 1.0  # pixels; Douglas-Peucker simplification
    min_area: float = 16.0  # pixels; smaller pieces are dropped, smaller holes filled
    holes: bool = True
    max_pieces: int = 16
    max_points: int = 1000
    mask_threshold: float = 0.5
    video_min_track: int = 3
    video_max_objects: int = 32

    @classmethod
    def from_settings(cls, s) -> "Outline":
        return cls(s.polygon_tolerance, s.min_piece_area, s.polygon_holes, s.max_pieces, s.max_polygon_points,
                   s.mask_threshold, s.video_min_track, s.video_max_objects)

    @classmethod
    def from_dict(cls, data: dict) -> "Outline":
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})

    def to_dict(self) -> dict:
        return asdict(self)

    def polygon_settings(self) -> dict:
        """What `to_regions` takes."""
        return {"tolerance": self.tolerance, "min_area": self.min_area, "holes": self.holes,
                "max_pieces": self.max_pieces, "max_points": self.max_points}


def _region(control: Control, width: int, height: int, label: str, score: float, value: dict) -> dict:
    value[control.type] = [label]
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": control.name,
        "to_name": control.to_name,
        "type": control.type,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
        "score": round(float(score), 4),
    }


def to_regions(dets: Detections, control: Control, *, tolerance: float = 1.0, min_area: float = 16.0,
               holes: bool = True, max_pieces: int = 16, max_points: int = 1000) -> list[dict]:
    """One region per instance (per piece, for polygons, holes included); every region carries its label
    and score."""
    if len(dets) == 0:
        return []
    height, width = dets.height, dets.width
    out = []
    for i, (mask, score, label) in enumerate(zip(dets.masks, dets.scores, dets.labels)):
        if control.type == "polygonlabels":
            for poly in geometry.mask_to_polygons(mask, tolerance=tolerance, min_area=min_area, holes=holes,
                                                  max_pieces=max_pieces, max_points=max_points):
                points = geometry.polygon_to_percent(poly + dets.origin(i), width, height)
                out.append(_region(control, width, height, label, score, {"points": points, "closed": True}))
        elif control.type == "brushlabels":
            if mask.sum() >= min_area:
                rle = geometry.mask_to_rle(dets.full_mask(i))
                out.append(_region(control, width, height, label, score, {"format": "rle", "rle": rle}))
        else:
            box = dets.box(i)
            if box is not None and mask.sum() >= min_area:  # the same specks a polygon would drop
                x0, y0, x1, y1 = box
                value = {
                    "x": x0 * 100.0 / width,
                    "y": y0 * 100.0 / height,
                    "width": (x1 - x0) * 100.0 / width,
                    "height": (y1 - y0) * 100.0 / height,
                    "rotation": 0,
                }
                out.append(_region(control, width, height, label, score, value))
    return out


def to_video_regions(tracks, control: Control, frames_count: int, duration: float, framerate: float) -> list[dict]:
    """One VideoRectangle per track: a keyframe on every frame it is seen in, `enabled: false` on the last
    frame of each stretch it is seen for (Label Studio hides the box after that until the next keyframe).
    `time` is frame / framerate, as Label Studio's editor writes it."""
    out = []
    for track in tracks:
        frames = sorted(track.boxes)
        sequence = []
        for i, frame in enumerate(frames):
            x0, y0, x1, y1 = track.boxes[frame]
            ends = i + 1 == len(frames) or frames[i + 1] != frame + 1
            sequence.append({
                "frame": frame, "enabled": not (ends and frame < frames_count), "rotation": 0,
                "x": round(x0, 4), "y": round(y0, 4), "width": round(x1 - x0, 4), "height": round(y1 - y0, 4),
                "time": frame / framerate,
            })
        if not sequence:
            continue
        out.append({
            "id": uuid.uuid4().hex[:10],
            "from_name": control.name,
            "to_name": control.to_name,
            "type": control.type,
            "value": {"framesCount": frames_count, "duration": duration, "sequence": sequence,
                      "labels": [track.label]},
            "score": round(float(track.score), 4),
        })
    return out
