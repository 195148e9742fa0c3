"""The SQLite backend: sqlite_pool on a real database file (pytest's tmp_path)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from buttress import ConnectionPool
from buttress.backends.sqlite import check, connect, reset, sqlite_pool
from support import run_threads


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture
def pool(db: Path) -> Iterator[ConnectionPool[sqlite3.Connection]]:
    with sqlite_pool(db, max_size=3, timeout=10.0) as pool:
        with pool.connection() as conn, conn:
            conn.execute("create table t (id integer primary key, who text, n integer)")
        yield pool


def _rows(db: Path, sql: str = "select count(*) from t") -> list[tuple[object, ...]]:
    """Reads with a plain connection of its own: what another process would see."""
    plain = sqlite3.connect(db)
    try:
        return plain.execute(sql).fetchall()
    finally:
        plain.close()


def test_queries_through_the_pool_from_several_threads(
    pool: ConnectionPool[sqlite3.Connection], db: Path
) -> None:
    threads, inserts = 6, 40
    held_now: set[int] = set()
    guard = threading.Lock()
    start = threading.Barrier(threads)

    def work(who: int) -> None:
        start.wait()
        for n in range(inserts):
            with pool.connection() as conn, conn:
                with guard:
                    assert id(conn) not in held_now, "one connection lent to two threads"
                    held_now.add(id(conn))
                try:
                    conn.execute("insert into t (who, n) values (?, ?)", (str(who), n))
                    total = conn.execute("select count(*) from t").fetchone()[0]
                    assert total >= 1
                finally:
                    with guard:
                        held_now.discard(id(conn))

    run_threads(work, threads, 60)
    assert _rows(db) == [(threads * inserts,)]
    assert _rows(db, "select who, count(*) from t group by who order by who") == [
        (str(who), inserts) for who in range(threads)
    ]
    stats = pool.stats()
    assert stats.in_use == 0
    assert 1 <= stats.size <= 3
    assert stats.created == stats.size
    assert stats.broken == 0
    assert stats.requests == threads * inserts + 1  # and the fixture's create table


def test_connections_are_in_wal_mode_and_shared_across_threads(
    pool: ConnectionPool[sqlite3.Connection], db: Path
) -> None:
    held = [pool.acquire() for _ in range(3)]
    try:
        assert len({id(conn) for conn in held}) == 3
        for conn in held:
            assert conn.execute("pragma journal_mode").fetchone() == ("wal",)
            assert conn.execute("pragma synchronous").fetchone() == (1,)  # normal
        # check_same_thread=False: another thread may use a connection the pool lent here.
        result: list[object] = []
        thread = threading.Thread(
            target=lambda: result.append(held[0].execute("select 7").fetchone())
        )
        thread.start()
        thread.join(10)
        assert result == [(7,)]
    finally:
        for conn in held:
            pool.release(conn)
    assert (db.parent / (db.name + "-wal")).exists()
    assert pool.stats().idle == 3


def test_wal_can_be_turned_off(db: Path) -> None:
    with sqlite_pool(db, wal=False) as pool, pool.connection() as conn:
        assert conn.execute("pragma journal_mode").fetchone() == ("delete",)


def test_an_uncommitted_transaction_is_rolled_back_on_return(
    pool: ConnectionPool[sqlite3.Connection], db: Path
) -> None:
    with pool.connection() as conn:
        first = conn
        conn.execute("insert into t (who, n) values ('left open', 1)")
        assert conn.in_transaction
        # Uncommitted: invisible to everyone else.
        assert _rows(db) == [(0,)]
    assert not first.in_transaction  # the return rolled it back
    with pool.connection() as conn:
        assert conn is first  # newest idle first: the same connection comes back
        assert not conn.in_transaction
        assert conn.execute("select count(*) from t").fetchone() == (0,)
        # The rollback also released the write lock: a new write commits at once.
        with conn:
            conn.execute("insert into t (who, n) values ('next', 2)")
    assert _rows(db, "select who from t") == [("next",)]
    stats = pool.stats()
    assert stats.broken == 0
    assert stats.created == 1


def test_a_borrower_that_raises_has_its_transaction_rolled_back(
    pool: ConnectionPool[sqlite3.Connection], db: Path
) -> None:
    def borrow_and_fail() -> None:
        with pool.connection() as conn:
            conn.execute("insert into t (who, n) values ('doomed', 1)")
            raise KeyError("boom")

    with pytest.raises(KeyError):
        borrow_and_fail()
    with pool.connection() as conn:
        assert not conn.in_transaction
        assert conn.execute("select count(*) from t").fetchone() == (0,)
    # An ordinary error does not break a sqlite connection: it is kept.
    assert pool.stats().broken == 0
    assert pool.stats().created == 1


def test_an_unfinished_select_does_not_give_the_next_borrower_a_stale_snapshot(
    pool: ConnectionPool[sqlite3.Connection], db: Path
) -> None:
    with pool.connection() as conn, conn:
        conn.executemany("insert into t (who, n) values ('old', ?)", [(n,) for n in range(5)])
    conn = pool.acquire()
    cursor = conn.execute("select n from t")
    assert cursor.fetchone() == (0,)  # the rest not read: the statement is still running
    assert not conn.in_transaction
    pool.release(conn)
    writer = sqlite3.connect(db)
    try:
        with writer:
            writer.execute("insert into t (who, n) values ('new', 99)")
    finally:
        writer.close()
    assert _rows(db) == [(6,)]
    with pool.connection() as conn:
        seen = conn.execute("select count(*) from t").fetchone()
    cursor.close()
    assert seen == (6,), f"the next borrower saw {seen}: the snapshot of the unfinished select"


@pytest.mark.parametrize("path", [":memory:", ""])
def test_an_in_memory_path_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="database file"):
        sqlite_pool(path)


def test_the_pool_is_named_after_the_file(db: Path) -> None:
    with sqlite_pool(db) as pool:
        assert pool.name == "sqlite:app.db"
        assert pool.max_size == 5
    with sqlite_pool(db, name="mine", max_size=2) as pool:
        assert pool.name == "mine"
        assert pool.max_size == 2


def test_a_connection_the_borrower_closed_is_replaced(
    pool: ConnectionPool[sqlite3.Connection], caplog: pytest.LogCaptureFixture
) -> None:
    with pool.connection() as conn:
        first = conn

    def close_and_use() -> None:
        with pool.connection() as conn:
            assert conn is first
            conn.close()
            conn.execute("select 1")

    with (
        caplog.at_level(logging.WARNING, logger="buttress.pool"),
        pytest.raises(sqlite3.ProgrammingError, match="closed"),
    ):
        close_and_use()
    # The rollback on return fails on the closed connection, so the pool drops it there and
    # says so on its logger; the caller saw only its own error.
    assert any("reset" in record.getMessage() for record in caplog.records)
    stats = pool.stats()
    assert stats.broken == 1
    assert stats.size == 0
    with pool.connection() as conn:
        assert conn is not first
        assert conn.execute("select count(*) from t").fetchone() == (0,)
    stats = pool.stats()
    assert stats.created == 2
    assert stats.in_use == 0


def test_a_closed_idle_connection_fails_its_check_on_checkout(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Closed behind the pool's back while idle (no reset runs then): with check_interval=0 the
    # check on the next checkout finds it and the caller gets a fresh one.
    with sqlite_pool(db, max_size=1, check_interval=0) as pool:
        conn = pool.acquire()
        pool.release(conn)
        conn.close()
        with caplog.at_level(logging.WARNING, logger="buttress.pool"), pool.connection() as fresh:
            assert fresh is not conn
            assert fresh.execute("select 1").fetchone() == (1,)
        assert any("check" in record.getMessage() for record in caplog.records)
        stats = pool.stats()
        assert stats.broken == 1
        assert stats.created == 2
        assert stats.size == 1


def test_the_check_window_skips_the_check_until_a_block_raises(db: Path) -> None:
    checks: list[sqlite3.Connection] = []

    def counting_check(conn: sqlite3.Connection) -> None:
        checks.append(conn)
        check(conn)

    with ConnectionPool(
        lambda: connect(db), check=counting_check, reset=reset, max_size=1, check_interval=60
    ) as pool:
        with pool.connection():
            pass
        with pool.connection():
            pass
        assert checks == []  # used a moment ago: trusted without a check
        with pytest.raises(sqlite3.OperationalError), pool.connection() as conn:
            conn.execute("select * from no_such_table")
        with pool.connection() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert checks == [conn]  # its last block raised: checked before it was lent again
        assert pool.stats().created == 1


async def test_async_with_from_tasks(pool: ConnectionPool[sqlite3.Connection], db: Path) -> None:
    tasks, limit = 8, pool.max_size
    inside = 0
    most_inside = 0

    async def work(who: int) -> None:
        nonlocal inside, most_inside
        async with pool.connection() as conn:
            inside += 1
            most_inside = max(most_inside, inside)
            with conn:
                conn.execute("insert into t (who, n) values (?, ?)", (f"task {who}", who))
            await asyncio.sleep(0.01)  # hold it while the others queue
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(work(who) for who in range(tasks))), 30)
    assert most_inside == limit
    assert _rows(db) == [(tasks,)]
    stats = pool.stats()
    assert stats.in_use == 0
    assert stats.waits >= tasks - limit
    async with pool.connection() as conn:
        assert conn.execute("select count(*) from t").fetchone() == (tasks,)


def test_the_docstring_example(db: Path) -> None:
    with sqlite_pool(db) as pool:
        with pool.connection() as conn, conn:
            _ = conn.execute("create table t (x)")
            _ = conn.execute("insert into t values (42)")
        with pool.connection() as conn:
            assert conn.execute("select x from t").fetchone() == (42,)
            kept = conn
    assert pool.closed
    with pytest.raises(sqlite3.ProgrammingError):  # leaving the pool's block closed it
        kept.execute("select 1")
    assert _rows(db, "select x from t") == [(42,)]  # committed to the file
