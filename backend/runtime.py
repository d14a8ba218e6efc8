"""The process-wide model: loaded once in the background, and the identity of its checkpoint."""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from . import metrics
from .config import Settings
from .engine import Sam3Engine
from .errors import BackendError

log = logging.getLogger(__name__)


def checkpoint_fingerprint(model: str) -> str:
    """Identity of the weights: a local folder by its config and weight files, a hub id by name."""
    path = Path(model)
    h = hashlib.sha1()
    if path.is_dir():
        cfg = path / "config.json"
        h.update(cfg.read_bytes() if cfg.exists() else b"")
        for f in sorted(path.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    else:
        h.update(model.encode())
    return h.hexdigest()[:8]


def model_version(settings: Settings, fingerprint: str) -> str:
    """Changes when the checkpoint changes, and only then."""
    name = Path(settings.model.rstrip("/")).name or "sam3"
    return f"{name}-{fingerprint}"


class Runtime:
    """The process-wide engine, loaded once in the background so that /health and /setup answer at once."""

    def __init__(self, settings: Settings, engine: Sam3Engine | None = None):
        self.settings = settings
        self.engine = engine
        self.state = "ready" if engine is not None and engine.loaded else "loading"
        self.error = ""
        self.fingerprint = checkpoint_fingerprint(settings.model)
        self._ready = threading.Event()
        if self.state == "ready":
            self._ready.set()

    def start_loading(self) -> None:
        if self.state == "ready":
            return
        threading.Thread(target=self.load, name="sam3-load", daemon=True).start()

    def load(self) -> "Runtime":
        """Load in this thread (the CLI); failures are kept for /health and predict, not raised."""
        try:
            engine = Sam3Engine(self.settings.model, self.settings.device, int(self.settings.cache_mb * (1 << 20)))
            self.engine = engine.load()
            self.state = "ready"
            metrics.MODEL_LOADED.set(1)
        except Exception as e:  # reported by /health and by every predict
            log.exception("loading %s failed", self.settings.model)
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            self._ready.set()
        return self

    def wait(self, timeout: float) -> Sam3Engine:
        self._ready.wait(timeout)
        if self.state == "failed":
            raise BackendError(f"SAM 3 model {self.settings.model!r} failed to load: {self.error}", 503)
        if self.state != "ready":
            raise BackendError("SAM 3 model is still loading; try again in a moment", 503)
        return self.engine
