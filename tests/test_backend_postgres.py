"""The PostgreSQL backend against a real server: every test takes the `postgres_url` fixture,
so it skips (or fails, with BUTTRESS_REQUIRE_SERVICES=1) when no server answers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from buttress import ConnectionPool
from buttress.backends.postgres import postgres_pool
from psycopg import pq
from support import run_threads

Pool = ConnectionPool[psycopg.Connection[Any]]

# How long to wait for what happens in the background (the housekeeper, the server).
DEADLINE = 10.0


def _eventually(condition: Callable[[], object], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        time.sleep(0.01)


@pytest.fixture
def admin(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection of its own, outside every pool."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A uniquely named table, dropped at the end."""
    name = f"buttress_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"create table {name} (id serial primary key, note text)")
    try:
        yield name
    finally:
        admin.execute(f"drop table if exists {name}")


def _alive(admin: psycopg.Connection[Any], pid: int) -> bool:
    row = admin.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone()
    assert row is not None
    return bool(row[0])


def _terminate(admin: psycopg.Connection[Any], *pids: int) -> None:
    """Ends the server sessions `pids` and waits until the server has let them go."""
    for pid in pids:
        row = admin.execute("select pg_terminate_backend(%s)", (pid,)).fetchone()
        assert row == (True,), f"backend {pid} was not there to terminate"
    for pid in pids:
        _eventually(lambda pid=pid: not _alive(admin, pid), f"backend {pid} to exit")


