"""Tiled pre-annotation and full-resolution clicks on large images.

The tiling, merging, cropping and coordinate logic is checked against known truth with a stand-in detector at the
engine's boundary (`discs.DiscEngine`: dark discs found by thresholding at the model's input resolution); the real
engine with the tiny checkpoint runs the same paths end to end (over HTTP and in a job)."""
import hashlib
import json

import cv2
import numpy as np
import pytest
from conftest import CONFIG, data_uri, keypoint, make_image, rectangle, text
from discs import DiscEngine, disc_image, disc_mask
from fakels import FakeLabelStudio
from PIL import ImageDraw

from backend.annotate.autolabel import AutoLabeler
from backend.annotate.labelconfig import LabelConfig
from backend.annotate.ontology import Entry, Thresholds
from backend.annotate.regions import to_regions
from backend.annotate.tiling import Tiling
from backend.config import Settings
from backend.errors import BackendError
from backend.http.app import create_app
from backend.jobs import lifecycle, runner
from backend.jobs.store import MemoryStore
from backend.labelstudio.client import LabelStudioAPI
from backend.labelstudio.retry import Backoff
from backend.sam3.model import Sam3Model

W, H = 8000, 6000
POLY = LabelConfig.parse(CONFIG).output_for("cat", "image")
POLY_CONFIG = """<View><Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels></View>"""


@pytest.mark.parametrize("value, expected", [
    (None, ("off", 0, 0.2)), ("off", ("off", 0, 0.2)), ("AUTO", ("auto", 0, 0.2)), ("1008:0.25", ("fixed", 1008, 0.25)),
    ("640", ("fixed", 640, 0.2)), ({"tile": 1008, "overlap": 0.1}, ("fixed", 1008, 0.1)), ({"mode": "auto"},
    ("auto", 0, 0.2)), ({"mode": "fixed", "tile": 512, "overlap": 0.3, "merge_iou": 0.6}, ("fixed", 512, 0.3)),
])
def test_every_documented_tiling_form_is_read(value, expected):
    t = Tiling.parse(value)
    assert (t.mode, t.tile, t.overlap) == expected
    assert Tiling.parse(t.spec()) == t  # what a job records reads back the same


@pytest.mark.parametrize("value, message", [
    ("1008:0", "overlap must be from 0.05"), ("1008:0.9", "overlap must be from"), ("12", "tile must be a whole"),
    ("big", "tiling tile must be a number"), ({"tile": 1008, "stride": 3}, "unknown key(s) ['stride']"),
    ({"overlap": 0.2}, "must be \"off\""), ([1008], "must be \"off\""), ({"tile": 100.5}, "whole number"),
    ({"mode": "auto", "merge_iou": 0}, "merge_iou must be above 0"),
])
def test_bad_tiling_is_refused_with_what_is_wrong(value, message):
    with pytest.raises(BackendError) as e:
        Tiling.parse(value)
    assert message in e.value.message


