"""A run's sign of life: rq's worker heartbeat, and the leases of the task claims the run holds."""
from __future__ import annotations

import logging
import threading

from .lifecycle import Context

log = logging.getLogger(__name__)


class Heartbeat:
    """While a plan or a chunk runs: tell rq the worker is alive and renew the claims it holds.

    A claim is held with its fencing token (`held`: task -> token); renewing checks the token, so a claim that
    lapsed while this process was paused, and that another runner took since, is never taken back.
    """

    def __init__(self, ctx: Context, scope: str | None = None, owner: str = "", job_id: str | None = None):
        self.ctx, self.scope, self.owner, self.job_id = ctx, scope, owner, job_id
        self.held: dict[int, int] = {}
        self.lease = float(ctx.settings.job_heartbeat)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sam3-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.scope and self.held:
            self.ctx.store.release(self.scope, dict(self.held), self.owner)

    def claim(self, tasks) -> set[int]:
        """Take the free tasks of `tasks` and renew the ones held; the ones held now."""
        tasks = set(tasks)
        with self._lock:
            mine = {t: tok for t, tok in self.held.items() if t in tasks}
        kept = self.confirm(mine) if mine else set()
        got = self.ctx.store.claim(self.scope, tasks - set(mine), self.owner, self.lease)
        with self._lock:
            self.held.update(got)
        return kept | set(got)

    def confirm(self, tasks) -> set[int]:
        """The tasks of `tasks` still ours (renewed); the others are forgotten: their fencing token is stale or
        the job has finished them (another runner posted them while this one was paused)."""
        with self._lock:
            mine = {t: self.held[t] for t in tasks if t in self.held}
        kept = self.ctx.store.renew(self.scope, mine, self.owner, self.lease, self.job_id) if mine else set()
        with self._lock:
            for t in set(mine) - kept:
                self.held.pop(t, None)
        return kept

    def release(self, tasks) -> None:
        with self._lock:
            mine = {t: self.held.pop(t) for t in tasks if t in self.held}
        self.ctx.store.release(self.scope, mine, self.owner)

    def _run(self) -> None:
        every = max(0.5, min(self.lease, float(self.ctx.settings.job_heartbeat)) / 4)
        while not self._stop.wait(every):
            try:
                self.ctx.heartbeat()
                if self.scope:
                    with self._lock:
                        held = list(self.held)
                    if held:
                        self.confirm(held)
            except Exception as e:  # Redis away for a moment: the next beat tries again
                log.warning("heartbeat failed: %s", e)
