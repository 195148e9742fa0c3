"""The real connection pool against the reference model in ``pool_model.py``.

A hypothesis state machine draws a small pool (1 to 4 connections) on a manual clock, then
checks out without ever waiting (``acquire(timeout=0)`` and ``connection(timeout=0)``),
returns connections (plainly, broken, or from a ``with`` block that raised), kills connections
so their check fails, poisons their reset, moves the clock past lifetimes and idle limits and
runs housekeeping, resizes, closes, and returns connections the pool does not lend. After every
step the pool's stats, the connections it closed (and in which order), and its check and reset
calls agree with the model, and no connection is held twice.

The pool under test runs housekeeping only when told (``maintain()``): the background thread
would close connections at moments the model cannot know.
"""

from __future__ import annotations

import pytest
from buttress import ConnectionPool, ManualClock, PoolClosedError, PoolLease, PoolTimeoutError
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pool_model import NS_PER_S, Closed, Config, Lent, PoolModel, TimedOut


class Fatal(Exception):
    """An error that breaks the connection it was raised with (is_broken says so)."""


class Minor(Exception):
    """An error that leaves the connection usable, but suspect."""


class Conn:
    """A fake connection that records what the pool did to it."""

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.dead: str | None = None  # None, "false" (check returns False) or "raise"
        self.poisoned = False
        self.closes = 0

    def __repr__(self) -> str:
        return f"Conn({self.ident})"


class ManualPool(ConnectionPool[Conn]):
    """A pool whose housekeeping runs only through maintain(), never in the background."""

    def _ensure_housekeeper(self) -> None:
        pass


@st.composite
def configs(draw: st.DrawFn) -> Config:
    def seconds(values: list[float]) -> st.SearchStrategy[int | None]:
        return st.none() | st.sampled_from([int(value * NS_PER_S) for value in values])

    return Config(
        max_size=draw(st.integers(1, 4)),
        max_lifetime_ns=draw(seconds([4.5, 5.0, 30.0])),
        max_idle_ns=draw(seconds([3.0, 20.0])),
        check_interval_ns=draw(st.sampled_from([0, NS_PER_S, 10 * NS_PER_S])),
    )