def test_tiles_cover_the_image_and_overlap_by_at_least_the_setting():
    grid = Tiling.parse("1008:0.2").grid(W, H, 1008)
    covered = np.zeros((H // 8, W // 8), int)  # 8 px cells: every one is inside a tile
    for x0, y0, x1, y1 in grid:
        assert (x1 - x0, y1 - y0) == (1008, 1008) and 0 <= x0 and x1 <= W and 0 <= y0 and y1 <= H
        covered[y0 // 8:y1 // 8, x0 // 8:x1 // 8] += 1
    assert covered.min() >= 1
    xs = sorted({g[0] for g in grid})
    assert min(b - a for a, b in zip(xs, xs[1:])) <= 1008 * 0.8  # neighbours share at least 20 % of a tile
    assert len(grid) == len(xs) * len({g[1] for g in grid}) == 80
    auto = Tiling.parse("auto")
    assert auto.grid(2016, 1500, 1008) is None  # at most twice the model's input: one pass, as before
    assert len(auto.grid(2017, 1500, 1008)) == 6
    assert Tiling.parse("2000:0.2").grid(1900, 1000, 1008) is None  # fits one tile


def test_more_tiles_than_the_cap_is_refused_naming_the_setting():
    with pytest.raises(BackendError) as e:
        Tiling.parse("256:0.2", max_tiles=100).grid(W, H, 1008)
    assert e.value.status == 413 and "SAM3_MAX_TILES" in e.value.message and "tiles of 256 px" in e.value.message


def scene(seed=0, width=W, height=H, count=300):
    """`count` small discs (12 px across) on a `width` x `height` image (at 8000 x 6000, 24 of them on tile
    corners and 9 on tile edges), and one large disc (1000 px) across the corner of four tiles."""
    grid = Tiling.parse("1008:0.2").grid(width, height, 1008)
    rng = np.random.RandomState(seed)
    right = sorted({g[2] for g in grid if g[2] < width})
    bottom = sorted({g[3] for g in grid if g[3] < height})
    big = (grid[0][2] - 100.0, grid[0][3] - 100.0, 500.0)
    discs = [(x - 0.5, y - 0.5, 6.0) for x in right[2:8] for y in bottom[2:6]]  # where four tiles meet
    discs += [(float(x), float(rng.uniform(1500, height - 100)), 6.0) for x in right]  # on a vertical tile edge

    def free(c):
        return (all((c[0] - d[0]) ** 2 + (c[1] - d[1]) ** 2 > 40 ** 2 for d in discs)
                and (c[0] - big[0]) ** 2 + (c[1] - big[1]) ** 2 > 560 ** 2)

    while len(discs) < count:
        c = (float(rng.uniform(10, width - 10)), float(rng.uniform(10, height - 10)), 6.0)
        if free(c):
            discs.append(c)
    return discs, big


def centroids(dets):
    out = []
    for i in range(len(dets)):
        ys, xs = np.nonzero(dets.masks[i])
        x, y = dets.origin(i)
        out.append((x + xs.mean() + 0.5, y + ys.mean() + 0.5))
    return np.array(out)


def matched(dets, discs):
    """For each disc, the detections whose centroid lies within 1 px of its centre."""
    d = np.sqrt(((centroids(dets)[:, None] - np.array([c[:2] for c in discs])[None]) ** 2).sum(-1))
    return [np.flatnonzero(d[:, j] <= 1.0) for j in range(len(discs))], d


def test_300_small_discs_are_each_found_once_where_they_are_including_on_tile_edges_and_corners():
    discs, big = scene()
    image = disc_image(W, H, discs + [big])
    engine = DiscEngine()
    enc = engine.encode(image)
    th = Thresholds(max_detections=1000)
    untiled = AutoLabeler(engine, [Entry("disc", "cat")], th).label(enc, image=image)
    assert len(untiled) == 1  # shrunk 8x, the small discs are invisible to the model: only the large one

    auto = AutoLabeler(engine, [Entry("disc", "cat")], th, chunk=4, tiling=Tiling.parse("1008:0.2"))
    dets = auto.label(enc, image=image)
    assert len(dets) == 301
    hits, dist = matched(dets, discs + [big])
    assert [len(h) for h in hits] == [1] * 301  # every disc exactly once, within a pixel
    assert len({int(h[0]) for h in hits}) == 301  # and no detection counts for two discs
    assert dist.min(1).max() <= 1.0  # no stray detection anywhere else
    one = hits[-1][0]
    full = dets.full_mask(one)
    truth = disc_mask(W, H, big)
    assert (full & truth).sum() / (full | truth).sum() > 0.99  # the large disc at native resolution, whole
    # The tiles were encoded uncached, at most `chunk` per ViT batch, after the one whole-image encoding.
    assert engine.encoded[0] == (W, H, True) and len(engine.encoded) == 1 + 80
    assert all(not cached and (w, h) == (1008, 1008) for w, h, cached in engine.encoded[1:])
    assert max(engine.batches[1:]) == 4

    # Regions in full-image percentages, every one with its label and score, in the right place.
    regions = to_regions(dets[[hits[j][0] for j in range(24)]], POLY)
    assert len(regions) == 24
    for region, (cx, cy, _) in zip(regions, discs[:24]):
        pts = np.array(region["value"]["points"]) * [W / 100, H / 100]
        assert abs(pts[:, 0].mean() - cx) < 1.5 and abs(pts[:, 1].mean() - cy) < 1.5
        assert region["value"]["polygonlabels"] == ["cat"] and region["score"] > 0
        assert (region["original_width"], region["original_height"]) == (W, H)


class TilesOnly(DiscEngine):
    """Misses everything in the whole-image pass: a large object then comes only from its tile pieces."""

    def detect(self, enc, prompts, *a, size=None, **kw):
        if size is not None:
            return [d[[]] for d in super().detect(enc, prompts, *a, size=size, **kw)]
        return super().detect(enc, prompts, *a, **kw)


@pytest.mark.parametrize("engine_class", [DiscEngine, TilesOnly])
def test_a_large_object_across_four_tiles_is_one_region_whoever_finds_it(engine_class):
    big = (1700.0, 1500.0, 700.0)  # spans tiles in both directions
    image = disc_image(4000, 3000, [big])
    engine = engine_class()
    auto = AutoLabeler(engine, [Entry("disc", "cat")], Thresholds(), tiling=Tiling.parse("1008:0.2"))
    dets = auto.label(engine.encode(image), image=image)
    assert len(dets) == 1
    full, truth = dets.full_mask(0), disc_mask(4000, 3000, big)
    assert (full & truth).sum() / (full | truth).sum() > 0.99


def test_a_long_object_cut_by_every_tile_is_one_region_not_its_pieces():
    image = disc_image(4000, 3000, [])
    ImageDraw.Draw(image).rectangle([200, 1400, 3800, 1440], fill="black")  # 3601 x 41 px, across five tiles
    engine = DiscEngine()
    auto = AutoLabeler(engine, [Entry("disc", "cat")], Thresholds(), tiling=Tiling.parse("1008:0.2"))
    dets = auto.label(engine.encode(image), image=image)
    assert len(dets) == 1 and dets.box(0) == (200, 1400, 3801, 1441)


def test_separate_objects_that_touch_across_a_tile_edge_stay_separate():
    # two discs 2 px apart either side of a tile edge: joined only where their masks agree, so two objects
    grid = Tiling.parse("1008:0.2").grid(4000, 3000, 1008)
    edge = grid[0][2]
    discs = [(edge - 9.0, 1500.0, 6.0), (edge + 6.0, 1500.0, 6.0)]
    image = disc_image(4000, 3000, discs)
    engine = DiscEngine()
    auto = AutoLabeler(engine, [Entry("disc", "cat")], Thresholds(), tiling=Tiling.parse("1008:0.2"))
    dets = auto.label(engine.encode(image), image=image)
    hits, _ = matched(dets, discs)
    assert len(dets) == 2 and [len(h) for h in hits] == [1, 1]


# ---- over HTTP: batch predict and clicks, with the stand-in and with the real tiny engine ------------------------

def setup(client, extra):
    r = client.post("/setup", json={"project": "7.1", "schema": CONFIG, "extra_params": extra})
    assert r.status_code == 200, r.get_json()
    return r.get_json()["model_version"]


def test_batch_predict_tiles_when_the_project_says_so_and_its_model_version_says_it(settings, checkpoint):
    w, h = 6000, 4000  # under the default 40 MP limit (checked before decoding)
    discs, big = scene(1, w, h, 60)
    image = disc_image(w, h, discs + [big])
    engine = DiscEngine(model_id=checkpoint)
    client = create_app(settings, engine=engine).test_client()
    task = {"id": 1, "data": {"image": data_uri(image)}}
    extra = {"ontology": {"disc": "cat"}, "thresholds": {"max_detections": 1000}}
    untiled_version = setup(client, extra)
    r = client.post("/predict", json={"tasks": [task], "project": "7.1", "label_config": CONFIG})
    assert len(r.get_json()["results"][0]["result"]) < 20  # shrunk 6 x 4 times, most small discs are unseen

    tiled_version = setup(client, {**extra, "tiling": {"tile": 1008, "overlap": 0.2}})
    assert tiled_version != untiled_version  # "skip tasks predicted by this version" keeps them apart
    r = client.post("/predict", json={"tasks": [task], "project": "7.1", "label_config": CONFIG})
    result = r.get_json()["results"][0]
    assert result["model_version"] == tiled_version
    points = [np.array(reg["value"]["points"]).mean(0) * [w / 100, h / 100] for reg in result["result"]]
    assert len(points) == 61
    for cx, cy, _ in discs + [big]:
        assert sum(np.hypot(px - cx, py - cy) < 1.5 for px, py in points) == 1


def test_env_default_tiling_and_a_clear_error_when_an_image_needs_too_many_tiles(settings, checkpoint):
    settings.tiling, settings.max_tiles = "256:0.2", 100
    client = create_app(settings, engine=DiscEngine(model_id=checkpoint)).test_client()
    setup(client, {"ontology": {"disc": "cat"}})
    tasks = [{"id": i, "data": {"image": data_uri(disc_image(w, h, [(100, 100, 6)]))}}
             for i, (w, h) in enumerate([(8000, 6000), (6000, 4000)])]
    r = client.post("/predict", json={"tasks": tasks, "project": "7.1", "label_config": CONFIG})
    over, many = r.get_json()["results"]
    assert "result" not in over and "over the 40 MP limit" in over["error"]  # the pixel limit, before decoding
    assert "result" not in many and "SAM3_MAX_TILES" in many["error"]  # the task stays unlabelled, with why
    r = client.post("/setup", json={"project": "7.2", "schema": CONFIG, "extra_params": {"tiling": "1008:2"}})
    assert r.status_code == 400 and "tiling overlap must be from" in r.get_json()["error"]


def click(client, x, y, image_url, w, h, label="cat"):
    ctx = {"result": [keypoint(x * 100 / w, y * 100 / h, label)]}
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image_url}}], "project": "7.1",
                                      "label_config": CONFIG, "params": {"context": ctx}})
    assert r.status_code == 200, r.get_json()
    return r.get_json()["results"][0]["result"]


