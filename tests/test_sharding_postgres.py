"""ShardedStore on a real PostgreSQL server: every test creates fresh databases on the server at
BUTTRESS_POSTGRES_URL to act as the store's nodes (and as replicas), and drops them afterwards,
even when the test fails. Every test takes the `postgres_url` fixture (through `cluster`), so it
skips, or fails with BUTTRESS_REQUIRE_SERVICES=1, when no server answers."""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from buttress import (
    QuorumNotReachedError,
    RebalanceError,
    ShardedStore,
    ShardUnavailableError,
)
from buttress.backends.postgres import PostgresShardBackend
from buttress.backends.sqlite import SQLiteShardBackend
from buttress.routing.sharding import ShardBackend
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sharding_support import FlakyBackend, NodeDown, check_placement, contents, rows_of, wrap

# Small pools, so that a test with several nodes stays well under the server's connections.
POOL: dict[str, Any] = {"max_size": 4, "timeout": 10.0}
# The longest a test waits for the replicas to catch up, or for its writer threads to stop.
FLUSH = 15.0
# Quick retries, so a replica that comes back is caught up at once.
BACKOFF = (0.01, 0.05)

# Every database this module created (with the server's URL), to check at the end of the module
# that none is left behind.
_created: list[tuple[str, str]] = []


# -- the databases -----------------------------------------------------------------------------


def _database_url(postgres_url: str, name: str) -> str:
    return make_conninfo(postgres_url, dbname=name)


def _database_name(url: str) -> str:
    return str(conninfo_to_dict(url)["dbname"])


def _create_database(admin: psycopg.Connection[Any], name: str, icu: bool) -> None:
    plain = sql.SQL("create database {} template template0").format(sql.Identifier(name))
    if icu:
        # A database whose default collation is not byte order (ICU en-US sorts "a" < "B" and
        # "é" < "f"), so that only COLLATE "C" keeps its keys in the order SQLite has them.
        try:
            admin.execute(
                sql.SQL(
                    "create database {} locale_provider icu icu_locale 'en-US' template template0"
                ).format(sql.Identifier(name))
            )
        except psycopg.Error:  # a server before 15, or built without ICU
            admin.execute(plain)
        return
    admin.execute(plain)


def _existing(admin: psycopg.Connection[Any], names: Sequence[str]) -> set[str]:
    found = admin.execute(
        "select datname from pg_database where datname = any(%s)", (list(names),)
    ).fetchall()
    return {str(name) for (name,) in found}


@contextlib.contextmanager
def shard_databases(postgres_url: str, count: int, *, icu: bool = False) -> Iterator[list[str]]:
    """Creates ``count`` fresh databases and yields their URLs; drops them (closing whatever
    sessions are still in them) when the block ends, however it ends."""
    tag = uuid.uuid4().hex[:8]
    names = [f"buttress_shard_{tag}_{number}" for number in range(count)]
    made: list[str] = []
    try:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            for name in names:
                _create_database(admin, name, icu)
                made.append(name)
                _created.append((postgres_url, name))
        yield [_database_url(postgres_url, name) for name in names]
    finally:
        if made:
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                for name in reversed(made):
                    admin.execute(
                        sql.SQL("drop database if exists {} with (force)").format(
                            sql.Identifier(name)
                        )
                    )


@pytest.fixture(scope="module", autouse=True)
def _no_database_is_left_behind() -> Iterator[None]:
    yield
    for postgres_url in sorted({url for url, _ in _created}):
        names = [name for url, name in _created if url == postgres_url]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            assert _existing(admin, names) == set(), "shard databases left on the server"


class Cluster:
    """What one test makes on the server: databases, their backends and the stores over them.
    At the end the stores close, then the backends, then the databases are dropped."""

    def __init__(self, postgres_url: str) -> None:
        self.postgres_url = postgres_url
        self._databases = contextlib.ExitStack()
        self._stores: list[ShardedStore] = []
        self._nodes: list[ShardBackend] = []

    def databases(self, count: int, *, icu: bool = False) -> list[str]:
        return self._databases.enter_context(shard_databases(self.postgres_url, count, icu=icu))

    def node(self, url: str, **options: Any) -> PostgresShardBackend:
        node = PostgresShardBackend(url, **{**POOL, **options})
        self._nodes.append(node)
        return node

    def sqlite(self, path: Path) -> SQLiteShardBackend:
        node = SQLiteShardBackend(path)
        self._nodes.append(node)
        return node

    def store(self, nodes: Mapping[str, ShardBackend], **options: Any) -> ShardedStore:
        store = ShardedStore(nodes, **options)
        self._stores.append(store)
        return store

    def close(self) -> None:
        with self._databases, contextlib.ExitStack() as objects:
            # Closing twice is harmless: a store closes the backends it was given.
            for node in self._nodes:
                objects.callback(node.close)
            for store in self._stores:
                objects.callback(store.close, 1.0)


@pytest.fixture
def cluster(postgres_url: str) -> Iterator[Cluster]:
    made = Cluster(postgres_url)
    try:
        yield made
    finally:
        made.close()


