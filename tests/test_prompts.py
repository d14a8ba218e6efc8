import pytest

from backend.errors import BackendError
from backend.labelconfig import LabelConfig
from backend.prompts import parse_context
from conftest import CONFIG, keypoint, rectangle, text

CFG = LabelConfig.parse(CONFIG)


def test_keypoints_percent_to_pixels_with_both_polarity_styles():
    ctx = {"result": [keypoint(50, 25), keypoint(10, 100, positive=False, style="value"),
                      keypoint(0, 0, positive="false")]}
    p = parse_context(ctx, CFG, width=200, height=80)
    assert p.points == [(100.0, 20.0), (20.0, 80.0), (0.0, 0.0)]
    assert p.point_labels == [1, 0, 0]
    assert p.label == "cat"


def test_rectangle_becomes_pixel_xyxy():
    p = parse_context({"result": [rectangle(10, 20, 30, 40, label="dog")]}, CFG, width=200, height=100)
    assert p.boxes == [(20.0, 20.0, 80.0, 60.0)]
    assert p.label == "dog"


def test_text_prompt():
    p = parse_context({"result": [text("  red car ")]}, CFG, 64, 48)
    assert p.text == "red car" and not p.points and p.label is None


def test_empty_context_is_an_empty_prompt():
    assert parse_context({"result": []}, CFG, 64, 48).empty
    assert parse_context(None, CFG, 64, 48).empty


@pytest.mark.parametrize(
    "region, message",
    [
        (keypoint(101, 50), "outside the image"),
        (keypoint(-3, 50), "outside the image"),
        (keypoint("abc", 50), "must be a number"),
        (dict(keypoint(10, 10), from_name="nope"), "unknown control 'nope'"),
        (rectangle(90, 10, 20, 10), "outside the image"),
        (rectangle(10, 10, 0, 10), "must be positive"),
        (dict(keypoint(10, 10), type="choices"), "not a prompt"),
    ],
)
def test_bad_prompts_name_the_problem(region, message):
    with pytest.raises(BackendError) as e:
        parse_context({"result": [region]}, CFG, 64, 48)
    assert message in e.value.message
    assert e.value.status == 400
