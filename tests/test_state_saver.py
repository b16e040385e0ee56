"""The coalescing write-behind of fast states: what is saved, when, in what order, and what a failure says."""

from __future__ import annotations

import threading
import time

import pytest

from workers.state_saver import PendingSave, StateSaver


class Recorder:
    """A save function that records (user, turns) and can be told to fail or to be slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.saved: list[tuple[str, int]] = []
        self.failing: set[str] = set()
        self.delay_s = delay_s
        self.active: set[str] = set()
        self.overlaps = 0
        self.lock = threading.Lock()

    def __call__(self, user: str, pending: PendingSave) -> None:
        with self.lock:
            self.overlaps += user in self.active
            self.active.add(user)
        try:
            time.sleep(self.delay_s)
            if user in self.failing:
                raise OSError(f"disk full while saving {user}")
            with self.lock:
                self.saved.append((user, pending.turns))
        finally:
            with self.lock:
                self.active.discard(user)


def turn(turns: int) -> PendingSave:
    return PendingSave(state=None, version="v1", turns=turns)


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_turns_within_the_interval_are_saved_once_with_the_newest_state():
    record = Recorder()
    saver = StateSaver(record, interval_s=60.0, threads=2)
    try:
        saver.submit("ann", turn(1))  # nothing saved within the interval yet: saved at once
        wait_for(lambda: record.saved == [("ann", 1)])
        for turns in (2, 3, 4):
            saver.submit("ann", turn(turns))
        time.sleep(0.05)
        assert record.saved == [("ann", 1)] and saver.busy("ann")  # coalescing: waits for the interval
        saver.flush("ann")  # ... unless someone needs it saved now
        assert record.saved == [("ann", 1), ("ann", 4)] and not saver.busy("ann")
    finally:
        saver.close()


def test_interval_zero_saves_every_turn_in_order_and_never_one_user_twice_at_once():
    record = Recorder(delay_s=0.002)
    saver = StateSaver(record, interval_s=0.0, threads=4)
    for turns in range(1, 31):
        for user in ("ann", "bob"):
            saver.submit(user, turn(turns))
    saver.flush()
    for user in ("ann", "bob"):
        mine = [turns for who, turns in record.saved if who == user]
        assert mine == sorted(mine) and mine[-1] == 30  # some turns coalesce while a save runs; order holds
    assert record.overlaps == 0
    saver.close()


def test_a_failed_save_is_raised_by_flush_once_and_a_later_save_clears_it():
    record = Recorder()
    record.failing.add("ann")
    saver = StateSaver(record, interval_s=0.0, threads=1)
    try:
        saver.submit("ann", turn(1))
        with pytest.raises(OSError, match="disk full while saving ann"):
            saver.flush("ann")
        saver.flush("ann")  # reported once
        record.failing.clear()
        saver.submit("ann", turn(2))
        saver.flush("ann")
        assert record.saved == [("ann", 2)]
    finally:
        saver.close()


def test_close_saves_what_is_pending_and_discard_drops_it():
    record = Recorder()
    saver = StateSaver(record, interval_s=60.0, threads=2)
    saver.submit("ann", turn(1))
    saver.submit("bob", turn(1))
    saver.flush()
    saver.submit("ann", turn(2))
    saver.submit("bob", turn(2))
    saver.discard("bob")  # bob is being reset: his pending state must not land after the delete
    saver.close()
    assert sorted(record.saved) == [("ann", 1), ("ann", 2), ("bob", 1)]
    with pytest.raises(RuntimeError, match="closed"):
        saver.submit("ann", turn(3))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="save_interval_s must be >= 0"):
        StateSaver(Recorder(), interval_s=-1.0, threads=1)
