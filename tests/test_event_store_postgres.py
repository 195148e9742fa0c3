"""``PostgresEventStore`` on a real PostgreSQL server, held to what ``EventStore`` does.

The parity tests run every call on an in-memory ``EventStore`` and on a PostgreSQL store side
by side, with the same events (the same ids), and compare what each answered: results, errors
and their attributes, and everything a reader can see afterwards. The concurrency tests append
from several threads and several processes at once, to the same streams and to their own, with
expected versions, while readers poll the global order and check that they never see a
position before every earlier one. Then subscriptions (blocking and asyncio, woken by
``NOTIFY``), a closed store, a listener connection killed on the server, and the schema created
by several stores at once.

Every test makes tables of its own (a fresh ``table_prefix``) and drops them afterwards, even
when it fails; at the end of the module nothing named from this module's prefix may be left.
Every test takes the ``postgres_url`` fixture, so it skips (or fails, with
``BUTTRESS_REQUIRE_SERVICES=1``) when no server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from buttress import (
    AppendResult,
    DuplicateEventError,
    EventStore,
    EventStoreClosedError,
    NewEvent,
    RecordedEvent,
    WrongExpectedVersionError,
)
from buttress.backends.postgres_events import PostgresEventStore
from buttress.events.store import EventStoreLike, Subscription
from event_postgres import drop_event_tables, event_leftovers
from support import JOIN, background, run_threads, wait_until
from test_event_store import (
    BAD_CALLS,
    EMPTY_CASES,
    EXISTING_CASES,
    PARTIAL_REUSE,
    check_log,
    collect,
    event,
    snapshot,
    take,
    vp,
)

# Every table and function a test here makes is named from this (plus a suffix of its own).
MODULE_PREFIX = f"bt_pges_{uuid.uuid4().hex[:8]}"
# Small pools: several stores per test stay far below the server's connections.
POOL: dict[str, Any] = {"max_size": 4}
TESTS_DIR = Path(__file__).resolve().parent
# The longest a child process may take to do its part.
CHILD_TIMEOUT = 60.0


# -- tables, stores and their cleanup ------------------------------------------------------------


def backends_using(url: str, prefix: str) -> set[int]:
    """The server sessions whose last statement named `prefix`'s tables (or channel)."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "select pid from pg_stat_activity where pid <> pg_backend_pid() "
            "and datname = current_database() and position(%s in query) > 0",
            (prefix,),
        ).fetchall()
    return {int(pid) for (pid,) in rows}


class Tables:
    """What one test makes on the server: fresh prefixes and the stores opened on them. At the
    end every store is closed, then every prefix's tables and function are dropped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefixes: list[str] = []
        self.stores: list[PostgresEventStore] = []

    def prefix(self) -> str:
        made = f"{MODULE_PREFIX}_{uuid.uuid4().hex[:10]}"
        self.prefixes.append(made)
        return made

    def store(self, prefix: str | None = None, **options: Any) -> PostgresEventStore:
        opened = PostgresEventStore(
            self.url, table_prefix=prefix or self.prefix(), **{**POOL, **options}
        )
        self.stores.append(opened)
        return opened

    def close(self) -> None:
        try:
            for opened in self.stores:
                with contextlib.suppress(Exception):
                    opened.close()
        finally:
            for prefix in self.prefixes:
                drop_event_tables(self.url, prefix)


@pytest.fixture(scope="module", autouse=True)
def _nothing_is_left_behind(postgres_url: str) -> Iterator[None]:
    yield
    assert event_leftovers(postgres_url, MODULE_PREFIX) == [], "tables or functions left behind"


@pytest.fixture
def tables(postgres_url: str) -> Iterator[Tables]:
    made = Tables(postgres_url)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def store(tables: Tables) -> PostgresEventStore:
    return tables.store()


@pytest.fixture
def pair(tables: Tables) -> Iterator[tuple[EventStore, PostgresEventStore]]:
    """An in-memory store and a PostgreSQL one, both empty, to run the same calls on."""
    memory = EventStore()
    try:
        yield memory, tables.store()
    finally:
        memory.close()


def test_the_cleanup_drops_everything_even_when_a_test_fails(postgres_url: str) -> None:
    made = Tables(postgres_url)
    prefix = made.prefix()

    def fail_inside() -> None:
        try:
            opened = made.store(prefix)
            opened.append("s", [event()])
            assert event_leftovers(postgres_url, prefix) != []
            raise RuntimeError("inside the test")
        finally:
            made.close()

    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert event_leftovers(postgres_url, prefix) == []
    wait_until(lambda: not backends_using(postgres_url, prefix))


# -- comparing the two stores ----------------------------------------------------------------------


def attempt(call: Callable[[], Any]) -> Any:
    """What `call` returned, or what it raised (a Rust panic included: it is a BaseException)."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as error:
        return error


def plain(value: Any) -> Any:
    """A result in a form that compares across stores: events without their timestamps."""
    if isinstance(value, RecordedEvent):
        return (
            value.stream,
            value.version,
            value.position,
            value.id,
            value.type,
            value.data,
            value.metadata,
        )
    if isinstance(value, AppendResult):
        return ("AppendResult", value.version, value.position)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value


def assert_same(memory: Any, postgres: Any) -> None:
    """The two stores answered alike: equal results, or errors of the same type (with the same
    attributes and message, for a wrong expected version)."""
    if isinstance(memory, BaseException) or isinstance(postgres, BaseException):
        assert type(postgres) is type(memory), f"memory: {memory!r}; postgres: {postgres!r}"
        if isinstance(memory, WrongExpectedVersionError):
            assert isinstance(postgres, WrongExpectedVersionError)
            assert (postgres.stream, postgres.expected, postgres.actual) == (
                memory.stream,
                memory.expected,
                memory.actual,
            )
            assert str(postgres) == str(memory)
        return
    assert plain(postgres) == plain(memory)


def on_both(
    pair: tuple[EventStore, PostgresEventStore], call: Callable[[Any], Any]
) -> tuple[Any, Any]:
    """`call(store)` on each store; asserts they answered alike and returns both answers."""
    memory, postgres = pair
    answers = attempt(lambda: call(memory)), attempt(lambda: call(postgres))
    assert_same(*answers)
    return answers


def assert_same_contents(pair: tuple[EventStore, PostgresEventStore]) -> None:
    memory, postgres = pair
    assert snapshot(postgres) == snapshot(memory)
    for stream in [*memory.streams(), "never-written"]:
        assert postgres.stream_version(stream) == memory.stream_version(stream)


# -- what the store is ---------------------------------------------------------------------------


def test_the_store_has_the_event_store_protocol(store: PostgresEventStore) -> None:
    assert isinstance(store, EventStoreLike)
    assert store.blocks is True
    assert store.path is None
    assert store.closed is False
    assert store.head == 0
    assert store.streams() == []
    assert store.read_all() == []
    assert store.stream_version("s") is None
    assert f"table_prefix='{store._prefix}'" in repr(store)
    assert isinstance(store.subscribe(), Subscription)


# -- appends and reads, side by side -------------------------------------------------------------


