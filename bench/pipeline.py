"""Batch auto-labelling throughput: N images x K prompts through the backend's own pipeline.

    python bench/pipeline.py CHECKPOINT [--images 8] [--prompts 3] [--latency-ms 100] [--size 1024x768]

Images are served over HTTP by a local server that waits --latency-ms before each answer (a slow image
store). Prints images per second, time per stage, and the pipeline's overhead over the model's own
forward time.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend import metrics  # noqa: E402
from backend.annotate.labeller import Labeller  # noqa: E402
from backend.annotate.project import Project  # noqa: E402
from backend.annotate.task import Task  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.sam3.engine import Sam3Engine  # noqa: E402
from backend.sam3.model import Sam3Model  # noqa: E402

LABELS = ["car", "person", "dog", "cat", "bicycle", "tree", "house", "bird"]


def serve_images(files: dict[str, bytes], latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(latency)
            body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def forward_seconds() -> float:
    return sum(metrics.MODEL_SECONDS.labels(s)._sum.get() for s in ("encode", "detect"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=100)
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--confidence", type=float, default=None, help="score threshold (default 0.5)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    w, h = map(int, args.size.split("x"))
    rng = np.random.RandomState(0)
    files = {}
    for i in range(args.images):
        buf = io.BytesIO()
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(buf, "JPEG", quality=90)
        files[f"/img{i}.jpg"] = buf.getvalue()
    httpd = serve_images(files, args.latency_ms / 1000)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    labels = LABELS[: args.prompts]
    xml = ('<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">'
           + "".join(f'<Label value="{v}"/>' for v in labels) + "</PolygonLabels></View>")
    settings = Settings(model=args.checkpoint, device=args.device, allow_private_urls=True)  # a local image server
    engine = Sam3Engine(args.checkpoint, device=args.device).load()
    thresholds = {"confidence": args.confidence} if args.confidence is not None else None
    project = Project(settings, Sam3Model(settings, engine), xml, {"thresholds": thresholds})
    tasks = [Task(i, {"image": f"{base}/img{i}.jpg"}) for i in range(args.images)]

    labeller = Labeller(project, engine)
    f0 = forward_seconds()
    t0 = time.perf_counter()
    serialise, regions = 0.0, 0
    for out in labeller.label(tasks):
        assert out.error is None, out.error
        t1 = time.perf_counter()
        json.dumps(out.prediction)
        serialise += time.perf_counter() - t1
        regions += len(out.prediction["result"])
    total = time.perf_counter() - t0
    forward = forward_seconds() - f0
    st = labeller.stages
    print(f"{args.images} images {w}x{h} x {args.prompts} prompts on {engine.device} ({engine.dtype}), "
          f"image server latency {args.latency_ms:.0f} ms, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"throughput: {args.images / total:.3f} images/s ({total:.1f} s total, {regions} regions)")
    print(f"stages (s): fetch-wait {st.fetch:.2f} | encode {st.encode:.2f} | decode {st.decode:.2f} | "
          f"select {st.select:.2f} | regions+JSON {st.regions + serialise:.2f}")
    print(f"model forward {forward:.1f} s; pipeline overhead {100 * (total - forward) / forward:.1f}% of model time")
    httpd.shutdown()


if __name__ == "__main__":
    main()
