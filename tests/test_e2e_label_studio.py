"""End to end: a real Label Studio (own virtualenv) talks to `label-studio-sam3 serve` over HTTP."""
import re

import pytest
import requests
from conftest import CONFIG, keypoint, make_image, png_bytes, serve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def backend_url(checkpoint, tmp_path_factory):
    """The service exactly as users start it; the token comes from Label Studio's /setup."""
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    url, proc = serve(checkpoint, log)
    try:
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


def test_retrieve_stores_no_result_for_a_failed_task_and_labels_it_once_the_cause_is_gone(label_studio, checkpoint,
                                                                                         tmp_path):
    from imageserver import ImageServer

    ls, headers, _ = label_studio
    images = ImageServer({"/ok.png": png_bytes(make_image(seed=3))})  # /late.png: 404 for now
    backend, proc = serve(checkpoint, tmp_path / "backend.log", SAM3_ALLOWED_HOSTS=images.url.split("//")[1])
    try:
        r = requests.post(f"{ls}/api/projects", headers=headers, json={"title": "failures", "label_config": CONFIG})
        pid = r.json()["id"]
        r = requests.post(f"{ls}/api/projects/{pid}/import", headers=headers,
                          json=[{"image": f"{images.url}/ok.png"}, {"image": f"{images.url}/late.png"}])
        assert r.status_code == 201, r.text
        ok, late = sorted(t["id"] for t in requests.get(f"{ls}/api/tasks", params={"project": pid},
                                                        headers=headers).json()["tasks"])
        r = requests.post(f"{ls}/api/ml", headers=headers, json={
            "url": backend, "project": pid, "title": "SAM 3", "extra_params": {"thresholds": {"confidence": 0.0}}})
        mv = r.json()["model_version"]

        def retrieve():
            r = requests.post(f"{ls}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                              headers=headers, json={"selectedItems": {"all": True, "excluded": []}})
            assert r.status_code == 200, r.text
            return {t: requests.get(f"{ls}/api/predictions", params={"task": t}, headers=headers).json()
                    for t in (ok, late)}

        preds = retrieve()
        assert [p["model_version"] for p in preds[ok]] == [mv] and preds[ok][0]["result"]
        assert preds[late] == []  # no empty "result" that would mark the task as done by this model_version
        images.files["/late.png"] = png_bytes(make_image(seed=4))  # the cause is gone
        preds = retrieve()
        assert [p["model_version"] for p in preds[late]] == [mv] and preds[late][0]["result"]
        assert len(preds[ok]) == 1  # not labelled twice
    finally:
        images.close()
        proc.terminate()
        proc.wait(30)
