"""Video tasks: frames numbered as Label Studio's player numbers them, tracks as VideoRectangle regions,
bounded memory, cancel between windows, and a real Label Studio storing a job's video predictions."""
import base64
import os
import tempfile

import cv2
import numpy as np
import pytest
import requests

from backend.annotate.labelconfig import LabelConfig
from backend.config import Settings
from backend.http.app import create_app
from backend.labelstudio.video import VideoFile
from backend.sam3.tracking import Cancelled, Concept

VIDEO_CONFIG = """<View>
  <Labels name="videoLabels" toName="video">
    <Label value="ball" predicted_values="red ball"/><Label value="box"/>
  </Labels>
  <Video name="video" value="$video" framerate="{fps}"/>
  <VideoRectangle name="box" toName="video"/>
</View>"""
# The tiny random model scores every detection ~0.25: a zero threshold gives tracks.
EXTRA = {"thresholds": {"confidence": 0.0, "max_detections": 3}}


def mark(img: np.ndarray, i: int) -> None:
    """The frame's own index as 7 black/white blocks along the top (survives lossy compression)."""
    for b in range(7):
        img[0:16, b * 20:(b + 1) * 20] = 255 if (i >> b) & 1 else 0


def read_mark(img: np.ndarray) -> int:
    return sum(1 << b for b in range(7) if img[4:12, b * 20 + 5:b * 20 + 15].mean() > 127)


