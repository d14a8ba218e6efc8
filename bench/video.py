"""Text-prompt tracking on video: frames per second, time per frame split into ViT and tracking, and memory
over a long video.

    python bench/video.py --random-tiny --frames 2000          # memory flat over a long video
    python bench/video.py --random-full --frames 8 --dtype bfloat16
    python bench/video.py facebook/sam3 --device cuda --frames 300 --size 1280x720

A generated video (moving shapes, OpenCV) is decoded as a stream and tracked with two text prompts, as a
job does; resident memory is printed every window of frames.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.labelstudio.video import VideoFile  # noqa: E402
from backend.sam3.engine import Sam3Engine  # noqa: E402
from backend.sam3.tracking import (
    Concept,  # noqa: E402
    Timing,  # noqa: E402
)
from bench.common import add_checkpoint_args, checkpoint_path  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_video(path: str, frames: int, fps: float, w: int, h: int) -> None:
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for i in range(frames):
        img = np.full((h, w, 3), 60, np.uint8)
        cv2.circle(img, (w // 8 + (3 * i) % (w * 3 // 4), h // 2), max(8, h // 10), (0, 0, 255), -1)
        y = h // 8 + i % (h // 2)
        cv2.rectangle(img, (w * 3 // 4, y), (w * 3 // 4 + w // 8, y + h // 8), (0, 255, 0), -1)
        out.write(img)
    out.release()


def main() -> None:
    ap = argparse.ArgumentParser()
    add_checkpoint_args(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it), float32, bfloat16")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--fps", type=float, default=25)
    ap.add_argument("--size", default="640x360", help="video WxH")
    ap.add_argument("--window", type=int, default=100, help="frames between memory readings")
    ap.add_argument("--max-objects", type=int, default=8)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    path, tmp = checkpoint_path(ap, args)
    t = time.perf_counter()
    engine = Sam3Engine(path, device=args.device, dtype=args.dtype).load()
    engine.video.load()
    print(f"model {path} on {engine.device} ({engine.dtype}), image and video heads loaded in "
          f"{time.perf_counter() - t:.1f}s, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        write_video(f.name, args.frames, args.fps, w, h)
        data = Path(f.name).read_bytes()
    # the random model scores detections ~0.25: a zero threshold gives it objects to track
    concepts = [Concept("red ball", "ball", 0.0), Concept("green box", "box", 0.0)]
    timing, readings = Timing(), []
    start_rss = rss_mb()

    def on_window(done: int) -> None:
        readings.append((done, rss_mb(), dict(engine.video.held)))
        print(f"  frame {done:6d}: RSS {readings[-1][1]:8.0f} MB, session holds {readings[-1][2]}", flush=True)

    with VideoFile(data, args.fps) as video:
        t = time.perf_counter()
        tracks = engine.video.track(video.frames(), (video.info.width, video.info.height), concepts,
                                    max_objects=args.max_objects, min_frames=1, window=args.window,
                                    on_window=on_window, timing=timing)
        wall = time.perf_counter() - t
    per = timing.per_frame()
    print(f"{args.frames} frames {w}x{h}: {args.frames / wall:.2f} frames/s "
          f"({wall / args.frames * 1000:.0f} ms a frame: "
          f"ViT {per['vit_s'] * 1000:.0f} ms, tracking {per['tracking_s'] * 1000:.0f} ms, "
          f"decode and resize {per['decode_s'] * 1000:.1f} ms); {len(tracks)} tracks")
    if len(readings) >= 2:
        first, last = readings[0], readings[-1]
        print(f"memory: RSS {start_rss:.0f} MB before, {first[1]:.0f} MB at frame {first[0]}, "
              f"{last[1]:.0f} MB at frame {last[0]} ({last[1] - first[1]:+.0f} MB over {last[0] - first[0]} frames)")


if __name__ == "__main__":
    main()