# Exact in binary, so the clock moves by whole nanoseconds the model can add up.
ADVANCES = st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.5, 5.0, 10.0, 20.0, 30.0])


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.conns: dict[int, Conn] = {}
        self.held: list[tuple[Conn, PoolLease[Conn] | None]] = []
        self.closed_log: list[int] = []
        self.checks = 0
        self.resets = 0
        self.now_ns = 0
        self.ready = False

    # -- callbacks of the real pool --------------------------------------------------------------

    def _create(self) -> Conn:
        conn = Conn(len(self.conns) + 1)
        self.conns[conn.ident] = conn
        return conn

    def _check(self, conn: Conn) -> bool:
        self.checks += 1
        if conn.dead == "raise":
            raise ConnectionError("gone")
        return conn.dead is None

    def _reset(self, conn: Conn) -> None:
        self.resets += 1
        if conn.poisoned:
            raise ConnectionError("reset failed")

    def _close(self, conn: Conn) -> None:
        conn.closes += 1
        self.closed_log.append(conn.ident)

    @staticmethod
    def _is_broken(conn: Conn, error: BaseException) -> bool:
        return isinstance(error, Fatal)

    @initialize(config=configs())
    def build(self, config: Config) -> None:
        self.clock = ManualClock()
        self.pool = ManualPool(
            self._create,
            close=self._close,
            check=self._check,
            reset=self._reset,
            is_broken=self._is_broken,
            name="model",
            clock=self.clock,
            **config.pool_kwargs(),  # type: ignore[arg-type]
        )
        self.model = PoolModel(config)
        self.ready = True

    def teardown(self) -> None:
        if self.ready:
            self.pool.close(timeout=0)

    # -- rules -----------------------------------------------------------------------------------

    @rule(through_lease=st.booleans())
    def acquire(self, through_lease: bool) -> None:
        expected = self.model.acquire(self.now_ns)
        lease = self.pool.connection(timeout=0) if through_lease else None
        enter = self.pool.acquire if lease is None else lease.__enter__
        if isinstance(expected, TimedOut):
            with pytest.raises(PoolTimeoutError) as timed_out:
                enter()
            assert (timed_out.value.name, timed_out.value.timeout) == ("model", 0.0)
            return
        if isinstance(expected, Closed):
            with pytest.raises(PoolClosedError) as closed:
                enter()
            assert closed.value.name == "model"
            return
        conn = enter()
        assert isinstance(expected, Lent), f"lent {conn!r}; the model says {expected}"
        assert conn.ident == expected.ident, "not the connection the model lends (LIFO)"
        assert all(conn is not other for other, _ in self.held), f"{conn!r} lent twice"
        assert conn.closes == 0
        self.held.append((conn, lease))

    def _take(self, data: st.DataObject) -> tuple[Conn, PoolLease[Conn] | None]:
        index = data.draw(st.integers(0, len(self.held) - 1), label="held")
        return self.held.pop(index)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), broken=st.booleans())
    def release(self, data: st.DataObject, broken: bool) -> None:
        conn, lease = self._take(data)
        if lease is None:
            self.pool.release(conn, broken=broken)
            self.model.release(conn.ident, self.now_ns, broken=broken)
        else:
            lease.__exit__(None, None, None)
            self.model.release(conn.ident, self.now_ns)

    @precondition(lambda self: any(lease is not None for _, lease in self.held))
    @rule(data=st.data(), error=st.sampled_from([Fatal, Minor]))
    def fail_inside_lease(self, data: st.DataObject, error: type[Exception]) -> None:
        leases = [(conn, lease) for conn, lease in self.held if lease is not None]
        conn, lease = data.draw(st.sampled_from(leases), label="lease")
        self.held.remove((conn, lease))
        assert lease is not None
        raised = error("inside the block")
        assert lease.__exit__(error, raised, None) is False  # the error is not swallowed
        self.model.release(conn.ident, self.now_ns, broken=error is Fatal, suspect=True)

    @precondition(lambda self: self.ready and self.model.live > 0)
    @rule(data=st.data(), how=st.sampled_from(["false", "raise"]))
    def kill(self, data: st.DataObject, how: str) -> None:
        """Makes an open connection (idle or borrowed) fail its next check."""
        open_idents = [ident for ident in self.conns if self.model.is_open(ident)]
        ident = data.draw(st.sampled_from(open_idents), label="connection")
        self.conns[ident].dead = how
        self.model.entry(ident).dead = True

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def poison_reset(self, data: st.DataObject) -> None:
        conn, _ = data.draw(st.sampled_from(self.held), label="held")
        conn.poisoned = True
        self.model.entry(conn.ident).poisoned = True

    @precondition(lambda self: self.ready)
    @rule(seconds=ADVANCES)
    def advance_and_maintain(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.now_ns += int(seconds * NS_PER_S)
        assert self.clock.now() == self.now_ns / NS_PER_S
        self.pool.maintain()
        self.model.maintain(self.now_ns)

    @precondition(lambda self: self.ready)
    @rule(max_size=st.integers(1, 4))
    def resize(self, max_size: int) -> None:
        if self.model.resize(max_size):
            self.pool.resize(max_size=max_size)
        else:
            with pytest.raises(PoolClosedError):
                self.pool.resize(max_size=max_size)

    @precondition(lambda self: self.ready)
    @rule(roll=st.integers(0, 7))
    def close(self, roll: int) -> None:
        if roll:  # one time in eight: a closed pool ends the interesting part of a run
            return
        assert self.pool.close(timeout=0) is self.model.close()
        assert self.pool.closed

    @precondition(lambda self: self.ready and len(self.conns) > len(self.held))
    @rule(data=st.data())
    def release_not_lent(self, data: st.DataObject) -> None:
        """Returning an idle or closed connection is refused and changes nothing."""
        held = {conn.ident for conn, _ in self.held}
        ident = data.draw(st.sampled_from(sorted(set(self.conns) - held)), label="connection")
        with pytest.raises(ValueError, match="conn"):
            self.pool.release(self.conns[ident])

    # -- invariants ------------------------------------------------------------------------------

    @precondition(lambda self: self.ready)
    @invariant()
    def agrees_with_model(self) -> None:
        stats = self.pool.stats()
        expected = self.model.stats()
        assert {name: getattr(stats, name) for name in expected} == expected
        assert self.closed_log == self.model.retired
        assert (self.checks, self.resets) == (self.model.checks, self.model.resets)

    @precondition(lambda self: self.ready)
    @invariant()
    def connections_are_accounted_for(self) -> None:
        stats = self.pool.stats()
        assert stats.created - stats.closed == stats.size
        held = [conn.ident for conn, _ in self.held]
        assert len(held) == len(set(held)) == stats.in_use
        # Over max_size only while borrowed connections of a shrunk pool are still out.
        assert stats.size <= stats.max_size or stats.idle == 0
        for ident, conn in self.conns.items():
            assert conn.closes == (0 if self.model.is_open(ident) else 1), conn


TestPoolMachine = PoolMachine.TestCase


def test_model_lends_newest_idle_first_and_closes_oldest_first() -> None:
    """The model itself, on a plain run the machine may take a while to find."""
    config = Config(max_size=3, max_lifetime_ns=None, max_idle_ns=NS_PER_S, check_interval_ns=0)
    model = PoolModel(config)
    lent = [model.acquire(0) for _ in range(4)]
    assert lent == [Lent(1, True), Lent(2, True), Lent(3, True), TimedOut()]
    for ident in (1, 2, 3):
        model.release(ident, 0)
    assert model.acquire(0) == Lent(3, False)
    model.maintain(NS_PER_S)
    assert model.retired == [1, 2]
    assert model.stats()["size"] == 1
