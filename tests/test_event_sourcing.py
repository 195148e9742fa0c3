"""Event sourcing and CQRS on top of the event store: aggregates (``trigger``, ``@applies``,
versions, stream names), the ``Repository`` (save/get round trips on an in-memory, a durable
and a PostgreSQL store, atomic multi-aggregate saves, optimistic concurrency, idempotent
retried saves, time travel, snapshots, upcasting, asyncio twins), and the command and query
buses with their middleware, including ``RetryOnConflict`` under real concurrent writers.

PostgreSQL tests take the ``postgres_url`` fixture (they skip when no server answers); each
one uses its own table prefix and drops its tables afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from buttress import (
    AggregateNotFoundError,
    ButtressError,
    EventStore,
    NewEvent,
    NoHandlerError,
    RecordedEvent,
    WrongExpectedVersionError,
)
from buttress.events import (
    Aggregate,
    CommandBus,
    Event,
    LoggingMiddleware,
    QueryBus,
    Repository,
    RetryOnConflict,
    ValidationMiddleware,
    applies,
)
from buttress.events.store import EventStoreLike
from hypothesis import given
from hypothesis import strategies as st
from support import JOIN, run_threads

# -- the domain --------------------------------------------------------------------------------


class Account(Aggregate):
    """A bank account: the aggregate most tests use."""

    class Opened(Event):
        owner: str

    class Deposited(Event):
        amount: int
        command_id: str = ""

    class Withdrawn(Event):
        amount: int

    owner: str
    balance: int
    deposits: list[str]

    @classmethod
    def open(cls, account_id: str, owner: str = "ada") -> Account:
        account = cls(account_id)
        account.trigger(cls.Opened(owner=owner))
        return account

    def deposit(self, amount: int, command_id: str = "") -> None:
        if amount <= 0:
            raise ValueError("deposit a positive amount")
        self.trigger(self.Deposited(amount=amount, command_id=command_id))

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.trigger(self.Withdrawn(amount=amount))

    @applies(Opened)
    def _opened(self, event: Account.Opened) -> None:
        self.owner = event.owner
        self.balance = 0
        self.deposits = []

    @applies(Deposited)
    def _deposited(self, event: Account.Deposited) -> None:
        self.balance += event.amount
        self.deposits.append(event.command_id)

    @applies(Withdrawn)
    def _withdrawn(self, event: Account.Withdrawn) -> None:
        self.balance -= event.amount


class Unrelated(Event):
    """An event no aggregate here applies."""

    note: str = ""


def state(aggregate: Aggregate) -> tuple[Any, ...]:
    """What a reader can see of an aggregate: its id, version and snapshot state."""
    return (aggregate.id, aggregate.version, aggregate.snapshot_state())


def opened(account_id: str, *amounts: int) -> Account:
    """A new account with deposits of `amounts`, not saved."""
    account = Account.open(account_id)
    for amount in amounts:
        account.deposit(amount)
    return account


# -- stores ------------------------------------------------------------------------------------


def drop_postgres_store(url: str, prefix: str) -> None:
    """Drops the tables and the append function of a PostgresEventStore."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set lock_timeout = '10s'")
        conn.execute(f"drop table if exists {prefix}_events, {prefix}_head")
        conn.execute(f"drop function if exists {prefix}_append")


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[Any]:
    """A PostgresEventStore with tables of its own, dropped afterwards."""
    from buttress.backends.postgres_events import PostgresEventStore

    prefix = f"t_es_{uuid.uuid4().hex[:12]}"
    store = PostgresEventStore(postgres_url, table_prefix=prefix, max_size=8)
    try:
        yield store
    finally:
        store.close()
        drop_postgres_store(postgres_url, prefix)


