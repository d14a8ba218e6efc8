"""Warm click latency while bulk work runs, next to idle: clicks wait at most for the forward pass in progress.

    python bench/click_during_bulk.py CHECKPOINT [--clicks 10] [--images 6] [--encode-batch 1]

One process, as the service runs it: a thread keeps a batch predict going (Retrieve Predictions) over new
images while the main thread clicks on an image already encoded. Prints the click latencies idle and during
the batch, and the batch's own seconds per image (the longest a click may wait).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import CONFIG, data_uri, keypoint, make_image  # noqa: E402

from backend.config import Settings  # noqa: E402
from backend.http.app import create_app  # noqa: E402
from backend.sam3.engine import Sam3Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--images", type=int, default=6, help="new images in the background batch")
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--encode-batch", type=int, default=1, help="images per ViT forward in the batch")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    engine = Sam3Engine(args.checkpoint, device=args.device).load()
    settings = Settings(model=args.checkpoint, device=args.device, encode_batch=args.encode_batch,
                        predict_budget=1e9, max_body_mb=4096)  # images travel inline here
    app = create_app(settings, engine=engine)
    warm = data_uri(make_image(w, h, seed=1))

    def click(i: int) -> float:
        t0 = time.perf_counter()
        r = app.test_client().post("/predict", json={
            "tasks": [{"id": 1, "data": {"image": warm}}], "project": "1.1", "label_config": CONFIG,
            "params": {"context": {"result": [keypoint(20 + 5 * (i % 10), 50)]}}})
        assert r.status_code == 200, r.get_json()
        return time.perf_counter() - t0

    click(0)  # encodes the warm image
    idle = [click(i) for i in range(args.clicks)]
    tasks = [{"id": 100 + i, "data": {"image": data_uri(make_image(w, h, seed=100 + i))}} for i in range(args.images)]
    batch_time = {}

    def bulk() -> None:
        t0 = time.perf_counter()
        r = app.test_client().post("/predict", json={"tasks": tasks, "project": "1.1", "label_config": CONFIG})
        assert r.status_code == 200
        batch_time["s"] = time.perf_counter() - t0

    runner = threading.Thread(target=bulk)
    runner.start()
    time.sleep(0.5)
    busy = []
    while runner.is_alive() and len(busy) < args.clicks:
        busy.append(click(len(busy)))
        time.sleep(0.2)
    runner.join()
    per_image = batch_time["s"] / args.images

    def fmt(xs):
        return (f"median {1000 * statistics.median(xs):.0f} ms, max {1000 * max(xs):.0f} ms"
                if xs else "no click landed during the batch")

    print(f"{args.checkpoint} on {engine.device} ({engine.dtype}), {w}x{h}, encode batch {args.encode_batch}")
    print(f"warm click idle:         {fmt(idle)} ({len(idle)} clicks)")
    print(f"warm click during batch: {fmt(busy)} ({len(busy)} clicks)")
    print(f"batch: {args.images} images in {batch_time['s']:.1f} s ({per_image:.2f} s per image: the longest wait "
          f"is one forward of {args.encode_batch} image(s))")


if __name__ == "__main__":
    main()
