"""The asyncio twins of the caching services, and the races their writes must not lose.

CacheAside's single flight is shared by threads and tasks; backends are awaited, called on the
loop or run in a worker thread according to what they offer; WriteThrough and WriteBehind keep
their order and their queue from a coroutine. Then the races: a write overtaken while it fills
the cache, and a load overtaken by a write, must never leave the cache older than the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from buttress.caching import (
    DELETED,
    CacheAside,
    DictCache,
    LocalCache,
    SQLiteDatabase,
    WriteBehind,
    WriteThrough,
)
from buttress.caching.writebehind import call
from buttress.errors import WriteQueueFullError
from support import JOIN, cancel, run_threads, until, wait_until

pytestmark = pytest.mark.timeout(60)

ABSENT: Any = object()
"""What a test passes as ``default`` to tell a cache miss from any stored value."""


# ---- backends ---------------------------------------------------------------------------------


class ThreadDatabase:
    """A blocking dict database. A read is counted, then waits on ``gate`` (a threading.Event)
    when one is set, sleeps ``delay``, and raises when ``fail``. A write sets ``writing``, waits
    on ``write_gate`` when one is set, and raises when ``refuse``. Every call notes its thread,
    and writes are noted in ``log``. ``jitter`` makes reads and writes sleep up to that long at
    random, to widen race windows."""

    def __init__(self, data: dict[Any, Any] | None = None, *, log: list[Any] | None = None) -> None:
        self.data: dict[Any, Any] = dict(data or {})
        self.log: list[Any] = [] if log is None else log
        self.reads = 0
        self.delay = 0.0
        self.jitter = 0.0
        self.fail = False
        self.refuse = False
        self.gate: threading.Event | None = None
        self.write_gate: threading.Event | None = None
        self.writing = threading.Event()
        self.threads: set[int] = set()
        self.thread_names: set[str] = set()
        self._lock = threading.Lock()

    def _note_thread(self) -> None:
        self.threads.add(threading.get_ident())
        self.thread_names.add(threading.current_thread().name)

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            self.reads += 1
            self._note_thread()
            value = self.data.get(key, default)
        if self.gate is not None:
            assert self.gate.wait(JOIN), "the read gate was never opened"
        if self.delay:
            time.sleep(self.delay)
        if self.jitter:
            time.sleep(random.random() * self.jitter)
        if self.fail:
            raise ConnectionError("the database is down")
        return value

    def write_batch(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        self._note_thread()
        self.writing.set()
        if self.write_gate is not None:
            assert self.write_gate.wait(JOIN), "the write gate was never opened"
        if self.refuse:
            raise ConnectionError("the database refused the write")
        if self.jitter:
            time.sleep(random.random() * self.jitter)
        with self._lock:
            self.log.append(("database", "write_batch", list(items)))
            for key, value, deleted in items:
                if deleted:
                    self.data.pop(key, None)
                else:
                    self.data[key] = value


class NonBlockingDatabase(ThreadDatabase):
    """A dict database that says its calls never wait on I/O."""

    blocking = False


class AsyncDatabase:
    """A dict database with coroutine twins. ``get_async`` reads, then waits on ``gate`` (an
    asyncio.Event) when one is set, and raises when ``fail``; ``strict`` makes the sync methods
    fail the test."""

    def __init__(
        self,
        data: dict[Any, Any] | None = None,
        *,
        strict: bool = False,
        log: list[Any] | None = None,
    ) -> None:
        self.data: dict[Any, Any] = dict(data or {})
        self.strict = strict
        self.log: list[Any] = [] if log is None else log
        self.reads = 0
        self.fail = False
        self.refuse = False
        self.gate: asyncio.Event | None = None

    def get(self, key: Any, default: Any = None) -> Any:
        assert not self.strict, "the sync get of an async database was called"
        return self.data.get(key, default)

    def write_batch(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        assert not self.strict, "the sync write_batch of an async database was called"
        self._apply(items)

    async def get_async(self, key: Any, default: Any = None) -> Any:
        self.reads += 1
        value = self.data.get(key, default)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("the database is down")
        return value

    async def write_batch_async(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        await asyncio.sleep(0)
        if self.refuse:
            raise ConnectionError("the database refused the write")
        self._apply(items)

    def _apply(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        self.log.append(("database", "write_batch", list(items)))
        for key, value, deleted in items:
            if deleted:
                self.data.pop(key, None)
            else:
                self.data[key] = value


class RecordingCache(DictCache):
    """A DictCache (``blocking = False``: called on the loop) that notes its writes in ``log``
    with their ttl, counts misses, and notes the threads it ran on."""

    def __init__(self, log: list[Any] | None = None) -> None:
        super().__init__()
        self.log: list[Any] = [] if log is None else log
        self.misses = 0
        self.threads: set[int] = set()
        self._count = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        self.threads.add(threading.get_ident())
        value = super().get(key, ABSENT)
        if value is ABSENT:
            with self._count:
                self.misses += 1
            return default
        return value

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        self.threads.add(threading.get_ident())
        self.log.append(("cache", "set", key, value, ttl))
        super().set(key, value, ttl)

    def delete(self, key: Any) -> None:
        self.threads.add(threading.get_ident())
        self.log.append(("cache", "delete", key))
        super().delete(key)


class BlockingCache(RecordingCache):
    """A RecordingCache that does not say it never blocks: run in a worker thread."""

    blocking = True


class PausingCache(RecordingCache):
    """A RecordingCache whose first ``set`` of ``paused`` (by equality) sets ``entered`` and
    waits for ``release`` before it stores anything."""

    def __init__(self, paused: Any) -> None:
        super().__init__()
        self.paused = paused
        self.entered = threading.Event()
        self.release = threading.Event()

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        if value == self.paused and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(JOIN), "the paused cache write was never released"
        super().set(key, value, ttl)


class JitterCache(DictCache):
    """A DictCache whose every call first sleeps up to ``jitter`` seconds at random, so that
    racing callers interleave between the steps of a write or a load."""

    def __init__(self, jitter: float) -> None:
        super().__init__()
        self.jitter = jitter

    def get(self, key: Any, default: Any = None) -> Any:
        time.sleep(random.random() * self.jitter)
        return super().get(key, default)

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        time.sleep(random.random() * self.jitter)
        super().set(key, value, ttl)

    def delete(self, key: Any) -> None:
        time.sleep(random.random() * self.jitter)
        super().delete(key)


class AsyncCache:
    """A dict cache with coroutine twins; ``strict`` makes its sync methods fail the test.
    The first ``set_async`` of ``paused`` (by equality) sets ``entered`` and waits for
    ``release`` before storing."""

    def __init__(self, paused: Any = ABSENT, *, strict: bool = True) -> None:
        self.data: dict[Any, Any] = {}
        self.log: list[Any] = []
        self.paused = paused
        self.strict = strict
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def get(self, key: Any, default: Any = None) -> Any:
        assert not self.strict, "the sync get of an async cache was called"
        return self.data.get(key, default)

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        assert not self.strict, "the sync set of an async cache was called"
        self.log.append(("cache", "set", key, value, ttl))
        self.data[key] = value

    def delete(self, key: Any) -> None:
        assert not self.strict, "the sync delete of an async cache was called"
        self.log.append(("cache", "delete", key))
        self.data.pop(key, None)

    async def get_async(self, key: Any, default: Any = None) -> Any:
        await asyncio.sleep(0)
        return self.data.get(key, default)

    async def set_async(self, key: Any, value: Any, ttl: float | None = None) -> None:
        self.log.append(("cache", "set", key, value, ttl))
        if self.paused is not ABSENT and value == self.paused and not self.entered.is_set():
            self.entered.set()
            await asyncio.wait_for(self.release.wait(), JOIN)
        self.data[key] = value

    async def delete_async(self, key: Any) -> None:
        await asyncio.sleep(0)
        self.log.append(("cache", "delete", key))
        self.data.pop(key, None)


class Heartbeat:
    """Counts 10 ms ticks of a task on the running loop: a loop that is blocked stops them."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1


