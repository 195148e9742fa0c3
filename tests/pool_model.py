"""A pure-Python reference model of the connection pool, for callers that never wait.

Written from the pool's documented semantics so that the stateful test in
``test_pool_model.py`` can drive the real pool and this model side by side. It covers what a
single caller with ``timeout=0`` can see: checkout (newest idle first, expired and idle-too-long
connections skipped and closed, checks when due, a new connection when a slot is free),
return (reset, broken, suspect after a failed ``with`` block, closed when expired, when the pool
shrank below its size, or when the pool is closed), housekeeping (oldest idle first), resize
and close. ``min_size`` stays 0 and there is no lifetime jitter, so every outcome is exact.

Time is kept as integer nanoseconds; the model has no clock of its own and is told the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class Config:
    max_size: int
    max_lifetime_ns: int | None
    max_idle_ns: int | None
    check_interval_ns: int

    def pool_kwargs(self) -> dict[str, object]:
        """The keyword arguments that build the same real pool (without callbacks or clock)."""
        return {
            "max_size": self.max_size,
            "max_lifetime": _seconds(self.max_lifetime_ns),
            "lifetime_jitter": 0.0,
            "max_idle": _seconds(self.max_idle_ns),
            "check_interval": self.check_interval_ns / NS_PER_S,
            "timeout": 0,
        }


def _seconds(nanos: int | None) -> float | None:
    return None if nanos is None else nanos / NS_PER_S


@dataclass
class Entry:
    """What the model knows of one connection. ``dead`` makes its check fail, ``poisoned``
    its reset; both are set by the test on the real connection and the model alike."""

    ident: int
    expires_at: int
    last_used: int
    suspect: bool = False
    dead: bool = False
    poisoned: bool = False


@dataclass(frozen=True)
class Lent:
    ident: int
    created: bool


@dataclass(frozen=True)
class TimedOut:
    pass


@dataclass(frozen=True)
class Closed:
    pass


Outcome = Lent | TimedOut | Closed


@dataclass
class PoolModel:
    config: Config
    max_size: int = 0
    idle: list[Entry] = field(default_factory=list)  # oldest first: the top is the end
    borrowed: dict[int, Entry] = field(default_factory=dict)
    live: int = 0
    closed_pool: bool = False
    next_ident: int = 1
    # Every connection the pool closed, in the order it closed them.
    retired: list[int] = field(default_factory=list)
    requests: int = 0
    created: int = 0
    closed: int = 0
    broken: int = 0
    timeouts: int = 0
    checks: int = 0
    resets: int = 0

    def __post_init__(self) -> None:
        self.max_size = self.config.max_size

    # -- helpers ---------------------------------------------------------------------------------

    def _retire(self, entry: Entry) -> None:
        self.retired.append(entry.ident)
        self.live -= 1
        self.closed += 1

    def _stale(self, entry: Entry, now: int) -> bool:
        """Past its lifetime, or idle too long while the pool is above min_size (0)."""
        if entry.expires_at <= now:
            return True
        max_idle = self.config.max_idle_ns
        return max_idle is not None and self.live > 0 and now - entry.last_used >= max_idle

    def entry(self, ident: int) -> Entry:
        if ident in self.borrowed:
            return self.borrowed[ident]
        return next(entry for entry in self.idle if entry.ident == ident)

    def is_open(self, ident: int) -> bool:
        return ident in self.borrowed or any(entry.ident == ident for entry in self.idle)

    # -- operations ------------------------------------------------------------------------------

    def acquire(self, now: int) -> Outcome:
        """A checkout that never waits."""
        if self.closed_pool:
            return Closed()
        self.requests += 1
        while True:
            entry = None
            while self.idle:
                candidate = self.idle.pop()
                if self._stale(candidate, now):
                    self._retire(candidate)
                    continue
                entry = candidate
                break
            if entry is not None:
                due = entry.suspect or now - entry.last_used >= self.config.check_interval_ns
                if due:
                    self.checks += 1
                    if entry.dead:
                        # Closed as broken; the caller keeps its turn and tries the next.
                        self.broken += 1
                        self._retire(entry)
                        continue
                self.borrowed[entry.ident] = entry
                return Lent(entry.ident, created=False)
            if self.live < self.max_size:
                lifetime = self.config.max_lifetime_ns
                entry = Entry(
                    ident=self.next_ident,
                    expires_at=2**64 - 1 if lifetime is None else now + lifetime,
                    last_used=now,
                )
                self.next_ident += 1
                self.live += 1
                self.created += 1
                self.borrowed[entry.ident] = entry
                return Lent(entry.ident, created=True)
            self.timeouts += 1
            return TimedOut()

    def release(self, ident: int, now: int, *, broken: bool = False, suspect: bool = False) -> None:
        """Returns a borrowed connection: ``broken`` closes it, ``suspect`` (a ``with`` block
        that raised, not broken) has it checked on its next checkout."""
        entry = self.borrowed.pop(ident)
        if not broken:
            self.resets += 1
            broken = entry.poisoned
        if broken:
            self.broken += 1
            self._retire(entry)
            return
        if self.closed_pool or entry.expires_at <= now or self.live > self.max_size:
            self._retire(entry)
            return
        entry.last_used = now
        entry.suspect = suspect
        self.idle.append(entry)

    def maintain(self, now: int) -> None:
        """One round of housekeeping: stale idle connections close, oldest first."""
        kept = []
        for entry in self.idle:
            if self._stale(entry, now):
                self._retire(entry)
            else:
                kept.append(entry)
        self.idle = kept

    def resize(self, max_size: int) -> bool:
        """False when the pool is closed (the real one raises PoolClosedError)."""
        if self.closed_pool:
            return False
        self.max_size = max_size
        while self.live > max_size and self.idle:
            self._retire(self.idle.pop(0))
        return True

    def close(self) -> bool:
        """Closes idle connections, newest first; True when nothing is borrowed."""
        if not self.closed_pool:
            self.closed_pool = True
            while self.idle:
                self._retire(self.idle.pop())
        return self.live == 0

    def stats(self) -> dict[str, int]:
        return {
            "max_size": self.max_size,
            "min_size": 0,
            "size": self.live,
            "idle": len(self.idle),
            "in_use": self.live - len(self.idle),
            "waiting": 0,
            "requests": self.requests,
            "created": self.created,
            "closed": self.closed,
            "broken": self.broken,
            "create_failures": 0,
            "timeouts": self.timeouts,
            "rejected": 0,
            "waits": 0,
            "leaks": 0,
        }