STORES = ["memory", "durable", "postgres"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Each kind of store: in memory, a durable log in a temporary directory, PostgreSQL."""
    if request.param == "postgres":
        yield request.getfixturevalue("postgres_store")
        return
    store = EventStore() if request.param == "memory" else EventStore(tmp_path / "log")
    try:
        yield store
    finally:
        store.close()


class LostReply:
    """A store whose next `fail` appends reach the store and then raise, as when the reply of
    a committed append is lost on the way back."""

    def __init__(self, store: Any, fail: int = 1) -> None:
        self._store = store
        self.fail = fail
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _then_fail(self, result: Any) -> Any:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the reply was lost")
        return result

    def append(self, *args: Any, **kwargs: Any) -> Any:
        return self._then_fail(self._store.append(*args, **kwargs))

    def append_many(self, *args: Any, **kwargs: Any) -> Any:
        return self._then_fail(self._store.append_many(*args, **kwargs))


# -- aggregates --------------------------------------------------------------------------------


def test_trigger_applies_the_event_and_records_it() -> None:
    account = Account("a1")
    assert account.version is None
    assert account.pending_events == ()
    assert account.stream == "Account-a1"

    account.trigger(Account.Opened(owner="ada"))
    assert (account.owner, account.balance, account.version) == ("ada", 0, 0)
    account.deposit(5)
    account.deposit(7)
    account.withdraw(2)
    assert account.balance == 10
    assert account.version == 3  # 0-based: the version of the last event, as in the store
    assert account.pending_events == (
        Account.Opened(owner="ada"),
        Account.Deposited(amount=5),
        Account.Deposited(amount=7),
        Account.Withdrawn(amount=2),
    )
    assert isinstance(account.pending_events, tuple)
    assert repr(account) == "Account(id='a1', version=3)"


def test_a_refused_decision_changes_nothing() -> None:
    account = opened("a1", 5)
    with pytest.raises(ValueError, match="insufficient"):
        account.withdraw(6)
    assert (account.balance, account.version, len(account.pending_events)) == (5, 1, 2)


def test_an_applier_that_raises_records_nothing() -> None:
    class Fragile(Aggregate):
        class Poked(Event):
            hard: bool

        pokes = 0

        @applies(Poked)
        def _poked(self, event: Fragile.Poked) -> None:
            if event.hard:
                raise RuntimeError("broken")
            self.pokes += 1

    fragile = Fragile("f")
    fragile.trigger(Fragile.Poked(hard=False))
    with pytest.raises(RuntimeError, match="broken"):
        fragile.trigger(Fragile.Poked(hard=True))
    assert (fragile.version, fragile.pokes) == (0, 1)
    assert fragile.pending_events == (Fragile.Poked(hard=False),)


def test_an_event_without_an_applier_is_a_type_error_naming_both_classes() -> None:
    account = opened("a1")
    with pytest.raises(TypeError) as raised:
        account.trigger(Unrelated(note="x"))
    assert "Account" in str(raised.value)
    assert "Unrelated" in str(raised.value)
    assert account.version == 0
    assert account.pending_events == (Account.Opened(owner="ada"),)


@pytest.mark.parametrize("bad", [int, Account, "Opened", Account.Opened(owner="x"), None])
def test_applies_takes_only_event_classes(bad: Any) -> None:
    with pytest.raises(TypeError, match="Event subclasses"):
        applies(bad)


@pytest.mark.parametrize("bad", ["", 5, None, b"id"])
def test_aggregate_ids_are_non_empty_strings(bad: Any) -> None:
    with pytest.raises(TypeError, match="non-empty str"):
        Account(bad)


class Premium(Account):
    """Inherits Account's appliers, overrides one and adds one."""

    class Upgraded(Event):
        tier: int

    tier = 0

    @applies(Account.Deposited)
    def _deposited_with_bonus(self, event: Account.Deposited) -> None:
        self.balance += event.amount + 1
        self.deposits.append(event.command_id)

    @applies(Upgraded)
    def _upgraded(self, event: Premium.Upgraded) -> None:
        self.tier = event.tier


def test_appliers_are_inherited_and_overridden_in_subclasses() -> None:
    premium = Premium.open("p1", owner="bob")  # Opened: Account's applier
    premium.deposit(10)  # Deposited: Premium's override
    premium.trigger(Premium.Upgraded(tier=2))  # only Premium applies it
    premium.withdraw(3)  # Withdrawn: inherited
    assert (premium.owner, premium.balance, premium.tier, premium.version) == ("bob", 8, 2, 3)

    plain = opened("a1", 10)  # the base class keeps its own applier
    assert plain.balance == 10
    with pytest.raises(TypeError, match="Upgraded"):
        plain.trigger(Premium.Upgraded(tier=1))

    store = EventStore()
    premiums = Repository(store, Premium)
    premiums.save(premium)
    again = premiums.get("p1")
    assert state(again) == state(premium)
    assert [e.type for e in store.read_stream("Premium-p1")] == [
        "Account.Opened",
        "Account.Deposited",
        "Premium.Upgraded",
        "Account.Withdrawn",
    ]
    # Account cannot load a stream with an event only Premium applies.
    with pytest.raises(TypeError, match=r"Premium\.Upgraded"):
        Repository(store, Account).decode(store.read_stream("Premium-p1")[2])


def test_stream_prefix_defaults_to_the_class_name_and_can_be_set() -> None:
    class Wallet(Aggregate):
        stream_prefix = "wallet"

        class Filled(Event):
            amount: int

        @applies(Filled)
        def _filled(self, event: Wallet.Filled) -> None:
            self.amount = event.amount

    assert Account.stream_prefix == "Account"
    assert Premium.stream_prefix == "Premium"
    assert Account("x").stream == "Account-x"
    assert Wallet.stream_prefix == "wallet"
    wallet = Wallet("w-1")
    assert wallet.stream == "wallet-w-1"

    store = EventStore()
    wallets = Repository(store, Wallet)
    assert wallets.stream_of("w-1") == "wallet-w-1"
    wallet.trigger(Wallet.Filled(amount=3))
    wallets.save(wallet)
    assert store.streams() == ["wallet-w-1"]
    assert wallets.get("w-1").amount == 3


# -- the repository: save and get --------------------------------------------------------------


def test_save_and_get_round_trip(store: Any) -> None:
    accounts = Repository(store, Account)
    assert not accounts.exists("a1")
    account = opened("a1", 5, 7)
    position = accounts.save(account)
    assert position == 2  # the global position of the last event written
    assert account.pending_events == ()
    assert account.version == 2
    assert store.stream_version("Account-a1") == 2  # versions as in the store
    assert accounts.exists("a1")

    loaded = accounts.get("a1")
    assert type(loaded) is Account
    assert state(loaded) == state(account)
    assert loaded.pending_events == ()
    assert [e.type for e in store.read_stream("Account-a1")] == [
        "Account.Opened",
        "Account.Deposited",
        "Account.Deposited",
    ]
    assert msgspec.json.decode(store.read_stream("Account-a1")[1].data) == {
        "amount": 5,
        "command_id": "",
    }

    # Decided on afresh: the next save continues from the loaded version.
    loaded.withdraw(4)
    assert accounts.save(loaded) == 3
    assert (loaded.version, store.stream_version("Account-a1")) == (3, 3)
    assert accounts.get("a1").balance == 8

    # Nothing pending: nothing written.
    assert accounts.save(loaded) is None
    assert accounts.save() is None
    assert len(store.read_all()) == 4


def test_a_durable_store_keeps_aggregates_across_reopening(tmp_path: Path) -> None:
    with EventStore(tmp_path / "log") as store:
        accounts = Repository(store, Account)
        account = opened("a1", 5)
        accounts.save(account)
        account.deposit(6)
        accounts.save(account)
    with EventStore(tmp_path / "log") as store:
        again = Repository(store, Account).get("a1")
    assert state(again) == state(account)


def test_saving_several_aggregates_is_all_or_nothing(store: Any) -> None:
    accounts = Repository(store, Account)
    assert accounts.save(opened("a", 1), opened("b", 2)) == 3
    assert (store.stream_version("Account-a"), store.stream_version("Account-b")) == (1, 1)

    a, b = accounts.get("a"), accounts.get("b")
    other_b = accounts.get("b")
    other_b.deposit(100)
    accounts.save(other_b)  # b changed after it was loaded

    a.deposit(10)
    b.deposit(20)
    fresh = opened("c", 3)
    head = len(store.read_all())
    with pytest.raises(WrongExpectedVersionError) as raised:
        accounts.save(a, fresh, b)
    assert raised.value.stream == "Account-b"
    assert len(store.read_all()) == head  # none saved: not a, not the new c
    assert store.stream_version("Account-a") == 1
    assert not accounts.exists("c")
    assert len(a.pending_events) == 1
    assert len(fresh.pending_events) == 2

    # Without the stale one, the others are saved together.
    assert accounts.save(a, fresh) == head + 2
    assert accounts.get("a").balance == 11
    assert accounts.get("c").balance == 3
    assert (a.pending_events, fresh.pending_events) == ((), ())


def test_save_refuses_aggregates_of_another_class() -> None:
    accounts = Repository(EventStore(), Account)

    class Other(Aggregate):
        @applies(Unrelated)
        def _noted(self, event: Unrelated) -> None:
            pass

    other = Other("o")
    other.trigger(Unrelated())
    with pytest.raises(TypeError, match="saves Account aggregates"):
        accounts.save(other)
    with pytest.raises(TypeError, match="saves Account aggregates"):
        accounts.save(opened("a"), other)


def test_a_concurrent_modification_raises_wrong_expected_version(store: Any) -> None:
    accounts = Repository(store, Account)
    accounts.save(opened("a1", 5))
    first, second = accounts.get("a1"), accounts.get("a1")
    first.deposit(1)
    second.deposit(2)
    accounts.save(first)
    with pytest.raises(WrongExpectedVersionError) as raised:
        accounts.save(second)
    error = raised.value
    assert (error.stream, error.expected, error.actual) == ("Account-a1", "1", 2)
    assert accounts.get("a1").balance == 6
    assert len(second.pending_events) == 1  # kept, so a caller can see what was refused

    # A second aggregate created with an id that is taken: the stream was expected empty.
    with pytest.raises(WrongExpectedVersionError) as raised:
        accounts.save(opened("a1"))
    assert raised.value.expected == "no_stream"


def test_a_retried_save_after_a_lost_reply_is_idempotent(store: Any) -> None:
    flaky = LostReply(store)
    assert isinstance(flaky, EventStoreLike)
    accounts = Repository(flaky, Account)
    account = opened("a1", 5)
    with pytest.raises(ConnectionError):
        accounts.save(account)  # reached the store, but the caller never heard
    assert len(account.pending_events) == 2
    assert store.stream_version("Account-a1") == 1

    assert accounts.save(account) == 1  # the original result, nothing written twice
    assert flaky.calls == 2
    assert account.pending_events == ()
    stored = store.read_all()
    assert [(e.stream, e.version) for e in stored] == [("Account-a1", 0), ("Account-a1", 1)]

    # And for several aggregates at once.
    account.deposit(1)
    other = opened("b1", 2)
    flaky.fail = 1
    with pytest.raises(ConnectionError):
        accounts.save(account, other)
    assert accounts.save(account, other) == 4
    stored = store.read_all()
    assert len(stored) == 5
    assert len({e.id for e in stored}) == 5
    assert accounts.get("a1").balance == 6
    assert accounts.get("b1").balance == 2


def test_a_retried_save_keeps_its_event_ids() -> None:
    store = EventStore()
    accounts = Repository(LostReply(store), Account)
    account = opened("a1", 5)
    with pytest.raises(ConnectionError):
        accounts.save(account)
    ids = [e.id for e in store.read_all()]
    accounts.save(account)
    assert [e.id for e in store.read_all()] == ids


def test_get_with_a_version_travels_in_time(store: Any) -> None:
    accounts = Repository(store, Account)
    amounts = [3, 1, 4, 1, 5]
    accounts.save(opened("a1", *amounts))
    for version in range(len(amounts) + 1):
        past = accounts.get("a1", version=version)
        assert past.version == version
        assert past.balance == sum(amounts[:version])
        assert past.pending_events == ()
    assert accounts.get("a1", version=100).version == len(amounts)  # no further than there is


def test_a_missing_aggregate_raises_aggregate_not_found(store: Any) -> None:
    accounts = Repository(store, Account)
    with pytest.raises(AggregateNotFoundError) as raised:
        accounts.get("nobody")
    error = raised.value
    assert isinstance(error, KeyError)
    assert isinstance(error, ButtressError)
    assert "'nobody'" in str(error)
    assert "Account-nobody" in str(error)
    with pytest.raises(KeyError):
        accounts.get("nobody", version=0)
    assert not accounts.exists("nobody")


def test_repository_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match="event store"):
        Repository("not a store", Account)
    with pytest.raises(TypeError, match="event store"):
        Repository(None, Account)
    store = EventStore()
    for bad in (Account("x"), int, Aggregate.__init__, "Account"):
        with pytest.raises(TypeError, match="Aggregate subclass"):
            Repository(store, bad)


