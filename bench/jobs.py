"""What a bulk label job costs beyond the model: a real Label Studio, a real job, the model's time apart.

    python bench/jobs.py CHECKPOINT --ls-url http://127.0.0.1:8080 --token TOKEN --images 100

Creates a project with N random images in that Label Studio, runs one job in this process (as
`label-studio-sam3 label` does) and prints tasks/s, the model's forward time, and the rest per task:
reading the task, downloading its image, converting and posting its prediction. With the tiny random
checkpoint the model is nearly free, so the numbers are the job machinery's own ceiling.
"""
from __future__ import annotations

import argparse
import io
import time
import uuid

import numpy as np
import requests
import torch
from PIL import Image
from pipeline import forward_seconds

from backend.config import Settings
from backend.jobs import lifecycle, runner
from backend.jobs.store import MemoryStore
from backend.labelstudio import client
from backend.sam3.model import Sam3Model

CONFIG = ('<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">'
          '<Label value="cat"/><Label value="dog"/></PolygonLabels></View>')


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--ls-url", required=True)
    ap.add_argument("--token", required=True, help="legacy token of a Label Studio user")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--confidence", type=float, default=0.0, help="0 keeps every instance (random weights)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    headers = {"Authorization": f"Token {args.token}"}
    r = requests.post(f"{args.ls_url}/api/projects", headers=headers,
                      json={"title": f"bench {uuid.uuid4().hex[:6]}", "label_config": CONFIG})
    r.raise_for_status()
    pid = r.json()["id"]
    w, h = map(int, args.size.split("x"))
    rng = np.random.RandomState(0)
    for i in range(args.images):  # Label Studio takes one uploaded file per request
        buf = io.BytesIO()
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(buf, "JPEG", quality=90)
        requests.post(f"{args.ls_url}/api/projects/{pid}/import", headers=headers,
                      files={"file": (f"img{i}.jpg", buf.getvalue(), "image/jpeg")}).raise_for_status()

    settings = Settings(model=args.checkpoint, device=args.device, label_studio_url=args.ls_url,
                        label_studio_api_key=args.token)
    sam3 = Sam3Model(settings).load()
    store, api = MemoryStore(), client.api(settings)
    job = lifecycle.create(store, api, settings, sam3, {"project": pid, "thresholds": {
        "confidence": args.confidence, "max_detections": 5}})
    ctx = lifecycle.Context(settings, sam3, store, api)
    f0, t0 = forward_seconds(), time.perf_counter()
    stages = [runner.run_chunk(ctx, job.id, i, chunk) for i, chunk in enumerate(runner.plan(ctx, job.id))]
    total, forward = time.perf_counter() - t0, forward_seconds() - f0
    split = {k: sum(getattr(s, k) for s in stages) for k in ("fetch", "encode", "decode", "select", "regions", "upload")}
    job = store.get(job.id)
    n = job.processed
    print(f"{n} tasks {w}x{h} on {sam3.engine.device}, Label Studio at {args.ls_url}, torch {torch.__version__}")
    print(f"job {job.status.value}: {job.predicted} predicted, {job.regions_added} regions, {job.failed} failed")
    print(f"throughput: {n / total:.2f} tasks/s ({total:.1f} s)")
    print("stages (s): " + " | ".join(f"{k} {v:.2f}" for k, v in split.items()))
    machinery = split["fetch"] + split["upload"]
    print(f"model forward {forward:.1f} s; waiting for Label Studio (task reads and image downloads the model "
          f"waited for, bulk posts) {machinery:.1f} s = {1000 * machinery / n:.1f} ms per task")


if __name__ == "__main__":
    main()
