"""What a project's label config asks of this backend, read with the SDK's parser.

Output controls receive regions (PolygonLabels, BrushLabels, RectangleLabels on an Image; VideoRectangle
on a Video, labelled by the Labels controls on that Video); prompt controls carry the annotator's smart
clicks (KeyPointLabels, smart RectangleLabels) and typed text (TextArea).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from ..errors import BackendError

# Region type written for each output tag, in order of preference when a label is in several.
OUTPUT_TYPES = {"PolygonLabels": "polygonlabels", "BrushLabels": "brushlabels", "RectangleLabels": "rectanglelabels",
                "VideoRectangle": "videorectangle"}
PROMPT_TAGS = {"KeyPointLabels", "RectangleLabels", "TextArea"}


def _truthy(value) -> bool:
    return str(value).lower() in ("true", "1", "yes")


@dataclass
class Control:
    name: str
    tag: str
    to_name: str
    labels: list[str]
    synonyms: dict[str, list[str]] = field(default_factory=dict)  # label -> predicted_values

    @property
    def type(self) -> str:
        return OUTPUT_TYPES.get(self.tag, self.tag.lower())


@dataclass
class LabelConfig:
    image: str  # name of the first Image object an output control labels (the default for prompts)
    value_key: str  # task data key holding that image's URL ("image" for value="$image")
    outputs: list[Control]  # preference order: polygons, brushes, boxes
    prompts: dict[str, Control]  # by control name
    images: dict[str, str] = field(default_factory=dict)  # every Image object labelled here -> its data key
    exemplars: set[str] = field(default_factory=set)  # smart RectangleLabels with exemplars="true": find all like it
    videos: dict[str, tuple[str, str]] = field(default_factory=dict)  # Video tracked here -> (data key, framerate)

    @classmethod
    def parse(cls, xml: str) -> "LabelConfig":
        if not xml or not xml.strip():
            raise BackendError("label config is empty")
        try:
            li = LabelInterface(xml)
        except Exception as e:  # the SDK raises several kinds on bad XML
            raise BackendError(f"label config could not be parsed: {e}") from None
        images = [o for o in li.objects if o.tag == "Image"]
        videos = {o.name: o for o in li.objects if o.tag == "Video"}
        if not images and not videos:
            raise BackendError("label config has no <Image> or <Video> object; this backend labels images and videos")
        image_names = {o.name for o in images}
        controls = []
        for c in li.controls:
            to = [t for t in (c.to_name or []) if t in image_names]
            if not to:
                continue
            controls.append((Control(c.name, c.tag, to[0], *_labels(c)), c.attr or {}))
        tracks = _video_controls(li, videos)
        if not controls and tracks:  # a video project
            keys = {name: (videos[name].value or "").lstrip("$") for name in dict.fromkeys(c.to_name for c in tracks)}
            framerates = {name: str((videos[name].attr or {}).get("framerate") or (videos[name].attr or {})
                                    .get("frameRate") or "24") for name in keys}
            return cls(image="", value_key="", outputs=tracks, prompts={}, images={},
                       videos={name: (keys[name], framerates[name]) for name in keys})
        if not images:
            raise BackendError("label config has a <Video> but no <VideoRectangle> with <Labels> on it: add "
                               "<VideoRectangle name=\"box\" toName=\"video\"/> and <Labels toName=\"video\">")

        def smart(attr):
            return _truthy(attr.get("smart")) or _truthy(attr.get("smartOnly"))

        outputs = [c for c, a in controls if c.tag in ("PolygonLabels", "BrushLabels")]
        outputs += [c for c, a in controls if c.tag == "RectangleLabels" and not smart(a)]
        if not outputs:  # only smart rectangles: they are also where tight boxes go
            outputs = [c for c, a in controls if c.tag == "RectangleLabels"]
        if not outputs:
            raise BackendError(
                "label config has no PolygonLabels, BrushLabels or RectangleLabels for the image: "
                "add one so that this backend has somewhere to put its regions"
            )
        order = list(OUTPUT_TYPES)
        outputs.sort(key=lambda c: order.index(c.tag))
        prompts = {c.name: c for c, a in controls if c.tag in PROMPT_TAGS}
        keys = {o.name: (o.value or "").lstrip("$") for o in images}
        labelled = {name: keys[name] for name in dict.fromkeys(c.to_name for c in outputs)}
        image = outputs[0].to_name
        exemplars = {c.name for c, a in controls if c.tag == "RectangleLabels" and _truthy(a.get("exemplars"))}
        return cls(image=image, value_key=keys[image], outputs=[c for c in outputs if c.name not in exemplars],
                   prompts=prompts, images=labelled, exemplars=exemplars)

    @property
    def is_video(self) -> bool:
        return bool(self.videos)

    @property
    def labels(self) -> list[str]:
        """Every label an output control can carry, in config order, without repeats."""
        return list(dict.fromkeys(label for c in self.outputs for label in c.labels))

    def outputs_on(self, image: str) -> list[Control]:
        return [c for c in self.outputs if c.to_name == image]

    def labels_on(self, image: str) -> list[str]:
        return list(dict.fromkeys(label for c in self.outputs_on(image) for label in c.labels))

    def output_for(self, label: str, image: str | None = None) -> Control:
        """The output control that carries `label` on `image` (polygon before brush before box)."""
        outputs = self.outputs if image is None else self.outputs_on(image)
        for c in outputs:
            if label in c.labels:
                return c
        where = f" on image {image!r}" if image is not None and len(self.images) > 1 else ""
        valid = self.labels if image is None else self.labels_on(image)
        raise BackendError(
            f"label {label!r} is not in any output control{where} ({', '.join(c.name for c in outputs)}); "
            f"add it to the PolygonLabels/BrushLabels/RectangleLabels, or choose one of: {', '.join(valid)}"
        )

    def label_for_text(self, text: str) -> str | None:
        """The label a typed prompt names: a label value or one of its predicted_values, any case."""
        t = text.strip().lower()
        for c in self.outputs:
            for label in c.labels:
                if t == label.lower() or t in (s.lower() for s in c.synonyms.get(label, [])):
                    return label
        return None


def _labels(c) -> tuple[list[str], dict[str, list[str]]]:
    """A control's labels and their synonyms (predicted_values)."""
    labels = list(getattr(c, "labels", None) or [])
    syn = {}
    for value, tag in (getattr(c, "labels_attrs", None) or {}).items():
        pv = (tag.attr or {}).get("predicted_values")
        if pv:
            syn[value] = [s.strip() for s in pv.split(",") if s.strip()]
    return labels, syn


def _video_controls(li, videos: dict) -> list[Control]:
    """One output per VideoRectangle on a Video, carrying the labels of every Labels control on that Video
    (Label Studio keeps a video box's labels inside its own value)."""
    out = []
    for c in li.controls:
        if c.tag != "VideoRectangle":
            continue
        for video in [t for t in (c.to_name or []) if t in videos][:1]:
            labels, syn = [], {}
            for other in li.controls:
                if other.tag == "Labels" and video in (other.to_name or []):
                    more, more_syn = _labels(other)
                    labels += [label for label in more if label not in labels]
                    syn.update(more_syn)
            if labels:
                out.append(Control(c.name, c.tag, video, labels, syn))
    return out