def mask_of(region, w, h):
    pts = np.array(region["value"]["points"]) * [w / 100, h / 100]
    out = np.zeros((h, w), np.uint8)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out.astype(bool)


def test_a_click_on_a_small_object_in_a_large_image_is_answered_at_native_resolution(settings, checkpoint):
    w, h = 6000, 4000
    small, large = (3001.0, 2002.0, 15.0), (1500.0, 1500.0, 1200.0)  # a 30 px car; an object 2400 px across
    image_url = data_uri(disc_image(w, h, [small, large]))
    engine = DiscEngine(model_id=checkpoint)
    client = create_app(settings, engine=engine).test_client()
    setup(client, {})
    truth = disc_mask(w, h, small)
    got = mask_of(click(client, 3001, 2002, image_url, w, h)[0], w, h)
    iou = (got & truth).sum() / (got | truth).sum()
    assert iou > 0.9, iou  # pixel-precise; the whole image at 1008 px gives a 5 px blob
    assert engine.encoded == [(1008, 1008, True)]  # one native crop encoded, not the whole image

    passes = engine.vit_passes
    again = mask_of(click(client, 3005, 2000, image_url, w, h)[0], w, h)  # a second click near the first
    assert engine.vit_passes == passes and (again == got).all()  # the crop's encoding is reused

    # The large object reaches the first crop's edges: the crop grows until the object fits.
    truth = disc_mask(w, h, large)
    got = mask_of(click(client, 1500, 1500, image_url, w, h)[0], w, h)
    assert (got & truth).sum() / (got | truth).sum() > 0.98
    assert [size for size in engine.encoded[1:]] == [(1008, 1008, True), (2016, 2016, True), (4032, 4000, True)]

    settings.click_crop = "off"  # the whole image as before: a blob drawn on a 6x coarser grid
    client = create_app(settings, engine=DiscEngine(model_id=checkpoint)).test_client()
    setup(client, {})
    coarse = click(client, 3001, 2002, image_url, w, h)
    small_truth = disc_mask(w, h, small)
    blob = mask_of(coarse[0], w, h) if coarse else np.zeros_like(small_truth)
    assert (blob & small_truth).sum() / max(1, (blob | small_truth).sum()) < iou