def _sessions(admin: psycopg.Connection[Any], application_name: str) -> int:
    row = admin.execute(
        "select count(*) from pg_stat_activity where application_name = %s", (application_name,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _pid_of(pool: Pool) -> int:
    with pool.connection() as conn:
        return conn.info.backend_pid


def test_queries_through_the_pool(postgres_url: str) -> None:
    with postgres_pool(postgres_url, min_size=1, max_size=2) as pool:
        assert pool.name == "postgres"
        # Let the housekeeper open min_size first: a checkout that finds no idle connection
        # opens one of its own rather than wait for the one being made in the background.
        _eventually(lambda: pool.stats().idle == 1, "min_size=1 filled")
        with pool.connection() as conn:
            assert conn.execute("select 1 + 1").fetchone() == (2,)
            assert conn.execute("select current_database()").fetchone() == ("test",)
            first = conn
        with pool.connection() as conn:
            assert conn is first
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE
            assert conn.execute("select %s::int * 3", (7,)).fetchone() == (21,)
        conn = pool.acquire()
        try:
            assert conn.execute("select 'acquired'").fetchone() == ("acquired",)
        finally:
            pool.release(conn)
        stats = pool.stats()
        assert stats.in_use == 0
        assert stats.created == 1
        assert stats.broken == 0
    assert first.closed


def test_the_defaults(postgres_url: str) -> None:
    with postgres_pool(postgres_url) as pool:
        assert (pool.min_size, pool.max_size) == (1, 10)
        with pool.connection() as conn:
            assert not conn.autocommit
    with postgres_pool(postgres_url, autocommit=True) as pool, pool.connection() as conn:
        assert conn.autocommit


def test_an_open_transaction_is_rolled_back_on_return(
    postgres_url: str, admin: psycopg.Connection[Any], table: str
) -> None:
    with postgres_pool(postgres_url, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            first = conn
            conn.execute(f"insert into {table} (note) values ('uncommitted')")
            assert conn.info.transaction_status == pq.TransactionStatus.INTRANS
        assert first.info.transaction_status == pq.TransactionStatus.IDLE
        with pool.connection() as conn:
            assert conn is first
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE
            assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)
            conn.execute(f"insert into {table} (note) values ('committed')")
            conn.commit()
        # A failed statement leaves the transaction aborted (INERROR): rolled back as well.
        with pytest.raises(psycopg.errors.UndefinedTable), pool.connection() as conn:
            conn.execute("select * from no_such_table_here")
        with pool.connection() as conn:
            assert conn is first  # an SQL error does not break the connection
            assert conn.info.transaction_status == pq.TransactionStatus.IDLE
            assert conn.execute(f"select note from {table}").fetchall() == [("committed",)]
        assert pool.stats().broken == 0
    assert admin.execute(f"select note from {table}").fetchall() == [("committed",)]


def test_a_terminated_idle_connection_is_replaced_on_checkout(
    postgres_url: str, admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # check_interval=0: every checkout checks, so the dead connection never reaches the caller.
    with postgres_pool(postgres_url, min_size=1, max_size=1, check_interval=0) as pool:
        with pool.connection() as conn:
            dead = conn
            pid = conn.info.backend_pid
        _terminate(admin, pid)
        with caplog.at_level(logging.WARNING, logger="buttress.pool"), pool.connection() as conn:
            assert conn is not dead
            assert conn.info.backend_pid != pid
            assert conn.execute("select 1").fetchone() == (1,)
        assert any("check" in record.getMessage() for record in caplog.records)
        assert dead.closed
        stats = pool.stats()
        assert stats.broken == 1
        assert stats.created == 2
        assert stats.in_use == 0


def test_a_terminated_connection_inside_the_check_window_breaks_one_block(
    postgres_url: str, admin: psycopg.Connection[Any]
) -> None:
    # Used a moment ago, so the checkout trusts it without a check (a long window makes that
    # certain; the default is 0.5 s): the query in the block fails, is_broken sees psycopg
    # marked the connection broken, and the pool discards it rather than lending it again.
    with postgres_pool(postgres_url, min_size=1, max_size=1, check_interval=60) as pool:
        pid = _pid_of(pool)
        _terminate(admin, pid)
        lent: list[psycopg.Connection[Any]] = []

        def query() -> None:
            with pool.connection() as conn:
                lent.append(conn)
                assert conn.info.backend_pid == pid  # not checked: the dead one was lent
                conn.execute("select 1")

        with pytest.raises(psycopg.OperationalError):
            query()
        [dead] = lent
        assert dead.broken
        stats = pool.stats()
        assert stats.broken == 1
        assert stats.closed == 1
        with pool.connection() as conn:
            assert conn is not dead
            assert conn.execute("select 1").fetchone() == (1,)
        assert pool.stats().created == 2


def test_a_lost_connection_whose_error_was_swallowed_is_dropped_on_return(
    postgres_url: str, admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    with postgres_pool(postgres_url, min_size=1, max_size=1, check_interval=60) as pool:
        pid = _pid_of(pool)
        _terminate(admin, pid)
        with caplog.at_level(logging.WARNING, logger="buttress.pool"), pool.connection() as conn:
            dead = conn
            with pytest.raises(psycopg.OperationalError):
                conn.execute("select 1")
        # The block ended normally, so is_broken was not asked; the reset found the
        # connection lost and the pool closed it instead of keeping it.
        assert any("reset" in record.getMessage() for record in caplog.records)
        assert pool.stats().broken == 1
        with pool.connection() as conn:
            assert conn is not dead
            assert conn.execute("select 1").fetchone() == (1,)


def test_returning_a_connection_with_an_unfinished_stream_does_not_hang(
    postgres_url: str,
) -> None:
    with postgres_pool(postgres_url, min_size=0, max_size=1) as pool:
        conn = pool.acquire()
        rows = conn.cursor().stream("select generate_series(1, 100000)")
        assert next(rows) == (1,)
        assert conn.info.transaction_status == pq.TransactionStatus.ACTIVE
        returner = threading.Thread(target=pool.release, args=(conn,), daemon=True)
        returner.start()
        returner.join(2)
        hung = returner.is_alive()
        if hung:
            rows.close()  # ends the stream and frees the lock: the stuck rollback goes through
            returner.join(10)
            assert not returner.is_alive()
        assert not hung, "release() hung: reset() waits for the lock the open stream holds"
        with pool.connection() as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_terminating_every_pooled_connection_recovers(
    postgres_url: str, admin: psycopg.Connection[Any]
) -> None:
    with postgres_pool(postgres_url, min_size=3, max_size=3, check_interval=0) as pool:
        _eventually(lambda: pool.stats().idle == 3, "min_size=3 filled in the background")
        held = [pool.acquire() for _ in range(3)]
        dead = {conn.info.backend_pid for conn in held}
        for conn in held:
            pool.release(conn)
        assert len(dead) == 3
        _terminate(admin, *dead)

        # Every checkout works: the dead connections fail their checks and are replaced.
        pids: set[int] = set()
        for _ in range(6):
            with pool.connection() as conn:
                assert conn.execute("select pg_backend_pid()").fetchone() == (
                    conn.info.backend_pid,
                )
                pids.add(conn.info.backend_pid)
        held = [pool.acquire() for _ in range(3)]
        try:
            for conn in held:
                assert conn.execute("select 1").fetchone() == (1,)
                pids.add(conn.info.backend_pid)
        finally:
            for conn in held:
                pool.release(conn)
        assert not pids & dead
        stats = pool.stats()
        assert stats.broken == 3
        assert stats.closed == 3
        assert stats.created == 6
        # min_size is back in the background, with live connections only.
        _eventually(lambda: pool.stats().idle == 3, "min_size refilled")
        assert pool.stats().size == 3
        assert admin.execute(
            "select count(*) from pg_stat_activity where pid = any(%s)", (list(pids),)
        ).fetchone() == (3,)


def test_min_size_is_refilled_in_the_background(
    postgres_url: str, admin: psycopg.Connection[Any]
) -> None:
    name = f"buttress-refill-{uuid.uuid4().hex[:8]}"
    with postgres_pool(
        postgres_url, min_size=2, max_size=4, connect_options={"application_name": name}
    ) as pool:
        _eventually(lambda: pool.stats().idle == 2, "min_size=2 filled at start")
        assert _sessions(admin, name) == 2
        held = [pool.acquire() for _ in range(2)]
        for conn in held:
            pool.release(conn, broken=True)  # the borrower says they are broken: both close
        assert pool.stats().broken == 2
        _eventually(lambda: pool.stats().idle == 2, "min_size=2 refilled")
        stats = pool.stats()
        assert stats.created == 4
        assert stats.size == 2
        _eventually(lambda: _sessions(admin, name) == 2, "two server sessions again")


def test_concurrent_queries_from_eight_threads(postgres_url: str) -> None:
    threads, rounds, size = 8, 15, 4
    held_now: set[int] = set()
    guard = threading.Lock()
    pids: set[int] = set()
    start = threading.Barrier(threads)

    with postgres_pool(postgres_url, min_size=1, max_size=size, timeout=30.0) as pool:

        def work(who: int) -> None:
            start.wait()
            for n in range(rounds):
                with pool.connection() as conn:
                    with guard:
                        assert id(conn) not in held_now, "one connection lent twice"
                        held_now.add(id(conn))
                    try:
                        row = conn.execute(
                            "select pg_backend_pid(), %s::int, pg_sleep(0.002)", (who * n,)
                        ).fetchone()
                        assert row is not None
                        assert row[:2] == (conn.info.backend_pid, who * n)
                        with guard:
                            pids.add(row[0])
                    finally:
                        with guard:
                            held_now.discard(id(conn))

        run_threads(work, threads, 60)
        stats = pool.stats()
        assert len(pids) <= size
        assert stats.size <= size
        assert stats.created == len(pids)
        assert stats.in_use == 0
        assert stats.requests == threads * rounds
        assert stats.waits > 0  # eight threads on four connections did queue
        assert stats.broken == 0


async def test_async_with_from_tasks(postgres_url: str) -> None:
    tasks, size = 6, 2
    inside = 0
    most_inside = 0
    with postgres_pool(postgres_url, min_size=0, max_size=size) as pool:

        async def work(who: int) -> int:
            nonlocal inside, most_inside
            async with pool.connection() as conn:
                inside += 1
                most_inside = max(most_inside, inside)
                # The driver is synchronous: run the query off the event loop.
                cursor = await asyncio.to_thread(
                    conn.execute, "select %s::int, pg_sleep(0.01)", (who,)
                )
                row = cursor.fetchone()
                inside -= 1
                assert row is not None
                return int(row[0])

        results = await asyncio.wait_for(asyncio.gather(*(work(n) for n in range(tasks))), 30)
        assert results == list(range(tasks))
        assert most_inside == size
        stats = pool.stats()
        assert stats.in_use == 0
        assert stats.created == size
        assert stats.waits >= tasks - size
        conn = await pool.acquire_async()
        try:
            assert conn.execute("select 1").fetchone() == (1,)
        finally:
            pool.release(conn)


def test_configure_runs_once_per_new_connection(postgres_url: str) -> None:
    configured: list[int] = []

    def configure(conn: psycopg.Connection[Any]) -> None:
        configured.append(id(conn))
        # In a transaction (autocommit is off): the pool commits it, so the setting stays.
        conn.execute("set statement_timeout = '12s'")

    with postgres_pool(postgres_url, min_size=0, max_size=2, configure=configure) as pool:
        for _ in range(5):
            with pool.connection() as conn:
                assert conn.info.transaction_status == pq.TransactionStatus.IDLE
                assert conn.execute("show statement_timeout").fetchone() == ("12s",)
        assert len(configured) == 1
        held = [pool.acquire() for _ in range(2)]
        try:
            assert sorted(configured) == sorted(id(conn) for conn in held)
            for conn in held:
                assert conn.execute("show statement_timeout").fetchone() == ("12s",)
                conn.rollback()  # a borrower's rollback does not undo the committed setting
                assert conn.execute("show statement_timeout").fetchone() == ("12s",)
        finally:
            for conn in held:
                pool.release(conn)
        assert len(configured) == 2 == pool.stats().created


def test_a_failing_configure_fails_the_checkout_and_closes_the_connection(
    postgres_url: str, admin: psycopg.Connection[Any]
) -> None:
    name = f"buttress-configure-{uuid.uuid4().hex[:8]}"
    made: list[psycopg.Connection[Any]] = []

    def configure(conn: psycopg.Connection[Any]) -> None:
        made.append(conn)
        raise RuntimeError("no search path for you")

    with postgres_pool(
        postgres_url,
        min_size=0,
        max_size=1,
        configure=configure,
        connect_options={"application_name": name},
    ) as pool:
        with pytest.raises(RuntimeError, match="search path"):
            pool.acquire()
        assert made
        assert made[0].closed
        stats = pool.stats()
        assert stats.size == 0
        assert stats.in_use == 0
    _eventually(lambda: _sessions(admin, name) == 0, "the session of the failed configure ends")


def test_close_ends_the_server_sessions(postgres_url: str, admin: psycopg.Connection[Any]) -> None:
    name = f"buttress-close-{uuid.uuid4().hex[:8]}"
    pool = postgres_pool(
        postgres_url, min_size=3, max_size=4, connect_options={"application_name": name}
    )
    try:
        _eventually(lambda: pool.stats().idle == 3, "min_size=3 filled")
        with pool.connection() as conn:
            assert conn.execute("show application_name").fetchone() == (name,)
        assert _sessions(admin, name) == 3
    finally:
        assert pool.close() is True
    assert pool.closed
    _eventually(lambda: _sessions(admin, name) == 0, "the pool's sessions to end")
    assert pool.stats().size == 0
    assert pool.stats().closed == 3


def test_close_waits_for_a_borrowed_connection_and_closes_it(
    postgres_url: str, admin: psycopg.Connection[Any]
) -> None:
    name = f"buttress-close-borrowed-{uuid.uuid4().hex[:8]}"
    pool = postgres_pool(
        postgres_url, min_size=1, max_size=2, connect_options={"application_name": name}
    )
    conn = pool.acquire()
    returner = threading.Timer(0.2, pool.release, args=(conn,))
    returner.start()
    try:
        assert pool.close(timeout=10) is True  # waits for the borrower to give it back
    finally:
        returner.join()
    assert conn.closed
    _eventually(lambda: _sessions(admin, name) == 0, "the pool's sessions to end")
