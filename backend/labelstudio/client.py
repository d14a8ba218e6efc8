"""Talking to Label Studio: which one, with which token, and the API calls jobs make.

The one rule (`connect`): `LABEL_STUDIO_URL` with `LABEL_STUDIO_API_KEY` is the connection for every
project and every job; without them, each project's `/setup` hostname goes with that `/setup`'s token.
A token is never paired with another host.

`api(settings, hostname, token)` is that connection's API client, with retries, for jobs and late posts.
The token is attached in one place (`LabelStudio._authorization`), and only to
- API calls this backend builds itself from a clean `/api/...` path on Label Studio's URL, and
- media URLs (`/data/upload/...`, `/data/local-files/...`, `/tasks/<id>/resolve/...`, ...) whose origin,
  as the HTTP client connects to it (`outbound.parse_url`), is Label Studio's, with no dot segments.
Redirects are followed hop by hop and each hop gets the token only if it passes the same test.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from urllib.parse import unquote, urlencode

import requests
from cachetools import TTLCache

from ..errors import BackendError
from . import outbound
from .outbound import URL, Refused
from .retry import RETRY_STATUS, Backoff, Transient, retry_after, with_retries

log = logging.getLogger(__name__)

# Paths under which Label Studio serves task media (see label_studio/data_import/urls.py, io_storages/urls.py).
MEDIA = re.compile(r"/(?:data/upload|data/local-files|storage-data/uploaded)/"
                   r"|/(?:tasks|projects)/[0-9]+/(?:resolve|presign)/")
API = re.compile(r"/api/[A-Za-z0-9_/.-]*")
API_MAX_BYTES = 256 << 20  # a page of tasks with their predictions


def _jwt_exp(token: str) -> float | None:
    """Expiry of a JWT (without verifying it; we only want to know when to refresh)."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = float(data["exp"])
        return exp if exp == exp else None
    except (IndexError, ValueError, KeyError, binascii.Error, TypeError, OverflowError):
        return None


def _clean_segments(path: str) -> bool:
    """No `.`/`..` segment, raw or percent-encoded, and no encoded slash or backslash."""
    decoded = unquote(path)
    if "\\" in decoded or "%2f" in path.lower() or "%5c" in path.lower():
        return False
    return not any(seg in (".", "..") for seg in decoded.split("/"))