def test_real_engine_tiles_a_batch_and_answers_clicks_on_crops(settings, engine):
    """The tiny checkpoint (input 112 px) through the same paths: tiles, merging, crops, caches."""
    client = create_app(settings, engine=engine).test_client()
    setup(client, {"thresholds": {"confidence": 0.05, "max_detections": 1000}, "tiling": {"tile": 112, "overlap": 0.2}})
    image = make_image(400, 300, seed=21)
    task = {"id": 1, "data": {"image": data_uri(image)}}
    before = engine.vit_passes
    r = client.post("/predict", json={"tasks": [task], "project": "7.1", "label_config": CONFIG})
    result = r.get_json()["results"][0]
    assert engine.vit_passes - before == 1 + 20  # the whole image, then 5 x 4 tiles one at a time (serve)
    assert result["result"], "random weights still find something at 0.05"
    for region in result["result"]:
        pts = np.array(region["value"]["points"])
        assert pts.min() >= 0 and pts.max() <= 100 and region["value"]["polygonlabels"][0] in ("cat", "dog")
        assert region["original_width"] == 400 and region["score"] >= 0.05
    again = client.post("/predict", json={"tasks": [task], "project": "7.1", "label_config": CONFIG}).get_json()
    assert [r["value"] for r in again["results"][0]["result"]] == [r["value"] for r in result["result"]]

    # A click on the 400 px image (over twice the 112 px input) is answered on a 112 px crop around it.
    passes = engine.vit_passes
    ctx = {"result": [keypoint(50, 50, "cat")]}
    url = data_uri(make_image(400, 300, seed=22))
    body = {"tasks": [{"id": 2, "data": {"image": url}}], "project": "7.1", "label_config": CONFIG,
            "params": {"context": ctx}}
    first = client.post("/predict", json=body).get_json()["results"][0]["result"]
    crops = engine.vit_passes - passes
    rects = [tuple(map(int, k.split(":crop:")[1].split(","))) for k in list(engine.cache._items)
             if ":crop:" in k and k.startswith(hashlib.sha1(url.encode()).hexdigest())]
    # one encoding per crop, each twice the last (112, 224, then the whole 400 x 300 image), around the click
    assert len(rects) == crops and [r[2] - r[0] for r in rects] == [112, 224, 400][:crops]
    assert all(r[0] <= 200 < r[2] and r[1] <= 150 < r[3] for r in rects)
    assert all(0 <= v <= 100 for reg in first for p in reg["value"]["points"] for v in p)
    second = client.post("/predict", json=body).get_json()["results"][0]["result"]
    assert engine.vit_passes - passes == crops  # warm: nothing encoded again
    assert [r["value"] for r in second] == [r["value"] for r in first]
    # A text prompt typed in the UI uses the project's tiling.
    passes = engine.vit_passes
    client.post("/predict", json={**body, "params": {"context": {"result": [text("cat")]}}})
    assert engine.vit_passes - passes == 1 + 20


