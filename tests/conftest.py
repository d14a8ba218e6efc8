import base64
import io
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from backend.config import Settings
from backend.sam3.checkpoints import build_checkpoint
from backend.sam3.engine import Sam3Engine

LS_VENV = Path(os.environ.get("LS_VENV", Path.home() / ".cache/label-studio-sam3/ls-1.23.2"))
# Label Studio's limit for a /predict answer, lowered from its 100 s so that a test can run past it in seconds
# (the tiny model answers every other request well inside it).
ML_TIMEOUT_PREDICT = 10

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="cat"/><Label value="dog"/><Label value="bird"/>
  </KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true">
    <Label value="cat"/><Label value="dog"/>
  </RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true"/>
  <PolygonLabels name="poly" toName="image">
    <Label value="cat" predicted_values="kitty,feline"/><Label value="dog"/>
  </PolygonLabels>
</View>"""


if os.environ.get("PYTEST_XDIST_WORKER"):  # make test-fast: one torch thread per worker, no oversubscribed cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tiers: a test that uses the real Label Studio is e2e (make test-fast leaves e2e, redis, browser and
    docker tests out; make test runs all but docker, which make docker-test runs)."""
    for item in items:
        if {"label_studio", "personal_access_token"} & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)
        if "redis_db" in item.fixturenames:
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random SAM 3 in the hub's sam3_video layout, loaded like facebook/sam3."""
    return str(build_checkpoint(tmp_path_factory.mktemp("sam3-tiny")))


@pytest.fixture(scope="session")
def engine(checkpoint):
    return Sam3Engine(checkpoint, device="cpu", dtype="float32").load()  # the same numbers on every CPU


@pytest.fixture
def settings(checkpoint):
    return Settings(model=checkpoint, device="cpu", dtype="float32")


def make_image(width=64, height=48, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def png_bytes(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def keypoint(x, y, label="cat", positive=True, name="kp", style="top"):
    region = {
        "original_width": 64, "original_height": 48, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
        "id": "k1", "from_name": name, "to_name": "image", "type": "keypointlabels", "origin": "manual",
    }
    if style == "top":
        region["is_positive"] = positive
    else:
        region["value"]["positive"] = positive
    return region


def rectangle(x, y, w, h, label="cat", name="rect"):
    return {
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
        "from_name": name, "to_name": "image", "type": "rectanglelabels",
    }


def text(t, name="prompt"):
    return {"value": {"text": [t]}, "from_name": name, "to_name": "image", "type": "textarea"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, seconds, log):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} process exited:\n{Path(log).read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {seconds}s:\n{Path(log).read_text()[-3000:]}")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    exe = LS_VENV / "bin" / "label-studio"
    # CI installs it (make test); a missing install is a failure, not a skip.
    assert exe.exists(), f"Label Studio is not installed at {LS_VENV}: run `make label-studio-venv`"
    data = tmp_path_factory.mktemp("ls-data")
    port, token = free_port(), secrets.token_hex(20)
    log = data / "ls.log"
    env = dict(os.environ, USE_DEFAULT_BANNED_SUBNETS="false", LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
               ML_TIMEOUT_PREDICT=str(ML_TIMEOUT_PREDICT))
    cmd = [str(exe), "start", "--no-browser", "--data-dir", str(data), "--internal-host", "127.0.0.1", "-p", str(port),
           "--username", "admin@example.com", "--password", "e2e-Passw0rd", "--user-token", token,
           "--enable-legacy-api-token"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=data, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, 300, log)
        yield url, {"Authorization": f"Token {token}"}, token
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="session")
def personal_access_token(label_studio) -> str:
    """The admin's personal access token (Label Studio keeps one per user: made once per session)."""
    url, headers, _ = label_studio
    r = requests.post(f"{url}/api/token/", headers=headers)
    assert r.status_code in (200, 201), r.text
    return r.json()["token"]


def serve(checkpoint, log_path, **env) -> tuple[str, subprocess.Popen]:
    """`label-studio-sam3 serve` as users start it (console script, gunicorn), on a free loopback port."""
    import sys

    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_", "SAM3_"))}
    full.update(SAM3_MODEL=checkpoint, DEVICE="cpu", LOG_LEVEL="DEBUG", **env)
    exe = Path(sys.executable).with_name("label-studio-sam3")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=full)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, 120, log_path)  # 200 only once the model is loaded
    return url, proc
