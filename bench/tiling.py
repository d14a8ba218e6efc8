"""Tiled pre-annotation: tiles per image, seconds per image and peak memory, tiled and untiled.

    python bench/tiling.py (CHECKPOINT | --random-full | --random-tiny) [--sizes 1008x1008,4000x3000,12000x9000]
                           [--tiling auto] [--prompts 1] [--tile-limit N]

Each image is labelled through the backend's own pipeline (`Labeller`: the whole image encoded, then, tiled, its
tiles `SAM3_ENCODE_BATCH` at a time), once untiled and once with `--tiling`. Peak memory is the process's
resident set sampled every 20 ms during the run, less what it held before (the decoded image is made before).
`--tile-limit N`: on an image with more tiles, time only its first N tiles and extrapolate the rest from their
pace (printed as an estimate), for a full-size model on a slow CPU.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.annotate import tiling as tiling_module  # noqa: E402
from backend.annotate.labeller import Labeller  # noqa: E402
from backend.annotate.project import Project  # noqa: E402
from backend.annotate.task import Task  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.sam3.model import Sam3Model  # noqa: E402
from bench.common import add_checkpoint_args, checkpoint_path  # noqa: E402

LABELS = ["car", "person", "dog", "cat", "bicycle", "tree", "house", "bird"]


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


class Peak:
    """The highest resident set while running, above the level when it started."""

    def __init__(self):
        self.base, self.peak, self._stop = rss(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss() - self.base)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss() - self.base)


def config(prompts: int) -> str:
    labels = "".join(f'<Label value="{label}"/>' for label in LABELS[:prompts])
    return f'<View><Image name="image" value="$image"/><PolygonLabels name="p" toName="image">{labels}</PolygonLabels></View>'


def run(settings, sam3, image: Image.Image, tiling: str, prompts: int, tile_limit: int | None) -> dict:
    project = Project(settings, sam3, config(prompts), {"tiling": tiling, "thresholds": {"max_detections": 1000}})
    engine = sam3.wait(0)
    labeller = Labeller(project, engine)
    grid = project.tiling.grid(image.width, image.height, engine.image_size) or []
    limited = tile_limit is not None and len(grid) > tile_limit
    if limited:  # time the first `tile_limit` tiles only (the grid is cut inside the Tiler's view)
        real = tiling_module.Tiling.grid
        tiling_module.Tiling.grid = lambda self, *a: real(self, *a)[:tile_limit]
    engine.cache.clear()  # each run encodes its image: the untiled run's encoding is not reused by the tiled one
    passes = engine.vit_passes
    try:
        with Peak() as peak:
            t0 = time.perf_counter()
            [outcome] = list(labeller.label([Task(1, {"image": "bench"})], lambda task, name: image))
            seconds = time.perf_counter() - t0
    finally:
        if limited:
            tiling_module.Tiling.grid = real
    if outcome.error is not None:
        raise SystemExit(f"{image.width}x{image.height} {tiling}: {outcome.error}")
    timed = min(len(grid), tile_limit) if limited else len(grid)
    vit, estimate = engine.vit_passes - passes, None
    if limited:  # the whole-image pass plus `timed` tiles took `seconds`: the rest at the tiles' pace
        whole = run_whole_seconds(settings, sam3, image, prompts)
        estimate = whole + (seconds - whole) / timed * len(grid)
    return {"tiles": len(grid), "vit": vit, "seconds": seconds, "estimate": estimate,
            "peak_mb": peak.peak / 2**20, "regions": len(outcome.prediction["result"]), "timed": timed}


def run_whole_seconds(settings, sam3, image, prompts) -> float:
    return run(settings, sam3, image, "off", prompts, None)["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    add_checkpoint_args(ap)
    ap.add_argument("--sizes", default="1008x1008,4000x3000,12000x9000")
    ap.add_argument("--tiling", default="auto")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--tile-limit", type=int)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    path, _tmp = checkpoint_path(ap, args)
    settings = Settings.from_env(bulk=True)
    settings.model, settings.device, settings.max_image_pixels, settings.max_tiles = path, args.device, 200e6, 4096
    sam3 = Sam3Model(settings).load()
    engine = sam3.wait(0)
    print(f"model {path} on {engine.device} ({engine.dtype}), input {engine.image_size} px, encode batch "
          f"{settings.encode_batch}, {torch.get_num_threads()} threads, {args.prompts} prompt(s)")
    rng = np.random.default_rng(0)
    warm = Image.fromarray(rng.integers(0, 255, (engine.image_size, engine.image_size, 3), dtype=np.uint8))
    run(settings, sam3, warm, "off", args.prompts, None)  # first forward's one-off costs out of the figures
    print("| image | decoded MB | tiling | tiles | ViT passes | seconds/image | peak MB above decoded image | regions |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for tiling in ("off", args.tiling):
            r = run(settings, sam3, image, tiling, args.prompts, args.tile_limit)
            secs = f"{r['seconds']:.1f}" if r["estimate"] is None else (
                f"{r['estimate']:.0f} (estimated from {r['timed']} tiles in {r['seconds']:.0f})")
            print(f"| {w} x {h} | {w * h * 3 / 2**20:.0f} | {tiling} | {r['tiles']} | {r['vit']} | {secs} | "
                  f"{r['peak_mb']:.0f} | {r['regions']} |", flush=True)
        del image


if __name__ == "__main__":
    main()
