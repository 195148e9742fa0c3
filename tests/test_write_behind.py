"""WriteBehind over the Rust write queue: writes reach the database in batches, faults are
retried and isolated, reads see pending writes, and shutdown loses nothing it could write."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from buttress.caching import DELETED, DictCache, SQLiteDatabase, WriteBehind
from buttress.errors import WriteQueueFullError
from hypothesis import given, settings
from hypothesis import strategies as st


class MemoryDatabase:
    """A dict behind a lock; fails a share of batches, and always for the keys in ``poison``."""

    def __init__(self, failure_rate: float = 0.0, poison: Sequence[str] = ()) -> None:
        self.data: dict[Any, Any] = {}
        self.batches = 0
        self.down = threading.Event()
        self._lock = threading.Lock()
        self._random = random.Random(7)
        self._failure_rate = failure_rate
        self._poison = set(poison)

    def write_batch(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        with self._lock:
            self.batches += 1
            if self.down.is_set() or self._random.random() < self._failure_rate:
                raise ConnectionError("the database is unavailable")
            if any(key in self._poison for key, _, _ in items):
                raise ValueError("a poison row")
            for key, value, deleted in items:
                if deleted:
                    self.data.pop(key, None)
                else:
                    self.data[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            return self.data.get(key, default)


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.sampled_from("abcdefgh"), st.one_of(st.none(), st.integers())), max_size=60
    )
)
def test_after_close_the_database_holds_the_last_write_of_every_key(
    writes: list[tuple[str, int | None]],
) -> None:
    database = MemoryDatabase(failure_rate=0.2)
    store = WriteBehind(
        DictCache(),
        database,
        batch_size=4,
        flush_interval=0.005,
        max_attempts=50,
        retry_backoff=(0.0001, 0.001),
        close_at_exit=False,
    )
    model: dict[str, int] = {}
    for key, value in writes:
        if value is None:
            store.delete(key)
            model.pop(key, None)
        else:
            store.set(key, value)
            model[key] = value
        assert store.get(key) == model.get(key)
    assert store.close(timeout=30) == []
    assert database.data == model


def test_a_poison_key_reaches_the_dead_letter_handler_and_the_rest_arrive(
    quick: dict[str, Any], stores: list[WriteBehind]
) -> None:
    database = MemoryDatabase(failure_rate=0.2, poison=["bad"])
    dead: list[tuple[Any, Any, str]] = []
    store = WriteBehind(
        DictCache(),
        database,
        batch_size=10,
        max_attempts=3,
        dead_letter=lambda key, value, error: dead.append((key, value, type(error).__name__)),
        **quick,
    )
    stores.append(store)
    expected = {}
    for number in range(500):
        key = f"k{number % 40}"
        store.set(key, number)
        expected[key] = number
        if number == 250:
            store.set("bad", "poison")
    assert store.flush(timeout=30)
    assert database.data == expected
    assert [(key, value) for key, value, _ in dead] == [("bad", "poison")]
    assert store.stats()["dead_letters"] == 1


def test_reads_see_pending_writes_the_cache_dropped(quick: dict[str, Any]) -> None:
    database = MemoryDatabase()
    database.down.set()
    cache = DictCache()
    store = WriteBehind(cache, database, max_attempts=1000, **quick)
    store.set("a", 1)
    store.delete("b")
    cache.data.clear()  # evicted, not yet written
    assert store.get("a") == 1
    assert store.get("b", "gone") == "gone"
    database.down.clear()
    assert store.flush(timeout=10)
    cache.data.clear()
    assert store.get("a") == 1  # from the database now, and cached again
    assert cache.data == {"a": 1}
    assert store.close() == []


def test_close_returns_what_could_not_be_written(quick: dict[str, Any]) -> None:
    database = MemoryDatabase()
    database.down.set()
    store = WriteBehind(DictCache(), database, max_attempts=10_000, **quick)
    store.set("a", 1)
    store.delete("b")
    left = store.close(timeout=0.2)
    assert sorted(left, key=repr) == sorted([("a", 1), ("b", DELETED)], key=repr)
    with pytest.raises(RuntimeError, match="closed"):
        store.set("c", 3)


def test_a_full_queue_raises_or_blocks_until_its_timeout(quick: dict[str, Any]) -> None:
    database = MemoryDatabase()
    database.down.set()
    raising = WriteBehind(
        DictCache(), database, max_pending=2, on_full="raise", max_attempts=10_000, **quick
    )
    raising.set("a", 1)
    raising.set("b", 2)
    # The database is down: both stay waiting or in flight, and both count against the room.
    with pytest.raises(WriteQueueFullError):
        raising.set("c", 4)
    assert raising.get("c") is None  # a refused write is not cached either
    blocking = WriteBehind(
        DictCache(),
        database,
        max_pending=1,
        on_full="block",
        full_timeout=0.1,
        max_attempts=10_000,
        **quick,
    )
    blocking.set("a", 1)
    with pytest.raises(WriteQueueFullError):
        blocking.set("b", 2)
    database.down.clear()
    assert raising.close(timeout=10) == []
    assert blocking.close(timeout=10) == []


def test_sqlite_database_batches_upserts_and_deletes(tmp_path: Path, quick: dict[str, Any]) -> None:
    database = SQLiteDatabase(tmp_path / "kv.db")
    with WriteBehind(DictCache(), database, **quick) as store:
        for number in range(100):
            store.set(f"k{number}", f"v{number}".encode())
        store.delete("k5")
        assert store.flush(timeout=10)
    assert database.get("k7") == b"v7"
    assert database.get("k5", "gone") == "gone"
    database.close()


@pytest.mark.parametrize(
    ("options", "error", "name"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"max_pending": "9"}, TypeError, "max_pending"),
        ({"on_full": "drop"}, ValueError, "on_full"),
        ({"flush_interval": -1}, ValueError, "flush_interval"),
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"retry_backoff": (1.0, 0.5)}, ValueError, "retry_backoff"),
        ({"dead_letter": 5}, TypeError, "dead_letter"),
    ],
)
def test_bad_options_name_the_argument(options: dict[str, Any], error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        WriteBehind(DictCache(), MemoryDatabase(), close_at_exit=False, **options)


def test_a_cache_or_database_without_the_protocol_is_refused() -> None:
    with pytest.raises(TypeError, match="cache"):
        WriteBehind(object(), MemoryDatabase(), close_at_exit=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="database"):
        WriteBehind(DictCache(), object(), close_at_exit=False)  # type: ignore[arg-type]


def test_writes_linger_to_share_a_batch_and_flush_sends_them_at_once() -> None:
    database = MemoryDatabase()
    store = WriteBehind(
        DictCache(), database, batch_size=10, flush_interval=30.0, close_at_exit=False
    )
    for number in range(3):
        store.set(f"k{number}", number)
    store.set("k0", "newest")  # replaces the waiting write: the database never sees 0
    assert database.batches == 0  # still lingering for company
    started = time.monotonic()
    assert store.flush(timeout=10)
    assert time.monotonic() - started < 5  # the flush did not wait out the 30 s linger
    assert database.batches == 1
    assert database.data == {"k0": "newest", "k1": 1, "k2": 2}
    assert store.stats()["coalesced"] == 1
    assert store.close() == []


def test_a_full_batch_goes_out_without_waiting_for_the_linger() -> None:
    database = MemoryDatabase()
    store = WriteBehind(
        DictCache(), database, batch_size=4, flush_interval=30.0, close_at_exit=False
    )
    for number in range(4):
        store.set(f"k{number}", number)
    deadline = time.monotonic() + 10
    while database.batches == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert database.batches == 1
    assert len(database.data) == 4
    assert store.close() == []


def test_a_lone_write_waits_no_longer_than_the_flush_interval() -> None:
    database = MemoryDatabase()
    store = WriteBehind(
        DictCache(), database, batch_size=100, flush_interval=0.05, close_at_exit=False
    )
    store.set("k", 1)
    deadline = time.monotonic() + 10
    while database.batches == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert database.data == {"k": 1}
    assert store.close() == []
