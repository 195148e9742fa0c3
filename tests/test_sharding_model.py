"""A ShardedStore on SQLite files against the plain dict model in ``sharding_model.py``.

A hypothesis state machine opens a store of 8 shards on 2 to 4 nodes (each an SQLite file
behind a ``FlakyBackend``), with no replica or one, reading from the primary or a replica, then
puts, deletes, reads one key or many, adds a node and rebalances, removes a node and rebalances,
takes a node down and brings it back, flushes, and closes and reopens the store on the same
files (in another order). One machine replicates synchronously (with the default quorum or a
quorum of one), the other through the queued replicator.

Checked at every step: a write to a shard whose primary is down raises ShardUnavailableError and
changes nothing; a sync write that misses its quorum raises QuorumNotReachedError with the
right details, yet is kept; put's versions only grow; a read returns exactly the model's value
whenever the shard's primary is up (with ``read="replica"`` too: the store never answers with a
replica that has not caught up with its own write), and otherwise that value or
ShardUnavailableError, never an older one. While every node is up the store holds exactly the
model; after a flush every replica equals its primary and no node holds a shard it should not.

Rebalancing happens with every node up and right after a flush: the replicator racing a move is
the subject of a focused test in ``test_sharding.py``.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from buttress import QuorumNotReachedError, ShardedStore, ShardUnavailableError
from buttress.backends.sqlite import SQLiteShardBackend
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sharding_model import Config, Expected, StoreModel
from sharding_support import FlakyBackend, check_placement, contents

# The ci profile runs 400 examples of each machine (some 35 s each here) and soak 3000: more
# than pytest-timeout's default of 120 s allows on a slow runner.
pytestmark = pytest.mark.timeout(900)

SHARDS = 8
MAX_NODES = 5
# The longest a flush may take with every node up; far above what it needs.
FLUSH = 10.0

KEYS = st.sampled_from([f"k{number}" for number in range(10)] + ["", "ключ", "a b"])
VALUES = st.binary(max_size=6)


class ShardingMachine(RuleBasedStateMachine):
    replication: str = "sync"

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="buttress-shard-model-"))
        self.backends: dict[str, FlakyBackend] = {}
        self.names = (f"n{number}" for number in range(1000))
        self.store: ShardedStore | None = None

    # -- helpers ---------------------------------------------------------------------------------

    def _backend(self, name: str) -> FlakyBackend:
        backend = FlakyBackend(SQLiteShardBackend(self.folder / f"{name}.db"))
        self.backends[name] = backend
        return backend

    def _open(self, names: list[str]) -> None:
        self.store = ShardedStore(
            {name: self._backend(name) for name in names},
            shards=SHARDS,
            retry_backoff=(0.005, 0.05),
            **self.model.config.store_kwargs(),  # type: ignore[arg-type]
        )

    @property
    def live(self) -> ShardedStore:
        assert self.store is not None
        return self.store

    def _check_write(self, expected: Expected, call: object, key: str) -> object:
        """Runs a write and checks that it did what the model expected."""
        assert callable(call)
        event(f"write: {expected.outcome}")
        if expected.outcome == "unavailable":
            with pytest.raises(ShardUnavailableError) as unavailable:
                call()
            assert unavailable.value.shard == self.live.shard_of(key)
            return None
        if expected.outcome == "quorum":
            with pytest.raises(QuorumNotReachedError) as missed:
                call()
            error = missed.value
            assert (error.key, error.acknowledged, error.quorum, error.failed) == (
                key,
                expected.acknowledged,
                self.model.config.quorum,
                expected.failed,
            )
            return None
        return call()

    def _flush_and_check(self) -> None:
        assert self.model.all_up()
        assert self.live.flush(FLUSH), "flush did not finish with every node up"
        assert self.live.pending_replication() == 0
        check_placement(self.live)

    # -- setup -----------------------------------------------------------------------------------

    @initialize(
        nodes=st.integers(2, 4),
        replicas=st.sampled_from([0, 1, 1, 1]),
        read=st.sampled_from(["primary", "replica"]),
        quorum_of_one=st.booleans(),
    )
    def open_store(self, nodes: int, replicas: int, read: str, quorum_of_one: bool) -> None:
        quorum = 1 if replicas and self.replication == "sync" and quorum_of_one else None
        config = Config(replicas, self.replication, read, quorum)  # type: ignore[arg-type]
        self.model = StoreModel(config)
        self._open([next(self.names) for _ in range(nodes)])

    def teardown(self) -> None:
        try:
            if self.store is not None:
                for backend in self.backends.values():
                    backend.down = False
                    backend.failing.clear()
                self.store.close(timeout=0)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- writes ----------------------------------------------------------------------------------

    @rule(key=KEYS, value=VALUES)
    def put(self, key: str, value: bytes) -> None:
        expected = self.model.put(key, value, self.live.nodes_of(key))
        version = self._check_write(expected, lambda: self.live.put(key, value), key)
        if expected.outcome == "ok":
            assert isinstance(version, int)
            assert version > self.model.versions.get(key, 0), "a version went back"
            self.model.versions[key] = version

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        existed = key in self.model.data
        expected = self.model.delete(key, self.live.nodes_of(key))
        found = self._check_write(expected, lambda: self.live.delete(key), key)
        if expected.outcome in ("ok", "absent"):
            assert found is existed

    # -- reads -----------------------------------------------------------------------------------

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        members = self.live.nodes_of(key)
        want = self.model.data.get(key)
        if self.model.readable(members):
            assert self.live.get(key) == want
            return
        try:
            found = self.live.get(key)
        except ShardUnavailableError as error:
            unavailable = error
        else:
            event("get, primary down: answered")
            assert found == want, "a read answered with data older than the store's own write"
            return
        event("get, primary down: unavailable")
        assert unavailable.shard == self.live.shard_of(key)

    @rule(keys=st.lists(KEYS, max_size=6))
    def get_many(self, keys: list[str]) -> None:
        want = {key: self.model.data[key] for key in keys if key in self.model.data}
        if all(self.model.readable(self.live.nodes_of(key)) for key in keys):
            assert self.live.get_many(keys) == want
            return
        try:
            found = self.live.get_many(keys)
        except ShardUnavailableError:
            return
        assert found == want, "a read answered with data older than the store's own write"

    # -- nodes -----------------------------------------------------------------------------------

    @precondition(lambda self: self.model.all_up() and len(self.live.nodes) < MAX_NODES)
    @rule()
    def add_node_and_rebalance(self) -> None:
        self._flush_and_check()
        name = next(self.names)
        plan = self.live.add_node(name, self._backend(name))
        assert all(name in move.after for move in plan.moves), plan
        event(f"add_node: {len(plan.moves)} moves")
        assert self.live.rebalance(plan) is plan
        assert not self.live.plan(), "the rebalance left moves to do"
        assert name in self.live.nodes
        self._flush_and_check()

    @precondition(
        lambda self: self.model.all_up() and len(self.live.nodes) > self.model.config.members
    )
    @rule(data=st.data())
    def remove_node_and_rebalance(self, data: st.DataObject) -> None:
        self._flush_and_check()
        name = data.draw(st.sampled_from(sorted(self.live.nodes)), label="node")
        plan = self.live.remove_node(name)
        assert all(name in move.before for move in plan.moves), plan
        event("remove_node")
        self.live.rebalance(plan)
        assert name not in self.live.nodes
        assert all(name not in members for members in self.live.layout.values())
        backend = self.backends.pop(name)
        assert backend.inner.pool.closed, "a removed node's backend was not closed"
        assert not self.live.plan()
        self._flush_and_check()

    @precondition(lambda self: self.model.all_up())
    @rule(data=st.data())
    def take_down(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.live.nodes)), label="node")
        self.backends[name].down = True
        self.model.down.add(name)

    @precondition(lambda self: not self.model.all_up())
    @rule()
    def bring_up(self) -> None:
        for name in self.model.down:
            self.backends[name].down = False
        self.model.down.clear()

    @precondition(lambda self: self.model.all_up())
    @rule()
    def flush(self) -> None:
        self._flush_and_check()

    @precondition(lambda self: self.model.all_up())
    @rule(seed=st.integers(0, 2**16))
    def reopen(self, seed: int) -> None:
        """Closes the store and opens the same files again, listed in another order."""
        event("reopen")
        self._flush_and_check()
        layout, epoch = self.live.layout, self.live.stats().epoch
        assert self.live.close(timeout=FLUSH)
        self.store = None
        names = sorted(self.backends)
        random.Random(seed).shuffle(names)
        self._open(names)
        assert (self.live.layout, self.live.stats().epoch) == (layout, epoch)
        assert not self.live.plan()

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def holds_the_model(self) -> None:
        if self.store is None or not self.model.all_up():
            return
        assert contents(self.live) == self.model.data
        assert len(self.live) == len(self.model.data)
        layout = self.live.layout
        assert sorted(layout) == list(range(SHARDS))
        for members in layout.values():
            assert len(members) == self.model.config.members
            assert len(set(members)) == len(members)
            assert set(members) <= set(self.live.nodes)


class SyncMachine(ShardingMachine):
    replication = "sync"


class QueuedMachine(ShardingMachine):
    replication = "queued"


MACHINE_SETTINGS = settings(stateful_step_count=50)

TestSyncReplication = SyncMachine.TestCase
TestSyncReplication.settings = MACHINE_SETTINGS
TestQueuedReplication = QueuedMachine.TestCase
TestQueuedReplication.settings = MACHINE_SETTINGS
