"""The write-behind queue (Rust core): a stateful model it must agree with, bad input, and
threads that lose nothing."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from buttress._core import WriteQueue
from buttress.errors import WriteQueueFullError
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from support import JOIN

KEYS = st.sampled_from(["a", "b", "c", b"d", 5, 2**70])
DELETED = object()


class QueueModel(RuleBasedStateMachine):
    """Waiting writes in turn order (one per key, the newest), writes in flight, attempts."""

    CAPACITY = 4
    MAX_ATTEMPTS = 3

    def __init__(self) -> None:
        super().__init__()
        self.queue = WriteQueue(self.CAPACITY, max_attempts=self.MAX_ATTEMPTS)
        self.waiting: dict[Any, tuple[Any, int]] = {}  # insertion order = turn order
        self.flying: dict[Any, tuple[Any, int]] = {}
        self.enqueued = self.coalesced = self.flushed = 0
        self.retried = self.dead = self.superseded = 0

    def _write(self, key: Any, value: Any) -> None:
        full = len(self.waiting) + len(self.flying) >= self.CAPACITY
        if key not in self.waiting and full:
            with pytest.raises(WriteQueueFullError):
                self._send(key, value)
            return
        if key in self.waiting:
            self.coalesced += 1
        self.waiting[key] = (value, 0)  # a coalesced write keeps its key's turn
        self.enqueued += 1
        self._send(key, value)

    def _send(self, key: Any, value: Any) -> None:
        if value is DELETED:
            self.queue.delete(key)
        else:
            self.queue.put(key, value)

    @rule(key=KEYS, value=st.integers())
    def put(self, key: Any, value: int) -> None:
        self._write(key, value)

    @rule(key=KEYS)
    def delete(self, key: Any) -> None:
        self._write(key, DELETED)

    @rule(most=st.integers(1, 5))
    def take(self, most: int) -> None:
        expected = []
        for key, (value, attempts) in list(self.waiting.items()):
            if len(expected) == most:
                break
            if key in self.flying:
                continue
            expected.append((key, value, attempts))
        taken = self.queue.take(most, 0)
        shown = [
            (key, DELETED if deleted else value, attempts)
            for key, value, attempts, deleted in taken
        ]
        assert shown == expected
        for key, value, attempts in expected:
            del self.waiting[key]
            self.flying[key] = (value, attempts)

    @precondition(lambda self: self.flying)
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.flying, key=repr)))
        assert self.queue.done([key]) == 1
        del self.flying[key]
        self.flushed += 1

    @precondition(lambda self: self.flying)
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.flying, key=repr)))
        value, attempts = self.flying.pop(key)
        outcome, dead_value, deleted = self.queue.failed(key)  # type: ignore[misc]
        if key in self.waiting:
            assert outcome == "superseded"
            self.superseded += 1
        elif attempts + 1 >= self.MAX_ATTEMPTS:
            assert outcome == "dead"
            assert (DELETED if deleted else dead_value) == value
            self.dead += 1
        else:
            assert outcome == "retried"
            self.waiting = {key: (value, attempts + 1), **self.waiting}
            self.retried += 1

    @rule(key=KEYS)
    def read(self, key: Any) -> None:
        found = self.queue.read(key)
        newest = self.waiting.get(key) or self.flying.get(key)
        if newest is None:
            assert found is None
        else:
            value, deleted = found  # type: ignore[misc]
            assert (DELETED if deleted else value) == newest[0]

    @invariant()
    def counters_agree(self) -> None:
        stats = self.queue.stats()
        assert stats["depth"] == len(self.waiting) + len(self.flying)
        assert stats["in_flight"] == len(self.flying)
        assert (stats["enqueued"], stats["coalesced"], stats["flushed"]) == (
            self.enqueued,
            self.coalesced,
            self.flushed,
        )
        assert (stats["retried"], stats["dead_lettered"], stats["superseded"]) == (
            self.retried,
            self.dead,
            self.superseded,
        )
        assert stats["high_water"] <= self.CAPACITY


TestWriteQueueModel = QueueModel.TestCase


@pytest.mark.parametrize(
    ("arguments", "error", "name"),
    [
        ((0,), ValueError, "capacity"),
        (("4",), TypeError, "capacity"),
        ((4,), None, None),
    ],
)
def test_bad_construction_names_the_argument(
    arguments: tuple[Any, ...], error: type[Exception] | None, name: str | None
) -> None:
    if error is None:
        WriteQueue(*arguments, max_attempts=1)
        with pytest.raises(ValueError, match="max_attempts"):
            WriteQueue(*arguments, max_attempts=0)
        return
    with pytest.raises(error, match=name):
        WriteQueue(*arguments)


def test_bad_keys_and_timeouts_are_refused_and_nothing_changes() -> None:
    queue = WriteQueue(4)
    queue.put("a", 1)
    for key in (1.5, None, ("a",), True):
        with pytest.raises(TypeError, match="key"):
            queue.put(key, 2)
    for timeout in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            queue.put("b", 2, block=True, timeout=timeout)
        with pytest.raises(ValueError, match="timeout"):
            queue.take(1, timeout)
        with pytest.raises(ValueError, match="linger"):
            queue.take(1, 0, linger=timeout)
        with pytest.raises(ValueError, match="timeout"):
            queue.wait_idle(timeout)
    assert queue.unsettled() == [("a", 1, False)]


def test_waits_longer_than_a_clock_can_hold_are_taken_as_long_as_it_takes() -> None:
    queue = WriteQueue(4)
    queue.put("a", 1, block=True, timeout=1e300)
    assert [item[0] for item in queue.take(4, 1e300, linger=0)] == ["a"]
    queue.done(["a"])
    assert queue.wait_idle(1e300)


def test_a_full_queue_blocks_until_its_timeout_or_room() -> None:
    queue = WriteQueue(1)
    queue.put("a", 1)
    started = time.monotonic()
    with pytest.raises(WriteQueueFullError):
        queue.put("b", 2, block=True, timeout=0.1)
    assert 0.09 <= time.monotonic() - started < 2.0
    taken = queue.take(1, 0)

    def settle() -> None:
        time.sleep(0.05)
        queue.done([taken[0][0]])

    settler = threading.Thread(target=settle)
    settler.start()
    queue.put("b", 2, block=True, timeout=5)
    settler.join(JOIN)
    assert queue.unsettled() == [("b", 2, False)]


def test_closing_refuses_new_writes_but_keeps_what_is_queued() -> None:
    queue = WriteQueue(4)
    queue.put("a", 1)
    queue.close()
    assert queue.closed
    with pytest.raises(RuntimeError, match="closed"):
        queue.put("b", 2)
    assert [item[0] for item in queue.take(4, 1.0)] == ["a"]
    started = time.monotonic()
    assert queue.take(4, 5.0) == []
    assert time.monotonic() - started < 1.0


def test_threads_lose_nothing_and_never_fly_a_key_twice() -> None:
    queue = WriteQueue(64, max_attempts=3)
    last: dict[int, int] = {}
    lock = threading.Lock()
    writers = 4

    def write(number: int) -> None:
        for n in range(2000):
            key = n % 50
            value = number * 100_000 + n
            with lock:
                queue.put(key, value, block=True, timeout=10)
                last[key] = value

    stored: dict[int, int] = {}
    stop = threading.Event()

    def flush() -> None:
        while not (stop.is_set() and queue.stats()["depth"] == 0):
            batch = queue.take(16, 0.05)
            keys = [key for key, _, _, _ in batch]
            assert len(set(keys)) == len(keys)
            for key, value, _, _ in batch:
                stored[key] = value
            queue.done(keys)

    flusher = threading.Thread(target=flush)
    flusher.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert queue.wait_idle(10)
    stop.set()
    flusher.join(JOIN)
    assert not flusher.is_alive()
    assert stored == last
    stats = queue.stats()
    assert stats["enqueued"] == writers * 2000
    assert stats["flushed"] + stats["coalesced"] == writers * 2000