@pytest.mark.parametrize(
    ("every", "error"), [(0, ValueError), (-3, ValueError), (True, TypeError), (2.0, TypeError)]
)
def test_repository_refuses_bad_snapshot_every(every: Any, error: type) -> None:
    with pytest.raises(error, match="snapshot_every"):
        Repository(EventStore(), Account, snapshot_every=every)


async def test_save_async_and_get_async(store: Any) -> None:
    accounts = Repository(store, Account)
    account = opened("a1", 5, 6)
    assert await accounts.save_async(account) == 2
    loaded = await accounts.get_async("a1")
    assert state(loaded) == state(account)
    past = await accounts.get_async("a1", version=1)
    assert past.balance == 5
    loaded.deposit(1)
    stale = await accounts.get_async("a1")
    stale.deposit(2)
    assert await accounts.save_async(loaded, opened("b1")) == 4
    with pytest.raises(WrongExpectedVersionError):
        await accounts.save_async(stale)
    with pytest.raises(AggregateNotFoundError):
        await accounts.get_async("nobody")
    assert (await accounts.get_async("a1")).balance == 12


# -- snapshots ---------------------------------------------------------------------------------


class Counted(Account):
    """An Account that counts the events its instances apply (to see what a load replays)."""

    applied = 0

    def _apply(self, event: Event) -> None:
        type(self).applied += 1
        super()._apply(event)


def snapshot_versions(store: Any, stream: str) -> list[int]:
    return [int(e.metadata) for e in store.read_stream(f"$snapshot-{stream}")]