class ForbiddenToThread:
    """Stands in for ``asyncio.to_thread``: notes what it was asked to run, and refuses."""

    def __init__(self) -> None:
        self.asked: list[Any] = []

    async def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        self.asked.append(function)
        raise AssertionError("a worker thread was used")


@pytest.fixture(autouse=True)
def nothing_swallowed(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails a test in which a service logged a backend's error instead of raising it: where
    a cache fails after a write is queued, or on a read's fill, the services log and go on,
    which would hide a strict fake's AssertionError."""
    caplog.set_level(logging.WARNING, logger="buttress")
    yield
    logged = [
        record.getMessage()
        for phase in ("setup", "call")
        for record in caplog.get_records(phase)
        if record.name.startswith("buttress") and record.levelno >= logging.WARNING
    ]
    assert logged == [], "the services logged errors they did not raise"


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switches threads every few microseconds, so the races below interleave finely."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def race(
    seed: int,
    step: Callable[[random.Random, int, int], None],
    settle: Callable[[], None],
    *,
    threads: int = 6,
    rounds: int = 25,
    burst: int = 6,
) -> None:
    """Runs ``step(rng, worker, number)`` ``burst`` times on each of ``threads`` threads, then
    ``settle()`` once while they all wait, ``rounds`` times over."""
    barrier = threading.Barrier(threads, action=settle)

    def work(worker: int) -> None:
        rng = random.Random(f"{seed}:{worker}")
        for number in range(rounds):
            for _ in range(burst):
                step(rng, worker, number)
            barrier.wait(JOIN)

    run_threads(work, threads, within=30)


# ---- 1. CacheAside.get_async: hits, misses, single flight -------------------------------------


async def test_get_async_hits_loads_fills_with_the_ttl_and_returns_the_default() -> None:
    cache = RecordingCache()
    database = ThreadDatabase({"k": "v", "none": None})
    store = CacheAside(cache, database, ttl=30)
    assert await store.get_async("k") == "v"
    assert cache.log == [("cache", "set", "k", "v", 30)]
    assert await store.get_async("k") == "v"
    assert database.reads == 1  # a hit
    # A stored None is a value, cached like any other; an absent key is not cached.
    assert await store.get_async("none", "default") is None
    assert await store.get_async("none", "default") is None
    assert await store.get_async("absent") is None
    assert await store.get_async("absent", "default") == "default"
    assert "absent" not in cache.data
    assert (database.reads, store.loads) == (4, 4)


