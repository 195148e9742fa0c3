"""The real event store against the reference model in ``event_store_model.py``.

A hypothesis state machine appends to a few streams with every kind of expected version (right
and wrong), appends to several streams at once (where one wrong expectation refuses them all),
retries earlier appends with their very same event ids (which must answer the original results
and store nothing), reuses ids in ways that are not a retry (refused, nothing stored), and reads
streams forwards and backwards and the whole log, from any version or position, with limits.
After every step the head, the streams, every stream's version and the whole log agree with the
model.

It runs on the in-memory store, on the durable store under each fsync policy (with a small
segment size so the log rolls over several segments) and on ``PostgresEventStore``; the durable
and PostgreSQL machines also close and reopen the store, which must come back with exactly what
the model holds (ids included, so a retry after the reopen still answers the original results).
Each PostgreSQL run gets tables of its own (a fresh ``table_prefix``), dropped after the run
however it ends; a reopen there closes the store and constructs a new one on the same prefix.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from typing import Any

import pytest
from buttress import (
    DuplicateEventError,
    EventStore,
    EventStoreClosedError,
    NewEvent,
    RecordedEvent,
    WrongExpectedVersionError,
)
from buttress.backends.postgres_events import PostgresEventStore
from event_postgres import drop_event_tables, event_leftovers
from event_store_model import (
    Appended,
    Duplicate,
    Event,
    EventStoreModel,
    Expected,
    Invalid,
    Outcome,
    Request,
    Spec,
    WrongVersion,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

STREAMS = ["a", "b", "order-1", "ünï"]
TYPES = ["Created", "Renamed", "Ü"]
# A segment this small fills after a few appends, so the log keeps rolling.
SEGMENT_SIZE = 4096

streams = st.sampled_from(STREAMS)
counts = st.integers(1, 3)
payloads = st.binary(max_size=24)
# The ways to state an expectation; "right"/"wrong" become a version from the model.
modes = st.sampled_from(
    ["omit", "none", "any", "no_stream", "stream_exists", "right", "wrong", "wrong"]
)
limits = st.none() | st.integers(0, 5)


def recorded(event: RecordedEvent) -> Event:
    return Event(
        stream=event.stream,
        version=event.version,
        position=event.position,
        id=event.id.bytes,
        type=event.type,
        data=event.data,
        metadata=event.metadata,
    )


class EventStoreMachine(RuleBasedStateMachine):
    """Drives one store and the model side by side. Subclasses choose the store."""

    def __init__(self) -> None:
        super().__init__()
        self.model = EventStoreModel()
        self.next_id = 1
        # Every accepted append, as built (the same NewEvent objects are reused to retry).
        self.done: list[tuple[bool, list[tuple[str, list[NewEvent], Expected]]]] = []
        self.store: EventStore | PostgresEventStore | None = None

    def open_store(self) -> EventStore | PostgresEventStore:
        raise NotImplementedError

    @initialize()
    def start(self) -> None:
        self.store = self.open_store()

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- helpers ---------------------------------------------------------------------------------

    def new_event(self, data: st.DataObject) -> tuple[NewEvent, Spec]:
        ident = uuid.UUID(int=(0xB7 << 120) | self.next_id)
        self.next_id += 1
        spec = Spec(
            id=ident.bytes,
            type=data.draw(st.sampled_from(TYPES), label="type"),
            data=data.draw(payloads, label="data"),
            metadata=data.draw(payloads, label="metadata"),
        )
        # bytes, bytearray and memoryview are all accepted for data and metadata.
        wrap = data.draw(st.sampled_from([bytes, bytearray, memoryview]), label="wrap")
        event = NewEvent(spec.type, wrap(spec.data), spec.metadata, id=ident)
        return event, spec

    def expectation(self, mode: str, stream: str, data: st.DataObject) -> Expected | str:
        """The expected_version for `mode` ("omit" is passed on, to leave the argument out)."""
        actual = self.model.stream_version(stream)
        if mode in ("omit", "any", "no_stream", "stream_exists"):
            return mode
        if mode == "none":
            return None
        if mode == "right":
            return "no_stream" if actual is None else actual
        return data.draw(st.integers(0, 12).filter(lambda v: v != actual), label="wrong")

    def run(self, many: bool, requests: list[tuple[str, list[NewEvent], Any]]) -> Any:
        """Calls the store; returns its result or the exception it raised."""
        assert self.store is not None
        try:
            if many:
                calls = [(s, ev, None if e == "omit" else e) for s, ev, e in requests]
                return self.store.append_many(calls)
            ((stream, events, expected),) = requests
            if expected == "omit":
                return self.store.append(stream, events)
            return self.store.append(stream, events, expected)
        except (WrongExpectedVersionError, DuplicateEventError, ValueError) as error:
            return error

    def run_raw(self, many: bool, requests: list[tuple[str, Any, Any]]) -> Any:
        """Calls the store and lets any exception out."""
        assert self.store is not None
        if many:
            return self.store.append_many(
                [(s, ev, None if e == "omit" else e) for s, ev, e in requests]
            )
        ((stream, events, expected),) = requests
        return self.store.append(stream, events, None if expected == "omit" else expected)

    def check(self, outcome: Outcome, many: bool, got: Any) -> None:
        if isinstance(outcome, Appended):
            assert not isinstance(got, Exception), f"{got!r}; the model says {outcome}"
            results = got if many else [got]
            assert [(r.version, r.position) for r in results] == list(outcome.results)
        elif isinstance(outcome, WrongVersion):
            assert isinstance(got, WrongExpectedVersionError), f"{got!r}; model: {outcome}"
            assert (got.stream, got.expected, got.actual) == (
                outcome.stream,
                outcome.expected,
                outcome.actual,
            )
            assert outcome.stream in str(got)
        elif isinstance(outcome, Duplicate):
            assert isinstance(got, DuplicateEventError), f"{got!r}; the model says duplicate"
        else:
            assert isinstance(outcome, Invalid)
            assert type(got) is ValueError, f"{got!r}; the model says {outcome}"

    def submit(self, many: bool, requests: list[tuple[str, list[NewEvent], Any]], specs) -> None:
        model_requests = [
            Request(stream, tuple(spec_list), None if expected == "omit" else expected)
            for (stream, _, expected), spec_list in zip(requests, specs, strict=True)
        ]
        head = self.model.head
        outcome = self.model.append(model_requests)
        got = self.run(many, requests)
        self.check(outcome, many, got)
        if isinstance(outcome, Appended) and not outcome.replayed:
            self.done.append((many, requests))
        else:
            assert self.model.head == head

    # -- rules -----------------------------------------------------------------------------------

    @rule(data=st.data(), stream=streams, count=counts, mode=modes)
    def append(self, data: st.DataObject, stream: str, count: int, mode: str) -> None:
        made = [self.new_event(data) for _ in range(count)]
        expected = self.expectation(mode, stream, data)
        # A lone NewEvent is accepted in place of a list; a tuple too.
        shape = data.draw(st.sampled_from(["list", "tuple", "single"]), label="shape")
        events: Any = [e for e, _ in made]
        if shape == "tuple":
            events = tuple(events)
        elif shape == "single" and count == 1:
            events = events[0]
        self.submit(False, [(stream, events, expected)], [[s for _, s in made]])

    @rule(data=st.data(), chosen=st.lists(streams, min_size=1, max_size=3, unique=True))
    def append_many(self, data: st.DataObject, chosen: list[str]) -> None:
        requests = []
        specs = []
        for stream in chosen:
            made = [self.new_event(data) for _ in range(data.draw(counts, label="count"))]
            mode = data.draw(modes, label="mode")
            requests.append((stream, [e for e, _ in made], self.expectation(mode, stream, data)))
            specs.append([s for _, s in made])
        self.submit(True, requests, specs)

    @staticmethod
    def _specs(requests: list[tuple[str, Any, Any]]) -> list[list[Spec]]:
        """The model's view of events built earlier (a NewEvent tells what it holds)."""
        return [
            [
                Spec(id=e.id.bytes, type=e.type, data=e.data, metadata=e.metadata)
                for e in ([events] if isinstance(events, NewEvent) else list(events))
            ]
            for _, events, _ in requests
        ]

    @precondition(lambda self: self.done)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """An earlier append again, with the very same NewEvent objects (and ids)."""
        many, requests = data.draw(st.sampled_from(self.done), label="earlier")
        head = self.model.head
        self.submit(many, requests, self._specs(requests))
        assert self.model.head == head

    @precondition(lambda self: self.done)
    @rule(
        data=st.data(),
        how=st.sampled_from(
            ["extra_after", "extra_before", "reversed", "other_stream", "with_fresh_stream"]
        ),
    )
    def reuse_ids(self, data: st.DataObject, how: str) -> None:
        """Stored ids reused in a way that is not an exact retry: refused, nothing stored."""
        many, requests = data.draw(st.sampled_from(self.done), label="earlier")
        index = data.draw(st.integers(0, len(requests) - 1), label="request")
        stream, events, _ = requests[index]
        old = [events] if isinstance(events, NewEvent) else list(events)
        fresh, _ = self.new_event(data)
        if how == "extra_after":
            attempt = [(stream, [*old, fresh], "any")]
        elif how == "extra_before":
            attempt = [(stream, [fresh, *old], "any")]
        elif how == "reversed":
            if len(old) < 2:
                return
            attempt = [(stream, old[::-1], "any")]
        elif how == "other_stream":
            other = data.draw(st.sampled_from([s for s in STREAMS if s != stream]), label="to")
            attempt = [(other, old, "any")]
        else:
            # The same request exactly, plus a request of fresh events for another stream.
            other = data.draw(st.sampled_from([s for s in STREAMS if s != stream]), label="to")
            attempt = [requests[index], (other, [fresh], "any")]
        head = self.model.head
        self.submit(len(attempt) > 1 or many, attempt, self._specs(attempt))
        assert self.model.head == head

    @rule(data=st.data(), stream=streams, how=st.sampled_from(["twice", "empty", "same_id"]))
    def refused_outright(self, data: st.DataObject, stream: str, how: str) -> None:
        """Appends the store refuses whatever its state: nothing is stored."""
        event, spec = self.new_event(data)
        if how == "twice":
            other, other_spec = self.new_event(data)
            attempt = [(stream, [event], "any"), (stream, [other], "any")]
            specs = [[spec], [other_spec]]
        elif how == "empty":
            attempt = [(stream, [], "any")]
            specs = [[]]
        else:
            attempt = [(stream, [event, event], "any")]
            specs = [[spec, spec]]
        many = how == "twice" or data.draw(st.booleans(), label="many")
        self.submit(many, attempt, specs)

    @rule(
        stream=st.sampled_from([*STREAMS, "never-written"]),
        from_version=st.none() | st.integers(0, 10),
        backwards=st.booleans(),
        limit=limits,
    )
    def read_stream(
        self, stream: str, from_version: int | None, backwards: bool, limit: int | None
    ) -> None:
        assert self.store is not None
        got = self.store.read_stream(stream, from_version, backwards=backwards, limit=limit)
        expected = self.model.read_stream(stream, from_version, backwards, limit)
        assert [recorded(e) for e in got] == expected

    @rule(from_position=st.none() | st.integers(0, 40), limit=limits)
    def read_all(self, from_position: int | None, limit: int | None) -> None:
        assert self.store is not None
        got = self.store.read_all(from_position, limit=limit)
        assert [recorded(e) for e in got] == self.model.read_all(from_position, limit)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        store = self.store
        assert store is not None
        assert store.head == self.model.head
        assert store.streams() == self.model.stream_names()
        for stream in [*STREAMS, "never-written"]:
            assert store.stream_version(stream) == self.model.stream_version(stream)
        everything = store.read_all()
        assert [recorded(e) for e in everything] == self.model.events
        assert [e.position for e in everything] == list(range(len(everything)))


