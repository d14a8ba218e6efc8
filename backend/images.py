"""Fetch and decode task images.

Label Studio-served paths (`/data/upload/...`, `/data/local-files/...`, `/tasks/.../resolve/...`) are
fetched from the Label Studio host with its token; any other URL is fetched without it: the
token is only ever sent to the Label Studio origin it belongs to.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .retry import RETRY_STATUS, Backoff, Transient, retry_after, with_retries

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = None  # we apply our own, clearer, limit


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme)
    return p.scheme, (p.hostname or "").lower(), port


def _jwt_exp(token: str) -> float | None:
    """Expiry of a JWT (without verifying it; we only want to know when to refresh)."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(data["exp"])
    except (IndexError, ValueError, KeyError, binascii.Error, TypeError):
        return None


@dataclass
class LabelStudio:
    """A Label Studio host and the token that belongs to it.

    A legacy token is sent as `Token <t>`. A personal access token (a JWT refresh token) is exchanged
    at `/api/token/refresh/` for a short-lived access token sent as `Bearer <access>`.
    """

    url: str
    token: str = field(default="", repr=False)
    timeout: float = 30.0
    _access: str = field(default="", repr=False)
    _access_exp: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.url = (self.url or "").rstrip("/")

    @property
    def is_pat(self) -> bool:
        return self.token.count(".") == 2 and _jwt_exp(self.token) is not None

    def owns(self, url: str) -> bool:
        return bool(self.url) and _origin(url) == _origin(self.url)

    def auth_header(self) -> dict[str, str]:
        if not self.token:
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self.token}"}
        with self._lock:
            if not self._access or time.time() > self._access_exp - 30:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> None:
        try:
            r = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token}, timeout=self.timeout)
        except requests.RequestException as e:  # retried by the caller (`retry.with_retries`)
            raise Transient(f"could not reach Label Studio at {self.url} to refresh the access token: {e}") from None
        if r.status_code in RETRY_STATUS:
            raise Transient(f"Label Studio answered {r.status_code} to the token refresh", retry_after(r))
        if r.status_code != 200:
            raise ImageError(
                f"Label Studio refused the personal access token ({r.status_code}); check LABEL_STUDIO_API_KEY", 422
            )
        self._access = r.json()["access"]
        self._access_exp = _jwt_exp(self._access) or time.time() + 240


class ImageLoader:
    """Fetches task images with size limits; one instance per Label Studio connection."""

    def __init__(self, ls: LabelStudio | None, max_bytes: int = 50 << 20, max_pixels: float = 100e6, timeout=30.0,
                 backoff: Backoff | None = None):
        self.ls = ls
        self.backoff = backoff or Backoff(attempts=3, base=0.2)
        self.max_bytes = int(max_bytes)
        self.max_pixels = max_pixels
        self.timeout = timeout
        self.session = requests.Session()

    def resolve(self, url: str) -> str:
        if not isinstance(url, str) or not url.strip():
            raise ImageError("task has no image URL", 400)
        url = url.strip()
        if url.startswith("data:"):
            return url
        scheme = urlsplit(url).scheme
        if scheme in ("http", "https"):
            return url
        if scheme:
            raise ImageError(
                f"cannot fetch {scheme}:// images directly; serve them through Label Studio "
                "(cloud storage with presigned URLs or proxying) or use http(s) URLs"
            )
        if not (self.ls and self.ls.url):
            raise ImageError(
                f"image {url!r} is served by Label Studio, but no Label Studio URL is known: "
                "set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) or connect the model from Label Studio"
            )
        return urljoin(self.ls.url + "/", url.lstrip("/"))

    def fetch_bytes(self, url: str) -> bytes:
        full = self.resolve(url)
        if full.startswith("data:"):
            try:
                return base64.b64decode(full.split(",", 1)[1], validate=False)
            except (IndexError, binascii.Error):
                raise ImageError("data: URI image is not valid base64") from None
        try:
            return with_retries(lambda: self._get(full), self.backoff, f"fetch {full}")
        except Transient as e:
            raise ImageError(str(e)) from None

    def _get(self, full: str) -> bytes:
        headers = self.ls.auth_header() if (self.ls and self.ls.owns(full)) else {}
        try:
            with self.session.get(full, headers=headers, timeout=self.timeout, stream=True) as r:
                if r.status_code in (401, 403):
                    hint = (
                        "set LABEL_STUDIO_API_KEY to a valid token of a user with access to the project"
                        if headers or (self.ls and self.ls.owns(full))
                        else "the image server needs credentials this backend does not have"
                    )
                    raise ImageError(f"image {full} refused with HTTP {r.status_code}: {hint}")
                if r.status_code in RETRY_STATUS:
                    raise Transient(f"image {full} answered HTTP {r.status_code}", retry_after(r))
                if r.status_code != 200:
                    raise ImageError(f"image {full} answered HTTP {r.status_code}")
                size = int(r.headers.get("Content-Length") or 0)
                if size > self.max_bytes:
                    raise ImageError(f"image {full} is {size >> 20} MB, over the {self.max_bytes >> 20} MB limit", 413)
                buf = io.BytesIO()
                for chunk in r.iter_content(1 << 16):
                    buf.write(chunk)
                    if buf.tell() > self.max_bytes:
                        raise ImageError(f"image {full} is over the {self.max_bytes >> 20} MB limit", 413)
                log.debug("fetched %s%s", full, " with the Label Studio token" if headers else "")
                return buf.getvalue()
        except requests.RequestException as e:
            raise Transient(f"could not fetch image {full}: {type(e).__name__}: {e}") from None

    def decode(self, data: bytes, name: str = "image") -> Image.Image:
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # read from the header, before any pixel is decoded
            if w * h > self.max_pixels:
                raise ImageError(f"{name} is {w}x{h} pixels, over the {self.max_pixels / 1e6:.0f} MP limit", 413)
            img = ImageOps.exif_transpose(img)  # the orientation Label Studio shows
            return img.convert("RGB")
        except ImageError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{name} is not a readable image: {e}") from None

    def load(self, url: str) -> Image.Image:
        return self.decode(self.fetch_bytes(url), name=f"image {url}")
