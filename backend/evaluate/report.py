"""The evaluation's figures, over every task's result: per label and overall, at the project's thresholds; the
precision/recall curve over score thresholds; COCO's mask AP; a recommended threshold per label, printed as the
extra params that apply it; each prompt's own figures; what was not compared. Then the one-page HTML report."""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from dataclasses import asdict

import numpy as np

from ..annotate.project import Project
from . import metrics, shapes

WORST = 12  # tasks shown as thumbnails


def build(results: list[dict], project: Project, project_id: int | None = None, iou: float = 0.5,
          target_precision: float | None = None, failed: list[dict] = (), skipped: list = ()) -> dict:
    """The report as JSON (see docs/evaluation.md for its fields)."""
    labels = list(dict.fromkeys(e.label for e in project.ontology or []))
    units = [image for r in results for image in r["images"]]
    grid = [round(float(t), 2) for t in np.arange(_floor(project), 1.0, 0.01)]
    ap = metrics.coco_ap(units, labels, project.thresholds.max_detections)
    per_label, matched = {}, []
    for label in labels:
        gts = [[g for g in u["gt"] if g["label"] == label] for u in units]
        tp = fp = fn = 0
        for u, g in zip(units, gts):
            a, b, c, ious = metrics.counts([d for d in u["current"] if d["label"] == label], g, iou)
            tp, fp, fn = tp + a, fp + b, fn + c
            matched += [(label, x) for x in ious]
        points = metrics.curve([([d for d in u["dt"] if d["label"] == label], g) for u, g in zip(units, gts)], grid,
                               iou)
        best = metrics.recommend(points, target_precision)
        ious = [x for lab, x in matched if lab == label]
        per_label[label] = {
            "tp": tp, "fp": fp, "fn": fn, **metrics.rates(tp, fp, fn),
            "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
            "ap": ap["labels"][label]["ap"], "ap50": ap["labels"][label]["ap50"],
            "annotations": sum(len(g) for g in gts),
            "current_threshold": project.thresholds.for_label(label, None),
            "recommended_threshold": best["threshold"] if best else None,
            "recommended": best,
            "pr_curve": [[p["threshold"], p["precision"], p["recall"]] for p in points],
            "prompts": _prompts(units, project, label, iou),
        }
    tp, fp, fn = (sum(v[k] for v in per_label.values()) for k in ("tp", "fp", "fn"))
    all_ious = [x for _, x in matched]
    return {
        "project": project_id, "model_version": project.model_version, "iou": iou,
        "target_precision": target_precision,
        "tasks": {"evaluated": len(results), "images": len(units), "failed": list(failed), "skipped": list(skipped)},
        "overall": {"tp": tp, "fp": fp, "fn": fn, **metrics.rates(tp, fp, fn),
                    "mean_iou": round(float(np.mean(all_ious)), 4) if all_ious else None,
                    "ap": ap["ap"], "ap50": ap["ap50"]},
        "labels": per_label,
        "not_evaluated": dict(sum((Counter(r["not_evaluated"]) for r in results), Counter())),
        "skipped_kinds": dict(sum((Counter(r["skipped_kinds"]) for r in results), Counter())),
        "recommended_extra_params": recommended_extra_params(project, per_label),
        "worst": worst(results, iou),
    }


def _floor(project: Project) -> float:
    from .evaluator import FLOOR

    th = project.thresholds
    return min([FLOOR, th.confidence, *th.per_label.values()])


def _prompts(units: list[dict], project: Project, label: str, iou: float) -> dict:
    """Each prompt's own figures, where the label has several (synonyms): what it finds alone."""
    prompts = [e.prompt for e in project.ontology or [] if e.label == label]
    if len(prompts) < 2:
        return {}
    out = {}
    for prompt in prompts:
        tp = fp = fn = 0
        for u in units:
            mine = [d for d in u["prompts"] if d["prompt"] == prompt and d["label"] == label]
            a, b, c, _ = metrics.counts(mine, [g for g in u["gt"] if g["label"] == label], iou)
            tp, fp, fn = tp + a, fp + b, fn + c
        out[prompt] = {"tp": tp, "fp": fp, "fn": fn, **metrics.rates(tp, fp, fn)}
    return out


