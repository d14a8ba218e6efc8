"""Retrying what a busy or restarting server answers: 429 and 5xx (honouring Retry-After) and dropped
connections, with exponential backoff and jitter, within an optional overall deadline."""
from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from dataclasses import dataclass

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
    cap: float = 30.0  # the longest wait between attempts, Retry-After included

    def delay(self, attempt: int, after: float | None = None) -> float:
        """Seconds before retry number `attempt` (1-based); Retry-After wins when the server gives one."""
        if after is not None:
            return min(after, self.cap)
        return min(self.cap, self.base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def retry_after(headers) -> float | None:
    """A server's Retry-After in seconds (a number or an HTTP date); None when absent or not sensible."""
    value = (headers or {}).get("Retry-After")
    if not value or len(value) > 64:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)  # an HTTP date
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        seconds = when.timestamp() - time.time() if when is not None else math.nan
    return max(0.0, seconds) if math.isfinite(seconds) else None


def with_retries(call, backoff: Backoff, what: str, until: float | None = None):
    """`call()` until it does not raise Transient, sleeping between attempts; the last Transient is raised.

    `until` (time.monotonic()) ends the retries early: no sleep runs past it.
    """
    for attempt in range(1, backoff.attempts + 1):
        try:
            return call()
        except Transient as e:
            delay = backoff.delay(attempt, e.after)
            if attempt == backoff.attempts or (until is not None and time.monotonic() + delay >= until):
                raise
            log.warning("%s: %s; retry %d/%d in %.1fs", what, e, attempt, backoff.attempts - 1, delay)
            time.sleep(delay)
