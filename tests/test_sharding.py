"""ShardedStore on SQLite files: routing, reopening, sync and queued replication, reads from
primaries, replicas and read replicas, rebalancing (and its failures), threads writing and
reading while it runs, the asyncio twins, bad input and a closed store.

Nodes are SQLite files behind ``FlakyBackend`` (``sharding_support``), which fails on demand;
``Gated`` below also holds one call until the test lets it go, to set up a race exactly. Every
wait is bounded: flushes get a timeout and their result is asserted.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from buttress import (
    QuorumNotReachedError,
    RebalanceError,
    ShardedStore,
    ShardPlan,
    ShardUnavailableError,
)
from buttress.backends.sqlite import SQLiteShardBackend
from sharding_support import FlakyBackend, NodeDown, check_placement, contents, rows_of
from support import JOIN, run_threads

# The longest a flush may take when every node answers; far above what it needs.
FLUSH = 10.0
# Replication retries quickly, so a node that comes back is caught up at once.
FAST = (0.005, 0.05)


class Hold:
    """One call held until ``release``: ``entered`` is set when the call arrives."""

    def __init__(self, thread: str | None, after: bool) -> None:
        self.thread = thread
        self.after = after
        self.entered = threading.Event()
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()

    def wait(self) -> None:
        self.entered.set()
        self.released.wait(JOIN)


class Gated(FlakyBackend):
    """A FlakyBackend that can hold the next call of a method (made on a given thread), before
    or after it reaches the database, until the test releases it."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.holds: dict[str, Hold] = {}
        self._holds_lock = threading.Lock()

    def hold(self, method: str, *, thread: str | None = None, after: bool = False) -> Hold:
        hold = Hold(thread, after)
        self.holds[method] = hold
        return hold

    def _take(self, method: str) -> Hold | None:
        with self._holds_lock:
            hold = self.holds.get(method)
            if hold is None or hold.thread not in (None, threading.current_thread().name):
                return None
            return self.holds.pop(method)

    def __getattr__(self, name: str) -> Any:
        call = super().__getattr__(name)
        if not callable(call) or name == "close":
            return call

        def gated(*args: Any, **kwargs: Any) -> Any:
            hold = self._take(name)
            if hold is not None and not hold.after:
                hold.wait()
            result = call(*args, **kwargs)
            if hold is not None and hold.after:
                hold.wait()
            return result

        return gated

    def release_all(self) -> None:
        for hold in list(self.holds.values()):
            hold.release()


Nodes = dict[str, FlakyBackend]
Opener = Callable[..., tuple[ShardedStore, Nodes]]


def node(folder: Path, name: str, wrapper: type[FlakyBackend] = FlakyBackend) -> FlakyBackend:
    return wrapper(SQLiteShardBackend(folder / f"{name}.db"))


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Opener]:
    """Opens stores on SQLite files in ``tmp_path`` (16 shards unless told); every one is
    closed at the end, with its nodes brought back up first."""
    opened: list[tuple[ShardedStore, Nodes]] = []

    def open_store(
        names: Sequence[str] = ("a", "b", "c"),
        *,
        wrapper: type[FlakyBackend] = FlakyBackend,
        **options: Any,
    ) -> tuple[ShardedStore, Nodes]:
        nodes = {name: node(tmp_path, name, wrapper) for name in names}
        options.setdefault("shards", 16)
        try:
            store = ShardedStore(nodes, **options)
        except BaseException:
            for backend in nodes.values():
                backend.close()
            raise
        opened.append((store, nodes))
        return store, nodes

    yield open_store
    for store, nodes in opened:
        for backend in [*nodes.values(), *store.nodes.values()]:
            if isinstance(backend, FlakyBackend):
                backend.down = False
                backend.failing.clear()
            if isinstance(backend, Gated):
                backend.release_all()
        store.close(timeout=0)
        for backend in store.nodes.values():  # in case a closed store still took a node
            backend.close()


def key_where(store: ShardedStore, condition: Callable[[tuple[str, ...]], bool]) -> str:
    """The first key whose nodes (primary first) meet ``condition``."""
    return keys_where(store, condition, 1)[0]


def keys_where(
    store: ShardedStore, condition: Callable[[tuple[str, ...]], bool], count: int
) -> list[str]:
    found = []
    for number in range(100_000):
        key = f"key{number}"
        if condition(store.nodes_of(key)):
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError("no key meets the condition")


def keys_in(store: ShardedStore, shard: int, count: int) -> list[str]:
    """The first ``count`` keys of a shard."""
    found = []
    for number in range(100_000):
        key = f"key{number}"
        if store.shard_of(key) == shard:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError(f"shard {shard} has too few keys")


def key_in(store: ShardedStore, shard: int) -> str:
    return keys_in(store, shard, 1)[0]


def row(node: Any, store: ShardedStore, key: str) -> tuple[str, bytes | None, int] | None:
    """The row a node holds for a key (tombstone too), or None."""
    return next((r for r in rows_of(node, store.shard_of(key)) if r[0] == key), None)


def fill(store: ShardedStore, count: int, prefix: str = "item") -> dict[str, bytes]:
    data = {f"{prefix}{number}": f"value {number}".encode() for number in range(count)}
    for key, value in data.items():
        store.put(key, value)
    return data


# ---- routing --------------------------------------------------------------------------------


def test_shard_of_is_deterministic_in_range_and_independent_of_the_nodes(
    open_store: Opener,
) -> None:
    store, _ = open_store(["a", "b", "c"], shards=64)
    other, _ = open_store(["x"], shards=64)
    keys = [f"user:{number}" for number in range(2000)] + ["", "ключ", "a\tb", "🙂"]
    shards = [store.shard_of(key) for key in keys]
    assert all(0 <= shard < 64 for shard in shards)
    assert shards == [store.shard_of(key) for key in keys]
    # A key's shard depends on the shard count only, never on the nodes.
    assert shards == [other.shard_of(key) for key in keys]
    assert set(shards) == set(range(64)), "some shard gets no key of 2000"
    single, _ = open_store(["s"], shards=1)
    assert {single.shard_of(key) for key in keys} == {0}


