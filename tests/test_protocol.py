import base64
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import CONFIG, data_uri, keypoint, make_image, png_bytes, rectangle, text
from helpers import iou, rasterize
from imageserver import ImageServer
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.config import Settings
from backend.http.app import create_app
from backend.sam3.detections import Detections

W, H = 64, 48
yy, xx = np.mgrid[:H, :W]
DISK = (xx - 30) ** 2 + (yy - 24) ** 2 < 12**2


@pytest.fixture
def client(settings, engine):
    return create_app(settings, engine=engine).test_client()


def predict(client, context=None, image=None, config=CONFIG, **kw):
    task = {"id": 7, "data": {"image": image or data_uri(make_image())}}
    return client.post("/predict", json={"tasks": [task], "project": "3.1700000000", "label_config": config,
                                         "params": {"context": context}, **kw})


def test_health_reports_model_device_source_and_version(client, settings):
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["model_state"] == "ready" and body["model_loaded"] is True
    assert body["device"] == "cpu" and body["model"] == settings.model and body["dtype"] == "float32"
    assert body["model_version"].startswith("sam3-tiny")
    assert client.get("/").get_json()["model_version"] == body["model_version"]


def test_a_model_that_cannot_load_is_unhealthy_says_why_and_is_retried(settings, checkpoint, tmp_path, monkeypatch):
    import shutil

    from backend.sam3.model import Sam3Model

    monkeypatch.setattr(Sam3Model, "RETRY", (0.3, 0.3))
    folder = tmp_path / "sam3"
    app = create_app(Settings(model=str(folder), device="cpu"))
    c = app.test_client()
    deadline = time.time() + 30
    while app.config["sam3"].state != "failed" and time.time() < deadline:
        time.sleep(0.05)
    health = c.get("/health")
    assert health.status_code == 503  # Label Studio and the container health check see it unhealthy
    assert health.get_json()["model_state"] == "failed" and "no such folder" in health.get_json()["error"]
    assert "no such folder" in health.status  # the reason phrase is what Label Studio shows
    r = c.post("/setup", json={"project": "1.1", "schema": CONFIG})
    assert r.status_code == 503 and "no such folder" in r.get_json()["error"] and "no such folder" in r.status
    r = predict(c, {"result": [keypoint(50, 50)]})
    assert r.status_code == 503 and "failed to load" in r.get_json()["error"]
    shutil.copytree(checkpoint, folder)  # the folder gets mounted: the next attempt loads it
    while c.get("/health").status_code != 200 and time.time() < deadline:
        time.sleep(0.1)
    body = c.get("/health").get_json()
    assert body["model_state"] == "ready" and body["model_version"].startswith("sam3-")
    assert c.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200


def test_the_weights_content_is_in_the_model_version(checkpoint, tmp_path):
    import shutil

    from backend.sam3.model import checkpoint_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(checkpoint)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # fine-tuned: same shapes, same size, one weight differs
    weights.write_bytes(bytes(data))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(checkpoint)


def test_keypoint_click_returns_a_labelled_polygon_in_percent(client, engine, monkeypatch):
    seen = {}

    def segment(enc, points=(), labels=(), box=None, mask_threshold=0.5):
        seen.update(points=list(points), labels=list(labels), box=box)
        return DISK, 0.9

    monkeypatch.setattr(engine, "segment", segment)
    r = predict(client, {"result": [keypoint(50, 50, label="dog"), keypoint(25, 25, positive=False, style="value")]})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert seen == {"points": [(32.0, 24.0), (16.0, 12.0)], "labels": [1, 0], "box": None}
    assert len(body["results"]) == 1
    pred = body["results"][0]
    assert pred["model_version"] == body["model_version"] and pred["score"] == 0.9
    [region] = pred["result"]
    assert region["type"] == "polygonlabels" and region["from_name"] == "poly" and region["to_name"] == "image"
    assert region["value"]["polygonlabels"] == ["dog"] and region["value"]["closed"] is True
    assert region["original_width"] == W and region["original_height"] == H and region["score"] == 0.9
    assert iou(rasterize(region["value"]["points"], W, H), DISK) >= 0.98


