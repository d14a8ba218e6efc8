"""The ontology: which text prompt finds which label (and at what score), and the thresholds that decide what
is kept. Read from a project's extra params or SAM3_ONTOLOGY, in Roboflow Auto Label's formats, else from the
label config's `predicted_values` synonyms, else from the label names.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..errors import BackendError
from ..sam3.tracking import Concept
from ..validate import number, parse_bool, parse_json
from .labelconfig import LabelConfig


@dataclass(frozen=True)
class Entry:
    prompt: str
    label: str
    threshold: float | None = None


@dataclass
class Thresholds:
    confidence: float = 0.5  # default minimum score
    per_label: dict[str, float] = field(default_factory=dict)
    max_detections: int = 100  # per image, best first
    min_area: float = 0.0  # pixels; smaller instances are dropped
    nms: bool = True  # across prompts: two prompts finding one object give one region
    nms_iou: float = 0.5

    @classmethod
    def from_dict(cls, data: dict | None, base: "Thresholds | None" = None) -> "Thresholds":
        out = Thresholds(**asdict(base)) if base else Thresholds()
        if not data:
            return out
        if not isinstance(data, dict):
            raise BackendError("thresholds must be an object")
        names = {"confidence", "per_label", "max_detections", "min_area", "nms", "nms_iou"}
        unknown = set(data) - names
        if unknown:
            raise BackendError(f"unknown threshold setting(s) {sorted(unknown)}; known: {sorted(names)}")
        for key, value in data.items():
            if key == "per_label":
                if not isinstance(value, dict) or len(value) > 1000:
                    raise BackendError("thresholds.per_label must map labels to numbers")
                out.per_label = {str(k): number(v, f"thresholds.per_label[{str(k)[:50]!r}]")
                                 for k, v in value.items()}
            elif key == "nms":
                try:
                    out.nms = parse_bool(value, "thresholds.nms")
                except ValueError as e:
                    raise BackendError(str(e)[:200]) from None
            elif key == "max_detections":
                v = number(value, "thresholds.max_detections")
                if v != int(v) or not 1 <= v <= 1000:
                    raise BackendError("thresholds.max_detections must be a whole number from 1 to 1000")
                out.max_detections = int(v)
            else:
                setattr(out, key, number(value, f"thresholds.{key}"))
        for name, v in [("confidence", out.confidence), ("nms_iou", out.nms_iou), *out.per_label.items()]:
            if not 0 <= v <= 1:
                raise BackendError(f"threshold {name[:50]} = {v} must be between 0 and 1")
        if out.min_area < 0:
            raise BackendError("thresholds.min_area must not be negative")
        return out

    def for_label(self, label: str, entry_threshold: float | None) -> float:
        if entry_threshold is not None:
            return entry_threshold
        return self.per_label.get(label, self.confidence)


def parse_ontology(spec, config: LabelConfig, max_entries: int = 256, max_chars: int = 200) -> list[Entry]:
    """Ontology in Roboflow Auto Label's formats, else `predicted_values` synonyms, else the labels.

    - {"a red car": "car", ...}            prompt -> label
    - ["car", "person"]                    each both prompt and label
    - [{"prompt", "label", "threshold"}]   with an optional per-prompt threshold
    """
    if isinstance(spec, str) and spec.strip():
        spec = parse_json(spec, "ontology")
    if isinstance(spec, (dict, list)) and len(spec) > max_entries:
        raise BackendError(f"ontology has {len(spec)} entries; at most {max_entries} (SAM3_MAX_ONTOLOGY)")
    entries: list[Entry] = []
    if not spec:
        for control in config.outputs:
            for label in control.labels:
                for prompt in [label, *control.synonyms.get(label, [])]:
                    entries.append(Entry(prompt, label))
    elif isinstance(spec, dict):
        if not all(isinstance(lbl, str) for lbl in spec.values()):
            raise BackendError("ontology maps prompts to label names (strings)")
        entries = [Entry(p, lbl) for p, lbl in spec.items()]
    elif isinstance(spec, list):
        for i, item in enumerate(spec):
            if isinstance(item, str):
                entries.append(Entry(item, item))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"]:
                th = item.get("threshold")
                th = None if th is None else number(th, f"ontology[{i}].threshold")
                label = item.get("label") or item["prompt"]
                if not isinstance(label, str):
                    raise BackendError(f"ontology[{i}].label must be a string")
                entries.append(Entry(item["prompt"], label, th))
            else:
                raise BackendError(f"ontology[{i}] must be a string or an object with a 'prompt'")
    else:
        raise BackendError("ontology must be an object (prompt -> label), a list of strings or a list of objects")
    valid = set(config.labels)
    bad = sorted({e.label for e in entries} - valid)
    if bad:
        raise BackendError(f"ontology names label(s) {[b[:50] for b in bad[:10]]} that the label config does not "
                           f"have; valid labels: {', '.join(config.labels)}")
    for e in entries:
        if not e.prompt.strip():
            raise BackendError("ontology has an empty prompt")
        if len(e.prompt) > max_chars:
            raise BackendError(f"ontology prompt {e.prompt[:50]!r}... is longer than {max_chars} characters")
        if e.threshold is not None and not 0 <= e.threshold <= 1:
            raise BackendError(f"threshold for prompt {e.prompt!r} must be between 0 and 1")
    return list(dict.fromkeys(entries))


EXTRA_KEYS = ("ontology", "thresholds", "tiling")


def extra_params(value) -> dict:
    """A model connection's extra params: an object, or the JSON text the Connect Model form sends (and Label
    Studio's API serves)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        if len(value) > 1 << 16:
            raise BackendError("extra_params is longer than 65536 characters")
        value = parse_json(value, "extra_params") if value.strip() else {}
    if not isinstance(value, dict):
        raise BackendError("extra_params must be a JSON object, e.g. {\"ontology\": {...}, \"thresholds\": {...}}")
    return value


def split_extra(spec) -> tuple[object, dict | None]:
    """(ontology, thresholds) from an ontology in any documented form: bare (Roboflow's three formats)
    or wrapped as in extra params, `{"ontology": ..., "thresholds": ...}`; JSON text or parsed."""
    if isinstance(spec, str):
        spec = parse_json(spec, "ontology") if spec.strip() else None
    if isinstance(spec, dict) and spec and set(spec) <= set(EXTRA_KEYS) and not isinstance(spec.get("ontology"), str):
        return spec.get("ontology"), spec.get("thresholds")
    return spec, None


def fingerprint(entries: list[Entry], thresholds: Thresholds, output: dict | None = None) -> str:
    """What decides a prediction beyond the weights: the ontology, the thresholds and `output` (the output
    controls and the settings that shape their regions)."""
    blob = json.dumps([[asdict(e) for e in entries], asdict(thresholds), output or {}], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:6]


def concepts(entries: list[Entry], thresholds: Thresholds) -> list[Concept]:
    """The entries as SAM 3 takes them: (prompt, label, the score a track of it must reach)."""
    return [Concept(e.prompt, e.label, thresholds.for_label(e.label, e.threshold)) for e in entries]