def recommended_extra_params(project: Project, per_label: dict) -> dict:
    """What to paste into the Connect Model form's Extra params (or SAM3_ONTOLOGY) to apply the recommended
    thresholds: the project's ontology without per-prompt thresholds (they would win over per_label) and its
    thresholds with per_label set for every label that has a recommendation."""
    thresholds = asdict(project.thresholds)
    thresholds["per_label"] = {**thresholds["per_label"], **{label: v["recommended_threshold"]
                                                             for label, v in per_label.items()
                                                             if v["recommended_threshold"] is not None}}
    ontology = [{"prompt": e.prompt, "label": e.label} for e in project.ontology or []]
    return {"ontology": ontology, "thresholds": thresholds}


def worst(results: list[dict], iou: float, n: int = WORST) -> list[dict]:
    """The tasks where the project's detections missed or invented the most (misses + false detections)."""
    scored = []
    for r in results:
        fp = fn = 0
        for u in r["images"]:
            for label in {d["label"] for d in u["current"]} | {g["label"] for g in u["gt"]}:
                _, b, c, _ = metrics.counts([d for d in u["current"] if d["label"] == label],
                                            [g for g in u["gt"] if g["label"] == label], iou)
                fp, fn = fp + b, fn + c
        if fp + fn:
            scored.append({"task": r["task"], "fp": fp, "fn": fn})
    return sorted(scored, key=lambda s: (-(s["fp"] + s["fn"]), str(s["task"])))[:n]


# ---- HTML ---------------------------------------------------------------------------------------------
def html_page(report: dict, thumbnails: dict, task_url=None) -> str:
    """One page: the summary, the per-label and per-prompt tables, the curves, the worst tasks as thumbnails
    (annotations in green, detections in red) linking to Label Studio, and the extra params to paste."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(label)}</td>{_cells(v)}<td>{_fmt(v['current_threshold'])}</td>"
        f"<td><b>{_fmt(v['recommended_threshold'])}</b>{_at(v['recommended'])}</td></tr>"
        for label, v in report["labels"].items())
    overall = report["overall"]
    prompt_rows = "".join(
        f"<tr><td>{esc(label)}</td><td>{esc(p)}</td><td>{f['tp']}</td><td>{f['fp']}</td><td>{f['fn']}</td>"
        f"<td>{_fmt(f['precision'])}</td><td>{_fmt(f['recall'])}</td><td>{_fmt(f['f1'])}</td></tr>"
        for label, v in report["labels"].items() for p, f in v["prompts"].items())
    worst = "".join(
        f"<figure><a href=\"{esc(task_url(w['task']) if task_url else '#')}\">"
        + (f"<img src=\"data:image/jpeg;base64,{thumbnails[w['task']]}\">" if w["task"] in thumbnails else "")
        + f"</a><figcaption>task {esc(str(w['task']))}: {w['fn']} missed, {w['fp']} false</figcaption></figure>"
        for w in report["worst"])
    notes = _notes(report)
    t = report["tasks"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>SAM 3 evaluation</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}} table{{border-collapse:collapse;margin:8px 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:4px;width:260px;vertical-align:top}} figure img{{max-width:256px}}
pre{{background:#f4f4f4;padding:8px;white-space:pre-wrap}} .k{{color:#666}}</style></head><body>
<h1>SAM 3 against the project's annotations</h1>
<p class="k">model_version {esc(str(report['model_version']))}; {t['evaluated']} tasks ({t['images']} images) compared
with their latest annotation; matched one to one per label by mask IoU &ge; {report['iou']}.</p>
<p><b>Overall</b>: precision {_fmt(overall['precision'])}, recall {_fmt(overall['recall'])}, F1 {_fmt(overall['f1'])},
mean IoU {_fmt(overall['mean_iou'])}, COCO mask AP {_fmt(overall['ap'])} (AP50 {_fmt(overall['ap50'])}).</p>
<table><tr><th>label</th><th>annotated</th><th>TP</th><th>FP</th><th>FN</th><th>precision</th><th>recall</th>
<th>F1</th><th>mean IoU</th><th>AP</th><th>AP50</th><th>threshold now</th><th>recommended</th></tr>{rows}</table>
{'<h2>Each prompt alone</h2><table><tr><th>label</th><th>prompt</th><th>TP</th><th>FP</th><th>FN</th>'
 '<th>precision</th><th>recall</th><th>F1</th></tr>' + prompt_rows + '</table>' if prompt_rows else ''}
<h2>Precision and recall over the score threshold</h2><img src="data:image/png;base64,{curves_png(report)}">
<h2>Paste into the Connect Model form's Extra params</h2>
<pre>{esc(json.dumps(report['recommended_extra_params']))}</pre>
<h2>Where it went most wrong</h2><p class="k">green: annotated; red: predicted at the current thresholds.</p>
{worst or '<p>No task with a miss or a false detection.</p>'}{notes}</body></html>"""