def test_brush_and_box_outputs_follow_the_config(client, engine, monkeypatch):
    monkeypatch.setattr(engine, "segment", lambda *a, **k: (DISK, 0.8))
    brush = CONFIG.replace("PolygonLabels", "BrushLabels")
    region = predict(client, {"result": [keypoint(50, 50)]}, config=brush).get_json()["results"][0]["result"][0]
    assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    assert region["value"]["brushlabels"] == ["cat"]
    assert (np.reshape(decode_rle(region["value"]["rle"]), (H, W, 4))[:, :, 3] > 0).tolist() == DISK.tolist()
    boxes = CONFIG.replace("PolygonLabels", "RectangleLabels")
    region = predict(client, {"result": [keypoint(50, 50)]}, config=boxes).get_json()["results"][0]["result"][0]
    assert region["type"] == "rectanglelabels"
    v = region["value"]
    assert (v["x"], v["y"], v["width"], v["height"]) == pytest.approx((19 / 64 * 100, 13 / 48 * 100, 23 / 64 * 100,
                                                                        23 / 48 * 100))


def test_rectangle_prompt_reaches_the_engine_as_a_pixel_box(client, engine, monkeypatch):
    seen = {}

    def segment(enc, points=(), labels=(), box=None, mask_threshold=0.5):
        seen["box"] = box
        return DISK, 0.7

    monkeypatch.setattr(engine, "segment", segment)
    r = predict(client, {"result": [rectangle(25, 25, 50, 50)]})
    assert r.status_code == 200
    assert seen["box"] == (16.0, 12.0, 48.0, 36.0)


def test_several_pieces_become_several_regions(client, engine, monkeypatch):
    two = ((xx - 12) ** 2 + (yy - 12) ** 2 < 8**2) | ((xx - 48) ** 2 + (yy - 34) ** 2 < 9**2)
    monkeypatch.setattr(engine, "segment", lambda *a, **k: (two, 0.6))
    result = predict(client, {"result": [keypoint(20, 20)]}).get_json()["results"][0]["result"]
    assert len(result) == 2
    assert all(r["value"]["polygonlabels"] == ["cat"] for r in result)


def test_text_prompt_finds_instances_with_the_real_model(client):
    r = predict(client, {"result": [text("dog")]})
    assert r.status_code == 200
    result = r.get_json()["results"][0]["result"]
    # the tiny random model scores ~0.25 per query; the default threshold 0.5 keeps none of them
    assert result == []


def test_text_prompt_with_a_low_threshold_labels_every_instance(settings, engine):
    settings.text_threshold = 0.0
    c = create_app(settings, engine=engine).test_client()
    result = predict(c, {"result": [text("kitty")]}).get_json()["results"][0]["result"]
    assert len(result) >= 1
    assert {r["value"]["polygonlabels"][0] for r in result} == {"cat"}  # synonym of cat
    assert all(0 < r["score"] < 1 for r in result)


def test_real_click_on_the_tiny_model_gives_a_polygon(client):
    r = predict(client, {"result": [keypoint(40, 50)]})
    assert r.status_code == 200
    result = r.get_json()["results"][0]["result"]
    assert result and all(reg["type"] == "polygonlabels" and reg["value"]["polygonlabels"] == ["cat"]
                          for reg in result)
    for reg in result:
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in reg["value"]["points"])


@pytest.mark.parametrize(
    "context, message",
    [
        ({"result": [keypoint(50, 50, label="bird")]}, "'bird' is not in any output control"),
        ({"result": [keypoint(50, 50, name="ghost")]}, "unknown control 'ghost'"),
        ({"result": [keypoint(150, 50)]}, "outside the image"),
        ({"result": [text("red car")]}, "no label for this prompt"),
        ({"result": "nope"}, "must be a list"),
    ],
)
def test_bad_prompts_are_4xx_with_a_message(client, engine, context, message):
    # Checked before the image is touched: this URL, if fetched, would be refused with another message
    # (a loopback address), and no ViT pass is spent.
    before = engine.vit_passes
    r = predict(client, context, image="http://127.0.0.1:9/never-fetched.png")
    assert r.status_code == 400
    assert message in r.get_json()["error"]
    assert engine.vit_passes == before