class LabelStudio:
    """One Label Studio (its URL as this machine reaches it) and the token that belongs to it.

    A legacy token is sent as `Token <t>`. A personal access token (a JWT refresh token) is exchanged at
    `/api/token/refresh/` for a short-lived access token sent as `Bearer <access>`.
    """

    def __init__(self, url: str, token: str = "", policy: outbound.Policy | None = None, timeout: float = 30.0):
        try:
            self.base = outbound.parse_url(url)
        except Refused as e:
            raise BackendError(f"Label Studio URL {str(url)[:200]!r} is not usable: {e}") from None
        if "?" in self.base.target:
            raise BackendError("Label Studio URL must not carry a query string")
        self.prefix = self.base.path.rstrip("/")  # Label Studio served under a sub-path
        if not _clean_segments(self.prefix + "/"):
            raise BackendError("Label Studio URL path has dot segments")
        self.token = token if isinstance(token, str) else ""
        self.timeout = timeout
        # Label Studio itself may be on a private network (compose); everything else is guarded.
        self.client = outbound.Client((policy or outbound.Policy()).exempting(self.base.origin))
        self._access = ""
        self._access_exp = 0.0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return str(self.base).rstrip("/")

    @property
    def is_pat(self) -> bool:
        return self.token.count(".") == 2 and _jwt_exp(self.token) is not None

    # ---- which URL, which headers --------------------------------------------------------------
    def is_media(self, url: URL) -> bool:
        """A Label Studio media URL on Label Studio's own origin: the only fetched URLs that get the token."""
        if url.origin != self.base.origin or not url.path.startswith(self.prefix + "/"):
            return False
        rest = url.path[len(self.prefix):]
        return _clean_segments(rest) and MEDIA.match(rest) is not None

    def locate(self, ref: str) -> URL:
        """The URL of a task's image: absolute http(s) as given, a relative reference on Label Studio.

        On Label Studio's own origin only media paths are fetched (that origin passes the address guard)."""
        if "://" in ref.split("?", 1)[0]:
            url = outbound.parse_url(ref)
            if url.origin == self.base.origin and not self.is_media(url):
                raise Refused(f"{url.path[:100]!r} on Label Studio is not a media path")
            return url
        ref = ref.strip(" \t\r\n")
        if ref.startswith("//") or not ref:
            raise Refused("relative image reference is not a Label Studio path")
        url = outbound.parse_url(f"{self.url}/{ref.lstrip('/')}")
        if not self.is_media(url):
            raise Refused(f"{ref[:100]!r} is not a Label Studio media path (/data/upload/..., /data/local-files/..., "
                          "/tasks/<id>/resolve/...)")
        return url

    def auth(self, url: URL) -> dict[str, str]:
        return self._authorization() if self.is_media(url) else {}

    def _authorization(self) -> dict[str, str]:
        if not self.token:
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self.token}"}
        with self._lock:
            if not self._access or time.time() > self._access_exp - 30:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> None:
        url = outbound.parse_url(f"{self.url}/api/token/refresh/")
        try:
            r = self.client.send("POST", url, json={"refresh": self.token}, timeout=self.timeout, max_bytes=1 << 20)
        except (requests.RequestException, outbound.DeadlineExceeded, outbound.TooLarge) as e:
            raise Transient(f"could not reach Label Studio at {self.url} to refresh the access token "
                            f"({type(e).__name__})") from None
        if r.status in RETRY_STATUS:
            raise Transient(f"Label Studio answered {r.status} to the token refresh", retry_after(r.headers))
        try:
            access = r.json()["access"] if r.status == 200 else None
        except (ValueError, KeyError, TypeError):
            access = None
        if not isinstance(access, str) or not access:
            raise BackendError(f"Label Studio at {self.url} refused the personal access token (HTTP {r.status}): "
                               "set LABEL_STUDIO_API_KEY to a current personal access token", 401)
        self._access = access
        self._access_exp = _jwt_exp(access) or time.time() + 240

    def check(self, project: str, timeout: float = 2.0) -> None:
        """Can this token read the project (and so its media)? BackendError (424) saying what to set if not.

        Label Studio sends /setup the project creator's legacy token even where legacy tokens are disabled
        (the default since 1.20): without this check every image is refused later, one task at a time.
        A Label Studio that is merely slow to answer is given the benefit of the doubt.
        """
        key = (project, self.token)
        if key in _checked:
            return
        path = f"/api/projects/{int(project)}" if project.isdigit() else "/api/current-user/whoami"
        fix = ("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the backend (a personal access token from "
               "Account & Settings in Label Studio)")
        try:
            r = self.api("GET", path, timeout=timeout)
        except Transient as e:
            if "ConnectionError" in str(e):
                raise BackendError(f"this backend cannot reach Label Studio at {self.url}, the address Label Studio "
                                   f"gave it: {fix}", 424) from None
            log.warning("could not check the token with Label Studio at %s: %s", self.url, e)
            return
        except BackendError as e:  # the personal access token was refused at refresh
            raise BackendError(f"{e.message}", 424) from None
        if r.status in (401, 403):
            detail = ""
            try:
                detail = str(r.json().get("detail") or "")[:200]
            except (ValueError, AttributeError):
                pass
            raise BackendError(f"Label Studio at {self.url} refused the token this backend was given (HTTP {r.status}"
                               f"{': ' + detail if detail else ''}), so it cannot read the project's images: {fix}",
                               424)
        if r.status < 300:
            _checked[key] = True

    # ---- API calls built here ------------------------------------------------------------------
    def api(self, method: str, path: str, *, params: dict | None = None, timeout: float = 60.0,
            **kw) -> outbound.Reply:
        """One call to a Label Studio API path, with the token. Raises Transient on what is worth retrying."""
        if not API.fullmatch(path) or not _clean_segments(path):
            raise ValueError(f"not a clean Label Studio API path: {path!r}")
        query = f"?{urlencode(params)}" if params else ""
        url = outbound.parse_url(f"{self.url}{path}{query}")
        headers = self._authorization()  # a failed refresh raises Transient or BackendError itself
        try:
            return self.client.send(method, url, headers=headers, timeout=timeout, max_bytes=API_MAX_BYTES, **kw)
        except (requests.RequestException, outbound.DeadlineExceeded) as e:
            raise Transient(f"{method} {path}: {type(e).__name__}") from None
        except outbound.TooLarge as e:
            raise BackendError(f"{method} {path}: {e}", 502) from None


_checked: TTLCache = TTLCache(maxsize=4096, ttl=60)  # (project, token) whose check passed, for a minute
_env_cache: dict[tuple, LabelStudio] = {}
_env_lock = threading.Lock()


def connect(settings, hostname="", token="") -> LabelStudio | None:
    """The Label Studio a project talks to, and its token: the one rule, decided here only.

    With LABEL_STUDIO_URL (and its key: `Settings.problems` refuses one without the other) that is the
    connection, whatever /setup said. Otherwise /setup's hostname with /setup's own token, or None.
    """
    policy = outbound.Policy.parse(settings.allow_private_urls, settings.allowed_hosts)
    if settings.label_studio_url:
        key = (settings.label_studio_url, settings.label_studio_api_key, policy, settings.fetch_timeout)
        with _env_lock:  # one per process: one access token refresh for every project
            if key not in _env_cache:
                _env_cache[key] = LabelStudio(settings.label_studio_url, settings.label_studio_api_key, policy,
                                              settings.fetch_timeout)
            return _env_cache[key]
    if hostname:
        return LabelStudio(hostname, token, policy, settings.fetch_timeout)
    return None


