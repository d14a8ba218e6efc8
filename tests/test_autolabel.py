from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import CONFIG, data_uri, make_image

from backend.annotate.autolabel import AutoLabeler
from backend.annotate.labelconfig import LabelConfig
from backend.annotate.ontology import Entry, Thresholds, parse_ontology
from backend.annotate.task import Task
from backend.errors import BackendError
from backend.http.app import create_app
from backend.sam3.detections import Detections

W, H = 64, 48
yy, xx = np.mgrid[:H, :W]
CAT = (xx - 15) ** 2 + (yy - 20) ** 2 < 9**2
CAT_SHIFTED = (xx - 16) ** 2 + (yy - 20) ** 2 < 9**2
DOG = (xx >= 40) & (xx < 60) & (yy >= 10) & (yy < 40)
SPECK = (xx >= 2) & (xx < 5) & (yy >= 40) & (yy < 43)
BIRD = (xx - 30) ** 2 + (yy - 40) ** 2 < 5**2
KNOWN = {  # prompt -> [(mask, score)]
    "kitty": [(CAT, 0.9)],
    "cat": [(CAT_SHIFTED, 0.8)],
    "dog": [(DOG, 0.6), (SPECK, 0.7)],
    "feline": [(BIRD, 0.3)],
}
CFG = LabelConfig.parse(CONFIG)


@pytest.fixture
def stub(engine, monkeypatch):
    """The real tiny engine (real image encoding), with a detector that returns known masks."""
    calls = []

    def detect(enc, prompts, threshold=0.5, mask_threshold=0.5, max_keep=100, exemplars=()):
        calls.append(list(prompts))
        out = []
        for p in prompts:
            found = sorted([(m, s) for m, s in KNOWN.get(p, []) if s > threshold], key=lambda f: -f[1])[:max_keep]
            out.append(Detections(np.array([m for m, _ in found], bool).reshape(-1, H, W),
                                  np.array([s for _, s in found], np.float32), [p] * len(found)))
        return out

    monkeypatch.setattr(engine, "detect", detect)
    engine.calls = calls
    return engine


def label(engine, entries, **th):
    enc = engine.encode(make_image())
    return AutoLabeler(engine, entries, Thresholds.from_dict(th)).label(enc)


def test_default_ontology_is_labels_plus_predicted_values():
    entries = parse_ontology(None, CFG)
    assert [(e.prompt, e.label) for e in entries] == [("cat", "cat"), ("kitty", "cat"), ("feline", "cat"),
                                                      ("dog", "dog")]


def test_roboflow_ontology_formats():
    assert parse_ontology({"a small kitty": "cat"}, CFG) == [Entry("a small kitty", "cat")]
    assert parse_ontology(["dog"], CFG) == [Entry("dog", "dog")]
    assert parse_ontology('[{"prompt": "puppy", "label": "dog", "threshold": 0.7}]', CFG) == [
        Entry("puppy", "dog", 0.7)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"red car": "car"}, "label(s) ['car'] that the label config does not have; valid labels: cat, dog"),
        (["cat", "bird"], "['bird']"),
        ([{"label": "cat"}], "must be a string or an object with a 'prompt'"),
        ([{"prompt": "cat", "threshold": 2}], "between 0 and 1"),
        ("{not json", "not valid JSON"),
        (42, "ontology must be"),
    ],
)
def test_bad_ontologies_are_refused_with_the_valid_labels(spec, message):
    with pytest.raises(BackendError) as e:
        parse_ontology(spec, CFG)
    assert message in e.value.message


def test_synonyms_map_to_their_label_and_nms_keeps_the_best(stub):
    dets = label(stub, parse_ontology(None, CFG), confidence=0.5)
    # kitty (0.9) and cat (0.8) found the same object: one region, the higher score
    assert dets.labels == ["cat", "dog", "dog"]
    assert list(dets.scores) == pytest.approx([0.9, 0.7, 0.6])
    assert (dets.masks[0] == CAT).all()
    assert stub.calls[-1] == ["cat", "kitty", "feline", "dog"]  # all prompts in one decoder call


