"""Write-behind caching: the cache takes a write at once, the database gets it later, in
batches, from a flusher thread.

Writes wait in ``buttress._core.WriteQueue``. Only the newest write of a key waits, and a key
never has two writes in flight. A batch goes to the database in one transaction. A batch that
fails is retried with backoff, then split in halves until the failing entries are alone. An
entry that keeps failing goes to the dead-letter handler after ``max_attempts``, so the rest
keep flowing. Reads see pending writes even when the cache has dropped them.

Write-behind trades durability for speed. A process killed with writes pending loses them.
``flush()`` waits until everything pending is written, and ``close()`` (also run at
interpreter exit) writes what it can and returns what it could not.

>>> import os, tempfile
>>> database = SQLiteDatabase(os.path.join(tempfile.mkdtemp(), "kv.db"))
>>> with WriteBehind(DictCache(), database, flush_interval=0.01) as store:
...     store.set("user:1", b"ada")
...     store.get("user:1")
...     store.flush(timeout=5)
b'ada'
True
>>> database.get("user:1")
b'ada'
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from buttress._core import LocalCache, WriteQueue
from buttress.errors import WriteQueueFullError

__all__ = [
    "DELETED",
    "MISSING",
    "CacheBackend",
    "Database",
    "DictCache",
    "SQLiteDatabase",
    "WriteBehind",
    "call",
    "check_backends",
    "fill",
    "fill_after_read",
    "fill_after_read_async",
    "fill_async",
    "read_through",
    "read_through_async",
    "run_to_end",
]

logger = logging.getLogger("buttress.writebehind")

Key = str | bytes | int
T = TypeVar("T")


class _Deleted:
    """What a dead letter's value is when the write was a delete."""

    def __repr__(self) -> str:
        return "DELETED"


DELETED: Any = _Deleted()
# How often set_async looks for room in a full queue: from every half millisecond, doubling
# up to every 20 ms.
_FIRST_POLL = 0.0005
_LONGEST_POLL = 0.02
# How often an idle flusher wakes to see whether it was stopped (a close wakes it anyway).
_IDLE_WAKE = 0.5

MISSING: Any = object()
"""What ``get(key, MISSING)`` returns on a miss, told apart from a stored None."""


@runtime_checkable
class CacheBackend(Protocol):
    """The cache a ``WriteBehind`` (or ``CacheAside``, ``WriteThrough``) fronts. ``get``
    returns ``default`` on a miss; ``set`` takes a ``ttl`` keyword when a TTL is configured.

    For the ``*_async`` methods of the services, a backend (cache or database) may offer
    ``get_async``, ``set_async``, ``delete_async`` (``write_batch_async``) coroutines, which are
    awaited; one whose calls never wait on I/O says ``blocking = False`` and is called
    directly; any other is called in a worker thread.

    A cache may also offer ``check(key, value)``, raising for what ``set`` would refuse
    without storing anything; ``WriteBehind`` and ``WriteThrough`` call it before the write is
    queued or reaches the database, so a refused value is refused whole."""

    def get(self, key: Key, default: Any = None) -> Any: ...
    def set(self, key: Key, value: Any) -> None: ...
    def delete(self, key: Key) -> None: ...


@runtime_checkable
class Database(Protocol):
    """Where writes end up. ``write_batch`` applies ``(key, value, deleted)`` items in one
    transaction (all or none) and raises when it cannot."""

    def write_batch(self, items: Sequence[tuple[Key, Any, bool]]) -> None: ...
    def get(self, key: Key, default: Any = None) -> Any: ...


class DictCache:
    """A plain dict as the cache (unbounded, thread-safe under the GIL), with optional expiry
    per entry: for tests and small data. ``LocalCache`` is the bounded one."""

    blocking = False

    def __init__(self) -> None:
        self.data: dict[Key, Any] = {}
        self._expires: dict[Key, float] = {}

    def get(self, key: Key, default: Any = None) -> Any:
        expires = self._expires.get(key)
        if expires is not None and time.monotonic() >= expires:
            self.delete(key)
            return default
        return self.data.get(key, default)

    def set(self, key: Key, value: Any, ttl: float | None = None) -> None:
        self.data[key] = value
        if ttl is None:
            self._expires.pop(key, None)
        else:
            self._expires[key] = time.monotonic() + ttl

    def delete(self, key: Key) -> None:
        self.data.pop(key, None)
        self._expires.pop(key, None)


