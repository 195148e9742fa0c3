"""A pure-Python reference model of the circuit breaker's state machine.

Written from the breaker's documented semantics, not from the Rust core, so that the stateful
test in ``test_breaker_model.py`` can drive both side by side and catch either one drifting.

The model keeps time as integer nanoseconds and takes the current time as an argument on every
call (it has no clock of its own); its configuration is given in whole milliseconds, which the
test converts to the float seconds the real breaker takes.

Vocabulary:

- A *period* is the stretch between two changes of state (``reset()`` of a closed breaker also
  starts a new one). A permit remembers the period that admitted it; only a permit of the
  current period may change the state, the window, the failure run or the half-open slots.
- *trips* counts the trips to open since the breaker last closed from half-open (or was reset);
  it drives the backoff of the open wait.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
MAX_WAIT_NS = 24 * 24 * 3600 * NS_PER_S  # the longest default cap: 24 days

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
FORCED_OPEN = "forced_open"
DISABLED = "disabled"

SUCCESS = "success"
FAILURE = "failure"
IGNORED = "ignored"


@dataclass(frozen=True)
class Config:
    """A breaker configuration, durations in whole milliseconds."""

    failure_threshold: int | None = 5
    failure_rate_threshold: float | None = None
    slow_call_rate_threshold: float | None = None
    slow_call_duration_ms: int = 60_000
    window_type: str = "count"
    window_size: int = 100
    minimum_calls: int = 10
    reset_timeout_ms: int = 30_000
    backoff_multiplier: float = 1.0
    max_reset_timeout_ms: int | None = None
    half_open_max_calls: int = 1
    success_threshold: int = 1
    record_exceptions: tuple[type[BaseException], ...] = (Exception,)
    ignore_exceptions: tuple[type[BaseException], ...] = ()

    def breaker_kwargs(self) -> dict[str, object]:
        """The keyword arguments that build the same real breaker (without its clock)."""
        return {
            "failure_threshold": self.failure_threshold,
            "failure_rate_threshold": self.failure_rate_threshold,
            "slow_call_rate_threshold": self.slow_call_rate_threshold,
            "slow_call_duration": self.slow_call_duration_ms / 1000,
            "window_type": self.window_type,
            "window_size": self.window_size,
            "minimum_calls": self.minimum_calls,
            "reset_timeout": self.reset_timeout_ms / 1000,
            "backoff_multiplier": self.backoff_multiplier,
            "max_reset_timeout": (
                None if self.max_reset_timeout_ms is None else self.max_reset_timeout_ms / 1000
            ),
            "jitter": 0.0,
            "half_open_max_calls": self.half_open_max_calls,
            "success_threshold": self.success_threshold,
            "record_exceptions": self.record_exceptions,
            "ignore_exceptions": self.ignore_exceptions or None,
        }

    @property
    def uses_window(self) -> bool:
        return self.failure_rate_threshold is not None or self.slow_call_rate_threshold is not None

    @property
    def tracks_slow_calls(self) -> bool:
        return self.slow_call_rate_threshold is not None

    @property
    def effective_minimum_calls(self) -> int:
        if self.window_type == "count":
            return min(self.minimum_calls, self.window_size)
        return self.minimum_calls

    @property
    def max_wait_ns(self) -> int:
        """The cap on the open wait: the given one, or the documented default."""
        reset_ns = self.reset_timeout_ms * NS_PER_MS
        if self.max_reset_timeout_ms is not None:
            return self.max_reset_timeout_ms * NS_PER_MS
        if self.backoff_multiplier == 1:
            return reset_ns
        return min(10 * reset_ns, MAX_WAIT_NS)


@dataclass
class Permit:
    """A model permit: when and in which period it was admitted."""

    admitted_ns: int
    period: int
    state: str  # the state that admitted it, for the reader's benefit
    recorded: bool = False


@dataclass(frozen=True)
class WindowEntry:
    second: int  # floor(record time / 1 s), used by time windows
    failed: bool
    slow: bool


@dataclass
class Rejection:
    """A refused admission; ``retry_after`` in seconds, None while forced open."""

    retry_after: float | None


@dataclass
class BreakerModel:
    config: Config
    state: str = CLOSED
    period: int = 0
    trips: int = 0
    deadline_ms: int = 0  # while open: the first whole millisecond that admits a trial call
    run: int = 0  # consecutive failures in the current closed period
    window: deque[WindowEntry] = field(default_factory=deque)
    half_open_in_flight: int = 0
    half_open_successes: int = 0
    # Lifetime counts.
    successes: int = 0
    failures: int = 0
    ignored: int = 0
    slow_calls: int = 0
    rejected: int = 0
    transitions: list[tuple[str, str]] = field(default_factory=list)

    # -- periods and transitions -------------------------------------------------------------

    def _new_period(self) -> None:
        # Trial calls still running keep their half-open slots across periods: they are
        # inside the dependency too. Everything else starts afresh.
        self.period += 1
        self.run = 0
        self.window = deque()
        self.half_open_successes = 0

    def _transition(self, new: str) -> None:
        self.transitions.append((self.state, new))
        self.state = new
        self._new_period()

    def _trip(self, now_ns: int) -> None:
        self.trips += 1
        cfg = self.config
        wait = Fraction(cfg.reset_timeout_ms * NS_PER_MS) * Fraction(cfg.backoff_multiplier) ** (
            self.trips - 1
        )
        wait = max(min(wait, Fraction(cfg.max_wait_ns)), Fraction(NS_PER_MS))
        self.deadline_ms = math.ceil((now_ns + wait) / NS_PER_MS)
        self._transition(OPEN)

    def _open_expired(self, now_ns: int) -> bool:
        return self.state == OPEN and now_ns // NS_PER_MS >= self.deadline_ms

    def _refresh(self, now_ns: int) -> None:
        """The lazy open -> half_open transition, done on admission and on reading the state."""
        if self._open_expired(now_ns):
            self._transition(HALF_OPEN)

    # -- the public operations ---------------------------------------------------------------

    def read_state(self, now_ns: int) -> str:
        """What ``breaker.state`` returns (it may move an expired open breaker to half_open)."""
        self._refresh(now_ns)
        return self.state

    def acquire(self, now_ns: int) -> Permit | Rejection:
        self._refresh(now_ns)
        if self.state in (CLOSED, DISABLED):
            return Permit(now_ns, self.period, self.state)
        if self.state == HALF_OPEN:
            if self.half_open_in_flight < self.config.half_open_max_calls:
                self.half_open_in_flight += 1
                return Permit(now_ns, self.period, self.state)
            return self._reject(0.0)
        if self.state == FORCED_OPEN:
            return self._reject(None)
        assert self.state == OPEN
        return self._reject((self.deadline_ms * NS_PER_MS - now_ns) / NS_PER_S)

    def _reject(self, retry_after: float | None) -> Rejection:
        self.rejected += 1
        return Rejection(retry_after)

    def classify(self, error: BaseException | None) -> str:
        """The outcome of a call that raised ``error`` (None: it returned)."""
        if error is None:
            return SUCCESS
        if not isinstance(error, Exception):
            return IGNORED
        if isinstance(error, self.config.ignore_exceptions):
            return IGNORED
        if isinstance(error, self.config.record_exceptions):
            return FAILURE
        return SUCCESS

    def record(self, permit: Permit, outcome: str, now_ns: int) -> None:
        assert not permit.recorded, "a permit records one outcome"
        permit.recorded = True
        if permit.state == DISABLED:
            return  # like resilience4j, a disabled breaker neither decides nor counts
        cfg = self.config
        if outcome == IGNORED:
            self.ignored += 1
            slow = False
        else:
            if outcome == SUCCESS:
                self.successes += 1
            else:
                self.failures += 1
            slow = (
                cfg.tracks_slow_calls
                and now_ns - permit.admitted_ns >= cfg.slow_call_duration_ms * NS_PER_MS
            )
            self.slow_calls += slow
        if permit.period != self.period:
            # Admitted under an earlier period: lifetime counts, and a trial call gives its
            # half-open slot back.
            if permit.state == HALF_OPEN:
                self.half_open_in_flight -= 1
            return
        if self.state == CLOSED:
            self._record_closed(outcome, slow, now_ns)
        elif self.state == HALF_OPEN:
            self._record_half_open(outcome, slow, now_ns)
        # A permit admitted while closed and recorded once disabled counts in lifetime
        # metrics only. OPEN / FORCED_OPEN admit nothing, so no permit of theirs exists.

    def _record_closed(self, outcome: str, slow: bool, now_ns: int) -> None:
        cfg = self.config
        if outcome == IGNORED:
            return
        failed = outcome == FAILURE
        self.run = self.run + 1 if failed else 0
        if cfg.failure_threshold is not None and self.run >= cfg.failure_threshold:
            self._trip(now_ns)
            return
        if not cfg.uses_window:
            return
        self.window.append(WindowEntry(now_ns // NS_PER_S, failed, slow))
        if cfg.window_type == "count" and len(self.window) > cfg.window_size:
            self.window.popleft()
        calls, window_failures, window_slow = self._window_counts(now_ns)
        if calls < cfg.effective_minimum_calls:
            return
        rate_trip = (
            cfg.failure_rate_threshold is not None
            and window_failures / calls >= cfg.failure_rate_threshold
        )
        slow_trip = (
            cfg.slow_call_rate_threshold is not None
            and window_slow / calls >= cfg.slow_call_rate_threshold
        )
        if rate_trip or slow_trip:
            self._trip(now_ns)

    def _record_half_open(self, outcome: str, slow: bool, now_ns: int) -> None:
        self.half_open_in_flight -= 1
        if outcome == IGNORED:
            return
        if outcome == FAILURE or slow:
            self._trip(now_ns)
            return
        self.half_open_successes += 1
        if self.half_open_successes >= self.config.success_threshold:
            self.trips = 0
            self._transition(CLOSED)

    def force_open(self) -> None:
        if self.state != FORCED_OPEN:
            self._transition(FORCED_OPEN)

    def disable(self) -> None:
        if self.state != DISABLED:
            self._transition(DISABLED)

    def reset(self) -> None:
        self.trips = 0
        if self.state == CLOSED:
            self._new_period()  # a fresh window and run, but no transition
        else:
            self._transition(CLOSED)

    # -- observation -------------------------------------------------------------------------

    def _window_counts(self, now_ns: int) -> tuple[int, int, int]:
        """(calls, failures, slow calls) in the window as seen at ``now_ns``."""
        if self.config.window_type == "count":
            entries = list(self.window)
        else:
            current_second = now_ns // NS_PER_S
            oldest = current_second - self.config.window_size
            entries = [entry for entry in self.window if entry.second > oldest]
        return (
            len(entries),
            sum(entry.failed for entry in entries),
            sum(entry.slow for entry in entries),
        )

    def metrics(self, now_ns: int) -> dict[str, object]:
        """What ``breaker.metrics()`` reports; like ``state``, it first moves an expired open
        breaker to half_open."""
        self._refresh(now_ns)
        if self.state == CLOSED:
            calls, window_failures, window_slow = self._window_counts(now_ns)
        else:
            calls = window_failures = window_slow = 0
        enough = calls >= self.config.effective_minimum_calls
        return {
            "state": self.state,
            "failure_rate": window_failures / calls if enough else None,
            "slow_call_rate": window_slow / calls if enough else None,
            "window_calls": calls,
            "window_failures": window_failures,
            "window_slow_calls": window_slow,
            "calls": self.successes + self.failures,
            "successes": self.successes,
            "failures": self.failures,
            "slow_calls": self.slow_calls,
            "ignored": self.ignored,
            "rejected": self.rejected,
            "transitions": len(self.transitions),
            "consecutive_failures": self.run if self.state == CLOSED else 0,
            "consecutive_trips": self.trips,
        }
