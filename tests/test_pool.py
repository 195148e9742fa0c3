"""Behaviour of the connection pool: checkout and return, checks, resets, lifetimes, idle
limits, leaks, resizing and closing.

Timing runs on a ManualClock with housekeeping driven by ``pool.maintain()``; the pool's own
housekeeper thread may run the same round at any moment, so every assertion holds whichever of
the two did the work. Real waits are short and end by polling against a generous deadline.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from buttress import (
    ButtressError,
    ConnectionPool,
    ManualClock,
    PoolClosedError,
    PoolError,
    PoolFullError,
    PoolLease,
    PoolStats,
    PoolTimeoutError,
)
from support import FakeConnection as Conn
from support import background, wait_until
from support import check_connection as check

JOIN = 5.0
LOGGER = "buttress.pool"


class Boom(Exception):
    """The failure the tests raise inside `with pool.connection()` blocks."""


class Interrupt(BaseException):
    """Not an Exception, like KeyboardInterrupt: the pool must let it through."""


class Factory:
    """Makes Conns and keeps every one it made; `fail_with` makes the next call raise."""

    def __init__(self) -> None:
        self.made: list[Conn] = []
        self.fail_with: BaseException | None = None
        self.lock = threading.Lock()

    def __call__(self) -> Conn:
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        conn = Conn()
        with self.lock:
            self.made.append(conn)
        return conn


def reset(conn: Conn) -> None:
    conn.resets += 1


@pytest.fixture
def factory() -> Factory:
    return Factory()


@pytest.fixture
def make_pool(factory: Factory) -> Iterator[Callable[..., ConnectionPool[Conn]]]:
    """Builds pools on `factory` (unless told another `create`) and closes them after the test."""
    pools: list[ConnectionPool[Conn]] = []

    def make(create: Callable[[], Conn] | None = None, **options: Any) -> ConnectionPool[Conn]:
        pool = ConnectionPool(factory if create is None else create, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(timeout=0)


def sizes(pool: ConnectionPool[Any]) -> tuple[int, int, int, int]:
    stats = pool.stats()
    return stats.size, stats.idle, stats.in_use, stats.waiting


def pool_records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        record for record in caplog.records if record.name == LOGGER and text in record.getMessage()
    ]


# ---- construction ------------------------------------------------------------------------


def test_defaults_and_properties(make_pool: Callable[..., ConnectionPool[Conn]]) -> None:
    pool = make_pool()
    assert (pool.name, pool.min_size, pool.max_size, pool.max_waiting) == ("pool", 0, 10, 0)
    assert pool.timeout == 30.0
    assert pool.leak_threshold is None
    assert pool.clock is None
    assert not pool.closed
    stats = pool.stats()
    assert isinstance(stats, PoolStats)
    assert (stats.min_size, stats.max_size) == (0, 10)
    counts = [
        stats.size,
        stats.idle,
        stats.in_use,
        stats.waiting,
        stats.requests,
        stats.created,
        stats.closed,
        stats.broken,
        stats.create_failures,
        stats.timeouts,
        stats.rejected,
        stats.waits,
        stats.leaks,
    ]
    assert counts == [0] * 13
    assert (stats.total_wait, stats.max_wait) == (0.0, 0.0)
    assert repr(pool) == (
        "ConnectionPool(name='pool', size=0, idle=0, in_use=0, waiting=0, max_size=10)"
    )


def test_custom_settings_are_kept(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(
        name="db",
        max_size=3,
        timeout=None,
        max_waiting=7,
        leak_threshold=2.5,
        clock=clock,
    )
    assert (pool.name, pool.max_size, pool.max_waiting) == ("db", 3, 7)
    assert pool.timeout is None
    assert pool.leak_threshold == 2.5
    assert pool.clock is clock
    lease = pool.connection(timeout=1.5)
    assert isinstance(lease, PoolLease)
    assert lease.pool is pool
    assert lease.timeout == 1.5
    assert pool.connection().timeout is None  # the pool's default


BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"max_size": 0}, ValueError, "max_size"),
    ({"max_size": -1}, ValueError, "max_size"),
    ({"max_size": "3"}, TypeError, "max_size"),
    ({"min_size": 3, "max_size": 2}, ValueError, "min_size"),
    ({"min_size": -1}, ValueError, "min_size"),
    ({"timeout": -1.0}, ValueError, "timeout"),
    ({"timeout": "soon"}, TypeError, "timeout"),
    ({"max_waiting": -1}, ValueError, "max_waiting"),
    ({"max_lifetime": 0}, ValueError, "max_lifetime"),
    ({"max_lifetime": -5.0}, ValueError, "max_lifetime"),
    ({"lifetime_jitter": 1.0}, ValueError, "lifetime_jitter"),
    ({"lifetime_jitter": -0.1}, ValueError, "lifetime_jitter"),
    ({"max_idle": 0}, ValueError, "max_idle"),
    ({"check_interval": -1.0}, ValueError, "check_interval"),
    ({"leak_threshold": 0}, ValueError, "leak_threshold"),
    ({"name": 5}, TypeError, "name"),
    ({"clock": 0.0}, TypeError, "clock"),
    ({"close": "close"}, TypeError, "close"),
    ({"check": 1}, TypeError, "check"),
    ({"reset": object()}, TypeError, "reset"),
    ({"is_broken": True}, TypeError, "is_broken"),
]


@pytest.mark.parametrize(
    ("options", "error", "argument"), BAD_ARGUMENTS, ids=[case[2] for case in BAD_ARGUMENTS]
)
def test_bad_constructor_arguments_name_the_argument(
    factory: Factory, options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error, match=argument):
        ConnectionPool(factory, **options)


def test_create_must_be_callable() -> None:
    with pytest.raises(TypeError, match="create"):
        ConnectionPool("not callable")  # type: ignore[arg-type]


def test_bad_call_arguments_name_the_argument_and_change_nothing(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=2)
    held = pool.acquire()
    before = sizes(pool)
    with pytest.raises(ValueError, match="timeout"):
        pool.acquire(timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        pool.connection(timeout=-0.5)
    with pytest.raises(ValueError, match="min_size"):
        pool.resize(min_size=3)
    with pytest.raises(ValueError, match="max_size"):
        pool.resize(max_size=0)
    with pytest.raises(TypeError, match="max_size"):
        pool.resize(max_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        pool.close(timeout=-1)
    assert not pool.closed
    assert sizes(pool) == before
    assert (pool.min_size, pool.max_size) == (0, 2)
    pool.release(held)


def test_pool_errors_share_one_hierarchy() -> None:
    for error in (PoolTimeoutError, PoolFullError, PoolClosedError):
        assert issubclass(error, PoolError)
        assert issubclass(error, ButtressError)
    assert str(PoolClosedError("db")) == "Pool 'db' is closed; it lends no more connections."


# ---- checkout and return -----------------------------------------------------------------


def test_connections_are_created_on_demand_and_reused(
    make_pool: Callable[..., ConnectionPool[Conn]], factory: Factory
) -> None:
    pool = make_pool(max_size=2)
    assert factory.made == []  # nothing is opened up front with min_size 0
    first = pool.acquire()
    assert factory.made == [first]
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(first)
    assert sizes(pool) == (1, 1, 0, 0)
    assert pool.acquire() is first
    pool.release(first)
    stats = pool.stats()
    assert (stats.requests, stats.created, stats.closed) == (2, 1, 0)
    assert first.closes == 0


def test_idle_connections_are_reused_newest_first(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=3)
    a, b, c = (pool.acquire() for _ in range(3))
    for conn in (a, c, b):
        pool.release(conn)
    assert [pool.acquire() for _ in range(3)] == [b, c, a]


def test_with_connection_returns_the_connection_on_exit_and_on_error(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        assert isinstance(conn, Conn)
        assert sizes(pool) == (1, 0, 1, 0)
    assert sizes(pool) == (1, 1, 0, 0)
    error = Boom()
    with pytest.raises(Boom) as caught, pool.connection() as again:
        raise error
    assert caught.value is error
    assert again is conn
    assert sizes(pool) == (1, 1, 0, 0)  # kept: nothing says it is broken
    assert conn.closes == 0


def test_full_pool_refuses_at_once_with_timeout_zero(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(name="db", max_size=1)
    held = pool.acquire()
    with pytest.raises(PoolTimeoutError) as caught:
        pool.acquire(timeout=0)
    assert (caught.value.name, caught.value.timeout) == ("db", 0.0)
    assert "could not wait" in str(caught.value)
    with pytest.raises(PoolTimeoutError), pool.connection(timeout=0):
        pass  # never entered
    stats = pool.stats()
    assert (stats.timeouts, stats.requests, stats.waits, stats.waiting) == (2, 3, 0, 0)
    pool.release(held)


def test_full_pool_times_out_after_the_wait_and_leaves_no_waiter(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(name="db", max_size=1, timeout=0.05)
    held = pool.acquire()
    with pytest.raises(PoolTimeoutError) as caught:
        pool.acquire()  # the pool's default
    assert (caught.value.name, caught.value.timeout) == ("db", 0.05)
    assert "0.050 seconds" in str(caught.value)
    with pytest.raises(PoolTimeoutError) as caught:
        pool.acquire(timeout=0.02)
    assert caught.value.timeout == 0.02
    stats = pool.stats()
    assert (stats.timeouts, stats.waiting) == (2, 0)
    pool.release(held)
    assert pool.acquire(timeout=0) is held


def test_a_returned_connection_goes_to_a_waiting_thread(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(max_size=1, timeout=JOIN, clock=clock)
    held = pool.acquire()
    got: list[Conn] = []
    with background(lambda: got.append(pool.acquire())):
        wait_until(lambda: pool.stats().waiting == 1)
        clock.advance(2.5)  # waits are measured on the pool's clock
        pool.release(held)
    assert got == [held]
    stats = pool.stats()
    assert (stats.size, stats.in_use, stats.waiting, stats.waits) == (1, 1, 0, 1)
    assert (stats.total_wait, stats.max_wait) == (2.5, 2.5)
    pool.release(held)


def test_max_waiting_refuses_the_next_waiter_at_once(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(name="db", max_size=1, max_waiting=1, timeout=JOIN)
    held = pool.acquire()
    got: list[Conn] = []
    with background(lambda: got.append(pool.acquire())):
        wait_until(lambda: pool.stats().waiting == 1)
        with pytest.raises(PoolFullError) as caught:
            pool.acquire()
        assert (caught.value.name, caught.value.max_waiting) == ("db", 1)
        assert "max_waiting" in str(caught.value)
        pool.release(held)
    assert got == [held]
    stats = pool.stats()
    assert (stats.rejected, stats.timeouts) == (1, 0)
    pool.release(held)


def test_returning_twice_or_a_foreign_object_raises_value_error_naming_conn(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(name="db", max_size=2)
    conn = pool.acquire()
    other = pool.acquire()
    pool.release(conn)
    before = pool.stats()
    with pytest.raises(ValueError, match=r"^conn was already returned to pool 'db'"):
        pool.release(conn)
    with pytest.raises(ValueError, match=r"^conn is not checked out from pool 'db'"):
        pool.release(Conn())
    with pytest.raises(ValueError, match="conn"):
        pool.release(conn, broken=True)
    after = pool.stats()
    assert (after.size, after.idle, after.in_use, after.broken, after.closed) == (
        before.size,
        before.idle,
        before.in_use,
        before.broken,
        before.closed,
    )
    assert conn.closes == 0
    pool.release(other)


def test_releasing_broken_closes_the_connection_and_frees_its_slot(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=1)
    conn = pool.acquire()
    pool.release(conn, broken=True)
    assert conn.closes == 1
    assert sizes(pool) == (0, 0, 0, 0)
    replacement = pool.acquire(timeout=0)
    assert replacement is not conn
    stats = pool.stats()
    assert (stats.created, stats.closed, stats.broken) == (2, 1, 1)
    pool.release(replacement)


def test_a_broken_release_lets_a_waiting_thread_create_a_connection(
    make_pool: Callable[..., ConnectionPool[Conn]], factory: Factory
) -> None:
    pool = make_pool(max_size=1, timeout=JOIN)
    held = pool.acquire()
    got: list[Conn] = []
    with background(lambda: got.append(pool.acquire())):
        wait_until(lambda: pool.stats().waiting == 1)
        pool.release(held, broken=True)
    assert got == [factory.made[1]]
    assert held.closes == 1
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(got[0])


# ---- create and close --------------------------------------------------------------------


def test_a_failing_create_raises_to_the_caller_and_frees_the_slot(
    make_pool: Callable[..., ConnectionPool[Conn]], factory: Factory
) -> None:
    pool = make_pool(max_size=1)
    error = ConnectionRefusedError("db down")
    factory.fail_with = error
    with pytest.raises(ConnectionRefusedError) as caught:
        pool.acquire()
    assert caught.value is error
    stats = pool.stats()
    assert (stats.size, stats.created, stats.create_failures) == (0, 0, 1)
    conn = pool.acquire(timeout=0)  # the slot is free again
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(conn)


def test_create_returning_none_raises_type_error_naming_create(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(lambda: None, max_size=1)
    for _ in range(2):  # the slot came back after the first refusal
        with pytest.raises(TypeError, match="create"):
            pool.acquire(timeout=0)
    stats = pool.stats()
    assert (stats.size, stats.created, stats.create_failures) == (0, 0, 2)


def test_create_returning_a_connection_the_pool_holds_is_refused(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    shared = Conn()
    pool = make_pool(lambda: shared, max_size=3)
    assert pool.acquire() is shared
    with pytest.raises(ValueError, match="create"):
        pool.acquire()  # would lend `shared` a second time
    assert shared.closes == 0  # still lent: it must not be closed
    stats = pool.stats()
    assert (stats.size, stats.in_use, stats.created, stats.create_failures) == (1, 1, 1, 1)
    pool.release(shared)
    assert pool.acquire() is shared  # from the idle stack, no create
    pool.release(shared)


def test_create_returning_a_connection_that_is_being_reset_is_refused(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    # A connection being reset on its way back is still the pool's (it counts towards size and
    # goes back to the idle stack next), so a factory handing it out again must be refused
    # like one handing out a borrowed or idle connection. Otherwise it ends up borrowed and
    # idle at once, and the next checkout lends it a second time.
    shared = Conn()
    resetting = threading.Event()
    finish_reset = threading.Event()

    def slow_reset(conn: Conn) -> None:
        resetting.set()
        assert finish_reset.wait(JOIN)

    pool = make_pool(lambda: shared, reset=slow_reset, max_size=3)
    assert pool.acquire() is shared
    with background(lambda: pool.release(shared)):
        assert resetting.wait(JOIN)
        try:
            with pytest.raises(ValueError, match="create"):
                pool.acquire(timeout=0)  # would lend `shared` while it is being reset
        finally:
            finish_reset.set()
    assert sizes(pool) == (1, 1, 0, 0)
    assert pool.acquire(timeout=0) is shared
    with pytest.raises(ValueError, match="create"):
        pool.acquire(timeout=0)  # `shared` is lent: never twice at once
    pool.release(shared)


def test_an_interrupt_in_create_propagates_and_frees_the_slot(
    make_pool: Callable[..., ConnectionPool[Conn]], factory: Factory
) -> None:
    pool = make_pool(max_size=1)
    factory.fail_with = Interrupt()
    with pytest.raises(Interrupt):
        pool.acquire()
    assert sizes(pool) == (0, 0, 0, 0)
    pool.release(pool.acquire(timeout=0))


def test_closing_uses_the_close_callable_instead_of_the_connection_method(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    closed: list[Conn] = []
    pool = make_pool(close=closed.append, max_size=1)
    conn = pool.acquire()
    pool.release(conn, broken=True)
    assert closed == [conn]
    assert conn.closes == 0


def test_objects_without_a_close_method_can_be_pooled(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool: ConnectionPool[Any] = make_pool(object, max_size=1)
    conn = pool.acquire()
    pool.release(conn, broken=True)
    assert pool.stats().closed == 1


def test_a_failing_close_is_logged_and_not_raised(
    make_pool: Callable[..., ConnectionPool[Conn]], caplog: pytest.LogCaptureFixture
) -> None:
    def close(conn: Conn) -> None:
        raise OSError("socket already gone")

    pool = make_pool(close=close, max_size=1)
    conn = pool.acquire()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pool.release(conn, broken=True)
    [record] = pool_records(caplog, "closing a connection failed")
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], OSError)
    assert sizes(pool) == (0, 0, 0, 0)


def test_an_interrupt_in_close_propagates_after_the_slot_is_freed(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    interrupts = [Interrupt()]

    def close(conn: Conn) -> None:
        if interrupts:
            raise interrupts.pop()

    pool = make_pool(close=close, max_size=1)
    conn = pool.acquire()
    with pytest.raises(Interrupt):
        pool.release(conn, broken=True)
    assert sizes(pool) == (0, 0, 0, 0)
    pool.release(pool.acquire(timeout=0))


# ---- check -------------------------------------------------------------------------------


def test_check_runs_only_when_the_connection_sat_idle_for_check_interval(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(check=check, check_interval=1.0, clock=clock)
    conn = pool.acquire()
    assert conn.checks == 0  # a new connection is not checked
    pool.release(conn)
    clock.advance(0.999)
    pool.release(pool.acquire())
    assert conn.checks == 0
    clock.advance(1.0)
    assert pool.acquire() is conn
    assert conn.checks == 1
    clock.advance(5.0)  # the interval counts from the return, not from the checkout
    pool.release(conn)
    pool.release(pool.acquire())
    assert conn.checks == 1


def test_check_interval_zero_checks_every_idle_checkout(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(check=check, check_interval=0, clock=clock)
    conn = pool.acquire()
    for _ in range(3):
        pool.release(conn)
        assert pool.acquire() is conn
    assert conn.checks == 3
    pool.release(conn)


@pytest.mark.parametrize("failure", ["returns False", "raises"])
def test_a_connection_failing_its_check_is_closed_and_replaced(
    make_pool: Callable[..., ConnectionPool[Conn]],
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    def checker(conn: Conn) -> bool:
        conn.checks += 1
        if not conn.alive and failure == "raises":
            raise ConnectionResetError("server closed the connection")
        return conn.alive

    pool = make_pool(check=checker, check_interval=0, max_size=2, clock=clock)
    older, newer = pool.acquire(), pool.acquire()
    pool.release(older)
    pool.release(newer)
    newer.alive = False
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert pool.acquire(timeout=0) is older  # the dead one was skipped
    assert (newer.checks, newer.closes, older.checks) == (1, 1, 1)
    older.alive = False
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pool.release(older)
        fresh = pool.acquire(timeout=0)  # no live idle one left: a new connection
    assert fresh not in (older, newer)
    assert older.closes == 1
    stats = pool.stats()
    assert (stats.size, stats.idle, stats.created, stats.closed, stats.broken) == (1, 0, 3, 2, 2)
    logged = pool_records(caplog, "failed its check")
    assert len(logged) == (2 if failure == "raises" else 0)  # only a raising check is logged
    pool.release(fresh)


def test_an_interrupt_in_check_propagates_after_the_connection_is_discarded(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    def interrupted_check(conn: Conn) -> bool:
        raise Interrupt

    pool = make_pool(check=interrupted_check, check_interval=0, max_size=1, clock=clock)
    conn = pool.acquire()
    pool.release(conn)
    with pytest.raises(Interrupt):
        pool.acquire()
    assert conn.closes == 1
    assert sizes(pool) == (0, 0, 0, 0)
    assert pool.stats().broken == 1


def test_a_check_returning_none_or_a_falsy_value_other_than_false_passes(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    verdicts: list[object] = [None, 0, "", False]

    def checker(conn: Conn) -> object:
        return verdicts.pop(0)

    pool = make_pool(check=checker, check_interval=0, clock=clock)
    conn = pool.acquire()
    for _ in range(3):
        pool.release(conn)
        assert pool.acquire() is conn
    pool.release(conn)
    replacement = pool.acquire()  # False: the only verdict that means dead
    assert replacement is not conn
    assert conn.closes == 1
    pool.release(replacement)


def test_an_error_in_the_block_has_the_connection_checked_before_its_next_use(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(check=check, check_interval=60.0, clock=clock)
    with pytest.raises(Boom), pool.connection() as conn:
        raise Boom
    with pool.connection() as again:
        assert again is conn
    assert conn.checks == 1  # within check_interval, but its last block raised
    with pool.connection():
        pass
    assert conn.checks == 1  # the clean block cleared the suspicion
    conn.alive = False
    with pytest.raises(Boom), pool.connection():
        raise Boom
    with pool.connection() as fresh:
        assert fresh is not conn
    assert (conn.checks, conn.closes) == (2, 1)


def test_a_connection_handed_to_a_waiter_after_an_error_is_checked_first(
    make_pool: Callable[..., ConnectionPool[Conn]], factory: Factory
) -> None:
    pool = make_pool(check=check, check_interval=60.0, max_size=1, timeout=JOIN)
    lease = pool.connection()
    conn = lease.__enter__()
    got: list[Conn] = []
    with background(lambda: got.append(pool.acquire())):
        wait_until(lambda: pool.stats().waiting == 1)
        conn.alive = False
        assert lease.__exit__(Boom, Boom(), None) is False
    assert got == [factory.made[1]]  # the dead one was checked, closed and replaced
    assert (conn.checks, conn.closes) == (1, 1)
    pool.release(got[0])


def test_check_interval_zero_checks_a_connection_handed_to_a_waiter(
    make_pool: Callable[..., ConnectionPool[Conn]], factory: Factory
) -> None:
    # check_interval=0 asks for a check on every checkout. A connection that goes back to the
    # idle stack is checked on its next checkout even 0 seconds later, so one handed straight
    # to a waiter must be too: whether the check runs cannot depend on someone waiting.
    pool = make_pool(check=check, check_interval=0, max_size=1, timeout=JOIN)
    conn = pool.acquire()
    got: list[Conn] = []
    with background(lambda: got.append(pool.acquire())):
        wait_until(lambda: pool.stats().waiting == 1)
        conn.alive = False  # e.g. the server went away while it was borrowed
        pool.release(conn)
    assert conn.checks == 1, "the hand-off skipped the check that check_interval=0 asks for"
    assert got == [factory.made[1]]
    assert conn.closes == 1
    pool.release(got[0])


def test_a_waiter_whose_hand_off_fails_its_check_keeps_its_place_in_line(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    # Waiters are served first come, first served. When the connection handed to the longest
    # waiter fails its check, the slot it frees must go to that same waiter, not to the next
    # one in line while the first joins the back of the queue.
    pool = make_pool(check=check, max_size=1, timeout=JOIN)
    lease = pool.connection()
    conn = lease.__enter__()
    order: list[str] = []

    def waiter(tag: str) -> Callable[[], None]:
        def run() -> None:
            got = pool.acquire()
            order.append(tag)
            pool.release(got)

        return run

    with background(waiter("first")):
        wait_until(lambda: pool.stats().waiting == 1)
        with background(waiter("second")):
            wait_until(lambda: pool.stats().waiting == 2)
            conn.alive = False
            assert lease.__exit__(Boom, Boom(), None) is False  # suspect: checked on hand-off
    assert conn.closes == 1
    assert order == ["first", "second"]


# ---- reset and is_broken -----------------------------------------------------------------


def test_reset_runs_on_every_return_except_broken_ones(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(reset=reset, max_size=1)
    conn = pool.acquire()
    pool.release(conn)
    assert conn.resets == 1
    with pool.connection():
        pass
    with pytest.raises(Boom), pool.connection():
        raise Boom
    assert conn.resets == 3
    pool.release(pool.acquire(), broken=True)
    assert conn.resets == 3
    assert conn.closes == 1


def test_a_failing_reset_closes_the_connection_and_is_logged(
    make_pool: Callable[..., ConnectionPool[Conn]], caplog: pytest.LogCaptureFixture
) -> None:
    def failing_reset(conn: Conn) -> None:
        raise RuntimeError("rollback failed")

    pool = make_pool(reset=failing_reset, name="db", max_size=1)
    conn = pool.acquire()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pool.release(conn)  # not raised to the caller
    assert conn.closes == 1
    [record] = pool_records(caplog, "resetting a returned connection failed")
    assert "'db'" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    stats = pool.stats()
    assert (stats.size, stats.broken, stats.closed) == (0, 1, 1)


def test_an_interrupt_in_reset_propagates_after_the_connection_is_discarded(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    def interrupted_reset(conn: Conn) -> None:
        raise Interrupt

    pool = make_pool(reset=interrupted_reset, max_size=1)
    conn = pool.acquire()
    with pytest.raises(Interrupt):
        pool.release(conn)
    assert conn.closes == 1
    assert sizes(pool) == (0, 0, 0, 0)


def test_is_broken_decides_whether_an_error_discards_the_connection(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    seen: list[tuple[Conn, BaseException]] = []

    def is_broken(conn: Conn, error: BaseException) -> bool:
        seen.append((conn, error))
        return isinstance(error, ConnectionError)

    pool = make_pool(is_broken=is_broken, max_size=1)
    minor = Boom()
    with pytest.raises(Boom), pool.connection() as conn:
        raise minor
    assert seen == [(conn, minor)]
    assert conn.closes == 0
    with pool.connection() as again:
        assert again is conn  # is_broken was not consulted for a clean exit
    assert len(seen) == 1
    fatal = ConnectionAbortedError()
    with pytest.raises(ConnectionAbortedError) as caught, pool.connection():
        raise fatal
    assert caught.value is fatal  # the error still propagates
    assert conn.closes == 1
    stats = pool.stats()
    assert (stats.size, stats.broken) == (0, 1)


def test_a_failing_is_broken_counts_as_broken_and_is_logged(
    make_pool: Callable[..., ConnectionPool[Conn]], caplog: pytest.LogCaptureFixture
) -> None:
    def is_broken(conn: Conn, error: BaseException) -> bool:
        raise KeyError("bug in is_broken")

    pool = make_pool(is_broken=is_broken, max_size=1)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pytest.raises(Boom), pool.connection() as conn:
        raise Boom
    assert conn.closes == 1
    assert len(pool_records(caplog, "is_broken raised")) == 1


def test_an_interrupt_in_is_broken_propagates_after_the_connection_is_discarded(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    def is_broken(conn: Conn, error: BaseException) -> bool:
        raise Interrupt

    pool = make_pool(is_broken=is_broken, max_size=1)
    lease = pool.connection()
    conn = lease.__enter__()
    with pytest.raises(Interrupt):
        lease.__exit__(Boom, Boom(), None)
    assert conn.closes == 1
    assert sizes(pool) == (0, 0, 0, 0)


# ---- lifetime ----------------------------------------------------------------------------


def test_an_idle_connection_past_its_lifetime_is_closed_by_maintain(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(max_lifetime=60.0, lifetime_jitter=0.0, clock=clock)
    conn = pool.acquire()
    pool.release(conn)
    clock.advance(59.999)
    pool.maintain()
    assert (conn.closes, pool.stats().idle) == (0, 1)
    clock.advance(0.001)
    pool.maintain()
    assert conn.closes == 1
    assert sizes(pool) == (0, 0, 0, 0)
    assert pool.stats().broken == 0  # expiry is not breakage


def test_an_expired_idle_connection_is_skipped_on_checkout(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(max_lifetime=60.0, lifetime_jitter=0.0, clock=clock)
    old = pool.acquire()
    pool.release(old)
    clock.advance(60.0)
    new = pool.acquire()  # whether or not the housekeeper got to it first
    assert new is not old
    assert old.closes == 1
    stats = pool.stats()
    assert (stats.size, stats.created, stats.closed) == (1, 2, 1)
    pool.release(new)


def test_a_borrowed_connection_past_its_lifetime_is_closed_on_return(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(max_lifetime=60.0, lifetime_jitter=0.0, reset=reset, clock=clock)
    conn = pool.acquire()
    clock.advance(61.0)
    pool.maintain()
    assert conn.closes == 0  # never closed while borrowed
    pool.release(conn)
    assert (conn.resets, conn.closes) == (1, 1)
    assert sizes(pool) == (0, 0, 0, 0)


def test_lifetime_jitter_shortens_each_lifetime_by_up_to_the_fraction(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    count = 40
    pool = make_pool(max_size=count, max_lifetime=100.0, lifetime_jitter=0.5, clock=clock)
    conns = [pool.acquire() for _ in range(count)]
    for conn in conns:
        pool.release(conn)
    clock.advance(49.999)  # every lifetime is more than half of max_lifetime
    pool.maintain()
    assert pool.stats().idle == count
    remaining = []
    for _ in range(10):
        clock.advance(5.0)
        pool.maintain()
        remaining.append(pool.stats().idle)
    assert remaining[-1] == 0  # at 100 s, all are gone
    assert remaining == sorted(remaining, reverse=True)
    # Spread out rather than all at once: several steps closed some and kept others.
    assert len({idle for idle in remaining if 0 < idle < count}) >= 3
    assert all(conn.closes == 1 for conn in conns)


def test_without_jitter_connections_made_together_expire_together(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(max_size=5, max_lifetime=10.0, lifetime_jitter=0.0, clock=clock)
    conns = [pool.acquire() for _ in range(5)]
    for conn in conns:
        pool.release(conn)
    clock.advance(9.999)
    pool.maintain()
    assert pool.stats().idle == 5
    clock.advance(0.001)
    pool.maintain()
    assert pool.stats().idle == 0


# ---- idle limit and min_size -------------------------------------------------------------


def test_max_idle_closes_the_oldest_idle_connections(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(max_size=3, max_idle=30.0, clock=clock)
    a, b, c = (pool.acquire() for _ in range(3))
    pool.release(a)
    clock.advance(10.0)
    pool.release(b)
    clock.advance(10.0)
    pool.release(c)
    clock.advance(10.0)  # a idle for 30 s, b for 20 s, c for 10 s
    pool.maintain()
    assert [conn.closes for conn in (a, b, c)] == [1, 0, 0]
    clock.advance(10.0)
    pool.maintain()
    assert [conn.closes for conn in (a, b, c)] == [1, 1, 0]
    assert pool.acquire() is c  # being used resets its idle time
    clock.advance(100.0)
    pool.maintain()
    assert c.closes == 0  # never closed while borrowed
    pool.release(c)
    pool.maintain()
    assert c.closes == 0


def test_max_idle_keeps_min_size_connections(
    make_pool: Callable[..., ConnectionPool[Conn]], clock: ManualClock
) -> None:
    pool = make_pool(min_size=1, max_size=3, max_idle=30.0, clock=clock)
    wait_until(lambda: pool.stats().idle == 1)  # refilled in the background
    conns = [pool.acquire() for _ in range(3)]
    for conn in conns:
        pool.release(conn)
    clock.advance(30.0)
    pool.maintain()
    assert [conn.closes for conn in conns] == [1, 1, 0]  # the oldest, down to min_size
    assert sizes(pool) == (1, 1, 0, 0)
    clock.advance(1_000.0)
    pool.maintain()
    assert sizes(pool) == (1, 1, 0, 0)


def test_the_housekeeper_refills_min_size_in_the_background(
    make_pool: Callable[..., ConnectionPool[Conn]], factory: Factory
) -> None:
    pool = make_pool(min_size=2, max_size=4)
    wait_until(lambda: sizes(pool) == (2, 2, 0, 0))
    conn = pool.acquire()
    pool.release(conn, broken=True)
    wait_until(lambda: sizes(pool) == (2, 2, 0, 0))
    assert len(factory.made) == 3
    pool.resize(min_size=3)
    wait_until(lambda: sizes(pool) == (3, 3, 0, 0))
    assert pool.stats().created == 4


def test_a_pool_without_min_size_refills_once_resized(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=4)
    assert pool.stats().size == 0
    pool.resize(min_size=2)
    wait_until(lambda: sizes(pool) == (2, 2, 0, 0))


def test_background_create_failures_are_logged_and_retried(
    make_pool: Callable[..., ConnectionPool[Conn]],
    factory: Factory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    factory.fail_with = ConnectionRefusedError("db down")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pool = make_pool(min_size=1, max_size=2)
        wait_until(lambda: sizes(pool) == (1, 1, 0, 0))
    assert pool.stats().create_failures == 1
    [record] = pool_records(caplog, "creating a connection in the background failed")
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ConnectionRefusedError)


# ---- leaks -------------------------------------------------------------------------------


def test_a_connection_held_past_leak_threshold_is_logged_once_with_where_it_was_taken(
    make_pool: Callable[..., ConnectionPool[Conn]],
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(name="db", leak_threshold=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    line = sys._getframe().f_lineno + 1
    conn = pool.acquire()
    clock.advance(9.999)
    pool.maintain()
    assert pool.stats().leaks == 0
    clock.advance(0.001)
    pool.maintain()
    pool.maintain()
    assert pool.stats().leaks == 1
    [record] = pool_records(caplog, "may have leaked")
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "Pool 'db'" in message
    assert repr(conn) in message
    assert f'{os.path.basename(__file__)}", line {line}, in test_a_connection_held_past' in message
    clock.advance(100.0)
    pool.maintain()
    assert len(pool_records(caplog, "may have leaked")) == 1  # reported once per checkout
    pool.release(conn)
    assert pool.stats().leaks == 1


def test_each_checkout_is_watched_for_leaks_on_its_own(
    make_pool: Callable[..., ConnectionPool[Conn]],
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = make_pool(leak_threshold=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with pool.connection():
        clock.advance(5.0)
    line = sys._getframe().f_lineno + 1
    with pool.connection() as conn:
        clock.advance(5.0)  # 10 s since the first checkout, but 5 s for this one
        pool.maintain()
        assert pool.stats().leaks == 0
        clock.advance(5.0)
        pool.maintain()
    assert pool.stats().leaks == 1
    [record] = pool_records(caplog, "may have leaked")
    assert f"line {line}" in record.getMessage()
    assert repr(conn) in record.getMessage()


def test_the_housekeeper_reports_a_leak_on_its_own(
    make_pool: Callable[..., ConnectionPool[Conn]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    pool = make_pool(leak_threshold=0.05)
    line = sys._getframe().f_lineno + 1
    conn = pool.acquire()
    wait_until(lambda: len(pool_records(caplog, "may have leaked")) == 1)
    assert pool.stats().leaks == 1
    assert f"line {line}" in pool_records(caplog, "may have leaked")[0].getMessage()
    pool.release(conn)


# ---- resize ------------------------------------------------------------------------------


def test_growing_the_pool_serves_a_waiting_thread(
    make_pool: Callable[..., ConnectionPool[Conn]], factory: Factory
) -> None:
    pool = make_pool(max_size=1, timeout=JOIN)
    held = pool.acquire()
    got: list[Conn] = []
    with background(lambda: got.append(pool.acquire())):
        wait_until(lambda: pool.stats().waiting == 1)
        pool.resize(max_size=2)
    assert got == [factory.made[1]]
    assert sizes(pool) == (2, 0, 2, 0)
    assert (pool.max_size, pool.stats().max_size) == (2, 2)
    pool.release(held)
    pool.release(got[0])


def test_shrinking_closes_surplus_idle_now_and_surplus_borrowed_on_return(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=4)
    a, b, c, d = (pool.acquire() for _ in range(4))
    pool.release(a)
    pool.release(b)
    pool.resize(max_size=1)
    assert (a.closes, b.closes) == (1, 1)  # idle: closed at once
    assert sizes(pool) == (2, 0, 2, 0)
    pool.release(c)
    assert c.closes == 1  # still over the new maximum
    pool.release(d)
    assert d.closes == 0  # the one that fits stays
    assert sizes(pool) == (1, 1, 0, 0)
    first = pool.acquire(timeout=0)
    with pytest.raises(PoolTimeoutError):
        pool.acquire(timeout=0)
    pool.release(first)


def test_shrinking_closes_the_oldest_idle_first(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=3)
    a, b, c = (pool.acquire() for _ in range(3))
    for conn in (a, b, c):
        pool.release(conn)
    pool.resize(max_size=1)
    assert [conn.closes for conn in (a, b, c)] == [1, 1, 0]


def test_resizing_a_closed_pool_raises(make_pool: Callable[..., ConnectionPool[Conn]]) -> None:
    pool = make_pool(name="db")
    pool.close()
    with pytest.raises(PoolClosedError, match="'db'"):
        pool.resize(max_size=3)


# ---- close -------------------------------------------------------------------------------


def test_close_closes_idle_connections_and_refuses_checkouts(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(name="db", max_size=2)
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.close() is True
    assert pool.closed
    assert (a.closes, b.closes) == (1, 1)
    with pytest.raises(PoolClosedError) as caught:
        pool.acquire()
    assert caught.value.name == "db"
    with pytest.raises(PoolClosedError), pool.connection():
        pass
    assert pool.close() is True  # twice is harmless
    assert (a.closes, b.closes) == (1, 1)
    assert repr(pool).endswith(", closed)")


def test_close_wakes_a_blocked_thread_with_pool_closed_error(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(name="db", max_size=1, timeout=None)
    held = pool.acquire()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            pool.acquire()
        except PoolClosedError as error:
            errors.append(error)

    with background(wait):
        wait_until(lambda: pool.stats().waiting == 1)
        assert pool.close(timeout=0) is False
    assert len(errors) == 1
    assert isinstance(errors[0], PoolClosedError)
    assert pool.stats().waiting == 0
    pool.release(held)


def test_close_with_a_borrowed_connection_closes_it_when_it_comes_back(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(reset=reset, max_size=2)
    held = pool.acquire()
    assert pool.close(timeout=0) is False
    assert held.closes == 0  # not closed under its borrower
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(held)
    assert (held.resets, held.closes) == (1, 1)
    assert sizes(pool) == (0, 0, 0, 0)
    assert pool.close(timeout=0) is True


def test_close_waits_for_a_connection_returned_by_another_thread(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=1)
    held = pool.acquire()

    def give_back() -> None:
        wait_until(lambda: pool.closed)
        pool.release(held)

    with background(give_back):
        assert pool.close(timeout=JOIN) is True
    assert held.closes == 1


def test_a_pool_used_as_a_context_manager_is_closed_on_exit(factory: Factory) -> None:
    with ConnectionPool(factory, max_size=2) as pool:
        assert isinstance(pool, ConnectionPool)
        with pool.connection() as conn:
            pass
    assert pool.closed
    assert conn.closes == 1


# ---- leases ------------------------------------------------------------------------------


def test_exiting_a_lease_twice_raises_and_leaves_the_next_borrower_alone(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=1)
    lease = pool.connection()
    with lease as conn:
        pass
    taken_again = pool.acquire()  # the same connection, lent to someone else
    assert taken_again is conn
    with pytest.raises(RuntimeError, match="without holding a connection"):
        lease.__exit__(None, None, None)
    assert sizes(pool) == (1, 0, 1, 0)  # still lent to its new borrower
    pool.release(taken_again)
    assert sizes(pool) == (1, 1, 0, 0)


def test_a_lease_whose_connection_was_released_and_lent_again_does_not_return_it(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=1)
    lease = pool.connection()
    conn = lease.__enter__()
    pool.release(conn)
    taken_again = pool.acquire()
    assert taken_again is conn
    with pytest.raises(RuntimeError, match="lent out again"):
        lease.__exit__(None, None, None)
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(taken_again)
    with pytest.raises(ValueError, match="conn"), pool.connection() as conn:
        pool.release(conn)  # returned inside the block: the exit finds nothing to return
    assert sizes(pool) == (1, 1, 0, 0)


def test_entering_a_lease_twice_raises_and_returns_the_second_connection(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=2)
    lease = pool.connection()
    with lease as conn:
        with pytest.raises(RuntimeError, match="entered twice"):
            lease.__enter__()
        assert sizes(pool) == (2, 1, 1, 0)  # the second checkout went back at once
    assert sizes(pool) == (2, 2, 0, 0)
    assert conn.closes == 0


def test_a_lease_can_be_reused_after_it_was_exited(
    make_pool: Callable[..., ConnectionPool[Conn]],
) -> None:
    pool = make_pool(max_size=1)
    lease = pool.connection()
    with lease as first:
        pass
    with lease as second:
        assert second is first
    assert sizes(pool) == (1, 1, 0, 0)
