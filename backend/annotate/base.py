"""A `LabelStudioMLBase`-style base class: one instance per Label Studio project.

Subclasses implement `setup()` and `predict(tasks, context, **kwargs)`, as in every Label Studio
ML backend; `backend.http` serves them over the ML-backend HTTP contract.
"""
from __future__ import annotations

from ..config import Settings


class LabelStudioMLBase:
    def __init__(
        self,
        project_id: str | None = None,
        label_config: str | None = None,
        hostname: str = "",
        access_token: str = "",
        extra_params: dict | None = None,
        settings: Settings | None = None,
        **kwargs,
    ):
        self.project_id = project_id
        self.label_config = label_config
        self.hostname = hostname or ""
        self.access_token = access_token or ""
        self.extra_params = extra_params or {}
        self.settings = settings or Settings.from_env()
        self.setup()

    def setup(self) -> None:
        """Prepare per-project state; must be fast (Label Studio waits 3 s for /setup)."""

    @property
    def model_version(self) -> str:
        return "0"

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One prediction dict ({"result": [...], "score", "model_version"}) per task, in task order."""
        raise NotImplementedError
