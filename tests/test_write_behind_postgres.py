"""The caching services over a real PostgreSQL key-value table: batches of upserts and
deletes in one statement, write-behind reaching the server, and cache-aside reading from it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from buttress.backends.postgres import PostgresDatabase
from buttress.caching import CacheAside, DictCache, WriteBehind, WriteThrough


@pytest.fixture
def database(postgres_url: str) -> Iterator[PostgresDatabase]:
    table = f"kv_{uuid.uuid4().hex[:10]}"
    made = PostgresDatabase(postgres_url, table=table, max_size=4)
    try:
        yield made
    finally:
        made.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"drop table if exists {table}")


def test_a_batch_upserts_and_deletes_in_one_statement(database: PostgresDatabase) -> None:
    database.write_batch([("a", b"1", False), ("b", b"2", False)])
    database.write_batch([("a", b"3", False), ("b", None, True), ("c", b"", False)])
    assert database.get("a") == b"3"
    assert database.get("b", "gone") == "gone"
    assert database.get("c") == b""


def test_a_bad_batch_changes_nothing(database: PostgresDatabase) -> None:
    database.write_batch([("a", b"1", False)])
    with pytest.raises(TypeError, match="bytes"):
        database.write_batch([("a", b"2", False), ("b", "text", False)])
    with pytest.raises(TypeError, match="str"):
        database.write_batch([(5, b"2", False)])
    assert database.get("a") == b"1"
    assert database.get("b") is None


def test_write_behind_reaches_the_server(database: PostgresDatabase) -> None:
    expected: dict[str, bytes] = {}
    with WriteBehind(
        DictCache(), database, batch_size=50, flush_interval=0.01, close_at_exit=False
    ) as store:
        for number in range(1000):
            key = f"user:{number % 120}"
            store.set(key, str(number).encode())
            expected[key] = str(number).encode()
        store.delete("user:7")
        del expected["user:7"]
        assert store.flush(timeout=30)
    for key, value in expected.items():
        assert database.get(key) == value
    assert database.get("user:7") is None


def test_cache_aside_and_write_through_over_the_server(database: PostgresDatabase) -> None:
    aside = CacheAside(DictCache(), database, ttl=30)
    aside.put("k", b"v")
    assert aside.get("k") == b"v"
    through = WriteThrough(DictCache(), database)
    through.put("k", b"w")
    assert database.get("k") == b"w"
    aside.put("k", b"x")  # invalidates aside's entry
    assert aside.get("k") == b"x"


def test_a_bad_table_name_is_refused(postgres_url: str) -> None:
    with pytest.raises(ValueError, match="table"):
        PostgresDatabase(postgres_url, table="kv; drop table x")
