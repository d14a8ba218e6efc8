"""Fetch and decode task images, within a byte, pixel and time budget.

Relative references and Label Studio media URLs go to Label Studio with its token (`client`
decides); any other http(s) URL is fetched without it, through the address guard (`outbound`).
A failed fetch of a non-Label Studio URL reads the same whatever the cause (refused address, no
answer, HTTP error): the details go to the log, so the service is no port scanner.
"""
from __future__ import annotations

import io
import logging
import threading
import time

import numpy as np
import requests
from PIL import Image, ImageOps

from ..errors import BackendError, ImageError
from . import outbound
from .client import LabelStudio
from .outbound import Refused
from .retry import RETRY_STATUS, Backoff, Transient, retry_after, with_retries

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = None  # we apply our own, clearer, limit (from the header, before decoding)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # what a labelling tool needs; never EPS/PS
_DECODING = threading.BoundedSemaphore(4)  # full-size decodes at once: each can take hundreds of MB
FETCH_FAILED = "could not fetch the task's image (the backend's log has the details)"


WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}  # 16-bit, 32-bit and float grey images


def _stretch(img: Image.Image) -> Image.Image:
    """A 16/32-bit or float grey image as 8-bit RGB, scaled by its own range (Pillow's convert clips at 255,
    which turns a 16-bit image almost white)."""
    a = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(a)
    lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
    scaled = np.where(finite, (a - lo) * (255.0 / (hi - lo)) if hi > lo else 0.0, 0.0)
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def _short(ref: str) -> str:
    return ref if len(ref) <= 120 else ref[:100] + "..."


class ImageLoader:
    """Fetches task images with size limits; one instance per Label Studio connection."""

    def __init__(self, ls: LabelStudio | None, policy: outbound.Policy | None = None, max_bytes: int = 32 << 20,
                 max_pixels: float = 40e6, timeout: float = 30.0, backoff: Backoff | None = None):
        self.ls = ls
        self.client = ls.client if ls is not None else outbound.Client(policy or outbound.Policy())
        self.backoff = backoff or Backoff(attempts=3, base=0.2)
        self.max_bytes = int(max_bytes)
        self.max_pixels = max_pixels
        self.timeout = timeout  # for the whole fetch: every attempt, redirect and wait between them

    def url(self, ref) -> outbound.URL:
        if not isinstance(ref, str) or not ref.strip():
            raise ImageError("task has no image URL", 400)
        try:
            if self.ls is not None:
                return self.ls.locate(ref)
            if "://" not in ref.split("?", 1)[0]:
                raise ImageError(
                    f"image {_short(ref)!r} is served by Label Studio, but no Label Studio URL is known: set "
                    "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or connect the model from Label Studio")
            return outbound.parse_url(ref)
        except Refused as e:
            raise ImageError(f"image URL refused: {e}") from None

    def fetch_bytes(self, ref, max_bytes: int | None = None, what: str = "image",
                    timeout: float | None = None) -> bytes:
        limit = int(max_bytes or self.max_bytes)
        if isinstance(ref, str) and ref.lstrip()[:5].lower() == "data:":
            try:
                return outbound.data_uri(ref.strip(), limit)
            except outbound.TooLarge:
                raise ImageError(f"{what} is over the {limit >> 20} MB limit", 413) from None
            except Refused as e:
                raise ImageError(str(e)) from None
        url = self.url(ref)
        until = time.monotonic() + (timeout or self.timeout)
        try:
            return with_retries(lambda: self._get(url, until, limit, what), self.backoff, f"fetch {url.host}", until)
        except Transient as e:
            log.warning("image %s: %s", _short(str(url)), e)
            raise ImageError(self._failed(url)) from None

    def _failed(self, url: outbound.URL, status: int | None = None) -> str:
        if self.ls is not None and self.ls.is_media(url):  # Label Studio's own answers are no secret
            return f"could not fetch image {url.path} from Label Studio at {self.ls.url}" + (
                f" (HTTP {status})" if status else "")
        return FETCH_FAILED

    def _get(self, url: outbound.URL, until: float, limit: int, what: str) -> bytes:
        try:
            r = self.client.send("GET", url, timeout=until - time.monotonic(), max_bytes=limit,
                                 auth=self.ls.auth if self.ls is not None else None, follow=True)
        except (Refused, outbound.DeadlineExceeded) as e:
            log.warning("image %s: %s", _short(str(url)), e)
            raise ImageError(self._failed(url)) from None
        except outbound.TooLarge as e:
            log.warning("image %s: %s", _short(str(url)), e)
            raise ImageError(f"{what} is over the {limit >> 20} MB limit", 413) from None
        except requests.RequestException as e:
            raise Transient(f"{type(e).__name__}") from None
        except BackendError as e:  # the personal access token was refused at refresh
            raise ImageError(e.message) from None
        if r.status in RETRY_STATUS:
            raise Transient(f"HTTP {r.status}", retry_after(r.headers))
        if r.status != 200:
            log.warning("image %s answered HTTP %d", _short(str(r.url)), r.status)
            if r.status in (401, 403) and self.ls is not None and self.ls.is_media(r.url):
                raise ImageError(
                    f"Label Studio at {self.ls.url} refused this backend's token for {r.url.path} (HTTP {r.status}): "
                    "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access token of a user in the project)")
            raise ImageError(self._failed(r.url, r.status))
        log.debug("fetched %s%s", _short(str(r.url)), " with the Label Studio token"
                  if self.ls is not None and self.ls.is_media(r.url) and self.ls.token else "")
        return r.body

    def decode(self, data: bytes, name: str = "image") -> Image.Image:
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size  # read from the header, before any pixel is decoded
            if w * h > self.max_pixels:
                raise ImageError(f"{name} is {w}x{h} pixels, over the {self.max_pixels / 1e6:.0f} MP limit", 413)
            with _DECODING:
                img = ImageOps.exif_transpose(img)  # the orientation Label Studio shows
                if img.mode in WIDE_MODES:
                    return _stretch(img)
                return img.convert("RGB")
        except ImageError:
            raise
        except Exception as e:  # Pillow raises many kinds on hostile files; none may become a 500
            raise ImageError(f"{name} is not a readable image ({type(e).__name__}: {str(e)[:200]})") from None

    def load(self, ref) -> Image.Image:
        return self.decode(self.fetch_bytes(ref), name=f"image {_short(ref)}" if isinstance(ref, str) else "image")
