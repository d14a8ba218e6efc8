"""Evaluation against the project's own annotations: the matcher, the shapes, the figures and the threshold per
label, checked against counts built independently. The tiny random model's detections are noise but
deterministic, so the ground truth is built from them: exact copies of some of the backend's own regions (each a
true positive), regions it does not predict (each a miss), and everything it predicts that was not copied (each a
false detection)."""
import json

import numpy as np
import pytest
from conftest import data_uri, make_image
from fakels import FakeLabelStudio
from label_studio_sdk.converter.brush import mask2rle

from backend.annotate import geometry
from backend.annotate.labeller import Labeller
from backend.annotate.project import Project
from backend.annotate.task import Task
from backend.config import Settings
from backend.evaluate import metrics, shapes
from backend.evaluate.match import match
from backend.jobs import lifecycle, runner
from backend.jobs.store import MemoryStore
from backend.labelstudio.client import LabelStudioAPI
from backend.labelstudio.retry import Backoff
from backend.sam3.model import Sam3Model

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image">
    <Label value="cat"/><Label value="dog"/><Label value="bird"/>
  </PolygonLabels>
  <KeyPointLabels name="kp" toName="image"><Label value="cat"/></KeyPointLabels>
  <Choices name="quality" toName="image"><Choice value="good"/></Choices>