async def test_fifty_tasks_missing_one_key_load_it_once() -> None:
    database = AsyncDatabase({"hot": "value"})
    database.gate = asyncio.Event()
    store = CacheAside(RecordingCache(), database)
    tasks = [asyncio.create_task(store.get_async("hot")) for _ in range(50)]
    for _ in range(3):
        await asyncio.sleep(0)  # each task has missed and boarded the one load
    database.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), JOIN) == ["value"] * 50
    assert (database.reads, store.loads) == (1, 1)
    assert await store.get_async("hot") == "value"
    assert database.reads == 1  # cached


async def test_threads_and_tasks_missing_one_key_share_one_load() -> None:
    database = ThreadDatabase({"hot": "value"})
    database.gate = threading.Event()
    cache = RecordingCache()
    store = CacheAside(cache, database)
    got: list[Any] = []
    threads = [
        threading.Thread(target=lambda: got.append(store.get("hot")), daemon=True) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    tasks = [asyncio.create_task(store.get_async("hot")) for _ in range(20)]
    try:
        await until(lambda: cache.misses == 28)
        await asyncio.sleep(0.05)  # a caller boards within a few bytecodes of its miss
    finally:
        database.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), JOIN) == ["value"] * 20
    for thread in threads:
        await asyncio.to_thread(thread.join, JOIN)
    assert got == ["value"] * 8
    assert (database.reads, store.loads) == (1, 1)


async def test_tasks_on_another_event_loop_are_woken_by_the_load() -> None:
    database = AsyncDatabase({"hot": "value"})
    database.gate = asyncio.Event()
    cache = RecordingCache()
    store = CacheAside(cache, database)
    leader = asyncio.create_task(store.get_async("hot"))
    await until(lambda: database.reads == 1)

    async def follow() -> list[Any]:
        # Bounded, so that a follower never woken fails here rather than hanging its thread.
        return await asyncio.wait_for(
            asyncio.gather(*(store.get_async("hot") for _ in range(5))), JOIN
        )

    other_loop = asyncio.create_task(asyncio.to_thread(asyncio.run, follow()))
    try:
        await until(lambda: cache.misses == 6)
        await asyncio.sleep(0.05)
    finally:
        database.gate.set()
    assert await asyncio.wait_for(leader, JOIN) == "value"
    assert await asyncio.wait_for(other_loop, JOIN) == ["value"] * 5
    assert store.loads == 1


async def test_a_failed_load_reaches_every_thread_and_task_and_the_next_get_loads_again() -> None:
    database = ThreadDatabase({"hot": "value"})
    database.gate = threading.Event()
    database.fail = True
    cache = RecordingCache()
    store = CacheAside(cache, database)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            store.get("hot")
        except ConnectionError as error:
            errors.append(error)

    threads = [threading.Thread(target=read, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    tasks = [asyncio.create_task(store.get_async("hot")) for _ in range(6)]
    try:
        await until(lambda: cache.misses == 10)
        await asyncio.sleep(0.05)
    finally:
        database.gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), JOIN)
    for thread in threads:
        await asyncio.to_thread(thread.join, JOIN)
    assert [type(outcome) for outcome in outcomes] == [ConnectionError] * 6
    assert len(errors) == 4
    assert store.loads == 1
    assert cache.get("hot", ABSENT) is ABSENT
    database.fail = False
    assert await store.get_async("hot") == "value"  # the error was not cached
    assert store.loads == 2


async def test_a_cancelled_leader_does_not_cancel_the_load_the_others_wait_for() -> None:
    database = AsyncDatabase({"k": "value"})
    database.gate = asyncio.Event()
    cache = RecordingCache()
    store = CacheAside(cache, database)
    leader = asyncio.create_task(store.get_async("k"))
    await until(lambda: database.reads == 1)
    followers = [asyncio.create_task(store.get_async("k")) for _ in range(5)]
    await until(lambda: cache.misses == 6)
    await asyncio.sleep(0)
    await cancel(leader)
    await cancel(followers.pop())  # a follower cancelled leaves the rest waiting too
    database.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*followers), JOIN) == ["value"] * 4
    assert cache.get("k") == "value"  # the load went on and filled the cache
    assert (database.reads, store.loads) == (1, 1)
    assert await store.get_async("k") == "value"
    assert database.reads == 1


@pytest.mark.parametrize("write", ["put_async", "put"])
@pytest.mark.parametrize("pause", ["database read", "cache fill"])
async def test_a_write_during_an_async_load_is_not_undone_by_it(write: str, pause: str) -> None:
    database = AsyncDatabase({"k": "old"})
    cache = AsyncCache(paused="old" if pause == "cache fill" else ABSENT, strict=False)
    store = CacheAside(cache, database)
    if pause == "database read":
        database.gate = asyncio.Event()
    reader = asyncio.create_task(store.get_async("k"))
    if pause == "database read":
        await until(lambda: database.reads == 1)  # the load has read "old"
    else:
        await asyncio.wait_for(cache.entered.wait(), JOIN)  # ...and is filling the cache
    if write == "put_async":
        await store.put_async("k", "new")
    else:
        store.put("k", "new")
    # Its cache delete came first; now the load ends.
    if database.gate is not None:
        database.gate.set()
    cache.release.set()
    assert await asyncio.wait_for(reader, JOIN) == "old"
    assert cache.data.get("k", ABSENT) is ABSENT
    assert await store.get_async("k") == "new"


