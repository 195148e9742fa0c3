"""Connection pool: a Rust core that lends whatever a factory makes, with asyncio twins.

The core (``buttress._core.ConnectionPool``) does checkout and checkin in one call each and
keeps the GIL unless the caller must wait. This module adds what needs Python: the housekeeper
thread (lifetimes, idle limit, ``min_size`` refill, leak reports), the asyncio waits, and the
log records for problems that must not reach the caller.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from buttress import _core
from buttress._waiting import await_turn, resolve
from buttress.errors import PoolTimeoutError

__all__ = ["ConnectionPool", "PoolLease", "PoolStats"]

C = TypeVar("C")

logger = logging.getLogger("buttress.pool")

PoolStats = _core.PoolStats
PoolLease = _core.PoolLease

# The longest the housekeeper sleeps between rounds, so it notices a dropped pool promptly.
_HOUSEKEEPING_MAX_SLEEP = 1.0
# Backoff between failed attempts to refill min_size while the database is unreachable.
_REFILL_BACKOFF_START = 0.1
_REFILL_BACKOFF_MAX = 10.0

_PROBLEMS = {
    "check": "a connection failed its check on checkout, so it was closed and replaced",
    "reset": "resetting a returned connection failed, so it was closed",
    "close": "closing a connection failed",
    "is_broken": "is_broken raised, so the connection was treated as broken",
    "create": "creating a connection in the background failed; it will be retried",
}


def _report_problem(event: str, pool: str, connection: object, error: BaseException) -> None:
    """Logs a problem the pool handled itself (called by the Rust core)."""
    logger.warning(
        "Pool %r: %s (connection %r).",
        pool,
        _PROBLEMS.get(event, event),
        connection,
        exc_info=error,
    )


def _report_leak(
    pool: str, connection: object, held: float, stack: traceback.StackSummary | None
) -> None:
    """Logs a connection held past the leak threshold, with where it was taken."""
    where = "".join(stack.format()) if stack is not None else "  (the stack was not captured)\n"
    logger.warning(
        "Pool %r: connection %r has been checked out for %.3f seconds and may have leaked; "
        "return it with `with pool.connection()` or release(). It was taken at:\n%s",
        pool,
        connection,
        held,
        where,
    )


def _capture_stack() -> traceback.StackSummary:
    """Where the caller checked out a connection (leak detection only). Source lines are read
    when a leak is reported, not now."""
    summary = traceback.StackSummary.extract(
        traceback.walk_stack(sys._getframe(1)), lookup_lines=False
    )
    summary.reverse()
    return summary


async def _checkout_async(pool: _core.ConnectionPool[Any], wait: float | None) -> tuple[Any, int]:
    """Checks out without blocking the loop: a free connection at once, else a place in the
    pool's FIFO queue for at most ``wait`` seconds (None: as long as it takes)."""
    loop = asyncio.get_running_loop()
    granted: asyncio.Future[None] = loop.create_future()
    got = pool._enqueue(functools.partial(loop.call_soon_threadsafe, resolve, granted), wait != 0)
    if isinstance(got, tuple):
        return got
    waiter = got

    def leave(timed_out: bool) -> bool:
        return pool._leave(waiter, timed_out)

    if not await await_turn(granted, wait, leave):
        raise PoolTimeoutError(pool.name, wait)
    return pool._claim(waiter)


async def _lease_aenter(lease: _core.PoolLease[Any]) -> Any:
    """``async with pool.connection()``: the asynchronous entry of a lease."""
    pool = lease.pool
    conn, lease_id = await _checkout_async(pool, lease.timeout)
    try:
        lease._hold(conn, lease_id)
    except BaseException:
        pool._give_back(conn, lease_id)
        raise
    return conn


async def _lease_aexit(
    lease: _core.PoolLease[Any],
    exc_type: type[BaseException] | None,
    exc_value: BaseException | None,
    traceback: TracebackType | None,
) -> bool:
    """Returning needs no waiting, so the asynchronous exit is the synchronous one."""
    return lease.__exit__(exc_type, exc_value, traceback)


