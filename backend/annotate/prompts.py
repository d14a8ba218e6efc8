"""Turn Label Studio's interactive context (`params.context.result`) into prompts.

Everything is checked here, in percent of the image, before the image is fetched or encoded: a bad
prompt costs a 400 in milliseconds, never a download, a ViT pass or the model lock.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BackendError
from ..validate import number
from .labelconfig import LabelConfig

EPS = 1e-6  # percent; LS can send 100.00000000001 for a click on the last pixel


@dataclass
class Prompt:
    points: list[tuple[float, float]] = field(default_factory=list)  # percent x, y
    point_labels: list[int] = field(default_factory=list)  # 1 positive, 0 negative
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # percent x0, y0, x1, y1
    exemplars: list[tuple[tuple[float, float, float, float], int]] = field(default_factory=list)  # box, 1 like / 0 not
    text: str = ""
    label: str | None = None  # the label the annotator had selected
    image: str | None = None  # the Image object the prompts were made on

    @property
    def empty(self) -> bool:
        return not (self.points or self.boxes or self.text or self.exemplars)

    def points_px(self, width: int, height: int) -> list[tuple[float, float]]:
        return [(x * width / 100.0, y * height / 100.0) for x, y in self.points]

    def boxes_px(self, width: int, height: int, boxes=None) -> list[tuple[float, float, float, float]]:
        return [(x0 * width / 100.0, y0 * height / 100.0, x1 * width / 100.0, y1 * height / 100.0)
                for x0, y0, x1, y1 in (self.boxes if boxes is None else boxes)]

    def exemplars_px(self, width: int, height: int) -> list[tuple[tuple[float, float, float, float], int]]:
        boxes = self.boxes_px(width, height, [b for b, _ in self.exemplars])
        return list(zip(boxes, [v for _, v in self.exemplars]))


def _percent(value, what: str) -> float:
    v = number(value, what)
    if v < -EPS or v > 100 + EPS:
        raise BackendError(f"{what} = {v} is outside the image (0..100 percent)")
    return min(max(v, 0.0), 100.0)


def _polarity(region: dict, value: dict) -> int:
    # Older UIs put it at the top level, newer ones in value.positive; default positive.
    flag = value.get("positive", region.get("is_positive", True))
    if isinstance(flag, str):
        flag = flag.lower() not in ("false", "0", "no")
    return 1 if flag else 0


def parse_context(context, config: LabelConfig, max_prompts: int = 64, max_chars: int = 200) -> Prompt:
    """The prompt in percent coordinates; BackendError (400) naming the first problem found."""
    if not context:
        return Prompt()
    if not isinstance(context, dict):
        raise BackendError("params.context must be an object")
    results = context.get("result") or []
    if not isinstance(results, list):
        raise BackendError("params.context.result must be a list of regions")
    if len(results) > max_prompts:
        raise BackendError(f"params.context.result has {len(results)} regions; at most {max_prompts} "
                           "(SAM3_MAX_PROMPTS) are taken in one request")
    reader = _Reader(config, max_chars)
    for i, region in enumerate(results):
        reader.region(f"context.result[{i}]", region)
    reader.prompt.label = reader.prompt.label or reader.negative_label
    return reader.prompt


class _Reader:
    """Reads the regions of one context into a Prompt. The object's label is what its positive prompts say; a
    negative click's or box's label only as a fallback."""

    def __init__(self, config: LabelConfig, max_chars: int):
        self.config, self.max_chars = config, max_chars
        self.prompt = Prompt()
        self.negative_label: str | None = None

    def region(self, where: str, region) -> None:
        config = self.config
        if not isinstance(region, dict):
            raise BackendError(f"{where} must be an object")
        name, rtype = region.get("from_name"), region.get("type")
        if not isinstance(name, str) or name not in config.prompts:
            known = ", ".join(config.prompts) or "none"
            raise BackendError(f"{where}: unknown control {str(name)[:50]!r} (prompt controls in this config: {known})")
        if not isinstance(rtype, str):
            raise BackendError(f"{where}.type must be a string")
        image = region.get("to_name")
        image = image if isinstance(image, str) and image in config.images else config.prompts[name].to_name
        if image not in config.images:
            raise BackendError(f"{where}: no output control labels image {image!r}; add a PolygonLabels, "
                               "BrushLabels or RectangleLabels with toName=\"" + image + "\"")
        if self.prompt.image not in (None, image):
            raise BackendError(f"{where}: prompts on two images ({self.prompt.image!r}, {image!r}) in one request")
        self.prompt.image = image
        value = region.get("value")
        if not isinstance(value, dict):
            raise BackendError(f"{where}.value must be an object")
        read = {"keypointlabels": self.keypoint, "rectanglelabels": self.rectangle, "textarea": self.textarea}
        if rtype.lower() not in read:
            raise BackendError(f"{where}: region type {rtype[:50]!r} is not a prompt "
                               "(use keypoints, rectangles or text)")
        read[rtype.lower()](where, name, region, value)

    def _labelled(self, label: str | None, positive: int) -> None:
        if positive:
            self.prompt.label = label or self.prompt.label
        else:
            self.negative_label = self.negative_label or label

    def keypoint(self, where: str, name: str, region: dict, value: dict) -> None:
        x = _percent(value.get("x"), f"{where}.value.x")
        y = _percent(value.get("y"), f"{where}.value.y")
        polarity = _polarity(region, value)
        self.prompt.points.append((x, y))
        self.prompt.point_labels.append(polarity)
        self._labelled(_first_label(value, "keypointlabels", where), polarity)

    def rectangle(self, where: str, name: str, region: dict, value: dict) -> None:
        x = _percent(value.get("x"), f"{where}.value.x")
        y = _percent(value.get("y"), f"{where}.value.y")
        w = number(value.get("width"), f"{where}.value.width")
        h = number(value.get("height"), f"{where}.value.height")
        if w <= 0 or h <= 0:
            raise BackendError(f"{where}: rectangle width and height must be positive")
        box = (x, y, _percent(x + w, f"{where}.value.x + width"), _percent(y + h, f"{where}.value.y + height"))
        label = _first_label(value, "rectanglelabels", where)
        if name in self.config.exemplars:  # "every instance like this box" (or, drawn negative, "not like this")
            polarity = _polarity(region, value)
            self.prompt.exemplars.append((box, polarity))
            self._labelled(label, polarity)
        else:
            self.prompt.boxes.append(box)
            self._labelled(label, 1)

    def textarea(self, where: str, name: str, region: dict, value: dict) -> None:
        text = value.get("text")
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise BackendError(f"{where}.value.text must be a list of strings")
        joined = " ".join(t.strip() for t in text if t.strip())
        if len(joined) > self.max_chars:
            raise BackendError(f"{where}: text prompt is {len(joined)} characters; at most {self.max_chars} "
                               "(SAM3_MAX_PROMPT_CHARS)")
        self.prompt.text = joined


def _first_label(value: dict, key: str, where: str) -> str | None:
    labels = value.get(key) or value.get("labels") or []
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise BackendError(f"{where}.value.{key} must be a list of label names")
    return labels[0] if labels else None