def test_a_snapshot_is_written_each_time_a_save_crosses_a_multiple(store: Any) -> None:
    accounts = Repository(store, Account, snapshot_every=3)
    account = Account.open("a1")
    accounts.save(account)  # 1 event
    assert snapshot_versions(store, "Account-a1") == []
    account.deposit(1)
    accounts.save(account)  # 2 events
    assert snapshot_versions(store, "Account-a1") == []
    account.deposit(2)
    accounts.save(account)  # 3 events: the first multiple
    assert snapshot_versions(store, "Account-a1") == [2]
    for amount in (3, 4, 5, 6):
        account.deposit(amount)
    accounts.save(account)  # 7 events: past 6, one snapshot at the version saved
    assert snapshot_versions(store, "Account-a1") == [2, 6]
    account.deposit(7)
    accounts.save(account)  # 8
    account.deposit(8)
    accounts.save(account)  # 9
    assert snapshot_versions(store, "Account-a1") == [2, 6, 8]
    for amount in range(10):
        account.deposit(amount + 1)
    accounts.save(account)  # 19: past 12, 15 and 18 in one save, one snapshot
    assert snapshot_versions(store, "Account-a1") == [2, 6, 8, 18]

    snapshot = store.read_stream("$snapshot-Account-a1", backwards=True, limit=1)[0]
    assert snapshot.type == "Snapshot"
    assert msgspec.json.decode(snapshot.data) == {
        "owner": "ada",
        "balance": account.balance,
        "deposits": [""] * 18,
    }
    # The store's own snapshot API sees the same newest snapshot.
    newest = store.load_snapshot("Account-a1")
    assert (newest.stream, newest.version, newest.data) == ("Account-a1", 18, snapshot.data)
    assert store.load_snapshot("Account-nobody") is None
    assert state(accounts.get("a1")) == state(account)
    assert state(Repository(store, Account).get("a1")) == state(account)


def test_get_starts_from_the_newest_snapshot() -> None:
    store = EventStore()
    accounts = Repository(store, Counted, snapshot_every=5)
    account = Counted.open("a1")
    for amount in range(1, 13):
        account.deposit(amount)
        accounts.save(account)  # snapshots at versions 4 and 9
    assert snapshot_versions(store, "Counted-a1") == [4, 9]

    Counted.applied = 0
    loaded = accounts.get("a1")
    assert Counted.applied == 3  # versions 10, 11 and 12 only
    assert state(loaded) == state(account)

    Counted.applied = 0
    replayed = Repository(store, Counted).get("a1")
    assert Counted.applied == 13
    assert state(replayed) == state(loaded)

    # Time travel replays from the start, whatever the snapshots.
    Counted.applied = 0
    assert accounts.get("a1", version=6).balance == sum(range(1, 7))
    assert Counted.applied == 7

    # A snapshot at the stream's last version: nothing left to replay.
    account.deposit(13)
    account.deposit(14)
    accounts.save(account)  # 15 events: snapshot at 14
    Counted.applied = 0
    assert state(accounts.get("a1")) == state(account)
    assert Counted.applied == 0


def test_snapshots_when_saving_several_aggregates_at_once() -> None:
    store = EventStore()
    accounts = Repository(store, Account, snapshot_every=2)
    a, b, c = opened("a", 1), opened("b"), opened("c", 1, 2)
    accounts.save(a, b, c)
    assert snapshot_versions(store, "Account-a") == [1]
    assert snapshot_versions(store, "Account-b") == []
    assert snapshot_versions(store, "Account-c") == [2]
    b.deposit(4)
    c.deposit(5)
    accounts.save(a, b, c)  # a unchanged: nothing pending, no new snapshot
    assert snapshot_versions(store, "Account-a") == [1]
    assert snapshot_versions(store, "Account-b") == [1]
    assert snapshot_versions(store, "Account-c") == [2, 3]
    for aggregate in (a, b, c):
        assert state(accounts.get(aggregate.id)) == state(aggregate)


class Ledger(Aggregate):
    """An aggregate with several kinds of JSON state, for the snapshot property test."""

    class Started(Event):
        pass

    class Booked(Event):
        amount: int
        tag: str

    class Renamed(Event):
        name: str

    @applies(Started)
    def _started(self, event: Ledger.Started) -> None:
        self.total = 0
        self.entries: list[int] = []
        self.tags: dict[str, int] = {}
        self.name: str | None = None

    @applies(Booked)
    def _booked(self, event: Ledger.Booked) -> None:
        self.total += event.amount
        self.entries.append(event.amount)
        self.tags[event.tag] = self.tags.get(event.tag, 0) + 1

    @applies(Renamed)
    def _renamed(self, event: Ledger.Renamed) -> None:
        self.name = event.name


LEDGER_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("book"), st.integers(-1000, 1000), st.sampled_from("abc")),
        st.tuples(st.just("rename"), st.text(st.characters(codec="utf-8"), max_size=6)),
        st.tuples(st.just("save")),
        st.tuples(st.just("reload")),
    ),
    max_size=40,
)


@given(steps=LEDGER_STEPS, every=st.integers(1, 6), travel=st.integers(0, 50))
def test_loading_from_snapshots_matches_full_replay(
    steps: list[tuple[Any, ...]], every: int, travel: int
) -> None:
    store = EventStore()
    snapshotting = Repository(store, Ledger, snapshot_every=every)
    replaying = Repository(store, Ledger)
    ledger = Ledger("l")
    ledger.trigger(Ledger.Started())
    expected_snapshots: list[int] = []

    def save() -> None:
        count = len(ledger.pending_events)
        snapshotting.save(ledger)
        assert ledger.version is not None
        if count and (ledger.version + 1) // every > (ledger.version + 1 - count) // every:
            expected_snapshots.append(ledger.version)

    for step in steps:
        if step[0] == "book":
            ledger.trigger(Ledger.Booked(amount=step[1], tag=step[2]))
        elif step[0] == "rename":
            ledger.trigger(Ledger.Renamed(name=step[1]))
        elif step[0] == "save":
            save()
        else:
            save()
            ledger = snapshotting.get("l")
            assert state(ledger) == state(replaying.get("l"))
    save()

    assert state(snapshotting.get("l")) == state(replaying.get("l")) == state(ledger)
    assert snapshot_versions(store, "Ledger-l") == expected_snapshots
    assert ledger.version is not None
    version = min(travel, ledger.version)
    assert state(snapshotting.get("l", version=version)) == state(
        replaying.get("l", version=version)
    )