class SQLiteDatabase:
    """A key-value table in an SQLite file; a batch is one transaction of upserts and deletes.
    Values may be anything SQLite stores (bytes, str, int, float, None)."""

    def __init__(self, path: str | os.PathLike[str], *, table: str = "buttress_kv") -> None:
        if not table.isidentifier():
            raise ValueError(f"table must be an SQL identifier (got {table!r}).")
        from buttress.backends.sqlite import sqlite_pool

        self.table = table
        self.pool = sqlite_pool(path, name=f"writebehind:{table}")
        with self.pool.connection() as conn, conn:
            conn.execute(f"create table if not exists {table} (key primary key, value)")

    def write_batch(self, items: Sequence[tuple[Key, Any, bool]]) -> None:
        puts = [(key, value) for key, value, deleted in items if not deleted]
        deletes = [(key,) for key, _, deleted in items if deleted]
        with self.pool.connection() as conn, conn:
            if puts:
                conn.executemany(
                    f"insert into {self.table} (key, value) values (?, ?) "
                    "on conflict (key) do update set value = excluded.value",
                    puts,
                )
            if deletes:
                conn.executemany(f"delete from {self.table} where key = ?", deletes)

    def get(self, key: Key, default: Any = None) -> Any:
        with self.pool.connection() as conn:
            row = conn.execute(f"select value from {self.table} where key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def close(self) -> None:
        self.pool.close()


class WriteBehind:
    """A cache whose writes reach ``database`` later, in batches, from a flusher thread.

    - ``batch_size``: most writes per database transaction.
    - ``flush_interval``: the longest a write waits for others to share its batch. A batch
      goes to the database once ``batch_size`` writes wait, or ``flush_interval`` seconds
      after the oldest of them was queued, whichever comes first; 0 sends each write as soon
      as the flusher is free. Meanwhile newer writes of a key replace older ones, so the
      database sees fewer. ``flush()`` and ``close()`` send what waits at once.
    - ``max_pending``: most writes waiting or in flight.
    - ``on_full``: ``"block"`` (wait up to ``full_timeout``, then ``WriteQueueFullError``) or
      ``"raise"`` (at once).
    - ``batch_retries``: tries a failing batch gets, with backoff, before it is split.
    - ``max_attempts``: tries an entry gets alone before ``dead_letter(key, value, error)``
      receives it (``value`` is ``DELETED`` for a delete). Without a handler, dead letters are
      logged.
    """

    def __init__(
        self,
        cache: CacheBackend,
        database: Database,
        *,
        batch_size: int = 100,
        flush_interval: float = 0.05,
        max_pending: int = 10_000,
        on_full: Literal["block", "raise"] = "block",
        full_timeout: float | None = None,
        batch_retries: int = 3,
        max_attempts: int = 5,
        retry_backoff: tuple[float, float] = (0.01, 1.0),
        dead_letter: Callable[[Key, Any, BaseException], object] | None = None,
        close_at_exit: bool = True,
    ) -> None:
        check_backends(cache, database)
        _whole("batch_size", batch_size, 1)
        _whole("max_pending", max_pending, 1)
        _whole("batch_retries", batch_retries, 0)
        _whole("max_attempts", max_attempts, 1)
        _seconds("flush_interval", flush_interval)
        if full_timeout is not None:
            _seconds("full_timeout", full_timeout)
        if on_full not in ("block", "raise"):
            raise ValueError(f"on_full must be 'block' or 'raise' (got {on_full!r}).")
        first, longest = retry_backoff
        if not 0 <= first <= longest < math.inf:
            raise ValueError(
                "retry_backoff must be (first, longest) delays with 0 <= first <= longest "
                f"(got {retry_backoff!r})."
            )
        if dead_letter is not None and not callable(dead_letter):
            raise TypeError(f"dead_letter must be callable (got {dead_letter!r}).")
        self.cache = cache
        self.database = database
        self.batch_size = batch_size
        self.flush_interval = float(flush_interval)
        self._block = on_full == "block"
        self._full_timeout = full_timeout
        self._batch_retries = batch_retries
        self._backoff = (float(first), float(longest))
        self._dead_letter = dead_letter
        self.queue = WriteQueue(max_pending, max_attempts=max_attempts)
        self._local = cache if isinstance(cache, LocalCache) else None
        if self._local is not None:
            # `set` becomes one call into Rust that queues the write and fills the cache.
            self.__dict__["set"] = self.queue.cached_writer(
                self._local, block=self._block, timeout=self._full_timeout
            ).set
        # A cache may say what it would refuse before the write is queued (RedisCache does).
        self._check: Callable[[Key, Any], object] | None = getattr(cache, "check", None)
        self.dead_letters = 0
        self._finishing: set[asyncio.Future[None]] = set()
        self._stopping = threading.Event()
        self._flusher = threading.Thread(
            target=self._run, name="buttress-write-behind", daemon=True
        )
        self._flusher.start()
        if close_at_exit:
            reference = weakref.ref(self)
            atexit.register(_close_at_exit, reference)

    # -- the cache's face ----------------------------------------------------------------------

    def set(self, key: Key, value: Any) -> None:
        """Writes ``value`` to the cache now and queues it for the database. Raises only when
        the write is refused (the queue is full or closed, or the cache's ``check`` refuses
        the key or value); a cache that fails once the write is queued is logged, and its
        entry dropped, and the write stands."""
        # With a LocalCache, the instance's `set` is the queue's cached writer (set in
        # __init__), which queues and caches in one call; this is every other cache's path.
        if self._check is not None:
            self._check(key, value)
        self.queue.put(key, value, block=self._block, timeout=self._full_timeout)
        self._follow(key, value, False)

    def delete(self, key: Key) -> None:
        """Removes ``key`` from the cache now and queues its deletion."""
        self.queue.delete(key, block=self._block, timeout=self._full_timeout)
        self._follow(key, None, True)

    def get(self, key: Key, default: Any = None) -> Any:
        """The newest value: a pending write first (the cache may have dropped it), then the
        cache, then the database (which then fills the cache)."""
        since = self.queue.writes_to(key)
        pending = self.queue.read(key)
        if pending is not None:
            value, deleted = pending
            return default if deleted else value
        writes = functools.partial(self.queue.writes_to, key)
        return read_through(self.cache, self.database, key, default, None, writes, since)

    async def set_async(self, key: Key, value: Any) -> None:
        """``set`` from a coroutine. A full queue is waited on without blocking the loop (and
        a task cancelled while it waits queues nothing); once the write is queued, the cache
        is brought up to date even if the task is cancelled."""
        if self._local is not None:
            await self._enqueue_async(self.queue.put_cached, key, value, self._local)
            return
        if self._check is not None:
            self._check(key, value)
        await self._enqueue_async(self.queue.put, key, value)
        await self._finish(key, self._follow_async(key, value, False))

    async def delete_async(self, key: Key) -> None:
        """``delete`` from a coroutine, waiting and finishing as ``set_async`` does."""
        await self._enqueue_async(self.queue.delete, key)
        await self._finish(key, self._follow_async(key, None, True))

    async def get_async(self, key: Key, default: Any = None) -> Any:
        """``get`` from a coroutine."""
        since = self.queue.writes_to(key)
        pending = self.queue.read(key)
        if pending is not None:
            value, deleted = pending
            return default if deleted else value
        writes = functools.partial(self.queue.writes_to, key)
        return await read_through_async(
            self.cache, self.database, key, default, None, writes, since
        )

    def _follow(self, key: Key, value: Any, deleted: bool) -> None:
        """Brings the cache up to date with a write just queued."""
        try:
            if deleted:
                self.cache.delete(key)
            else:
                self.cache.set(key, value)
                if self._overtaken(key, value):
                    self.cache.delete(key)
        except Exception:
            self._log_cache_failure(key)
            with contextlib.suppress(Exception):
                self.cache.delete(key)

    async def _follow_async(self, key: Key, value: Any, deleted: bool) -> None:
        """``_follow`` from a coroutine."""
        try:
            if deleted:
                await call(self.cache, "delete", key)
            else:
                await call(self.cache, "set", key, value)
                if self._overtaken(key, value):
                    await call(self.cache, "delete", key)
        except Exception:
            self._log_cache_failure(key)
            with contextlib.suppress(Exception):
                await call(self.cache, "delete", key)

    async def _finish(self, key: Key, work: Coroutine[Any, Any, None]) -> None:
        # The write is queued, so the cache must follow it even if the caller is cancelled now.
        try:
            await run_to_end(work, self._finishing)
        except asyncio.CancelledError:
            # The cache step goes on, but may hang; the entry is dropped too, so that reads
            # find the old value neither way (whichever lands last, neither is stale).
            drop = asyncio.ensure_future(self._follow_async(key, None, True))
            self._finishing.add(drop)
            drop.add_done_callback(self._finishing.discard)
            raise

    @staticmethod
    def _log_cache_failure(key: Key) -> None:
        # The write is queued and will reach the database, so it stands and the caller is not
        # told it failed; the entry is dropped (if the cache answers) so no read gets the old
        # value from it.
        logger.warning(
            "The cache failed on %r after its write was queued; the write stands and the "
            "entry is dropped from the cache.",
            key,
            exc_info=True,
        )

    def _overtaken(self, key: Key, value: Any) -> bool:
        # Two writers of one key can queue in one order and fill the cache in the other; the
        # one whose value is no longer the newest pending write drops the cache entry it just
        # wrote, so the cache never keeps a value the database will not end up with. (A
        # LocalCache is filled in the same call as the queue, which cannot be overtaken.)
        pending = self.queue.read(key)
        return pending is None or pending[1] or pending[0] is not value

    async def _enqueue_async(self, enqueue: Callable[..., None], *args: Any) -> None:
        # A full queue is polled with a growing pause rather than waited on in a thread, so a
        # cancelled caller leaves nothing behind that could still queue its write.
        deadline = None if self._full_timeout is None else time.monotonic() + self._full_timeout
        pause = _FIRST_POLL
        while True:
            try:
                enqueue(*args)
                return
            except WriteQueueFullError:
                if not self._block:
                    raise
                if deadline is None:
                    await asyncio.sleep(pause)
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, _LONGEST_POLL)

    # -- draining ------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued write is in the database (or dead-lettered); False if
        ``timeout`` seconds pass first."""
        return self.queue.wait_idle(1e9 if timeout is None else timeout)

    def close(self, timeout: float | None = 10.0) -> list[tuple[Key, Any]]:
        """Refuses new writes, writes what is queued (up to ``timeout`` seconds), stops the
        flusher, and returns the writes it could not get to the database (``DELETED`` for
        deletes): empty after a clean shutdown."""
        self.queue.close()
        self.flush(timeout)
        self._stopping.set()
        self._flusher.join(10.0)
        return [
            (key, DELETED if deleted else value) for key, value, deleted in self.queue.unsettled()
        ]

    async def flush_async(self, timeout: float | None = None) -> bool:
        """``flush`` from a coroutine (the wait runs in a worker thread)."""
        return await asyncio.to_thread(self.flush, timeout)

    async def close_async(self, timeout: float | None = 10.0) -> list[tuple[Key, Any]]:
        """``close`` from a coroutine (the wait runs in a worker thread)."""
        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc_info: object) -> None:
        _log_unwritten(self.close())

    async def __aenter__(self) -> WriteBehind:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        _log_unwritten(await self.close_async())

    def stats(self) -> dict[str, int]:
        """The queue's counters, and dead letters handed over."""
        return {**self.queue.stats(), "dead_letters": self.dead_letters}

    # -- the flusher ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            batch = self.queue.take(self.batch_size, _IDLE_WAKE, linger=self.flush_interval)
            if not batch:
                if self.queue.closed and self.queue.stats()["depth"] == 0:
                    return
                continue
            try:
                self._write(batch, True)
            except BaseException:  # pragma: no cover - a bug here must not kill the flusher
                logger.exception("The write-behind flusher failed; it goes on.")

    def _write(self, batch: list[tuple[Any, Any, int, bool]], retry: bool) -> None:
        """Writes ``(key, value, attempts, deleted)`` items as one transaction."""
        items = [(key, value, deleted) for key, value, _, deleted in batch]
        tries = 1 + (self._batch_retries if retry else 0)
        error: BaseException | None = None
        for attempt in range(tries):
            try:
                self.database.write_batch(items)
            except Exception as failure:
                error = failure
                if attempt + 1 < tries:
                    self._pause(attempt)
                continue
            self.queue.done([key for key, _, _ in items])
            return
        assert error is not None
        if len(batch) > 1:
            # Split to find the entries at fault; the halves that succeed are settled.
            middle = len(batch) // 2
            self._write(batch[:middle], False)
            self._write(batch[middle:], False)
            return
        key, _, attempts, _ = batch[0]
        outcome = self.queue.failed(key)
        if outcome is None:
            return
        verdict, dead_value, dead_deleted = outcome
        if verdict == "dead":
            self.dead_letters += 1
            self._hand_over(key, DELETED if dead_deleted else dead_value, error)
        elif verdict == "retried":
            # The entry is first in line again; give the database a moment first.
            self._pause(attempts)

    def _hand_over(self, key: Key, value: Any, error: BaseException) -> None:
        if self._dead_letter is None:
            logger.error("Write of %r dead-lettered after retries: %s", key, error)
            return
        try:
            self._dead_letter(key, value, error)
        except Exception:
            logger.exception("The dead-letter handler failed for %r.", key)

    def _pause(self, attempt: int) -> None:
        first, longest = self._backoff
        self._stopping.wait(min(longest, first * 2**attempt))