</View>"""
# bird is in the config but not in the ontology: its annotations are "not evaluated", never misses
EXTRA = {"ontology": ["cat", "dog"], "thresholds": {"confidence": 0.2, "max_detections": 3}}


# ---- the matcher ------------------------------------------------------------------------------------
def test_the_highest_iou_is_paired_first_not_the_highest_score():
    ious = np.array([[0.6, 0.55],   # detection 0 (the higher score) overlaps both annotations
                     [0.9, 0.0]])   # detection 1 fits annotation 0 best
    assert match(ious) == [(1, 0, 0.9), (0, 1, 0.55)]  # by score first, detection 1 would go unmatched


def test_ties_one_to_many_and_the_threshold():
    assert match(np.array([[0.8, 0.8]])) == [(0, 0, 0.8)]  # a tie goes to the earlier annotation
    assert match(np.array([[0.7], [0.7]])) == [(0, 0, 0.7)]  # ... and to the earlier (better scored) detection
    assert match(np.array([[0.9, 0.6, 0.7]])) == [(0, 0, 0.9)]  # one detection, one annotation at most
    assert match(np.array([[0.5]])) == [(0, 0, 0.5)] and match(np.array([[0.49]])) == []
    assert match(np.array([[0.9]]), threshold=0.95) == []


def test_empty_sides_match_nothing():
    assert match(np.zeros((0, 3))) == [] and match(np.zeros((3, 0))) == []
    gt = [{"rle": shapes.encode(np.ones((4, 4), bool))}]
    assert metrics.counts([], gt, 0.5) == (0, 0, 1, [])
    assert metrics.counts([{"rle": gt[0]["rle"], "score": 0.9}], [], 0.5) == (0, 1, 0, [])


# ---- shapes -------------------------------------------------------------------------------------------
def test_keyhole_polygons_brush_and_rotated_boxes_rasterise_to_their_masks():
    h, w = 60, 80
    yy, xx = np.mgrid[:h, :w]
    donut = ((xx - 40) ** 2 + (yy - 30) ** 2 < 25 ** 2) & ((xx - 40) ** 2 + (yy - 30) ** 2 >= 10 ** 2)
    [poly] = geometry.mask_to_polygons(donut, tolerance=0)
    region = {"type": "polygonlabels", "value": {"points": geometry.polygon_to_percent(poly, w, h),
                                                  "polygonlabels": ["cat"]}}
    assert np.array_equal(shapes.decode(shapes.region_rle(region, w, h)), donut)  # the hole stays a hole
    brush = {"type": "brushlabels", "original_width": w, "original_height": h,
             "value": {"format": "rle", "rle": mask2rle(donut.astype(np.uint8) * 255), "brushlabels": ["cat"]}}
    assert np.array_equal(shapes.decode(shapes.region_rle(brush, w, h)), donut)
    box = {"type": "rectanglelabels", "value": {"x": 50, "y": 10, "width": 25, "height": 50, "rotation": 90,
                                                "rectanglelabels": ["dog"]}}
    turned = shapes.decode(shapes.region_rle(box, w, h))  # about its top-left corner: now left of x = 40
    ys, xs = np.nonzero(turned)
    assert xs.max() < 41 and xs.min() >= 9 and ys.min() >= 5 and ys.max() <= 26
    assert abs(turned.sum() - 20 * 30) <= 60
    assert shapes.region_rle({"type": "polygonlabels", "value": {"points": [[1, 1], [2, 2]]}}, w, h) is None
    with pytest.raises(ValueError):
        shapes.region_rle({"type": "keypointlabels", "value": {"x": 1, "y": 1}}, w, h)


# ---- figures --------------------------------------------------------------------------------------------
def test_rates_and_the_recommended_threshold():
    assert metrics.rates(0, 0, 0) == {"precision": None, "recall": None, "f1": None}
    assert metrics.rates(3, 1, 0) == {"precision": 0.75, "recall": 1.0, "f1": round(6 / 7, 4)}
    points = [{"threshold": t, "tp": tp, "fp": fp, "fn": 4 - tp, **metrics.rates(tp, fp, 4 - tp)}
              for t, tp, fp in [(0.1, 4, 8), (0.3, 4, 2), (0.5, 3, 1), (0.6, 3, 1), (0.7, 1, 0), (0.9, 0, 0)]]
    assert metrics.recommend(points)["threshold"] == 0.3  # F1 8/10 beats 6/8
    assert metrics.recommend(points, target_precision=0.75)["threshold"] == 0.5  # the lowest that reaches it
    assert metrics.recommend(points, target_precision=0.99)["threshold"] == 0.7
    tie = [dict(p, threshold=t) for p, t in zip(points[2:4], (0.5, 0.6))]
    assert metrics.recommend(tie)["threshold"] == 0.6  # equal F1: the higher threshold, fewer false detections
    assert metrics.recommend([points[-1]]) is None  # nothing right at any threshold


def test_coco_ap_is_one_for_a_perfect_copy_and_zero_for_a_miss():
    a = np.zeros((40, 40), bool)
    a[5:20, 5:20] = True
    b = np.zeros((40, 40), bool)
    b[25:35, 25:35] = True
    unit = {"width": 40, "height": 40, "gt": [{"label": "cat", "rle": shapes.encode(a)}],
            "dt": [{"label": "cat", "score": 0.9, "rle": shapes.encode(a)}]}
    assert metrics.coco_ap([unit], ["cat"], 100)["labels"]["cat"] == {"ap": 1.0, "ap50": 1.0}
    unit["dt"] = [{"label": "cat", "score": 0.9, "rle": shapes.encode(b)}]
    assert metrics.coco_ap([unit], ["cat"], 100)["labels"]["cat"] == {"ap": 0.0, "ap50": 0.0}


# ---- a whole evaluation against an in-memory Label Studio -----------------------------------------------
@pytest.fixture
def evaluation(checkpoint, engine):
    settings = Settings(model=checkpoint, device="cpu", max_pieces=1, api_retries=2)  # one region per instance
    sam3 = Sam3Model(settings, engine)
    ls = FakeLabelStudio(CONFIG)
    ls.ml_backends = [{"id": 1, "extra_params": EXTRA}]  # the project's connected backend: its thresholds apply
    tasks = [ls.add_task({"image": data_uri(make_image(96, 72, seed=900 + i))}) for i in range(7)]
    project = Project(settings, sam3, CONFIG, EXTRA)
    labeller = Labeller(project, engine)
    predicted = {o.task.id: o.prediction["result"] for o in labeller.label([Task(t, ls.tasks[t]["data"])
                                                                             for t in tasks])}
    return settings, sam3, ls, tasks, predicted, project


def mask_of(region, w=96, h=72):
    return shapes.decode(shapes.region_rle(region, w, h))


def corner_box(label, x=1.0):
    return {"type": "polygonlabels", "from_name": "poly", "to_name": "image", "id": f"extra-{label}-{x}",
            "value": {"points": [[x, 1], [x + 3, 1], [x + 3, 4], [x, 4]], "polygonlabels": [label]}}


def run_evaluation(settings, sam3, ls, **body):
    api = LabelStudioAPI(ls, Backoff(attempts=2, base=0.01))
    store = MemoryStore()
    job = lifecycle.create(store, api, settings, sam3, {"project": 1, "mode": "evaluate", **body})
    runner.run_all(lifecycle.Context(settings, sam3, store, api), job.id)
    return store.get(job.id), store.report(job.id)


def test_every_figure_matches_counts_built_from_the_backends_own_regions(evaluation):
    settings, sam3, ls, tasks, predicted, project = evaluation
    assert all(predicted[t] for t in tasks[:4]), "the tiny model predicts regions at this threshold"
    expect = {"cat": [0, 0, 0], "dog": [0, 0, 0]}  # TP, FP, FN

    def annotate(t, copied, extra=(), other=()):
        for region in predicted[t]:
            label = region["value"]["polygonlabels"][0]
            expect[label][0 if region in copied else 1] += 1
        for region in extra:
            label = region["value"]["polygonlabels"][0]
            assert all(shapes.ious([shapes.region_rle(region, 96, 72)], [shapes.region_rle(p, 96, 72)])[0, 0] < 0.5
                       for p in predicted[t]), "an extra region must match no prediction"
            expect[label][2] += 1
        ls.add_annotation(t, [*copied, *extra, *other])

    annotate(tasks[0], predicted[tasks[0]])  # every prediction right
    annotate(tasks[1], predicted[tasks[1]][:1], [corner_box("cat")])  # one right, one missed
    annotate(tasks[2], [], [corner_box("dog", 90.0)])  # everything predicted is false, a dog missed
    bird = dict(corner_box("bird", 50.0), id="bird")
    keypoint = {"type": "keypointlabels", "from_name": "kp", "to_name": "image",
                "value": {"x": 10, "y": 10, "width": 1, "keypointlabels": ["cat"]}}
    choice = {"type": "choices", "from_name": "quality", "to_name": "image", "value": {"choices": ["good"]}}
    annotate(tasks[3], predicted[tasks[3]][-1:], other=[bird, keypoint, choice])
    ls.add_annotation(tasks[4], predicted[tasks[4]], was_cancelled=True)  # skipped by its annotator: not compared
    ls.add_annotation(tasks[5], [], updated_at="2026-01-01T00:00:00Z")  # an older one...
    annotate(tasks[5], [])  # ...and its latest: nothing there, so all it predicts is false
    # tasks[6]: no annotation at all, not part of the evaluation
    job, (report, page) = run_evaluation(settings, sam3, ls)

    assert job.status == "succeeded", job
    assert (job.total, job.predicted, job.skipped, job.failed) == (6, 5, 1, 0)  # tasks[4] had no submitted one
    assert report["tasks"]["evaluated"] == 5
    for label, (tp, fp, fn) in expect.items():
        v = report["labels"][label]
        assert (v["tp"], v["fp"], v["fn"]) == (tp, fp, fn), (label, v)
        assert v["precision"] == (round(tp / (tp + fp), 4) if tp + fp else None)
        assert v["recall"] == (round(tp / (tp + fn), 4) if tp + fn else None)
        assert v["f1"] == (round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None)
        assert v["mean_iou"] == (1.0 if tp else None)  # exact copies
        assert v["annotations"] == tp + fn and v["current_threshold"] == 0.2
        for key in ("ap", "ap50"):
            assert v[key] is None or 0 <= v[key] <= 1
        assert len(v["pr_curve"]) > 50
    total = [sum(v[i] for v in expect.values()) for i in range(3)]
    assert [report["overall"][k] for k in ("tp", "fp", "fn")] == total
    assert report["not_evaluated"] == {"bird": 1}
    assert report["skipped_kinds"] == {"keypointlabels": 1, "choices": 1}
    assert {w["task"] for w in report["worst"]} >= {tasks[1], tasks[2], tasks[5]}
    assert all(not ls.of(t) for t in tasks)  # nothing posted
    # the recommendation is what the Connect Model form takes, and it applies per label
    pasted = Project(settings, sam3, CONFIG, json.loads(json.dumps(report["recommended_extra_params"])))
    for label, v in report["labels"].items():
        if v["recommended_threshold"] is not None:
            assert pasted.thresholds.for_label(label, None) == v["recommended_threshold"]
    assert "<table>" in page and "cat" in page and "data:image/png;base64," in page and "Extra params" in page


def test_annotating_every_candidate_gives_full_recall_and_ap50(evaluation):
    """The candidates (every detection down to the floor) annotated as they are: at the floor, nothing is missed,
    and COCO's AP50 is 1."""
    settings, sam3, ls, tasks, _, _ = evaluation
    low = Project(settings, sam3, CONFIG, {"ontology": ["cat"], "thresholds": {"confidence": 0.0, "nms": False,
                                                                               "max_detections": 3}})
    outs = Labeller(low, low.sam3.engine).label([Task(t, ls.tasks[t]["data"]) for t in tasks[:2]])
    for out in outs:
        ls.add_annotation(out.task.id, out.prediction["result"])
    job, (report, _) = run_evaluation(settings, sam3, ls, ontology=["cat"],
                                      thresholds={"confidence": 0.0, "nms": False, "max_detections": 3})
    cat = report["labels"]["cat"]
    assert (cat["fn"], cat["recall"], cat["ap50"]) == (0, 1.0, 1.0), cat
    assert cat["pr_curve"][0][2] == 1.0  # at the floor, every annotation is found


