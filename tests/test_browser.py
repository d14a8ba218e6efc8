"""A person in Label Studio's web UI (headless Chromium): connect the model through the Settings form with
Extra params typed in, click and type in the labelling view, submit; and read, in the UI, why the backend
could not answer. Screenshots of every step: out/browser/<test>/.
"""
import re
from pathlib import Path

import pytest
import requests
from browser import Browser
from conftest import png_bytes, serve
from PIL import Image, ImageDraw

pytestmark = [pytest.mark.e2e, pytest.mark.browser]
ROOT = Path(__file__).resolve().parents[1]
DOCS_CONFIGS = re.findall(r"```xml\n(.*?)```", (ROOT / "docs/connecting.md").read_text(), re.S)
README_CONFIG = DOCS_CONFIGS[0]  # the polygon config people paste first
ADMIN = ("admin@example.com", "e2e-Passw0rd")  # the label_studio fixture's admin
# Typed into the form as a person types it (Label Studio sends it to /setup as a JSON string). The tiny random
# model scores every instance about 0.25: a zero threshold lets the typed prompt find some.
EXTRA = '{"thresholds": {"confidence": 0.0, "max_detections": 3}}'


def disk_image() -> bytes:
    img = Image.new("RGB", (640, 480), (235, 235, 235))
    ImageDraw.Draw(img).ellipse((200, 140, 440, 380), fill=(200, 90, 40))
    return png_bytes(img)


def new_project(label_studio, title: str) -> tuple[int, int]:
    url, headers, _ = label_studio
    r = requests.post(f"{url}/api/projects", headers=headers, json={
        "title": title, "label_config": README_CONFIG,
        # a person clicks on an empty image: no prediction is asked for when the task opens
        "show_collab_predictions": False, "evaluate_predictions_automatically": False})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = requests.post(f"{url}/api/projects/{pid}/import", headers=headers,
                      files={"file": ("disk.png", disk_image(), "image/png")})
    assert r.status_code == 201, r.text
    task = requests.get(f"{url}/api/tasks", params={"project": pid}, headers=headers).json()["tasks"][0]
    return pid, task["id"]


@pytest.fixture(scope="module")
def backend(checkpoint, tmp_path_factory):
    url, proc = serve(checkpoint, tmp_path_factory.mktemp("browser-backend") / "backend.log")
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def browser(label_studio, request):
    b = Browser(label_studio[0], request.node.name)
    b.login(*ADMIN)
    yield b
    b.close()


def test_a_person_connects_the_model_clicks_types_and_submits(label_studio, backend, browser):
    url, headers, _ = label_studio
    pid, tid = new_project(label_studio, "SAM 3 in the browser")
    b = browser
    b.connect_model(pid, backend, extra_params=EXTRA)
    b.text_present("Connected")
    b.shot("model connected")
    [ml] = requests.get(f"{url}/api/ml", params={"project": pid}, headers=headers).json()
    assert ml["state"] == "CO" and ml["is_interactive"] is True
    assert ml["model_version"].startswith(requests.get(backend + "/health").json()["model_version"] + "-")

    b.open_task(pid, tid)
    b.toggle("Auto-Annotation")
    b.toggle("Auto-Accept Suggestions")
    b.pick_label("cat")
    b.smart_tool()
    b.shot("label and smart tool picked")
    b.click_image()  # on the disk, in the middle of the image
    b.wait(lambda: ("polygonregion", ["cat"]) in [tuple(r) for r in b.regions()], 30, "a cat polygon")
    b.shot("click turned into a polygon")

    b.type_prompt("dog")  # a label name typed as the prompt: every instance, labelled dog
    b.wait(lambda: ("polygonregion", ["dog"]) in [tuple(r) for r in b.regions()], 30, "dog polygons")
    b.shot("typed prompt turned into polygons")
    b.button("Submit").click()
    annotations = b.wait(lambda: requests.get(f"{url}/api/tasks/{tid}/annotations", headers=headers).json(),
                         what="the stored annotation")
    b.shot("submitted")
    [annotation] = annotations
    polygons = [r for r in annotation["result"] if r["type"] == "polygonlabels"]
    assert {r["value"]["polygonlabels"][0] for r in polygons} == {"cat", "dog"}
    for r in polygons:
        assert r["original_width"] == 640 and len(r["value"]["points"]) >= 3
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in r["value"]["points"])