def _query(url: str, statement: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Runs a statement in a database directly, on a connection of its own."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, parameters)
        return cursor.fetchall() if cursor.description else []


def _eventually(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + FLUSH
    while not condition():
        assert time.monotonic() < deadline, f"not within {FLUSH} s: {what}"
        time.sleep(0.01)


def _soon(condition: Callable[[], bool], within: float = 1.0) -> bool:
    """Whether `condition` holds within `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _count(url: str, table: str) -> int:
    ((found,),) = _query(url, f"select count(*) from {table}")
    return int(found)


def test_the_shard_databases_are_dropped_afterwards_even_when_the_block_fails(
    postgres_url: str,
) -> None:
    names: list[str] = []
    held: list[psycopg.Connection[Any]] = []
    with psycopg.connect(postgres_url, autocommit=True) as admin, contextlib.ExitStack() as later:

        def fail_inside() -> None:
            with shard_databases(postgres_url, 3) as urls:
                names.extend(_database_name(url) for url in urls)
                assert len(set(names)) == 3
                assert all(name.startswith("buttress_shard_") for name in names)
                assert _existing(admin, names) == set(names)
                # Sessions still open in a database do not keep it: the drop ends them.
                held.append(later.enter_context(psycopg.connect(urls[0], autocommit=True)))
                assert held[0].execute("select current_database()").fetchone() == (names[0],)
                node = PostgresShardBackend(urls[1], **POOL)
                later.callback(node.close)
                assert node.write(0, "key", b"value", [], 1) == 1
                raise RuntimeError("the test failed")

        with pytest.raises(RuntimeError, match="the test failed"):
            fail_inside()
        assert len(names) == 3
        assert _existing(admin, names) == set()
        with pytest.raises(psycopg.OperationalError):
            held[0].execute("select 1")
        for name in names:
            with pytest.raises(psycopg.OperationalError, match="does not exist"):
                psycopg.connect(_database_url(postgres_url, name))


# -- writers that run through a rebalance --------------------------------------------------------


class Writers:
    """Threads that each keep writing, deleting and reading back keys of their own until
    stopped; ``expected`` is every key's last write (None: deleted)."""

    KEYS = 20

    def __init__(self, store: ShardedStore, count: int = 3) -> None:
        self._store = store
        self._stop = threading.Event()
        self.ops = [0] * count
        self.last: list[dict[str, bytes | None]] = [{} for _ in range(count)]
        self.errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True) for index in range(count)
        ]

    def _run(self, index: int) -> None:
        store = self._store
        number = 0
        try:
            while not self._stop.is_set():
                key = f"writer{index}:{number % self.KEYS}"
                value: bytes | None
                if number % 7 == 6:
                    store.delete(key)
                    value = None
                else:
                    value = f"{index}:{number}".encode()
                    store.put(key, value)
                self.last[index][key] = value
                read = store.get(key)
                if read != value:
                    raise AssertionError(f"{key!r}: read {read!r} right after writing {value!r}")
                number += 1
                self.ops[index] = number
        except BaseException as error:
            self.errors.append(error)

    def total(self) -> int:
        return sum(self.ops)

    @property
    def expected(self) -> dict[str, bytes | None]:
        merged: dict[str, bytes | None] = {}
        for last in self.last:
            merged.update(last)
        return merged

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        # Every writer is under way before the caller starts its change.
        deadline = time.monotonic() + FLUSH
        while min(self.ops) < 5 and not self.errors:
            assert time.monotonic() < deadline, "the writers did not get going"
            time.sleep(0.005)
        return self

    def __exit__(self, failure: type[BaseException] | None, *exc_info: object) -> None:
        self._stop.set()
        deadline = time.monotonic() + FLUSH
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if failure is not None:
            return  # the block's own failure says more
        assert not any(thread.is_alive() for thread in self._threads), "a writer hung"
        if self.errors:
            raise self.errors[0]


# -- the store over PostgreSQL databases ---------------------------------------------------------


