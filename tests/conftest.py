import base64
import io
import socket

import numpy as np
import pytest
from PIL import Image

from backend.checkpoints import build_checkpoint
from backend.config import Settings
from backend.engine import Sam3Engine

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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random SAM 3 in the hub's sam3_video layout, loaded like facebook/sam3."""
    return str(build_checkpoint(tmp_path_factory.mktemp("sam3-tiny")))


@pytest.fixture(scope="session")
def engine(checkpoint):
    return Sam3Engine(checkpoint, device="cpu").load()


@pytest.fixture
def settings(checkpoint):
    return Settings(model=checkpoint, device="cpu")


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
