"""Threaded and asyncio stress on the connection pool, in bounded time: a connection is never
held by two borrowers at once, the pool never opens more than max_size, no slot or connection
is lost, waiters are served in arrival order, and every worker finishes its quota.

Each test runs for at most a couple of seconds and fails, rather than hangs, if a worker does
not finish. Only invariants are asserted, never timings.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from contextlib import suppress
from typing import Any

from buttress import ConnectionPool, PoolTimeoutError
from support import FakeConnection as Conn
from support import run_threads

JOIN = 30.0  # the longest any worker may take: far more than a healthy run needs
THREADS = 8
SLOTS = 4


class Boom(Exception):
    """A failure inside a borrower's block that leaves the connection usable."""


class Fatal(Exception):
    """A failure that breaks the connection (is_broken says so)."""


class Ledger:
    """Every connection made, and who holds which: taking one that is held fails the test, and
    so does a pool that counts more than `max_size` connections open at any checkout."""

    def __init__(self, max_size: int = SLOTS) -> None:
        self.lock = threading.Lock()
        self.made: list[Conn] = []
        self.max_size = max_size
        self.pool: ConnectionPool[Conn] | None = None
        self.peak_size = 0

    def create(self) -> Conn:
        conn = Conn()
        with self.lock:
            self.made.append(conn)
        return conn

    def take(self, conn: Conn, holder: object) -> None:
        assert self.pool is not None
        size = self.pool.stats().size
        with self.lock:
            assert conn.holder is None, (
                f"{conn!r} lent to {holder!r} while {conn.holder!r} holds it"
            )
            assert conn.closes == 0, f"{conn!r} lent after it was closed"
            conn.holder = holder
            conn.uses += 1
            self.peak_size = max(self.peak_size, size)
        assert size <= self.max_size

    def give(self, conn: Conn, holder: object) -> None:
        with self.lock:
            assert conn.holder is holder
            conn.holder = None


def pool_on(ledger: Ledger, **options: Any) -> ConnectionPool[Conn]:
    pool = ConnectionPool(ledger.create, max_size=ledger.max_size, **options)
    ledger.pool = pool
    return pool


def assert_nothing_lost(pool: ConnectionPool[Conn], ledger: Ledger, max_size: int) -> None:
    """After the workers are done: nothing borrowed or waiting, the books balance, every slot
    can be taken at once, and closing the pool closes every connection exactly once."""
    stats = pool.stats()
    assert (stats.in_use, stats.waiting) == (0, 0)
    assert stats.size <= max_size
    assert stats.size == stats.idle
    assert stats.created - stats.closed == stats.size
    assert stats.created == len(ledger.made)
    assert all(conn.holder is None for conn in ledger.made)
    taken = [pool.acquire(timeout=0) for _ in range(max_size)]
    assert len({id(conn) for conn in taken}) == max_size
    for conn in taken:
        pool.release(conn)
    assert pool.close(timeout=0) is True
    # A housekeeper round may still be closing what it retired just before the pool closed.
    deadline = time.monotonic() + JOIN
    while not all(conn.closes for conn in ledger.made):
        assert time.monotonic() < deadline, "a retired connection was never closed"
        time.sleep(0.001)
    assert all(conn.closes == 1 for conn in ledger.made)


# ---- threads -----------------------------------------------------------------------------