def test_a_project_without_annotations_says_so_and_a_failed_image_is_listed_not_counted(evaluation):
    settings, sam3, ls, tasks, predicted, _ = evaluation
    job, report = run_evaluation(settings, sam3, ls)
    assert job.status == "failed" and report is None
    assert "has no annotated tasks to evaluate against" in job.error
    ls.add_annotation(tasks[0], predicted[tasks[0]])
    broken = ls.add_task({"image": "data:image/png;base64,bm90IGFuIGltYWdl"})
    ls.add_annotation(broken, [corner_box("cat")])
    job, (report, _) = run_evaluation(settings, sam3, ls)
    assert job.status == "succeeded" and job.failed == 1
    assert [f["task"] for f in report["tasks"]["failed"]] == [broken] and "not a readable image" in \
        report["tasks"]["failed"][0]["error"]
    assert report["labels"]["cat"]["fn"] == 0  # the failed task's annotation is not counted as a miss
    assert report["tasks"]["evaluated"] == 1


def test_a_sample_is_repeatable_and_the_connected_backends_thresholds_apply(evaluation):
    settings, sam3, ls, tasks, predicted, _ = evaluation
    for t in tasks[:6]:
        ls.add_annotation(t, predicted[t])
    ls.ml_backends = [{"id": 3, "updated_at": "2026-01-02", "extra_params": json.dumps(EXTRA)},
                      {"id": 2, "updated_at": "2026-01-01", "extra_params": "{\"thresholds\": {\"confidence\": 0.9}}"}]
    first, (r1, _) = run_evaluation(settings, sam3, ls, limit=3, seed=7)
    again, (r2, _) = run_evaluation(settings, sam3, ls, limit=3, seed=7)
    assert first.total == again.total == 3 and r1["labels"] == r2["labels"]
    assert first.request.extra_params_from == "ml backend 3"  # the project's connected backend, the latest one
    assert r1["labels"]["cat"]["current_threshold"] == 0.2
    other, _ = run_evaluation(settings, sam3, ls, limit=3, seed=8)
    assert other.total == 3