def test_a_box_on_a_large_image_is_answered_on_a_crop_around_it(settings, checkpoint):
    w, h = 5000, 4000
    disc = (4000.0, 900.0, 40.0)
    image_url = data_uri(disc_image(w, h, [disc]))
    engine = DiscEngine(model_id=checkpoint)
    client = create_app(settings, engine=engine).test_client()
    setup(client, {})
    ctx = {"result": [rectangle(3940 * 100 / w, 840 * 100 / h, 120 * 100 / w, 120 * 100 / h)]}
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image_url}}], "project": "7.1",
                                      "label_config": CONFIG, "params": {"context": ctx}})
    region = r.get_json()["results"][0]["result"][0]
    got, truth = mask_of(region, w, h), disc_mask(w, h, disc)
    assert (got & truth).sum() / (got | truth).sum() > 0.9
    assert engine.encoded == [(1008, 1008, True)]


def test_a_job_tiles_with_the_connected_models_tiling_whatever_the_worker_environment(checkpoint, engine):
    """The real tiny engine in a job: the tiling comes from the extra params of the model connected in Label Studio,
    is recorded with the job (so a worker whose SAM3_TILING says otherwise tiles the same), and is in its
    model_version."""
    ls = FakeLabelStudio(POLY_CONFIG)
    ls.ml_backends = [{"id": 1, "extra_params": json.dumps({"thresholds": {"confidence": 0.05},
                                                            "tiling": {"tile": 112, "overlap": 0.2}})}]
    tasks = [ls.add_task({"image": data_uri(make_image(400, 300, seed=40 + i))}) for i in range(2)]
    settings = Settings(model=checkpoint, device="cpu", dtype="float32", api_retries=2)
    sam3 = Sam3Model(settings, engine)
    api = LabelStudioAPI(ls, Backoff(attempts=2, base=0.01))
    store = MemoryStore()
    job = lifecycle.create(store, api, settings, sam3, {"project": 1})
    assert job.request.tiling == {"mode": "fixed", "tile": 112, "overlap": 0.2, "merge_iou": 0.5}
    worker = Settings(model=checkpoint, device="cpu", dtype="float32", api_retries=2, tiling="off")
    before = engine.vit_passes
    runner.run_all(lifecycle.Context(worker, Sam3Model(worker, engine), store, api), job.id)
    done = store.get(job.id)
    assert done.status == "succeeded" and done.predicted == 2
    assert engine.vit_passes - before == 2 * (1 + 20)  # each image whole, then its 20 tiles
    for t in tasks:
        [prediction] = ls.of(t, job.model_version)
        assert prediction["result"] and all(r["original_width"] == 400 for r in prediction["result"])
    untiled = lifecycle.create(MemoryStore(), api, settings, sam3, {"project": 1, "tiling": "off"})
    assert untiled.model_version != job.model_version