def make_video(fps: float, frames: int, size=(160, 120), codec="mp4v", suffix=".mp4") -> bytes:
    """A video (MP4 by default; VP90/.webm plays in Chromium) of a red ball and a green box moving across a
    grey background, each frame marked."""
    w, h = size
    path = tempfile.mktemp(suffix=suffix)
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, (w, h))
    assert out.isOpened()
    for i in range(frames):
        img = np.full((h, w, 3), 60, np.uint8)
        cv2.circle(img, (20 + (2 * i) % (w - 40), h // 2), 14, (0, 0, 255), -1)
        cv2.rectangle(img, (w - 50, 20 + i % (h - 60)), (w - 20, 45 + i % (h - 60)), (0, 255, 0), -1)
        mark(img, i % 128)
        out.write(img)
    out.release()
    try:
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def data_uri(video: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(video).decode()


def predict(settings, engine, video: bytes, fps=25, extra=EXTRA):
    """Connect a video project (with its thresholds, as Label Studio's form sends them), then Retrieve."""
    client = create_app(settings, engine=engine).test_client()
    config = VIDEO_CONFIG.format(fps=fps)
    assert client.post("/setup", json={"project": "9.1", "schema": config, "extra_params": extra}).status_code == 200
    task = {"id": 1, "data": {"video": data_uri(video)}}
    return client.post("/predict", json={"tasks": [task], "project": "9.1", "label_config": config})


@pytest.mark.parametrize("fps, codec, suffix", [(24, "mp4v", ".mp4"), (25, "mp4v", ".mp4"), (30, "mp4v", ".mp4"),
                                                (25, "VP90", ".webm")])
def test_frames_are_numbered_as_label_studios_player_numbers_them(fps, codec, suffix):
    with VideoFile(make_video(fps, 40, codec=codec, suffix=suffix), fps) as v:
        assert (v.info.frames, v.info.width, v.info.height) == (40, 160, 120)
        assert v.info.duration == pytest.approx(40 / fps)
        got = [(n, read_mark(img)) for n, img in v.frames()]
    assert [n for n, _ in got] == list(range(1, 41))
    assert all(k == n - 1 for n, k in got)  # frame n shows the picture at time (n - 1) / fps


def test_a_config_framerate_unlike_the_files_follows_the_timestamps():
    with VideoFile(make_video(25, 20), 50) as v:  # the config says 50 fps: every picture shows twice
        assert v.info.frames == 40
        got = [read_mark(img) for _, img in v.frames()]
    assert got == [i // 2 for i in range(40)]


def av_video(pts_ms: list[int], rotation: int = 0, size=(160, 120)) -> bytes:
    """An MP4 written with PyAV (OpenCV's writer can do neither): frame i at `pts_ms[i]`, optionally with a
    display rotation tag as phones write it."""
    import io
    from fractions import Fraction

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)  # timestamps in ms, whatever the nominal rate
        if rotation:
            stream.set_display_rotation(rotation)
        for i, pts in enumerate(pts_ms):
            img = np.full((size[1], size[0], 3), 60, np.uint8)
            img[-30:, :20] = (255, 0, 0)  # a red corner: bottom left as encoded
            mark(img, i)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_a_variable_frame_rate_video_lines_up_by_timestamps():
    pts = [0, 40, 120, 130, 140, 300, 320, 400]  # ms: a phone's uneven frame times
    with VideoFile(av_video(pts), 25) as v:
        got = [(n, read_mark(img)) for n, img in v.frames()]
    assert got
    for n, shown in got:  # frame n shows the last picture that started by (n - 1) / 25 s
        t = (n - 1) * 40
        assert shown == max(i for i, p in enumerate(pts) if p <= t), (n, shown)


def test_a_rotated_phone_video_is_read_upright_as_the_browser_shows_it():
    with VideoFile(av_video([i * 40 for i in range(10)], rotation=90), 25) as v:
        assert (v.info.width, v.info.height) == (120, 160)  # the tag turns 160x120 upright
        _, img = next(v.frames())
    # a display rotation of 90 turns the picture a quarter counter-clockwise (FFmpeg's and browsers' rule):
    # the red corner, bottom left as encoded, is shown bottom right
    assert img[-10:, -20:, 0].mean() > 200 and img[-10:, -20:, 1].mean() < 60 and img[-10:, :10, 0].mean() < 120


def test_unreadable_and_oversize_videos_are_clear_failures_not_results(settings, engine):
    r = predict(settings, engine, b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    answer = r.get_json()["results"][0]
    assert r.status_code == 200 and "result" not in answer and "not a readable video" in answer["error"]

    settings.max_video_frames = 10
    r = predict(settings, engine, make_video(25, 30))
    answer = r.get_json()["results"][0]
    assert "result" not in answer and "30 frames" in answer["error"] and "SAM3_MAX_VIDEO_FRAMES" in answer["error"]


@pytest.mark.parametrize("fps", [24, 25, 30])
def test_every_instance_becomes_a_labelled_track_with_a_box_on_each_frame(settings, engine, fps):
    frames = 16
    r = predict(settings, engine, make_video(fps, frames), fps=fps)
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()["results"][0]
    regions = answer["result"]
    assert regions and len(regions) <= 3  # max_detections
    for reg in regions:
        assert (reg["type"], reg["from_name"], reg["to_name"]) == ("videorectangle", "box", "video")
        value = reg["value"]
        assert value["labels"][0] in ("ball", "box") and 0 < reg["score"] <= 1
        assert value["framesCount"] == frames and value["duration"] == pytest.approx(frames / fps)
        seq = value["sequence"]
        numbers = [k["frame"] for k in seq]
        assert numbers == sorted(set(numbers)) and 1 <= numbers[0] and numbers[-1] <= frames
        assert len(seq) >= settings.video_min_track
        for k in seq:
            assert k["time"] == k["frame"] / fps  # as Label Studio's editor writes it
            assert 0 <= k["x"] <= 100 and 0 <= k["y"] <= 100 and k["width"] > 0 and k["height"] > 0
            assert k["x"] + k["width"] <= 100 + 1e-6 and k["y"] + k["height"] <= 100 + 1e-6
        # hidden after the last frame of a stretch it was seen for, unless that is the video's end
        runs_end = [a["frame"] for a, b in zip(seq, seq[1:]) if b["frame"] != a["frame"] + 1] + [seq[-1]["frame"]]
        assert [k["frame"] for k in seq if not k["enabled"]] == [f for f in runs_end if f < frames]


def test_tracks_shorter_than_the_setting_are_dropped(settings, engine):
    video = make_video(25, 20)
    tracked = predict(settings, engine, video).get_json()["results"][0]["result"]
    assert tracked  # tracks there are, with the default SAM3_VIDEO_MIN_TRACK
    longest = max(len(reg["value"]["sequence"]) for reg in tracked)
    settings.video_min_track = longest  # the longest stays: as long as the setting asks
    kept = predict(settings, engine, video).get_json()["results"][0]["result"]
    assert kept and all(len(reg["value"]["sequence"]) >= longest for reg in kept)
    settings.video_min_track = longest + 1  # one frame more than any track has
    answer = predict(settings, engine, video).get_json()["results"][0]
    assert answer["result"] == [] and answer["model_version"]  # labelled: nothing long enough


def test_a_click_on_a_video_project_says_what_works(settings, engine):
    client = create_app(settings, engine=engine).test_client()
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"video": "x.mp4"}}], "project": "9.1",
                                      "label_config": VIDEO_CONFIG.format(fps=25),
                                      "params": {"context": {"result": []}}})
    assert r.status_code == 400 and "Retrieve Predictions or a job" in r.get_json()["error"]


