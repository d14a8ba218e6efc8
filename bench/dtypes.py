"""fp32 against bf16 on this CPU: do the masks agree, and how much faster is bf16?

    python bench/dtypes.py CHECKPOINT [--images 3] [--clicks 8] [--size 1280x960]

For each image: the ViT features (cosine), then clicks (one point, two points, a box) and a text prompt,
decoded in both dtypes; prints the IoU of every pair of masks and the cold (encode + decode) and warm
(decode) times.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_image  # noqa: E402

from backend.sam3.engine import Sam3Engine, _prompt_key, cpu_has_bf16  # noqa: E402


def prompts(rng, w, h, n):
    out = []
    for i in range(n):
        x, y = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        if i % 3 == 0:
            out.append({"points": [(x, y)], "labels": [1]})
        elif i % 3 == 1:
            out.append({"points": [(x, y), (x + 0.1 * w, y)], "labels": [1, 0]})
        else:
            out.append({"box": (x - 0.15 * w, y - 0.15 * h, x + 0.15 * w, y + 0.15 * h)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=8)
    ap.add_argument("--size", default="1280x960")
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    engines = {name: Sam3Engine(args.checkpoint, device="cpu", dtype=name).load() for name in ("float32", "bfloat16")}
    ious, cosines, times = [], [], {name: {"cold": [], "warm": []} for name in engines}
    agree, confident = [], []  # the low-res mask logits: correlation; sign agreement where fp32 is sure
    for i in range(args.images):
        image = make_image(w, h, seed=500 + i)
        masks, feats, logits = {}, {}, {}
        for name, eng in engines.items():
            t0 = time.perf_counter()
            enc = eng.encode(image)
            cold = time.perf_counter() - t0
            feats[name] = enc.vision.last_hidden_state.float().flatten()
            masks[name], logits[name] = [], []
            for j, p in enumerate(prompts(np.random.RandomState(i), w, h, args.clicks)):
                t1 = time.perf_counter()
                m, _ = eng.segment(enc, p.get("points", ()), p.get("labels", ()), p.get("box"))
                times[name]["warm"].append(time.perf_counter() - t1)
                if j == 0:
                    times[name]["cold"].append(cold + time.perf_counter() - t1)
                masks[name].append(m)
                clicks, box = _prompt_key(p.get("points", ()), p.get("labels", ()), p.get("box"))
                logits[name].append(eng.refinements.get((enc.key, clicks, box)).float().flatten())
            masks[name] += list(eng.detect(enc, ["cat"], threshold=0.0, max_keep=3)[0].masks)
        cosines.append(float(torch.nn.functional.cosine_similarity(feats["float32"], feats["bfloat16"], dim=0)))
        single = [j % 3 != 0 for j in range(args.clicks)]  # two clicks or a box: one mask, no choice among three
        for a, b in (pair for pair, one in zip(zip(logits["float32"], logits["bfloat16"]), single) if one):
            agree.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
            sure = a.abs() > 1.0
            confident.append(float(((a > 0) == (b > 0))[sure].float().mean()) if sure.any() else 1.0)
        for k, (a, b) in enumerate(zip(masks["float32"], masks["bfloat16"])):
            union = (a | b).sum()
            ious.append((k < args.clicks and k % 3 == 0, float((a & b).sum() / union) if union else 1.0))
    print(f"{args.checkpoint}, {w}x{h}, {args.images} images, CPU with native bf16: {cpu_has_bf16()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"ViT features fp32 vs bf16: cosine min {min(cosines):.5f}")
    print(f"mask logits fp32 vs bf16 ({len(agree)} clicks): correlation min {min(agree):.4f}; where fp32's "
          f"|logit| > 1, same side of the threshold on {100 * min(confident):.2f}% of pixels at least")
    for what, chosen in (("two clicks, boxes and text", False), ("one click (best of three masks)", True)):
        xs = [iou for c, iou in ious if c == chosen]
        print(f"masks fp32 vs bf16, {what} ({len(xs)}): IoU median {statistics.median(xs):.4f}, min {min(xs):.4f}, "
              f"{sum(x >= 0.98 for x in xs)}/{len(xs)} at >= 0.98")
    for name, t in times.items():
        print(f"{name:9s} cold click {statistics.median(t['cold']):.2f} s, warm click "
              f"{1000 * statistics.median(t['warm']):.0f} ms (medians)")


if __name__ == "__main__":
    main()