class Tagged(Aggregate):
    """State that JSON does not round-trip (a set, a tuple): snapshot_state and restore_state
    convert it."""

    class Added(Event):
        tag: str

    restored = 0

    @applies(Added)
    def _tagged(self, event: Tagged.Added) -> None:
        self.tags: set[str] = getattr(self, "tags", set()) | {event.tag}
        self.last: tuple[str, int] = (event.tag, len(self.tags))

    def snapshot_state(self) -> dict[str, Any]:
        return {"tags": sorted(self.tags), "last": list(self.last)}

    def restore_state(self, state: dict[str, Any]) -> None:
        type(self).restored += 1
        self.tags = set(state["tags"])
        self.last = (state["last"][0], state["last"][1])


def test_a_custom_snapshot_state_and_restore_state() -> None:
    store = EventStore()
    snapshotting = Repository(store, Tagged, snapshot_every=4)
    tagged = Tagged("t")
    for tag in "abcabd":
        tagged.trigger(Tagged.Added(tag=tag))
    snapshotting.save(tagged)
    assert msgspec.json.decode(store.read_stream("$snapshot-Tagged-t")[0].data) == {
        "tags": ["a", "b", "c", "d"],
        "last": ["d", 4],
    }
    Tagged.restored = 0
    loaded = snapshotting.get("t")
    assert Tagged.restored == 1
    replayed = Repository(store, Tagged).get("t")
    assert (loaded.tags, loaded.last, loaded.version) == (
        replayed.tags,
        replayed.last,
        replayed.version,
    )
    assert loaded.tags == {"a", "b", "c", "d"}
    assert loaded.last == ("d", 4)


# -- upcasting ---------------------------------------------------------------------------------


def account_model(version: int, *, with_upcast: bool = True) -> type[Aggregate]:
    """The same aggregate and event (same qualified names, so the same stored type) at
    schema version 1 (``amount``), 2 (``cents`` and ``currency``) or 3 (adds ``memo``)."""

    upcasts: list[tuple[dict[str, Any], int]] = []

    class Model(Aggregate):
        stream_prefix = "model"
        seen = upcasts

        if version == 1:

            class Deposited(Event):
                amount: int

        elif version == 2:

            class Deposited(Event):
                schema_version = 2
                cents: int
                currency: str

                if with_upcast:

                    @classmethod
                    def upcast(cls, data: dict[str, Any], stored_version: int) -> dict[str, Any]:
                        upcasts.append((dict(data), stored_version))
                        return {"cents": data["amount"] * 100, "currency": "EUR"}

        else:

            class Deposited(Event):
                schema_version = 3
                cents: int
                currency: str
                memo: str

        @applies(Deposited)
        def _deposited(self, event: Any) -> None:
            self.events = [*getattr(self, "events", []), event]

    return Model


def test_events_stored_at_an_older_schema_version_are_upcast() -> None:
    store = EventStore()
    old = account_model(1)
    old_repository = Repository(store, old)
    model = old("m")
    model.trigger(old.Deposited(amount=3))
    model.trigger(old.Deposited(amount=4))
    old_repository.save(model)
    stored_name = "account_model.<locals>.Model.Deposited"  # the qualified name, at version 1
    assert [e.type for e in store.read_all()] == [stored_name, stored_name]

    new = account_model(2)
    new_repository = Repository(store, new)
    loaded = new_repository.get("m")
    deposited = new.Deposited
    assert loaded.events == [
        deposited(cents=300, currency="EUR"),
        deposited(cents=400, currency="EUR"),
    ]
    assert new.seen == [({"amount": 3}, 1), ({"amount": 4}, 1)]

    # New events are stored at version 2; a stream holding both versions loads.
    loaded.trigger(deposited(cents=5, currency="USD"))
    new_repository.save(loaded)
    # The type name stays the same (filters by type keep working); the version goes in the
    # metadata.
    assert store.read_all()[-1].type == stored_name
    assert json.loads(store.read_all()[-1].metadata) == {"schema_version": 2}
    assert store.read_all()[0].metadata == b""
    again = new_repository.get("m")
    assert [e.cents for e in again.events] == [300, 400, 5]

    # decode() is what projections read: upcast too.
    decoded = [new_repository.decode(e) for e in store.read_all()]
    assert decoded == [
        deposited(cents=300, currency="EUR"),
        deposited(cents=400, currency="EUR"),
        deposited(cents=5, currency="USD"),
    ]
    # The old code cannot read what the new code stored.
    with pytest.raises(TypeError, match="newer"):
        old_repository.get("m")


def test_an_event_stored_by_newer_code_is_a_clear_type_error() -> None:
    store = EventStore()
    newest = account_model(3)
    model = newest("m")
    model.trigger(newest.Deposited(cents=1, currency="EUR", memo="x"))
    Repository(store, newest).save(model)

    current = Repository(store, account_model(2))
    with pytest.raises(TypeError) as raised:
        current.get("m")
    message = str(raised.value)
    assert "Model.Deposited" in message
    assert "version 3" in message
    assert "version 2" in message
    with pytest.raises(TypeError, match="newer"):
        current.decode(store.read_all()[0])


def test_an_older_event_without_an_upcast_says_so() -> None:
    store = EventStore()
    old = account_model(1)
    model = old("m")
    model.trigger(old.Deposited(amount=3))
    Repository(store, old).save(model)
    with pytest.raises(NotImplementedError, match="upcast"):
        Repository(store, account_model(2, with_upcast=False)).get("m")


def test_a_stored_type_no_applier_handles_is_a_type_error() -> None:
    store = EventStore()
    accounts = Repository(store, Account)
    accounts.save(opened("a1"))
    store.append("Account-a1", [NewEvent("Account.Frozen", b"{}")], expected_version=0)
    with pytest.raises(TypeError) as raised:
        accounts.get("a1")
    assert "Account.Frozen" in str(raised.value)
    assert "Account" in str(raised.value)
    assert accounts.get("a1", version=0).owner == "ada"  # what comes before still loads