def check_backends(cache: object, database: object) -> None:
    """Refuses a cache or a database without the methods the caching services call."""
    if not isinstance(cache, CacheBackend):
        raise TypeError(f"cache must have get, set and delete (got {type(cache).__name__}).")
    if not isinstance(database, Database):
        raise TypeError(f"database must have write_batch and get (got {type(database).__name__}).")


async def call(backend: object, name: str, *args: Any, **kwargs: Any) -> Any:
    """``backend.<name>(...)`` from a coroutine: its ``<name>_async`` twin awaited when it has
    one, called directly when the backend says ``blocking = False``, else in a worker thread
    (so a blocking client never stalls the event loop)."""
    twin = getattr(backend, f"{name}_async", None)
    if twin is not None:
        return await twin(*args, **kwargs)
    method = getattr(backend, name)
    if getattr(backend, "blocking", True) is False:
        return method(*args, **kwargs)
    return await asyncio.to_thread(method, *args, **kwargs)


async def run_to_end(work: Coroutine[Any, Any, T], running: set[asyncio.Future[Any]]) -> T:
    """Awaits ``work`` as a task of its own that a cancelled caller does not stop: a write
    whose database or queue step may already have happened must bring the cache up to date
    whatever becomes of the caller. ``running`` keeps the task alive until it ends."""
    task = asyncio.ensure_future(work)
    running.add(task)
    task.add_done_callback(running.discard)
    return await asyncio.shield(task)