def test_interactive_request_with_no_prompt_left_is_an_empty_answer(client, engine):
    before = engine.vit_passes
    r = predict(client, {"result": []}, image=data_uri(make_image(seed=999)))
    assert r.status_code == 200
    assert r.get_json()["results"] == [{"result": [], "score": 0.0, "model_version": r.get_json()["model_version"]}]
    assert engine.vit_passes == before  # not auto-labelled


def test_batch_without_context_gives_one_prediction_per_task_in_order(client):
    tasks = [{"id": i, "data": {"image": data_uri(make_image(seed=i))}} for i in range(3)]
    r = client.post("/predict", json={"tasks": tasks, "project": "3.1", "label_config": CONFIG})
    results = r.get_json()["results"]
    assert r.status_code == 200 and len(results) == 3
    assert all(p["model_version"] == r.get_json()["model_version"] for p in results)


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        (dict(data="not json", content_type="application/json"), 400, "not valid JSON"),
        (dict(json=[1, 2]), 400, "JSON object"),
        (dict(json={"label_config": CONFIG}), 400, "'tasks' must be a non-empty list"),
        (dict(json={"tasks": [], "label_config": CONFIG}), 400, "'tasks' must be a non-empty list"),
        (dict(json={"tasks": ["x"], "label_config": CONFIG}), 400, "every task must be an object"),
        (dict(json={"tasks": [{"id": 1, "data": {}}], "project": "99.1"}), 400, "label_config is required"),
        (dict(json={"tasks": [{"id": 1, "data": {"img": "x"}}], "label_config": CONFIG,
                    "params": {"context": {"result": [keypoint(1, 1)]}}}), 400, "no 'image' field"),
        (dict(json={"tasks": [{"id": 1, "data": {}}], "label_config": "<View>"}), 400, "could not be parsed"),
    ],
)
def test_bad_bodies_are_4xx_json(client, kwargs, status, message):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status
    assert message in r.get_json()["error"]


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").get_json()
    assert client.get("/predict").status_code == 405


@pytest.mark.parametrize(
    "image, status, message",
    [
        ("http://127.0.0.1:9/x.png", 422, "could not fetch the task's image"),
        ("/data/upload/1/x.png", 422, "no Label Studio URL is known"),
        ("s3://bucket/x.png", 422, "s3:// URLs are not fetched"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), 422, "not a readable image"),
    ],
)
def test_unreadable_images_are_4xx(client, image, status, message):
    r = predict(client, {"result": [keypoint(50, 50)]}, image=image)
    assert r.status_code == status
    assert message in r.get_json()["error"]


def test_oversize_images_are_refused_before_decoding(settings, engine):
    settings.max_image_pixels = 1000
    c = create_app(settings, engine=engine).test_client()
    r = predict(c, {"result": [keypoint(50, 50)]})
    assert r.status_code == 413 and "64x48 pixels, over" in r.get_json()["error"]
    settings.max_image_pixels, settings.max_image_mb = 1e8, 0.001
    server = ImageServer({"/big.png": png_bytes(make_image(200, 200))})
    settings.allowed_hosts = server.url.split("//")[1]  # a loopback image server, allowed by host:port
    try:
        r = predict(create_app(settings, engine=engine).test_client(), {"result": [keypoint(50, 50)]},
                    image=server.url + "/big.png")
    finally:
        server.close()
    assert r.status_code == 413 and "over the 0 MB limit" in r.get_json()["error"]


