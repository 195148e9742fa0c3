"""Caching: a write-behind enqueue (``set``: the cache updated, the write queued) beside a
write-behind built the usual way on ``queue.Queue`` with a flusher thread.

Both cache in a dict, both flush to a dict "database" on a thread of their own, and both are
drained and compared with the last value of every key after the run, so a case that lost a
write fails its check.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from _harness import BUTTRESS, Bench, Case, Counts, Made, registrar
from buttress import WriteBehind
from buttress.caching import DictCache

KEYS = [f"user:{number}" for number in range(1000)]
PEER = "queue.Queue"

ENQUEUE_COUNTS = Counts(
    rounds=200, iterations=1000, warmup_rounds=10, interleaved_rounds=200, interleaved_calls=1000
)
ENQUEUE: list[Case] = []
add = registrar(ENQUEUE, ENQUEUE_COUNTS)


class DictDatabase:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def write_batch(self, items: Sequence[tuple[str, Any, bool]]) -> None:
        for key, value, deleted in items:
            if deleted:
                self.data.pop(key, None)
            else:
                self.data[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


class QueueWriteBehind:
    """The usual write-behind: a dict cache and a queue.Queue of writes a thread drains."""

    def __init__(self, database: DictDatabase) -> None:
        self.cache: dict[str, Any] = {}
        self.database = database
        self.writes: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=1_000_000)
        self.flusher = threading.Thread(target=self._run, daemon=True)
        self.flusher.start()

    def set(self, key: str, value: Any) -> None:
        self.cache[key] = value
        self.writes.put((key, value))

    def _run(self) -> None:
        while True:
            item = self.writes.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 100:
                try:
                    more = self.writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.database.write_batch([(k, v, False) for k, v in batch])
                    return
                batch.append(more)
            self.database.write_batch([(k, v, False) for k, v in batch])

    def close(self) -> None:
        self.writes.put(None)
        self.flusher.join(60)


def _checked(database: DictDatabase, last: dict[str, int], writes: list[int]) -> str:
    assert database.data == last, "a write was lost"
    return f"{writes[0]:,} writes, the database holds the last value of all {len(last):,} keys"


@add(BUTTRESS, "WriteBehind.set")
def _() -> Made:
    database = DictDatabase()
    store = WriteBehind(
        DictCache(), database, batch_size=100, max_pending=1_000_000, close_at_exit=False
    )
    keys = itertools.cycle(KEYS)
    last: dict[str, int] = {}
    writes = [0]

    def run() -> bool:
        key = next(keys)
        writes[0] += 1
        store.set(key, writes[0])
        last[key] = writes[0]
        return True

    def verify() -> str:
        assert store.close(timeout=60) == []
        return _checked(database, last, writes)

    return run, verify


@add(PEER, "set: dict cache + Queue.put")
def _() -> Made:
    database = DictDatabase()
    store = QueueWriteBehind(database)
    keys = itertools.cycle(KEYS)
    last: dict[str, int] = {}
    writes = [0]

    def run() -> bool:
        key = next(keys)
        writes[0] += 1
        store.set(key, writes[0])
        last[key] = writes[0]
        return True

    def verify() -> str:
        store.close()
        return _checked(database, last, writes)

    return run, verify


@pytest.mark.benchmark(group="writebehind-enqueue")
@pytest.mark.parametrize("case", ENQUEUE, ids=lambda case: case.id)
def test_writebehind_enqueue(bench: Bench, case: Case) -> None:
    bench(case, expect=True)
