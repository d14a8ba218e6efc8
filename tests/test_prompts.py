import pytest
from conftest import CONFIG, keypoint, rectangle, text

from backend.annotate.labelconfig import LabelConfig
from backend.annotate.prompts import parse_context
from backend.errors import BackendError

CFG = LabelConfig.parse(CONFIG)


def test_keypoints_percent_to_pixels_with_both_polarity_styles():
    ctx = {"result": [keypoint(50, 25), keypoint(10, 100, positive=False, style="value"),
                      keypoint(0, 0, positive="false")]}
    p = parse_context(ctx, CFG)
    assert p.points == [(50.0, 25.0), (10.0, 100.0), (0.0, 0.0)]  # percent: checked before any image is read
    assert p.points_px(200, 80) == [(100.0, 20.0), (20.0, 80.0), (0.0, 0.0)]
    assert p.point_labels == [1, 0, 0]
    assert p.label == "cat"


def test_rectangle_becomes_pixel_xyxy():
    p = parse_context({"result": [rectangle(10, 20, 30, 40, label="dog")]}, CFG)
    assert p.boxes_px(200, 100) == [(20.0, 20.0, 80.0, 60.0)]
    assert p.label == "dog"


def test_text_prompt():
    p = parse_context({"result": [text("  red car ")]}, CFG)
    assert p.text == "red car" and not p.points and p.label is None


def test_empty_context_is_an_empty_prompt():
    assert parse_context({"result": []}, CFG).empty
    assert parse_context(None, CFG).empty


def test_prompt_counts_and_text_length_are_bounded():
    with pytest.raises(BackendError, match="at most 3"):
        parse_context({"result": [keypoint(1, 1)] * 4}, CFG, max_prompts=3)
    with pytest.raises(BackendError, match="at most 10"):
        parse_context({"result": [text("x" * 11)]}, CFG, max_chars=10)


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
        (keypoint(10**400, 50), "must be a number"),
        (keypoint(float("inf"), 50), "finite"),
        (keypoint(True, 50), "must be a number"),
        (dict(keypoint(10, 10), from_name=["kp"]), "unknown control"),
        (dict(keypoint(10, 10), type=["keypointlabels"]), "type must be a string"),
        (dict(keypoint(10, 10), value={"x": 1, "y": 1, "keypointlabels": [["cat"]]}), "list of label names"),
    ],
)
def test_bad_prompts_name_the_problem(region, message):
    with pytest.raises(BackendError) as e:
        parse_context({"result": [region]}, CFG)
    assert message in e.value.message
    assert e.value.status == 400
