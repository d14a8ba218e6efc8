"""The projects this service was set up for: one `SAM3Backend` per Label Studio project, the least recently
used dropped past SAM3_MAX_PROJECTS, rebuilt when a request brings another label config."""
from __future__ import annotations

import threading

from cachetools import LRUCache

from ..annotate.backend import SAM3Backend
from ..config import Settings
from ..errors import BackendError
from ..sam3.model import Sam3Model


class Projects:
    def __init__(self, settings: Settings, sam3: Sam3Model):
        self.settings, self.sam3 = settings, sam3
        self._items: LRUCache = LRUCache(maxsize=settings.max_projects)
        self._lock = threading.Lock()

    def setup(self, project: str, schema: str, hostname="", access_token="", extra_params=None) -> SAM3Backend:
        model = SAM3Backend(project_id=project, label_config=schema, hostname=hostname, access_token=access_token,
                            extra_params=extra_params, settings=self.settings, sam3=self.sam3)
        with self._lock:
            self._items[project] = model
        return model

    def _find(self, project: str) -> SAM3Backend | None:
        with self._lock:
            return self._items.get(project)

    def connection(self, project: str) -> tuple[str, str]:
        """The Label Studio host and token a project's /setup gave, or empty strings."""
        model = self._find(project)
        return (model.hostname, model.access_token) if model else ("", "")

    def get(self, project: str, label_config: str) -> SAM3Backend:
        model = self._find(project)
        if model is not None and (not label_config or label_config == model.label_config):
            return model
        if model is not None:  # the config changed since /setup: keep its connection
            return self.setup(project, label_config, model.hostname, model.access_token, model.extra_params)
        if not label_config:
            raise BackendError("label_config is required (or call /setup for this project first)")
        return self.setup(project, label_config)
