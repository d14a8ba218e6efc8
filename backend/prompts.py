"""Turn Label Studio's interactive context (`params.context.result`) into pixel-space prompts."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BackendError
from .labelconfig import LabelConfig

EPS = 1e-6  # percent; LS can send 100.00000000001 for a click on the last pixel


@dataclass
class Prompt:
    points: list[tuple[float, float]] = field(default_factory=list)  # pixel x, y
    point_labels: list[int] = field(default_factory=list)  # 1 positive, 0 negative
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # pixel x0, y0, x1, y1
    text: str = ""
    label: str | None = None  # the label the annotator had selected

    @property
    def empty(self) -> bool:
        return not (self.points or self.boxes or self.text)


def _number(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BackendError(f"{what} must be a number, got {value!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise BackendError(f"{what} must be a finite number, got {value!r}")
    return v


def _percent(value, what: str) -> float:
    v = _number(value, what)
    if v < -EPS or v > 100 + EPS:
        raise BackendError(f"{what} = {v} is outside the image (0..100 percent)")
    return min(max(v, 0.0), 100.0)


def _polarity(region: dict) -> int:
    # Older UIs put it at the top level, newer ones in value.positive; default positive.
    value = region.get("value") or {}
    flag = value.get("positive", region.get("is_positive", True))
    if isinstance(flag, str):
        flag = flag.lower() not in ("false", "0", "no")
    return 1 if flag else 0


def parse_context(context: dict | None, config: LabelConfig, width: int, height: int) -> Prompt:
    """Prompts in pixels of the image as loaded (width x height), from percent coordinates."""
    prompt = Prompt()
    if not context:
        return prompt
    if not isinstance(context, dict):
        raise BackendError("params.context must be an object")
    results = context.get("result") or []
    negative_label = None
    if not isinstance(results, list):
        raise BackendError("params.context.result must be a list of regions")
    for i, region in enumerate(results):
        if not isinstance(region, dict):
            raise BackendError(f"context.result[{i}] must be an object")
        name = region.get("from_name")
        rtype = (region.get("type") or "").lower()
        if name not in config.prompts:
            known = ", ".join(config.prompts) or "none"
            raise BackendError(f"context.result[{i}]: unknown control {name!r} (prompt controls in this config: {known})")
        value = region.get("value")
        if not isinstance(value, dict):
            raise BackendError(f"context.result[{i}].value must be an object")
        where = f"context.result[{i}]"
        if rtype == "keypointlabels":
            x = _percent(value.get("x"), f"{where}.value.x") * width / 100.0
            y = _percent(value.get("y"), f"{where}.value.y") * height / 100.0
            polarity = _polarity(region)
            prompt.points.append((x, y))
            prompt.point_labels.append(polarity)
            label = _first_label(value, "keypointlabels")
            if polarity:  # the object's label is what its positive prompts say; a negative click's only as a fallback
                prompt.label = label or prompt.label
            else:
                negative_label = negative_label or label
        elif rtype == "rectanglelabels":
            x = _percent(value.get("x"), f"{where}.value.x")
            y = _percent(value.get("y"), f"{where}.value.y")
            w = _number(value.get("width"), f"{where}.value.width")
            h = _number(value.get("height"), f"{where}.value.height")
            if w <= 0 or h <= 0:
                raise BackendError(f"{where}: rectangle width and height must be positive")
            x1 = _percent(x + w, f"{where}.value.x + width")
            y1 = _percent(y + h, f"{where}.value.y + height")
            prompt.boxes.append((x * width / 100.0, y * height / 100.0, x1 * width / 100.0, y1 * height / 100.0))
            prompt.label = _first_label(value, "rectanglelabels") or prompt.label
        elif rtype == "textarea":
            text = value.get("text")
            if isinstance(text, str):
                text = [text]
            if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
                raise BackendError(f"{where}.value.text must be a list of strings")
            prompt.text = " ".join(t.strip() for t in text if t.strip())
        else:
            raise BackendError(f"{where}: region type {rtype!r} is not a prompt (use keypoints, rectangles or text)")
    prompt.label = prompt.label or negative_label
    return prompt


def _first_label(value: dict, key: str) -> str | None:
    labels = value.get(key) or value.get("labels") or []
    if isinstance(labels, str):
        return labels
    return labels[0] if labels else None