def test_decode_returns_the_domain_event() -> None:
    store = EventStore()
    accounts = Repository(store, Account)
    accounts.save(opened("a1", 5))
    recorded = store.read_all()
    assert [accounts.decode(e) for e in recorded] == [
        Account.Opened(owner="ada"),
        Account.Deposited(amount=5),
    ]
    foreign = RecordedEvent(
        stream="x",
        version=0,
        position=9,
        type="Unrelated",
        data=b"{}",
        metadata=b"",
        id=uuid.uuid4(),
        timestamp=0.0,
    )
    with pytest.raises(TypeError, match="Unrelated"):
        accounts.decode(foreign)
    store.append("Account-a1", [NewEvent("Account.Deposited", b'{"amount": "lots"}')])
    with pytest.raises(msgspec.ValidationError):
        accounts.decode(store.read_all()[-1])


# -- the buses ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Greet:
    name: str


@dataclasses.dataclass
class Shout:
    name: str


@dataclasses.dataclass
class Checked:
    value: int

    def validate(self) -> None:
        if self.value < 0:
            raise ValueError("value must not be negative")


@dataclasses.dataclass
class Deposit:
    account_id: str
    amount: int
    command_id: str


def test_one_handler_per_message_type() -> None:
    bus = CommandBus()

    @bus.handles(Greet)
    def greet(command: Greet) -> str:
        return f"hello {command.name}"

    assert greet(Greet("x")) == "hello x"  # handles() returns the function itself
    assert Greet in bus
    assert Shout not in bus
    assert bus.dispatch(Greet("Ada")) == "hello Ada"
    with pytest.raises(ValueError, match="already has a handler"):
        bus.register(Greet, lambda command: None)
    with pytest.raises(ValueError, match="Greet"):
        bus.handles(Greet)(greet)
    assert bus.dispatch(Greet("Bob")) == "hello Bob"  # the first one stays

    bus.register(Shout, lambda command: command.name.upper())
    assert bus.dispatch(Shout("ada")) == "ADA"


def test_a_message_without_a_handler_raises_no_handler_error() -> None:
    commands, queries = CommandBus(), QueryBus()
    with pytest.raises(NoHandlerError) as raised:
        commands.dispatch(Greet("x"))
    assert isinstance(raised.value, LookupError)
    assert isinstance(raised.value, ButtressError)
    assert "command bus" in str(raised.value)
    assert "Greet" in str(raised.value)
    with pytest.raises(NoHandlerError, match="query bus"):
        queries.dispatch(Greet("x"))

    # Exactly the registered type: not a subclass of it.
    class Louder(Greet):
        pass

    commands.register(Greet, lambda command: "hi")
    with pytest.raises(NoHandlerError, match="Louder"):
        commands.dispatch(Louder("x"))


async def test_dispatch_async_raises_no_handler_error() -> None:
    with pytest.raises(NoHandlerError, match="Greet"):
        await QueryBus().dispatch_async(Greet("x"))


def tracing(log: list[str], name: str) -> Callable[[Any, Callable[[Any], Any]], Any]:
    def middleware(message: Any, call_next: Callable[[Any], Any]) -> Any:
        log.append(f"{name} in")
        result = call_next(message)
        log.append(f"{name} out")
        return result

    return middleware


def async_tracing(log: list[str], name: str) -> Callable[[Any, Callable[[Any], Any]], Any]:
    async def middleware(message: Any, call_next: Callable[[Any], Any]) -> Any:
        log.append(f"{name} in")
        await asyncio.sleep(0)
        result = await call_next(message)
        log.append(f"{name} out")
        return result

    return middleware


def test_middleware_runs_outermost_first() -> None:
    log: list[str] = []

    def rewrite(message: Any, call_next: Callable[[Any], Any]) -> Any:
        return call_next(Greet(message.name + "!")) + "?"

    bus = QueryBus(middleware=[tracing(log, "outer"), rewrite, tracing(log, "inner")])

    @bus.handles(Greet)
    def greet(query: Greet) -> str:
        log.append("handler")
        return query.name

    assert bus.dispatch(Greet("ada")) == "ada!?"
    assert log == ["outer in", "inner in", "handler", "inner out", "outer out"]


def test_middleware_sees_the_handlers_exception_and_can_stop_a_message() -> None:
    log: list[str] = []
    seen: list[BaseException] = []

    def catcher(message: Any, call_next: Callable[[Any], Any]) -> Any:
        try:
            return call_next(message)
        except LookupError as error:
            seen.append(error)
            raise

    def gate(message: Any, call_next: Callable[[Any], Any]) -> Any:
        if message.name == "stop":
            return "stopped"
        return call_next(message)

    bus = CommandBus(middleware=[catcher, gate])

    @bus.handles(Greet)
    def greet(command: Greet) -> str:
        log.append(command.name)
        raise KeyError(command.name)

    with pytest.raises(KeyError, match="boom"):
        bus.dispatch(Greet("boom"))
    assert [type(e) for e in seen] == [KeyError]
    assert bus.dispatch(Greet("stop")) == "stopped"
    assert log == ["boom"]


@pytest.mark.parametrize("handler_kind", ["sync", "async"])
@pytest.mark.parametrize("middleware_kind", ["plain", "async def", "both"])
async def test_dispatch_async_with_sync_and_async_handlers_and_middleware(
    handler_kind: str, middleware_kind: str
) -> None:
    log: list[str] = []
    layers = {
        "plain": [tracing(log, "a"), tracing(log, "b")],
        "async def": [async_tracing(log, "a"), async_tracing(log, "b")],
        "both": [async_tracing(log, "a"), tracing(log, "b")],
    }[middleware_kind]
    bus = CommandBus(middleware=layers)

    if handler_kind == "sync":

        def handler(command: Greet) -> str:
            log.append("handler")
            return f"hello {command.name}"

    else:

        async def handler(command: Greet) -> str:
            await asyncio.sleep(0)
            log.append("handler")
            return f"hello {command.name}"

    bus.register(Greet, handler)
    assert await bus.dispatch_async(Greet("ada")) == "hello ada"
    # Outermost first. A plain middleware returns call_next's awaitable without awaiting it,
    # so its "out" comes before the layers inside it run (it wraps the call, not the wait).
    expected = {
        "plain": ["a in", "a out", "b in", "b out", "handler"],
        "async def": ["a in", "b in", "handler", "b out", "a out"],
        "both": ["a in", "b in", "b out", "handler", "a out"],
    }
    assert log == expected[middleware_kind]