def test_the_task_framerate_is_read_from_task_data():
    config = LabelConfig.parse(VIDEO_CONFIG.format(fps="$fps"))
    assert config.videos == {"video": ("video", "$fps")} and config.labels == ["ball", "box"]
    assert config.outputs[0].synonyms == {"ball": ["red ball"]}


def test_tracker_memory_stays_flat_over_a_long_video(engine):
    """The session keeps the tracker's window, not the video: what it holds at frame 60 is what it held
    at frame 20 (bench/video.py measures it over 2,000 frames)."""
    video = make_video(25, 60)
    held = {}

    def on_window(done):
        held[done] = engine.video.held

    with VideoFile(video, 25) as v:
        tracks = engine.video.track(v.frames(), (160, 120), [Concept("red ball", "ball", 0.0)], max_objects=2,
                                    window=20, on_window=on_window)
    assert tracks and max(len(t.boxes) for t in tracks) == 60
    assert held[20] == held[40] == held[60]  # the tracker reaches back 17 frames: full, and no fuller
    assert held[60]["frames"] <= 1


def test_cancel_stops_between_windows_and_leaves_the_task_unanswered(settings, engine):
    from backend.annotate.backend import SAM3Backend
    from backend.annotate.labeller import Labeller
    from backend.annotate.task import Task
    from backend.sam3.model import Sam3Model

    settings.video_window = 5
    sam3 = Sam3Model(settings, engine=engine)
    backend = SAM3Backend(label_config=VIDEO_CONFIG.format(fps=25), sam3=sam3, settings=settings,
                          extra_params=EXTRA)
    video = make_video(25, 60)
    seen = []
    stop_after = 2

    def load(task, name):
        return VideoFile(video, 25)

    labeller = Labeller(backend.project, engine)
    out = list(labeller.label([Task(1), Task(2)], load, on_frames=seen.append,
                              cancelled=lambda: len(seen) >= stop_after))
    assert out == [] and seen == [5, 5]  # two windows of frames reported, then stopped; nothing answered

    with pytest.raises(Cancelled):
        with VideoFile(video, 25) as v:
            engine.video.track(v.frames(), (160, 120), [Concept("red ball", "ball", 0.0)], window=5,
                               on_window=lambda n: (_ for _ in ()).throw(Cancelled()))