@pytest.mark.parametrize("write", ["put_async", "put in a thread", "delete_async"])
async def test_a_write_during_a_load_in_a_worker_thread_is_not_undone_by_it(write: str) -> None:
    database = ThreadDatabase({"k": "old"})
    database.gate = threading.Event()
    cache = RecordingCache()
    store = CacheAside(cache, database)
    reader = asyncio.create_task(store.get_async("k"))
    try:
        await until(lambda: database.reads == 1)  # read "old" on a worker thread
        if write == "put_async":
            await store.put_async("k", "new")
        elif write == "put in a thread":
            await asyncio.to_thread(store.put, "k", "new")
        else:
            await store.delete_async("k")
    finally:
        database.gate.set()
    assert await asyncio.wait_for(reader, JOIN) == "old"
    assert cache.get("k", ABSENT) is ABSENT
    database.gate = None
    expected = "gone" if write == "delete_async" else "new"
    assert await store.get_async("k", "gone") == expected


async def test_put_async_and_delete_async_write_the_database_then_drop_the_entry() -> None:
    log: list[Any] = []
    database = ThreadDatabase({"k": "old"}, log=log)
    cache = RecordingCache(log)
    store = CacheAside(cache, database, ttl=60)
    assert await store.get_async("k") == "old"
    log.clear()
    await store.put_async("k", "new")
    assert log == [("database", "write_batch", [("k", "new", False)]), ("cache", "delete", "k")]
    assert cache.get("k", ABSENT) is ABSENT
    assert await store.get_async("k") == "new"
    log.clear()
    await store.delete_async("k")
    assert log == [("database", "write_batch", [("k", None, True)]), ("cache", "delete", "k")]
    assert database.data == {}
    assert await store.get_async("k", "gone") == "gone"


@pytest.mark.parametrize("kind", [CacheAside, WriteThrough])
async def test_a_refused_async_write_raises_and_leaves_the_cache_alone(kind: type) -> None:
    database = AsyncDatabase({"k": "old"})
    cache = RecordingCache()
    store = kind(cache, database)
    assert await store.get_async("k") == "old"
    database.refuse = True
    with pytest.raises(ConnectionError):
        await store.put_async("k", "new")
    assert cache.get("k") == "old"
    assert database.data == {"k": "old"}


@pytest.mark.parametrize("kind", [CacheAside, WriteThrough])
async def test_a_cancelled_put_async_whose_write_lands_does_not_leave_the_old_value(
    kind: type,
) -> None:
    # The write goes on in a worker thread whatever becomes of the caller; so must the cache
    # step after it.
    database = ThreadDatabase({"k": "old"})
    cache = RecordingCache()
    store = kind(cache, database)
    assert await store.get_async("k") == "old"
    database.write_gate = threading.Event()
    writer = asyncio.create_task(store.put_async("k", "new"))
    try:
        await until(database.writing.is_set)
        await cancel(writer)
    finally:
        database.write_gate.set()
    await until(lambda: database.data["k"] == "new")
    await asyncio.sleep(0.02)
    assert await store.get_async("k") == database.data["k"]


# ---- 2. Backend dispatch ----------------------------------------------------------------------