class _Housekeeper:
    """A daemon thread per pool that closes expired and surplus idle connections, refills
    ``min_size`` and reports leaks. It holds the pool only weakly between rounds."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self._pool = weakref.ref(pool)
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"buttress-pool-{pool.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def _run(self) -> None:
        backoff = _REFILL_BACKOFF_START
        while not self._stopped.is_set():
            pool = self._pool()
            if pool is None or pool.closed:
                return
            failures = pool.stats().create_failures
            try:
                delay = pool._housekeep()
            except Exception:
                logger.exception("Pool %r: housekeeping failed; it will run again.", pool.name)
                delay = _HOUSEKEEPING_MAX_SLEEP
            if pool.stats().create_failures > failures:
                # The database is unreachable: retry the refill with growing pauses.
                del pool
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, _REFILL_BACKOFF_MAX)
                continue
            backoff = _REFILL_BACKOFF_START
            sleep = _HOUSEKEEPING_MAX_SLEEP if delay is None else delay
            pool._wait_for_attention(min(max(sleep, 0.001), _HOUSEKEEPING_MAX_SLEEP))
            del pool


class ConnectionPool(_core.ConnectionPool[C]):
    """A pool of connections made by ``create``: psycopg or sqlite3 connections, sockets,
    clients — anything.

    Callers wait first come, first served, at most ``max_waiting`` of them (0: no bound), each
    for at most ``timeout`` seconds (None: as long as it takes). Idle connections are reused
    newest first. ``check(conn)`` (raise or return False when dead) runs on checkout unless the
    connection was used within ``check_interval`` seconds or its last borrower's block raised;
    ``reset(conn)`` runs on return (say, a rollback); a connection that fails either is closed
    and replaced. ``is_broken(conn, error)`` decides whether an error raised inside a
    ``with pool.connection()`` block broke the connection. ``close(conn)`` defaults to the
    connection's own ``close()`` method.

    Connections older than ``max_lifetime`` (shortened at random by up to ``lifetime_jitter``
    so they don't all expire together) are closed when idle or returned; idle ones unused for
    ``max_idle`` are closed while the pool is above ``min_size``, and ``min_size`` is refilled
    in the background. A connection held longer than ``leak_threshold`` seconds is logged on
    the ``buttress.pool`` logger with the stack where it was taken.

    >>> import sqlite3
    >>> pool = ConnectionPool(lambda: sqlite3.connect(":memory:"), max_size=4)
    >>> with pool.connection() as conn:
    ...     conn.execute("select 1 + 1").fetchone()
    (2,)
    >>> pool.stats().idle
    1
    >>> pool.close()
    True
    """

    __slots__ = ("_housekeeper",)

    def __init__(
        self,
        create: Callable[[], C],
        *,
        close: Callable[[C], object] | None = None,
        check: Callable[[C], object] | None = None,
        reset: Callable[[C], object] | None = None,
        is_broken: Callable[[C, BaseException], object] | None = None,
        name: str = "pool",
        min_size: int = 0,
        max_size: int = 10,
        timeout: float | None = 30.0,
        max_waiting: int = 0,
        max_lifetime: float | None = None,
        lifetime_jitter: float = 0.1,
        max_idle: float | None = None,
        check_interval: float = 0.5,
        leak_threshold: float | None = None,
        clock: _core.ManualClock | None = None,
    ) -> None:
        # The Rust __new__ has taken and checked every argument.
        self._housekeeper: _Housekeeper | None = None
        self._ensure_housekeeper()

    def _ensure_housekeeper(self) -> None:
        running = self._housekeeper is not None and self._housekeeper.alive
        if self._needs_housekeeping and not self.closed and not running:
            self._housekeeper = _Housekeeper(self)

    def maintain(self) -> None:
        """Runs one round of housekeeping now: closes idle connections past ``max_lifetime`` or
        ``max_idle``, reports leaks, and creates connections up to ``min_size``. The
        background thread does this on its own; this is for tests and manual clocks."""
        self._housekeep()

    def resize(self, min_size: int | None = None, max_size: int | None = None) -> None:
        """Changes the sizes. Idle connections past the new ``max_size`` close at once,
        borrowed ones when they come back; new room goes to waiters first."""
        super().resize(min_size, max_size)
        self._ensure_housekeeper()

    def close(self, timeout: float | None = 5.0) -> bool:
        """Closes the pool: idle connections at once, borrowed ones as they come back, and
        waiters fail with ``PoolClosedError``. Waits up to ``timeout`` seconds for borrowed
        connections to come back and returns whether all did. Closing twice is harmless."""
        if self._housekeeper is not None:
            self._housekeeper.stop()
        return super().close(timeout)

    async def acquire_async(self, timeout: float | None = None) -> C:
        """Checks out a connection without blocking the event loop, waiting up to ``timeout``
        seconds (default: the pool's). Return it with ``release(conn)``.

        ``create``, ``check`` and ``reset`` still run inline: for drivers with an asyncio API,
        keep them cheap or use a thread-safe driver."""
        wait = self.timeout if timeout is None else timeout
        conn, _ = await _checkout_async(self, wait)
        return conn  # type: ignore[no-any-return]

    async def close_async(self, timeout: float | None = 5.0) -> bool:
        """``close()`` without blocking the event loop while borrowed connections come back."""
        if self._housekeeper is not None:
            self._housekeeper.stop()
        drained = super().close(0)
        if drained or timeout == 0:
            return drained
        return await asyncio.to_thread(super().close, timeout)

    async def __aenter__(self) -> ConnectionPool[C]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        await self.close_async()
        return False
