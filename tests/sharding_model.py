"""A plain reference model of a ``ShardedStore``, for the stateful test in
``test_sharding_model.py``.

The model is a dict of what the store holds plus what the test knows of its nodes: which are
down. From those and a key's nodes (primary first) it says what a write must do:

- the primary is down: ``ShardUnavailableError``, and nothing changes;
- a delete of a key that is not there: ``False``, nothing is written, nothing replicated;
- ``replication="sync"`` with fewer nodes up than the write quorum: ``QuorumNotReachedError``,
  yet the write is on the primary (and owed to the replicas), so the data changes;
- otherwise the write succeeds.

Reads have no exact answer while a primary is down (a replica may or may not have caught up),
so the model only says which answers are allowed: the current value, or, when the primary is
down, ``ShardUnavailableError``. A replica that has not caught up with one of the store's own
writes must never answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["ok", "unavailable", "quorum", "absent"]


@dataclass(frozen=True)
class Config:
    replicas: int
    replication: Literal["sync", "queued"] | None
    read: Literal["primary", "replica"]
    write_quorum: int | None

    @property
    def members(self) -> int:
        return 1 + self.replicas

    @property
    def quorum(self) -> int:
        """The quorum the store uses: the one given, or a majority of a shard's nodes."""
        if self.write_quorum is not None:
            return self.write_quorum
        return self.members // 2 + 1

    def store_kwargs(self) -> dict[str, object]:
        kwargs = {
            name: value
            for name, value in dataclasses.asdict(self).items()
            if value is not None and name != "write_quorum"
        }
        if self.write_quorum is not None:
            kwargs["write_quorum"] = self.write_quorum
        return kwargs


@dataclass(frozen=True)
class Expected:
    """What a write must do: its outcome and, for ``quorum``, the error's details."""

    outcome: Outcome
    acknowledged: int = 0
    failed: tuple[str, ...] = ()


@dataclass
class StoreModel:
    config: Config
    data: dict[str, bytes] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    # The last version put() returned per key: versions only grow.
    versions: dict[str, int] = field(default_factory=dict)

    def _write(self, members: Sequence[str], *, writes: bool) -> Expected:
        primary, replicas = members[0], tuple(members[1:])
        if primary in self.down:
            return Expected("unavailable")
        if not writes:
            return Expected("absent")
        if self.config.replication == "sync" and replicas:
            failed = tuple(name for name in replicas if name in self.down)
            acknowledged = 1 + len(replicas) - len(failed)
            if acknowledged < self.config.quorum:
                return Expected("quorum", acknowledged, failed)
        return Expected("ok")

    def put(self, key: str, value: bytes, members: Sequence[str]) -> Expected:
        expected = self._write(members, writes=True)
        if expected.outcome != "unavailable":
            self.data[key] = value
        return expected

    def delete(self, key: str, members: Sequence[str]) -> Expected:
        expected = self._write(members, writes=key in self.data)
        if expected.outcome not in ("unavailable", "absent"):
            del self.data[key]
        return expected

    def readable(self, members: Sequence[str]) -> bool:
        """Whether a read must answer (its primary is up); else it may also fail."""
        return members[0] not in self.down

    def all_up(self) -> bool:
        return not self.down