class MemoryMachine(EventStoreMachine):
    def open_store(self) -> EventStore:
        return EventStore()


class DurableMachine(EventStoreMachine):
    fsync = "group"

    def open_store(self) -> EventStore:
        self.dir = tempfile.mkdtemp(prefix="buttress-es-model-")
        return EventStore(self.dir, fsync=self.fsync, segment_size=SEGMENT_SIZE)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if self.store is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    @rule(data=st.data())
    def close_and_reopen(self, data: st.DataObject) -> None:
        store = self.store
        assert store is not None
        store.close()
        assert store.closed
        # A closed store refuses appends, even exact retries, and still answers reads.
        event, _ = self.new_event(data)
        with pytest.raises(EventStoreClosedError):
            store.append("a", [event])
        if self.done:
            many, requests = self.done[-1]
            with pytest.raises(EventStoreClosedError):
                self.run_raw(many, requests)
        assert store.head == self.model.head
        assert [recorded(e) for e in store.read_all()] == self.model.events
        self.store = EventStore(self.dir, fsync=self.fsync, segment_size=SEGMENT_SIZE)
        assert self.store.recovered_truncated_bytes == 0
        assert self.store.fsync == self.fsync


class PostgresMachine(EventStoreMachine):
    """The PostgreSQL store, on tables of its own for each run (``url`` is set by the test)."""

    url = ""

    def open_store(self) -> PostgresEventStore:
        self.prefix = f"{PG_PREFIX}_{uuid.uuid4().hex[:12]}"
        _pg_prefixes.append(self.prefix)
        return self.connect()

    def connect(self) -> PostgresEventStore:
        return PostgresEventStore(self.url, table_prefix=self.prefix, max_size=2)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if getattr(self, "prefix", None):
                drop_event_tables(self.url, self.prefix)

    @rule(data=st.data())
    def close_and_reopen(self, data: st.DataObject) -> None:
        store = self.store
        assert store is not None
        store.close()
        assert store.closed
        # A closed store refuses appends, even exact retries. (Unlike EventStore, whose
        # events stay in memory, it refuses reads too: its connections are gone.)
        event, _ = self.new_event(data)
        with pytest.raises(EventStoreClosedError):
            store.append("a", [event])
        if self.done:
            many, requests = self.done[-1]
            with pytest.raises(EventStoreClosedError):
                self.run_raw(many, requests)
        with pytest.raises(EventStoreClosedError):
            store.read_all()
        self.store = self.connect()

    @rule()
    def a_second_store_sees_the_same(self) -> None:
        """Another store object on the same tables (as another process would open them) sees
        exactly what the model holds; opening it changes nothing."""
        with self.connect() as other:
            assert other.head == self.model.head
            assert [recorded(e) for e in other.read_all()] == self.model.events
            assert other.streams() == self.model.stream_names()


