"""A stateful model of ``WriteBehind`` against a dict database.

The machine writes and deletes keys, reads them back, drops entries from the cache behind the
store's back (an eviction), stalls the database and lets it go, makes it fail the next batches,
and flushes. Some keys are poison: the database refuses every batch holding one. At every read
the store must answer what the model says; at the end, ``close()`` must leave nothing
unwritten, the database must equal the model's final state but for the poison keys, and each
poison key's last write must have reached the dead-letter handler.

Transient failures are budgeted below ``max_attempts``, so only poison keys are ever
dead-lettered and the final state is known; ``test_write_behind.py`` covers dead letters of
writes that failed for other reasons.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from buttress import LocalCache
from buttress.caching import DELETED, DictCache, WriteBehind
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

KEYS = ["a", "b", "c", "d", "e", "f"]
POISON = frozenset({"e", "f"})
MAX_ATTEMPTS = 3
ABSENT: Any = object()


class PoisonableDatabase:
    """A dict behind a lock. While stalled, a batch waits until the database is let go (a
    hung server); ``failures`` batches from now raise (a flaky one); any batch holding a
    poison key is refused. Reads always answer."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.running = threading.Event()
        self.running.set()
        self.failures = 0
        self._lock = threading.Lock()

    def write_batch(self, items: Sequence[tuple[str, Any, bool]]) -> None:
        assert self.running.wait(timeout=60), "the database stayed stalled"
        with self._lock:
            if any(key in POISON for key, _, _ in items):
                raise ValueError("the database refuses a poison key")
            if self.failures:
                self.failures -= 1
                raise ConnectionError("the database failed a batch")
            for key, value, deleted in items:
                if deleted:
                    self.data.pop(key, None)
                else:
                    self.data[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self.data.get(key, default)


class WriteBehindMachine(RuleBasedStateMachine):
    @initialize(
        cache_kind=st.sampled_from(["dict", "local"]),
        batch_size=st.sampled_from([1, 3, 8]),
        flush_interval=st.sampled_from([0.0, 0.001, 0.02]),
    )
    def create(self, cache_kind: str, batch_size: int, flush_interval: float) -> None:
        self.database = PoisonableDatabase()
        # A LocalCache of 2 entries evicts all the time, so reads fall through to the queue
        # and the database.
        self.cache: Any = DictCache() if cache_kind == "dict" else LocalCache(2)
        self.dead: list[tuple[str, Any]] = []
        self.store = WriteBehind(
            self.cache,
            self.database,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_pending=1000,
            max_attempts=MAX_ATTEMPTS,
            batch_retries=1,
            retry_backoff=(0.0001, 0.001),
            dead_letter=lambda key, value, error: self.dead.append((key, value)),
            close_at_exit=False,
        )
        # The newest value of every key written (ABSENT after a delete).
        self.model: dict[str, Any] = {}
        self.serial = 0
        self.failure_budget = MAX_ATTEMPTS - 1

    @rule(key=st.sampled_from(KEYS))
    def write(self, key: str) -> None:
        # Distinct objects, so a stale value can never pass for the newest by equality.
        self.serial += 1
        value = ("value", self.serial)
        self.store.set(key, value)
        self.model[key] = value

    @rule(key=st.sampled_from(KEYS))
    def remove(self, key: str) -> None:
        self.store.delete(key)
        self.model[key] = ABSENT

    @rule(key=st.sampled_from(sorted(set(KEYS) - POISON)))
    def read(self, key: str) -> None:
        expected = self.model.get(key, ABSENT)
        assert self.store.get(key, ABSENT) == expected

    @rule(key=st.sampled_from(KEYS))
    def evict(self, key: str) -> None:
        self.cache.delete(key)

    @rule()
    def stall_the_database(self) -> None:
        self.database.running.clear()

    @rule()
    def let_the_database_go(self) -> None:
        self.database.running.set()

    # An entry alone may fail max_attempts - 1 times and still be written.
    @precondition(lambda self: self.failure_budget > 0)
    @rule(data=st.data())
    def fail_the_next_batches(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(1, self.failure_budget), label="failures")
        self.failure_budget -= count
        self.database.failures += count

    @precondition(lambda self: self.database.running.is_set())
    @rule()
    def flush(self) -> None:
        assert self.store.flush(timeout=30)
        written = {key: value for key, value in self.model.items() if value is not ABSENT}
        assert self.database.data == {k: v for k, v in written.items() if k not in POISON}

    @invariant()
    def the_queue_stays_within_its_bounds(self) -> None:
        stats = self.store.stats()
        assert 0 <= stats["in_flight"] <= stats["depth"] <= 2 * len(KEYS)

    def teardown(self) -> None:
        if not hasattr(self, "store"):
            return
        self.database.running.set()
        assert self.store.close(timeout=30) == []
        written = {key: value for key, value in self.model.items() if value is not ABSENT}
        assert self.database.data == {k: v for k, v in written.items() if k not in POISON}
        last_dead: dict[str, Any] = {}
        for key, value in self.dead:
            last_dead[key] = ABSENT if value is DELETED else value
        for key in POISON & self.model.keys():
            assert last_dead.get(key, "never dead-lettered") == self.model[key], key
        assert set(last_dead) <= POISON
        assert self.store.stats()["dead_letters"] == len(self.dead)


TestWriteBehindAgreesWithModel = WriteBehindMachine.TestCase
TestWriteBehindAgreesWithModel.settings = settings(
    max_examples=min(settings().max_examples, 100), stateful_step_count=40
)