async def test_async_twins_are_awaited_and_the_sync_methods_never_called(
    stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    cache = AsyncCache()
    database = AsyncDatabase({"k": "v"}, strict=True)
    aside = CacheAside(cache, database, ttl=5)
    assert await aside.get_async("k") == "v"
    assert await aside.get_async("k") == "v"
    assert database.reads == 1
    await aside.put_async("k", "w")
    await aside.delete_async("k")
    assert database.data == {}
    through = WriteThrough(cache, database, ttl=7)
    await through.put_async("t", 1)
    assert await through.get_async("t") == 1
    cache.data.clear()
    assert await through.get_async("t") == 1
    await through.delete_async("t")
    assert await through.get_async("t", "gone") == "gone"
    assert [entry for entry in cache.log if entry[1] == "set"] == [
        ("cache", "set", "k", "v", 5),
        ("cache", "set", "t", 1, 7),
        ("cache", "set", "t", 1, 7),
    ]
    # WriteBehind's cache side from a coroutine: the async cache only.
    behind = WriteBehind(cache, ThreadDatabase({"b": "from the database"}), **quick)
    stores.append(behind)
    await behind.set_async("a", 1)
    assert await behind.get_async("a") == 1
    await behind.delete_async("a")
    assert await behind.get_async("a", "gone") == "gone"
    assert await behind.get_async("b") == "from the database"
    assert await behind.flush_async(JOIN)


@pytest.mark.parametrize("make_cache", [lambda: LocalCache(100), DictCache])
async def test_non_blocking_backends_are_called_on_the_loop_thread(
    make_cache: Any, monkeypatch: pytest.MonkeyPatch, quick: dict[str, Any]
) -> None:
    assert make_cache().blocking is False
    database = NonBlockingDatabase({"k": "v"})
    to_thread = ForbiddenToThread()
    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    control = ThreadDatabase()
    with pytest.raises(AssertionError, match="worker thread"):
        await call(control, "get", "k")  # the patch holds for a blocking backend
    aside = CacheAside(make_cache(), database, ttl=60)
    assert await aside.get_async("k") == "v"
    assert await aside.get_async("k") == "v"
    await aside.put_async("k", "w")
    await aside.delete_async("k")
    through = WriteThrough(make_cache(), database)
    await through.put_async("t", 1)
    assert await through.get_async("t") == 1
    await through.delete_async("t")
    behind = WriteBehind(make_cache(), database, **quick)
    try:
        await behind.set_async("a", 1)
        assert await behind.get_async("a") == 1
        await behind.delete_async("a")
        assert await behind.get_async("a", "gone") == "gone"
    finally:
        assert behind.close(timeout=JOIN) == []
    assert to_thread.asked == [control.get]
    # Every read and write ran on the loop, but the write-behind flusher's batches.
    assert database.thread_names == {threading.current_thread().name, "buttress-write-behind"}


async def test_a_recording_dict_cache_runs_on_the_loop_thread() -> None:
    cache = RecordingCache()
    store = CacheAside(cache, NonBlockingDatabase({"k": "v"}))
    assert await store.get_async("k") == "v"
    await store.put_async("k", "w")
    assert cache.threads == {threading.get_ident()}


@pytest.mark.parametrize("service", ["CacheAside", "WriteThrough", "WriteBehind"])
async def test_a_blocking_backend_runs_in_a_worker_thread_and_the_loop_keeps_going(
    service: str, stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    database = ThreadDatabase({"k": "v"})
    database.delay = 0.2
    cache = BlockingCache()
    if service == "CacheAside":
        store: Any = CacheAside(cache, database)
    elif service == "WriteThrough":
        store = WriteThrough(cache, database)
    else:
        store = WriteBehind(cache, database, **quick)
        stores.append(store)
    async with Heartbeat() as heartbeat:
        assert await store.get_async("k") == "v"
    assert heartbeat.ticks >= 5, f"the loop stalled: {heartbeat.ticks} ticks in 0.2 s"
    loop_thread = threading.get_ident()
    assert database.threads
    assert loop_thread not in database.threads
    assert cache.threads
    assert loop_thread not in cache.threads
    assert cache.data == {"k": "v"}


# ---- 3. WriteThrough from a coroutine ---------------------------------------------------------


async def test_write_through_async_writes_the_database_then_the_cache() -> None:
    log: list[Any] = []
    database = ThreadDatabase(log=log)
    cache = RecordingCache(log)
    store = WriteThrough(cache, database, ttl=60)
    await store.put_async("k", 1)
    assert log == [
        ("database", "write_batch", [("k", 1, False)]),
        ("cache", "set", "k", 1, 60),
    ]
    log.clear()
    database.refuse = True
    with pytest.raises(ConnectionError, match="refused"):
        await store.put_async("k", 2)
    with pytest.raises(ConnectionError, match="refused"):
        await store.delete_async("k")
    assert log == []  # the cache was not touched
    assert cache.get("k") == 1
    assert database.data == {"k": 1}
    database.refuse = False
    await store.delete_async("k")
    assert log == [("database", "write_batch", [("k", None, True)]), ("cache", "delete", "k")]
    assert await store.get_async("k", "gone") == "gone"


async def test_write_through_get_async_reads_through_and_fills_with_the_ttl() -> None:
    database = AsyncDatabase({"k": "v"})
    cache = RecordingCache()
    store = WriteThrough(cache, database, ttl=9)
    assert await store.get_async("k") == "v"
    assert cache.log == [("cache", "set", "k", "v", 9)]
    assert await store.get_async("k") == "v"
    assert database.reads == 1
    assert await store.get_async("absent", "default") == "default"
    assert "absent" not in cache.data


# ---- 4. WriteBehind from a coroutine ----------------------------------------------------------


@pytest.mark.parametrize("make_cache", [lambda: LocalCache(1000), DictCache])
async def test_write_behind_async_with_sqlite(
    make_cache: Any, tmp_path: Path, quick: dict[str, Any]
) -> None:
    database = SQLiteDatabase(tmp_path / "kv.db")
    database.write_batch([("old", b"from before", False)])
    try:
        async with WriteBehind(make_cache(), database, **quick) as store:
            for number in range(20):
                await store.set_async(f"k{number}", f"v{number}".encode())
            await store.delete_async("k5")
            assert await store.get_async("k7") == b"v7"
            assert await store.get_async("k5", "gone") == "gone"
            assert await store.get_async("old") == b"from before"
            assert await store.flush_async(JOIN)
            assert database.get("k7") == b"v7"
            assert database.get("k5", "gone") == "gone"
            await store.set_async("last", b"written at close")
        assert store.queue.closed
        assert database.get("last") == b"written at close"
        with pytest.raises(RuntimeError, match="closed"):
            await store.set_async("late", b"refused")
    finally:
        database.close()


async def test_get_async_sees_pending_writes_the_cache_dropped(quick: dict[str, Any]) -> None:
    database = ThreadDatabase({"b": "in the database"})
    database.refuse = True
    cache = RecordingCache()
    store = WriteBehind(cache, database, max_attempts=10_000, **quick)
    try:
        await store.set_async("a", 1)
        await store.delete_async("b")
        cache.data.clear()  # evicted, not yet written
        assert await store.get_async("a") == 1
        assert await store.get_async("b", "gone") == "gone"
        database.refuse = False
        assert await store.flush_async(JOIN)
        cache.data.clear()
        assert await store.get_async("a") == 1  # from the database, and cached again
        assert cache.data == {"a": 1}
        assert database.data == {"a": 1}
    finally:
        assert await store.close_async() == []


async def test_close_async_returns_what_could_not_be_written(quick: dict[str, Any]) -> None:
    database = ThreadDatabase()
    database.refuse = True
    store = WriteBehind(DictCache(), database, max_attempts=10_000, **quick)
    await store.set_async("a", 1)
    await store.delete_async("b")
    assert not await store.flush_async(0.05)
    left = await store.close_async(timeout=0.1)
    assert sorted(left, key=repr) == sorted([("a", 1), ("b", DELETED)], key=repr)


async def test_the_flusher_calls_the_sync_write_batch_and_reads_await_get_async(
    stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    class Hybrid(AsyncDatabase):
        """Its flusher writes are sync; its reads from a coroutine are awaited."""

        def __init__(self) -> None:
            super().__init__()
            self.writers: set[str] = set()

        def get(self, key: Any, default: Any = None) -> Any:
            raise AssertionError("the sync get was called from a coroutine")

        def write_batch(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
            self.writers.add(threading.current_thread().name)
            self._apply(items)

        async def write_batch_async(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
            raise AssertionError("the flusher awaited write_batch_async")

    database = Hybrid()
    cache = RecordingCache()
    store = WriteBehind(cache, database, **quick)
    stores.append(store)
    await store.set_async("k", "v")
    assert await store.flush_async(JOIN)
    assert database.data == {"k": "v"}
    assert database.writers == {"buttress-write-behind"}
    cache.data.clear()
    assert await store.get_async("k") == "v"
    assert database.reads == 1
    assert cache.data == {"k": "v"}


async def test_a_full_queue_is_waited_on_without_blocking_the_loop(
    stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    database = ThreadDatabase()
    database.write_gate = threading.Event()
    store = WriteBehind(DictCache(), database, max_pending=1, full_timeout=JOIN, **quick)
    stores.append(store)
    try:
        await store.set_async("a", 1)
        await until(database.writing.is_set)  # "a" is in flight: the queue is full
        async with Heartbeat() as heartbeat:
            waiting = asyncio.create_task(store.set_async("b", 2))
            await asyncio.sleep(0.15)
            assert not waiting.done()
        assert heartbeat.ticks >= 5, f"the loop stalled: {heartbeat.ticks} ticks in 0.15 s"
        assert await store.get_async("b", "not yet") == "not yet"
    finally:
        database.write_gate.set()
    await asyncio.wait_for(waiting, JOIN)
    assert await store.get_async("b") == 2
    assert await store.flush_async(JOIN)
    assert database.data == {"a": 1, "b": 2}


async def test_a_full_queue_blocks_until_its_timeout_then_raises(
    stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    database = ThreadDatabase()
    database.write_gate = threading.Event()
    store = WriteBehind(DictCache(), database, max_pending=1, full_timeout=0.1, **quick)
    stores.append(store)
    try:
        await store.set_async("a", 1)
        await until(database.writing.is_set)
        started = time.monotonic()
        async with Heartbeat() as heartbeat:
            with pytest.raises(WriteQueueFullError):
                await store.set_async("b", 2)
            with pytest.raises(WriteQueueFullError):
                await store.delete_async("c")
        assert time.monotonic() - started >= 0.19
        assert heartbeat.ticks >= 5
        assert await store.get_async("b", "refused") == "refused"  # not cached either
    finally:
        database.write_gate.set()
    assert await store.flush_async(JOIN)
    assert database.data == {"a": 1}


async def test_on_full_raise_raises_at_once_without_a_thread(
    stores: list[WriteBehind], quick: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    database = ThreadDatabase()
    database.write_gate = threading.Event()
    store = WriteBehind(DictCache(), database, max_pending=1, on_full="raise", **quick)
    stores.append(store)
    try:
        await store.set_async("a", 1)
        await until(database.writing.is_set)
        to_thread = ForbiddenToThread()
        with monkeypatch.context() as patch:
            patch.setattr(asyncio, "to_thread", to_thread)
            with pytest.raises(WriteQueueFullError):
                await asyncio.wait_for(store.set_async("b", 2), JOIN)
            with pytest.raises(WriteQueueFullError):
                await asyncio.wait_for(store.delete_async("b"), JOIN)
        assert to_thread.asked == []
        assert await store.get_async("b", "refused") == "refused"
    finally:
        database.write_gate.set()
    assert await store.flush_async(JOIN)


async def test_a_cancelled_set_async_waiting_for_room_does_not_leave_the_old_value(
    stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    # Either the cancelled write is never queued, or the cache follows it once it is.
    database = ThreadDatabase()
    cache = RecordingCache()
    store = WriteBehind(cache, database, max_pending=1, full_timeout=JOIN, **quick)
    stores.append(store)
    await store.set_async("b", 0)
    assert await store.flush_async(JOIN)
    cache.set("b", 0)  # cached, as a read would leave it
    database.write_gate = threading.Event()
    try:
        await store.set_async("a", 1)
        await until(database.writing.is_set)
        waiting = asyncio.create_task(store.set_async("b", 2))
        await asyncio.sleep(0.05)
        await cancel(waiting)
    finally:
        database.write_gate.set()
    assert await store.flush_async(JOIN)
    await asyncio.sleep(0.05)
    assert await store.flush_async(JOIN)
    assert await store.get_async("b") == database.data.get("b")


async def test_a_set_async_cancelled_while_writing_the_cache_does_not_leave_the_old_value(
    stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    database = ThreadDatabase({"k": "old"})
    cache = AsyncCache(paused="new")
    cache.data["k"] = "old"  # cached, as a read would leave it
    database.write_gate = threading.Event()  # "new" stays pending until told
    store = WriteBehind(cache, database, **quick)
    stores.append(store)
    try:
        writer = asyncio.create_task(store.set_async("k", "new"))
        await asyncio.wait_for(cache.entered.wait(), JOIN)  # queued; the cache write under way
        await cancel(writer)
        assert await store.get_async("k") == "new"  # the pending write is read first
        cache.release.set()  # the cache write under way ends after its caller is gone
    finally:
        database.write_gate.set()
    assert await store.flush_async(JOIN)
    assert database.data == {"k": "new"}  # the cancelled write stands
    await asyncio.sleep(0.01)
    assert cache.data.get("k", ABSENT) in (ABSENT, "new")
    assert await store.get_async("k") == "new"


# ---- 5. Two writers of one key: the one overtaken drops its cache entry -----------------------


@pytest.mark.parametrize("flusher", ["held", "flowing"])
def test_the_first_writer_filling_the_cache_last_does_not_leave_its_value(
    flusher: str, stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    database = ThreadDatabase()
    if flusher == "held":
        database.write_gate = threading.Event()
    cache = PausingCache(paused="first")
    store = WriteBehind(cache, database, **quick)
    stores.append(store)
    first = threading.Thread(target=store.set, args=("k", "first"), daemon=True)
    first.start()
    try:
        assert cache.entered.wait(JOIN)  # "first" is queued; its cache write waits
        store.set("k", "second")  # queued after it, cached before it
        assert cache.get("k", ABSENT) in (ABSENT, "second")
    finally:
        cache.release.set()
        first.join(JOIN)
        if database.write_gate is not None:
            database.write_gate.set()
    assert not first.is_alive()
    assert cache.log[-2] == ("cache", "set", "k", "first", None)  # "first" landed last...
    assert cache.get("k", ABSENT) in (ABSENT, "second")  # ...and was dropped
    if flusher == "held":
        assert cache.get("k", ABSENT) is ABSENT
    assert store.get("k") == "second"
    assert store.flush(JOIN)
    assert database.data == {"k": "second"}
    assert cache.get("k", ABSENT) in (ABSENT, "second")
    assert store.get("k") == "second"


async def test_the_first_task_filling_the_cache_last_does_not_leave_its_value(
    stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    database = ThreadDatabase()
    database.write_gate = threading.Event()
    cache = AsyncCache(paused="first")
    store = WriteBehind(cache, database, **quick)
    stores.append(store)
    try:
        first = asyncio.create_task(store.set_async("k", "first"))
        await asyncio.wait_for(cache.entered.wait(), JOIN)
        await store.set_async("k", "second")
        cache.release.set()
        await asyncio.wait_for(first, JOIN)
        assert cache.data.get("k", ABSENT) is ABSENT
        assert await store.get_async("k") == "second"
    finally:
        database.write_gate.set()
    assert await store.flush_async(JOIN)
    assert database.data == {"k": "second"}
    assert await store.get_async("k") == "second"


@pytest.mark.usefixtures("busy_switching")
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cache_kind", ["LocalCache", "DictCache"])
def test_racing_writers_never_leave_the_cache_older_than_the_database(
    cache_kind: str, seed: int, quick: dict[str, Any]
) -> None:
    keys = ["a", "b", "c"]
    # A LocalCache is filled in the queue's own call; a DictCache that dawdles lets another
    # writer in between the queueing, the cache write and the check that follows it.
    cache: Any = LocalCache(1000) if cache_kind == "LocalCache" else JitterCache(2e-4)
    database = ThreadDatabase()
    database.jitter = 2e-4
    store = WriteBehind(cache, database, batch_size=4, **quick)
    stale: list[tuple[Any, ...]] = []

    def step(rng: random.Random, worker: int, number: int) -> None:
        key = rng.choice(keys)
        if rng.random() < 0.1:
            store.delete(key)
        else:
            store.set(key, (worker, number, rng.random()))  # a new object every time

    def settle() -> None:
        assert store.flush(JOIN)
        for key in keys:
            stored = database.data.get(key, ABSENT)
            cached = cache.get(key, ABSENT)
            if not (cached is ABSENT or cached == stored):
                stale.append((key, cached, stored))

    try:
        race(seed, step, settle)
        assert stale == []
        for key in keys:
            assert store.get(key, ABSENT) == database.data.get(key, ABSENT)
    finally:
        assert store.close(timeout=JOIN) == []


@pytest.mark.parametrize("kind", ["WriteBehind", "WriteThrough"])
def test_a_read_through_overtaken_by_a_write_does_not_refill_the_old_value(
    kind: str, quick: dict[str, Any]
) -> None:
    database = ThreadDatabase({"k": "old"})
    database.gate = threading.Event()
    cache = RecordingCache()
    store: Any
    if kind == "WriteBehind":
        store = WriteBehind(cache, database, **quick)
    else:
        store = WriteThrough(cache, database)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(store.get("k")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: database.reads == 1)  # the read has "old"
        if kind == "WriteBehind":
            store.set("k", "new")
            assert store.flush(JOIN)
        else:
            store.put("k", "new")
    finally:
        database.gate.set()
        reader.join(JOIN)
    try:
        assert got == ["old"]
        assert database.data == {"k": "new"}
        assert cache.get("k", ABSENT) in (ABSENT, "new")
        assert store.get("k") == "new"
    finally:
        if isinstance(store, WriteBehind):
            store.close(timeout=JOIN)


@pytest.mark.parametrize("kind", ["WriteBehind", "WriteThrough"])
async def test_a_read_through_async_overtaken_by_a_write_does_not_refill_the_old_value(
    kind: str, stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    database = ThreadDatabase({"k": "old"})
    database.gate = threading.Event()
    cache = RecordingCache()
    store: Any
    if kind == "WriteBehind":
        store = WriteBehind(cache, database, **quick)
        stores.append(store)
    else:
        store = WriteThrough(cache, database)
    reader = asyncio.create_task(store.get_async("k"))
    try:
        await until(lambda: database.reads == 1)  # read "old" on a worker thread
        if kind == "WriteBehind":
            await store.set_async("k", "new")
            assert await store.flush_async(JOIN)
        else:
            await store.put_async("k", "new")
    finally:
        database.gate.set()
    assert await asyncio.wait_for(reader, JOIN) == "old"
    assert database.data == {"k": "new"}
    assert cache.get("k", ABSENT) in (ABSENT, "new")
    assert await store.get_async("k") == "new"


@pytest.mark.parametrize("kind", ["WriteBehind", "WriteThrough"])
def test_a_read_through_is_cached_when_only_other_keys_are_written_meanwhile(
    kind: str, stores: list[WriteBehind], quick: dict[str, Any]
) -> None:
    database = ThreadDatabase({"k": "value"})
    database.gate = threading.Event()
    cache = RecordingCache()
    store: Any
    if kind == "WriteBehind":
        store = WriteBehind(cache, database, **quick)
        stores.append(store)
    else:
        store = WriteThrough(cache, database)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(store.get("k")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: database.reads == 1)
        if kind == "WriteBehind":
            store.set("other", 1)
        else:
            store.put("other", 1)
    finally:
        database.gate.set()
        reader.join(JOIN)
    assert got == ["value"]
    assert cache.get("k", ABSENT) == "value"


# ---- 6. CacheAside: a load overtaken by a write -----------------------------------------------


@pytest.mark.parametrize("pause", ["database read", "cache fill"])
def test_a_put_during_a_load_leaves_the_cache_missing_or_new(pause: str) -> None:
    database = ThreadDatabase({"k": "old"})
    cache = PausingCache(paused="old" if pause == "cache fill" else ABSENT)
    if pause == "database read":
        database.gate = threading.Event()
    store = CacheAside(cache, database)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(store.get("k")), daemon=True)
    reader.start()
    try:
        if pause == "database read":
            wait_until(lambda: database.reads == 1)
        else:
            assert cache.entered.wait(JOIN)  # the load read "old" and is filling the cache
        store.put("k", "new")  # its cache delete lands before the fill
    finally:
        if database.gate is not None:
            database.gate.set()
        cache.release.set()
        reader.join(JOIN)
    assert got == ["old"]
    assert cache.get("k", ABSENT) in (ABSENT, "new")
    if pause == "cache fill":
        assert ("cache", "set", "k", "old", None) in cache.log  # it was filled, then dropped
    assert store.get("k") == "new"


@pytest.mark.usefixtures("busy_switching")
@pytest.mark.parametrize("seed", range(3))
def test_racing_loads_and_writes_never_leave_the_cache_older_than_the_database(
    seed: int,
) -> None:
    keys = ["a", "b"]
    database = ThreadDatabase({key: ("initial", key) for key in keys})
    database.jitter = 2e-4
    cache = JitterCache(2e-4)
    store = CacheAside(cache, database)
    stale: list[tuple[Any, ...]] = []

    def step(rng: random.Random, worker: int, number: int) -> None:
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.25:
            store.put(key, (worker, number, roll))
        elif roll < 0.3:
            store.delete(key)
        else:
            store.get(key)

    def settle() -> None:
        for key in keys:
            stored = database.data.get(key, ABSENT)
            cached = cache.data.get(key, ABSENT)
            if not (cached is ABSENT or cached == stored):
                stale.append((key, cached, stored))

    race(seed, step, settle)
    assert stale == []
    for key in keys:
        assert store.get(key, ABSENT) == database.data.get(key, ABSENT)
