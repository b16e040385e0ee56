"""Coalescing write-behind for users' fast states: at most one save per user per interval.

Serving learns on every turn, and saving every turn costs two atomic file writes (or S3 PUTs)
per user, on the same cores that serve. A user who takes several turns within `interval_s` is
saved once, with the newest state; a user not saved within the last `interval_s` is saved at
once. So a crash loses at most the last `interval_s` of a user's fast-memory updates, plus a save
in flight (their turns are in the experience log either way).

A user is never saved by two threads at once, and a newer state replaces an older one that has
not started saving, so a user's saves land in order. `flush` saves what is pending now.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingSave:
    """What one save writes: row `row` of `state`, a batch already in host memory that no one changes.
    The row is cut out only by the save that runs: coalesced saves never cost that."""

    state: object  # a FastState of one or more users
    version: str
    turns: int
    row: int = 0


class StateSaver:
    """Runs `save(user_id, pending)` on `threads` background threads; see the module docstring."""

    def __init__(self, save: Callable[[str, PendingSave], None], interval_s: float, threads: int) -> None:
        if interval_s < 0 or threads < 1:
            raise ValueError(f"save_interval_s must be >= 0 and save_threads >= 1, got {interval_s} and {threads}")
        self._save = save
        self.interval_s = interval_s
        self._changed = threading.Condition()
        self._pending: dict[str, PendingSave] = {}
        self._due: dict[str, float] = {}  # user -> when their pending save may start (monotonic)
        self._running: set[str] = set()
        self._started: dict[str, float] = {}  # user -> when their last save started, within the interval
        self._errors: dict[str, BaseException] = {}  # user -> why their latest save failed
        self._flushing: set[str] = set()  # users someone waits for: saved without waiting for their interval
        self._closed = False
        self.saves = 0  # saves finished (coalescing makes this fewer than the turns)
        self._threads = [threading.Thread(target=self._work, name=f"fast-state-save-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, user_id: str, pending: PendingSave) -> None:
        """Save this state of the user: now, or when their interval since the last save is over."""
        with self._changed:
            if self._closed:
                raise RuntimeError("the state saver is closed; no more saves are taken")
            self._pending[user_id] = pending
            if user_id not in self._due:
                self._due[user_id] = self._started.get(user_id, float("-inf")) + self.interval_s
            self._forget_old_starts()
            self._changed.notify()

    def busy(self, user_id: str) -> bool:
        """Whether the user has a save pending or running (their newest state is not stored yet)."""
        with self._changed:
            return user_id in self._pending or user_id in self._running

    def flush(self, user_id: str | None = None) -> None:
        """Save the user's pending state (everyone's: None) now and wait; raises the error of a
        failed latest save (once)."""
        with self._changed:
            users = [user_id] if user_id is not None else list(self._pending.keys() | self._running)
            self._flushing.update(users)
            for user in users:
                if user in self._due:
                    self._due[user] = float("-inf")
            self._changed.notify_all()
            while any(user in self._pending or user in self._running for user in users):
                self._changed.wait()
            self._flushing.difference_update(users)
            errors = [self._errors.pop(user) for user in users if user in self._errors]
        if errors:
            raise errors[-1]

    def discard(self, user_id: str) -> None:
        """Drop the user's pending save (their state is being deleted) and wait for a running one."""
        with self._changed:
            self._pending.pop(user_id, None)
            self._due.pop(user_id, None)
            while user_id in self._running:
                self._changed.wait()
            self._errors.pop(user_id, None)

    def close(self) -> None:
        """Save everything pending, then stop the threads."""
        with self._changed:
            self._closed = True
            for user in self._due:
                self._due[user] = float("-inf")
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    def _forget_old_starts(self) -> None:
        """Keep `_started` bounded: a start older than the interval no longer delays anyone."""
        if len(self._started) > 2 * len(self._pending) + 1024:
            horizon = time.monotonic() - self.interval_s
            self._started = {user: at for user, at in self._started.items() if at > horizon}

    def _next(self) -> tuple[str, PendingSave] | None:
        """Wait for a user whose save is due and not running; None once closed and drained."""
        with self._changed:
            while True:
                now = time.monotonic()
                waiting = {user: at for user, at in self._due.items() if user not in self._running}
                if waiting:
                    user = min(waiting, key=waiting.__getitem__)
                    if waiting[user] <= now:
                        del self._due[user]
                        self._running.add(user)
                        self._started[user] = now
                        return user, self._pending.pop(user)
                    self._changed.wait(waiting[user] - now)
                elif self._closed and not self._running:
                    return None
                else:
                    self._changed.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            user, pending = job
            error = None
            try:
                self._save(user, pending)
            except Exception as caught:  # noqa: BLE001 - reported by flush, and logged here
                error = caught
                log.error("saving the fast state of %r failed; its last turns live only in this replica's memory "
                          "until the next save: %s", user, caught)
            with self._changed:
                self._running.discard(user)
                self.saves += 1
                if error is None:
                    self._errors.pop(user, None)
                else:
                    self._errors[user] = error
                if user in self._pending and user not in self._due:
                    hurry = self._closed or user in self._flushing
                    self._due[user] = float("-inf") if hurry else self._started[user] + self.interval_s
                self._changed.notify_all()