def test_exif_orientation_is_applied(client, engine, monkeypatch):
    image = make_image(64, 48)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: the image Label Studio shows is 48 wide and 64 high
    uri = "data:image/jpeg;base64," + base64.b64encode(png_bytes(image, "JPEG", exif=exif)).decode()
    sizes = []
    monkeypatch.setattr(engine, "segment", lambda enc, *a, **k: (sizes.append((enc.width, enc.height)) or
                                                                 np.ones((enc.height, enc.width), bool), 0.5))
    region = predict(client, {"result": [keypoint(50, 50)]}, image=uri).get_json()["results"][0]["result"][0]
    assert sizes == [(48, 64)]
    assert (region["original_width"], region["original_height"]) == (48, 64)


def test_token_goes_to_label_studio_only(settings, engine):
    ls = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())}, token="secret-token")
    other = ImageServer({"/pic.png": png_bytes(make_image(seed=2))})
    settings.allowed_hosts = other.url.split("//")[1]
    try:
        c = create_app(settings, engine=engine).test_client()
        c.post("/setup", json={"project": "3.1700000000", "schema": CONFIG, "hostname": ls.url,
                               "access_token": "secret-token"})
        r = predict(c, {"result": [keypoint(50, 50)]}, image="/data/upload/3/a.png")
        assert r.status_code == 200, r.get_json()
        assert ls.requests[-1][1].get("Authorization") == "Token secret-token"
        r = predict(c, {"result": [keypoint(50, 50)]}, image=other.url + "/pic.png")
        assert r.status_code == 200
        assert other.requests and all("Authorization" not in h for _, h in other.requests)
        # a full URL on the Label Studio origin is Label Studio's: it gets the token
        r = predict(c, {"result": [keypoint(50, 50)]}, image=ls.url + "/data/upload/3/a.png?x=1")
        assert r.status_code == 200
    finally:
        ls.close()
        other.close()


def test_label_studio_401_names_the_fix(settings, engine):
    ls = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())}, token="right")
    try:
        settings.label_studio_url, settings.label_studio_api_key = ls.url, "wrong"
        r = predict(create_app(settings, engine=engine).test_client(), {"result": [keypoint(50, 50)]},
                    image="/data/upload/3/a.png")
    finally:
        ls.close()
    assert r.status_code == 422 and "HTTP 401" in r.get_json()["error"]
    assert "LABEL_STUDIO_API_KEY" in r.get_json()["error"]


def jwt(exp: float) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{enc({'alg': 'HS256'})}.{enc({'exp': exp, 'token_type': 'x'})}.c2ln"


def test_personal_access_token_is_refreshed_and_sent_as_bearer(settings, engine):
    pat, access = jwt(time.time() + 86400), jwt(time.time() + 300)
    ls = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())}, token=f"Bearer {access}",
                     refresh={pat: access})
    try:
        settings.label_studio_url, settings.label_studio_api_key = ls.url, pat
        c = create_app(settings, engine=engine).test_client()
        for seed in (11, 12):  # two images: the access token is refreshed once and reused
            ls.files[f"/data/upload/3/{seed}.png"] = png_bytes(make_image(seed=seed))
            r = predict(c, {"result": [keypoint(50, 50)]}, image=f"/data/upload/3/{seed}.png")
            assert r.status_code == 200, r.get_json()
    finally:
        ls.close()
    paths = [p for p, _ in ls.requests]
    assert paths == ["/api/token/refresh/", "/data/upload/3/11.png", "/data/upload/3/12.png"]
    assert ls.requests[1][1]["Authorization"] == f"Bearer {access}"


def test_a_revoked_personal_access_token_is_a_clear_error(settings, engine):
    ls = ImageServer({"/data/upload/3/a.png": png_bytes(make_image())}, token="Bearer x", refresh={})
    try:
        settings.label_studio_url, settings.label_studio_api_key = ls.url, jwt(time.time() + 86400)
        r = predict(create_app(settings, engine=engine).test_client(), {"result": [keypoint(50, 50)]},
                    image="/data/upload/3/a.png")
    finally:
        ls.close()
    assert r.status_code == 422 and "refused the personal access token" in r.get_json()["error"]


