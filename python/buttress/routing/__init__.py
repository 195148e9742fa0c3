"""Routing: the consistent-hash ring (Rust core) that places keys on nodes, the plan of what a
change to the ring would move, the sharded store built on it, and the load balancer
(``buttress.routing.http`` has its httpx transports).

``HashRing`` places keys with ketama (exactly as libketama and uhashring do, so a user of either
can switch without moving data), rendezvous hashing or jump consistent hash.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

from buttress._core import HashRing
from buttress.routing.balancer import Algorithm, BackendStatus, LoadBalancer, Pick
from buttress.routing.sharding import (
    ShardBackend,
    ShardedStore,
    ShardMove,
    ShardPlan,
    ShardStoreStats,
)

__all__ = [
    "Algorithm",
    "BackendStatus",
    "HashRing",
    "LoadBalancer",
    "Pick",
    "RebalancePlan",
    "ShardBackend",
    "ShardMove",
    "ShardPlan",
    "ShardStoreStats",
    "ShardedStore",
    "rebalance_plan",
]

Key = str | bytes | int


@dataclasses.dataclass(frozen=True)
class RebalancePlan:
    """Which keys a change to a ring moves, grouped by the node they leave and the one they join.

    >>> before = HashRing(["a", "b", "c"], algorithm="rendezvous")
    >>> after = before.copy()
    >>> after.remove_node("c")
    >>> plan = rebalance_plan(before, after, [f"user:{n}" for n in range(1000)])
    >>> {source for source, _ in plan.moves}
    {'c'}
    >>> plan.moved == before.distribution(f"user:{n}" for n in range(1000))["c"]
    True
    """

    moves: dict[tuple[str, str], list[Key]]
    total: int

    @property
    def moved(self) -> int:
        """How many of the keys change node."""
        return sum(len(keys) for keys in self.moves.values())

    @property
    def fraction(self) -> float:
        """The share of the keys that change node (0 when there were no keys)."""
        return self.moved / self.total if self.total else 0.0


def rebalance_plan(before: HashRing, after: HashRing, keys: Iterable[Key]) -> RebalancePlan:
    """Compares where ``keys`` go on two rings (say, a ring and a ``copy()`` with a node added)."""
    keys = list(keys)
    moves: dict[tuple[str, str], list[Key]] = defaultdict(list)
    old = before.get_node_many(keys)
    new = after.get_node_many(keys)
    for key, source, target in zip(keys, old, new, strict=True):
        if source != target:
            moves[(source, target)].append(key)
    return RebalancePlan(dict(moves), len(keys))
