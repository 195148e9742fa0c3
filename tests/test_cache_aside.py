"""Cache-aside (single-flight loading, invalidation that a late load cannot undo) and
write-through (the database first; a refused write leaves the cache alone)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from buttress.caching import CacheAside, DictCache, WriteThrough
from support import JOIN, CountingDatabase


def test_sixteen_threads_missing_one_key_load_it_once() -> None:
    database = CountingDatabase(delay=0.05)
    database.data["hot"] = "value"
    cache = CacheAside(DictCache(), database)
    start = threading.Barrier(16)
    got: list[Any] = []

    def read() -> None:
        start.wait(JOIN)
        got.append(cache.get("hot"))

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert got == ["value"] * 16
    assert database.reads == 1
    assert cache.get("hot") == "value"
    assert database.reads == 1  # cached


def test_a_failed_load_reaches_every_waiter_and_caches_nothing() -> None:
    class Broken(CountingDatabase):
        def get(self, key: Any, default: Any = None) -> Any:
            time.sleep(0.05)
            raise ConnectionError("down")

    database = Broken()
    cache = CacheAside(DictCache(), database)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            cache.get("k")
        except ConnectionError as error:
            errors.append(error)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert len(errors) == 8
    assert cache.cache.get("k", "missing") == "missing"


def test_a_write_during_a_load_is_not_undone_by_it() -> None:
    database = CountingDatabase()
    database.data["k"] = "old"
    database.read_gate = threading.Event()
    cache = CacheAside(DictCache(), database)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(cache.get("k")))
    reader.start()
    while database.reads == 0:
        time.sleep(0.001)
    database.read_gate.set()  # the load read "old" already
    cache.put("k", "new")  # while its load is in flight
    reader.join(JOIN)
    assert got == ["old"]
    assert cache.get("k") == "new"  # the late load did not refill the cache with "old"


def test_writes_go_to_the_database_and_invalidate() -> None:
    database = CountingDatabase()
    cache = CacheAside(DictCache(), database, ttl=60)
    cache.put("k", 1)
    assert cache.get("k") == 1
    cache.put("k", 2)
    assert cache.get("k") == 2
    cache.delete("k")
    assert cache.get("k", "gone") == "gone"
    assert database.data == {}


def test_entries_expire_after_their_ttl() -> None:
    database = CountingDatabase()
    database.data["k"] = 1
    cache = CacheAside(DictCache(), database, ttl=0.05)
    assert cache.get("k") == 1
    database.data["k"] = 2
    assert cache.get("k") == 1
    time.sleep(0.06)
    assert cache.get("k") == 2


def test_write_through_writes_the_database_first() -> None:
    database = CountingDatabase()
    store = WriteThrough(DictCache(), database)
    store.put("k", 1)
    assert database.data == {"k": 1}
    assert store.cache.get("k") == 1
    database.refuse = True
    with pytest.raises(ConnectionError):
        store.put("k", 2)
    assert store.get("k") == 1  # the cache was left alone
    database.refuse = False
    store.delete("k")
    assert store.get("k", "gone") == "gone"


@pytest.mark.parametrize("kind", [CacheAside, WriteThrough])
def test_bad_arguments_are_refused(kind: type) -> None:
    with pytest.raises(TypeError, match="cache"):
        kind(object(), CountingDatabase())
    with pytest.raises(TypeError, match="database"):
        kind(DictCache(), object())
    for ttl in (0, -1, float("inf"), "5"):
        with pytest.raises(ValueError, match="ttl"):
            kind(DictCache(), CountingDatabase(), ttl=ttl)