def test_concurrent_requests_are_served_safely(settings, engine):
    app = create_app(settings, engine=engine)
    images = [data_uri(make_image(seed=200 + i)) for i in range(3)]

    def one(i):
        r = app.test_client().post("/predict", json={
            "tasks": [{"id": i, "data": {"image": images[i % 3]}}], "project": "3.1", "label_config": CONFIG,
            "params": {"context": {"result": [keypoint(10 + 10 * (i % 4), 50)]}}})
        return r.status_code, json.dumps(r.get_json()["results"][0]["result"], sort_keys=True)

    serial = [one(i) for i in range(12)]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(one, range(12)))
    strip = lambda rs: [(code, re.sub(r'"id": "\w+"', "", body)) for code, body in rs]  # noqa: E731
    assert strip(parallel) == strip(serial)
    assert all(code == 200 for code, _ in parallel)


def test_webhook_is_acknowledged(client):
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 1}})
    assert r.status_code == 200 and r.get_json()["action"] == "ANNOTATION_CREATED"


def test_metrics_count_requests_forward_time_and_cache(client):
    predict(client, {"result": [keypoint(40, 50)]})
    predict(client, {"result": [keypoint(60, 50)]})
    body = client.get("/metrics").get_data(as_text=True)
    assert 'sam3_http_requests_total{method="POST",route="/predict",status="200"}' in body
    assert "sam3_http_request_seconds_bucket" in body
    assert 'sam3_model_forward_seconds_count{stage="segment"}' in body
    assert 'sam3_encoding_cache_total{result="hit"}' in body


def test_basic_auth_protects_every_route(settings, engine):
    settings.basic_auth_user, settings.basic_auth_pass = "ls", "pw"
    c = create_app(settings, engine=engine).test_client()
    for method, path in [("get", "/health"), ("get", "/"), ("post", "/setup"), ("post", "/predict"),
                         ("post", "/webhook"), ("get", "/metrics")]:
        r = getattr(c, method)(path, json={})
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Basic")
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:nope").decode()}
    assert c.get("/health", headers=good).status_code == 200
    assert c.get("/health", headers=bad).status_code == 401
    assert c.get("/health", headers={"Authorization": "Basic %%%"}).status_code == 401


def test_auth_off_by_default(client):
    assert client.get("/health").status_code == 200


