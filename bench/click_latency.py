"""Cold vs warm click latency through the backend's own HTTP app.

    python bench/click_latency.py CHECKPOINT_DIR_OR_HUB_ID
    python bench/click_latency.py --random-full      # default SAM 3 config, random weights (real compute)

A cold click fetches, encodes (ViT) and decodes; a warm click on the same image reuses the cached
encoding and runs only the prompt decoder and the polygon conversion.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.config import Settings  # noqa: E402
from backend.http.app import create_app  # noqa: E402
from backend.sam3.engine import Sam3Engine  # noqa: E402
from bench.common import add_checkpoint_args, checkpoint_path  # noqa: E402
from bench.pipeline import serve_images  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/></KeyPointLabels>
<PolygonLabels name="poly" toName="image"><Label value="object"/></PolygonLabels></View>"""


def click(x, y):
    return {"result": [{"from_name": "kp", "to_name": "image", "type": "keypointlabels", "is_positive": True,
                        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["object"]}}]}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_checkpoint_args(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it), float32, bfloat16")
    ap.add_argument("--size", default="1280x960", help="image WxH")
    ap.add_argument("--warm", type=int, default=20, help="warm clicks to time")
    ap.add_argument("--cold", type=int, default=2, help="cold clicks (new images) to time")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    path, tmp = checkpoint_path(ap, args)

    t = time.perf_counter()
    engine = Sam3Engine(path, device=args.device, dtype=args.dtype).load()
    print(f"model {path} on {engine.device} ({engine.dtype}), loaded in {time.perf_counter() - t:.1f}s, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    # Images come from a local HTTP server, as Label Studio's /data/upload/... URLs do: a click's body is small.
    served: dict[str, bytes] = {}
    httpd = serve_images(served, latency=0.0)
    client = create_app(Settings(model=path, device=args.device, allow_private_urls=True), engine=engine).test_client()
    client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    w, h = map(int, args.size.split("x"))
    rng = np.random.RandomState(0)

    points = []

    def request(uri, x, y):
        t0 = time.perf_counter()
        r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": uri}}], "project": "1.1",
                                          "label_config": CONFIG, "params": {"context": click(x, y)}})
        assert r.status_code == 200, r.get_json()
        points.append(sum(len(g["value"]["points"]) for g in r.get_json()["results"][0]["result"]))
        return time.perf_counter() - t0

    cold, warm, enc_t, dec_t = [], [], [], []
    for _ in range(args.cold):
        buf = io.BytesIO()
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(buf, "JPEG", quality=90)
        served[f"/img{len(served)}.jpg"] = buf.getvalue()
        uri = f"http://127.0.0.1:{httpd.server_address[1]}/img{len(served) - 1}.jpg"
        cold.append(request(uri, 50, 50))
        for _ in range(args.warm // args.cold):
            warm.append(request(uri, float(rng.uniform(5, 95)), float(rng.uniform(5, 95))))
        # The model alone, on the same image: encode once, then decode clicks on the cached encoding.
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        engine.cache = type(engine.cache)(engine.cache.max_bytes)
        t0 = time.perf_counter()
        enc = engine.encode(image)
        enc_t.append(time.perf_counter() - t0)
        for _ in range(args.warm // args.cold):
            t0 = time.perf_counter()
            engine.segment(enc, [(float(rng.uniform(0, w)), float(rng.uniform(0, h)))], [1])
            dec_t.append(time.perf_counter() - t0)
    med = statistics.median
    e, d = med(enc_t), med(dec_t)
    print(f"image {w}x{h}, medians over {len(cold)} cold and {len(warm)} warm clicks")
    print(f"model:   cold click (encode + decode) {(e + d) * 1000:.0f} ms, warm click (decode) {d * 1000:.1f} ms, "
          f"ratio {(e + d) / d:.0f}x")
    c, m = med(cold), med(warm)
    print(f"request: cold click {c * 1000:.0f} ms, warm click {m * 1000:.1f} ms "
          f"(p90 {sorted(warm)[int(0.9 * len(warm))] * 1000:.1f} ms), ratio {c / m:.0f}x "
          "(HTTP, image decode, mask upsampling, polygons, JSON included)")
    print(f"warm request / decoder: {m / d:.2f}x (goal <= 2x); polygon points per answer: median "
          f"{statistics.median(points):.0f}, max {max(points)}")
    print(f"ViT passes: {engine.vit_passes} ({len(cold)} images through HTTP, then the same images again for the model-only timing)")


if __name__ == "__main__":
    main()
