"""Retrying what a busy or restarting server answers: 429 and 5xx (honouring Retry-After) and dropped
connections, with exponential backoff and jitter."""
from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass

import requests

log = logging.getLogger(__name__)
RETRY_STATUS = {429, 500, 502, 503, 504}


class Transient(Exception):
    """A failure worth retrying; `after` is the server's Retry-After in seconds, if it sent one."""

    def __init__(self, message: str, after: float | None = None):
        super().__init__(message)
        self.after = after


@dataclass
class Backoff:
    attempts: int = 6
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, after: float | None = None) -> float:
        """Seconds before retry number `attempt` (1-based); Retry-After wins when the server gives one."""
        if after is not None:
            return min(max(after, 0.0), self.cap * 4)
        return min(self.cap, self.base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)  # an HTTP date
        return None if when is None else max(0.0, when.timestamp() - time.time())


def with_retries(call, backoff: Backoff, what: str):
    """`call()` until it does not raise Transient, sleeping between attempts; the last Transient is raised."""
    for attempt in range(1, backoff.attempts + 1):
        try:
            return call()
        except Transient as e:
            if attempt == backoff.attempts:
                raise
            delay = backoff.delay(attempt, e.after)
            log.warning("%s: %s; retry %d/%d in %.1fs", what, e, attempt, backoff.attempts - 1, delay)
            time.sleep(delay)
