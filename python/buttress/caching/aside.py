"""Cache-aside with single-flight loading, and write-through.

``CacheAside`` reads the cache first and, on a miss, loads from the database and fills the
cache. However many threads miss one key at once, one of them loads it and the others wait
for its answer (its value, or its exception). A write goes to the database and then drops the
cache entry. A load that was under way when the write came does not put its older value back.

``WriteThrough`` writes the database first, then the cache; a write the database refuses
raises and leaves the cache as it was.

Both have asyncio twins (``get_async``, ``put_async``, ``delete_async``); threads and tasks
missing one key at once share one load.

>>> from buttress.caching import DictCache
>>> database = {}
>>> class Users:
...     def get(self, key, default=None): return database.get(key, default)
...     def write_batch(self, items):
...         for key, value, deleted in items:
...             database.pop(key, None) if deleted else database.__setitem__(key, value)
>>> users = CacheAside(DictCache(), Users(), ttl=60)
>>> users.put("user:1", "Ada")
>>> users.get("user:1")
'Ada'
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import threading
from collections.abc import Callable
from typing import Any

from buttress.caching.writebehind import (
    MISSING,
    CacheBackend,
    Database,
    Key,
    call,
    check_backends,
    fill,
    fill_after_read,
    fill_after_read_async,
    fill_async,
    read_through,
    read_through_async,
    run_to_end,
)

__all__ = ["CacheAside", "WriteThrough"]


class _Flight:
    """One load of one key, which the threads and tasks that miss it at the same time share."""

    __slots__ = ("done", "error", "stale", "value", "waiters")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = MISSING
        self.error: BaseException | None = None
        # Set by a write that came while the load was under way: its value is not cached.
        self.stale = False
        # Tasks waiting for the load, each woken on its own event loop.
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def outcome(self, default: Any) -> Any:
        if self.error is not None:
            raise self.error
        return default if self.value is MISSING else self.value


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class CacheAside:
    """Cache-aside over ``cache`` and ``database``; ``ttl`` (seconds, None: no expiry) is
    passed to the cache on every fill."""

    def __init__(
        self, cache: CacheBackend, database: Database, *, ttl: float | None = None
    ) -> None:
        _check(cache, database, ttl)
        self.cache = cache
        self.database = database
        self.ttl = ttl
        self._lock = threading.Lock()
        self._flights: dict[Key, _Flight] = {}
        self._running: set[asyncio.Future[Any]] = set()
        self.loads = 0

    def get(self, key: Key, default: Any = None) -> Any:
        """The cached value, or the database's (loaded once however many callers miss it at
        the same time, then cached); ``default`` when the database has none."""
        value = self.cache.get(key, MISSING)
        if value is not MISSING:
            return value
        flight, leader, _ = self._board(key, None)
        if leader:
            try:
                self.loads += 1
                self._fill(key, flight, self.database.get(key, MISSING))
            except BaseException as error:
                flight.error = error
            finally:
                self._land(key, flight)
        else:
            flight.done.wait()
        return flight.outcome(default)

    async def get_async(self, key: Key, default: Any = None) -> Any:
        """``get`` from a coroutine. A task that starts a load and is then cancelled does not
        cancel the load that others wait for."""
        value = await call(self.cache, "get", key, MISSING)
        if value is not MISSING:
            return value
        flight, leader, woken = self._board(key, asyncio.get_running_loop())
        if leader:
            await run_to_end(self._load_async(key, flight), self._running)
        elif woken is not None:
            await woken
        return flight.outcome(default)

    def _board(
        self, key: Key, loop: asyncio.AbstractEventLoop | None
    ) -> tuple[_Flight, bool, asyncio.Future[None] | None]:
        """The load of ``key`` under way, or a new one the caller leads; a task following
        one gets a future to wait on."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _Flight()
                return flight, True, None
            if loop is None:
                return flight, False, None
            woken: asyncio.Future[None] = loop.create_future()
            flight.waiters.append((loop, woken))
            return flight, False, woken

    def _fill(self, key: Key, flight: _Flight, value: Any) -> None:
        flight.value = value
        if value is not MISSING and self._fresh(flight):
            fill_after_read(self.cache, key, value, self.ttl)
            if not self._fresh(flight):
                self.cache.delete(key)

    async def _load_async(self, key: Key, flight: _Flight) -> None:
        try:
            self.loads += 1
            flight.value = value = await call(self.database, "get", key, MISSING)
            if value is not MISSING and self._fresh(flight):
                await fill_after_read_async(self.cache, key, value, self.ttl)
                if not self._fresh(flight):
                    await call(self.cache, "delete", key)
        except BaseException as error:
            flight.error = error
        finally:
            self._land(key, flight)

    def _fresh(self, flight: _Flight) -> bool:
        # A write during the load marks it stale. The check is made again after the fill,
        # because the write's own cache delete may have landed before the fill did.
        with self._lock:
            return not flight.stale

    def _land(self, key: Key, flight: _Flight) -> None:
        """Ends the load: later misses start a new one, and every waiter wakes."""
        with self._lock:
            self._flights.pop(key, None)
            waiters, flight.waiters = flight.waiters, []
        flight.done.set()
        for loop, woken in waiters:
            # A closed loop raises RuntimeError; its task is gone with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, woken)

    def put(self, key: Key, value: Any) -> None:
        """Writes ``value`` to the database, then drops the cache entry."""
        self.database.write_batch([(key, value, False)])
        self._invalidate(key)
        self.cache.delete(key)

    def delete(self, key: Key) -> None:
        """Deletes ``key`` from the database, then drops the cache entry."""
        self.database.write_batch([(key, None, True)])
        self._invalidate(key)
        self.cache.delete(key)

    async def put_async(self, key: Key, value: Any) -> None:
        """``put`` from a coroutine; a cancelled caller does not stop a write under way from
        reaching the database and dropping the cache entry."""
        await run_to_end(self._write_async(key, value, False), self._running)

    async def delete_async(self, key: Key) -> None:
        """``delete`` from a coroutine, finished as ``put_async`` is."""
        await run_to_end(self._write_async(key, None, True), self._running)

    async def _write_async(self, key: Key, value: Any, deleted: bool) -> None:
        await call(self.database, "write_batch", [(key, value, deleted)])
        self._invalidate(key)
        await call(self.cache, "delete", key)

    def _invalidate(self, key: Key) -> None:
        """Marks a load of ``key`` under way stale, so it does not cache what it read."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.stale = True


class _Writers:
    """Which keys have writes under way, and whether two of them overlapped.

    Two writes of one key can reach the database in one order and the cache in the other.
    A write that overlapped another does not trust its cache fill: when it ends, it drops the
    entry, and so does every other overlapping write as it ends, so the entry left is never
    older than the database. Writes that do not overlap fill the cache as usual.

    Each write also moves a count for its stripe of keys, which read-throughs compare to tell
    that a write of their key came while they read."""

    _STRIPES = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> [writes under way, whether any of them overlapped]
        self._active: dict[Key, list[int]] = {}
        self._moves = [0] * self._STRIPES

    def token(self, key: Key) -> object:
        """Equal to an earlier token of ``key`` only if no write of it (or of a key sharing
        its stripe) began, ended or was under way since."""
        with self._lock:
            if key in self._active:
                return object()
            return self._moves[hash(key) % self._STRIPES]

    def begin(self, key: Key) -> None:
        with self._lock:
            self._moves[hash(key) % self._STRIPES] += 1
            entry = self._active.get(key)
            if entry is None:
                self._active[key] = [1, 0]
            else:
                entry[0] += 1
                entry[1] = 1

    def overlapped(self, key: Key) -> bool:
        with self._lock:
            return bool(self._active[key][1])

    def end(self, key: Key) -> bool:
        """Ends a write; whether it overlapped another (its cache fill is then not trusted)."""
        with self._lock:
            self._moves[hash(key) % self._STRIPES] += 1
            entry = self._active[key]
            entry[0] -= 1
            if entry[0] == 0:
                del self._active[key]
            return bool(entry[1])


class WriteThrough:
    """Write-through over ``cache`` and ``database``: the database first, then the cache."""

    def __init__(
        self, cache: CacheBackend, database: Database, *, ttl: float | None = None
    ) -> None:
        _check(cache, database, ttl)
        self.cache = cache
        self.database = database
        self.ttl = ttl
        self._writers = _Writers()
        self._running: set[asyncio.Future[Any]] = set()
        # A cache may say what it would refuse before the database is written (RedisCache does).
        self._check_value: Callable[[Key, Any], object] | None = getattr(cache, "check", None)

    def put(self, key: Key, value: Any) -> None:
        """Writes the database, then the cache. A value the cache's ``check`` refuses is
        refused before the database is written. If the database raises, the cache is left as
        it was; if the cache raises, its entry is dropped (so no read sees the old value) and
        the error raised."""
        self._write(key, value, False)

    def delete(self, key: Key) -> None:
        """Deletes from the database, then from the cache."""
        self._write(key, None, True)

    def get(self, key: Key, default: Any = None) -> Any:
        """The cached value, else the database's (which then fills the cache)."""
        writes = functools.partial(self._writers.token, key)
        return read_through(self.cache, self.database, key, default, self.ttl, writes, writes())

    async def put_async(self, key: Key, value: Any) -> None:
        """``put`` from a coroutine; a cancelled caller does not stop a write under way from
        reaching the database and then the cache."""
        await run_to_end(self._write_async(key, value, False), self._running)

    async def delete_async(self, key: Key) -> None:
        """``delete`` from a coroutine, finished as ``put_async`` is."""
        await run_to_end(self._write_async(key, None, True), self._running)

    async def get_async(self, key: Key, default: Any = None) -> Any:
        """``get`` from a coroutine."""
        writes = functools.partial(self._writers.token, key)
        return await read_through_async(
            self.cache, self.database, key, default, self.ttl, writes, writes()
        )

    def _write(self, key: Key, value: Any, deleted: bool) -> None:
        if not deleted and self._check_value is not None:
            self._check_value(key, value)
        self._writers.begin(key)
        try:
            self.database.write_batch([(key, value, deleted)])
            if deleted:
                self.cache.delete(key)
            elif not self._writers.overlapped(key):
                try:
                    fill(self.cache, key, value, self.ttl)
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.cache.delete(key)
                    raise
        finally:
            if self._writers.end(key):
                self.cache.delete(key)

    async def _write_async(self, key: Key, value: Any, deleted: bool) -> None:
        if not deleted and self._check_value is not None:
            self._check_value(key, value)
        self._writers.begin(key)
        try:
            await call(self.database, "write_batch", [(key, value, deleted)])
            if deleted:
                await call(self.cache, "delete", key)
            elif not self._writers.overlapped(key):
                try:
                    await fill_async(self.cache, key, value, self.ttl)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await call(self.cache, "delete", key)
                    raise
        finally:
            if self._writers.end(key):
                await call(self.cache, "delete", key)


def _check(cache: object, database: object, ttl: object) -> None:
    check_backends(cache, database)
    if ttl is not None and (
        not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl < math.inf
    ):
        raise ValueError(f"ttl must be a positive number of seconds, or None (got {ttl!r}).")