def test_16_bit_images_are_scaled_by_their_range_not_clipped(settings, engine):
    from backend.labelstudio.media import ImageLoader

    ramp = (np.arange(64 * 48).reshape(48, 64) * 4095 // (64 * 48 - 1)).astype(np.uint16)  # 12-bit data
    img16 = Image.fromarray(ramp)  # uint16 data: mode I;16
    buf = io.BytesIO()
    img16.save(buf, "PNG")
    rgb = np.asarray(ImageLoader(None).decode(buf.getvalue()))
    assert rgb.shape == (48, 64, 3) and (rgb[..., 0] == rgb[..., 1]).all()
    assert rgb.min() == 0 and rgb.max() == 255
    assert (rgb[..., 0] >= 250).mean() < 0.05  # not the 99.5 % white that clipping gave
    assert np.abs(rgb[..., 0].astype(int) - (ramp.astype(int) * 255 // 4095)).max() <= 1
    flat = Image.fromarray(np.full((4, 4), 700, np.uint16))
    buf = io.BytesIO()
    flat.save(buf, "PNG")
    assert np.asarray(ImageLoader(None).decode(buf.getvalue())).max() == 0
    r = predict(create_app(settings, engine=engine).test_client(), {"result": [keypoint(50, 50)]},
                image="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    assert r.status_code == 200


def test_setup_says_when_the_token_it_was_given_cannot_read_label_studio(settings, engine):
    """Legacy tokens off (Label Studio's default): /setup gets a token Label Studio refuses. Say so at once."""
    ls = ImageServer({}, token="Token valid-pat-access")
    closed = ImageServer({})
    closed.close()
    try:
        c = create_app(settings, engine=engine).test_client()
        r = c.post("/setup", json={"project": "3.1", "schema": CONFIG, "hostname": ls.url,
                                   "access_token": "disabled-legacy-token"})
        assert r.status_code == 424
        assert "refused the token" in r.get_json()["error"] and "LABEL_STUDIO_API_KEY" in r.status
        assert ls.requests[-1][0] == "/api/projects/3"
        r = c.post("/setup", json={"project": "3.1", "schema": CONFIG, "hostname": closed.url, "access_token": "t"})
        assert r.status_code == 424 and "cannot reach Label Studio" in r.get_json()["error"]
        r = c.post("/setup", json={"project": "3.1", "schema": CONFIG, "hostname": ls.url,
                                   "access_token": "valid-pat-access"})
        assert r.status_code == 200  # (the mock has no project 3: 404 is not a token problem)
    finally:
        ls.close()


TWO_IMAGES = """<View>
  <Image name="left" value="$left"/>
  <Image name="right" value="$right"/>
  <KeyPointLabels name="kp_left" toName="left" smart="true"><Label value="cat"/></KeyPointLabels>
  <KeyPointLabels name="kp_right" toName="right" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
  <PolygonLabels name="poly_left" toName="left"><Label value="cat"/></PolygonLabels>
  <RectangleLabels name="box_right" toName="right"><Label value="cat"/><Label value="dog"/></RectangleLabels>
</View>"""


def test_each_image_of_a_two_image_config_is_answered_on_its_own(settings, engine, monkeypatch):
    left, right = make_image(64, 48, seed=1), make_image(80, 60, seed=2)
    task = {"id": 1, "data": {"left": data_uri(left), "right": data_uri(right)}}
    sizes = []

    def segment(enc, *a, **k):
        sizes.append((enc.width, enc.height))
        return np.ones((enc.height, enc.width), bool), 0.7

    monkeypatch.setattr(engine, "segment", segment)
    c = create_app(settings, engine=engine).test_client()
    click_right = dict(keypoint(50, 50, label="dog", name="kp_right"), to_name="right")
    r = c.post("/predict", json={"tasks": [task], "label_config": TWO_IMAGES, "project": "5.1",
                                 "params": {"context": {"result": [click_right]}}})
    assert r.status_code == 200, r.get_json()
    [region] = r.get_json()["results"][0]["result"]
    assert sizes == [(80, 60)]  # the click was answered on the image it was made on
    assert (region["from_name"], region["to_name"], region["original_width"]) == ("box_right", "right", 80)
    r = c.post("/predict", json={"tasks": [task], "label_config": TWO_IMAGES, "project": "5.1",
                                 "params": {"context": {"result": [dict(keypoint(50, 50, label="dog", name="kp_left"),
                                                                         to_name="left")]}}})
    assert r.status_code == 400 and "'dog' is not in any output control on image 'left'" in r.get_json()["error"]

    def detect(enc, prompts, threshold=0.5, mask_threshold=0.5, max_keep=100, exemplars=()):
        out = []
        for p in prompts:  # cat on the left half, dog on the right half
            mask = np.zeros((1, enc.height, enc.width), bool)
            mask[0, :, : enc.width // 2] = p == "cat"
            mask[0, :, enc.width // 2:] = p == "dog"
            out.append(Detections(mask, np.array([0.9]), [p]))
        return out

    monkeypatch.setattr(engine, "detect", detect)
    r = c.post("/predict", json={"tasks": [task], "label_config": TWO_IMAGES, "project": "5.1"})
    regions = r.get_json()["results"][0]["result"]
    placed = sorted((g["from_name"], g["to_name"], g["original_width"], g["value"][g["type"]][0]) for g in regions)
    assert placed == [("box_right", "right", 80, "cat"), ("box_right", "right", 80, "dog"),
                      ("poly_left", "left", 64, "cat")]


def test_typed_prompts_follow_the_project_thresholds(settings, engine, monkeypatch):
    def detect(enc, prompts, threshold=0.5, mask_threshold=0.5, max_keep=100, exemplars=()):
        masks = np.zeros((3, enc.height, enc.width), bool)
        masks[0, :10, :10], masks[1, 20:30, 20:30], masks[2, 30:40, 40:60] = True, True, True
        found = [(m, s) for m, s in zip(masks, [0.9, 0.45, 0.35]) if s > threshold][:max_keep]
        return [Detections(np.array([m for m, _ in found]).reshape(-1, enc.height, enc.width),
                           np.array([s for _, s in found]), [p] * len(found)) for p in prompts]

    monkeypatch.setattr(engine, "detect", detect)
    c = create_app(settings, engine=engine).test_client()
    counts = {}
    for extra in [None, {"thresholds": {"confidence": 0.4}}, {"thresholds": {"per_label": {"cat": 0.3}}},
                  {"thresholds": {"confidence": 0.3, "max_detections": 2}}]:
        assert c.post("/setup", json={"project": "3.1", "schema": CONFIG, "extra_params": extra}).status_code == 200
        r = predict(c, {"result": [text("kitty")]})
        counts[str(extra)] = len(r.get_json()["results"][0]["result"])
    assert list(counts.values()) == [1, 2, 3, 2]  # the same rule as batch and jobs


def test_label_studio_reads_a_refused_click_in_the_prompt_box_other_clients_get_a_4xx(client):
    context = {"result": [text("red car")]}
    r = predict(client, context)
    assert r.status_code == 400 and "no label for this prompt" in r.get_json()["error"]
    r = client.post(
        "/predict", headers={"User-Agent": "heartex/1.23.2"},
        json={"tasks": [{"id": 7, "data": {"image": data_uri(make_image())}}], "project": "3.1", "label_config": CONFIG,
              "params": {"context": context}})
    assert r.status_code == 200
    [answer] = r.get_json()["results"]
    assert "no label for this prompt" in answer["error"]
    [line] = answer["result"]
    assert (line["type"], line["from_name"], line["to_name"]) == ("textarea", "prompt", "image")
    assert line["value"]["text"][0] == "red car" and line["value"]["text"][1].startswith("SAM 3 could not answer: no label")


EXEMPLARS = CONFIG.replace('<TextArea name="prompt"', '''<RectangleLabels name="like" toName="image" smart="true" exemplars="true">
    <Label value="cat"/><Label value="dog"/>
  </RectangleLabels>
  <TextArea name="prompt"''')


def test_an_exemplar_box_finds_every_instance_like_it(settings, engine, monkeypatch):
    seen = {}

    def detect(enc, prompts, threshold=0.5, mask_threshold=0.5, max_keep=100, exemplars=()):
        seen.update(prompts=list(prompts), exemplars=list(exemplars))
        masks = np.zeros((2, enc.height, enc.width), bool)
        masks[0, 5:15, 5:15], masks[1, 25:40, 30:50] = True, True
        return [Detections(masks, np.array([0.9, 0.8]), [p, p]) for p in prompts]

    monkeypatch.setattr(engine, "detect", detect)
    like = dict(rectangle(25, 25, 50, 50, label="dog", name="like"), is_positive=True)
    unlike = dict(rectangle(0, 0, 10, 10, label="dog", name="like"), is_positive=False)
    r = predict(create_app(settings, engine=engine).test_client(), {"result": [like, unlike]}, config=EXEMPLARS)
    assert r.status_code == 200, r.get_json()
    assert seen == {"prompts": ["dog"], "exemplars": [((16.0, 12.0, 48.0, 36.0), 1), ((0.0, 0.0, 6.4, 4.8), 0)]}
    regions = r.get_json()["results"][0]["result"]
    assert len(regions) == 2 and {g["value"]["polygonlabels"][0] for g in regions} == {"dog"}
    assert {g["from_name"] for g in regions} == {"poly"}  # exemplar boxes are prompts, never the output
    plain = predict(create_app(settings, engine=engine).test_client(), {"result": [rectangle(25, 25, 50, 50)]},
                    config=EXEMPLARS)  # the README's smart rectangle stays "this one object"
    assert plain.status_code == 200 and len(plain.get_json()["results"][0]["result"]) >= 1