def test_without_nms_both_duplicates_stay(stub):
    dets = label(stub, parse_ontology(None, CFG), confidence=0.5, nms=False)
    assert dets.labels.count("cat") == 2


def test_per_label_and_per_prompt_thresholds(stub):
    dets = label(stub, parse_ontology(None, CFG), confidence=0.5, per_label={"dog": 0.65})
    assert dets.labels == ["cat", "dog"] and dets.scores[1] == pytest.approx(0.7)
    dets = label(stub, [Entry("feline", "cat", 0.2), Entry("dog", "dog")], confidence=0.5)
    assert dets.labels == ["dog", "dog", "cat"]
    assert dets.scores[2] == pytest.approx(0.3)


def test_max_detections_and_min_area(stub):
    entries = parse_ontology(None, CFG)
    assert label(stub, entries, max_detections=2).labels == ["cat", "dog"]
    dets = label(stub, entries, min_area=20)  # the 9-pixel speck goes
    assert dets.labels == ["cat", "dog"] and dets.scores[1] == pytest.approx(0.6)


def test_bad_thresholds_are_refused():
    for bad, message in [({"confidence": 1.5}, "between 0 and 1"), ({"speed": 1}, "unknown threshold"),
                         ({"max_detections": 0}, "from 1 to 1000"), ({"confidence": "high"}, "must be a number"),
                         ({"confidence": float("inf")}, "finite"), ({"min_area": 10**400}, "must be a number"),
                         ({"confidence": True}, "must be a number"), ({"per_label": {"cat": [1]}}, "must be a number")]:
        with pytest.raises(BackendError, match=message):
            Thresholds.from_dict(bad)


def batch(client, tasks, config=CONFIG):
    return client.post("/predict", json={"tasks": tasks, "project": "5.1", "label_config": config})