def _ttl_keyword(ttl: float | None) -> dict[str, float]:
    # Caches that take no ttl are passed none, so any CacheBackend works when none is set.
    return {} if ttl is None else {"ttl": ttl}


def fill(cache: CacheBackend, key: Key, value: Any, ttl: float | None) -> None:
    """Caches ``value``, with ``ttl`` when one is configured."""
    cache.set(key, value, **_ttl_keyword(ttl))


async def fill_async(cache: CacheBackend, key: Key, value: Any, ttl: float | None) -> None:
    """``fill`` from a coroutine."""
    await call(cache, "set", key, value, **_ttl_keyword(ttl))


def fill_after_read(cache: CacheBackend, key: Key, value: Any, ttl: float | None) -> None:
    """``fill`` for a value just read from the database: the read has its answer either way,
    so a cache that fails (or refuses the value) is logged rather than failing the read."""
    try:
        fill(cache, key, value, ttl)
    except Exception:
        _log_fill_failure(key)


async def fill_after_read_async(
    cache: CacheBackend, key: Key, value: Any, ttl: float | None
) -> None:
    """``fill_after_read`` from a coroutine."""
    try:
        await fill_async(cache, key, value, ttl)
    except Exception:
        _log_fill_failure(key)


def _log_fill_failure(key: Key) -> None:
    logger.warning(
        "The cache failed to take %r read from the database; the read goes on without it.",
        key,
        exc_info=True,
    )


