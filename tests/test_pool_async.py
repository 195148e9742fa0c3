"""The asyncio side of the connection pool: ``async with pool.connection()``,
``acquire_async`` with timeouts and cancellation, FIFO among tasks, waking from other threads,
and ``async with ConnectionPool(...)`` / ``close_async``.

Waits end by polling against a generous deadline; where a race matters (a wait running out
just as a connection is handed over), the loop is blocked on purpose so the order of the
callbacks is fixed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any

import pytest
from buttress import (
    ConnectionPool,
    ManualClock,
    PoolClosedError,
    PoolFullError,
    PoolTimeoutError,
)
from support import FakeConnection as Conn
from support import cancel, until
from support import check_connection as check

JOIN = 5.0
SHORT = 0.05


class Boom(Exception):
    """The failure the tests raise inside `async with pool.connection()` blocks."""


def sizes(pool: ConnectionPool[Any]) -> tuple[int, int, int, int]:
    stats = pool.stats()
    return stats.size, stats.idle, stats.in_use, stats.waiting


def block_the_loop(seconds: float) -> None:
    """Called through loop.call_soon: holds the loop so that timers fall due together."""
    time.sleep(seconds)


# ---- checkout and return -----------------------------------------------------------------


async def test_async_with_connection_checks_out_and_returns() -> None:
    pool = ConnectionPool(Conn, max_size=2)
    async with pool.connection() as conn:
        assert isinstance(conn, Conn)
        assert sizes(pool) == (1, 0, 1, 0)
    assert sizes(pool) == (1, 1, 0, 0)
    error = Boom()
    used: list[Conn] = []

    async def failing() -> None:
        async with pool.connection() as again:
            used.append(again)
            await asyncio.sleep(0)
            raise error

    with pytest.raises(Boom) as caught:
        await failing()
    assert caught.value is error
    assert used == [conn]
    assert sizes(pool) == (1, 1, 0, 0)
    assert pool.close() is True
    assert conn.closes == 1


async def test_async_with_consults_is_broken_and_checks_a_suspect_connection() -> None:
    seen: list[BaseException] = []

    def is_broken(conn: Conn, error: BaseException) -> bool:
        seen.append(error)
        return isinstance(error, ConnectionError)

    pool = ConnectionPool(Conn, check=check, is_broken=is_broken, check_interval=60.0)
    with pytest.raises(Boom):
        async with pool.connection() as conn:
            raise Boom
    assert [type(error) for error in seen] == [Boom]
    async with pool.connection() as again:
        assert again is conn
    assert conn.checks == 1  # its last block raised: checked although used just now
    with pytest.raises(ConnectionResetError):
        async with pool.connection():
            raise ConnectionResetError
    assert conn.closes == 1
    assert sizes(pool) == (0, 0, 0, 0)
    pool.close()


async def test_acquire_async_and_release() -> None:
    pool = ConnectionPool(Conn, max_size=2)
    first = await pool.acquire_async()
    second = await pool.acquire_async(timeout=0)
    assert first is not second
    assert sizes(pool) == (2, 0, 2, 0)
    pool.release(second)
    pool.release(first)
    assert await pool.acquire_async() is first  # newest idle first
    pool.release(first)
    pool.close()


async def test_a_failing_create_raises_to_the_task_and_frees_the_slot() -> None:
    attempts: list[int] = []

    def create() -> Conn:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionRefusedError("db down")
        return Conn()

    pool = ConnectionPool(create, max_size=1)
    with pytest.raises(ConnectionRefusedError):
        await pool.acquire_async()
    assert pool.stats().create_failures == 1
    conn = await pool.acquire_async(timeout=0)
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(conn)
    pool.close()


async def test_entering_an_async_lease_twice_raises_and_returns_the_second_connection() -> None:
    pool = ConnectionPool(Conn, max_size=2)
    lease = pool.connection()
    async with lease:
        with pytest.raises(RuntimeError, match="entered twice"):
            await lease.__aenter__()
        assert sizes(pool) == (2, 1, 1, 0)
    with pytest.raises(RuntimeError, match="without holding"):
        await lease.__aexit__(None, None, None)
    assert sizes(pool) == (2, 2, 0, 0)
    pool.close()


async def test_an_async_checkout_records_where_it_was_taken_for_leak_reports(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="buttress.pool")
    pool = ConnectionPool(Conn, leak_threshold=10.0, clock=clock)
    line = sys._getframe().f_lineno + 1
    async with pool.connection():
        clock.advance(10.0)
        pool.maintain()
    assert pool.stats().leaks == 1
    [record] = [r for r in caplog.records if "may have leaked" in r.getMessage()]
    assert f"line {line}, in test_an_async_checkout_records" in record.getMessage()
    pool.close()


# ---- waiting -----------------------------------------------------------------------------


async def test_acquire_async_waits_without_blocking_the_loop() -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    held = await pool.acquire_async()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.create_task(ticker())
    asyncio.get_running_loop().call_later(SHORT, pool.release, held)
    got = await asyncio.wait_for(pool.acquire_async(), JOIN)
    await cancel(ticking)
    assert got is held
    assert ticks >= 2  # the loop kept running while the task waited
    stats = pool.stats()
    assert (stats.waits, stats.waiting, stats.in_use) == (1, 0, 1)
    pool.release(held)
    pool.close()


async def test_acquire_async_times_out_with_pool_timeout_error() -> None:
    pool = ConnectionPool(Conn, name="db", max_size=1, timeout=SHORT)
    held = await pool.acquire_async()
    with pytest.raises(PoolTimeoutError) as caught:
        await pool.acquire_async()  # the pool's default
    assert (caught.value.name, caught.value.timeout) == ("db", SHORT)
    with pytest.raises(PoolTimeoutError) as caught:
        await pool.acquire_async(timeout=0.01)
    assert caught.value.timeout == 0.01
    with pytest.raises(PoolTimeoutError):
        async with pool.connection(timeout=0.01):
            pass
    stats = pool.stats()
    assert (stats.timeouts, stats.waiting, stats.in_use) == (3, 0, 1)
    pool.release(held)
    assert await pool.acquire_async(timeout=0) is held
    pool.release(held)
    pool.close()


async def test_acquire_async_without_waiting_fails_at_once_and_counts_a_timeout() -> None:
    pool = ConnectionPool(Conn, name="db", max_size=1, timeout=None)
    held = await pool.acquire_async()
    with pytest.raises(PoolTimeoutError) as caught:
        await pool.acquire_async(timeout=0)
    assert (caught.value.name, caught.value.timeout) == ("db", 0.0)
    stats = pool.stats()
    assert (stats.timeouts, stats.waiting, stats.waits) == (1, 0, 0)  # as a thread's would
    pool.release(held)
    pool.close()


async def test_acquire_async_refuses_past_max_waiting() -> None:
    pool = ConnectionPool(Conn, name="db", max_size=1, max_waiting=1, timeout=None)
    held = await pool.acquire_async()
    queued = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 1)
    with pytest.raises(PoolFullError) as caught:
        await pool.acquire_async(timeout=JOIN)
    assert (caught.value.name, caught.value.max_waiting) == ("db", 1)
    pool.release(held)
    assert await asyncio.wait_for(queued, JOIN) is held
    assert pool.stats().rejected == 1
    pool.release(held)
    pool.close()


async def test_tasks_are_served_first_come_first_served() -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    held = await pool.acquire_async()
    order: list[int] = []

    async def take(ident: int) -> None:
        async with pool.connection():
            order.append(ident)
            await asyncio.sleep(0)

    tasks = []
    for ident in range(6):
        tasks.append(asyncio.create_task(take(ident)))
        await until(lambda ident=ident: pool.stats().waiting == ident + 1)
    pool.release(held)
    await asyncio.wait_for(asyncio.gather(*tasks), JOIN)
    assert order == list(range(6))
    stats = pool.stats()
    assert (stats.size, stats.idle, stats.waits, stats.created) == (1, 1, 6, 1)
    pool.close()


async def test_a_broken_release_lets_a_waiting_task_create_a_connection() -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    held = await pool.acquire_async()
    waiter = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 1)
    pool.release(held, broken=True)
    fresh = await asyncio.wait_for(waiter, JOIN)
    assert fresh is not held
    assert held.closes == 1
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(fresh)
    pool.close()


async def test_a_task_handed_a_dead_connection_gets_a_new_one() -> None:
    pool = ConnectionPool(Conn, check=check, max_size=1, timeout=None)
    lease = pool.connection()
    conn = await lease.__aenter__()
    waiter = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 1)
    conn.alive = False
    await lease.__aexit__(Boom, Boom(), None)  # suspect: checked on the hand-off
    fresh = await asyncio.wait_for(waiter, JOIN)
    assert fresh is not conn
    assert (conn.checks, conn.closes) == (1, 1)
    pool.release(fresh)
    pool.close()


async def test_returning_a_connection_again_after_it_was_handed_to_a_waiter_is_refused() -> None:
    # The first release hands the connection to the waiting task; until that task runs, the
    # connection is reserved for it. A second release of the same connection (a double
    # return) must be refused with ValueError like any other, and the waiter must still get
    # the connection. (The same happens with a waiting thread, only less reproducibly.)
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    conn = await pool.acquire_async()
    waiter = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 1)
    pool.release(conn)  # handed to `waiter`, which has not run since
    try:
        with pytest.raises(ValueError, match="conn"):
            pool.release(conn)
    finally:
        got = await asyncio.wait_for(asyncio.gather(waiter, return_exceptions=True), JOIN)
    assert got == [conn], f"the waiter got {got!r}"
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(conn)
    pool.close()


async def test_a_release_from_another_thread_wakes_a_waiting_task() -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    held = pool.acquire()
    waiter = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 1)
    thread = threading.Thread(target=pool.release, args=(held,))
    thread.start()
    assert await asyncio.wait_for(waiter, JOIN) is held
    await asyncio.to_thread(thread.join, JOIN)
    pool.release(held)
    pool.close()


async def test_a_wait_that_runs_out_just_as_a_connection_arrives_keeps_it() -> None:
    # The waiter's timer and the release fall due in the same loop iteration, timer first: the
    # wait has expired, but the connection was handed over before the task could leave the
    # queue, so the task takes it instead of raising (and nothing is lost).
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    held = await pool.acquire_async()
    waiter = asyncio.create_task(pool.acquire_async(timeout=SHORT))
    await until(lambda: pool.stats().waiting == 1)
    loop = asyncio.get_running_loop()
    loop.call_later(SHORT, pool.release, held)  # due after the waiter's own timer
    loop.call_soon(block_the_loop, 2 * SHORT)
    assert await asyncio.wait_for(waiter, JOIN) is held
    stats = pool.stats()
    assert (stats.timeouts, stats.in_use, stats.waiting) == (0, 1, 0)
    pool.release(held)
    pool.close()


# ---- cancellation ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["acquire_async", "async with"])
async def test_a_task_cancelled_while_waiting_leaves_no_waiter_behind(form: str) -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    held = await pool.acquire_async()
    entered: list[Conn] = []

    async def wait() -> None:
        if form == "acquire_async":
            entered.append(await pool.acquire_async())
        else:
            async with pool.connection() as conn:
                entered.append(conn)

    first = asyncio.create_task(wait())
    second = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 2)
    await cancel(first)
    assert entered == []
    assert pool.stats().waiting == 1
    pool.release(held)
    assert await asyncio.wait_for(second, JOIN) is held
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(held)
    assert sizes(pool) == (1, 1, 0, 0)
    assert pool.stats().timeouts == 0
    pool.close()


@pytest.mark.parametrize("timeout", [None, JOIN], ids=["no-timeout", "with-timeout"])
async def test_a_task_cancelled_right_after_the_hand_off_passes_the_connection_on(
    timeout: float | None,
) -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=timeout)
    held = await pool.acquire_async()
    first = asyncio.create_task(pool.acquire_async())
    second = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 2)
    pool.release(held)  # handed to `first`, whose wake-up is still queued on the loop
    await cancel(first)
    assert await asyncio.wait_for(second, JOIN) is held
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(held)
    assert sizes(pool) == (1, 1, 0, 0)
    pool.close()


async def test_a_task_cancelled_right_after_the_hand_off_with_no_one_behind_it() -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    held = await pool.acquire_async()
    waiter = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 1)
    pool.release(held)
    await cancel(waiter)
    assert sizes(pool) == (1, 1, 0, 0)  # back in the pool, not lost
    assert await pool.acquire_async(timeout=0) is held
    pool.release(held)
    pool.close()


async def test_a_task_cancelled_after_a_slot_was_handed_to_it_frees_the_slot() -> None:
    created: list[Conn] = []

    def create() -> Conn:
        created.append(Conn())
        return created[-1]

    pool = ConnectionPool(create, max_size=1, timeout=None)
    held = await pool.acquire_async()
    waiter = asyncio.create_task(pool.acquire_async())
    await until(lambda: pool.stats().waiting == 1)
    pool.release(held, broken=True)  # the freed slot goes to the waiter, to create in
    await cancel(waiter)
    assert created == [held]  # the cancelled task never created one
    assert sizes(pool) == (0, 0, 0, 0)
    conn = await pool.acquire_async(timeout=0)
    assert sizes(pool) == (1, 0, 1, 0)
    pool.release(conn)
    pool.close()


async def test_a_task_cancelled_inside_async_with_returns_the_connection() -> None:
    pool = ConnectionPool(Conn, check=check, max_size=1, timeout=None, check_interval=60.0)
    inside = asyncio.Event()

    async def hold() -> None:
        async with pool.connection():
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await asyncio.wait_for(inside.wait(), JOIN)
    await cancel(task)
    assert sizes(pool) == (1, 1, 0, 0)
    conn = await pool.acquire_async()
    assert conn.checks == 1  # cancelled mid-block: checked before its next use
    pool.release(conn)
    pool.close()


# ---- closing -----------------------------------------------------------------------------


async def test_async_with_pool_closes_it_on_exit() -> None:
    async with ConnectionPool(Conn, max_size=2) as pool:
        assert isinstance(pool, ConnectionPool)
        async with pool.connection() as conn:
            pass
    assert pool.closed
    assert conn.closes == 1
    with pytest.raises(PoolClosedError):
        await pool.acquire_async()
    with pytest.raises(PoolClosedError):
        async with pool.connection():
            pass


async def test_close_async_waits_for_a_connection_a_task_returns() -> None:
    pool = ConnectionPool(Conn, max_size=2)
    held = await pool.acquire_async()

    async def give_back() -> None:
        await until(lambda: pool.closed)
        await asyncio.sleep(SHORT)
        pool.release(held)

    returning = asyncio.create_task(give_back())
    assert await pool.close_async(timeout=JOIN) is True
    await asyncio.wait_for(returning, JOIN)
    assert held.closes == 1
    assert sizes(pool) == (0, 0, 0, 0)


async def test_close_async_without_waiting_reports_borrowed_connections() -> None:
    pool = ConnectionPool(Conn, max_size=2)
    held = await pool.acquire_async()
    idle = await pool.acquire_async()
    pool.release(idle)
    assert await pool.close_async(timeout=0) is False
    assert (idle.closes, held.closes) == (1, 0)
    pool.release(held)
    assert held.closes == 1
    assert await pool.close_async(timeout=0) is True


async def test_closing_the_pool_wakes_waiting_tasks_with_pool_closed_error() -> None:
    pool = ConnectionPool(Conn, name="db", max_size=1, timeout=None)
    held = await pool.acquire_async()
    waiters = [asyncio.create_task(pool.acquire_async()) for _ in range(2)]
    await until(lambda: pool.stats().waiting == 2)
    closing = threading.Thread(target=pool.close, kwargs={"timeout": 0})
    closing.start()  # from another thread, as a shutdown hook might
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), JOIN)
    await asyncio.to_thread(closing.join, JOIN)
    assert [type(result) for result in results] == [PoolClosedError, PoolClosedError]
    assert all(isinstance(result, PoolClosedError) and result.name == "db" for result in results)
    assert pool.stats().waiting == 0
    pool.release(held)
    assert held.closes == 1