def test_threads_never_share_a_connection_and_lose_none() -> None:
    ledger = Ledger()
    pool = pool_on(ledger, timeout=JOIN)
    rounds = 1_500
    done = [0] * THREADS
    longest = [0.0] * THREADS

    def worker(index: int) -> None:
        rng = random.Random(index)
        for _ in range(rounds):
            started = time.monotonic()
            if rng.random() < 0.5:
                conn = pool.acquire()
                longest[index] = max(longest[index], time.monotonic() - started)
                ledger.take(conn, index)
                if rng.random() < 0.3:
                    time.sleep(0)  # let the others run while it is held
                ledger.give(conn, index)
                pool.release(conn, broken=rng.random() < 0.02)
            else:
                with pool.connection() as conn:
                    longest[index] = max(longest[index], time.monotonic() - started)
                    ledger.take(conn, index)
                    if rng.random() < 0.3:
                        time.sleep(0)
                    ledger.give(conn, index)
            done[index] += 1

    run_threads(worker, THREADS, JOIN)
    assert done == [rounds] * THREADS  # no thread was passed over for good
    stats = pool.stats()
    assert stats.requests == THREADS * rounds
    assert stats.timeouts == 0
    assert stats.broken > 0
    assert stats.max_wait < JOIN
    assert max(longest) < JOIN
    assert 1 <= ledger.peak_size <= SLOTS
    assert_nothing_lost(pool, ledger, SLOTS)


def test_threads_with_checks_resets_lifetimes_and_errors_lose_nothing() -> None:
    ledger = Ledger()
    rng_lock = threading.Lock()
    shared_rng = random.Random(7)

    def check(conn: Conn) -> bool:
        with rng_lock:
            if shared_rng.random() < 0.01:
                conn.alive = False
        return conn.alive

    def reset(conn: Conn) -> None:
        with rng_lock:
            failing = shared_rng.random() < 0.005
        if failing:
            raise ConnectionResetError("rollback failed")

    def is_broken(conn: Conn, error: BaseException) -> bool:
        return isinstance(error, Fatal)

    pool = pool_on(
        ledger,
        check=check,
        reset=reset,
        is_broken=is_broken,
        timeout=JOIN,
        check_interval=0,
        max_lifetime=0.002,  # connections expire all the time, also in the background
        max_idle=0.001,
    )
    rounds = 600

    def worker(index: int) -> None:
        rng = random.Random(100 + index)
        for _ in range(rounds):
            error = rng.choice([*[None] * 18, Boom, Fatal])
            with suppress(Boom, Fatal), pool.connection() as conn:
                ledger.take(conn, index)
                if rng.random() < 0.3:
                    time.sleep(0)
                ledger.give(conn, index)
                if error is not None:
                    raise error

    run_threads(worker, THREADS, JOIN)
    stats = pool.stats()
    assert stats.timeouts == 0
    assert stats.broken > 0
    assert stats.closed > stats.broken  # expiries too
    assert 1 <= ledger.peak_size <= SLOTS
    assert_nothing_lost(pool, ledger, SLOTS)


def test_queued_threads_are_served_in_arrival_order() -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=JOIN)
    held = pool.acquire()
    order: list[int] = []
    count = 8

    def waiter(index: int) -> None:
        conn = pool.acquire()
        order.append(index)
        pool.release(conn)

    threads = []
    for index in range(count):
        thread = threading.Thread(target=waiter, args=(index,), daemon=True)
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + JOIN
        while pool.stats().waiting < index + 1:
            assert time.monotonic() < deadline, "a thread never joined the queue"
            time.sleep(0.001)
    pool.release(held)
    for thread in threads:
        thread.join(JOIN)
    assert not any(thread.is_alive() for thread in threads)
    assert order == list(range(count))
    stats = pool.stats()
    assert (stats.waits, stats.size, stats.created) == (count, 1, 1)
    pool.close()


# ---- asyncio -----------------------------------------------------------------------------


