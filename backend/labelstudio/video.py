"""Decode a video task as a stream of frames numbered the way Label Studio's player numbers them.

Label Studio's `<Video framerate="F">` shows frame n (1-based) at time (n - 1) / F and counts
round(duration * F) frames, whatever rate the file was encoded at. Each of those frames is given the
decoded picture on screen at that time (by the frames' timestamps), so a variable frame rate, or a
config framerate unlike the file's, still lines up with what the annotator sees. Frames are read one
at a time through OpenCV's bundled FFmpeg: memory does not grow with the video's length. Phone videos
with a rotation tag come out upright (OpenCV applies the tag, as browsers do).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from ..errors import ImageError

MAX_SIDE = 8192  # pixels; a frame is decoded whole, so a bound before the first one is read


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as displayed (rotation applied)
    height: int
    duration: float  # seconds
    framerate: float  # the config's, which numbers Label Studio's frames
    frames: int  # Label Studio's frame count: round(duration * framerate)


class VideoFile:
    """A downloaded video on disk (deleted on close): `info`, then `frames()` once."""

    def __init__(self, data: bytes, framerate: float, name: str = "video"):
        if not framerate or not np.isfinite(framerate) or framerate <= 0:
            raise ImageError(f"{name}: framerate must be a positive number, got {framerate!r}")
        fd, self.path = tempfile.mkstemp(prefix="sam3-video-", suffix=".bin")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.name = name
        try:
            self.info = self._probe(float(framerate))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "VideoFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.path, cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise ImageError(f"{self.name} is not a readable video (MP4, WebM, MOV...)")
        return cap

    def _probe(self, framerate: float) -> VideoInfo:
        cap = self._open()
        try:
            w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
                raise ImageError(f"{self.name} is {w}x{h} pixels; at most {MAX_SIDE} a side", 413)
            ok, first = cap.read()
            if not ok or first is None:
                raise ImageError(f"{self.name} has no decodable video frame")
            height, width = first.shape[:2]  # displayed size: a rotation tag swaps the two
            fps = cap.get(cv2.CAP_PROP_FPS)
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            if not (fps > 0 and count > 0 and np.isfinite(fps) and np.isfinite(count)):
                raise ImageError(f"{self.name}: its duration cannot be read (no frame rate or frame count)")
            duration = count / fps  # what the browser reports as the video's duration, to a frame
        finally:
            cap.release()
        return VideoInfo(width, height, duration, framerate, max(1, int(round(duration * framerate))))

    def frames(self, limit: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(Label Studio frame number from 1, RGB frame) for each frame up to `info.frames` (or `limit`)."""
        total = min(self.info.frames, limit or self.info.frames)
        cap = self._open()
        try:
            shown = None
            ahead, ahead_t = self._read(cap)
            for n in range(1, total + 1):
                t = (n - 1) / self.info.framerate + 1e-6
                # advance while the next decoded frame is already on screen at time t
                while ahead is not None and (shown is None or ahead_t <= t):
                    shown = ahead
                    ahead, ahead_t = self._read(cap)
                if shown is None:
                    return
                yield n, cv2.cvtColor(shown, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()

    @staticmethod
    def _read(cap: cv2.VideoCapture) -> tuple[np.ndarray | None, float]:
        ok, frame = cap.read()
        if not ok:
            return None, float("inf")
        return frame, cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