@pytest.mark.e2e
def test_a_job_stores_video_tracks_in_label_studio(label_studio, engine, checkpoint):
    url, headers, token = label_studio
    r = requests.post(f"{url}/api/projects", headers=headers,
                      json={"title": "video job", "label_config": VIDEO_CONFIG.format(fps=25)})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    for i in range(2):
        r = requests.post(f"{url}/api/projects/{pid}/import", headers=headers,
                          files={"file": (f"clip{i}.mp4", make_video(25, 20 + 5 * i), "video/mp4")})
        assert r.status_code == 201, r.text
    tasks = requests.get(f"{url}/api/tasks", params={"project": pid}, headers=headers).json()["tasks"]
    assert len(tasks) == 2 and all(t["data"]["video"].startswith("/data/upload/") for t in tasks)

    settings = Settings(model=checkpoint, device="cpu", label_studio_url=url, label_studio_api_key=token,
                        dtype="float32", video_window=8)
    client = create_app(settings, engine=engine).test_client()
    r = client.post("/jobs", json={"project": pid, "thresholds": EXTRA["thresholds"]})
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["job_id"]
    import time

    deadline = time.time() + 180
    while (job := client.get(f"/jobs/{job_id}").get_json())["status"] in ("queued", "running"):
        assert time.time() < deadline, job
        time.sleep(0.2)
    assert (job["status"], job["predicted"], job["failed"]) == ("succeeded", 2, 0), job
    assert job["frames"] == 20 + 25  # progress in frames as well as tasks
    for t in tasks:
        preds = requests.get(f"{url}/api/predictions", params={"task": t["id"]}, headers=headers).json()
        assert [p["model_version"] for p in preds] == [job["model_version"]]
        regions = preds[0]["result"]
        assert regions and all(reg["type"] == "videorectangle" and reg["value"]["labels"][0] in ("ball", "box")
                               for reg in regions)
        frames = regions[0]["value"]["framesCount"]
        assert frames in (20, 25) and all(k["frame"] <= frames for reg in regions for k in reg["value"]["sequence"])


def test_a_frame_compares_only_each_prompts_best_few_detections(engine):
    """SAM 3's matching compares detections pairwise as full masks; 200 candidates would cost gigabytes."""
    import torch
    import transformers.models.sam3_video.modeling_sam3_video as video_module

    engine.video.load()
    engine.video.model.candidates_per_prompt = 8
    probs = torch.linspace(0.1, 0.9, 200)
    seen = {}
    original = video_module.mask_iou

    def counting(a, b):
        seen["compared"] = (a.shape[0], b.shape[0])
        return original(a, b)

    video_module.mask_iou = counting
    try:
        keep = video_module.nms_masks(pred_probs=probs, pred_masks=torch.randn(200, 288, 288), prob_threshold=0.0,
                                      iou_threshold=0.5)
    finally:
        video_module.mask_iou = original
    assert seen["compared"] == (8, 8)
    assert keep.sum() <= 8 and set(torch.nonzero(keep).flatten().tolist()) <= set(range(192, 200))


def test_predict_on_local_video_files_writes_importable_json(checkpoint, tmp_path, capsys, monkeypatch):
    import json

    from test_cli import main

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_video(25, 12))
    config = tmp_path / "video.xml"
    config.write_text(VIDEO_CONFIG.format(fps=25))
    out = tmp_path / "out"
    r = main(capsys, monkeypatch, "predict", str(clip), "--config", str(config), "--threshold", "0", "--out", str(out),
             "--model", checkpoint, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "clip.json").read_text())
    assert doc["data"]["video"] == str(clip)
    [pred] = doc["predictions"]
    assert pred["result"] and all(reg["type"] == "videorectangle" and reg["value"]["framesCount"] == 12
                                  for reg in pred["result"])
    assert "tracks" in r.stdout and not (out / "clip.png").exists()


def test_video_tracks_follow_the_per_label_thresholds(settings, engine):
    video = make_video(25, 12)
    labels = {}
    for name, extra in [("all", {"thresholds": {"confidence": 0.0, "max_detections": 8}}),
                        ("no balls", {"thresholds": {"confidence": 0.0, "max_detections": 8,
                                                     "per_label": {"ball": 0.9}}})]:
        regions = predict(settings, engine, video, extra=extra).get_json()["results"][0]["result"]
        labels[name] = sorted(reg["value"]["labels"][0] for reg in regions)
    assert "ball" in labels["all"] and "box" in labels["all"]
    assert labels["no balls"] and set(labels["no balls"]) == {"box"}  # the random model scores about 0.25