def test_a_person_reads_why_the_backend_cannot_answer(label_studio, backend, browser, checkpoint, tmp_path,
                                                     personal_access_token):
    url, headers, _ = label_studio
    b = browser
    # An annotator's prompt the backend cannot place: the reason appears under the prompt box.
    pid, tid = new_project(label_studio, "SAM 3 says why")
    r = requests.post(f"{url}/api/ml", headers=headers, json={"url": backend, "project": pid, "title": "SAM 3",
                                                              "is_interactive": True})
    assert r.status_code == 201, r.text
    b.open_task(pid, tid)
    b.toggle("Auto-Annotation")
    b.type_prompt("red car")  # no label selected, and "red car" names none
    b.show(b.text_present("SAM 3 could not answer: no label for this prompt")[0])
    b.shot("the annotator reads why")

    # Legacy tokens off (Label Studio's default since 1.20): the admin reads what to set, in the form.
    pid2, tid2 = new_project(label_studio, "legacy tokens off")
    access = requests.post(f"{url}/api/token/refresh/", json={"refresh": personal_access_token}).json()["access"]
    bearer = {"Authorization": f"Bearer {access}"}
    r = requests.post(f"{url}/api/jwt/settings", headers=bearer, json={"legacy_api_tokens_enabled": False,
                                                                       "api_tokens_enabled": True})
    assert r.status_code in (200, 201), r.text
    fixed = None
    try:
        b.connect_model(pid2, backend)
        b.text_present("legacy token authentication has been disabled")
        b.text_present("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        b.shot("the admin reads what to set")
        # ... and once it is set (a personal access token), the same project connects and a click works.
        ls_url = url.replace("127.0.0.1", "localhost")  # how Label Studio names itself: the images' origin
        fixed, proc = serve(checkpoint, tmp_path / "fixed.log", LABEL_STUDIO_URL=ls_url,
                            LABEL_STUDIO_API_KEY=personal_access_token)
        b.d.refresh()
        b.connect_model(pid2, fixed)
        b.text_present("Connected")
        b.open_task(pid2, tid2)
        b.toggle("Auto-Annotation")
        b.toggle("Auto-Accept Suggestions")
        b.pick_label("dog")
        b.smart_tool()
        b.click_image()
        b.wait(lambda: ("polygonregion", ["dog"]) in [tuple(r) for r in b.regions()], 30, "a dog polygon")
        b.shot("with a personal access token the click works")
        log = (tmp_path / "fixed.log").read_text()
        assert re.search(r"fetched http://localhost:\d+/data/upload/\S+ with the Label Studio token", log), log[-2000:]
    finally:
        requests.post(f"{url}/api/jwt/settings", headers=bearer, json={"legacy_api_tokens_enabled": True,
                                                                       "api_tokens_enabled": True})
        if fixed:
            proc.terminate()
            proc.wait(30)


def donut() -> tuple[bytes, "np.ndarray"]:
    import numpy as np

    y, x = np.mgrid[:480, :640]
    r2 = (x - 320) ** 2 + (y - 240) ** 2
    mask = (r2 < 180**2) & (r2 >= 90**2)
    img = np.full((480, 640, 3), 235, np.uint8)
    img[mask] = (200, 90, 40)
    return png_bytes(Image.fromarray(img)), mask


def test_label_studio_draws_and_edits_a_polygon_with_a_hole(label_studio, browser):
    """The backend's keyhole polygon, as Label Studio stores it: drawn with its hole, and its outline editable."""
    import io

    import numpy as np

    from backend.annotate import geometry

    url, headers, _ = label_studio
    image, mask = donut()
    r = requests.post(f"{url}/api/projects", headers=headers, json={"title": "a polygon with a hole",
                                                                    "label_config": README_CONFIG})
    pid = r.json()["id"]
    requests.post(f"{url}/api/projects/{pid}/import", headers=headers, files={"file": ("donut.png", image, "image/png")})
    tid = requests.get(f"{url}/api/tasks", params={"project": pid}, headers=headers).json()["tasks"][0]["id"]
    [ring] = geometry.mask_to_polygons(mask)
    points = geometry.polygon_to_percent(ring, 640, 480)
    region = {"id": "donut", "from_name": "poly", "to_name": "image", "type": "polygonlabels",
              "original_width": 640, "original_height": 480,
              "value": {"points": points, "closed": True, "polygonlabels": ["cat"]}}
    r = requests.post(f"{url}/api/tasks/{tid}/annotations", headers=headers, json={"result": [region]})
    assert r.status_code == 201, r.text
    b = browser
    b.open_task(pid, tid)
    b.wait(lambda: [tuple(x) for x in b.regions()] == [("polygonregion", ["cat"])], what="the polygon")
    stage = b.visible(".konvajs-content")[0]
    sx, sy, sw, sh = stage.location["x"], stage.location["y"], stage.size["width"], stage.size["height"]

    def pixel(px, py):  # the screenshot's colour at image pixel (px, py)
        shot = Image.open(io.BytesIO(b.d.get_screenshot_as_png())).convert("RGB")
        return np.array(shot.getpixel((int(sx + px * sw / 640), int(sy + py * sh / 480))), int)

    def drawn_with_its_hole():
        hole, ring_, outside = pixel(320, 240), pixel(320 + 135, 240), pixel(40, 40)
        ring_bare = np.array((200, 90, 40))
        # the hole shows the image as it is (like the background outside); the ring is tinted by the fill
        return np.abs(hole - outside).sum() < 30 and np.abs(ring_ - ring_bare).sum() > 15

    assert b.wait(drawn_with_its_hole, what="the hole left unfilled")
    b.shot("a polygon with a hole")
    # select it (a click on the ring), then drag the outline's first point 30 px to the right
    from selenium.webdriver.common.action_chains import ActionChains

    def at(px, py):  # offsets from the stage's centre, where Selenium's moves start
        return int(px * sw / 640 - sw / 2), int(py * sh / 480 - sh / 2)

    ActionChains(b.d).move_to_element_with_offset(stage, *at(320 + 135, 240)).click().perform()
    b.wait(lambda: b.js("return window.dataManager.lsf.lsf.annotationStore.selected.regions[0].selected"),
           what="the polygon selected")
    x0, y0 = (c * size / 100 for c, size in zip(points[0], (640, 480)))
    ActionChains(b.d).move_to_element_with_offset(stage, *at(x0, y0)).click_and_hold() \
        .move_by_offset(15, 0).move_by_offset(15, 0).release().perform()
    first = """const p = window.dataManager.lsf.lsf.annotationStore.selected.regions[0].points[0]; return [p.x, p.y];"""
    moved = b.wait(lambda: (lambda p: p if abs(p[0] - points[0][0]) > 1 else None)(b.js(first)),
                   what="the edited point")  # the editor keeps points in percent
    b.shot("its outline edited")
    assert moved[0] > points[0][0] + 2 and abs(moved[1] - points[0][1]) < 1
    assert b.wait(drawn_with_its_hole, what="the hole still unfilled after the edit")


EXEMPLAR_CONFIG = next(c for c in DOCS_CONFIGS if 'exemplars="true"' in c)  # "like this box"


def test_a_box_drawn_as_an_exemplar_finds_every_instance_like_it(label_studio, backend, browser):
    url, headers, _ = label_studio
    assert 'exemplars="true"' in EXEMPLAR_CONFIG
    r = requests.post(f"{url}/api/projects", headers=headers, json={
        "title": "like this box", "label_config": EXEMPLAR_CONFIG, "show_collab_predictions": False,
        "evaluate_predictions_automatically": False})
    pid = r.json()["id"]
    requests.post(f"{url}/api/projects/{pid}/import", headers=headers,
                  files={"file": ("disk.png", disk_image(), "image/png")})
    tid = requests.get(f"{url}/api/tasks", params={"project": pid}, headers=headers).json()["tasks"][0]["id"]
    r = requests.post(f"{url}/api/ml", headers=headers, json={"url": backend, "project": pid, "title": "SAM 3",
                                                              "is_interactive": True, "extra_params": EXTRA})
    assert r.status_code == 201, r.text
    b = browser
    b.open_task(pid, tid)
    b.toggle("Auto-Annotation")
    b.toggle("Auto-Accept Suggestions")
    b.pick_label("dog")  # the exemplar control's label: "every dog like this box"
    b.smart_tool()
    from selenium.webdriver.common.action_chains import ActionChains

    stage = b.visible(".konvajs-content")[0]
    ActionChains(b.d).move_to_element_with_offset(stage, -90, -90).click_and_hold() \
        .move_by_offset(60, 40).move_by_offset(60, 40).release().perform()
    b.wait(lambda: ("polygonregion", ["dog"]) in [tuple(r) for r in b.regions()], 30, "dog polygons")
    b.shot("a box turned into every instance like it")
    assert all(t == "polygonregion" for t, _ in b.regions())  # the exemplar box itself is a prompt, not a result


def test_label_studio_shows_the_video_tracks_a_job_stored(label_studio, browser, engine, checkpoint):
    """A bulk job on a video project, then the task opened as an annotator opens it: the tracks are there,
    labelled, over the player's frames."""
    import time

    from test_video import EXTRA, VIDEO_CONFIG, make_video

    from backend.config import Settings
    from backend.http.app import create_app

    url, headers, token = label_studio
    r = requests.post(f"{url}/api/projects", headers=headers,
                      json={"title": "video tracks", "label_config": VIDEO_CONFIG.format(fps=25)})
    pid = r.json()["id"]
    video = make_video(25, 40, size=(320, 240), codec="VP90", suffix=".webm")  # a codec Chromium plays
    r = requests.post(f"{url}/api/projects/{pid}/import", headers=headers,
                      files={"file": ("clip.webm", video, "video/webm")})
    assert r.status_code == 201, r.text
    tid = requests.get(f"{url}/api/tasks", params={"project": pid}, headers=headers).json()["tasks"][0]["id"]
    client = create_app(Settings(model=checkpoint, device="cpu", dtype="float32", label_studio_url=url,
                                 label_studio_api_key=token), engine=engine).test_client()
    job_id = client.post("/jobs", json={"project": pid, "thresholds": EXTRA["thresholds"]}).get_json()["job_id"]
    deadline = time.time() + 120
    while (job := client.get(f"/jobs/{job_id}").get_json())["status"] in ("queued", "running"):
        assert time.time() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded" and job["regions_added"] > 0, job
    # the project shows this model's predictions to annotators
    r = requests.patch(f"{url}/api/projects/{pid}", headers=headers, json={"model_version": job["model_version"]})
    assert r.status_code == 200, r.text

    b = browser
    b.d.get(f"{b.base}/projects/{pid}/data?task={tid}")
    b.wait(lambda: b.js("return !!(window.dataManager && window.dataManager.lsf && window.dataManager.lsf.lsf && "
                        "window.dataManager.lsf.lsf.annotationStore.selected)"), 40, "the editor")
    regions = b.wait(lambda: b.regions(), 30, "the predicted tracks")
    assert len(regions) == job["regions_added"]
    assert all(kind == "videorectangleregion" and labels and labels[0] in ("ball", "box") for kind, labels in regions)
    video_tag = "window.dataManager.lsf.lsf.annotationStore.selected.names.get('video')"
    assert b.wait(lambda: b.js(f"return {video_tag}.length") == 40, 30, "the player counting 40 frames")
    b.shot("video tracks at frame 1")
    b.js(f"{video_tag}.setFrame(20)")
    seq = b.js("""return window.dataManager.lsf.lsf.annotationStore.selected.regions[0].sequence
                  .map(k => k.frame);""")
    assert seq[0] >= 1 and seq[-1] <= 40 and seq == sorted(seq)
    b.shot("video tracks at frame 20")
