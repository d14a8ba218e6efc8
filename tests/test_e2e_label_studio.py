"""End to end: a real Label Studio (own virtualenv) talks to `label-studio-sam3 serve` over HTTP."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import CONFIG, free_port, keypoint, make_image, png_bytes, wait_http

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def backend_url(checkpoint, tmp_path_factory):
    """The service exactly as users start it: the console script, gunicorn, the model from a folder."""
    port = free_port()
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    env = dict(os.environ, SAM3_MODEL=checkpoint, DEVICE="cpu", LOG_LEVEL="DEBUG")
    for key in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER"):
        env.pop(key, None)  # the token must come from Label Studio's /setup
    exe = Path(sys.executable).with_name("label-studio-sam3")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, 120, log)
        deadline = time.time() + 60
        while requests.get(url + "/health").json()["model_state"] == "loading" and time.time() < deadline:
            time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def project(label_studio, backend_url):
    ls, headers, _ = label_studio
    r = requests.post(f"{ls}/api/projects", headers=headers, json={"title": "SAM 3 e2e", "label_config": CONFIG})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    for i in range(3):  # Label Studio takes one uploaded file per request
        r = requests.post(f"{ls}/api/projects/{pid}/import", headers=headers,
                          files={"file": (f"img{i}.png", png_bytes(make_image(seed=i)), "image/png")})
        assert r.status_code == 201, r.text
    tasks = requests.get(f"{ls}/api/tasks", params={"project": pid}, headers=headers).json()["tasks"]
    # The tiny random model scores every instance ~0.25: a zero threshold makes batch predictions non-empty.
    extra = {"thresholds": {"confidence": 0.0, "max_detections": 2}}
    r = requests.post(f"{ls}/api/ml", headers=headers, json={"url": backend_url[0], "project": pid, "title": "SAM 3",
                                                             "is_interactive": True, "extra_params": extra})
    assert r.status_code == 201, r.text
    ml = r.json()
    return {"id": pid, "task": tasks[0], "tasks": tasks, "ml": ml}


def test_label_studio_connects_and_stores_the_model_version(project, backend_url):
    assert project["ml"]["state"] == "CO"
    assert project["ml"]["model_version"].startswith(requests.get(backend_url[0] + "/health").json()["model_version"])


def test_keypoint_click_in_label_studio_returns_a_labelled_polygon(label_studio, project, backend_url):
    ls, headers, _ = label_studio
    image_url = project["task"]["data"]["image"]
    assert image_url.startswith("/data/upload/")
    assert requests.get(ls + image_url).status_code == 401  # Label Studio needs the token for it

    r = requests.post(f"{ls}/api/ml/{project['ml']['id']}/interactive-annotating", headers=headers,
                      json={"task": project["task"]["id"], "context": {"result": [keypoint(40, 50, label="dog")]}})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["result"], data
    for region in data["result"]:
        assert region["type"] == "polygonlabels" and region["from_name"] == "poly"
        assert region["value"]["polygonlabels"] == ["dog"]
        assert len(region["value"]["points"]) >= 3
    # the backend fetched the image from Label Studio, with the token /setup gave it
    # (Label Studio names itself "localhost" in the hostname it sends to /setup)
    port = ls.rsplit(":", 1)[1]
    log = backend_url[1].read_text()
    assert re.search(rf"fetched http://(localhost|127\.0\.0\.1):{port}{re.escape(image_url)} with the Label Studio token",
                     log), log[-2000:]


def test_batch_predictions_are_stored_one_per_task(label_studio, project, backend_url):
    ls, headers, _ = label_studio
    version = project["ml"]["model_version"]
    assert version != requests.get(backend_url[0] + "/health").json()["model_version"]  # thresholds are in it
    r = requests.post(f"{ls}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project["id"]},
                      headers=headers, json={"selectedItems": {"all": True, "excluded": []}})
    assert r.status_code == 200, r.text
    assert len(project["tasks"]) == 3
    for task in project["tasks"]:
        preds = requests.get(f"{ls}/api/predictions", params={"task": task["id"]}, headers=headers).json()
        assert len(preds) == 1, preds
        pred = preds[0]
        assert pred["model_version"] == version
        assert 0 < pred["score"] <= 1
        assert pred["result"]
        for region in pred["result"]:
            assert region["type"] == "polygonlabels" and region["value"]["polygonlabels"][0] in ("cat", "dog")
            assert 0 < region["score"] <= 1