def test_nodes_of_lists_the_primary_first_and_distinct_nodes(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b", "c", "d"], shards=32, replicas=2, replication="sync")
    for number in range(200):
        key = f"k{number}"
        members = store.nodes_of(key)
        assert members == store.layout[store.shard_of(key)]
        assert len(members) == 3 == len(set(members))
        assert set(members) <= set(nodes)
    key = "the key"
    primary, *replicas = store.nodes_of(key)
    version = store.put(key, b"v")
    # The primary is the one that records what its replicas are owed.
    assert nodes[primary].calls.get("write") == 1
    assert all("write" not in nodes[name].calls for name in nodes if name != primary)
    for name in (primary, *replicas):
        assert row(nodes[name], store, key) == (key, b"v", version)


def test_layout_covers_every_shard(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b", "c"], shards=40, replicas=1, replication="queued")
    layout = store.layout
    assert sorted(layout) == list(range(40))
    for members in layout.values():
        assert len(members) == 2 == len(set(members))
        assert set(members) <= set(nodes)
    assert not store.plan(), "a new store is already where the ring wants it"
    assert store.stats().epoch == 1


def test_64_shards_spread_evenly_over_the_nodes(open_store: Opener) -> None:
    names = ["n1", "n2", "n3", "n4"]
    store, _ = open_store(names, shards=64)
    primaries = Counter(members[0] for members in store.layout.values())
    assert set(primaries) == set(names)
    # 16 each on average; rendezvous hashing of 64 shards stays well within half to double.
    assert all(8 <= count <= 28 for count in primaries.values()), primaries

    replicated, _ = open_store(["r1", "r2", "r3", "r4"], shards=64, replicas=1, replication="sync")
    held = Counter(name for members in replicated.layout.values() for name in members)
    assert all(20 <= count <= 44 for count in held.values()), held


def test_a_heavier_node_gets_more_shards(open_store: Opener) -> None:
    store, _ = open_store(["a", "b", "c", "d"], shards=64, weights={"a": 4})
    primaries = Counter(members[0] for members in store.layout.values())
    assert primaries["a"] > max(primaries[name] for name in "bcd"), primaries


# ---- reopening ------------------------------------------------------------------------------


def paths(folder: Path, names: Sequence[str]) -> dict[str, str]:
    return {name: os.fspath(folder / f"{name}.db") for name in names}


def test_reopening_the_same_files_in_any_order_finds_the_layout_and_the_data(
    tmp_path: Path,
) -> None:
    options: dict[str, Any] = {"shards": 16, "replicas": 1, "replication": "sync"}
    with ShardedStore(paths(tmp_path, "abc"), **options) as store:
        data = fill(store, 100)
        store.delete("item7")
        del data["item7"]
        store.rebalance(store.add_node("d", tmp_path / "d.db"))
        layout, epoch = store.layout, store.stats().epoch
        assert epoch > 1
    with ShardedStore(paths(tmp_path, "dcba"), **options) as again:
        assert (again.layout, again.stats().epoch) == (layout, epoch)
        assert not again.plan()
        assert contents(again) == data
        assert again.get_many(list(data)) == data
        assert again.get("item7") is None
        check_placement(again)


def test_reopening_with_another_shard_count_is_refused(tmp_path: Path) -> None:
    with ShardedStore(paths(tmp_path, "ab"), shards=16) as store:
        data = fill(store, 20)
    with pytest.raises(ValueError, match=r"shards=32.*16 shards"):
        ShardedStore(paths(tmp_path, "ab"), shards=32)
    with ShardedStore(paths(tmp_path, "ab"), shards=16) as again:
        assert contents(again) == data


def test_reopening_without_a_node_that_holds_shards_names_it(tmp_path: Path) -> None:
    with ShardedStore(paths(tmp_path, "abc"), shards=16) as store:
        data = fill(store, 20)
        assert any(members[0] == "b" for members in store.layout.values())
    with pytest.raises(ValueError, match=r"\['b'\]"):
        ShardedStore(paths(tmp_path, "ac"), shards=16)
    # The files are untouched: all of them together open the store as it was.
    with ShardedStore(paths(tmp_path, "abc"), shards=16) as again:
        assert contents(again) == data


def test_reopening_with_an_extra_empty_node_plans_moves_to_it(tmp_path: Path) -> None:
    options: dict[str, Any] = {"shards": 32, "replicas": 1, "replication": "queued"}
    with ShardedStore(paths(tmp_path, "abc"), **options) as store:
        data = fill(store, 100)
        layout = store.layout
    with ShardedStore(paths(tmp_path, "abcd"), **options) as again:
        assert again.layout == layout
        plan = again.plan()
        assert plan, "the new node should get some shards"
        assert all("d" in move.after and "d" not in move.before for move in plan.moves)
        again.rebalance(plan)
        assert again.flush(FLUSH)
        assert contents(again) == data
        check_placement(again)
        assert any("d" in members for members in again.layout.values())


# ---- sync replication -----------------------------------------------------------------------


def test_sync_replicas_have_the_write_before_put_returns(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b"], replicas=1, replication="sync")
    for number in range(20):
        key = f"k{number}"
        primary, replica = store.nodes_of(key)
        version = store.put(key, b"%d" % number)
        assert row(nodes[replica], store, key) == (key, b"%d" % number, version)
        assert store.pending_replication() == 0
    assert store.delete("k3") is True
    primary, replica = store.nodes_of("k3")
    assert row(nodes[replica], store, "k3") == row(nodes[primary], store, "k3")
    assert row(nodes[replica], store, "k3")[1] is None  # type: ignore[index]
    check_placement(store)


def test_sync_write_short_of_its_quorum_raises_but_is_kept(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b"], replicas=1, replication="sync", retry_backoff=FAST)
    key = "k"
    primary, replica = store.nodes_of(key)
    nodes[replica].down = True
    with pytest.raises(QuorumNotReachedError) as missed:
        store.put(key, b"v")
    error = missed.value
    assert (error.key, error.acknowledged, error.quorum, error.failed) == (key, 1, 2, (replica,))
    assert "durable on the primary" in str(error)
    # The write is on the primary, and the store reads it.
    assert row(nodes[primary], store, key)[1] == b"v"  # type: ignore[index]
    assert store.get(key) == b"v"
    assert store.stats().quorum_failures == 1
    assert store.stats().replication_failures >= 1
    assert not store.flush(0.1), "flush cannot finish while the replica is down"
    nodes[replica].down = False
    assert store.flush(FLUSH)
    assert row(nodes[replica], store, key) == row(nodes[primary], store, key)
    check_placement(store)


def test_sync_write_quorum_of_one_needs_only_the_primary(open_store: Opener) -> None:
    store, nodes = open_store(
        ["a", "b"], replicas=1, replication="sync", write_quorum=1, retry_backoff=FAST
    )
    key = "k"
    primary, replica = store.nodes_of(key)
    nodes[replica].down = True
    version = store.put(key, b"v")
    assert store.delete("k") is True
    assert store.put(key, b"w") > version
    stats = store.stats()
    assert stats.quorum_failures == 0
    assert stats.replication_failures >= 3  # the replicator's own retries add to these
    nodes[replica].down = False
    assert store.flush(FLUSH)
    assert row(nodes[replica], store, key) == row(nodes[primary], store, key)
    check_placement(store)


def test_sync_with_two_replicas_reports_every_replica_that_failed(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b", "c"], replicas=2, replication="sync", retry_backoff=FAST)
    key = "k"
    _, first, second = store.nodes_of(key)
    nodes[first].down = True
    store.put(key, b"one replica is enough for 2 of 3")
    nodes[second].down = True
    with pytest.raises(QuorumNotReachedError) as missed:
        store.put(key, b"none")
    assert (missed.value.acknowledged, missed.value.quorum) == (1, 2)
    assert missed.value.failed == (first, second)
    nodes[first].down = nodes[second].down = False
    assert store.flush(FLUSH)
    assert store.get(key) == b"none"
    check_placement(store)


# ---- queued replication ---------------------------------------------------------------------


def test_queued_put_returns_before_the_replicas_have_it(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b"], wrapper=Gated, replicas=1, replication="queued")
    key = "k"
    _, replica = store.nodes_of(key)
    gated = nodes[replica]
    assert isinstance(gated, Gated)
    hold = gated.hold("apply", thread="buttress-replicator")
    version = store.put(key, b"v")
    assert hold.entered.wait(JOIN), "the replicator never sent the write"
    assert row(nodes[replica], store, key) is None
    assert store.pending_replication() == 1
    assert not store.flush(0.05)
    hold.release()
    assert store.flush(FLUSH)
    assert row(nodes[replica], store, key) == (key, b"v", version)
    assert store.stats().replicated == 1
    check_placement(store)


def test_queued_replica_down_for_a_while_gets_everything_back(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b", "c"], replicas=1, replication="queued", retry_backoff=FAST)
    keys = keys_where(store, lambda members: members[1] == "c" and members[0] != "c", 30)
    nodes["c"].down = True
    for number, key in enumerate(keys):
        store.put(key, b"%d" % number)
    for key in keys[::3]:
        assert store.delete(key) is True
    time.sleep(0.2)  # the replicator fails and backs off meanwhile
    assert store.stats().replication_failures >= 1
    assert not store.flush(0.05)
    nodes["c"].down = False
    assert store.flush(FLUSH)
    for key in keys:
        primary = store.nodes_of(key)[0]
        assert row(nodes["c"], store, key) == row(nodes[primary], store, key)
    assert store.stats().replicated >= len(keys)
    check_placement(store)


def test_pending_replication_counts_what_the_primaries_owe(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b"], replicas=1, replication="queued", retry_backoff=FAST)
    assert store.pending_replication() == 0
    nodes["a"].failing.add("apply")
    nodes["b"].failing.add("apply")
    store.put("k1", b"1")
    store.put("k2", b"2")
    assert store.pending_replication() == 2
    store.put("k1", b"one")  # the same key is owed once, at its newest version
    assert store.pending_replication() == 2
    assert store.delete("k2") is True
    assert store.delete("never there") is False
    assert store.pending_replication() == 2
    store.put("k3", b"3")
    assert store.pending_replication() == 3
    nodes["a"].failing.clear()
    nodes["b"].failing.clear()
    assert store.flush(FLUSH)
    assert store.pending_replication() == 0
    check_placement(store)


def test_queued_hints_survive_a_close_and_reopen(tmp_path: Path) -> None:
    options: dict[str, Any] = {
        "shards": 16,
        "replicas": 1,
        "replication": "queued",
        "retry_backoff": FAST,
    }
    nodes = {name: node(tmp_path, name) for name in "abc"}
    store = ShardedStore(nodes, **options)
    keys = keys_where(store, lambda members: members[1] == "b", 20)
    nodes["b"].down = True
    for key in keys:
        store.put(key, key.encode())
    assert all(row(nodes["b"].inner, store, key) is None for key in keys)
    assert store.close(timeout=0) is False, "close should report the writes still owed"
    with ShardedStore(paths(tmp_path, "abc"), **options) as again:
        assert again.flush(FLUSH)
        assert again.pending_replication() == 0
        for key in keys:
            assert row(again.nodes["b"], again, key)[1] == key.encode()  # type: ignore[index]
        check_placement(again)


# ---- reads ----------------------------------------------------------------------------------


def test_read_primary_falls_back_to_a_replica(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b"], replicas=1, replication="sync")
    data = fill(store, 20)
    for name in ("a", "b"):
        nodes[name].calls.clear()
    assert store.get("item1") == data["item1"]
    primary, replica = store.nodes_of("item1")
    assert "read" in nodes[primary].calls
    assert "read" not in nodes[replica].calls
    nodes[primary].down = True
    assert store.get("item1") == data["item1"]
    assert store.stats().fallback_reads == 1
    assert store.get_many(list(data)) == data
    assert store.get("missing") is None
    nodes[primary].down = False
    assert store.get("item1") == data["item1"]


def test_read_replica_reads_the_replicas(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b"], replicas=1, replication="sync", read="replica")
    data = fill(store, 20)
    for key, value in data.items():
        primary, replica = store.nodes_of(key)
        before = (nodes[primary].calls.get("read", 0), nodes[replica].calls.get("read", 0))
        assert store.get(key) == value
        after = (nodes[primary].calls.get("read", 0), nodes[replica].calls.get("read", 0))
        assert after == (before[0], before[1] + 1), key
    assert store.stats().stale_replicas_skipped == 0
    # A replica that fails sends the read to the primary.
    nodes["b"].down = True
    assert store.get_many(list(data)) == data


@pytest.mark.parametrize("lag", ["behind", "down"])
def test_read_replica_never_returns_older_than_the_store_wrote(
    open_store: Opener, lag: str
) -> None:
    store, nodes = open_store(
        ["a", "b"], replicas=1, replication="queued", read="replica", retry_backoff=FAST
    )
    key = "k"
    _, replica = store.nodes_of(key)
    store.put(key, b"old")
    assert store.flush(FLUSH)
    assert store.get(key) == b"old"
    if lag == "behind":
        nodes[replica].failing.add("apply")
    else:
        nodes[replica].down = True
    store.put(key, b"new")
    assert store.get(key) == b"new"
    assert store.get_many([key, "other"]) == {key: b"new"}
    store.delete(key)
    assert store.get(key) is None
    if lag == "behind":
        assert row(nodes[replica], store, key)[1] == b"old"  # type: ignore[index]
        assert store.stats().stale_replicas_skipped >= 3
    nodes[replica].failing.clear()
    nodes[replica].down = False
    assert store.flush(FLUSH)
    assert store.get(key) is None
    check_placement(store)


def test_primary_down_and_only_stale_replicas_is_unavailable(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b"], replicas=1, replication="queued", retry_backoff=FAST)
    key = "k"
    primary, replica = store.nodes_of(key)
    nodes[replica].failing.add("apply")
    store.put(key, b"v")
    nodes[primary].down = True
    with pytest.raises(ShardUnavailableError) as unavailable:
        store.get(key)
    error = unavailable.value
    assert error.shard == store.shard_of(key)
    assert error.nodes == (primary, replica)
    assert "caught up" in error.reason
    assert store.stats().stale_replicas_skipped == 1
    nodes[replica].down = True
    with pytest.raises(ShardUnavailableError, match="failed"):
        store.get(key)


def test_read_replicas_are_read_and_never_written(tmp_path: Path) -> None:
    primary = node(tmp_path, "a")
    # A copy the database keeps itself; here, another connection pool on the same file.
    copy = FlakyBackend(SQLiteShardBackend(tmp_path / "a.db"))
    with ShardedStore({"a": primary}, shards=8, read="replica", read_replicas={"a": [copy]}) as s:
        data = fill(s, 20)
        copy.calls.clear()
        assert {key: s.get(key) for key in data} == data
        assert copy.calls.get("read") == len(data)
        assert s.get_many(list(data)) == data
        assert copy.calls.get("read_many", 0) >= 1
        assert "read" not in primary.calls
        assert "read_many" not in primary.calls
        s.put("more", b"m")
        s.delete("item0")
        s.rebalance()
        assert s.flush(FLUSH)
        assert set(copy.calls) <= {"read", "read_many"}, copy.calls
    assert copy.inner.pool.closed, "the store closes its read replicas"


def test_read_primary_falls_back_to_a_read_replica(tmp_path: Path) -> None:
    primary = node(tmp_path, "a")
    copy = FlakyBackend(SQLiteShardBackend(tmp_path / "a.db"))
    with ShardedStore({"a": primary}, shards=8, read_replicas={"a": [copy]}) as store:
        store.put("k", b"v")
        assert store.get("k") == b"v"
        assert "read" not in copy.calls
        primary.down = True
        assert store.get("k") == b"v"
        assert store.stats().fallback_reads == 1
        with pytest.raises(ShardUnavailableError):
            store.put("k", b"w")
        primary.down = False


def test_a_lagging_read_replica_is_passed_over_for_the_stores_own_writes(
    tmp_path: Path,
) -> None:
    primary = node(tmp_path, "a")
    lagging = FlakyBackend(SQLiteShardBackend(tmp_path / "copy.db"))  # never gets anything
    with ShardedStore(
        {"a": primary}, shards=8, read="replica", read_replicas={"a": [lagging]}
    ) as store:
        store.put("k", b"v")
        assert store.get("k") == b"v"
        assert lagging.calls.get("read") == 1
        assert store.stats().stale_replicas_skipped == 1
        # A key this store never wrote is read from the replica as it is.
        assert store.get("unknown") is None


# ---- rebalancing ----------------------------------------------------------------------------


def test_add_node_plans_only_moves_onto_the_new_node(open_store: Opener, tmp_path: Path) -> None:
    store, _ = open_store(["a", "b", "c", "d"], shards=64, replicas=1, replication="sync")
    layout, epoch = store.layout, store.stats().epoch
    plan = store.add_node("e", node(tmp_path, "e"))
    assert isinstance(plan, ShardPlan)
    assert (plan.shards, plan.epoch) == (64, epoch)
    assert plan.moves
    for move in plan.moves:
        assert move.before == layout[move.shard]
        assert "e" in move.after
        assert "e" not in move.before
        assert move.copies_to == ("e",)
        assert len(move.leaves) == 1
        if move.after[0] != "e":
            assert move.after[0] == move.before[0], "a primary moved to an old node"
    # 2 of the 5 nodes hold each shard: about 2/5 of the shards gain the new node.
    assert 0.2 <= plan.fraction <= 0.65, plan.fraction
    assert plan.fraction == len(plan.moves) / 64
    assert plan.primaries_moved == sum(move.after[0] == "e" for move in plan.moves)
    assert 0 < plan.primaries_moved < len(plan.moves)
    # Nothing moves before rebalance().
    assert store.layout == layout
    assert "e" in store.nodes
    assert store.plan() == plan


def test_rebalance_moves_the_data(open_store: Opener, tmp_path: Path) -> None:
    store, nodes = open_store(["a", "b", "c"], shards=32, replicas=1, replication="sync")
    data = fill(store, 300)
    epoch = store.stats().epoch
    plan = store.add_node("d", node(tmp_path, "d"))
    assert store.rebalance(plan) is plan
    assert store.stats().epoch == epoch + len(plan.moves)
    assert store.stats().shards_moved == len(plan.moves)
    assert not store.plan()
    assert store.get_many(list(data)) == data
    assert all(store.get(key) == value for key, value in data.items())
    assert contents(store) == data
    check_placement(store)
    for move in plan.moves:
        for name in move.leaves:
            assert not rows_of(nodes[name], move.shard), f"{name} kept shard {move.shard}"
    assert sum(store.nodes["d"].counts().values()) > 0
    assert store.rebalance() == ShardPlan((), 32, store.stats().epoch)


def test_remove_node_moves_its_shards_off_and_closes_it(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b", "c", "d"], shards=32, replicas=1, replication="queued")
    data = fill(store, 200)
    assert store.flush(FLUSH)
    plan = store.remove_node("b")
    assert plan.moves
    assert all("b" in move.before and "b" not in move.after for move in plan.moves)
    assert {move.shard for move in plan.moves} == {
        shard for shard, members in store.layout.items() if "b" in members
    }
    assert "b" in store.nodes, "a leaving node stays until its shards have moved"
    assert store.remove_node("b") == plan, "removing a leaving node again plans the same"
    store.rebalance(plan)
    assert "b" not in store.nodes
    assert "b" not in store.stats().nodes
    assert all("b" not in members for members in store.layout.values())
    assert nodes["b"].inner.pool.closed
    assert store.flush(FLUSH)
    assert contents(store) == data
    check_placement(store)
    with pytest.raises(KeyError, match="'b'"):
        store.remove_node("b")


def test_remove_node_keeps_enough_nodes_for_the_replicas(open_store: Opener) -> None:
    store, _ = open_store(["a", "b"], replicas=1, replication="sync")
    data = fill(store, 10)
    with pytest.raises(ValueError, match="would leave 1 nodes"):
        store.remove_node("a")
    three, _ = open_store(["x", "y", "z"], replicas=1, replication="sync")
    three.remove_node("x")
    with pytest.raises(ValueError, match="'y'"):
        three.remove_node("y")
    three.rebalance()
    assert set(three.nodes) == {"y", "z"}
    with pytest.raises(ValueError, match="would leave"):
        three.remove_node("z")
    assert contents(store) == data
    assert set(store.nodes) == {"a", "b"}


def test_a_stale_plan_is_refused(open_store: Opener, tmp_path: Path) -> None:
    store, _ = open_store(["a", "b", "c"], replicas=1, replication="sync")
    data = fill(store, 50)
    plan = store.add_node("d", node(tmp_path, "d"))
    store.rebalance(store.plan())
    with pytest.raises(RebalanceError, match="epoch"):
        store.rebalance(plan)
    removal = store.remove_node("d")
    store.rebalance(removal)
    with pytest.raises(RebalanceError, match="plan"):
        store.rebalance(removal)
    assert contents(store) == data
    check_placement(store)


class FailsAfter(FlakyBackend):
    """Fails every ``apply`` after the first ``applies`` (None: never)."""

    applies: int | None = None

    def apply(self, *args: Any) -> Any:
        if self.applies is not None:
            if self.applies == 0:
                raise NodeDown("node is down (apply)")
            self.applies -= 1
        return super().apply(*args)


@pytest.mark.parametrize("good_moves", [0, 3])
def test_a_failed_move_loses_nothing_and_rebalance_resumes(
    open_store: Opener, tmp_path: Path, good_moves: int
) -> None:
    store, _ = open_store(["a", "b", "c"], shards=32, replicas=1, replication="sync")
    data = fill(store, 300)
    target = FailsAfter(SQLiteShardBackend(tmp_path / "d.db"))
    target.applies = good_moves  # few rows per shard: one apply each
    plan = store.add_node("d", target)
    layout = store.layout
    with pytest.raises(RebalanceError, match=f"after {good_moves} of {len(plan.moves)}") as error:
        store.rebalance(plan)
    assert isinstance(error.value.__cause__, NodeDown)
    done, failed = plan.moves[:good_moves], plan.moves[good_moves]
    assert store.layout[failed.shard] == failed.before
    assert not rows_of(target.inner, failed.shard), "the failed copy was not dropped"
    for move in done:
        assert store.layout[move.shard] == move.after
    for move in plan.moves[good_moves:]:
        assert store.layout[move.shard] == layout[move.shard]
    assert contents(store) == data
    assert store.get_many(list(data)) == data
    store.put("during", b"the outage")
    data["during"] = b"the outage"
    target.applies = None
    resumed = store.rebalance()
    assert {move.shard for move in resumed.moves} == {m.shard for m in plan.moves[good_moves:]}
    assert not store.plan()
    assert contents(store) == data
    check_placement(store)


class ShutOut(FlakyBackend):
    """Refuses ``apply`` from the replicator's thread while ``shut``: the node takes writes
    from the store and from rebalancing, but the replicator cannot catch it up."""

    shut = False

    def apply(self, *args: Any) -> Any:
        if self.shut and threading.current_thread().name == "buttress-replicator":
            raise NodeDown("node is down (apply from the replicator)")
        return super().apply(*args)


def test_rebalance_promotes_a_replica_only_once_it_has_every_write(
    open_store: Opener,
) -> None:
    store, nodes = open_store(
        ["a", "b", "c"], wrapper=ShutOut, replicas=1, replication="queued", retry_backoff=FAST
    )
    keys = keys_where(store, lambda members: members[0] == "a", 20)
    for name in "bc":
        nodes[name].shut = True  # type: ignore[attr-defined]
    for key in keys:
        store.put(key, key.encode())
    assert store.pending_replication() == len(keys)
    replicated = store.stats().replicated
    # The replicas still lack every write when their primary leaves: each one promoted gets
    # what it is owed from the old primary before the shard switches to it.
    plan = store.rebalance(store.remove_node("a"))
    assert all(move.after[0] in move.before for move in plan.moves if move.before[0] == "a")
    assert store.stats().replicated == replicated + len(keys)
    assert store.pending_replication() == 0
    assert store.get_many(keys) == {key: key.encode() for key in keys}
    check_placement(store)
    for name in "bc":
        nodes[name].shut = False  # type: ignore[attr-defined]
    assert store.flush(FLUSH)


def test_a_switch_that_fails_keeps_what_the_replicas_are_owed(
    open_store: Opener, tmp_path: Path
) -> None:
    store, nodes = open_store(["a", "b", "c"], replicas=1, replication="queued", retry_backoff=FAST)
    newcomer = node(tmp_path, "d")
    plan = store.add_node("d", newcomer)
    move = next(move for move in plan.moves if move.after[0] == "d")
    key = key_in(store, move.shard)
    replica = move.before[1]
    nodes[replica].failing.add("apply")
    store.put(key, b"owed")
    assert store.pending_replication() == 1
    everyone = [*nodes.values(), newcomer]
    for backend in everyone:
        backend.failing.add("save_layout")
    with pytest.raises(RebalanceError, match="could not be saved"):
        store.rebalance(ShardPlan((move,), plan.shards, plan.epoch))
    for backend in everyone:
        backend.failing.clear()
    assert store.layout[move.shard] == move.before
    assert store.flush(FLUSH)
    assert row(nodes[replica], store, key) == row(nodes[move.before[0]], store, key)


# ---- threads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "replication",
    [
        "sync",
        "queued",
    ],
)
def test_writers_keep_writing_while_nodes_come_and_go(
    open_store: Opener, tmp_path: Path, replication: str
) -> None:
    store, _ = open_store(["a", "b", "c"], shards=16, replicas=1, replication=replication)
    writers = 4
    done = threading.Event()
    last: list[dict[str, bytes | None]] = [{} for _ in range(writers)]
    moved: list[ShardPlan] = []

    def work(index: int) -> None:
        if index == writers:
            try:
                moved.append(store.rebalance(store.add_node("d", node(tmp_path, "d"))))
                moved.append(store.rebalance(store.remove_node("a")))
            finally:
                done.set()
            return
        chance = random.Random(index)
        mine = last[index]
        count = 0
        while not done.is_set() or count < 200:
            key = f"t{index}:{chance.randrange(25)}"
            if chance.random() < 0.2:
                store.delete(key)
                mine[key] = None
            else:
                value = f"{index}/{count}".encode()
                store.put(key, value)
                mine[key] = value
            count += 1

    run_threads(work, writers + 1, within=60)
    assert all(moved), "the rebalances moved nothing"
    assert set(store.nodes) == {"b", "c", "d"}
    expected = {key: value for mine in last for key, value in mine.items() if value is not None}
    for mine in last:
        assert {key: store.get(key) for key in mine} == mine
    assert contents(store) == expected
    assert store.flush(FLUSH)
    check_placement(store)


@pytest.mark.parametrize(
    ("replication", "read"),
    [("sync", "primary"), ("sync", "replica"), ("queued", "primary"), ("queued", "replica")],
)
def test_threads_always_read_what_was_written(
    open_store: Opener, replication: str, read: str
) -> None:
    store, _ = open_store(
        ["a", "b", "c"], shards=16, replicas=1, replication=replication, read=read
    )
    writers, readers, keys = 3, 2, 10
    # The newest write that has returned, per writer and key: (count, value).
    published: dict[tuple[int, int], int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 1.5
    checked = Counter[str]()

    def work(index: int) -> None:
        chance = random.Random(index)
        count = 0
        while time.monotonic() < deadline or count < 50:
            count += 1
            if index < writers:
                number = chance.randrange(keys)
                key = f"w{index}:{number}"
                store.put(key, f"{count}".encode())
                with lock:
                    published[index, number] = count
                assert store.get(key) == f"{count}".encode(), "a writer missed its own write"
                gone = f"gone{index}:{number}"
                store.put(gone, b"x")
                store.delete(gone)
                assert store.get(gone) is None, "a writer read a key it had deleted"
            else:
                writer, number = chance.randrange(writers), chance.randrange(keys)
                with lock:
                    floor = published.get((writer, number))
                found = store.get(f"w{writer}:{number}")
                if floor is None:
                    continue
                assert found is not None, "a read lost a write"
                assert int(found) >= floor, "a read went back in time"
                with lock:
                    checked["reads"] += 1

    run_threads(work, writers + readers, within=60)
    assert checked["reads"] > 0
    assert store.flush(FLUSH)
    check_placement(store)
    for (writer, number), count in published.items():
        assert store.get(f"w{writer}:{number}") == f"{count}".encode()


def test_two_writers_of_one_key_never_read_the_older_write(open_store: Opener) -> None:
    store, nodes = open_store(
        ["a", "b"], wrapper=Gated, replicas=1, replication="queued", read="replica"
    )
    key = "shared"
    primary, replica = store.nodes_of(key)
    gated = nodes[primary]
    assert isinstance(gated, Gated)
    # The first writer's put reaches the primary, then stalls before it returns.
    stalled = gated.hold("write", after=True)
    first = threading.Thread(target=store.put, args=(key, b"first"), name="first writer")
    first.start()
    try:
        assert stalled.entered.wait(JOIN)
        assert store.flush(FLUSH)  # the replica has "first"
        nodes[replica].failing.add("apply")  # and lags from here on
        store.put(key, b"second")
    finally:
        stalled.release()
        first.join(JOIN)
    assert not first.is_alive()
    assert row(nodes[primary], store, key)[1] == b"second"  # type: ignore[index]
    assert store.get(key) == b"second", "the second writer read the first one's value"


# ---- asyncio --------------------------------------------------------------------------------


async def test_asyncio_twins(tmp_path: Path) -> None:
    async with ShardedStore(
        paths(tmp_path, "abc"), shards=16, replicas=1, replication="queued"
    ) as store:
        versions = await asyncio.gather(
            *(store.put_async(f"k{number}", b"%d" % number) for number in range(20))
        )
        assert all(isinstance(version, int) for version in versions)
        assert await store.get_async("k3") == b"3"
        assert await store.get_async("missing", b"default") == b"default"
        assert await store.get_many_async(["k1", "k2", "missing"]) == {"k1": b"1", "k2": b"2"}
        assert await store.delete_async("k1") is True
        assert await store.delete_async("k1") is False
        assert await store.flush_async(FLUSH) is True
        check_placement(store)
    with pytest.raises(RuntimeError, match="closed"):
        await store.put_async("k", b"v")
    with pytest.raises(RuntimeError, match="closed"):
        await store.get_async("k")
    assert await store.close_async() is True
    again = ShardedStore(paths(tmp_path, "abc"), shards=16, replicas=1, replication="queued")
    assert await again.get_many_async([f"k{number}" for number in range(3)]) == {
        "k0": b"0",
        "k2": b"2",
    }
    assert await again.close_async(FLUSH) is True


# ---- bad input ------------------------------------------------------------------------------


def test_bad_keys_and_values_are_refused(open_store: Opener) -> None:
    store, _ = open_store(["a", "b"], replicas=1, replication="sync")
    data = fill(store, 10)
    calls: list[Callable[[Any], object]] = [
        lambda key: store.put(key, b"v"),
        store.get,
        store.delete,
        lambda key: store.get_many(["item1", key]),
        store.version,
        store.shard_of,
        store.nodes_of,
    ]
    for key in (1, b"k", None, ("k",)):
        for call in calls:
            with pytest.raises(TypeError, match="key must be a str"):
                call(key)
    with pytest.raises(ValueError, match="NUL"):
        store.put("a\x00b", b"v")
    with pytest.raises(ValueError, match="NUL"):
        store.get("\x00")
    for value in ("text", 1, None, [1]):
        with pytest.raises(TypeError, match="value must be bytes"):
            store.put("item1", value)  # type: ignore[arg-type]
    store.put("array", bytearray(b"ba"))
    store.put("view", memoryview(b"mv"))
    assert store.get("array") == b"ba"
    assert store.get("view") == b"mv"
    assert type(store.get("view")) is bytes
    data |= {"array": b"ba", "view": b"mv"}
    assert contents(store) == data
    assert store.stats().writes == len(data)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"shards": 0}, ValueError, "shards must be between 1"),
        ({"shards": (1 << 20) + 1}, ValueError, "shards must be between"),
        ({"shards": "8"}, TypeError, "shards must be an int"),
        ({"shards": 8.0}, TypeError, "shards must be an int"),
        ({"shards": True}, TypeError, "shards must be an int"),
        ({"replicas": -1}, ValueError, "replicas must be between 0"),
        ({"replicas": 17, "replication": "sync"}, ValueError, "replicas must be between"),
        ({"replicas": True, "replication": "sync"}, TypeError, "replicas must be an int"),
        ({"replicas": 1}, ValueError, "replication must be 'sync' or 'queued' when"),
        ({"replicas": 1, "replication": "async"}, ValueError, "replication must be"),
        ({"replication": "eventual"}, ValueError, "replication must be"),
        ({"replicas": 1, "replication": "sync", "write_quorum": 0}, ValueError, "write_quorum"),
        ({"replicas": 1, "replication": "sync", "write_quorum": 3}, ValueError, "write_quorum"),
        ({"replicas": 1, "replication": "sync", "write_quorum": "1"}, TypeError, "write_quorum"),
        ({"replicas": 1, "replication": "queued", "write_quorum": 1}, ValueError, "sync"),
        ({"write_quorum": 1}, ValueError, "write_quorum applies only"),
        ({"remember_writes": -1}, ValueError, "remember_writes must be between"),
        ({"remember_writes": 1.5}, TypeError, "remember_writes must be an int"),
        ({"read": "nearest"}, ValueError, "read must be 'primary' or 'replica'"),
        ({"retry_backoff": (0, 1)}, ValueError, "retry_backoff"),
        ({"retry_backoff": (2, 1)}, ValueError, "retry_backoff"),
        ({"replicas": 2, "replication": "sync"}, ValueError, "at least 3 nodes"),
        ({"weights": {"z": 2}}, ValueError, "weights names node 'z'"),
        ({"weights": {"a": 0}}, ValueError, "weight"),
        ({"read_replicas": {"z": []}}, ValueError, "read_replicas names node 'z'"),
        ({"read_replicas": {"a": ["a.db"]}}, TypeError, "read_replicas of node 'a'"),
    ],
)
def test_bad_options_are_refused(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with ShardedStore(paths(tmp_path, "ab"), shards=8) as store:
        data = fill(store, 10)
    options = {"shards": 8, **options}
    with pytest.raises(error, match=match):
        ShardedStore(paths(tmp_path, "ab"), **options)
    with ShardedStore(paths(tmp_path, "ab"), shards=8) as again:
        assert contents(again) == data
        assert again.stats().epoch == 1


def test_bad_nodes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty mapping"):
        ShardedStore({})
    with pytest.raises(ValueError, match="non-empty mapping"):
        ShardedStore([os.fspath(tmp_path / "a.db")])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 nodes"):
        ShardedStore(paths(tmp_path, "a"), replicas=1, replication="sync")
    with pytest.raises(TypeError, match=r"node 'b' must be a ShardBackend.*\(got int\)"):
        ShardedStore({"a": os.fspath(tmp_path / "a.db"), "b": 42})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="node 'b' must be a ShardBackend"):
        ShardedStore({"a": tmp_path / "a.db", "b": object()})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="Node names must be non-empty strings"):
        ShardedStore({1: tmp_path / "a.db"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="Node names must be non-empty strings"):
        ShardedStore({"": tmp_path / "a.db"})


def test_refused_membership_changes_change_nothing(open_store: Opener, tmp_path: Path) -> None:
    store, _ = open_store(["a", "b", "c"], replicas=1, replication="sync")
    data = fill(store, 30)
    layout = store.layout
    with pytest.raises(ValueError, match="'b' is already a node"):
        store.add_node("b", node(tmp_path, "other"))
    with pytest.raises(TypeError, match="node 'e' must be a ShardBackend"):
        store.add_node("e", 3.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Node names"):
        store.add_node("", tmp_path / "e.db")
    with pytest.raises(KeyError, match="'z'"):
        store.remove_node("z")
    assert set(store.nodes) == {"a", "b", "c"}
    assert store.layout == layout
    assert not store.plan()
    assert contents(store) == data
    check_placement(store)


def test_a_refused_add_node_leaves_no_file_open(open_store: Opener, tmp_path: Path) -> None:
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc/self/fd to see open files")
    store, _ = open_store(["a", "b"])
    target = tmp_path / "refused.db"
    with pytest.raises(ValueError, match="weight"):
        store.add_node("e", target, weight=0)
    assert "e" not in store.nodes
    store.close()

    def open_files() -> list[str]:
        found = []
        for fd in fds.iterdir():
            try:
                found.append(os.readlink(fd))
            except OSError:
                continue
        return found

    assert not [path for path in open_files() if path.startswith(os.fspath(target))]


# ---- a closed store -------------------------------------------------------------------------


def test_a_closed_store_refuses_work(open_store: Opener, tmp_path: Path) -> None:
    store, nodes = open_store(["a", "b"], replicas=1, replication="sync")
    store.put("k", b"v")
    assert store.close() is True
    assert store.close() is True
    assert all(backend.inner.pool.closed for backend in nodes.values())
    for call in (
        lambda: store.put("k", b"w"),
        lambda: store.delete("k"),
        lambda: store.get("k"),
        lambda: store.get_many(["k"]),
        lambda: store.version("k"),
        lambda: store.rebalance(),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    # Routing needs no node.
    assert store.nodes_of("k") == store.layout[store.shard_of("k")]
    assert "ShardedStore(" in repr(store)
    with ShardedStore(paths(tmp_path, "ab"), shards=16, replicas=1, replication="sync") as again:
        assert again.get("k") == b"v"


def test_flush_on_a_closed_store_raises(open_store: Opener) -> None:
    store, _ = open_store(["a", "b"], replicas=1, replication="queued")
    store.put("k", b"v")
    assert store.close(FLUSH) is True
    with pytest.raises(RuntimeError, match="closed"):
        store.flush(timeout=0.5)


def test_membership_changes_on_a_closed_store_raise(open_store: Opener, tmp_path: Path) -> None:
    store, _ = open_store(["a", "b", "c"])
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.add_node("d", tmp_path / "d.db")
    with pytest.raises(RuntimeError, match="closed"):
        store.remove_node("a")


@pytest.mark.parametrize("operation", ["items", "len", "pending_replication"])
def test_reading_a_closed_store_says_it_is_closed(open_store: Opener, operation: str) -> None:
    store, _ = open_store(["a", "b"], replicas=1, replication="sync")
    store.put("k", b"v")
    store.close()
    calls: dict[str, Callable[[], object]] = {
        "items": lambda: list(store.items()),
        "len": lambda: len(store),
        "pending_replication": store.pending_replication,
    }
    with pytest.raises(RuntimeError, match="closed"):
        calls[operation]()


# ---- races with the replicator and with reads ----------------------------------------------


def switch_while_held(store: ShardedStore, plan: ShardPlan, move: Any, hold: Hold) -> bool:
    """Runs ``rebalance(plan)`` on a thread while the replicator is held in a catch-up of the
    move's shard, and returns (the rebalance still running) once the shard has switched:
    True. A store that waits for the catch-up before it switches the shard never does; after
    a second, False, and the hold is released so the rebalance can finish."""
    errors: list[BaseException] = []

    def rebalance() -> None:
        try:
            store.rebalance(plan)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=rebalance, name="rebalance", daemon=True)
    thread.start()
    deadline = time.monotonic() + 1.0
    while store.layout[move.shard] != move.after and time.monotonic() < deadline:
        time.sleep(0.001)
    switched = store.layout[move.shard] == move.after
    if not switched:
        hold.release()
    thread.join(JOIN)
    assert not thread.is_alive(), "the rebalance hung"
    if errors:
        raise errors[0]
    return switched


def test_the_replicator_keeps_what_a_new_replica_is_owed(
    open_store: Opener, tmp_path: Path
) -> None:
    store, nodes = open_store(["a", "b", "c"], wrapper=Gated, replicas=1, replication="queued")
    plan = store.add_node("d", node(tmp_path, "d", Gated))
    # A shard that keeps its primary and takes the new node as its replica.
    move = next(move for move in plan.moves if move.after[0] == move.before[0])
    primary = nodes[move.before[0]]
    assert isinstance(primary, Gated)
    first, second = keys_in(store, move.shard, 2)
    # The replicator starts catching the shard up before it switches...
    hold = primary.hold("hints", thread="buttress-replicator")
    store.put(first, b"before the switch")
    assert hold.entered.wait(JOIN)
    if switch_while_held(store, plan, move, hold):
        # ...and reads the hints only after a write made once the shard had switched.
        store.put(second, b"acknowledged")
        hold.release()
    else:
        store.put(second, b"acknowledged")
    assert store.flush(FLUSH)
    assert store.pending_replication() == 0
    store.rebalance(store.remove_node(move.before[0]))
    assert store.nodes_of(second)[0] == "d"
    assert store.get(second) == b"acknowledged", "an acknowledged write was lost"


def test_the_replicator_never_writes_to_a_node_the_shard_left(
    open_store: Opener, tmp_path: Path
) -> None:
    store, nodes = open_store(["a", "b", "c"], wrapper=Gated, replicas=1, replication="queued")
    plan = store.add_node("d", node(tmp_path, "d"))
    # A shard whose replica gives way to the new node (and stays a node of the store).
    move = next(move for move in plan.moves if move.after[0] == move.before[0])
    leaving = move.leaves[0]
    gated = nodes[leaving]
    assert isinstance(gated, Gated)
    hold = gated.hold("apply", thread="buttress-replicator")
    store.put(key_in(store, move.shard), b"v")
    assert hold.entered.wait(JOIN)
    # The replicator sends the row once the shard has switched and the node has dropped it.
    switch_while_held(store, plan, move, hold)
    hold.release()
    assert store.flush(FLUSH)
    check_placement(store)


def test_a_read_racing_a_node_removal_still_answers(open_store: Opener) -> None:
    store, nodes = open_store(["a", "b"], wrapper=Gated)
    key = key_where(store, lambda members: members == ("a",))
    store.put(key, b"v")
    gated = nodes["a"]
    assert isinstance(gated, Gated)
    hold = gated.hold("read", thread="reader")
    found: list[object] = []

    def read() -> None:
        try:
            found.append(store.get(key))
        except Exception as error:
            found.append(error)

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    try:
        assert hold.entered.wait(JOIN)
        store.rebalance(store.remove_node("a"))
    finally:
        hold.release()
        reader.join(JOIN)
    assert found == [b"v"]


class ReplicatorClock:
    """Stands in for the ``time`` module of ``buttress.routing.sharding`` and counts how often
    the replicator reads the clock: a few times per pass of its loop."""

    def __init__(self) -> None:
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def monotonic(self) -> float:
        if threading.current_thread().name == "buttress-replicator":
            self.reads += 1
        return time.monotonic()


def test_the_replicator_sleeps_while_a_replica_is_down(
    open_store: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, nodes = open_store(["a", "b", "c"], replicas=1, replication="queued", retry_backoff=FAST)
    key = "k"
    primary, replica = store.nodes_of(key)
    (bystander,) = set(nodes) - {primary, replica}
    # The bystander fails once (the flush asks every node what it owes), then recovers.
    nodes[bystander].down = True
    assert not store.flush(0.1)
    nodes[bystander].down = False
    assert store.flush(FLUSH)
    nodes[replica].down = True
    store.put(key, b"v")
    time.sleep(0.1)
    clock = ReplicatorClock()
    monkeypatch.setattr("buttress.routing.sharding.time", clock)
    time.sleep(0.5)
    passes = clock.reads
    monkeypatch.undo()
    nodes[replica].down = False
    assert store.flush(FLUSH)
    # Retrying every 0.05 s at most takes some 10 passes in 0.5 s, not thousands.
    assert passes < 500, f"the replicator read the clock {passes} times in 0.5 s"
