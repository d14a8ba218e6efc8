"""SAM 3 as this process holds it (`Sam3Model`): one engine for every project, loaded once in the background,
retried while it fails, loading, ready or failed with the reason; and the identity of its weights (which every
`model_version` carries)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch

from .. import metrics
from ..config import Settings
from ..errors import BackendError
from .engine import Sam3Engine

log = logging.getLogger(__name__)
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# How long a caller waits for a model that is still loading before it is told so (503):
CLICK_WAIT = 120.0  # an annotator's click
BATCH_WAIT = 300.0  # Retrieve Predictions, `predict` on local files
JOB_WAIT = 600.0  # a job's chunk (nobody waits on it; rq retries it later otherwise)


def _cache_file() -> Path:
    base = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "label-studio-sam3" / "fingerprints.json"


def _file_digest(path: Path, cache: dict) -> str:
    """A file's content hash, remembered by (path, size, mtime) so a restart does not re-read gigabytes."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in cache:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        cache[key] = h.hexdigest()
    return cache[key]


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
    """Identity of a checkpoint folder: its config and the content of its weight files."""
    path = Path(folder)
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    before = len(cache)
    h = hashlib.sha1()
    cfg = path / "config.json"
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    for f in sorted({f for pattern in WEIGHTS for f in path.glob(pattern)}):
        h.update(f"{f.name}:{_file_digest(f, cache)}".encode())
    if len(cache) != before:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))
        except OSError:  # a read-only home: hashed again next start, still correct
            pass
    return h.hexdigest()[:8]


def model_version(settings: Settings, fingerprint: str) -> str:
    """The checkpoint's part of every model_version: changes when the weights change, and only then."""
    name = Path(settings.model.rstrip("/")).name or "sam3"
    return f"{name}-{fingerprint}"


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.path.exists(model) or model.count("/") > 1