async def test_dispatch_async_propagates_exceptions_through_async_middleware() -> None:
    log: list[str] = []
    bus = CommandBus(middleware=[async_tracing(log, "a")])

    @bus.handles(Greet)
    async def fail(command: Greet) -> None:
        raise RuntimeError(command.name)

    with pytest.raises(RuntimeError, match="oops"):
        await bus.dispatch_async(Greet("oops"))
    assert log == ["a in"]


def test_sync_dispatch_with_plain_function_middleware() -> None:
    calls: list[Any] = []

    def record(message: Any, call_next: Callable[[Any], Any]) -> Any:
        calls.append(message)
        return call_next(message)

    bus = QueryBus(middleware=(record,))
    bus.register(Greet, lambda query: len(query.name))
    assert bus.dispatch(Greet("four")) == 4
    assert calls == [Greet("four")]


def test_logging_middleware_logs_success_and_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="buttress.cqrs")
    bus = CommandBus(middleware=[LoggingMiddleware()])
    bus.register(Greet, lambda command: f"hi {command.name}")

    @bus.handles(Shout)
    def shout(command: Shout) -> None:
        raise RuntimeError("too loud")

    assert bus.dispatch(Greet("ada")) == "hi ada"
    [done] = caplog.records
    assert done.name == "buttress.cqrs"
    assert done.levelno == logging.DEBUG
    assert done.getMessage().startswith("Greet handled in ")
    assert done.getMessage().endswith(" ms")

    caplog.clear()
    with pytest.raises(RuntimeError, match="too loud"):
        bus.dispatch(Shout("x"))
    [failed] = caplog.records
    assert failed.levelno == logging.ERROR
    assert failed.getMessage().startswith("Shout failed after ")
    assert failed.exc_info is not None
    assert isinstance(failed.exc_info[1], RuntimeError)


def test_logging_middleware_with_its_own_logger_and_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("tests.cqrs.custom")
    caplog.set_level(logging.INFO, logger="tests.cqrs.custom")
    bus = CommandBus(middleware=[LoggingMiddleware(logger, level=logging.INFO)])
    bus.register(Greet, lambda command: None)
    bus.dispatch(Greet("ada"))
    assert [(r.name, r.levelno) for r in caplog.records] == [("tests.cqrs.custom", logging.INFO)]

    caplog.clear()
    quiet = CommandBus(middleware=[LoggingMiddleware(logger, level=logging.DEBUG)])
    quiet.register(Greet, lambda command: None)
    quiet.dispatch(Greet("ada"))  # below the logger's level: nothing
    assert caplog.records == []


async def test_logging_middleware_in_dispatch_async(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="buttress.cqrs")
    bus = CommandBus(middleware=[LoggingMiddleware()])

    @bus.handles(Greet)
    async def greet(command: Greet) -> str:
        await asyncio.sleep(0.02)
        return command.name

    @bus.handles(Shout)
    async def shout(command: Shout) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async failure")

    assert await bus.dispatch_async(Greet("ada")) == "ada"
    [done] = caplog.records
    assert done.getMessage().startswith("Greet handled in ")
    # It timed the awaited handler, not just the creation of its coroutine.
    assert float(done.getMessage().split()[3]) >= 15
    caplog.clear()
    with pytest.raises(RuntimeError, match="async failure"):
        await bus.dispatch_async(Shout("x"))
    [failed] = caplog.records
    assert failed.levelno == logging.ERROR
    assert failed.getMessage().startswith("Shout failed after ")


def test_validation_middleware_with_a_validator() -> None:
    validated: list[Any] = []

    def validator(message: Any) -> None:
        validated.append(message)
        if not message.name:
            raise ValueError("name is required")

    handled: list[Any] = []
    bus = CommandBus(middleware=[ValidationMiddleware(validator)])
    bus.register(Greet, handled.append)
    bus.register(Checked, handled.append)
    bus.dispatch(Greet("ada"))
    with pytest.raises(ValueError, match="required"):
        bus.dispatch(Greet(""))
    assert handled == [Greet("ada")]
    assert validated == [Greet("ada"), Greet("")]
    # With a validator, the message's own validate() is not the one asked.
    with pytest.raises(AttributeError):
        bus.dispatch(Checked(-1))


def test_validation_middleware_with_the_messages_validate() -> None:
    handled: list[Any] = []
    bus = CommandBus(middleware=[ValidationMiddleware()])
    bus.register(Checked, handled.append)
    bus.register(Greet, handled.append)
    bus.dispatch(Checked(1))
    with pytest.raises(ValueError, match="negative"):
        bus.dispatch(Checked(-1))
    bus.dispatch(Greet(""))  # no validate(): passes
    assert handled == [Checked(1), Greet("")]


async def test_validation_middleware_in_dispatch_async() -> None:
    handled: list[Any] = []
    bus = CommandBus(middleware=[ValidationMiddleware()])

    @bus.handles(Checked)
    async def handle(command: Checked) -> int:
        handled.append(command)
        return command.value

    assert await bus.dispatch_async(Checked(3)) == 3
    with pytest.raises(ValueError, match="negative"):
        await bus.dispatch_async(Checked(-3))
    assert handled == [Checked(3)]


def conflict() -> WrongExpectedVersionError:
    return WrongExpectedVersionError("Account-x", "1", 2)


