"""Helpers for the sharded-store tests: a backend wrapper that fails on demand, and checks that
every node of a store holds what the layout says it should."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from buttress import ShardedStore
from buttress.routing.sharding import ShardBackend


class NodeDown(ConnectionError):
    """What a FlakyBackend raises while it is 'down'."""


class FlakyBackend:
    """Wraps a ShardBackend; while ``down`` (or for the methods in ``failing``) every call
    raises ``NodeDown``. ``calls`` counts calls per method name."""

    def __init__(self, inner: ShardBackend) -> None:
        self.inner = inner
        self.down = False
        self.failing: set[str] = set()
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] = self.calls.get(name, 0) + 1
            if name != "close" and (self.down or name in self.failing):
                raise NodeDown(f"node is down ({name})")
            return method(*args, **kwargs)

        return call

    # The protocol is checked with isinstance, which looks at the class, so spell it out.
    def write(self, *args: Any) -> Any:
        return self.__getattr__("write")(*args)

    def read(self, *args: Any) -> Any:
        return self.__getattr__("read")(*args)

    def read_many(self, *args: Any) -> Any:
        return self.__getattr__("read_many")(*args)

    def scan(self, *args: Any) -> Any:
        return self.__getattr__("scan")(*args)

    def counts(self) -> Any:
        return self.__getattr__("counts")()

    def apply(self, *args: Any) -> Any:
        return self.__getattr__("apply")(*args)

    def drop_shard(self, *args: Any) -> Any:
        return self.__getattr__("drop_shard")(*args)

    def hints(self, *args: Any) -> Any:
        return self.__getattr__("hints")(*args)

    def hinted_shards(self) -> Any:
        return self.__getattr__("hinted_shards")()

    def add_hints(self, *args: Any) -> Any:
        return self.__getattr__("add_hints")(*args)

    def clear_hints(self, *args: Any) -> Any:
        return self.__getattr__("clear_hints")(*args)

    def load_layout(self) -> Any:
        return self.__getattr__("load_layout")()

    def save_layout(self, *args: Any) -> Any:
        return self.__getattr__("save_layout")(*args)

    def close(self) -> Any:
        return self.inner.close()


def rows_of(node: ShardBackend, shard: int) -> list[tuple[str, bytes | None, int]]:
    """Every row (tombstones too) a node holds for a shard."""
    rows: list[tuple[str, bytes | None, int]] = []
    after = None
    while page := node.scan(shard, after, 1000):
        rows.extend(page)
        after = page[-1][0]
    return rows


def check_placement(store: ShardedStore, *, replicas_current: bool = True) -> None:
    """Every shard's rows are on its nodes and nowhere else; with ``replicas_current``, each
    replica holds exactly what its primary holds."""
    layout = store.layout
    for shard, members in layout.items():
        primary = rows_of(store.nodes[members[0]], shard)
        if replicas_current:
            for name in members[1:]:
                assert rows_of(store.nodes[name], shard) == primary, (shard, name)
        for name, node in store.nodes.items():
            if name not in members:
                assert not node.scan(shard, None, 1), f"node {name} still holds shard {shard}"


def contents(store: ShardedStore) -> dict[str, bytes]:
    """What the store holds, read from the primaries."""
    return dict(store.items())


def wrap(nodes: dict[str, ShardBackend]) -> dict[str, FlakyBackend]:
    return {name: FlakyBackend(node) for name, node in nodes.items()}


__all__: Sequence[str] = [
    "FlakyBackend",
    "NodeDown",
    "check_placement",
    "contents",
    "rows_of",
    "wrap",
]