def test_bad_evaluation_requests_are_refused_before_anything_is_queued(evaluation):
    settings, sam3, ls, _, _, _ = evaluation
    api = LabelStudioAPI(ls, Backoff(attempts=2, base=0.01))
    store = MemoryStore()
    for body, words in [({"mode": "train"}, "'mode'"), ({"mode": "evaluate", "iou": 0}, "'iou'"),
                        ({"mode": "evaluate", "target_precision": 1.5}, "'target_precision'"),
                        ({"mode": "evaluate", "dry_run": True}, "posts nothing"),
                        ({"iou": 0.7}, "is for \"mode\": \"evaluate\""), ({"mode": "evaluate", "seed": -1}, "'seed'")]:
        with pytest.raises(Exception) as e:
            lifecycle.create(store, api, settings, sam3, {"project": 1, **body})
        assert words in str(getattr(e.value, "message", e.value)), (body, e.value)
    assert store.list()[1] == 0
    video = FakeLabelStudio('<View><Labels name="l" toName="v"><Label value="car"/></Labels>'
                            '<Video name="v" value="$video"/><VideoRectangle name="b" toName="v"/></View>')
    with pytest.raises(Exception, match="this project labels videos"):
        lifecycle.create(store, LabelStudioAPI(video, Backoff(attempts=1)), settings, sam3,
                         {"project": 1, "mode": "evaluate"})