def checkpoint_folder(model: str) -> Path:
    """The folder the weights were loaded from: the path itself, or the hub snapshot of the resolved revision."""
    if _looks_like_path(model):
        return Path(os.path.expanduser(model))
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json")
    if not isinstance(found, str):
        raise BackendError(f"{model}: no downloaded snapshot in the Hugging Face cache")
    return Path(found).parent  # .../snapshots/<commit>: a new revision is a new folder


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _user() -> str:
    try:
        import pwd

        return f"uid {os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name})"
    except (ImportError, KeyError, AttributeError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"


def check_folder(model: str) -> None:
    """A local checkpoint folder this process can read, or a BackendError naming what is missing or unreadable.

    Checked before transformers looks: it reports a file it may not read as "no such file", which sends people
    looking for a file that is there (a checkpoint written 0600 by another user, mounted into a container)."""
    folder = Path(os.path.expanduser(model))
    fix = f"make it readable (chmod -R a+rX {folder}) or run as its owner"
    try:
        folder.stat()
    except PermissionError:  # a folder above it may not be entered
        raise BackendError(f"SAM3_MODEL={model}: permission denied: {_user()} cannot reach it (a folder on its "
                           f"path is not readable); {fix}") from None
    except OSError:
        raise BackendError(f"SAM3_MODEL={model}: no such folder (a SAM 3 checkpoint folder holds config.json, "
                           "model.safetensors and the processor files)") from None
    if not folder.is_dir():
        raise BackendError(f"SAM3_MODEL={model}: not a folder (a SAM 3 checkpoint is a folder holding config.json, "
                           "model.safetensors and the processor files)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise BackendError(f"SAM3_MODEL={model}: permission denied: the folder cannot be read by {_user()}; {fix}")
    if not (folder / "config.json").is_file():
        raise BackendError(f"SAM3_MODEL={model}: no config.json in that folder (a SAM 3 checkpoint folder holds "
                           "config.json, model.safetensors and the processor files)")
    if not any(f for pattern in WEIGHTS for f in folder.glob(pattern)):
        raise BackendError(f"SAM3_MODEL={model}: no weights in that folder (model.safetensors, or *.bin)")
    for f in sorted(folder.iterdir()):
        if f.is_file() and not os.access(f, os.R_OK):
            raise BackendError(f"SAM3_MODEL={model}: permission denied: {f} cannot be read by {_user()} "
                               f"(mode {f.stat().st_mode & 0o777:o}); {fix}")


def explain(e: BaseException, settings: Settings) -> str:
    """A load failure as one line that says what to do."""
    if isinstance(e, PermissionError):
        return (f"permission denied: {e.filename or e} cannot be read by {_user()}; make it readable "
                "(chmod -R a+rX on the folder) or run as its owner")
    oom = getattr(torch, "OutOfMemoryError", ())
    if isinstance(e, MemoryError) or (oom and isinstance(e, oom)):
        return (f"out of memory loading the model on {settings.device} ({type(e).__name__}): free memory, use "
                "SAM3_DTYPE=bfloat16 (half the memory of float32), or a device with more memory (the weights "
                "take about 1.7 GB in bf16, 3.4 GB in fp32)")
    if isinstance(e, FileNotFoundError):
        return f"missing file: {e.filename or e}"
    return f"{type(e).__name__}: {str(e)[:500]}"


def load_engine(settings: Settings) -> Sam3Engine:
    """The engine, or a BackendError that says what to do: a missing folder, an unreachable or gated hub."""
    model = settings.model
    engine = Sam3Engine(model, settings.device, int(settings.cache_mb * (1 << 20)), settings.dtype)
    if _looks_like_path(model):
        check_folder(model)
        return engine.load()
    try:
        return engine.load(local_files_only=True)  # already downloaded: no network at all
    except OSError:
        pass
    if not _hub_reachable():
        raise BackendError(
            f"SAM3_MODEL={model} is a Hugging Face hub id, but the hub cannot be reached from here and the "
            f"weights are not in the cache. Download them where the hub is reachable (huggingface-cli download "
            f"{model} --local-dir /models/sam3, after accepting the licence) and set SAM3_MODEL=/models/sam3")
    try:
        return engine.load()
    except OSError as e:
        raise BackendError(
            f"could not load {model} from the hub ({str(e)[:300]}). The facebook/sam3 weights are gated: accept "
            "the licence on the hub and set HF_TOKEN, or set SAM3_MODEL to a local checkpoint folder") from None


class Sam3Model:
    """The process's SAM 3: its engine, loaded once in the background; a failed load is retried with backoff.

    Until it is loaded, /health answers 503 with the state and the reason, and /setup and /predict refuse.
    """

    RETRY = (15.0, 600.0)  # first and longest wait between load attempts, in seconds

    def __init__(self, settings: Settings, engine: Sam3Engine | None = None):
        self.settings = settings
        self.engine = engine
        self.state = "loading"
        self.error = ""
        self.retry_at: float | None = None
        self.fingerprint: str | None = None
        self._ready = threading.Event()
        if engine is not None and engine.loaded:
            self._loaded(engine)

    def _loaded(self, engine: Sam3Engine) -> None:
        self.fingerprint = checkpoint_fingerprint(checkpoint_folder(engine.model_id))
        self.engine, self.state, self.error, self.retry_at = engine, "ready", "", None
        metrics.MODEL_LOADED.set(1)
        self._ready.set()

    def identify(self) -> None:
        """The weights' identity without loading them (a local folder, or a hub snapshot already downloaded)."""
        if self.fingerprint is None:
            self.fingerprint = checkpoint_fingerprint(checkpoint_folder(self.settings.model))

    @property
    def model_version(self) -> str | None:
        return model_version(self.settings, self.fingerprint) if self.fingerprint else None

    def start_loading(self) -> None:
        if self.state != "ready":
            threading.Thread(target=self._load_until_loaded, name="sam3-load", daemon=True).start()

    def _load_until_loaded(self) -> None:
        delay, said = self.RETRY[0], ""
        while not self.load().state == "ready":
            self.retry_at = time.time() + delay
            if self.error != said:  # once per reason, loudly; the same reason again only quietly
                log.error("SAM 3 model %s failed to load: %s. /health reports it; the next attempt is in %.0f s "
                          "(then ever less often, up to every %.0f s)", self.settings.model, self.error, delay,
                          self.RETRY[1])
                said = self.error
            else:
                log.info("SAM 3 model %s still fails to load (same reason); next attempt in %.0f s",
                         self.settings.model, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.RETRY[1])
            self.state = "loading"

    def load(self) -> "Sam3Model":
        """One attempt, in this thread (the CLI); a failure is kept for /health and predict, not raised.

        Any failure counts, not only exceptions (a SystemExit raised by a library inside the loader thread would
        otherwise end the thread silently and leave /health saying "loading" forever)."""
        try:
            self._loaded(load_engine(self.settings))
        except BackendError as e:
            self.state, self.error = "failed", e.message
        except BaseException as e:  # reported by /health and by every predict
            if isinstance(e, KeyboardInterrupt):
                raise
            log.debug("loading %s failed", self.settings.model, exc_info=True)
            self.state, self.error = "failed", explain(e, self.settings)
        finally:
            if self.state != "loading":
                self._ready.set()
        return self

    def wait(self, timeout: float) -> Sam3Engine:
        self._ready.wait(timeout)
        if self.state == "failed":
            raise BackendError(f"SAM 3 model {self.settings.model!r} failed to load: {self.error}", 503)
        if self.state != "ready":
            raise BackendError("SAM 3 model is still loading; try again in a moment", 503)
        return self.engine