@pytest.mark.parametrize("attempts", [1, 2, 5])
def test_retry_on_conflict_tries_exactly_attempts_times_then_raises(
    attempts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    calls: list[int] = []
    bus = CommandBus(middleware=[RetryOnConflict(attempts=attempts, backoff=0.5)])

    @bus.handles(Greet)
    def always_conflicts(command: Greet) -> None:
        calls.append(len(calls))
        raise WrongExpectedVersionError("Account-x", "1", len(calls))

    with pytest.raises(WrongExpectedVersionError) as raised:
        bus.dispatch(Greet("x"))
    assert len(calls) == attempts
    assert raised.value.actual == attempts  # the last attempt's error
    assert len(pauses) == attempts - 1
    for attempt, pause in enumerate(pauses):
        assert 0 <= pause <= 0.5 * 2**attempt


def test_retry_on_conflict_stops_at_the_first_success_and_ignores_other_errors() -> None:
    calls: list[str] = []
    bus = CommandBus(middleware=[RetryOnConflict(attempts=5, backoff=0)])

    @bus.handles(Greet)
    def flaky(command: Greet) -> int:
        calls.append(command.name)
        if len(calls) < 3:
            raise conflict()
        return len(calls)

    @bus.handles(Shout)
    def broken(command: Shout) -> None:
        calls.append(command.name)
        raise ValueError("not a conflict")

    assert bus.dispatch(Greet("g")) == 3
    calls.clear()
    with pytest.raises(ValueError, match="not a conflict"):
        bus.dispatch(Shout("s"))
    assert calls == ["s"]


async def test_retry_on_conflict_in_dispatch_async() -> None:
    calls: list[int] = []
    bus = CommandBus(middleware=[RetryOnConflict(attempts=4, backoff=0.001)])

    @bus.handles(Greet)
    async def flaky(command: Greet) -> str:
        calls.append(1)
        await asyncio.sleep(0)
        if len(calls) < 4:
            raise conflict()
        return "done"

    @bus.handles(Shout)
    def always(command: Shout) -> None:
        calls.append(1)
        raise conflict()

    assert await bus.dispatch_async(Greet("x")) == "done"
    assert len(calls) == 4
    calls.clear()
    with pytest.raises(WrongExpectedVersionError):
        await bus.dispatch_async(Shout("x"))
    assert len(calls) == 4


def account_bus(accounts: Repository[Account], conflicts: list[int]) -> CommandBus:
    """A bus whose Deposit handler loads the account, waits a moment (so that concurrent
    writers interleave), deposits and saves; conflicts are counted inside the retries."""

    def count_conflicts(message: Any, call_next: Callable[[Any], Any]) -> Any:
        try:
            return call_next(message)
        except WrongExpectedVersionError:
            conflicts.append(1)
            raise

    bus = CommandBus(middleware=[RetryOnConflict(attempts=60, backoff=0.001), count_conflicts])

    @bus.handles(Deposit)
    def deposit(command: Deposit) -> int | None:
        account = accounts.get(command.account_id)
        time.sleep(0.001)
        account.deposit(command.amount, command.command_id)
        return accounts.save(account)

    return bus


def test_retry_on_conflict_with_concurrent_writers(store: Any) -> None:
    accounts = Repository(store, Account)
    accounts.save(Account.open("shared"))
    conflicts: list[int] = []
    bus = account_bus(accounts, conflicts)
    threads, per_thread = 4, 8
    start = threading.Barrier(threads)
    commands = [
        [Deposit("shared", 1 + t * per_thread + i, f"{t}-{i}") for i in range(per_thread)]
        for t in range(threads)
    ]

    def writer(index: int) -> None:
        start.wait(JOIN)
        for command in commands[index]:
            bus.dispatch(command)

    run_threads(writer, threads, within=60)

    final = accounts.get("shared")
    everything = [command for batch in commands for command in batch]
    assert final.balance == sum(command.amount for command in everything)
    assert sorted(final.deposits) == sorted(command.command_id for command in everything)
    assert final.version == len(everything)
    assert conflicts, "the writers never contended: the test proved nothing"


async def test_retry_on_conflict_with_concurrent_async_writers() -> None:
    accounts = Repository(EventStore(), Account)
    await accounts.save_async(Account.open("shared"))
    conflicts: list[int] = []

    async def count_async(message: Any, call_next: Callable[[Any], Any]) -> Any:
        try:
            return await call_next(message)
        except WrongExpectedVersionError:
            conflicts.append(1)
            raise

    bus = CommandBus(middleware=[RetryOnConflict(attempts=60, backoff=0.001), count_async])

    @bus.handles(Deposit)
    async def deposit(command: Deposit) -> int | None:
        account = await accounts.get_async(command.account_id)
        await asyncio.sleep(0.001)
        account.deposit(command.amount, command.command_id)
        return await accounts.save_async(account)

    commands = [Deposit("shared", n + 1, str(n)) for n in range(12)]
    await asyncio.wait_for(
        asyncio.gather(*(bus.dispatch_async(command) for command in commands)), 60
    )
    final = await accounts.get_async("shared")
    assert final.balance == sum(command.amount for command in commands)
    assert sorted(final.deposits) == sorted(command.command_id for command in commands)
    assert conflicts


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"attempts": 0}, ValueError),
        ({"attempts": -1}, ValueError),
        ({"attempts": True}, ValueError),
        ({"attempts": 2.0}, ValueError),
        ({"attempts": "3"}, ValueError),
        ({"backoff": -0.1}, ValueError),
        ({"backoff": "0.1"}, ValueError),
        ({"backoff": None}, ValueError),
    ],
)
def test_retry_on_conflict_refuses_bad_arguments(arguments: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        RetryOnConflict(**arguments)


@pytest.mark.parametrize("backoff", [float("nan"), float("inf")])
def test_retry_on_conflict_refuses_a_non_finite_backoff(backoff: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        RetryOnConflict(attempts=2, backoff=backoff)


def test_buses_refuse_bad_arguments() -> None:
    with pytest.raises(TypeError, match="middleware"):
        CommandBus(middleware=[LoggingMiddleware(), 42])
    with pytest.raises(TypeError, match="middleware"):
        QueryBus(middleware=["not callable"])
    bus = CommandBus()
    with pytest.raises(TypeError, match="handler must be callable"):
        bus.register(Greet, 42)
    with pytest.raises(TypeError, match="message_type"):
        bus.register("Greet", lambda command: None)
    with pytest.raises(TypeError, match="message_type"):
        bus.handles(Greet("x"))(lambda command: None)
    with pytest.raises(TypeError, match="validator"):
        ValidationMiddleware(validator="yes")
    assert Greet not in bus
