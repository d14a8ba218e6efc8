import pytest
from conftest import CONFIG

from backend.annotate.labelconfig import LabelConfig
from backend.errors import BackendError


def test_outputs_prompts_and_image_key():
    cfg = LabelConfig.parse(CONFIG)
    assert [c.name for c in cfg.outputs] == ["poly"]  # the smart rectangle is a prompt, not an output
    assert set(cfg.prompts) == {"kp", "rect", "prompt"}
    assert cfg.image == "image" and cfg.value_key == "image"
    assert cfg.labels == ["cat", "dog"]


def test_polygon_preferred_then_brush_then_box():
    xml = """<View><Image name="img" value="$photo"/>
      <RectangleLabels name="box" toName="img"><Label value="a"/><Label value="c"/></RectangleLabels>
      <BrushLabels name="brush" toName="img"><Label value="a"/><Label value="b"/></BrushLabels>
      <PolygonLabels name="poly" toName="img"><Label value="a"/></PolygonLabels></View>"""
    cfg = LabelConfig.parse(xml)
    assert cfg.value_key == "photo"
    assert cfg.output_for("a").name == "poly"
    assert cfg.output_for("b").type == "brushlabels"
    assert cfg.output_for("c").type == "rectanglelabels"


def test_only_smart_rectangles_are_the_output_for_boxes():
    xml = """<View><Image name="image" value="$image"/>
      <KeyPointLabels name="kp" toName="image" smart="true"><Label value="car"/></KeyPointLabels>
      <RectangleLabels name="rect" toName="image" smart="true"><Label value="car"/></RectangleLabels></View>"""
    cfg = LabelConfig.parse(xml)
    assert cfg.output_for("car").name == "rect"


def test_label_missing_from_outputs_is_a_clear_error():
    cfg = LabelConfig.parse(CONFIG)
    with pytest.raises(BackendError, match="'bird' is not in any output control"):
        cfg.output_for("bird")


def test_typed_text_finds_label_by_value_or_synonym():
    cfg = LabelConfig.parse(CONFIG)
    assert cfg.label_for_text("Dog") == "dog"
    assert cfg.label_for_text("feline") == "cat"
    assert cfg.label_for_text("red car") is None


@pytest.mark.parametrize(
    "xml, message",
    [
        ("", "empty"),
        ("<View><Image name='i' value='$i'/>", "could not be parsed"),
        ("<View><Text name='t' value='$t'/><Labels name='l' toName='t'><Label value='x'/></Labels></View>", "no <Image>"),
        ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='x'/></Choices></View>",
         "no PolygonLabels"),
    ],
)
def test_unusable_configs_are_refused(xml, message):
    with pytest.raises(BackendError, match=message):
        LabelConfig.parse(xml)