# ---- against a real Label Studio --------------------------------------------------------------------------
def test_an_evaluation_against_label_studio_over_http_and_the_command_line(label_studio, engine, checkpoint,
                                                                           tmp_path):
    """Annotations made through Label Studio's API as people make them: copies of the predictions Retrieve
    Predictions stored, a missed object, one task annotated with nothing. The service's report and the command
    line's JSON give the same figures, and both match the counts built here."""
    import os
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    import requests
    from conftest import png_bytes
    from werkzeug.serving import make_server

    from backend.http.app import create_app

    url, headers, token = label_studio
    config = CONFIG.replace('<Label value="bird"/>', "")
    r = requests.post(f"{url}/api/projects", headers=headers, json={"title": "evaluate", "label_config": config})
    pid = r.json()["id"]
    for i in range(3):
        requests.post(f"{url}/api/projects/{pid}/import", headers=headers,
                      files={"file": (f"e{i}.png", png_bytes(make_image(96, 72, seed=950 + i)), "image/png")})
    tasks = sorted(t["id"] for t in requests.get(f"{url}/api/tasks", params={"project": pid},
                                                 headers=headers).json()["tasks"])
    settings = Settings(model=checkpoint, device="cpu", max_pieces=1, label_studio_url=url, label_studio_api_key=token)
    server = make_server("127.0.0.1", 0, create_app(settings, engine=engine), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = f"http://127.0.0.1:{server.server_port}"
    try:
        r = requests.post(f"{url}/api/ml", headers=headers, json={"url": backend, "project": pid, "title": "SAM 3",
                                                                  "extra_params": json.dumps(EXTRA)})
        assert r.status_code == 201, r.text
        requests.post(f"{url}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                      headers=headers, json={"selectedItems": {"all": True, "excluded": []}})
        predicted = {t: requests.get(f"{url}/api/predictions", params={"task": t}, headers=headers).json()[0]["result"]
                     for t in tasks}
        assert predicted[tasks[0]] and predicted[tasks[1]]
        expect = {"cat": [0, 0, 0], "dog": [0, 0, 0]}
        plan = {tasks[0]: (predicted[tasks[0]], []), tasks[1]: (predicted[tasks[1]][:1], [corner_box("cat")]),
                tasks[2]: ([], [corner_box("dog", 90.0)])}
        for t, (copied, extra) in plan.items():
            for region in predicted[t]:
                expect[region["value"]["polygonlabels"][0]][0 if region in copied else 1] += 1
            for region in extra:
                expect[region["value"]["polygonlabels"][0]][2] += 1
            r = requests.post(f"{url}/api/tasks/{t}/annotations", headers=headers, json={"result": copied + extra})
            assert r.status_code == 201, r.text
        job = requests.post(f"{backend}/jobs", json={"project": pid, "mode": "evaluate"}).json()
        deadline = time.time() + 120
        while (view := requests.get(f"{backend}/jobs/{job['job_id']}").json())["status"] in ("queued", "running"):
            assert time.time() < deadline
            time.sleep(0.5)
        assert view["status"] == "succeeded" and view["mode"] == "evaluate", view
        report = requests.get(f"{backend}{view['report_url']}.json").json()
        page = requests.get(f"{backend}{view['report_url']}")
        assert page.headers["Content-Type"].startswith("text/html") and "Extra params" in page.text
    finally:
        server.shutdown()
    for label, counts in expect.items():
        assert [report["labels"][label][k] for k in ("tp", "fp", "fn")] == counts, (label, report["labels"][label])
    assert report["extra_params_from"].startswith("ml backend")  # the thresholds the project is connected with
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAM3_", "REDIS_URL"))}
    # float32 as the in-process engine: on a CPU with native bf16, `auto` would pick bf16, whose masks of random
    # weights differ from float32's by a few pixels (the figures must match exactly)
    env.update(SAM3_MODEL=checkpoint, DEVICE="cpu", SAM3_DTYPE="float32", SAM3_MAX_PIECES="1", LABEL_STUDIO_URL=url,
               LABEL_STUDIO_API_KEY=token, LOG_LEVEL="WARNING")
    out = tmp_path / "figures.json"
    run = subprocess.run([str(Path(sys.executable).with_name("label-studio-sam3")), "evaluate", "--project", str(pid),
                          "--json", str(out), "--html", str(tmp_path / "report.html")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "recall" in run.stdout and '"per_label"' in run.stdout and (tmp_path / "report.html").exists()
    cli = json.loads(out.read_text())
    for label in expect:
        for key in ("tp", "fp", "fn", "precision", "recall", "f1", "mean_iou", "ap", "ap50", "recommended_threshold"):
            assert cli["labels"][label][key] == report["labels"][label][key], (label, key)
    stored = requests.get(f"{url}/api/predictions", params={"project": pid}, headers=headers).json()
    assert len(stored) == 3  # Retrieve's: the evaluations posted none