async def test_tasks_with_cancellations_and_timeouts_lose_nothing() -> None:
    ledger = Ledger()
    pool = pool_on(ledger, timeout=None)
    tasks_count = 50
    rounds = 40
    outcomes = {"used": 0, "timed out": 0, "cancelled": 0}

    async def use_once(rng: random.Random, holder: object) -> None:
        if rng.random() < 0.5:
            conn = await pool.acquire_async(timeout=rng.choice([None, 0, 0.001, 0.005]))
            ledger.take(conn, holder)
            try:
                await asyncio.sleep(rng.choice([0, 0, 0.0005]))
            finally:  # also when cancelled while holding it
                ledger.give(conn, holder)
                pool.release(conn, broken=rng.random() < 0.05)
        else:
            async with pool.connection(timeout=rng.choice([None, 0.002])) as conn:
                ledger.take(conn, holder)
                try:
                    await asyncio.sleep(rng.choice([0, 0, 0.0005]))
                finally:
                    ledger.give(conn, holder)

    async def worker(index: int) -> None:
        rng = random.Random(1_000 + index)
        for round_ in range(rounds):
            holder = (index, round_)
            attempt = asyncio.create_task(use_once(rng, holder))
            if rng.random() < 0.25:
                await asyncio.sleep(rng.choice([0, 0.0002, 0.001]))
                attempt.cancel()
            try:
                await attempt
            except PoolTimeoutError:
                outcomes["timed out"] += 1
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            else:
                outcomes["used"] += 1

    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(tasks_count))), JOIN)
    assert sum(outcomes.values()) == tasks_count * rounds
    assert outcomes["used"] > 0
    assert outcomes["timed out"] > 0
    assert outcomes["cancelled"] > 0
    assert 1 <= ledger.peak_size <= SLOTS
    assert_nothing_lost(pool, ledger, SLOTS)


async def test_tasks_queued_one_after_another_are_served_in_order() -> None:
    pool = ConnectionPool(Conn, max_size=1, timeout=None)
    held = await pool.acquire_async()
    order: list[int] = []

    async def take(index: int) -> None:
        conn = await pool.acquire_async()
        order.append(index)
        await asyncio.sleep(0)
        pool.release(conn)

    tasks = []
    for index in range(20):
        tasks.append(asyncio.create_task(take(index)))
        deadline = time.monotonic() + JOIN
        while pool.stats().waiting < index + 1:
            assert time.monotonic() < deadline, "a task never joined the queue"
            await asyncio.sleep(0.001)
    pool.release(held)
    await asyncio.wait_for(asyncio.gather(*tasks), JOIN)
    assert order == list(range(20))
    pool.close()


# ---- threads and tasks together ----------------------------------------------------------


async def test_threads_and_tasks_share_one_pool() -> None:
    ledger = Ledger()
    pool = pool_on(ledger, timeout=JOIN)
    thread_rounds = 400
    task_rounds = 60
    tasks_count = 20
    finished: dict[str, int] = {"threads": 0, "tasks": 0}
    counts_lock = threading.Lock()

    def thread_worker(index: int) -> None:
        rng = random.Random(2_000 + index)
        holder = f"thread-{index}"
        for _ in range(thread_rounds):
            with pool.connection() as conn:
                ledger.take(conn, holder)
                if rng.random() < 0.3:
                    time.sleep(0)
                ledger.give(conn, holder)
            with counts_lock:
                finished["threads"] += 1

    async def task_worker(index: int) -> None:
        rng = random.Random(3_000 + index)
        holder = f"task-{index}"
        for _ in range(task_rounds):
            conn = await pool.acquire_async()
            ledger.take(conn, holder)
            await asyncio.sleep(rng.choice([0, 0, 0.0002]))
            ledger.give(conn, holder)
            pool.release(conn, broken=rng.random() < 0.02)
            with counts_lock:
                finished["tasks"] += 1

    threads_done = asyncio.create_task(asyncio.to_thread(run_threads, thread_worker, 4, JOIN))
    await asyncio.wait_for(
        asyncio.gather(threads_done, *(task_worker(i) for i in range(tasks_count))), JOIN
    )
    assert finished == {"threads": 4 * thread_rounds, "tasks": tasks_count * task_rounds}
    assert pool.stats().timeouts == 0
    assert 1 <= ledger.peak_size <= SLOTS
    assert_nothing_lost(pool, ledger, SLOTS)
