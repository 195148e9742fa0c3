"""Helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from buttress import Bulkhead, CircuitBreaker, ManualClock

# The longest a test waits for something that should happen at once, before calling it a hang.
JOIN = 5.0


def make_breaker(clock: ManualClock, **options: Any) -> CircuitBreaker:
    """A breaker on `clock` that trips on the first failure and waits 10 s, unless told else."""
    options.setdefault("failure_threshold", 1)
    options.setdefault("reset_timeout", 10.0)
    return CircuitBreaker("svc", clock=clock, **options)


def bulkhead_stats(bulkhead: Bulkhead) -> tuple[int, int, int, int, int, int]:
    """Every field of `bulkhead.stats()`, to compare snapshots in one assertion."""
    stats = bulkhead.stats()
    return (
        stats.active,
        stats.waiting,
        stats.max_observed,
        stats.accepted,
        stats.rejected,
        stats.timed_out,
    )


class FakeConnection:
    """A fake pooled connection that records what the pool did to it (and who holds it, for
    the stress tests). ``alive = False`` makes `check_connection` fail."""

    _numbers = itertools.count(1)

    def __init__(self) -> None:
        self.number = next(self._numbers)
        self.closes = 0
        self.checks = 0
        self.resets = 0
        self.uses = 0
        self.holder: object | None = None
        self.alive = True

    def close(self) -> None:
        self.closes += 1

    def __repr__(self) -> str:
        return f"Conn({self.number})"


def check_connection(conn: FakeConnection) -> bool:
    """A pool `check` for fake connections: counts the check, passes while it is alive."""
    conn.checks += 1
    return conn.alive


def wait_until(condition: Callable[[], bool], timeout: float = JOIN) -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


async def until(condition: Callable[[], bool], timeout: float = JOIN) -> None:
    """`wait_until` for a coroutine: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancels `task` and checks that it ends cancelled, in time."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, JOIN)


@contextmanager
def background(target: Callable[[], Any]) -> Iterator[threading.Thread]:
    """Runs `target` on a thread and fails the test if it does not finish or raises."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(JOIN)
    assert not thread.is_alive(), "background thread hung"
    if errors:
        raise errors[0]


def run_threads(worker: Callable[[int], None], count: int, within: float) -> None:
    """Runs `worker(index)` on `count` threads, re-raising the first error; fails when they
    are not all done within `within` seconds (a hang)."""
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            worker(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + within
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    if errors:
        raise errors[0]


class CountingDatabase:
    """A dict as the database of the caching services. Reads take ``delay`` seconds and are
    counted; ``refuse`` fails writes; ``read_gate`` / ``write_gate`` (events) hold reads or
    writes back until set."""

    def __init__(self, delay: float = 0.0) -> None:
        self.data: dict[Any, Any] = {}
        self.reads = 0
        self.delay = delay
        self.refuse = False
        self.read_gate: threading.Event | None = None
        self.write_gate: threading.Event | None = None
        self._lock = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            self.reads += 1
            value = self.data.get(key, default)
        if self.read_gate is not None:
            assert self.read_gate.wait(JOIN)
        time.sleep(self.delay)
        return value

    def write_batch(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        if self.write_gate is not None:
            assert self.write_gate.wait(JOIN)
        if self.refuse:
            raise ConnectionError("the database refused the write")
        with self._lock:
            for key, value, deleted in items:
                if deleted:
                    self.data.pop(key, None)
                else:
                    self.data[key] = value


def crc32c(data: bytes) -> int:
    """CRC-32C written from its definition, so tests read the event log's format without the
    store's own code."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()