class AlwaysMachine(DurableMachine):
    fsync = "always"


class GroupMachine(DurableMachine):
    fsync = "group"


class NeverMachine(DurableMachine):
    fsync = "never"


# The profile (conftest.py) sets the number of runs; these bound each run's length. A durable
# step can wait for a disk sync, which a busy machine makes slow: that is no test failure.
TestMemoryStore = MemoryMachine.TestCase
TestMemoryStore.settings = settings(stateful_step_count=40)
DURABLE = settings(stateful_step_count=25, suppress_health_check=[HealthCheck.too_slow])
TestDurableAlways = AlwaysMachine.TestCase
TestDurableAlways.settings = DURABLE
TestDurableGroup = GroupMachine.TestCase
TestDurableGroup.settings = DURABLE
TestDurableNever = NeverMachine.TestCase
TestDurableNever.settings = DURABLE

# -- PostgreSQL ---------------------------------------------------------------------------------

# Every run's tables are named from this, so the end of the test can check that none is left.
PG_PREFIX = f"bt_model_{uuid.uuid4().hex[:8]}"
_pg_prefixes: list[str] = []
# A step is a few round trips to the server (the invariant alone makes about ten), and each run
# creates and drops its tables (about 0.3 s a run in all): a third of the profile's runs, and
# shorter runs, keep this test within seconds locally and well within the timeout in CI.
POSTGRES_SETTINGS = settings(
    max_examples=max(10, settings.default.max_examples // 3),
    stateful_step_count=25,
    suppress_health_check=[HealthCheck.too_slow],
    deadline=None,
)


def test_postgres_store(postgres_url: str) -> None:
    """The same machine on PostgresEventStore (skips when no server answers)."""

    class Machine(PostgresMachine):
        url = postgres_url

    try:
        run_state_machine_as_test(Machine, settings=POSTGRES_SETTINGS)
    finally:
        # Every run drops its tables in its teardown; whatever one left is dropped here, and
        # fails the test.
        left = event_leftovers(postgres_url, PG_PREFIX)
        for prefix in _pg_prefixes:
            if any(name.startswith(f"{prefix}_") for name in left):
                drop_event_tables(postgres_url, prefix)
    assert _pg_prefixes, "no run opened a store"
    assert left == [], "a run left its tables behind"
    assert event_leftovers(postgres_url, PG_PREFIX) == []


def test_model_retries_and_refusals() -> None:
    """The model itself on a plain run."""
    model = EventStoreModel()
    one = Spec(b"1" * 16, "T", b"", b"")
    two = Spec(b"2" * 16, "T", b"", b"")
    first = model.append([Request("s", (one, two), "no_stream")])
    assert first == Appended(((1, 1),))
    assert model.append([Request("s", (one, two), "no_stream")]) == Appended(
        ((1, 1),), replayed=True
    )
    assert model.append([Request("s", (two, one))]) == Duplicate()
    assert model.append([Request("s", (Spec(b"3" * 16, "T", b"", b""),), 0)]) == WrongVersion(
        "s", "0", 1
    )
    assert model.head == 2