def read_through(
    cache: CacheBackend,
    database: Database,
    key: Key,
    default: Any,
    ttl: float | None,
    writes: Callable[[], object] | None = None,
    since: object = None,
) -> Any:
    """The cached value, else the database's (which then fills the cache), else ``default``.

    ``writes()`` tells writes apart (a count, or a token): when it no longer equals ``since``
    (taken before the read began) after the fill, a write came meanwhile, and the value just
    cached may be older than it, so the entry is dropped again."""
    value = cache.get(key, MISSING)
    if value is not MISSING:
        return value
    value = database.get(key, MISSING)
    if value is MISSING:
        return default
    fill_after_read(cache, key, value, ttl)
    if writes is not None and writes() != since:
        with contextlib.suppress(Exception):
            cache.delete(key)
    return value


async def read_through_async(
    cache: CacheBackend,
    database: Database,
    key: Key,
    default: Any,
    ttl: float | None,
    writes: Callable[[], object] | None = None,
    since: object = None,
) -> Any:
    """``read_through`` from a coroutine."""
    value = await call(cache, "get", key, MISSING)
    if value is not MISSING:
        return value
    value = await call(database, "get", key, MISSING)
    if value is MISSING:
        return default
    await fill_after_read_async(cache, key, value, ttl)
    if writes is not None and writes() != since:
        with contextlib.suppress(Exception):
            await call(cache, "delete", key)
    return value


def _log_unwritten(left: list[tuple[Key, Any]]) -> None:
    if left:
        logger.error("Write-behind closed with %d writes not written.", len(left))


def _close_at_exit(reference: weakref.ref[WriteBehind]) -> None:
    store = reference()
    if store is not None and not store.queue.closed:
        left = store.close()
        if left:
            logger.error("At exit, %d write-behind writes could not be written.", len(left))


def _whole(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a whole number (got {value!r}).")
    if value < low:
        raise ValueError(f"{name} must be {low} or more (got {value}).")


def _seconds(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds (got {value!r}).")
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds from 0 (got {value!r}).")
