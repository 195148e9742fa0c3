"""A key-value store sharded over several databases, with replicas and online rebalancing.

Routing has two levels. A key hashes (jump consistent hash) to one of a fixed number of logical
shards; a shard lives on a primary node and its replicas, chosen by rendezvous hashing over the
nodes. Changing the nodes moves whole shards, never re-hashes keys, so the plan of a change is a
short list of shards and only the shards whose top nodes change move.

Writes go to the shard's primary. When the store keeps replicas itself, the primary records in
the same transaction what each replica is owed (a hint), so a write can never be lost between
the primary and its replicas:

- ``replication="sync"``: the replicas are written before ``put`` returns; ``put`` raises
  ``QuorumNotReachedError`` when fewer than ``write_quorum`` nodes have the write. A replica that
  missed it gets it from the replicator later, from the hint.
- ``replication="queued"``: ``put`` returns once the primary has the write and the hints; a
  background replicator copies writes to the replicas, retrying failed ones with backoff.

Databases that replicate themselves (PostgreSQL streaming replicas, say) are given as
``read_replicas`` of a node: the store reads from them but never writes to them.

Reads go to the primary, falling back to replicas only when the primary fails
(``read="primary"``), or to a replica first (``read="replica"``). Either way the store remembers
the version of its recent writes, and a replica that has not caught up with one of them is passed
over for that key, so a caller always reads its own writes.

Every row carries a version that only grows, and a copy applies a row only when it is newer, so
copies, retries and replication can overlap in any order and still converge. A rebalance copies
a shard to its new nodes while writes go on (they are sent to the new nodes as well), pauses the
shard's writes only to switch its route, and drops the old copy after the switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, Protocol, TypeVar, runtime_checkable

from buttress._core import HashRing
from buttress.errors import (
    QuorumNotReachedError,
    RebalanceError,
    ShardUnavailableError,
)

__all__ = [
    "ShardBackend",
    "ShardMove",
    "ShardPlan",
    "ShardStoreStats",
    "ShardedStore",
]

logger = logging.getLogger("buttress.sharding")

Row = tuple[str, bytes | None, int]
Hint = tuple[str, str, int]
T = TypeVar("T")
Replication = Literal["sync", "queued"]
ReadPreference = Literal["primary", "replica"]

# Rows per round trip when a shard is copied or its replicas are caught up.
_BATCH = 1000


@runtime_checkable
class ShardBackend(Protocol):
    """What a node of a ``ShardedStore`` provides. ``SQLiteShardBackend`` and
    ``PostgresShardBackend`` implement it; versions and hints are explained in
    ``buttress.backends._shard_sql``."""

    def write(
        self, shard: int, key: str, value: bytes | None, replicas: Sequence[str], now: int
    ) -> int | None: ...
    def read(self, shard: int, key: str) -> tuple[bytes | None, int] | None: ...
    def read_many(self, shard: int, keys: Sequence[str]) -> dict[str, tuple[bytes | None, int]]: ...
    def scan(self, shard: int, after: str | None, limit: int) -> list[Row]: ...
    def counts(self) -> dict[int, int]: ...
    def apply(self, shard: int, rows: Sequence[Row]) -> None: ...
    def drop_shard(self, shard: int) -> None: ...
    def hints(
        self, shard: int, limit: int, replica: str | None = None
    ) -> list[tuple[str, str, int]]: ...
    def hinted_shards(self) -> dict[int, int]: ...
    def add_hints(self, shard: int, hints: Sequence[tuple[str, str, int]]) -> None: ...
    def clear_hints(self, shard: int, hints: Sequence[tuple[str, str, int]]) -> None: ...
    def load_layout(self) -> tuple[int, str] | None: ...
    def save_layout(self, epoch: int, layout: str) -> None: ...
    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class ShardMove:
    """One shard's change of nodes: ``before`` and ``after`` list the primary first."""

    shard: int
    before: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def copies_to(self) -> tuple[str, ...]:
        """The nodes that receive a copy of the shard."""
        return tuple(node for node in self.after if node not in self.before)

    @property
    def leaves(self) -> tuple[str, ...]:
        """The nodes that drop the shard once it has switched."""
        return tuple(node for node in self.before if node not in self.after)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """The shards a change of nodes moves, made from the layout of ``epoch``."""

    moves: tuple[ShardMove, ...]
    shards: int
    epoch: int

    @property
    def fraction(self) -> float:
        """The share of the shards that move (a change of primary or of replicas)."""
        return len(self.moves) / self.shards

    @property
    def primaries_moved(self) -> int:
        """How many shards change primary."""
        return sum(1 for move in self.moves if move.before[:1] != move.after[:1])

    def __bool__(self) -> bool:
        return bool(self.moves)