def test_batch_gives_one_prediction_per_task_in_order_with_a_broken_image(settings, stub):
    client = create_app(settings, engine=stub).test_client()
    tasks = [
        {"id": 1, "data": {"image": data_uri(make_image(seed=1))}},
        {"id": 2, "data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}},  # not an image
        {"id": 3, "data": {"image": data_uri(make_image(seed=3))}},
        {"id": 4, "data": {}},  # no image field
        {"id": 5, "data": {"image": data_uri(make_image(seed=5))}},
    ]
    r = batch(client, tasks)
    assert r.status_code == 200, r.get_json()
    results = r.get_json()["results"]
    assert len(results) == 5
    # A task that could not be labelled gets no "result": Label Studio stores nothing for it, so it is
    # not marked as predicted by this model_version and a later Retrieve Predictions tries it again.
    assert ["result" in p for p in results] == [True, False, True, False, True]
    assert [bool(p.get("result")) for p in results] == [True, False, True, False, True]
    assert "not a readable image" in results[1]["error"] and "no 'image' field" in results[3]["error"]
    for p in results:
        assert p["model_version"] == r.get_json()["model_version"]
    good = results[0]
    assert {reg["value"]["polygonlabels"][0] for reg in good["result"]} == {"cat", "dog"}
    assert all(reg["from_name"] == "poly" and "score" in reg for reg in good["result"])
    assert good["score"] == pytest.approx(np.mean([0.9, 0.7, 0.6]), abs=1e-3)


def test_every_output_control_with_the_label_gets_regions(settings, stub):
    config = CONFIG.replace("</View>", """<RectangleLabels name="boxes" toName="image">
        <Label value="dog"/></RectangleLabels></View>""")
    client = create_app(settings, engine=stub).test_client()
    result = batch(client, [{"id": 1, "data": {"image": data_uri(make_image())}}], config).get_json()["results"][0]
    kinds = sorted((r["from_name"], r["value"].get("polygonlabels", r["value"].get("rectanglelabels"))[0])
                   for r in result["result"])
    # the 9-pixel speck is below SAM3_MIN_PIECE_AREA for every kind of region
    assert kinds == [("boxes", "dog"), ("poly", "cat"), ("poly", "dog")]
    box = next(r["value"] for r in result["result"] if r["from_name"] == "boxes" and r["score"] == 0.6)
    assert (box["x"], box["y"], box["width"], box["height"]) == pytest.approx((62.5, 10 / 48 * 100, 31.25,
                                                                              30 / 48 * 100))


def test_model_version_follows_checkpoint_ontology_and_thresholds(settings, engine):
    client = create_app(settings, engine=engine).test_client()

    def setup(extra=None):
        r = client.post("/setup", json={"project": "9.1", "schema": CONFIG, "extra_params": extra})
        return r.status_code, r.get_json()

    base = setup()[1]["model_version"]
    assert setup()[1]["model_version"] == base
    onto = setup({"ontology": {"kitten": "cat"}})[1]["model_version"]
    th = setup({"thresholds": {"confidence": 0.3}})[1]["model_version"]
    assert len({base, onto, th}) == 3
    assert all(v.startswith("sam3-tiny") for v in (base, onto, th))
    status, body = setup({"ontology": {"red car": "car"}})
    assert status == 400 and "valid labels: cat, dog" in body["error"]


def test_model_version_changes_with_what_changes_the_output_and_only_with_that(settings, engine):
    """"Skip tasks that have this version" must not skip a task predicted before a brush was added."""
    from dataclasses import replace

    from backend.annotate.backend import SAM3Backend
    from backend.sam3.model import Sam3Model

    sam3 = Sam3Model(settings, engine)
    brush = CONFIG.replace("</View>", '<BrushLabels name="mask" toName="image"><Label value="cat"/>'
                                      '<Label value="dog"/></BrushLabels></View>')
    boxes = CONFIG.replace("PolygonLabels", "RectangleLabels").replace('name="rect" toName="image" smart="true"',
                                                                       'name="rect2" toName="image" smart="true"')

    def version(config=CONFIG, **changes):
        return SAM3Backend(label_config=config, settings=replace(settings, **changes), sam3=sam3).model_version

    base = version()
    changed = {
        "a brush added": version(brush),
        "boxes instead of polygons": version(boxes),
        "polygon tolerance": version(polygon_tolerance=2.0),
        "holes off": version(polygon_holes=False),
        "point cap": version(max_polygon_points=500),
        "pieces cap": version(max_pieces=4),
        "speck size": version(min_piece_area=64),
        "mask threshold": version(mask_threshold=0.6),
        "max detections": version(max_detections=10),
    }
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed
    same = [version(cache_mb=10), version(encode_batch=4), version(predict_budget=30), version(max_image_mb=8),
            version(device="cuda"), version(video_max_objects=3)]  # no video output here: video settings do not count
    assert set(same) == {base}
    # a brush-only config does not change with polygon settings
    brush_only = CONFIG.replace("PolygonLabels", "BrushLabels")
    assert version(brush_only) == version(brush_only, polygon_tolerance=3.0, max_polygon_points=10)
    assert version(brush_only) != version(brush_only, min_piece_area=64)


def test_a_job_labels_with_its_own_outline_whatever_the_worker_environment(settings, engine):
    from dataclasses import replace

    from backend.jobs.lifecycle import project_for
    from backend.jobs.record import JobRequest
    from backend.sam3.model import Sam3Model

    sam3 = Sam3Model(settings, engine)
    service = project_for(settings, sam3, None, CONFIG, JobRequest())
    recorded = JobRequest(**service.job_request())  # what lifecycle.create stores in the job
    worker_env = replace(settings, polygon_tolerance=4.0, max_polygon_points=50, mask_threshold=0.7)
    worker = project_for(worker_env, sam3, None, CONFIG, recorded)
    assert worker.model_version == service.model_version
    assert worker.outline == service.outline and worker.outline.tolerance == settings.polygon_tolerance
    assert project_for(worker_env, sam3, None, CONFIG, JobRequest()).model_version != service.model_version


def test_env_ontology_applies_when_setup_has_none(settings, stub):
    settings.ontology = '{"dog": "dog"}'
    client = create_app(settings, engine=stub).test_client()
    result = batch(client, [{"id": 1, "data": {"image": data_uri(make_image())}}]).get_json()["results"][0]
    assert {r["value"]["polygonlabels"][0] for r in result["result"]} == {"dog"}
    assert stub.calls[-1] == ["dog"]


def test_each_image_is_encoded_once_in_chunks(settings, engine):
    tasks = [{"id": i, "data": {"image": data_uri(make_image(seed=100 + i))}} for i in range(6)]
    client = create_app(settings, engine=engine).test_client()
    before = engine.vit_passes
    assert len(batch(client, tasks).get_json()["results"]) == 6
    assert engine.vit_passes - before == 6  # the service: one image per forward, so a click waits for one at most
    settings.encode_batch = 4  # a worker: no clicks wait on it
    tasks = [{"id": i, "data": {"image": data_uri(make_image(seed=200 + i))}} for i in range(6)]
    client = create_app(settings, engine=engine).test_client()
    before = engine.vit_passes
    assert len(batch(client, tasks).get_json()["results"]) == 6
    assert engine.vit_passes - before == 2  # two chunks of up to 4 images, one ViT forward each


def test_a_failing_batch_encode_falls_back_to_one_image_at_a_time(settings, engine, monkeypatch):
    settings.encode_batch = 4
    bad = make_image(seed=666)
    real = engine.encode_many

    def encode_many(images, keys=None):  # out of memory for any batch holding the bad image
        if any(im.tobytes() == bad.tobytes() for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(images, keys)

    monkeypatch.setattr(engine, "encode_many", encode_many)
    images = [make_image(seed=300 + i) for i in range(3)] + [bad]
    tasks = [{"id": i, "data": {"image": data_uri(im)}} for i, im in enumerate(images)]
    results = batch(create_app(settings, engine=engine).test_client(), tasks).get_json()["results"]
    assert ["result" in r for r in results] == [True, True, True, False]  # only the image that fails alone fails
    assert "out of memory" in results[3]["error"]


def test_each_image_is_fetched_once_and_results_keep_input_order():
    class Engine:  # enough of an engine for the scheduling: no model needed
        def encode_many(self, images):
            return [SimpleNamespace(height=2, width=2, image=im) for im in images]

        def detect(self, enc, prompts, threshold=0.5, mask_threshold=0.5, max_keep=100, exemplars=()):
            return [Detections.empty(2, 2) for _ in prompts]

    loads = Counter()

    def load(i):
        loads[i] += 1
        if i == 7:
            raise BackendError("broken")
        return f"image-{i}"

    out = list(AutoLabeler(Engine(), [Entry("a", "a")], Thresholds()).run(range(40), load))
    assert loads == Counter(range(40))  # 40 downloads for 40 images, however far the prefetch runs ahead
    assert [item for item, *_ in out] == list(range(40))
    assert [image for _, image, _, _ in out][:3] == ["image-0", "image-1", "image-2"]
    assert out[7][1:3] == (None, None) and out[7][3].message == "broken"
    assert all(err is None for i, (_, _, _, err) in enumerate(out) if i != 7)


def test_nms_switch_reads_the_same_words_as_the_environment():
    assert Thresholds.from_dict({"nms": "off"}).nms is False
    assert Thresholds.from_dict({"nms": "on"}).nms is True
    with pytest.raises(BackendError, match="thresholds.nms must be true or false"):
        Thresholds.from_dict({"nms": "maybe"})


def test_extra_params_that_are_not_an_object_are_refused_at_setup(settings, engine):
    client = create_app(settings, engine=engine).test_client()
    r = client.post("/setup", json={"project": "9.1", "schema": CONFIG, "extra_params": "ontology=cat"})
    assert r.status_code == 400 and "extra_params is not valid JSON" in r.get_json()["error"]
    r = client.post("/setup", json={"project": "9.1", "schema": CONFIG, "extra_params": [1]})
    assert r.status_code == 400 and "extra_params must be a JSON object" in r.get_json()["error"]


DOCUMENTED = [  # the forms docs/pre-annotation.md shows, with this config's labels
    ({"kitten": "cat", "puppy": "dog"}, [Entry("kitten", "cat"), Entry("puppy", "dog")]),
    (["cat", "dog"], [Entry("cat", "cat"), Entry("dog", "dog")]),
    ([{"prompt": "puppy", "label": "dog", "threshold": 0.6}], [Entry("puppy", "dog", 0.6)]),
]


@pytest.mark.parametrize("ontology, entries", DOCUMENTED)
def test_every_documented_ontology_form_works_in_extra_params_and_the_environment(settings, engine, ontology,
                                                                                 entries):
    import json

    from backend.annotate.backend import SAM3Backend
    from backend.sam3.model import Sam3Model

    sam3 = Sam3Model(settings, engine)
    wrapped = {"ontology": ontology, "thresholds": {"confidence": 0.3}}
    seen = []
    for env, extra in [("", wrapped), ("", json.dumps(wrapped)),  # an object (API), JSON text (Connect Model form)
                       (json.dumps(wrapped), None), (json.dumps(ontology), None)]:  # SAM3_ONTOLOGY wrapped, bare
        settings.ontology = env
        client = create_app(settings, engine=engine).test_client()
        r = client.post("/setup", json={"project": "9.1", "schema": CONFIG, "extra_params": extra})
        assert r.status_code == 200, (env, extra, r.get_json())
        model = client.application.config["projects"].get("9", "")
        assert model.project.ontology == entries, (env, extra)
        seen.append(model.project.thresholds.confidence)
    assert seen == [0.3, 0.3, 0.3, 0.5]  # the wrapped forms carry their thresholds; the bare one has none
    assert SAM3Backend(label_config=CONFIG, settings=settings, sam3=sam3).project.ontology == entries


def test_unknown_extra_params_are_named(settings, engine):
    client = create_app(settings, engine=engine).test_client()
    r = client.post("/setup", json={"project": "9.1", "schema": CONFIG, "extra_params": {"threshold": 0.3}})
    assert r.status_code == 400 and "unknown extra param(s) ['threshold']" in r.get_json()["error"]


def test_a_batch_stops_at_its_budget_and_hands_the_rest_on(settings, stub, monkeypatch):
    import time as _time

    real = stub.encode_many

    def slow(images, keys=None):  # 0.3 s per image
        _time.sleep(0.3 * len(images))
        return real(images, keys)

    monkeypatch.setattr(stub, "encode_many", slow)
    settings.predict_budget = 1.0
    from backend.annotate.backend import SAM3Backend
    from backend.sam3.model import Sam3Model

    model = SAM3Backend(label_config=CONFIG, settings=settings, sam3=Sam3Model(settings, stub))
    tasks = [{"id": i, "data": {"image": data_uri(make_image(seed=400 + i))}} for i in range(8)]
    handed = []
    t0 = _time.perf_counter()
    answers = model.predict([Task.from_json(t) for t in tasks],
                            handoff=lambda rest: handed.append([t.id for t in rest]) or "job42")
    took = _time.perf_counter() - t0
    assert took < 2.0 and len(answers) == 8  # one answer per task, in order, within the budget
    done = sum("result" in a for a in answers)
    assert 2 <= done <= 4 and all("result" in a for a in answers[:done])
    assert handed == [[t["id"] for t in tasks[done:]]]
    assert all("result" not in a and "background job job42" in a["error"] for a in answers[done:])
