"""Helpers shared by the test modules."""

from __future__ import annotations

import itertools
from typing import Any

from buttress import Bulkhead, CircuitBreaker, ManualClock


def make_breaker(clock: ManualClock, **options: Any) -> CircuitBreaker:
    """A breaker on `clock` that trips on the first failure and waits 10 s, unless told else."""
    options.setdefault("failure_threshold", 1)
    options.setdefault("reset_timeout", 10.0)
    return CircuitBreaker("svc", clock=clock, **options)


def bulkhead_stats(bulkhead: Bulkhead) -> tuple[int, int, int, int, int, int]:
    """Every field of `bulkhead.stats()`, to compare snapshots in one assertion."""
    stats = bulkhead.stats()
    return (
        stats.active,
        stats.waiting,
        stats.max_observed,
        stats.accepted,
        stats.rejected,
        stats.timed_out,
    )


class FakeConnection:
    """A fake pooled connection that records what the pool did to it (and who holds it, for
    the stress tests). ``alive = False`` makes `check_connection` fail."""

    _numbers = itertools.count(1)

    def __init__(self) -> None:
        self.number = next(self._numbers)
        self.closes = 0
        self.checks = 0
        self.resets = 0
        self.uses = 0
        self.holder: object | None = None
        self.alive = True

    def close(self) -> None:
        self.closes += 1

    def __repr__(self) -> str:
        return f"Conn({self.number})"


def check_connection(conn: FakeConnection) -> bool:
    """A pool `check` for fake connections: counts the check, passes while it is alive."""
    conn.checks += 1
    return conn.alive