def test_put_get_delete_over_three_databases(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    nodes = {name: cluster.node(url) for name, url in zip("abc", urls, strict=True)}
    store = cluster.store(nodes, shards=8)
    assert len(store) == 0
    assert store.get("nothing") is None
    assert store.get("nothing", b"default") == b"default"

    data = {f"user:{number}": f"value {number}".encode() for number in range(60)}
    versions = {key: store.put(key, value) for key, value in data.items()}
    assert all(version > 0 for version in versions.values())
    assert store.get("user:7") == b"value 7"
    assert store.get_many([*data, "missing"]) == data
    assert contents(store) == data
    assert len(store) == 60
    assert store.version("user:7") == versions["user:7"]
    assert store.version("missing") is None

    # items() goes shard by shard, each in key order.
    listed = [key for key, _ in store.items()]
    assert sorted(listed) == sorted(data)
    by_shard: dict[int, list[str]] = {}
    for key in listed:
        by_shard.setdefault(store.shard_of(key), []).append(key)
    assert list(by_shard) == sorted(by_shard)
    assert all(keys == sorted(keys) for keys in by_shard.values())

    assert store.delete("user:7") is True
    assert store.delete("user:7") is False
    assert store.delete("never-written") is False
    del data["user:7"]
    assert store.get("user:7") is None
    assert "user:7" not in store.get_many(["user:7", "user:8"])
    assert len(store) == 59
    tombstone = store.version("user:7")
    assert tombstone is not None
    assert tombstone > versions["user:7"]
    assert store.put("user:7", b"back") > tombstone
    data["user:7"] = b"back"
    assert contents(store) == data
    check_placement(store)

    # Each database holds the shards whose primary it is, and nothing else.
    holders = {name for members in store.layout.values() for name in members}
    assert holders == {"a", "b", "c"}
    for name, url in zip("abc", urls, strict=True):
        mine = {store.shard_of(key) for key in data if store.nodes_of(key) == (name,)}
        found = _query(url, "select distinct shard from buttress_shard_rows")
        assert {shard for (shard,) in found} == mine
        assert _count(url, "buttress_shard_hints") == 0
        ((epoch,),) = _query(url, "select epoch from buttress_shard_catalog")
        assert epoch == store.stats().epoch


async def test_the_asyncio_twins(cluster: Cluster) -> None:
    urls = cluster.databases(2)
    nodes = {name: cluster.node(url) for name, url in zip("ab", urls, strict=True)}
    async with ShardedStore(nodes, shards=4, replicas=1, replication="queued") as store:
        assert await store.put_async("k", b"\x00async") > 0
        assert await store.get_async("k") == b"\x00async"
        assert await store.get_many_async(["k", "other"]) == {"k": b"\x00async"}
        assert await store.flush_async(FLUSH)
        check_placement(store)
        assert await store.delete_async("k")
        assert await store.get_async("k", b"gone") == b"gone"
        assert await store.close_async(FLUSH)


def test_sync_replication_misses_its_quorum_without_losing_the_write(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    nodes = wrap({name: cluster.node(url) for name, url in zip("abc", urls, strict=True)})
    # The default write quorum of a primary and one replica is both.
    store = cluster.store(nodes, shards=8, replicas=1, replication="sync", retry_backoff=BACKOFF)
    keys = [f"k{number}" for number in range(80)]
    for key in keys:
        store.put(key, b"before")
    assert store.flush(FLUSH)
    assert {store.shard_of(key) for key in keys} == set(range(8))

    layout = store.layout
    victim = next(
        name
        for name in nodes
        if any(members[0] == name for members in layout.values())
        and any(members[1] == name for members in layout.values())
    )
    nodes[victim].down = True
    missed: set[str] = set()
    expected: dict[str, bytes] = {}
    for key in keys:
        primary, replica = store.nodes_of(key)
        if primary == victim:
            with pytest.raises(ShardUnavailableError):
                store.put(key, b"after")
            expected[key] = b"before"
        elif replica == victim:
            with pytest.raises(QuorumNotReachedError) as raised:
                store.put(key, b"after")
            assert (raised.value.key, raised.value.acknowledged, raised.value.quorum) == (key, 1, 2)
            assert raised.value.failed == (victim,)
            missed.add(key)
            expected[key] = b"after"
        else:
            store.put(key, b"after")
            expected[key] = b"after"
    assert missed
    assert len(missed) < len(keys)
    assert store.stats().quorum_failures == len(missed)

    # Nothing is lost: the primaries have the writes and what the victim is owed.
    for key in keys:
        if store.nodes_of(key)[0] != victim:
            assert store.get(key) == expected[key]
    owed = {
        key
        for name, node in nodes.items()
        if name != victim
        for shard, members in layout.items()
        if members[0] == name
        for replica, key, _ in node.inner.hints(shard, 1000)
        if replica == victim
    }
    assert owed == missed
    with pytest.raises(ShardUnavailableError):
        store.pending_replication()  # the victim cannot say what it owes
    assert not store.flush(0.3)

    nodes[victim].down = False
    assert store.flush(FLUSH)
    assert store.pending_replication() == 0
    check_placement(store)
    for key in keys:
        shard = store.shard_of(key)
        for name in store.nodes_of(key):
            found = nodes[name].inner.read(shard, key)
            assert found is not None
            assert found[0] == expected[key]
    assert contents(store) == expected


def test_a_quorum_of_two_out_of_three(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    nodes = wrap({name: cluster.node(url) for name, url in zip("abc", urls, strict=True)})
    store = cluster.store(nodes, shards=4, replicas=2, replication="sync", retry_backoff=BACKOFF)
    key = "balance"
    primary, first, second = store.nodes_of(key)
    store.put(key, b"1")

    nodes[first].down = True
    store.put(key, b"2")  # the primary and one replica are a quorum
    nodes[second].down = True
    with pytest.raises(QuorumNotReachedError) as raised:
        store.put(key, b"3")
    assert (raised.value.acknowledged, raised.value.quorum) == (1, 2)
    assert set(raised.value.failed) == {first, second}
    assert store.get(key) == b"3"
    assert not store.flush(0.2)

    nodes[first].down = nodes[second].down = False
    assert store.flush(FLUSH)
    check_placement(store)
    shard = store.shard_of(key)
    version = store.version(key)
    for name in (primary, first, second):
        assert nodes[name].inner.read(shard, key) == (b"3", version)


def test_queued_replication_catches_up_once_the_replicas_take_writes(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    nodes = wrap({name: cluster.node(url) for name, url in zip("abc", urls, strict=True)})
    store = cluster.store(nodes, shards=8, replicas=1, replication="queued", retry_backoff=BACKOFF)
    for node in nodes.values():
        node.failing = {"apply"}  # no replica accepts a copy
    data = {f"q{number}": bytes([number]) * number for number in range(50)}
    for key, value in data.items():
        store.put(key, value)  # returns once the primary has it
    assert contents(store) == data
    assert store.pending_replication() == len(data)
    assert not store.flush(0.3)
    _eventually(lambda: store.stats().replication_failures > 0, "the replicator tried")
    for shard, (_, replica) in store.layout.items():
        assert rows_of(nodes[replica].inner, shard) == []

    for node in nodes.values():
        node.failing.clear()
    assert store.flush(FLUSH)
    assert store.pending_replication() == 0
    assert store.stats().replicated >= len(data)
    check_placement(store)
    for url in urls:
        assert _count(url, "buttress_shard_hints") == 0
    assert contents(store) == data


def test_replica_reads_still_read_the_stores_own_writes(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    nodes = wrap({name: cluster.node(url) for name, url in zip("abc", urls, strict=True)})
    store = cluster.store(
        nodes,
        shards=8,
        replicas=1,
        replication="queued",
        read="replica",
        retry_backoff=BACKOFF,
    )
    key = "profile:1"
    primary, replica = store.nodes_of(key)
    store.put(key, b"v1")
    assert store.flush(FLUSH)

    def reads(name: str) -> int:
        return nodes[name].calls.get("read", 0)

    before = (reads(primary), reads(replica))
    assert store.get(key) == b"v1"
    assert (reads(primary), reads(replica)) == (before[0], before[1] + 1)  # the replica answered

    # The replica falls behind: it has v1, the store wrote v2.
    nodes[replica].failing = {"apply"}
    store.put(key, b"v2")
    before = (reads(primary), reads(replica))
    assert store.get(key) == b"v2"
    assert (reads(primary), reads(replica)) == (before[0] + 1, before[1] + 1)
    assert store.stats().stale_replicas_skipped == 1
    shard = store.shard_of(key)
    assert nodes[replica].inner.read(shard, key)[0] == b"v1"  # type: ignore[index]

    # A deletion is read back too, though the replica still has the value.
    assert store.delete(key)
    assert store.get(key) is None
    assert store.get_many([key]) == {}
    assert store.stats().stale_replicas_skipped == 3

    nodes[replica].failing.clear()
    assert store.flush(FLUSH)
    before = (reads(primary), reads(replica))
    assert store.get(key, b"absent") == b"absent"
    assert (reads(primary), reads(replica)) == (before[0], before[1] + 1)
    assert store.stats().stale_replicas_skipped == 3
    check_placement(store)


def test_reads_fall_back_to_a_replica_when_the_primary_is_down(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    nodes = wrap({name: cluster.node(url) for name, url in zip("abc", urls, strict=True)})
    store = cluster.store(nodes, shards=8, replicas=1, replication="sync", retry_backoff=BACKOFF)
    data = {f"f{number}": f"{number}".encode() for number in range(40)}
    for key, value in data.items():
        store.put(key, value)
    assert store.flush(FLUSH)

    victim = "a"
    on_victim = [key for key in data if store.nodes_of(key)[0] == victim]
    assert on_victim
    nodes[victim].down = True
    for key, value in data.items():
        assert store.get(key) == value
    assert store.get_many(list(data)) == data
    assert store.stats().fallback_reads == len(on_victim) + len(
        {store.shard_of(key) for key in on_victim}
    )
    with pytest.raises(ShardUnavailableError):
        store.put(on_victim[0], b"nowhere to write")
    assert store.get(on_victim[0]) == data[on_victim[0]]

    # With its replica down as well, the shard is unavailable.
    replica = store.nodes_of(on_victim[0])[1]
    nodes[replica].down = True
    with pytest.raises(ShardUnavailableError) as raised:
        store.get(on_victim[0])
    assert raised.value.shard == store.shard_of(on_victim[0])
    assert raised.value.nodes == (victim, replica)

    nodes[victim].down = nodes[replica].down = False
    assert store.get_many(list(data)) == data
    assert store.flush(FLUSH)
    check_placement(store)


def test_read_replicas_serve_reads_and_are_never_written(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    a = FlakyBackend(cluster.node(urls[0]))
    b = FlakyBackend(cluster.node(urls[1]))
    # A second backend on a's database stands for a streaming replica of it: it sees a's rows.
    follower = FlakyBackend(cluster.node(urls[0], name="follower"))
    store = cluster.store(
        {"a": a, "b": b}, shards=8, read="replica", read_replicas={"a": [follower]}
    )
    data = {f"r{number}": f"{number}".encode() for number in range(40)}
    for key, value in data.items():
        store.put(key, value)
    for key in ("r3", "r4"):
        store.delete(key)
        del data[key]
    on_a = [key for key in data if store.nodes_of(key) == ("a",)]
    assert on_a
    assert len(on_a) < len(data)

    a_reads = a.calls.get("read", 0)
    for key, value in data.items():
        assert store.get(key) == value
    assert follower.calls["read"] == len(on_a)
    assert a.calls.get("read", 0) == a_reads
    assert store.get_many(list(data)) == data
    groups: dict[int, int] = {}
    for key in on_a:
        groups[store.shard_of(key)] = groups.get(store.shard_of(key), 0) + 1
    assert follower.calls.get("read_many", 0) == sum(1 for size in groups.values() if size > 1)
    assert follower.calls["read"] == len(on_a) + sum(1 for size in groups.values() if size == 1)
    assert a.calls.get("read", 0) == a_reads
    assert a.calls.get("read_many", 0) == 0
    assert store.stats().stale_replicas_skipped == 0

    # The follower down, a answers.
    follower.down = True
    for key in on_a:
        assert store.get(key) == data[key]
    assert a.calls.get("read", 0) == a_reads + len(on_a)
    follower.down = False

    # A new node takes shards from a and b; the follower of a is still only read from.
    c = FlakyBackend(cluster.node(urls[2]))
    plan = store.rebalance(store.add_node("c", c))
    assert plan
    assert contents(store) == data
    check_placement(store)
    assert set(follower.calls) <= {"read", "read_many"}
    assert {"write", "save_layout"} <= set(a.calls)
    if any(move.before == ("a",) for move in plan.moves):
        assert "drop_shard" in a.calls
    follower_reads = follower.calls["read"]
    for key, value in data.items():
        assert store.get(key) == value
    assert follower.calls["read"] == follower_reads + sum(
        1 for key in data if store.nodes_of(key) == ("a",)
    )

    # Once a has left, its follower is closed with it.
    store.rebalance(store.remove_node("a"))
    assert "a" not in store.nodes
    assert isinstance(follower.inner, PostgresShardBackend)
    assert follower.inner.pool.closed
    assert set(follower.calls) <= {"read", "read_many"}
    assert contents(store) == data


def test_a_lagging_read_replica_is_passed_over_for_the_stores_own_writes(
    cluster: Cluster,
) -> None:
    urls = cluster.databases(2)
    # The follower is a database of its own that replication has not reached yet.
    lagging = FlakyBackend(cluster.node(urls[1]))
    store = cluster.store(
        {"a": cluster.node(urls[0])},
        shards=4,
        read="replica",
        read_replicas={"a": [lagging]},
    )
    store.put("k", b"v")
    assert store.get("k") == b"v"
    assert lagging.calls["read"] == 1
    assert store.stats().stale_replicas_skipped == 1

    # Replication reaches it: from then on the follower answers.
    shard = store.shard_of("k")
    lagging.inner.apply(shard, rows_of(store.nodes["a"], shard))
    assert store.get("k") == b"v"
    assert lagging.calls["read"] == 2
    assert store.stats().stale_replicas_skipped == 1

    # A store that remembers none of its writes trusts whatever the follower says.
    trusting = cluster.store(
        {"a": cluster.node(urls[0])},
        shards=4,
        read="replica",
        read_replicas={"a": [cluster.node(urls[1])]},
        remember_writes=0,
    )
    trusting.put("k", b"v2")
    assert trusting.nodes["a"].read(shard, "k")[0] == b"v2"  # type: ignore[index]
    assert trusting.get("k") == b"v"
    # The first store reads its own writes, not everyone's: the follower is as new as its write.
    assert store.get("k") == b"v"
    assert store.stats().stale_replicas_skipped == 1


def test_a_read_only_database_can_be_a_read_replica(cluster: Cluster) -> None:
    urls = cluster.databases(1)
    # What a hot standby is to its clients: a copy of the primary whose sessions cannot write.
    standby = make_conninfo(urls[0], options="-c default_transaction_read_only=on")
    assert _query(standby, "show transaction_read_only") == [("on",)]
    primary = cluster.node(urls[0])
    follower = FlakyBackend(cluster.node(standby))
    store = cluster.store({"a": primary}, shards=4, read="replica", read_replicas={"a": [follower]})
    store.put("k", b"v")
    assert store.get("k") == b"v"
    assert follower.calls == {"read": 1}


def test_add_node_rebalances_while_writers_run(cluster: Cluster) -> None:
    urls = cluster.databases(4)
    nodes = {name: cluster.node(url) for name, url in zip("abc", urls[:3], strict=True)}
    store = cluster.store(nodes, shards=16, replicas=1, replication="sync", retry_backoff=BACKOFF)
    with Writers(store) as writers:
        plan = store.add_node("d", cluster.node(urls[3]))
        assert plan
        assert any("d" in move.after for move in plan.moves)
        started = writers.total()
        assert store.rebalance(plan) == plan
        assert writers.total() > started  # the writers kept going through the moves
    assert store.stats().shards_moved == len(plan.moves)
    assert store.plan().moves == ()
    assert any("d" in members for members in store.layout.values())

    expected = writers.expected
    for key, value in expected.items():
        assert store.get(key) == value
    assert contents(store) == {key: value for key, value in expected.items() if value is not None}
    assert store.flush(FLUSH)
    check_placement(store)


def test_remove_node_rebalances_while_writers_run(cluster: Cluster) -> None:
    urls = cluster.databases(4)
    nodes = {name: cluster.node(url) for name, url in zip("abcd", urls, strict=True)}
    store = cluster.store(nodes, shards=16, replicas=1, replication="sync", retry_backoff=BACKOFF)
    with Writers(store) as writers:
        plan = store.remove_node("a")
        assert plan
        assert all("a" not in move.after for move in plan.moves)
        started = writers.total()
        store.rebalance(plan)
        assert writers.total() > started
    assert "a" not in store.nodes
    assert all("a" not in members for members in store.layout.values())
    # The node that left holds nothing any more.
    assert _count(urls[0], "buttress_shard_rows") == 0
    assert _count(urls[0], "buttress_shard_hints") == 0

    expected = writers.expected
    for key, value in expected.items():
        assert store.get(key) == value
    assert contents(store) == {key: value for key, value in expected.items() if value is not None}
    assert store.flush(FLUSH)
    check_placement(store)


def test_queued_replication_through_a_rebalance(cluster: Cluster) -> None:
    urls = cluster.databases(4)
    nodes = wrap({name: cluster.node(url) for name, url in zip("abc", urls[:3], strict=True)})
    store = cluster.store(nodes, shards=16, replicas=1, replication="queued", retry_backoff=BACKOFF)
    with Writers(store) as writers:
        store.rebalance(store.add_node("d", FlakyBackend(cluster.node(urls[3]))))
        store.rebalance(store.remove_node("b"))
    assert store.flush(FLUSH)
    check_placement(store)
    expected = writers.expected
    for key, value in expected.items():
        assert store.get(key) == value
    assert contents(store) == {key: value for key, value in expected.items() if value is not None}


class _HeldReplicator(FlakyBackend):
    """Holds the replicator's copies to this node until ``release`` is set."""

    def __init__(self, inner: ShardBackend) -> None:
        super().__init__(inner)
        self.holding = threading.Event()
        self.release = threading.Event()

    def apply(self, *args: Any) -> Any:
        if threading.current_thread().name == "buttress-replicator":
            self.holding.set()
            assert self.release.wait(FLUSH), "never released"
        return super().apply(*args)


def test_the_replicator_does_not_copy_to_a_node_a_shard_has_left(cluster: Cluster) -> None:
    urls = cluster.databases(4)
    nodes: dict[str, _HeldReplicator] = {
        name: _HeldReplicator(cluster.node(url)) for name, url in zip("abc", urls[:3], strict=True)
    }
    store = cluster.store(nodes, shards=16, replicas=1, replication="queued", retry_backoff=BACKOFF)
    plan = store.add_node("d", cluster.node(urls[3]))
    # A shard whose replica leaves it, and a key of that shard.
    move = next(move for move in plan.moves if move.before[1] in move.leaves)
    _, leaving = move.before
    key = next(
        f"key{number}" for number in range(10_000) if store.shard_of(f"key{number}") == move.shard
    )
    held = nodes[leaving]
    for name, node in nodes.items():
        if name != leaving:
            node.release.set()
    errors: list[BaseException] = []

    def rebalance() -> None:
        try:
            store.rebalance(plan)
        except BaseException as error:
            errors.append(error)

    rebalancing = threading.Thread(target=rebalance, daemon=True)
    try:
        store.put(key, b"value")
        assert held.holding.wait(FLUSH)  # the replicator is copying the write to the replica
        rebalancing.start()

        def switched() -> bool:
            return leaving not in store.nodes_of(key) and not held.inner.scan(move.shard, None, 1)

        # The shard switches and the replica drops it while the copy is under way (a store that
        # waited for the copy first would not get there: the copy goes on after a while anyway).
        _soon(switched, within=5.0)
    finally:
        held.release.set()
    rebalancing.join(FLUSH)
    assert not rebalancing.is_alive()
    assert not errors
    assert leaving not in store.nodes_of(key)
    assert store.flush(FLUSH)
    assert store.get(key) == b"value"
    assert not held.inner.scan(move.shard, None, 1), f"{leaving} holds shard {move.shard} again"


def test_a_failed_move_keeps_the_shard_where_it_was_and_rebalance_resumes(
    cluster: Cluster,
) -> None:
    urls = cluster.databases(4)
    nodes = wrap({name: cluster.node(url) for name, url in zip("abc", urls[:3], strict=True)})
    store = cluster.store(nodes, shards=8, replicas=1, replication="sync", retry_backoff=BACKOFF)
    data = {f"m{number}": f"{number}".encode() for number in range(60)}
    for key, value in data.items():
        store.put(key, value)
    layout = store.layout

    joining = FlakyBackend(cluster.node(urls[3]))
    joining.failing = {"apply"}  # the copies to the new node fail
    plan = store.add_node("d", joining)
    assert plan
    with pytest.raises(RebalanceError, match="rebalance\\(\\) again resumes"):
        store.rebalance(plan)
    assert store.layout == layout
    assert all(not joining.inner.scan(shard, None, 1) for shard in range(8))
    assert contents(store) == data
    store.put("m0", b"written meanwhile")
    data["m0"] = b"written meanwhile"

    joining.failing.clear()
    done = store.rebalance()
    assert done.moves == plan.moves
    assert store.plan().moves == ()
    assert any("d" in members for members in store.layout.values())
    assert contents(store) == data
    assert store.flush(FLUSH)
    check_placement(store)


class _RefusesTheReplicator(FlakyBackend):
    """Fails the replicator's copies to this node while ``refusing``; other copies (a move's,
    a sync write's) go through."""

    refusing = True

    def apply(self, *args: Any) -> Any:
        if self.refusing and threading.current_thread().name == "buttress-replicator":
            raise NodeDown("refusing the replicator")
        return super().apply(*args)


def test_what_replicas_are_owed_survives_a_change_of_primaries(cluster: Cluster) -> None:
    urls = cluster.databases(4)
    nodes = {
        name: _RefusesTheReplicator(cluster.node(url))
        for name, url in zip("abc", urls[:3], strict=True)
    }
    store = cluster.store(nodes, shards=16, replicas=1, replication="queued", retry_backoff=BACKOFF)
    data = {f"o{number}": f"{number}".encode() for number in range(80)}
    for key, value in data.items():
        store.put(key, value)
    assert store.pending_replication() == len(data)

    joining = _RefusesTheReplicator(cluster.node(urls[3]))
    plan = store.add_node("d", joining)
    assert plan.primaries_moved > 0
    store.rebalance(plan)
    assert contents(store) == data
    assert not store.flush(0.2)  # the replicas that kept their shards are still owed writes
    # What is owed is on the shards' primaries now (hints for a replica that left a shard
    # stay until the replicator finds them moot).
    owed_to: set[tuple[int, str]] = set()
    for shard, (primary, replica) in store.layout.items():
        for name, node in store.nodes.items():
            owed = node.hints(shard, 1000)
            if name != primary:
                assert owed == [], (shard, name)
            owed_to |= {(shard, owner) for owner, _, _ in owed if owner == replica}
    assert owed_to

    for node in [*nodes.values(), joining]:
        node.refusing = False
    assert store.flush(FLUSH)
    check_placement(store)
    assert contents(store) == data
    assert all(node.hinted_shards() == {} for node in store.nodes.values())


def test_the_store_goes_on_when_the_server_ends_its_sessions(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    nodes = {name: cluster.node(url) for name, url in zip("abc", urls, strict=True)}
    store = cluster.store(nodes, shards=8, replicas=1, replication="queued", retry_backoff=BACKOFF)
    data = {f"t{number}": b"before" for number in range(40)}
    for key, value in data.items():
        store.put(key, value)
    assert store.flush(FLUSH)

    # A restart or a failover: the server ends every session in the nodes' databases.
    names = [_database_name(url) for url in urls]
    ended = _query(
        cluster.postgres_url,
        "select pg_terminate_backend(pid) from pg_stat_activity where datname = any(%s)",
        (names,),
    )
    assert ended
    assert all(done for (done,) in ended)

    def sessions() -> int:
        ((count,),) = _query(
            cluster.postgres_url,
            "select count(*) from pg_stat_activity where datname = any(%s)",
            (names,),
        )
        return int(count)

    _eventually(lambda: sessions() == 0, "the sessions ended")
    # Idle for longer than check_interval, every pooled connection is checked before it is
    # used again, and the dead ones are replaced.
    time.sleep(0.6)
    for key in data:
        store.put(key, b"after")
    assert contents(store) == dict.fromkeys(data, b"after")
    assert store.flush(FLUSH)
    check_placement(store)


def test_a_reopened_store_finds_its_layout_and_data(cluster: Cluster) -> None:
    urls = cluster.databases(4)

    def open_store(names: str, **options: Any) -> ShardedStore:
        nodes = {name: cluster.node(urls["abcd".index(name)]) for name in names}
        options = {"shards": 16, "replicas": 1, "replication": "sync", **options}
        return ShardedStore(nodes, **options)

    with open_store("abc") as store:
        data = {f"p{number}": f"{number}".encode() * 3 for number in range(100)}
        for key, value in data.items():
            store.put(key, value)
        store.rebalance(store.add_node("d", cluster.node(urls[3])))
        store.delete("p5")
        del data["p5"]
        layout = store.layout
        epoch = store.stats().epoch
        versions = {key: store.version(key) for key in data}
        tombstone = store.version("p5")
        assert tombstone is not None
        assert epoch > 1
        assert store.close(FLUSH)

    # Named in another order, the same databases give the same store.
    with open_store("dcba") as reopened:
        assert reopened.layout == layout
        assert reopened.stats().epoch == epoch
        assert contents(reopened) == data
        assert {key: reopened.version(key) for key in data} == versions
        assert reopened.get("p5") is None
        assert reopened.plan().moves == ()
        check_placement(reopened)
        assert reopened.version("p5") == tombstone
        assert reopened.put("p5", b"again") > tombstone
        assert reopened.get("p5") == b"again"

        with pytest.raises(ValueError, match="does not include"):
            open_store("abc")  # d holds shards
        with pytest.raises(ValueError, match="shard count is fixed"):
            open_store("abcd", shards=8)


def test_pending_hints_survive_close_and_reopen(cluster: Cluster) -> None:
    urls = cluster.databases(3)
    nodes = wrap({name: cluster.node(url) for name, url in zip("abc", urls, strict=True)})
    store = ShardedStore(nodes, shards=8, replicas=1, replication="queued", retry_backoff=BACKOFF)
    try:
        for node in nodes.values():
            node.failing = {"apply"}
        data = {f"h{number}": f"{number}".encode() for number in range(30)}
        for key, value in data.items():
            store.put(key, value)
        assert store.pending_replication() == len(data)
        layout = store.layout
    finally:
        caught_up = store.close(timeout=0.3)
    assert caught_up is False  # the replicas never took them

    # The hints are in the databases, on the primaries.
    assert sum(_count(url, "buttress_shard_hints") for url in urls) == len(data)
    for name, url in zip("abc", urls, strict=True):
        primaries = {shard for shard, members in layout.items() if members[0] == name}
        found = _query(url, "select distinct shard from buttress_shard_hints")
        assert {shard for (shard,) in found} <= primaries

    fresh = {name: cluster.node(url) for name, url in zip("abc", urls, strict=True)}
    reopened = cluster.store(
        fresh, shards=8, replicas=1, replication="queued", retry_backoff=BACKOFF
    )
    assert reopened.flush(FLUSH)  # the new store's replicator sends what the old one owed
    assert reopened.pending_replication() == 0
    check_placement(reopened)
    for key, value in data.items():
        shard = reopened.shard_of(key)
        primary, replica = reopened.nodes_of(key)
        assert fresh[replica].read(shard, key) == fresh[primary].read(shard, key)
        assert fresh[replica].read(shard, key)[0] == value  # type: ignore[index]
    assert sum(_count(url, "buttress_shard_hints") for url in urls) == 0


# -- SQLite and PostgreSQL nodes in one store ----------------------------------------------------

AWKWARD_KEYS = [
    "",
    " ",
    "a",
    "A",
    "b",
    "B",
    "z",
    "Z",
    "e",
    "E",
    "é",  # precomposed
    "e\u0301",  # e and a combining accent
    "É",
    "f",
    "ß",
    "ss",
    "SS",
    "i",
    "I",
    "\u0131",  # dotless i
    "\u0130",  # capital I with a dot
    "😀",  # outside the BMP
    "😀😀",
    "\U0001d518\U0001d52b\U0001d526",
    "\U0010fffd",
    "中文",
    "日本語",
    "한국어",
    "עברית",
    "العربية",
    "tab\tkey",
    "new\nline",
    "\x01",
    "\x7f",
    "\u00a0",
    "\u200b",
    "\ufeff",
    "~",
    "'quote",
    '"double',
    "back\\slash",
    "%s",
    "%(key)s",
    "?",
    "x" * 2000,
]
AWKWARD_VALUES = [
    b"",
    b"\x00",
    b"\x00" * 17,
    b"nul\x00inside\x00",
    bytes(range(256)),
    b"\xff\xfe\xfd",
    b"\\x00",
    "😀".encode(),
    random.Random(7).randbytes(70_000),
]
_PREFIXES = ["k", "K", "é", "e\u0301", "ü", "😀", "ß", "Z", "a", ""]


def _awkward_data() -> dict[str, bytes]:
    data = {
        key: AWKWARD_VALUES[number % len(AWKWARD_VALUES)] for number, key in enumerate(AWKWARD_KEYS)
    }
    # Enough keys that each of two shards is copied in more than one page.
    for number in range(2400):
        key = f"{_PREFIXES[number % len(_PREFIXES)]}{number}"
        data[key] = number.to_bytes(2, "big") + b"\x00" * (number % 3)
    return data


def test_shards_move_between_sqlite_and_postgresql_and_back(
    cluster: Cluster, tmp_path: Path
) -> None:
    urls = cluster.databases(2, icu=True)

    def sqlite(name: str) -> SQLiteShardBackend:
        return cluster.sqlite(tmp_path / f"{name}.db")

    shards = 2
    store = cluster.store(
        {"s1": sqlite("s1"), "s2": sqlite("s2")},
        shards=shards,
        replicas=1,
        replication="sync",
        retry_backoff=BACKOFF,
    )
    data = _awkward_data()
    for key, value in data.items():
        store.put(key, value)
    deleted = ["A", "e\u0301", "😀😀", "k0", "K1"]
    for key in deleted:
        assert store.delete(key)
        del data[key]
    assert all(len(rows_of(store.nodes["s1"], shard)) > 1000 for shard in range(shards))

    def versions() -> dict[str, int]:
        found: dict[str, int] = {}
        for shard, members in store.layout.items():
            for key, _, version in rows_of(store.nodes[members[0]], shard):
                found[key] = version
        return found

    before = versions()
    assert set(before) == set(data) | set(deleted)

    def move(add: dict[str, ShardBackend], remove: list[str]) -> None:
        for name, node in add.items():
            store.add_node(name, node)
        for name in remove:
            store.remove_node(name)
        assert store.rebalance()
        assert store.plan().moves == ()
        assert store.flush(FLUSH)
        check_placement(store)
        assert set(store.nodes) == {name for members in store.layout.values() for name in members}
        # Every value reads back identically, by every way of reading.
        for key in AWKWARD_KEYS:
            assert store.get(key) == data.get(key), key
        assert store.get_many([*data, *deleted]) == data
        assert contents(store) == data
        assert versions() == before  # a copy carries the versions along

    def same_rows(sqlite_node: str, postgres_node: str) -> None:
        for shard in range(shards):
            assert set(store.layout[shard]) == {sqlite_node, postgres_node}
            from_sqlite = rows_of(store.nodes[sqlite_node], shard)
            from_postgres = rows_of(store.nodes[postgres_node], shard)
            assert from_sqlite == from_postgres
            # Both in byte order (for UTF-8, code point order), which is Python's.
            keys = [key for key, _, _ in from_postgres]
            assert keys == sorted(keys)
            assert len(keys) > 1000

    # A PostgreSQL node comes and an SQLite one goes: each shard is then on one of each.
    move({"p1": cluster.node(urls[0])}, ["s2"])
    same_rows("s1", "p1")
    # Both on PostgreSQL.
    move({"p2": cluster.node(urls[1])}, ["s1"])
    assert all(set(members) == {"p1", "p2"} for members in store.layout.values())
    assert _count(urls[0], "buttress_shard_rows") == len(data) + len(deleted)
    # And back: first half-way, then wholly on SQLite.
    move({"s3": sqlite("s3")}, ["p1"])
    same_rows("s3", "p2")
    assert _count(urls[0], "buttress_shard_rows") == 0
    move({"s4": sqlite("s4")}, ["p2"])
    assert all(set(members) == {"s3", "s4"} for members in store.layout.values())
    assert _count(urls[1], "buttress_shard_rows") == 0

    # The store goes on writing awkward keys where they now live.
    assert store.put("", b"") > before[""]
    assert store.get("") == b""


# -- the backend itself --------------------------------------------------------------------------


class _CountingConnection:
    """A psycopg connection that records what is sent through it."""

    def __init__(self, conn: psycopg.Connection[Any], sent: list[str]) -> None:
        self._conn = conn
        self._sent = sent

    def execute(self, query: Any, parameters: Any = None) -> Any:
        self._sent.append(str(query))
        return self._conn.execute(query, parameters)

    def cursor(self) -> Any:
        self._sent.append("cursor")
        return self._conn.cursor()

    def transaction(self) -> Any:
        self._sent.append("transaction")
        return self._conn.transaction()


class _CountingPool:
    def __init__(self, pool: Any) -> None:
        self.inner = pool
        self.sent: list[str] = []

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[_CountingConnection]:
        with self.inner.connection(timeout) as conn:
            yield _CountingConnection(conn, self.sent)

    def close(self) -> None:
        self.inner.close()


def _hints_of(url: str, shard: int, key: str) -> set[tuple[str, int]]:
    found = _query(
        url,
        "select replica, version from buttress_shard_hints where shard = %s and key = %s",
        (shard, key),
    )
    return {(str(replica), int(version)) for replica, version in found}


def _row_of(url: str, shard: int, key: str) -> tuple[bytes | None, int] | None:
    found = _query(
        url,
        "select value, version from buttress_shard_rows where shard = %s and key = %s",
        (shard, key),
    )
    if not found:
        return None
    ((value, version),) = found
    return (None if value is None else bytes(value), int(version))


def test_a_write_is_the_row_and_its_hints_in_one_statement(cluster: Cluster) -> None:
    (url,) = cluster.databases(1)
    node = cluster.node(url)
    counting = _CountingPool(node.pool)
    node.pool = counting  # type: ignore[assignment]
    try:
        assert node.write(3, "k", b"v", ["r1", "r2"], 100) == 100
        assert len(counting.sent) == 1  # one statement, no transaction around several
        assert counting.sent[0].startswith("with written as")
        counting.sent.clear()
        assert node.write(3, "k", None, ["r1", "r2"], 50) == 101
        assert len(counting.sent) == 1
    finally:
        node.pool = counting.inner
    assert _row_of(url, 3, "k") == (None, 101)
    assert _hints_of(url, 3, "k") == {("r1", 101), ("r2", 101)}
    assert node.hints(3, 10) == [("r1", "k", 101), ("r2", "k", 101)]
    assert node.hints(3, 10, "r2") == [("r2", "k", 101)]
    assert node.hinted_shards() == {3: 2}
    assert node.write(3, "k", b"w", [], 102) == 102
    assert _hints_of(url, 3, "k") == {("r1", 101), ("r2", 101)}  # no replicas: no new hints

    # When the hints cannot be written, neither is the row.
    _query(
        url,
        "alter table buttress_shard_hints add constraint refuse check (replica <> 'refused')",
    )
    with pytest.raises(psycopg.errors.CheckViolation):
        node.write(3, "k", b"lost", ["r1", "refused"], 200)
    assert _row_of(url, 3, "k") == (b"w", 102)
    assert _hints_of(url, 3, "k") == {("r1", 101), ("r2", 101)}
    with pytest.raises(psycopg.errors.CheckViolation):
        node.write(3, "new", b"lost", ["refused"], 200)
    assert node.read(3, "new") is None
    with pytest.raises(psycopg.errors.CheckViolation):
        node.write(3, "k", None, ["refused"], 200)
    assert node.read(3, "k") == (b"w", 102)

    # Seen from another session, a row is never without its hints, even mid-stream.
    _query(url, "alter table buttress_shard_hints drop constraint refuse")
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for number in range(300):
                node.write(5, "hot", b"%d" % number, ["r1", "r2"], 1)
        except BaseException as error:
            errors.append(error)
        finally:
            stop.set()

    writer = threading.Thread(target=write, daemon=True)
    seen = 0
    with psycopg.connect(url, autocommit=True) as watcher:
        writer.start()
        while True:
            done = stop.is_set()
            found = watcher.execute(
                "select r.version, array_agg(h.version order by h.replica) "
                "from buttress_shard_rows r left join buttress_shard_hints h "
                "on h.shard = r.shard and h.key = r.key "
                "where r.shard = 5 and r.key = 'hot' group by r.version"
            ).fetchall()
            if found:
                ((version, hinted),) = found
                assert hinted == [version, version]
                seen += 1
            if done:
                break
    writer.join(FLUSH)
    assert not writer.is_alive()
    assert not errors
    assert seen > 0
    assert node.read(5, "hot") == (b"299", 300)


def test_deleting_an_absent_key_writes_nothing(cluster: Cluster) -> None:
    (url,) = cluster.databases(1)
    node = cluster.node(url)
    assert node.write(1, "ghost", None, ["r1", "r2"], 10) is None
    assert node.read(1, "ghost") is None
    assert node.hinted_shards() == {}
    assert _count(url, "buttress_shard_rows") == 0

    version = node.write(1, "k", b"v", [], 10)
    deleted = node.write(1, "k", None, ["r1"], 10)
    assert version is not None
    assert deleted is not None
    assert deleted > version
    assert node.read(1, "k") == (None, deleted)
    assert node.hints(1, 10) == [("r1", "k", deleted)]
    # Deleting a tombstone is deleting nothing: no new version, no new hints.
    assert node.write(1, "k", None, ["r1", "r2"], 10_000) is None
    assert node.read(1, "k") == (None, deleted)
    assert node.hints(1, 10) == [("r1", "k", deleted)]
    assert node.counts() == {}


def test_versions_only_grow(cluster: Cluster) -> None:
    (url,) = cluster.databases(1)
    node = cluster.node(url)
    assert node.write(0, "k", b"1", [], 1000) == 1000
    assert node.write(0, "k", b"2", [], 10) == 1001  # the clock went back
    assert node.write(0, "k", None, [], 5) == 1002
    assert node.write(0, "k", b"3", [], 7) == 1003  # a re-put after a delete
    assert node.write(0, "k", b"4", [], 5000) == 5000
    assert node.read(0, "k") == (b"4", 5000)

    # Through the store, with the real clock.
    store = cluster.store({"only": cluster.node(url)}, shards=4)
    first = store.put("x", b"1")
    second = store.put("x", b"2")
    assert store.delete("x")
    tombstone = store.version("x")
    assert tombstone is not None
    third = store.put("x", b"3")
    assert first < second < tombstone < third
    assert store.version("x") == third


def test_apply_keeps_the_newest_version(cluster: Cluster) -> None:
    (url,) = cluster.databases(1)
    node = cluster.node(url)
    node.apply(2, [("k", b"new", 10)])
    node.apply(2, [("k", b"old", 5)])
    assert node.read(2, "k") == (b"new", 10)
    node.apply(2, [("k", b"same version", 10)])  # not newer: ignored
    assert node.read(2, "k") == (b"new", 10)
    node.apply(2, [("k", None, 11)])
    node.apply(2, [("k", b"resurrected", 9)])
    assert node.read(2, "k") == (None, 11)
    node.apply(2, [])
    assert node.hinted_shards() == {}  # copies owe nothing to anyone

    # Applied in any order, the same rows end in the same state.
    rows = [
        (f"key{number % 7}", None if number % 5 == 0 else b"%d" % number, number)
        for number in range(1, 60)
    ]
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    node.apply(3, rows)
    for row in reversed(rows):
        node.apply(4, [row])
    node.apply(5, shuffled)
    node.apply(5, rows)  # twice over
    assert rows_of(node, 3) == rows_of(node, 4) == rows_of(node, 5)
    newest = {key: (value, version) for key, value, version in rows}
    assert rows_of(node, 3) == [(key, *newest[key]) for key in sorted(newest)]


def test_a_bad_table_prefix_is_refused(cluster: Cluster) -> None:
    (url,) = cluster.databases(1)
    for prefix in ["bad name;", "1abc", "", "a-b", "x" * 42, "t; drop table pg_class; --", "é"]:
        with pytest.raises(ValueError, match="table_prefix"):
            PostgresShardBackend(url, table_prefix=prefix, **POOL)
    assert _query(url, "select count(*) from pg_tables where schemaname = 'public'") == [(0,)]


def _sessions(url: str, application_name: str) -> int:
    ((count,),) = _query(
        url,
        "select count(*) from pg_stat_activity where application_name = %s",
        (application_name,),
    )
    return int(count)


def test_a_node_that_cannot_open_closes_its_sessions(cluster: Cluster) -> None:
    (url,) = cluster.databases(1)
    name = f"buttress-refused-{uuid.uuid4().hex[:8]}"
    refused = make_conninfo(
        url, options="-c default_transaction_read_only=on", application_name=name
    )
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        PostgresShardBackend(refused, **POOL)
    assert _soon(lambda: _sessions(url, name) == 0), "the failed node's session is open"


def test_a_refused_table_prefix_leaves_no_pool_behind(cluster: Cluster) -> None:
    (url,) = cluster.databases(1)
    name = f"refused-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match="table_prefix"):
        PostgresShardBackend(url, table_prefix="bad name;", name=name, **POOL)
    thread = f"buttress-pool-{name}"
    assert _soon(lambda: all(t.name != thread for t in threading.enumerate()))


def test_table_prefixes_keep_stores_apart_and_keys_in_byte_order(cluster: Cluster) -> None:
    (url,) = cluster.databases(1, icu=True)
    default = cluster.node(url)
    tenant = cluster.node(url, table_prefix="Tenant_2")
    tables = _query(url, "select tablename from pg_tables where schemaname = 'public'")
    assert {name for (name,) in tables} == {
        "buttress_shard_rows",
        "buttress_shard_hints",
        "buttress_shard_catalog",
        "tenant_2_rows",
        "tenant_2_hints",
        "tenant_2_catalog",
    }
    default.write(0, "k", b"default", [], 1)
    tenant.write(0, "k", b"tenant", [], 1)
    assert default.read(0, "k") == (b"default", 1)
    assert tenant.read(0, "k") == (b"tenant", 1)

    collations = _query(
        url,
        "select table_name, column_name, collation_name from information_schema.columns "
        "where column_name = 'key' and table_schema = 'public'",
    )
    assert {(table, collation) for table, _, collation in collations} == {
        (table, "C")
        for table in (
            "buttress_shard_rows",
            "buttress_shard_hints",
            "tenant_2_rows",
            "tenant_2_hints",
        )
    }

    keys = ["a", "B", "é", "f", "Z", "ä", "😀", "", "e\u0301", "A"]
    default.apply(1, [(key, key.encode(), 1) for key in keys])
    scanned = [key for key, _, _ in rows_of(default, 1)]
    assert scanned == sorted(keys)  # byte order
    paged: list[str] = []
    after = None
    while page := default.scan(1, after, 3):
        paged.extend(key for key, _, _ in page)
        after = page[-1][0]
    assert paged == scanned
    ((provider,),) = _query(
        url, "select datlocprovider from pg_database where datname = current_database()"
    )
    if provider == "i":
        # The database's own order is not byte order: COLLATE "C" is what makes them agree.
        found = _query(
            url,
            'select key from buttress_shard_rows where shard = 1 order by key collate "default"',
        )
        assert [key for (key,) in found] != scanned
