"""The one task type every path labels (Retrieve Predictions, jobs, the command line), and what comes out."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BackendError


@dataclass
class Task:
    """A Label Studio task: its id, its data (the media URLs by key), and what it already holds. A job knows a
    task by id until its loader reads it (`data` empty until then)."""

    id: int | str | None
    data: dict = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)

    @classmethod
    def from_json(cls, raw: dict) -> "Task":
        """A task as Label Studio sends or serves it (checked at the edge: `http.requests`)."""
        data = raw.get("data")
        if data is not None and not isinstance(data, dict):
            raise BackendError(f"task {raw.get('id')} data must be an object")
        return cls(raw.get("id"), data or {}, [p for p in raw.get("predictions") or [] if isinstance(p, dict)],
                   [a for a in raw.get("annotations") or [] if isinstance(a, dict)])

    def media(self, key: str, what: str = "image") -> str:
        """The URL under data[key]: BackendError naming the key when it is missing or not a string."""
        if key not in self.data:
            raise BackendError(f"task {self.id} data has no {key!r} field (the {what.capitalize()}'s "
                               f"value=\"${key}\")")
        if not isinstance(self.data[key], str):
            raise BackendError(f"task {self.id} data.{key} must be {'an' if what == 'image' else 'a'} {what} URL "
                               "(a string)")
        return self.data[key]


@dataclass
class Outcome:
    """One task's result: its prediction, or the error it failed with (never both); the decoded images, for
    previews."""

    task: Task
    images: dict = field(default_factory=dict)
    prediction: dict | None = None
    error: Exception | None = None