def _cells(v: dict) -> str:
    return "".join(f"<td>{_fmt(v[k])}</td>" for k in ("annotations", "tp", "fp", "fn", "precision", "recall", "f1",
                                                       "mean_iou", "ap", "ap50"))


def _fmt(v) -> str:
    return "&ndash;" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))


def _at(best: dict | None) -> str:
    return "" if not best else f" <span class='k'>(P {_fmt(best['precision'])}, R {_fmt(best['recall'])})</span>"


def _notes(report: dict) -> str:
    esc, out = html.escape, []
    if report["not_evaluated"]:
        out.append("Not evaluated (labels the ontology does not cover): " + ", ".join(
            f"{esc(k)} ({v})" for k, v in report["not_evaluated"].items()))
    if report["skipped_kinds"]:
        out.append("Skipped (region kinds the backend does not emit): " + ", ".join(
            f"{esc(k)} ({v})" for k, v in report["skipped_kinds"].items()))
    if report["tasks"]["failed"]:
        out.append("Not counted (their image failed): " + ", ".join(
            f"task {esc(str(f['task']))}: {esc(f['error'])}" for f in report["tasks"]["failed"][:50]))
    return "".join(f"<p class='k'>{line}</p>" for line in out)


def curves_png(report: dict) -> str:
    """Each label's precision/recall curve, the current and recommended thresholds marked, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["labels"])
    cols = min(3, max(1, len(labels)))
    rows = -(-max(1, len(labels)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(labels):]:
        ax.axis("off")
    for ax, label in zip(axes.ravel(), labels):
        v = report["labels"][label]
        pts = [(t, p, r) for t, p, r in v["pr_curve"] if p is not None and r is not None]
        ax.plot([r for _, _, r in pts], [p for _, p, _ in pts], "-", color="tab:blue")
        for t, color, name in ((v["current_threshold"], "tab:gray", "now"),
                               (v["recommended_threshold"], "tab:green", "recommended")):
            near = min(pts, key=lambda q: abs(q[0] - t), default=None) if t is not None else None
            if near:
                ax.plot([near[2]], [near[1]], "o", color=color, label=f"{name} {t:.2f}")
        ax.set(title=label, xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def thumbnail(image, result: dict, max_side: int = 256) -> str:
    """The task's first image, small, with its annotations (green) and current detections (red) outlined; a
    base64 JPEG."""
    import cv2

    unit = result["images"][0]
    canvas = np.array(image.convert("RGB"))
    for items, color in ((unit["gt"], (40, 200, 40)), (unit["current"], (230, 40, 40))):
        for item in items:
            mask = shapes.decode(item["rle"]).astype(np.uint8)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(canvas, contours, -1, color, max(1, round(max(canvas.shape[:2]) / 200)))
    scale = max_side / max(canvas.shape[:2])
    if scale < 1:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return base64.b64encode(jpg.tobytes()).decode()
