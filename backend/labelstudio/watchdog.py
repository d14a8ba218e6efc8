"""Deadlines that a blocking read cannot outlive.

A socket timeout bounds each read, not the whole: a peer that sends one byte a second keeps a
blocking read going for as long as it likes. One daemon thread holds every armed deadline and, when
one passes, calls its callback (which shuts the socket down, so the blocked read returns at once).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Alarm:
    """One armed deadline; `cancel()` before it fires and the callback never runs."""

    __slots__ = ("when", "callback", "cancelled", "fired")

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when, self.callback = when, callback
        self.cancelled = self.fired = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def remaining(self) -> float:
        return max(0.0, self.when - time.monotonic())


class Watchdog:
    def __init__(self):
        self._heap: list[tuple[float, int, Alarm]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, callback: Callable[[], None]) -> Alarm:
        alarm = Alarm(time.monotonic() + max(0.0, seconds), callback)
        with self._cond:
            heapq.heappush(self._heap, (alarm.when, next(self._seq), alarm))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sam3-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return alarm

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, alarm = heapq.heappop(self._heap)
            if alarm.cancelled:
                continue
            alarm.fired = True
            try:
                alarm.callback()
            except Exception:  # a callback's failure must not stop every other deadline
                log.exception("deadline callback failed")


WATCHDOG = Watchdog()