def test_appends_get_versions_and_positions_as_in_memory(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    placed = NewEvent("Placed", b'{"total": 30}', b'{"by": "ann"}', id=uuid.UUID(int=7))
    steps: list[Callable[[Any], Any]] = [
        lambda s: s.append("order-1", [placed, event("Priced", n=8)], expected_version="no_stream"),
        lambda s: s.append("cart-9", event("Opened", n=9)),
        lambda s: s.append("order-1", [event("Paid", n=10)], expected_version=1),
        lambda s: s.append("order-1", [event("Shipped", n=11)], "stream_exists"),
        lambda s: s.append("order-1", (event("Closed", n=12),), "any"),
        lambda s: s.append("cart-9", [event("Closed", n=13)], None),
        lambda s: s.append("cart-9", iter([event("Iterated", n=14)])),
        lambda s: s.append_many(
            [
                ("cart-9", [event("Many", n=15)], 2),
                ("new", event("Many", n=16), "no_stream"),
                ("order-1", [event("Many", n=17), event("Many", n=18)], "stream_exists"),
            ]
        ),
        lambda s: s.append_many(r for r in [("new", [event(n=19)], 0)]),
    ]
    for step in steps:
        _, postgres = on_both(pair, step)
        assert not isinstance(postgres, BaseException), postgres
    assert_same_contents(pair)
    _, store = pair
    assert store.head == 13
    assert store.streams() == ["cart-9", "new", "order-1"]
    stored = store.read_stream("order-1")
    assert [(e.type, e.version, e.position) for e in stored[:3]] == [
        ("Placed", 0, 0),
        ("Priced", 1, 1),
        ("Paid", 2, 3),
    ]
    first = stored[0]
    assert isinstance(first, RecordedEvent)
    assert first.id == uuid.UUID(int=7)
    assert (first.data, first.metadata) == (b'{"total": 30}', b'{"by": "ann"}')
    assert abs(first.timestamp - time.time()) < 60
    assert first.timestamp == stored[1].timestamp, "the events of one append share a timestamp"
    many = store.read_all(8, limit=4)
    assert [e.stream for e in many] == ["cart-9", "new", "order-1", "order-1"]
    assert len({e.timestamp for e in many}) == 1, "so do those of one append_many"
    assert first == store.read_all(limit=1)[0]
    assert hash(first) == hash(store.read_all(limit=1)[0])


def test_data_and_names_round_trip(pair: tuple[EventStore, PostgresEventStore]) -> None:
    everything = bytes(range(256))
    big = everything * 4096  # 1 MiB
    events = [
        NewEvent("Ünïcode type ✓", everything, everything[::-1], id=uuid.UUID(int=1)),
        NewEvent("Empty", id=uuid.UUID(int=2)),
        NewEvent("Views", bytearray(b"ba"), memoryview(b"mv"), id=uuid.UUID(int=3)),
        NewEvent("Big", big, b"\x00" * 10, id=uuid.UUID(int=4)),
        NewEvent("Quotes ' \" $$ \\", b"'; drop table x; --", id=uuid.UUID(int=5)),
    ]
    names = ["ストリーム/ü 1", "with 'quotes' and $$", "percent%_under", " spaces ", "x" * 5000]
    on_both(pair, lambda s: s.append(names[0], events))
    for number, name in enumerate(names[1:]):
        on_both(pair, lambda s, n=number, name=name: s.append(name, [event(name[:40], n=100 + n)]))
    assert_same_contents(pair)
    _, store = pair
    got = store.read_stream(names[0])
    assert [(e.type, e.data, e.metadata) for e in got] == [
        ("Ünïcode type ✓", everything, everything[::-1]),
        ("Empty", b"", b""),
        ("Views", b"ba", b"mv"),
        ("Big", big, b"\x00" * 10),
        ("Quotes ' \" $$ \\", b"'; drop table x; --", b""),
    ]
    assert all(isinstance(e.data, bytes) and isinstance(e.metadata, bytes) for e in got)


def test_streams_sort_in_code_point_order_as_in_memory(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    names = ["b", "B", "a", "é", "f", "Z", "ä", "a-1", "a_1", "a1", "日本", "😀", "~"]
    for name in names:
        on_both(pair, lambda s, name=name: s.append(name, [event()]))
    memory, store = pair
    assert store.streams() == memory.streams() == sorted(names)


def _filled(pair: tuple[EventStore, PostgresEventStore]) -> None:
    for n in range(10):
        stream = "even" if n % 2 == 0 else "odd"
        on_both(
            pair, lambda s, n=n, stream=stream: s.append(stream, [event(data=bytes([n]), n=n + 1)])
        )
    on_both(
        pair,
        lambda s: s.append_many(
            [("odd", [event(n=50), event(n=51)], None), ("x", [event(n=52)], None)]
        ),
    )


FROM_VERSIONS = [None, 0, 1, 3, 4, 5, 6, 9, 99, 2**63 - 1, 2**63, 2**64 - 1]
LIMITS = [None, 0, 1, 2, 3, 100, 2**63 - 1]


@pytest.mark.parametrize("backwards", [False, True])
def test_stream_reads_forwards_backwards_from_and_limited_as_in_memory(
    pair: tuple[EventStore, PostgresEventStore], backwards: bool
) -> None:
    _filled(pair)
    for stream in ["even", "odd", "x", "nothing-here"]:
        for from_version in FROM_VERSIONS:
            for limit in LIMITS:
                on_both(
                    pair,
                    lambda s, stream=stream, v=from_version, limit=limit: s.read_stream(
                        stream, v, backwards=backwards, limit=limit
                    ),
                )
    _, store = pair
    assert [e.version for e in store.read_stream("even", 1, backwards=True)] == [1, 0]
    assert [e.version for e in store.read_stream("odd", 99, backwards=True, limit=2)] == [6, 5]
    assert [e.data for e in store.read_stream("odd", 2, limit=2)] == [b"\x05", b"\x07"]


def test_global_reads_from_and_limited_as_in_memory(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    _filled(pair)
    for from_position in [None, 0, 1, 7, 10, 12, 13, 14, 10**12, 2**63 - 1, 2**63, 2**64 - 1]:
        for limit in LIMITS:
            on_both(pair, lambda s, p=from_position, limit=limit: s.read_all(p, limit=limit))
    _, store = pair
    assert [e.position for e in store.read_all(7)] == [7, 8, 9, 10, 11, 12]
    assert [e.position for e in store.read_all(2, limit=3)] == [2, 3, 4]
    assert store.head == 13


def test_poll_answers_as_in_memory(pair: tuple[EventStore, PostgresEventStore]) -> None:
    _filled(pair)
    on_both(pair, lambda s: s.append("even-more", [event("Rare", n=60), event("Common", n=61)]))
    for from_position in [0, 1, 5, 12, 14, 15, 40]:
        for limit in [1, 2, 5, 256]:
            for prefix in [None, "", "even", "odd", "x", "none"]:
                for types in [None, set(), {"Happened"}, {"Rare", "Other"}]:
                    on_both(
                        pair,
                        lambda s, p=from_position, limit=limit, prefix=prefix, t=types: s.poll(
                            p, limit, 0, prefix, t
                        ),
                    )


# -- expected versions -----------------------------------------------------------------------------


@pytest.mark.parametrize(("expected", "phrase"), EMPTY_CASES)
def test_wrong_expected_version_of_a_missing_stream(
    pair: tuple[EventStore, PostgresEventStore], expected: str | int, phrase: str
) -> None:
    on_both(pair, lambda s: s.append("other", [event(n=1)]))
    _, error = on_both(pair, lambda s: s.append("order-7", [event(n=2)], expected_version=expected))
    assert isinstance(error, WrongExpectedVersionError)
    assert (error.stream, error.expected, error.actual) == ("order-7", str(expected), None)
    assert phrase in str(error)
    assert "it has no events" in str(error)
    assert_same_contents(pair)


# The versions past 2**63 - 1 are the subject of test_an_expected_version_past_a_bigint_...
SMALL_EXISTING_CASES = [
    case for case in EXISTING_CASES if not (isinstance(case[0], int) and case[0] >= 2**63)
]


@pytest.mark.parametrize(
    ("expected", "phrase"), [*SMALL_EXISTING_CASES, (2**63 - 1, "at version 9223372036854775807")]
)
def test_wrong_expected_version_of_an_existing_stream(
    pair: tuple[EventStore, PostgresEventStore], expected: str | int, phrase: str
) -> None:
    on_both(pair, lambda s: s.append("order-7", [event(n=1), event(n=2)]))
    _, error = on_both(pair, lambda s: s.append("order-7", [event(n=3)], expected_version=expected))
    assert isinstance(error, WrongExpectedVersionError)
    assert (error.stream, error.expected, error.actual) == ("order-7", str(expected), 1)
    assert phrase in str(error)
    assert "it is at version 1" in str(error)
    assert_same_contents(pair)


@pytest.mark.parametrize("expected", [2**63, 2**64 - 1])
def test_an_expected_version_past_a_bigint_is_a_wrong_version_as_in_memory(
    pair: tuple[EventStore, PostgresEventStore], expected: int
) -> None:
    on_both(pair, lambda s: s.append("order-7", [event(n=1), event(n=2)]))
    _, error = on_both(pair, lambda s: s.append("order-7", [event(n=3)], expected_version=expected))
    assert isinstance(error, WrongExpectedVersionError)
    assert error.expected == str(expected)


def test_a_failed_expectation_in_append_many_stores_nothing(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    on_both(pair, lambda s: s.append("a", [event(n=1)]))
    _, error = on_both(
        pair,
        lambda s: s.append_many(
            [
                ("b", [event(n=2), event(n=3)], "no_stream"),
                ("a", [event(n=4)], 0),
                ("c", [event(n=5)], "stream_exists"),
            ]
        ),
    )
    # The first request that does not hold is the one reported.
    assert (error.stream, error.expected, error.actual) == ("c", "stream_exists", None)
    _, error = on_both(
        pair, lambda s: s.append_many([("b", [event(n=6)], None), ("a", [event(n=7)], "no_stream")])
    )
    assert (error.stream, error.expected, error.actual) == ("a", "no_stream", 0)
    assert_same_contents(pair)
    _, results = on_both(
        pair,
        lambda s: s.append_many(
            [
                ("b", [event(n=2), event(n=3)], "no_stream"),
                ("a", [event(n=4)], 0),
                ("c", event(n=5), None),
            ]
        ),
    )
    assert vp(results) == [(1, 2), (1, 3), (0, 4)]
    # One append, one position range: the events of append_many are consecutive.
    _, store = pair
    assert [e.stream for e in store.read_all(1)] == ["b", "b", "a", "c"]
    assert_same_contents(pair)


# -- idempotency -----------------------------------------------------------------------------------


def test_a_retried_append_returns_the_original_result(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    first = [event(n=1), event(n=2)]
    _, original = on_both(pair, lambda s: s.append("s", first, expected_version="no_stream"))
    on_both(pair, lambda s: s.append("s", [event(n=3)], expected_version=1))
    on_both(pair, lambda s: s.append("t", [event(n=4)]))
    before = snapshot(pair[1])
    # The same NewEvent objects, with the original (now stale) expected version.
    assert (
        on_both(pair, lambda s: s.append("s", first, expected_version="no_stream"))[1] == original
    )
    # New objects with the same ids are the same retry, whatever they expect now.
    for expected in [5, "no_stream", "stream_exists", "any", None]:
        again = on_both(pair, lambda s, e=expected: s.append("s", [event(n=1), event(n=2)], e))[1]
        assert again == original
    assert vp(on_both(pair, lambda s: s.append("s", (event(n=3),)))[1]) == (2, 2)
    assert vp(on_both(pair, lambda s: s.append("s", event(n=3), "no_stream"))[1]) == (2, 2)
    # Another type or data under a stored id is still that retry: the ids tell.
    assert vp(on_both(pair, lambda s: s.append("t", [event("Other", b"x", n=4)]))[1]) == (0, 3)
    assert snapshot(pair[1]) == before
    assert_same_contents(pair)


def test_a_retried_append_many_returns_the_original_results(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    appends = [("a", [event(n=1)], "no_stream"), ("b", [event(n=2), event(n=3)], "no_stream")]
    _, original = on_both(pair, lambda s: s.append_many(appends))
    on_both(pair, lambda s: s.append("a", [event(n=4)]))
    before = snapshot(pair[1])
    assert on_both(pair, lambda s: s.append_many(appends))[1] == original
    assert vp(original) == [(0, 0), (1, 2)]
    # Its requests in another order are the same append (each stream's events in order).
    _, swapped = on_both(pair, lambda s: s.append_many(appends[::-1]))
    assert vp(swapped) == [(1, 2), (0, 0)]
    # The exact retry plus anything new is not a retry; nor is one of its requests alone.
    _, error = on_both(pair, lambda s: s.append_many([*appends, ("c", [event(n=5)], None)]))
    assert isinstance(error, DuplicateEventError)
    _, error = on_both(pair, lambda s: s.append_many(appends[1:]))
    assert isinstance(error, DuplicateEventError)
    assert snapshot(pair[1]) == before
    assert_same_contents(pair)


@pytest.mark.parametrize("attempt_", PARTIAL_REUSE.values(), ids=PARTIAL_REUSE.keys())
def test_reusing_ids_other_than_as_a_retry_is_refused(
    pair: tuple[EventStore, PostgresEventStore],
    attempt_: Callable[[], tuple[str, list[NewEvent]]],
) -> None:
    on_both(pair, lambda s: s.append("s", [event(n=1), event(n=2)]))
    on_both(pair, lambda s: s.append("s", [event(n=3)]))
    before = snapshot(pair[1])
    stream, events = attempt_()
    _, error = on_both(pair, lambda s: s.append(stream, events))
    assert isinstance(error, DuplicateEventError)
    assert uuid.UUID(error.event_id) in {e.id for e in events}
    assert uuid.UUID(error.event_id) in {uuid.UUID(int=n) for n in (1, 2, 3)}, "a stored id"
    assert "repeat the original exactly" in str(error)
    assert error.event_id in str(error)
    assert snapshot(pair[1]) == before
    # The ids that were not stored are still free.
    assert vp(on_both(pair, lambda s: s.append("u", [event(n=9)]))[1]) == (0, 3)
    assert_same_contents(pair)


@pytest.mark.parametrize("part", [[1], [2], [3], [2, 3], [1, 2], [1, 3], [3, 2, 1]])
def test_a_part_of_an_earlier_append_is_not_a_retry(
    pair: tuple[EventStore, PostgresEventStore], part: list[int]
) -> None:
    on_both(pair, lambda s: s.append("s", [event(n=1), event(n=2), event(n=3)]))
    _, error = on_both(pair, lambda s: s.append("s", [event(n=n) for n in part]))
    assert isinstance(error, DuplicateEventError)
    assert_same_contents(pair)


@pytest.mark.parametrize("how", ["as one append", "a part and another", "across streams"])
def test_earlier_appends_combined_are_not_a_retry(
    pair: tuple[EventStore, PostgresEventStore], how: str
) -> None:
    on_both(pair, lambda s: s.append("s", [event(n=1), event(n=2)]))
    on_both(pair, lambda s: s.append("s", [event(n=3)]))
    on_both(pair, lambda s: s.append("t", [event(n=4)]))
    attempts: dict[str, Callable[[Any], Any]] = {
        "as one append": lambda s: s.append("s", [event(n=1), event(n=2), event(n=3)]),
        "a part and another": lambda s: s.append("s", [event(n=2), event(n=3)]),
        "across streams": lambda s: s.append_many(
            [("s", [event(n=3)], None), ("t", [event(n=4)], None)]
        ),
    }
    _, error = on_both(pair, attempts[how])
    assert isinstance(error, DuplicateEventError)
    assert_same_contents(pair)


def test_two_earlier_appends_of_one_stream_in_one_append_many_are_refused(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    """Both stores refuse it and store nothing (which error each gives is the subject of
    test_a_malformed_append_is_refused_alike...)."""
    for opened in pair:
        opened.append("s", [event(n=1), event(n=2)])
        opened.append("s", [event(n=3)])
        with pytest.raises((DuplicateEventError, ValueError)):
            opened.append_many([("s", [event(n=1), event(n=2)], None), ("s", [event(n=3)], None)])
    assert_same_contents(pair)


def test_an_exact_retry_with_an_empty_request_added_is_refused_as_bad_input(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    on_both(pair, lambda s: s.append("a", [event(n=1), event(n=2)]))
    _, postgres = on_both(
        pair, lambda s: s.append_many([("a", [event(n=1), event(n=2)], None), ("b", [], None)])
    )
    assert type(postgres) is ValueError
    assert "no events" in str(postgres)
    assert_same_contents(pair)


def test_an_earlier_append_split_over_two_requests_of_its_stream_is_not_a_retry(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    on_both(pair, lambda s: s.append("a", [event(n=1), event(n=2)]))
    _, postgres = on_both(
        pair, lambda s: s.append_many([("a", [event(n=1)], None), ("a", [event(n=2)], None)])
    )
    assert isinstance(postgres, (ValueError, DuplicateEventError))
    assert_same_contents(pair)


MALFORMED = {
    "a stream twice": lambda: [("a", [event()], "no_stream"), ("a", [event()], None)],
    "an empty request": lambda: [("a", [event()], "no_stream"), ("b", [], None)],
    "an id twice": lambda: [("a", [event()], "no_stream"), ("b", [event(n=77), event(n=77)], None)],
}


@pytest.mark.parametrize("make", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_append_with_a_stale_expectation_is_refused_and_stores_nothing(
    pair: tuple[EventStore, PostgresEventStore], make: Callable[[], Any]
) -> None:
    on_both(pair, lambda s: s.append("a", [event(n=1)]))
    appends = make()
    for opened in pair:
        with pytest.raises((ValueError, DuplicateEventError, WrongExpectedVersionError)):
            opened.append_many(appends)
    assert_same_contents(pair)


@pytest.mark.parametrize("make", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_append_with_a_stale_expectation_is_refused_alike(
    pair: tuple[EventStore, PostgresEventStore], make: Callable[[], Any]
) -> None:
    on_both(pair, lambda s: s.append("a", [event(n=1)]))
    appends = make()
    on_both(pair, lambda s: s.append_many(appends))


def test_retries_are_recognised_after_a_reopen(tables: Tables) -> None:
    prefix = tables.prefix()
    with tables.store(prefix) as store:
        one = store.append("s", [event(n=1), event(n=2)], expected_version="no_stream")
        many = store.append_many([("s", [event(n=3)], 1), ("t", [event(n=4)], "no_stream")])
    reopened = tables.store(prefix)
    assert reopened.head == 4
    assert reopened.append("s", [event(n=1), event(n=2)], "no_stream") == one
    assert reopened.append_many([("s", [event(n=3)], 1), ("t", [event(n=4)], "no_stream")]) == many
    with pytest.raises(DuplicateEventError):
        reopened.append("s", [event(n=2), event(n=3)])
    assert reopened.head == 4
    check_log(reopened)


# -- bad input -------------------------------------------------------------------------------------

# The cases of test_event_store's table where PostgresEventStore does not answer as EventStore
# does have tests of their own below, marked as the bugs they are.
KNOWN_BAD = {"int appends", "huge from_version", "negative timeout", "nan timeout"}
PARITY_CALLS = {name: case for name, case in BAD_CALLS.items() if name not in KNOWN_BAD}


@pytest.mark.parametrize(("call", "error", "text"), PARITY_CALLS.values(), ids=PARITY_CALLS.keys())
def test_bad_input_is_refused_as_in_memory_and_changes_nothing(
    pair: tuple[EventStore, PostgresEventStore],
    call: Callable[[Any], Any],
    error: type[Exception],
    text: str,
) -> None:
    on_both(pair, lambda s: s.append("s", [event(n=1), event(n=2)]))
    on_both(pair, lambda s: s.append("a", [event(n=3)]))
    before = snapshot(pair[1])
    memory, postgres = on_both(pair, call)
    for raised in (memory, postgres):
        assert isinstance(raised, error), raised
        assert text in str(raised), f"{text!r} not in {str(raised)!r}"
    assert snapshot(pair[1]) == before
    assert_same_contents(pair)
    # The store goes on as before.
    assert vp(on_both(pair, lambda s: s.append("s", [event(n=4)], expected_version=1))[1]) == (2, 3)


@pytest.mark.parametrize("read", ["read_stream", "read_all"])
def test_a_bool_limit_is_refused(pair: tuple[EventStore, PostgresEventStore], read: str) -> None:
    arguments = ("s",) if read == "read_stream" else ()
    _, error = on_both(pair, lambda s: getattr(s, read)(*arguments, limit=True))
    assert isinstance(error, TypeError)
    assert "limit" in str(error)


def test_append_many_of_a_non_iterable_names_appends(
    pair: tuple[EventStore, PostgresEventStore],
) -> None:
    for raised in on_both(pair, lambda s: s.append_many(5)):
        assert isinstance(raised, TypeError)
        assert "appends" in str(raised), str(raised)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.read_stream("s", 2**64),
        lambda s: s.read_stream("s", 2**64, backwards=True),
        lambda s: s.read_all(2**64),
        lambda s: s.read_all(10**30),
    ],
    ids=["from_version", "from_version backwards", "from_position", "from_position 10**30"],
)
def test_a_position_past_u64_is_refused_as_in_memory(
    pair: tuple[EventStore, PostgresEventStore], call: Callable[[Any], Any]
) -> None:
    on_both(pair, lambda s: s.append("s", [event(n=1)]))
    _, postgres = on_both(pair, call)
    assert isinstance(postgres, ValueError)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.read_all(limit=2**63),
        lambda s: s.read_stream("s", limit=2**63),
        lambda s: s.read_stream("s", backwards=True, limit=2**64 - 1),
        lambda s: s.read_all(limit=2**64),
    ],
    ids=["read_all 2**63", "read_stream 2**63", "backwards 2**64-1", "read_all 2**64"],
)
def test_a_huge_limit_reads_as_in_memory(
    pair: tuple[EventStore, PostgresEventStore], call: Callable[[Any], Any]
) -> None:
    on_both(pair, lambda s: s.append("s", [event(n=1), event(n=2)]))
    on_both(pair, call)


@pytest.mark.parametrize("timeout", [-1, -0.5, math.nan])
def test_a_bad_timeout_is_refused_as_in_memory(
    pair: tuple[EventStore, PostgresEventStore], timeout: float
) -> None:
    memory, store = pair
    with pytest.raises(ValueError, match="timeout"):
        memory.subscribe(100).next(timeout=timeout)
    answers: list[Any] = []
    waiter = threading.Thread(
        target=lambda: answers.append(attempt(lambda: store.subscribe(100).next(timeout=timeout))),
        daemon=True,
    )
    waiter.start()
    waiter.join(2.0)
    if waiter.is_alive():
        store.close()  # frees the waiter
        waiter.join(JOIN)
        pytest.fail(f"next(timeout={timeout}) was still waiting after 2 s")
    (answer,) = answers
    assert isinstance(answer, ValueError), answer
    assert "timeout" in str(answer)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.append("a\x00b", [event()]),
        lambda s: s.append_many([("ok", [event()], None), ("\x00", [event()], None)]),
        lambda s: s.read_stream("a\x00"),
        lambda s: s.stream_version("\x00"),
    ],
    ids=["append", "append_many", "read_stream", "stream_version"],
)
def test_a_nul_in_a_stream_name_is_refused_naming_stream(
    store: PostgresEventStore, call: Callable[[Any], Any]
) -> None:
    """PostgreSQL text cannot hold NUL, so this store refuses such names (EventStore takes them)."""
    store.append("ok", [event(n=1)])
    before = snapshot(store)
    with pytest.raises(ValueError, match="stream") as raised:
        call(store)
    assert "NUL" in str(raised.value)
    assert snapshot(store) == before


def test_a_nul_in_an_event_type_is_refused_naming_type(store: PostgresEventStore) -> None:
    store.append("ok", [event(n=1)])
    before = snapshot(store)
    with pytest.raises(ValueError, match="type"):
        store.append("s", [NewEvent("Bad\x00Type")])
    assert snapshot(store) == before


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "Upper_Case",
        "1starts_with_digit",
        "has-dash",
        "has space",
        "semi;colon",
        "a" * 42,
        "ü",
        5,
        None,
    ],
)
def test_a_bad_table_prefix_is_refused_and_creates_nothing(postgres_url: str, prefix: Any) -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        PostgresEventStore(postgres_url, table_prefix=prefix)
    if isinstance(prefix, str) and prefix:
        assert event_leftovers(postgres_url, f"{prefix}_") == []
        assert event_leftovers(postgres_url, f"{prefix.lower()}_") == []


def test_the_longest_table_prefix_works(tables: Tables) -> None:
    prefix = MODULE_PREFIX + "_" + "x" * (41 - len(MODULE_PREFIX) - 1)
    assert len(prefix) == 41
    tables.prefixes.append(prefix)
    with tables.store(prefix) as store:
        subscription = store.subscribe()
        assert vp(store.append("s", [event()], "no_stream")) == (0, 0)
        found = subscription.next(timeout=JOIN)
        assert found is not None
        assert found.stream == "s"
    made = event_leftovers(tables.url, prefix)
    assert {f"{prefix}_append", f"{prefix}_events", f"{prefix}_head"} <= set(made)


# -- several writers at once -----------------------------------------------------------------------

Ack = tuple[str, int, str, int]  # stream, version, event id, position


def appender(store: PostgresEventStore, name: str, rounds: int) -> list[Ack]:
    """Appends as one writer among several: to its own streams at the versions it knows, to the
    shared stream at the version it reads (starting over when another writer got there first),
    retries some appends exactly, and appends to two streams atomically. Returns every event
    acknowledged to it."""
    acknowledged: list[Ack] = []

    def record(stream: str, result: AppendResult, events: list[NewEvent]) -> None:
        first_version = result.version - len(events) + 1
        first_position = result.position - len(events) + 1
        for k, made in enumerate(events):
            acknowledged.append((stream, first_version + k, str(made.id), first_position + k))

    own = f"own-{name}"
    pair_stream = f"pair-{name}"
    own_version: int | None = None
    pair_version: int | None = None
    for n in range(rounds):
        mine = [event("Own", f"{name}:{n}".encode())]
        expected = "no_stream" if own_version is None else own_version
        result = store.append(own, mine, expected_version=expected)
        own_version = result.version
        record(own, result, mine)
        shared = [event("Shared", f"{name}:{n}:{k}".encode()) for k in range(1 + n % 3)]
        while True:
            seen = store.stream_version("shared")
            outcome = attempt(
                lambda seen=seen, shared=shared: store.append(
                    "shared", shared, expected_version="no_stream" if seen is None else seen
                )
            )
            if isinstance(outcome, AppendResult):
                result = outcome
                break
            # Someone appended since the version was read.
            assert isinstance(outcome, WrongExpectedVersionError), outcome
            assert outcome.stream == "shared"
            assert seen is None or (outcome.actual is not None and outcome.actual > seen)
            time.sleep(0.0005)
        record("shared", result, shared)
        # What an append acknowledged, its appender can read at once.
        assert store.read_stream("shared", result.version, limit=1)[0].id == shared[-1].id
        if n % 3 == 0:
            # The exact retry (a lost answer, say) answers the original result, stores nothing.
            again = store.append("shared", shared, expected_version=0 if seen is None else seen)
            assert again == result, (again, result)
        if n % 4 == 1:
            both = [event("Pair", f"{name}:{n}".encode())], [event("Paired")]
            results = store.append_many(
                [
                    (own, both[0], own_version),
                    (pair_stream, both[1], "no_stream" if pair_version is None else pair_version),
                ]
            )
            own_version, pair_version = results[0].version, results[1].version
            record(own, results[0], both[0])
            record(pair_stream, results[1], both[1])
            assert results[1].position == results[0].position + 1, "one append, one range"
    return acknowledged


def check_acknowledged(store: PostgresEventStore, acknowledged: list[Ack]) -> list[RecordedEvent]:
    """Positions gapless, versions gapless, ids unique (check_log), and every event acknowledged
    to a writer is stored where it was told, with nothing else in the log."""
    everything = check_log(store)
    assert len(everything) == len(acknowledged) == store.head, "an event lost or added"
    for stream, version, ident, position in acknowledged:
        stored = everything[position]
        assert (stored.stream, stored.version, str(stored.id)) == (stream, version, ident)
    return everything


class GlobalReader:
    """Reads the global order continuously on a thread while writers append, by ``read_all``
    (with and without a limit), by ``poll`` or by a subscription, and records every batch. Each
    batch must start where the previous one ended and hold consecutive positions: a reader
    never sees a position before every earlier one."""

    def __init__(self, store: PostgresEventStore, how: str) -> None:
        self.store = store
        self.how = how
        self.batches: list[list[RecordedEvent]] = []
        self.problems: list[str] = []
        self.until: int | None = None  # the head once the writers are done
        self.next = 0
        self.subscription = store.subscribe(batch_size=7) if how == "subscribe" else None
        self.thread = threading.Thread(target=self._run, name=f"reader-{how}", daemon=True)
        self.thread.start()

    def _batch(self, turn: int) -> list[RecordedEvent]:
        if self.how == "read_all":
            return self.store.read_all(self.next)
        if self.how == "read_all limited":
            return self.store.read_all(self.next, limit=1 + turn % 5)
        if self.how == "poll":
            found, after = self.store.poll(self.next, 1 + turn % 9, 0.05)
            if after != self.next + len(found):
                self.problems.append(f"poll from {self.next} gave {len(found)} and {after}")
            return found
        assert self.subscription is not None
        got = self.subscription.next(timeout=0.05)
        return [] if got is None else [got]

    def _run(self) -> None:
        deadline = time.monotonic() + 90
        turn = 0
        try:
            while self.until is None or self.next < self.until:
                if time.monotonic() > deadline:
                    self.problems.append(f"stuck at {self.next}")
                    return
                batch = self._batch(turn)
                turn += 1
                positions = [e.position for e in batch]
                if positions != list(range(self.next, self.next + len(batch))):
                    self.problems.append(f"expected from {self.next}, saw {positions}")
                    return
                if batch:
                    self.batches.append(batch)
                    self.next += len(batch)
                elif self.how.startswith("read_all"):
                    time.sleep(0.001)  # poll and subscriptions wait on their own
        except BaseException as error:
            self.problems.append(repr(error))

    def finish(self, head: int, everything: list[RecordedEvent]) -> None:
        self.until = head
        self.thread.join(60)
        assert not self.thread.is_alive(), f"the {self.how} reader did not finish"
        assert self.problems == [], f"{self.how}: {self.problems[:3]}"
        seen = [e for batch in self.batches for e in batch]
        assert [plain(e) for e in seen] == [plain(e) for e in everything]
        assert len(self.batches) > 1 or self.how == "read_all", "the reader raced no writer"


READERS = ["read_all", "read_all limited", "poll", "subscribe"]


def test_threads_appending_at_once_lose_and_duplicate_nothing_and_readers_skip_nothing(
    tables: Tables,
) -> None:
    prefix = tables.prefix()
    writers, rounds = 4, 24
    stores = [tables.store(prefix) for _ in range(2)]
    readers = [GlobalReader(tables.store(prefix), how) for how in READERS]
    acknowledged: list[list[Ack]] = [[] for _ in range(writers)]

    def write(index: int) -> None:
        # Two store objects (two pools), as two processes would have.
        acknowledged[index] = appender(stores[index % 2], f"t{index}", rounds)

    run_threads(write, writers, within=90)
    everything = check_acknowledged(stores[0], [a for mine in acknowledged for a in mine])
    for reader in readers:
        reader.finish(stores[0].head, everything)
    for index, mine in enumerate(acknowledged):
        positions = [position for *_, position in mine]
        assert positions == sorted(set(positions)), "one writer's appends are in order"
        assert [e.data for e in stores[1].read_stream(f"own-t{index}") if e.type == "Own"] == [
            f"t{index}:{n}".encode() for n in range(rounds)
        ]
    assert len(stores[0].read_stream("shared")) == writers * sum(1 + n % 3 for n in range(rounds))


# A child process: `python -c CHILD mode url prefix name rounds`. It says "ready", waits for
# "go" on its stdin, does its part and prints what it was told, one JSON value a line.
CHILD = (
    f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); "
    "import test_event_store_postgres as t; t.child_main(sys.argv[1:])"
)


def child_main(argv: list[str]) -> None:
    mode, url, prefix, name, rounds = argv
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    # In "open" mode the store is constructed after "go", so the children create the schema
    # at the same moment.
    with PostgresEventStore(url, table_prefix=prefix, max_size=2) as store:
        if mode == "open":
            result = store.append(f"opened-{name}", [event()], "no_stream")
            print(json.dumps([result.version, result.position]))
        else:
            for ack in appender(store, name, int(rounds)):
                print(json.dumps(ack))
    print("done", flush=True)


class Children:
    """Child processes running `child_main`, started together."""

    def __init__(self, mode: str, url: str, prefix: str, names: list[str], rounds: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        try:
            for name in names:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", CHILD, mode, url, prefix, name, str(rounds)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
            for proc in self.procs:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line == "ready\n", f"a child did not start: {line!r} {self._stderr(proc)}"
        except BaseException:
            self.kill()
            raise

    def _stderr(self, proc: subprocess.Popen[str]) -> str:
        if proc.poll() is None:
            return ""
        _, err = proc.communicate()
        return err

    def go(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def results(self) -> list[list[Any]]:
        """Each child's printed values, once they have all exited well."""
        outputs = []
        deadline = time.monotonic() + CHILD_TIMEOUT
        try:
            for proc in self.procs:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                lines = out.splitlines()
                assert proc.returncode == 0, f"a child failed: {err}"
                assert lines[-1:] == ["done"], f"a child did not finish: {err}"
                outputs.append([json.loads(line) for line in lines[:-1]])
        finally:
            self.kill()
        return outputs

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=JOIN)


def test_processes_and_threads_appending_at_once_lose_and_duplicate_nothing(
    tables: Tables,
) -> None:
    prefix = tables.prefix()
    rounds = 15
    store = tables.store(prefix)
    readers = [GlobalReader(tables.store(prefix), how) for how in ("read_all", "poll")]
    children = Children("append", tables.url, prefix, ["p0", "p1", "p2"], rounds)
    local: list[list[Ack]] = [[], []]

    def write(index: int) -> None:
        local[index] = appender(store, f"t{index}", rounds)

    children.go()
    run_threads(write, 2, within=90)
    remote: list[list[Ack]] = [
        [(stream, version, ident, position) for stream, version, ident, position in output]
        for output in children.results()
    ]
    acknowledged = [ack for mine in [*local, *remote] for ack in mine]
    everything = check_acknowledged(store, acknowledged)
    for reader in readers:
        reader.finish(store.head, everything)
    writers = {e.stream.removeprefix("own-") for e in everything if e.stream.startswith("own-")}
    assert writers == {"t0", "t1", "p0", "p1", "p2"}
    assert len(store.read_stream("shared")) == 5 * sum(1 + n % 3 for n in range(rounds))


def race_one_append(
    stores: list[PostgresEventStore], stream: str, threads: int
) -> list[tuple[int, int]]:
    """`threads` threads append the very same events at once; returns what each was told."""
    events = [event(), event()]
    barrier = threading.Barrier(threads)
    results: list[tuple[int, int]] = []

    def worker(index: int) -> None:
        barrier.wait(JOIN)
        opened = stores[index % len(stores)]
        result = opened.append(stream, events, expected_version="no_stream")
        # Even a caller that got the retry's answer reads the events at once.
        assert [e.id for e in opened.read_stream(stream)] == [e.id for e in events]
        results.append(vp(result))

    run_threads(worker, threads, within=30)
    return results


def test_concurrent_retries_of_one_append_store_it_once(tables: Tables) -> None:
    prefix = tables.prefix()
    stores = [tables.store(prefix) for _ in range(2)]
    for round_ in range(10):
        assert race_one_append(stores, f"s{round_}", 4) == [(1, 2 * round_ + 1)] * 4
    assert stores[0].head == 20
    check_log(stores[1])


# -- subscriptions ---------------------------------------------------------------------------------


def test_a_subscription_gives_history_then_new_events(tables: Tables) -> None:
    prefix = tables.prefix()
    store, writer = tables.store(prefix), tables.store(prefix)
    for n in range(3):
        store.append(f"s{n}", [event(data=bytes([n]))])
    subscription = store.subscribe()
    assert [e.position for e in take(subscription, 3)] == [0, 1, 2]
    assert subscription.position == 3

    def later() -> None:
        time.sleep(0.05)
        writer.append("live", [event("A"), event("B")])

    with background(later):
        assert [e.type for e in take(subscription, 2)] == ["A", "B"]
    assert subscription.position == 5
    assert "position=5" in repr(subscription)


def test_subscription_filters(pair: tuple[EventStore, PostgresEventStore]) -> None:
    def scenario(store: Any) -> list[Any]:
        store.append("order-1", [event("Placed", n=1), event("Paid", n=2)])
        store.append("cart-1", [event("Paid", n=3)])
        store.append("order-2", [event("Placed", n=4)])
        orders = store.subscribe(stream_prefix="order-")
        paid = store.subscribe(event_types={"Paid"})
        paid_orders = store.subscribe(stream_prefix="order", event_types=["Paid", "Refunded"])
        nothing = store.subscribe(event_types=[])
        everyone = store.subscribe(stream_prefix="")
        store.append("order-3", [event("Refunded", n=5)])
        store.append("cart-2", [event("Refunded", n=6)])
        got = [
            [plain(e) for e in take(orders, 4)],
            [plain(e) for e in take(paid, 2)],
            [plain(e) for e in take(paid_orders, 2)],
            [plain(e) for e in take(everyone, 6)],
        ]
        for subscription in (orders, paid, paid_orders, nothing, everyone):
            assert subscription.next(timeout=0.05) is None
        assert nothing.position == store.head, "a filter skips past events it does not want"
        return got

    memory, store = pair
    got = scenario(store)
    assert got == scenario(memory)
    assert [(e[0], e[4]) for e in got[0]] == [
        ("order-1", "Placed"),
        ("order-1", "Paid"),
        ("order-2", "Placed"),
        ("order-3", "Refunded"),
    ]


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_a_subscription_resumes_from_its_position(
    store: PostgresEventStore, batch_size: int
) -> None:
    for n in range(8):
        store.append("a" if n % 2 == 0 else "b", [event(data=bytes([n]))])
    first = store.subscribe(stream_prefix="a", batch_size=batch_size)
    assert [e.position for e in take(first, 2)] == [0, 2]
    saved = first.position
    assert saved in (3, 4)
    resumed = store.subscribe(saved, stream_prefix="a", batch_size=batch_size)
    assert [e.position for e in take(resumed, 2)] == [4, 6]
    assert [e.position for e in take(first, 2)] == [4, 6]
    everything = store.subscribe(saved)
    assert [e.position for e in take(everything, 8 - saved)] == list(range(saved, 8))
    # A position past the head waits for the events that will be there.
    ahead = store.subscribe(10)
    assert ahead.next(timeout=0.05) is None
    store.append("c", [event(), event(), event()])
    assert [e.position for e in take(ahead, 1)] == [10]


def test_next_returns_none_on_timeout(store: PostgresEventStore) -> None:
    subscription = store.subscribe()
    started = time.monotonic()
    assert subscription.next(timeout=0) is None
    assert subscription.next(timeout=0.1) is None
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < JOIN
    # A wait longer than the store's 1 s fallback still ends on time.
    started = time.monotonic()
    assert subscription.next(timeout=1.3) is None
    assert 1.29 <= time.monotonic() - started < 1.3 + JOIN
    store.append("s", [event()])
    assert subscription.next(timeout=0) is not None


def _wake_latencies(
    subscription: Subscription, writer: PostgresEventStore, count: int
) -> list[float]:
    """How long a subscriber blocked in next() waits after another store's append returns."""
    latencies = []
    for n in range(count):
        got: list[tuple[RecordedEvent | None, float]] = []

        def wait(got: list[tuple[RecordedEvent | None, float]] = got) -> None:
            got.append((subscription.next(timeout=JOIN), time.monotonic()))

        with background(wait):
            # Land anywhere in the listener's 0.5 s cycle and in the waiter's 1 s wait.
            time.sleep(0.03 + 0.07 * (n % 7))
            start = time.monotonic()
            writer.append("woken", [event(data=bytes([n]))])
        ((found, when),) = got
        assert found is not None
        assert found.data == bytes([n])
        latencies.append(when - start)
    return latencies


def test_notify_wakes_a_blocked_subscriber_well_within_the_fallback(tables: Tables) -> None:
    prefix = tables.prefix()
    reader, writer = tables.store(prefix), tables.store(prefix)
    subscription = reader.subscribe()
    assert subscription.next(timeout=0.1) is None  # the listener is up
    latencies = _wake_latencies(subscription, writer, 10)
    # Without NOTIFY a waiter would only learn of the append from the listener's check every
    # 0.5 s or its own 1 s fallback: half a second on average.
    assert statistics.median(latencies) < 0.15, latencies
    assert max(latencies) < 1.0, latencies


async def test_notify_wakes_an_async_subscriber(tables: Tables) -> None:
    prefix = tables.prefix()
    reader, writer = tables.store(prefix), tables.store(prefix)
    reader.append("old", [event("Old")])
    subscription = reader.subscribe(event_types={"Old", "New"})
    arrived: list[tuple[RecordedEvent, float]] = []
    appended: list[float] = []

    async def consume() -> None:
        async for found in subscription:
            arrived.append((found, time.monotonic()))
            if len(arrived) == 9:
                return

    def append_later() -> None:
        for n in range(8):
            time.sleep(0.03 + 0.07 * (n % 7))
            writer.append("s", [event("Ignored"), event("New", bytes([n]))])
            appended.append(time.monotonic())

    task = asyncio.create_task(consume())
    with background(append_later):
        await asyncio.wait_for(task, JOIN * 4)
    assert [(e.type, e.data) for e, _ in arrived] == [("Old", b"")] + [
        ("New", bytes([n])) for n in range(8)
    ]
    latencies = [when - start for (_, when), start in zip(arrived[1:], appended, strict=True)]
    assert statistics.median(latencies) < 0.15, latencies
    assert max(latencies) < 1.0, latencies


def test_a_subscriber_is_woken_by_an_append_of_another_process(tables: Tables) -> None:
    prefix = tables.prefix()
    store = tables.store(prefix)
    subscription = store.subscribe()
    assert subscription.next(timeout=0.1) is None
    children = Children("open", tables.url, prefix, ["other"], 0)
    got: list[RecordedEvent | None] = []
    with background(lambda: got.append(subscription.next(timeout=JOIN * 2))):
        children.go()
        ((result,),) = children.results()
    assert result == [0, 0]
    assert got[0] is not None
    assert got[0].stream == "opened-other"


def test_blocking_iteration_ends_when_the_store_closes(store: PostgresEventStore) -> None:
    subscription = store.subscribe()
    got: list[RecordedEvent] = []

    def consume() -> None:
        got.extend(subscription)

    with background(consume):
        for n in range(3):
            store.append("s", [event(data=bytes([n]))])
        wait_until(lambda: len(got) == 3)
        time.sleep(0.05)  # the consumer is waiting for more
        store.close()
    assert [e.data for e in got] == [b"\x00", b"\x01", b"\x02"]
    assert subscription.next(timeout=0.01) is None
    assert list(subscription) == []


def test_closing_the_store_frees_a_waiter_at_once(store: PostgresEventStore) -> None:
    subscription = store.subscribe()
    got: list[Any] = []
    with background(lambda: got.append(attempt(lambda: subscription.next(timeout=None)))) as waiter:
        time.sleep(0.2)
        assert waiter.is_alive()
        started = time.monotonic()
        store.close()
        waiter.join(JOIN)
        assert time.monotonic() - started < 1.0
    assert got == [None]


def test_a_closed_subscription_gives_nothing_more(store: PostgresEventStore) -> None:
    store.append("s", [event(), event(), event()])
    subscription = store.subscribe(batch_size=2)
    assert take(subscription, 1)[0].position == 0
    subscription.close()
    assert subscription.next(timeout=0.01) is None
    assert list(subscription) == []
    store.append("s", [event()])
    assert subscription.next(timeout=0.01) is None


def test_closing_a_subscription_from_another_thread_is_prompt(store: PostgresEventStore) -> None:
    subscription = store.subscribe()
    got: list[RecordedEvent] = []
    consumer = threading.Thread(target=lambda: got.extend(subscription), daemon=True)
    consumer.start()
    try:
        store.append("s", [event()])
        wait_until(lambda: len(got) == 1)
        time.sleep(0.1)  # the consumer is back in next(), waiting for more
        closer = threading.Thread(target=subscription.close, daemon=True)
        closer.start()
        closer.join(0.3)
        assert not closer.is_alive(), "close() is still blocked"
        # Iteration waits in slices of 0.25 s: it ends after the one under way.
        consumer.join(1.0)
        assert not consumer.is_alive(), "the iteration goes on"
    finally:
        store.close()
        consumer.join(JOIN)
    assert not consumer.is_alive()


def test_a_subscription_delivers_what_it_holds_then_ends_when_the_store_closes(
    store: PostgresEventStore,
) -> None:
    """Unlike EventStore's, the closed store reads nothing more: what a subscription already
    fetched is delivered, then iteration ends (it does not hang, nor raise)."""
    for n in range(5):
        store.append("s", [event(data=bytes([n]))])
    behind = store.subscribe(batch_size=2)
    assert take(behind, 1)[0].position == 0
    store.close()
    assert [e.position for e in behind] == [1]
    assert list(store.subscribe()) == []


async def test_async_iteration_gets_events_appended_from_its_own_loop(
    store: PostgresEventStore,
) -> None:
    subscription = store.subscribe(stream_prefix="mine")
    task = asyncio.create_task(collect(subscription, 4))
    await asyncio.sleep(0.05)
    assert not task.done()
    store.append("mine-1", [event("Sync")])
    store.append("other", [event("Skipped")])
    assert vp(
        await store.append_async("mine-2", [event("Async")], expected_version="no_stream")
    ) == (0, 2)
    results = await store.append_many_async(
        [("mine-3", [event("Many")], None), ("other", event("Skipped"), None)]
    )
    assert vp(results) == [(0, 3), (1, 4)]
    await asyncio.sleep(0.02)
    store.append("mine-1", [event("Last")])
    got = await asyncio.wait_for(task, JOIN)
    assert [(e.stream, e.type) for e in got] == [
        ("mine-1", "Sync"),
        ("mine-2", "Async"),
        ("mine-3", "Many"),
        ("mine-1", "Last"),
    ]


async def test_async_iteration_ends_when_the_store_closes(store: PostgresEventStore) -> None:
    subscription = store.subscribe()
    task = asyncio.create_task(collect(subscription, 100))
    store.append("s", [event()])
    await asyncio.sleep(0.2)
    assert not task.done()
    await store.close_async()
    got = await asyncio.wait_for(task, JOIN)
    assert len(got) == 1
    with pytest.raises(StopAsyncIteration):
        await subscription.__anext__()


async def test_async_iteration_ends_when_a_thread_closes_the_store(
    store: PostgresEventStore,
) -> None:
    subscription = store.subscribe()
    task = asyncio.create_task(collect(subscription, 100))
    await asyncio.sleep(0.05)

    def close_later() -> None:
        time.sleep(0.1)
        store.close()

    with background(close_later):
        got = await asyncio.wait_for(task, JOIN)
    assert got == []


# -- the listener connection -----------------------------------------------------------------------


def test_a_killed_listener_connection_is_replaced_and_notify_wakes_again(tables: Tables) -> None:
    prefix = tables.prefix()
    # One connection per pool, so the listener's is the only other session using the tables.
    reader = tables.store(prefix, min_size=1, max_size=1)
    writer = tables.store(prefix, min_size=1, max_size=1)
    writer.append("s", [event()])
    pools = set()
    for opened in (reader, writer):
        with opened.pool.connection() as conn:
            pools.add(conn.info.backend_pid)
    subscription = reader.subscribe()
    assert take(subscription, 1)[0].position == 0
    assert subscription.next(timeout=0.1) is None

    def listeners() -> set[int]:
        return backends_using(tables.url, prefix) - pools

    wait_until(lambda: len(listeners()) == 1)
    (first,) = listeners()
    with psycopg.connect(tables.url, autocommit=True) as admin:
        ((killed,),) = admin.execute("select pg_terminate_backend(%s)", (first,)).fetchall()
    assert killed
    # While the listener reconnects, appends are still delivered (its check or the fallback).
    writer.append("s", [event("DuringOutage")])
    assert take(subscription, 1)[0].type == "DuringOutage"
    wait_until(lambda: len(listeners()) == 1 and first not in listeners())
    latencies = _wake_latencies(subscription, writer, 8)
    assert statistics.median(latencies) < 0.15, latencies
    # Asyncio subscribers, which only the listener wakes, are woken again too.

    async def one_async() -> RecordedEvent:
        async def first_event() -> RecordedEvent:
            async for found in subscription:
                return found
            raise AssertionError("the iteration ended")

        task = asyncio.create_task(first_event())
        await asyncio.sleep(0.05)
        writer.append("s", [event("Async")])
        return await asyncio.wait_for(task, JOIN)

    assert asyncio.run(one_async()).type == "Async"


def test_a_listener_killed_again_and_again_keeps_coming_back(tables: Tables) -> None:
    prefix = tables.prefix()
    reader = tables.store(prefix, min_size=1, max_size=1)
    writer = tables.store(prefix, min_size=1, max_size=1)
    writer.append("s", [event()])
    pools = set()
    for opened in (reader, writer):
        with opened.pool.connection() as conn:
            pools.add(conn.info.backend_pid)
    subscription = reader.subscribe(1)
    seen: set[int] = set()
    for n in range(3):
        assert subscription.next(timeout=0.05) is None
        wait_until(lambda: len(backends_using(tables.url, prefix) - pools - seen) == 1)
        (pid,) = backends_using(tables.url, prefix) - pools - seen
        seen.add(pid)
        with psycopg.connect(tables.url, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        writer.append("s", [event(data=bytes([n]))])
        found = subscription.next(timeout=JOIN)
        assert found is not None
        assert found.data == bytes([n])
    reader.close()
    wait_until(lambda: not (backends_using(tables.url, prefix) - pools))


# -- a closed store --------------------------------------------------------------------------------


def test_a_closed_store_refuses_every_call(pair: tuple[EventStore, PostgresEventStore]) -> None:
    memory, store = pair
    retry = [event(n=1), event(n=2)]
    for opened in pair:
        opened.append("s", retry)
        opened.append_many([("s", [event(n=3)], 1), ("t", [event(n=4)], None)])
    before = snapshot(store)
    assert not store.closed
    memory.close()
    store.close()
    assert store.closed
    for call in (
        lambda s: s.append("s", [event()]),
        lambda s: s.append("s", retry),  # even an exact retry
        lambda s: s.append_many([("u", [event()], None)]),
        lambda s: s.append("s", [event()], expected_version=99),
    ):
        memory_error, error = on_both(pair, call)
        assert isinstance(error, EventStoreClosedError)
        assert str(error) == str(memory_error) == "The event store is closed."
    # EventStore still answers reads from memory; this store has no connection left to read
    # with, and says so.
    for read in (
        lambda: store.read_all(),
        lambda: store.read_stream("s"),
        lambda: store.stream_version("s"),
        lambda: store.streams(),
        lambda: store.head,
        lambda: store.poll(0, 10, 0),
    ):
        with pytest.raises(EventStoreClosedError):
            read()
    assert store.subscribe().next(timeout=0.01) is None
    store.close()  # closing again is harmless
    assert store.closed
    with PostgresEventStore(store.url, table_prefix=store._prefix, **POOL) as again:
        assert snapshot(again) == before


async def test_a_closed_store_refuses_async_appends(store: PostgresEventStore) -> None:
    await store.close_async()
    with pytest.raises(EventStoreClosedError):
        await store.append_async("s", [event()])
    with pytest.raises(EventStoreClosedError):
        await store.append_many_async([("s", [event()], None)])
    await store.close_async()


def test_closing_ends_the_listener_and_every_connection(tables: Tables) -> None:
    prefix = tables.prefix()
    store = tables.store(prefix)
    store.append("s", [event()])
    assert store.subscribe(1).next(timeout=0.1) is None  # starts the listener
    listener = [t for t in threading.enumerate() if t.name == f"events-listen-{prefix}"]
    assert len(listener) == 1
    wait_until(lambda: len(backends_using(tables.url, prefix)) >= 2)
    store.close()
    assert not listener[0].is_alive()
    wait_until(lambda: not backends_using(tables.url, prefix))


def test_the_context_manager_closes_the_store(tables: Tables) -> None:
    prefix = tables.prefix()
    with tables.store(prefix) as store:
        assert isinstance(store, PostgresEventStore)
        store.append("s", [event()])
    assert store.closed

    opened: list[PostgresEventStore] = []

    def fail_inside() -> None:
        with tables.store(prefix) as store:
            opened.append(store)
            store.append("s", [event()])
            raise RuntimeError("inside the block")

    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert opened[0].closed
    with tables.store(prefix) as store:
        assert store.head == 2


def test_closing_the_store_while_subscribers_are_busy_ends_their_iteration(
    tables: Tables,
) -> None:
    prefix = tables.prefix()
    with tables.store(prefix) as filler:
        for _ in range(4):
            filler.append("s", [event() for _ in range(1000)])
    # A few rounds: each subscriber is between its two statements about half the time.
    for _ in range(5):
        errors = close_under_busy_subscribers(tables.store(prefix), 4)
        assert errors == [], f"{len(errors)} subscriptions ended with {errors[0]!r}"


def close_under_busy_subscribers(store: PostgresEventStore, count: int) -> list[BaseException]:
    """Closes `store` while `count` subscriptions read its history event by event; returns what
    their iterations raised."""
    errors: list[BaseException] = []
    delivered = [0] * count

    def consume(index: int) -> None:
        try:
            for _ in store.subscribe(batch_size=1):
                delivered[index] += 1
        except BaseException as error:
            errors.append(error)

    run_threads_in_background = threading.Thread(
        target=lambda: run_threads(consume, count, within=30), daemon=True
    )
    run_threads_in_background.start()
    wait_until(lambda: min(delivered) > 20)
    store.close()
    run_threads_in_background.join(35)
    assert not run_threads_in_background.is_alive(), "a subscription did not end"
    return errors


# -- the schema ------------------------------------------------------------------------------------


def open_at_once(
    tables: Tables, prefix: str, threads: int, children: Children
) -> list[tuple[int, int]]:
    """`threads` threads and the child processes construct a store on `prefix` at the same
    moment and append one event each; returns every (version, position) they were told."""
    barrier = threading.Barrier(threads + 1)
    results: list[tuple[int, int]] = []

    def open_and_append(index: int) -> None:
        barrier.wait(JOIN)
        opened = tables.store(prefix, max_size=1)
        results.append(vp(opened.append(f"opened-t{index}", [event()], "no_stream")))

    with background(lambda: run_threads(open_and_append, threads, within=30)):
        barrier.wait(JOIN)
        children.go()
        remote = children.results()
    results.extend((version, position) for ((version, position),) in remote)
    return results


def test_stores_created_at_once_on_fresh_tables_all_work(tables: Tables) -> None:
    for _ in range(3):
        prefix = tables.prefix()
        assert event_leftovers(tables.url, prefix) == []
        children = Children("open", tables.url, prefix, ["p0", "p1", "p2"], 0)
        threads = 4
        results = open_at_once(tables, prefix, threads, children)
        assert sorted(position for _, position in results) == list(range(threads + 3))
        assert {version for version, _ in results} == {0}
        with tables.store(prefix) as store:
            assert store.head == threads + 3
            assert len(store.streams()) == threads + 3
            check_log(store)
        assert f"{prefix}_append" in event_leftovers(tables.url, prefix)


def test_opening_a_store_on_tables_that_hold_events_keeps_them(tables: Tables) -> None:
    prefix = tables.prefix()
    first = tables.store(prefix)
    first.append_many([("a", [event(n=1), event(n=2)], "no_stream"), ("b", [event(n=3)], None)])
    before = snapshot(first)
    # Opened beside the first (as another process would), and again after it is closed.
    second = tables.store(prefix)
    assert snapshot(second) == before
    first.close()
    third = tables.store(prefix)
    assert snapshot(third) == before
    assert vp(third.append("a", [event(n=4)], 1)) == (2, 3)
    assert vp(second.append("a", [event(n=5)], 2)) == (3, 4)


def test_stores_on_other_prefixes_share_nothing(tables: Tables) -> None:
    one, other = tables.store(), tables.store()
    subscription = other.subscribe()
    assert subscription.next(timeout=0.05) is None
    one.append("s", [event(n=1)])
    assert subscription.next(timeout=0.3) is None
    assert (other.head, other.streams(), other.read_all()) == (0, [], [])
    # The same ids in another store are no retry there.
    assert vp(other.append("t", [event(n=1)])) == (0, 0)
    assert subscription.next(timeout=JOIN) is not None
    assert one.head == 1