class LabelStudioAPI:
    """Projects, tasks and predictions of one Label Studio, with retries.

    Retries cover what a busy or restarting Label Studio answers: 429 and 5xx (honouring `Retry-After`)
    and dropped connections, with exponential backoff. A write that may have been applied (a 5xx or a
    dropped connection after sending) is not retried here: the caller checks what Label Studio holds
    first (see `poster.post_predictions`).
    """

    def __init__(self, ls: LabelStudio, backoff: Backoff | None = None, timeout: float = 60.0):
        self.ls = ls
        self.backoff = backoff or Backoff()
        self.timeout = timeout

    def once(self, method: str, path: str, **kw) -> outbound.Reply:
        """One request; Transient on 429/5xx/connection errors, BackendError on other refusals."""
        resp = self.ls.api(method, path, timeout=self.timeout, **kw)
        if resp.status in RETRY_STATUS:
            raise Transient(f"{method} {path}: HTTP {resp.status}", retry_after(resp.headers))
        if resp.status in (401, 403):
            raise BackendError(
                f"Label Studio at {self.ls.url} refused the token ({resp.status}) for {path}: "
                "set LABEL_STUDIO_API_KEY to a token of a user with access to the project", 401
            )
        if resp.status == 404:
            raise BackendError(f"not found in Label Studio: {path}", 404)
        if resp.status >= 300:
            raise BackendError(f"Label Studio answered {resp.status} to {method} {path}: "
                               f"{resp.body[:300].decode(errors='replace')}", 502)
        return resp

    def call(self, method: str, path: str, **kw) -> outbound.Reply:
        return with_retries(lambda: self.once(method, path, **kw), self.backoff, f"{method} {path}")

    def json(self, method: str, path: str, **kw):
        resp = self.call(method, path, **kw)
        try:
            return resp.json()
        except ValueError:
            raise BackendError(f"Label Studio answered {method} {path} with something that is not JSON", 502) from None

    # ---- resources ---------------------------------------------------------------------------
    def project(self, project_id: int) -> dict:
        return self.json("GET", f"/api/projects/{int(project_id)}")

    def task(self, task_id: int) -> dict:
        """The task with its data, annotations and predictions (each with its model_version)."""
        return self.json("GET", f"/api/tasks/{int(task_id)}")

    def ml_backends(self, project_id: int) -> list[dict]:
        """The ML backends connected to the project (with their extra params), as Label Studio lists them."""
        data = self.json("GET", "/api/ml", params={"project": int(project_id)})
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    def predictions(self, task_id: int) -> list[dict]:
        """The task's predictions alone (id, model_version, result...): a third of the cost of reading the task."""
        data = self.json("GET", "/api/predictions/", params={"task": int(task_id)})
        return [p for p in data if isinstance(p, dict)] if isinstance(data, list) else []

    def task_ids(self, project_id: int, page_size: int = 500):
        """(id, annotations incl. skipped ones) of every task, in id order, page by page.

        `fields=task_only` keeps pages small: no prediction bodies (their model versions are checked
        per task, fresh, just before labelling it).
        """
        page = 1
        while True:
            try:
                data = self.json("GET", "/api/tasks", params={
                    "project": int(project_id), "page": page, "page_size": page_size, "fields": "task_only",
                })
            except BackendError as e:
                if e.status == 404:  # past the last page
                    return
                raise
            tasks = data.get("tasks", []) if isinstance(data, dict) else []
            for t in tasks:
                annotated = int(t.get("total_annotations") or 0) + int(t.get("cancelled_annotations") or 0)
                yield int(t["id"]), annotated
            if len(tasks) < page_size:
                return
            page += 1

    def import_predictions(self, project_id: int, predictions: list[dict]) -> int:
        """One attempt (the caller reconciles before retrying); returns how many Label Studio created."""
        resp = self.once("POST", f"/api/projects/{int(project_id)}/import/predictions", json=predictions)
        try:
            return int((resp.json() or {}).get("created", len(predictions)))
        except (ValueError, TypeError, AttributeError):
            return len(predictions)

    def delete_prediction(self, prediction_id: int) -> None:
        try:
            self.call("DELETE", f"/api/predictions/{int(prediction_id)}")
        except BackendError as e:
            if e.status != 404:  # already gone is what we wanted
                raise


def api(settings, hostname: str = "", token: str = "") -> LabelStudioAPI | None:
    """The API client of the connection `connect` decides on, with SAM3_API_RETRIES attempts per call."""
    ls = connect(settings, hostname, token)
    return LabelStudioAPI(ls, Backoff(settings.api_retries)) if ls is not None else None


def settings_problems(settings) -> list[str]:
    """What is wrong with the Label Studio URL and the address policy the settings name."""
    out = []
    try:
        outbound.Policy.parse(settings.allow_private_urls, settings.allowed_hosts)
    except ValueError as e:
        out.append(str(e))
    if settings.label_studio_url:
        try:
            outbound.parse_url(settings.label_studio_url)
        except Refused as e:
            out.append(f"LABEL_STUDIO_URL is not usable: {e}")
    return out
