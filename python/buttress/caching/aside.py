"""Cache-aside with single-flight loading, and write-through.

``CacheAside`` reads the cache first and, on a miss, loads from the database and fills the
cache. However many threads miss one key at once, one of them loads it and the others wait
for its answer (its value, or its exception). A write goes to the database and then drops the
cache entry. A load that was under way when the write came does not put its older value back.

``WriteThrough`` writes the database first, then the cache; a write the database refuses
raises and leaves the cache as it was.

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

import math
import threading
from typing import Any

from buttress.caching.writebehind import (
    MISSING,
    CacheBackend,
    Database,
    Key,
    check_backends,
    fill,
    read_through,
)

__all__ = ["CacheAside", "WriteThrough"]


class _Flight:
    """One load of one key, which the threads that miss it at the same time share."""

    __slots__ = ("done", "error", "stale", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = MISSING
        self.error: BaseException | None = None
        # Set by a write that came while the load was under way: its value is not cached.
        self.stale = False


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
        self.loads = 0

    def get(self, key: Key, default: Any = None) -> Any:
        """The cached value, or the database's (loaded once however many callers miss it at
        the same time, then cached); ``default`` when the database has none."""
        value = self.cache.get(key, MISSING)
        if value is not MISSING:
            return value
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if leader:
            self._load(key, flight)
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return default if flight.value is MISSING else flight.value

    def _load(self, key: Key, flight: _Flight) -> None:
        try:
            self.loads += 1
            flight.value = self.database.get(key, MISSING)
            with self._lock:
                fresh = not flight.stale
                if fresh and flight.value is not MISSING:
                    fill(self.cache, key, flight.value, self.ttl)
        except BaseException as error:
            flight.error = error
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()

    def put(self, key: Key, value: Any) -> None:
        """Writes ``value`` to the database, then drops the cache entry."""
        self.database.write_batch([(key, value, False)])
        self._invalidate(key)

    def delete(self, key: Key) -> None:
        """Deletes ``key`` from the database, then drops the cache entry."""
        self.database.write_batch([(key, None, True)])
        self._invalidate(key)

    def _invalidate(self, key: Key) -> None:
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.stale = True
            self.cache.delete(key)


class WriteThrough:
    """Write-through over ``cache`` and ``database``: the database first, then the cache."""

    def __init__(
        self, cache: CacheBackend, database: Database, *, ttl: float | None = None
    ) -> None:
        _check(cache, database, ttl)
        self.cache = cache
        self.database = database
        self.ttl = ttl

    def put(self, key: Key, value: Any) -> None:
        """Writes the database, then the cache; if the database raises, the cache is left as
        it was."""
        self.database.write_batch([(key, value, False)])
        fill(self.cache, key, value, self.ttl)

    def delete(self, key: Key) -> None:
        """Deletes from the database, then from the cache."""
        self.database.write_batch([(key, None, True)])
        self.cache.delete(key)

    def get(self, key: Key, default: Any = None) -> Any:
        """The cached value, else the database's (which then fills the cache)."""
        return read_through(self.cache, self.database, key, default, self.ttl)


def _check(cache: object, database: object, ttl: object) -> None:
    check_backends(cache, database)
    if ttl is not None and (
        not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl < math.inf
    ):
        raise ValueError(f"ttl must be a positive number of seconds, or None (got {ttl!r}).")