@dataclasses.dataclass(frozen=True)
class ShardStoreStats:
    """Counters since the store opened."""

    shards: int
    nodes: tuple[str, ...]
    epoch: int
    writes: int
    reads: int
    #: Reads answered by a replica because the primary failed.
    fallback_reads: int
    #: Replicas passed over because they had not caught up with one of the store's writes.
    stale_replicas_skipped: int
    #: Rows the replicator copied to replicas, and replica writes that failed and wait for it.
    replicated: int
    replication_failures: int
    quorum_failures: int
    shards_moved: int


class _Move:
    """A shard being copied: writes go to ``targets`` too, and the first failure is kept."""

    __slots__ = ("failure", "targets")

    def __init__(self, targets: tuple[str, ...]) -> None:
        self.targets = targets
        self.failure: BaseException | None = None


class ShardedStore:
    """Keys (str) to values (bytes) over several databases, sharded and replicated.

    ``nodes`` maps node names to ``ShardBackend``s, or to SQLite file paths. The shard count is
    fixed for the store's life; the layout (which nodes hold each shard) is saved on every node,
    so reopening the same nodes finds every shard where it was.

    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> nodes = {name: os.path.join(folder, f"{name}.db") for name in ("a", "b", "c")}
    >>> with ShardedStore(nodes, replicas=1, replication="sync") as store:
    ...     version = store.put("user:1", b"ada")
    ...     plan = store.add_node("d", os.path.join(folder, "d.db"))
    ...     _ = store.rebalance(plan)
    ...     store.get("user:1")
    b'ada'
    """

    def __init__(
        self,
        nodes: Mapping[str, ShardBackend | str | os.PathLike[str]],
        *,
        shards: int = 64,
        replicas: int = 0,
        replication: Replication | None = None,
        write_quorum: int | None = None,
        read: ReadPreference = "primary",
        read_replicas: Mapping[str, Sequence[ShardBackend]] | None = None,
        weights: Mapping[str, int] | None = None,
        remember_writes: int = 100_000,
        retry_backoff: tuple[float, float] = (0.05, 5.0),
    ) -> None:
        _check_count("shards", shards, 1, 1 << 20)
        _check_count("replicas", replicas, 0, 16)
        _check_count("remember_writes", remember_writes, 0, 1 << 30)
        if replicas and replication not in ("sync", "queued"):
            raise ValueError(
                f"replication must be 'sync' or 'queued' when replicas={replicas} (got "
                f"{replication!r}): 'sync' writes the replicas before put() returns, 'queued' "
                "has a background replicator write them. A database that replicates itself "
                "goes in read_replicas instead."
            )
        if replication is not None and replication not in ("sync", "queued"):
            raise ValueError(f"replication must be 'sync' or 'queued' (got {replication!r}).")
        if read not in ("primary", "replica"):
            raise ValueError(f"read must be 'primary' or 'replica' (got {read!r}).")
        members = 1 + replicas
        if write_quorum is not None and replication != "sync":
            raise ValueError(
                "write_quorum applies only to replication='sync': queued writes return once "
                "the primary has them."
            )
        if write_quorum is None:
            write_quorum = members // 2 + 1
        _check_count("write_quorum", write_quorum, 1, members)
        low, high = retry_backoff
        if not 0 < low <= high:
            raise ValueError(
                f"retry_backoff must be (first, longest) delays with 0 < first <= longest "
                f"(got {retry_backoff!r})."
            )
        if not isinstance(nodes, Mapping) or not nodes:
            raise ValueError("nodes must be a non-empty mapping of node names to backends.")
        if len(nodes) < members:
            raise ValueError(
                f"nodes must hold at least {members} nodes for replicas={replicas} "
                f"(got {len(nodes)})."
            )
        weights = dict(weights or {})
        for name in weights:
            if name not in nodes:
                raise ValueError(f"weights names node '{name}', which is not in nodes.")
        read_replicas = dict(read_replicas or {})
        for name, copies in read_replicas.items():
            if name not in nodes:
                raise ValueError(f"read_replicas names node '{name}', which is not in nodes.")
            for copy in copies:
                if not isinstance(copy, ShardBackend):
                    raise TypeError(
                        f"read_replicas of node '{name}' must be ShardBackends "
                        f"(got {type(copy).__name__})."
                    )

        self._shards = shards
        self._members = members
        self._replication = replication
        self._quorum = write_quorum
        self._read = read
        self._remember_limit = remember_writes
        self._backoff = (float(low), float(high))
        self._nodes: dict[str, ShardBackend] = {}
        # Backends the store opened from paths; a failed __init__ closes only these.
        self._opened: list[ShardBackend] = []
        self._read_replicas = {name: tuple(found) for name, found in read_replicas.items()}
        self._leaving: set[str] = set()
        self._ring = HashRing(algorithm="rendezvous")
        self._key_ring = HashRing([str(shard) for shard in range(shards)], algorithm="jump")
        try:
            for name, backend in nodes.items():
                self._admit(name, backend, weights.get(name, 1))
            self._layout, self._epoch = self._open_layout()
        except BaseException:
            _close_all(self._opened)
            raise

        # Writes to a shard hold it open; a move freezes it (new writes wait) and waits for the
        # open ones before it switches the shard's route.
        self._gate = threading.Condition()
        self._writing = [0] * shards
        self._frozen: set[int] = set()
        self._moving: dict[int, _Move] = {}
        self._admin = threading.RLock()
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._turn = itertools.count()
        self._counts_lock = threading.Lock()
        self._counts = dict.fromkeys(
            (
                "writes",
                "reads",
                "fallback_reads",
                "stale_replicas_skipped",
                "replicated",
                "replication_failures",
                "quorum_failures",
                "shards_moved",
            ),
            0,
        )
        self._closed = False
        self._replicator = _Replicator(self) if replicas else None
        if self._replicator is not None:
            self._replicator.wake_all()

    # -- the public API ----------------------------------------------------------------------

    def put(self, key: str, value: bytes) -> int:
        """Stores ``value`` under ``key`` and returns its new version."""
        data = _check_value(value)
        version = self._write(key, data)
        assert version is not None
        return version

    def delete(self, key: str) -> bool:
        """Deletes ``key``; returns whether it was there."""
        return self._write(key, None) is not None

    def get(self, key: str, default: bytes | None = None) -> bytes | None:
        """The value of ``key``, or ``default``."""
        shard = self.shard_of(key)
        found = self._read_shard(shard, [key]).get(key)
        return default if found is None or found[0] is None else found[0]

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The values of the keys that exist, one round trip per shard."""
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self.shard_of(key), []).append(key)
        values: dict[str, bytes] = {}
        for shard, group in groups.items():
            for key, (value, _) in self._read_shard(shard, group).items():
                if value is not None:
                    values[key] = value
        return values

    def version(self, key: str) -> int | None:
        """The version of ``key`` on its primary (deleted keys keep theirs), or None."""
        shard = self.shard_of(key)
        found = self._read_shard(shard, [key], primary_only=True).get(key)
        return None if found is None else found[1]

    def shard_of(self, key: str) -> int:
        """The logical shard of ``key``."""
        _check_key(key)
        return int(self._key_ring.get_node(key))

    def nodes_of(self, key: str) -> tuple[str, ...]:
        """The nodes that hold ``key``, its primary first."""
        return self._layout[self.shard_of(key)]

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key and value, shard by shard in key order, read from the primaries."""
        self._check_open()
        for shard in range(self._shards):
            after: str | None = None
            while True:
                page = self._scan_primary(shard, after)
                for key, value, _ in page:
                    if value is not None:
                        yield key, value
                if len(page) < _BATCH:
                    break
                after = page[-1][0]

    def _scan_primary(self, shard: int, after: str | None) -> list[Row]:
        primary = self._layout[shard][0]
        return self._call(shard, primary, lambda node: node.scan(shard, after, _BATCH))

    def __len__(self) -> int:
        self._check_open()
        counts = {name: node.counts() for name, node in self._nodes.items()}
        return sum(counts[nodes[0]].get(shard, 0) for shard, nodes in enumerate(self._layout))

    @property
    def shards(self) -> int:
        """How many logical shards the store has."""
        return self._shards

    @property
    def layout(self) -> dict[int, tuple[str, ...]]:
        """Every shard's nodes, primary first."""
        return dict(enumerate(self._layout))

    @property
    def nodes(self) -> dict[str, ShardBackend]:
        """The nodes, leaving ones included until a rebalance has moved their shards off."""
        return dict(self._nodes)

    def stats(self) -> ShardStoreStats:
        """The store's counters."""
        with self._counts_lock:
            counts = dict(self._counts)
        return ShardStoreStats(
            shards=self._shards, nodes=tuple(self._nodes), epoch=self._epoch, **counts
        )

    def pending_replication(self) -> int:
        """How many replica writes the primaries still owe (asks every node)."""
        self._check_open()
        total = 0
        for name, node in self._nodes.items():
            try:
                hinted = node.hinted_shards()
            except Exception as error:
                raise ShardUnavailableError(
                    -1, (name,), f"node '{name}' could not say what it owes: {error}"
                ) from error
            for shard, count in hinted.items():
                if shard < self._shards and self._layout[shard][0] == name:
                    total += count
        return total

    def _owing(self) -> bool:
        try:
            return self.pending_replication() > 0
        except ShardUnavailableError:
            return True

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every replica has every write; False if ``timeout`` seconds pass first."""
        self._check_open()
        if self._replicator is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        self._replicator.wake_all()
        while self._owing():
            left = _remaining(deadline)
            if left is not None and left <= 0:
                return False
            time.sleep(0.02 if left is None else min(0.02, left))
            self._replicator.wake_all()
        return True

    # -- membership and rebalancing ----------------------------------------------------------

    def add_node(
        self, name: str, backend: ShardBackend | str | os.PathLike[str], weight: int = 1
    ) -> ShardPlan:
        """Adds a node that holds nothing yet and returns the plan that would give it its
        share; ``rebalance(plan)`` carries it out."""
        with self._admin:
            self._check_open()
            if name in self._nodes:
                raise ValueError(f"name '{name}' is already a node of this store.")
            self._admit(name, backend, weight)
            return self._plan()

    def remove_node(self, name: str) -> ShardPlan:
        """Marks a node as leaving and returns the plan that moves its shards off; once
        ``rebalance`` has moved them, the node is dropped and its backend closed."""
        with self._admin:
            self._check_open()
            if name not in self._nodes:
                raise KeyError(f"name '{name}' is not a node of this store.")
            if name in self._leaving:
                return self._plan()
            staying = len(self._nodes) - len(self._leaving) - 1
            if staying < self._members:
                raise ValueError(
                    f"Removing node '{name}' would leave {staying} nodes, fewer than the "
                    f"{self._members} each shard needs (a primary and {self._members - 1} "
                    "replicas)."
                )
            self._leaving.add(name)
            self._ring.remove_node(name)
            return self._plan()

    def plan(self) -> ShardPlan:
        """The moves that would bring every shard to the nodes the ring now chooses."""
        with self._admin:
            return self._plan()

    def rebalance(self, plan: ShardPlan | None = None) -> ShardPlan:
        """Carries out ``plan`` (by default, ``plan()``), one shard at a time.

        Each shard is copied to its new nodes while writes go on, then its route switches, and
        only then do the nodes it left drop it. Raises ``RebalanceError`` if a move fails: the
        shards not yet switched keep their nodes, so nothing is lost; call it again to resume.
        """
        with self._admin:
            self._check_open()
            if plan is None:
                plan = self._plan()
            elif plan.epoch != self._epoch or plan.shards != self._shards:
                raise RebalanceError(
                    f"The plan was made from layout epoch {plan.epoch}, but the store is at "
                    f"epoch {self._epoch}; make a new one with plan()."
                )
            for done, move in enumerate(plan.moves):
                try:
                    self._move(move)
                except Exception as error:
                    raise RebalanceError(
                        f"Moving shard {move.shard} from {list(move.before)} to "
                        f"{list(move.after)} failed after {done} of {len(plan.moves)} moves: "
                        f"{error}. That shard and the ones after it keep their nodes; "
                        "rebalance() again resumes."
                    ) from error
            self._forget_left_nodes()
            return plan

    # -- closing -----------------------------------------------------------------------------

    def close(self, timeout: float | None = 5.0) -> bool:
        """Stops the replicator (after up to ``timeout`` seconds of catching up) and closes
        every backend. Writes replicas are still owed stay recorded on the primaries, so the
        next store on these nodes sends them. Returns whether nothing was left owed."""
        if self._closed:
            return True
        caught_up = self.flush(timeout)
        self._closed = True
        if self._replicator is not None:
            self._replicator.stop()
        self._close_backends()
        return caught_up

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- asyncio twins: the backends block, so these run them on a worker thread ------------

    async def put_async(self, key: str, value: bytes) -> int:
        """``put`` on a worker thread."""
        return await asyncio.to_thread(self.put, key, value)

    async def delete_async(self, key: str) -> bool:
        """``delete`` on a worker thread."""
        return await asyncio.to_thread(self.delete, key)

    async def get_async(self, key: str, default: bytes | None = None) -> bytes | None:
        """``get`` on a worker thread."""
        return await asyncio.to_thread(self.get, key, default)

    async def get_many_async(self, keys: Sequence[str]) -> dict[str, bytes]:
        """``get_many`` on a worker thread."""
        return await asyncio.to_thread(self.get_many, keys)

    async def flush_async(self, timeout: float | None = None) -> bool:
        """``flush`` on a worker thread."""
        return await asyncio.to_thread(self.flush, timeout)

    async def close_async(self, timeout: float | None = 5.0) -> bool:
        """``close`` on a worker thread."""
        return await asyncio.to_thread(self.close, timeout)

    async def __aenter__(self) -> ShardedStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close_async()

    def __repr__(self) -> str:
        return (
            f"ShardedStore(nodes={list(self._nodes)}, shards={self._shards}, "
            f"replicas={self._members - 1}, epoch={self._epoch})"
        )

    # -- writes ------------------------------------------------------------------------------

    def _write(self, key: str, value: bytes | None) -> int | None:
        self._check_open()
        shard = self.shard_of(key)
        members, move = self._enter(shard)
        try:
            primary, replicas = members[0], members[1:]
            version = self._call(
                shard, primary, lambda node: node.write(shard, key, value, replicas, _now())
            )
            self._count("writes")
            if version is None:
                return None
            self._remember(key, version)
            row = [(key, value, version)]
            if move is not None and move.failure is None:
                for target in move.targets:
                    try:
                        self._nodes[target].apply(shard, row)
                    except Exception as error:
                        move.failure = error
            if replicas:
                if self._replication == "sync":
                    self._replicate_now(shard, key, row, primary, replicas)
                else:
                    assert self._replicator is not None
                    self._replicator.wake(shard)
            return version
        finally:
            self._leave(shard)

    def _replicate_now(
        self, shard: int, key: str, row: list[Row], primary: str, replicas: tuple[str, ...]
    ) -> None:
        acknowledged: list[str] = []
        failed: list[str] = []
        for name in replicas:
            try:
                self._nodes[name].apply(shard, row)
                acknowledged.append(name)
            except Exception as error:
                failed.append(name)
                self._count("replication_failures")
                logger.warning(
                    "Replica '%s' missed a write to shard %d; the replicator will retry: %s",
                    name,
                    shard,
                    error,
                )
        version = row[0][2]
        if acknowledged:
            try:
                self._nodes[primary].clear_hints(
                    shard, [(name, key, version) for name in acknowledged]
                )
            except Exception:
                # The replicator finds these hints and applies them again, which is harmless.
                logger.debug("Could not clear hints on '%s'.", primary, exc_info=True)
        if failed:
            assert self._replicator is not None
            self._replicator.wake(shard)
        if 1 + len(acknowledged) < self._quorum:
            self._count("quorum_failures")
            raise QuorumNotReachedError(key, 1 + len(acknowledged), self._quorum, tuple(failed))

    def _remember(self, key: str, version: int) -> None:
        if not self._remember_limit:
            return
        with self._recent_lock:
            # Two writers of one key may finish in either order: keep the newer version.
            self._recent[key] = max(version, self._recent.get(key, version))
            self._recent.move_to_end(key)
            if len(self._recent) > self._remember_limit:
                self._recent.popitem(last=False)

    def _enter(self, shard: int) -> tuple[tuple[str, ...], _Move | None]:
        with self._gate:
            while shard in self._frozen:
                self._gate.wait()
            self._writing[shard] += 1
            return self._layout[shard], self._moving.get(shard)

    def _leave(self, shard: int) -> None:
        with self._gate:
            self._writing[shard] -= 1
            if not self._writing[shard] and shard in self._frozen:
                self._gate.notify_all()

    @contextlib.contextmanager
    def _frozen_shard(self, shard: int) -> Iterator[None]:
        with self._gate:
            while shard in self._frozen:
                self._gate.wait()
            self._frozen.add(shard)
            while self._writing[shard]:
                self._gate.wait()
        try:
            yield
        finally:
            with self._gate:
                self._frozen.discard(shard)
                self._gate.notify_all()

    # -- reads -------------------------------------------------------------------------------

    def _read_shard(
        self, shard: int, keys: list[str], *, primary_only: bool = False
    ) -> dict[str, tuple[bytes | None, int]]:
        self._check_open()
        self._count("reads")
        # A read that overlaps the switch of its shard may have asked a node that has since
        # dropped it; it is asked again of the new nodes (a shard switches rarely).
        attempts = 3
        for attempt in range(attempts):
            members = self._layout[shard]
            try:
                found = self._read_once(shard, members, keys, primary_only)
            except ShardUnavailableError:
                # A node that left with the switch may be closed already: ask the new ones.
                if self._layout[shard] == members or attempt + 1 == attempts:
                    raise
                continue
            if self._layout[shard] == members:
                break
        return found

    def _read_once(
        self, shard: int, members: tuple[str, ...], keys: list[str], primary_only: bool
    ) -> dict[str, tuple[bytes | None, int]]:
        primary = members[0]
        nodes = self._nodes
        # A node forgotten by a rebalance that ended a moment ago is left out (and the read
        # asked again of the new nodes by _read_shard).
        secondaries = [(name, nodes[name]) for name in members[1:] if name in nodes]
        secondaries += [
            (f"{primary}/read-replica-{number}", node)
            for number, node in enumerate(self._read_replicas.get(primary, ()), 1)
        ]
        order = [(primary, nodes[primary])] if primary in nodes else []
        if primary_only:
            pass
        elif self._read == "replica" and secondaries:
            start = next(self._turn) % len(secondaries)
            order = [secondaries[start], *order, *secondaries[:start], *secondaries[start + 1 :]]
        else:
            order += secondaries
        tried: list[str] = []
        last_error: BaseException | None = None
        stale = False
        for name, node in order:
            tried.append(name)
            try:
                found = (
                    node.read_many(shard, keys)
                    if len(keys) > 1
                    else _read_one(node, shard, keys[0])
                )
            except Exception as error:
                last_error = error
                logger.warning("Node '%s' failed a read of shard %d: %s", name, shard, error)
                continue
            if name == primary:
                return found
            if self._behind(keys, found):
                stale = True
                self._count("stale_replicas_skipped")
                continue
            if last_error is not None:
                self._count("fallback_reads")
            return found
        reason = (
            "its replicas have not caught up with this store's own write and the primary failed"
            if stale
            else "every node that holds it failed"
        )
        raise ShardUnavailableError(shard, tuple(tried), reason) from last_error

    def _behind(self, keys: list[str], found: Mapping[str, tuple[bytes | None, int]]) -> bool:
        if not self._remember_limit:
            return False
        with self._recent_lock:
            for key in keys:
                written = self._recent.get(key)
                if written is not None:
                    have = found.get(key)
                    if have is None or have[1] < written:
                        return True
        return False

    def _call(self, shard: int, name: str, operation: Callable[[ShardBackend], T]) -> T:
        try:
            return operation(self._nodes[name])
        except Exception as error:
            raise ShardUnavailableError(shard, (name,), f"node '{name}' failed: {error}") from error

    # -- layout ------------------------------------------------------------------------------

    def _admit(
        self, name: str, backend: ShardBackend | str | os.PathLike[str], weight: int
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"Node names must be non-empty strings (got {name!r}).")
        node: ShardBackend
        opened = isinstance(backend, (str, os.PathLike))
        if isinstance(backend, (str, os.PathLike)):
            from buttress.backends.sqlite import SQLiteShardBackend

            node = SQLiteShardBackend(backend)
        elif isinstance(backend, ShardBackend):
            node = backend
        else:
            raise TypeError(
                f"The backend of node '{name}' must be a ShardBackend or an SQLite file path "
                f"(got {type(backend).__name__})."
            )
        try:
            self._ring.add_node(name, weight)
        except BaseException:
            if opened:
                _close_all([node])
            raise
        if opened:
            self._opened.append(node)
        self._nodes[name] = node

    def _desired(self) -> list[tuple[str, ...]]:
        count = min(self._members, len(self._ring))
        return [
            tuple(self._ring.get_nodes(f"shard:{shard}", count)) for shard in range(self._shards)
        ]

    def _open_layout(self) -> tuple[list[tuple[str, ...]], int]:
        newest: tuple[int, str, str] | None = None
        for name, node in self._nodes.items():
            try:
                saved = node.load_layout()
            except Exception as error:
                raise ShardUnavailableError(
                    -1, (name,), f"could not read the saved layout from node '{name}': {error}"
                ) from error
            if saved is not None and (newest is None or saved[0] > newest[0]):
                newest = (saved[0], saved[1], name)
        if newest is None:
            layout = self._desired()
            self._save_layout(layout, 1)
            return layout, 1
        epoch, text, source = newest
        saved_layout = json.loads(text)
        if saved_layout["shards"] != self._shards:
            raise ValueError(
                f"shards={self._shards}, but node '{source}' holds a layout of "
                f"{saved_layout['shards']} shards; a store's shard count is fixed for its life."
            )
        layout = [tuple(nodes) for nodes in saved_layout["layout"]]
        missing = sorted({name for nodes in layout for name in nodes} - set(self._nodes))
        if missing:
            raise ValueError(
                f"The saved layout (epoch {epoch}, on node '{source}') places shards on "
                f"{missing}, which nodes does not include; give every node that holds shards."
            )
        return layout, epoch

    def _save_layout(self, layout: list[tuple[str, ...]], epoch: int) -> None:
        text = json.dumps({"shards": self._shards, "layout": [list(nodes) for nodes in layout]})
        saved = 0
        errors: list[str] = []
        for name, node in self._nodes.items():
            try:
                node.save_layout(epoch, text)
                saved += 1
            except Exception as error:
                errors.append(f"'{name}': {error}")
        if errors:
            logger.warning("Layout epoch %d not saved on %s.", epoch, "; ".join(errors))
        if not saved:
            raise RebalanceError(
                f"The layout could not be saved on any node ({'; '.join(errors)})."
            )

    def _plan(self) -> ShardPlan:
        moves = tuple(
            ShardMove(shard, before, after)
            for shard, (before, after) in enumerate(zip(self._layout, self._desired(), strict=True))
            if before != after
        )
        return ShardPlan(moves, self._shards, self._epoch)

    def _move(self, move: ShardMove) -> None:
        shard = move.shard
        if self._layout[shard] != move.before:
            raise RebalanceError(
                f"Shard {shard} is on {list(self._layout[shard])}, not on "
                f"{list(move.before)} as the plan says."
            )
        old_primary = self._nodes[move.before[0]]
        new_primary = move.after[0]
        targets = move.copies_to
        for name in targets:
            self._nodes[name].drop_shard(shard)
        state = _Move(targets)
        with self._frozen_shard(shard):
            self._moving[shard] = state
        switched = False
        try:
            # Everything written from here on reaches the targets too, so one pass suffices.
            after: str | None = None
            while targets:
                page = old_primary.scan(shard, after, _BATCH)
                for name in targets:
                    self._nodes[name].apply(shard, page)
                if len(page) < _BATCH:
                    break
                after = page[-1][0]
            promoted = new_primary != move.before[0] and new_primary in move.before
            if promoted:
                # A replica about to become primary must first have every write it is owed.
                self._send_hints(shard, old_primary, new_primary)
            with self._frozen_shard(shard):
                if state.failure is not None:
                    raise state.failure
                if promoted:
                    self._send_hints(shard, old_primary, new_primary)
                owed: list[Hint] = []
                carried: list[Hint] = []
                if new_primary != move.before[0]:
                    # Frozen, the shard gains no hints while they are read, so one read has all.
                    owed = old_primary.hints(shard, 1 << 62)
                    carried = [hint for hint in owed if hint[0] in move.after[1:]]
                    self._nodes[new_primary].add_hints(shard, carried)
                layout = list(self._layout)
                layout[shard] = move.after
                try:
                    self._save_layout(layout, self._epoch + 1)
                except BaseException:
                    # The shard stays where it was, and its old primary still holds what its
                    # replicas are owed; the copies carried over are withdrawn.
                    with contextlib.suppress(Exception):
                        self._nodes[new_primary].clear_hints(shard, carried)
                    raise
                self._layout = layout
                self._epoch += 1
                del self._moving[shard]
                switched = True
        finally:
            if not switched:
                with self._frozen_shard(shard):
                    self._moving.pop(shard, None)
                for name in targets:
                    with contextlib.suppress(Exception):
                        self._nodes[name].drop_shard(shard)
        self._count("shards_moved")
        if owed and move.before[0] in move.after:
            # The old primary stays as a replica; what it recorded as owed moved with the route.
            with contextlib.suppress(Exception):
                old_primary.clear_hints(shard, owed)
        for name in move.leaves:
            try:
                self._nodes[name].drop_shard(shard)
            except Exception as error:
                # Left behind, the old rows are only dead weight: no route leads to them, and a
                # later copy to this node starts by dropping them.
                logger.warning("Node '%s' kept its old copy of shard %d: %s", name, shard, error)
        if self._replicator is not None:
            self._replicator.wake(shard)

    def _send_hints(self, shard: int, primary: ShardBackend, replica: str) -> None:
        target = self._nodes[replica]
        while owed := primary.hints(shard, _BATCH, replica):
            rows = primary.read_many(shard, [key for _, key, _ in owed])
            target.apply(shard, [(key, *rows[key]) for _, key, _ in owed if key in rows])
            primary.clear_hints(shard, owed)
            self._count("replicated", len(owed))

    def _forget_left_nodes(self) -> None:
        holding = {name for nodes in self._layout for name in nodes}
        for name in sorted(self._leaving - holding):
            self._leaving.discard(name)
            _close_all([self._nodes.pop(name), *self._read_replicas.pop(name, ())])

    def _count(self, name: str, amount: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += amount

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("The store is closed.")

    def _close_backends(self) -> None:
        backends = list(self._nodes.values())
        for replicas in self._read_replicas.values():
            backends.extend(replicas)
        _close_all(backends)


class _Replicator:
    """Sends replicas what their primaries record they are owed, retrying with backoff."""

    def __init__(self, store: ShardedStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._dirty: set[int] = set()
        self._scan = False
        self._retry_at: dict[str, float] = {}
        self._delay: dict[str, float] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="buttress-replicator", daemon=True)
        self._thread.start()

    def wake(self, shard: int) -> None:
        with self._lock:
            self._dirty.add(shard)
        self._wakeup.set()

    def wake_all(self) -> None:
        """Has the replicator ask every node which shards it owes writes for."""
        with self._lock:
            self._scan = True
        self._wakeup.set()

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pause: float | None = None
        while not self._stopping:
            self._wakeup.wait(pause)
            self._wakeup.clear()
            with self._lock:
                dirty, self._dirty = self._dirty, set()
                scan, self._scan = self._scan, False
            if scan:
                dirty |= self._hinted()
            more = blocked = False
            for shard in sorted(dirty):
                if self._stopping:
                    return
                try:
                    status = self._catch_up(shard)
                except Exception:
                    logger.exception("The replicator failed on shard %d.", shard)
                    status = _BLOCKED
                if status != _DONE:
                    with self._lock:
                        self._dirty.add(shard)
                more |= status == _MORE
                blocked |= status == _BLOCKED
            pause = 0.0 if more else self._next_retry() if blocked else None

    def _hinted(self) -> set[int]:
        store = self._store
        shards: set[int] = set()
        for name, node in list(store._nodes.items()):
            try:
                hinted = node.hinted_shards()
            except Exception as error:
                self._failed(name, error)
                continue
            shards.update(shard for shard in hinted if shard < store.shards)
        return shards

    def _catch_up(self, shard: int) -> int:
        """Sends one batch of the shard's owed writes. It holds the shard open as a write
        does, so a move cannot switch the shard (and drop it from a node it leaves) while
        this copies to that node."""
        store = self._store
        members, _ = store._enter(shard)
        try:
            return self._catch_up_members(shard, members)
        finally:
            store._leave(shard)

    def _catch_up_members(self, shard: int, members: tuple[str, ...]) -> int:
        store = self._store
        primary_name, replicas = members[0], members[1:]
        if self._backing_off(primary_name) or (
            replicas and all(self._backing_off(name) for name in replicas)
        ):
            return _BLOCKED
        primary = store._nodes[primary_name]
        try:
            owed = primary.hints(shard, _BATCH)
            if not owed:
                return _DONE
            rows = primary.read_many(shard, sorted({key for _, key, _ in owed}))
        except Exception as error:
            self._failed(primary_name, error)
            return _BLOCKED
        self._succeeded(primary_name)
        by_replica: dict[str, list[Hint]] = {}
        for hint in owed:
            by_replica.setdefault(hint[0], []).append(hint)
        status = _MORE if len(owed) == _BATCH else _DONE
        for name, hints in by_replica.items():
            if name not in replicas:
                # The replica no longer holds this shard; what it was owed is moot.
                with contextlib.suppress(Exception):
                    primary.clear_hints(shard, hints)
                continue
            if self._backing_off(name):
                status = _BLOCKED
                continue
            try:
                store._nodes[name].apply(
                    shard, [(key, *rows[key]) for _, key, _ in hints if key in rows]
                )
                primary.clear_hints(shard, hints)
            except Exception as error:
                store._count("replication_failures")
                self._failed(name, error)
                status = _BLOCKED
                continue
            self._succeeded(name)
            store._count("replicated", len(hints))
        return status

    def _backing_off(self, name: str) -> bool:
        return self._retry_at.get(name, 0.0) > time.monotonic()

    def _next_retry(self) -> float:
        now = time.monotonic()
        # Entries in the past belong to nodes that recovered or left: no reason to hurry.
        future = [when for when in self._retry_at.values() if when > now]
        return min(future) - now if future else self._store._backoff[0]

    def _failed(self, name: str, error: BaseException) -> None:
        first, longest = self._store._backoff
        already = name in self._delay
        delay = min(longest, self._delay.get(name, first / 2) * 2)
        self._delay[name] = delay
        self._retry_at[name] = time.monotonic() + delay
        # One warning when a node starts failing, not one per retry.
        logger.log(
            logging.DEBUG if already else logging.WARNING,
            "Replication via node '%s' failed; retrying in %.2f s: %s",
            name,
            delay,
            error,
        )

    def _succeeded(self, name: str) -> None:
        if self._delay.pop(name, None) is not None:
            logger.warning("Replication via node '%s' works again.", name)
        self._retry_at.pop(name, None)


# What one catch-up pass left: nothing, more to send now, or writes waiting for a retry.
_DONE, _MORE, _BLOCKED = 0, 1, 2


def _close_all(backends: Sequence[ShardBackend]) -> None:
    for backend in backends:
        try:
            backend.close()
        except Exception:
            logger.warning("Backend %r failed to close.", backend, exc_info=True)


def _read_one(node: ShardBackend, shard: int, key: str) -> dict[str, tuple[bytes | None, int]]:
    found = node.read(shard, key)
    return {} if found is None else {key: found}


def _now() -> int:
    return time.time_ns() // 1000


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (got {type(key).__name__}).")
    if "\x00" in key:
        raise ValueError("key must not contain NUL characters: PostgreSQL text cannot hold them.")


def _check_value(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"value must be bytes (got {type(value).__name__}); encode it first.")


def _check_count(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int (got {type(value).__name__}).")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high} (got {value}).")
