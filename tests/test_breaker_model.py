"""The real circuit breaker (Rust core) against the reference model in ``breaker_model.py``.

A hypothesis state machine draws a configuration, then acquires permits, records outcomes on
any permit it holds (stale ones of earlier periods too), moves a manual clock, forces, disables
and resets, and after every step checks that the breaker's metrics and the transitions its
listener saw agree with the model. Durations are whole milliseconds so no float rounding blurs
the comparison (retry_after and the rates are compared exactly).

Four core bugs found this way (since fixed) keep a plain regression test each at the end.
"""

from __future__ import annotations

import pytest
from breaker_model import (
    CLOSED,
    DISABLED,
    FAILURE,
    FORCED_OPEN,
    HALF_OPEN,
    IGNORED,
    NS_PER_MS,
    OPEN,
    SUCCESS,
    BreakerModel,
    Config,
    Permit,
    Rejection,
)
from buttress import CircuitBreaker, CircuitOpenError, CircuitPermit, CircuitState, ManualClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

# -- exceptions for the classification runs ----------------------------------------------------


class Boom(Exception):
    pass


class Fizz(Boom):
    pass


class Other(Exception):
    pass


class Halt(BaseException):
    """Derives from BaseException only, like KeyboardInterrupt: always ignored."""


RAISED = [None, Boom, Fizz, Other, ValueError, Halt]

# -- strategies --------------------------------------------------------------------------------

RATES = st.none() | st.sampled_from([0.25, 0.5, 1.0])
DAY_MS = 86_400_000
MAX_WAIT_MS = 24 * DAY_MS  # the longest reset_timeout / max_reset_timeout the breaker takes


@st.composite
def configs(draw: st.DrawFn, *, classifying: bool = False) -> Config:
    # 3 days doubles into the 24-day default cap.
    reset_ms = draw(st.sampled_from([1, 7, 250, 1000, 3000, 3 * DAY_MS]))
    multiplier = draw(st.sampled_from([1.0, 2.0]))
    max_ms = draw(
        st.none() | st.sampled_from([1, 2, 4, 10]).map(lambda k: min(k * reset_ms, MAX_WAIT_MS))
    )
    record: tuple[type[BaseException], ...] = (Exception,)
    ignore: tuple[type[BaseException], ...] = ()
    if classifying:
        records = [(Exception,), (Boom,), (Boom, Other), (Fizz,), (Boom, Halt)]
        record = draw(st.sampled_from(records))
        ignore = draw(st.sampled_from([(), (Fizz,), (Other,), (Halt,), (Boom,)]))
    return Config(
        failure_threshold=draw(st.none() | st.integers(1, 3)),
        failure_rate_threshold=draw(RATES),
        slow_call_rate_threshold=draw(RATES),
        slow_call_duration_ms=draw(st.sampled_from([0, 1, 10, 100, 1000])),
        window_type=draw(st.sampled_from(["count", "time"])),
        window_size=draw(st.integers(1, 3) | st.integers(1, 8)),  # small ones wrap sooner
        minimum_calls=draw(st.integers(1, 8)),
        reset_timeout_ms=reset_ms,
        backoff_multiplier=multiplier,
        max_reset_timeout_ms=max_ms,
        half_open_max_calls=draw(st.integers(1, 3)),
        success_threshold=draw(st.integers(1, 3)),
        record_exceptions=record,
        ignore_exceptions=ignore,
    )


# Small steps, steps around the reset timeouts and time windows, and big jumps (days, and
# around 2**31 ms).
ADVANCES = st.one_of(
    st.integers(0, 12),
    st.integers(0, 1_500),
    st.sampled_from([999, 1_000, 1_001, 3_000, 8_000, 9_000]),
    st.integers(0, 200_000),
    st.sampled_from([1, 3, 6, 12, 24, 25, 50]).map(lambda days: days * DAY_MS),
    st.sampled_from([2_147_483_000, 2_147_484_000]),
)
# Clock starts in ms: small ones, and whole seconds just before the core's u32 of milliseconds
# (2**32 ms) and u32 of seconds (2**32 s) wrap.
STARTS = st.integers(0, 10_000_000) | st.sampled_from(
    [4_294_966_000, 4_294_967_000, (2**31 + 5) * 1000, (2**32 - 3) * 1000]
)

# -- the state machine -------------------------------------------------------------------------


class BreakerMachine(RuleBasedStateMachine):
    """Drives a real breaker and the model with the same operations, permit by permit."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[CircuitPermit, Permit]] = []
        self.seen: list[tuple[str, str]] = []
        self.ready = False

    def _listen(self, breaker: object, old: CircuitState, new: CircuitState) -> None:
        assert breaker is self.breaker
        assert isinstance(old, CircuitState)
        assert isinstance(new, CircuitState)
        self.seen.append((old.value, new.value))

    def _build(self, config: Config, start_ms: int) -> None:
        self.clock = ManualClock(start_ms / 1000)
        self.now_ns = start_ms * NS_PER_MS
        self.breaker = CircuitBreaker("model", clock=self.clock, **config.breaker_kwargs())
        self.breaker.add_listener(self._listen)
        self.model = BreakerModel(config)
        self.ready = True

    @initialize(config=configs(), start_ms=STARTS)
    def build(self, config: Config, start_ms: int) -> None:
        self._build(config, start_ms)

    # -- rules ---------------------------------------------------------------------------------

    def _admitted(self, real: CircuitPermit | None, expected: Permit | Rejection) -> None:
        if isinstance(expected, Rejection):
            assert real is None, f"admitted; the model refuses ({self.model.state})"
        else:
            assert real is not None, f"refused; the model admits ({self.model.state})"
            assert not real.recorded
            self.held.append((real, expected))

    @rule()
    def try_acquire(self) -> None:
        expected = self.model.acquire(self.now_ns)
        self._admitted(self.breaker.try_acquire(), expected)

    @rule()
    def acquire(self) -> None:
        expected = self.model.acquire(self.now_ns)
        if isinstance(expected, Rejection):
            with pytest.raises(CircuitOpenError) as refused:
                self.breaker.acquire()
            assert refused.value.name == "model"
            assert refused.value.retry_after == expected.retry_after
        else:
            self._admitted(self.breaker.acquire(), expected)

    def _take_permit(self, data: st.DataObject) -> tuple[CircuitPermit, Permit] | None:
        """Draws a held permit (fresh or stale) to record on, and stops holding it."""
        if not self.held:
            return None
        index = data.draw(st.integers(0, len(self.held) - 1), label="permit")
        return self.held.pop(index)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), outcome=st.sampled_from([SUCCESS, FAILURE, IGNORED]))
    def record(self, data: st.DataObject, outcome: str) -> None:
        taken = self._take_permit(data)
        if taken is None:
            return
        real, expected = taken
        {SUCCESS: real.success, FAILURE: real.failure, IGNORED: real.ignore}[outcome]()
        assert real.recorded
        self.model.record(expected, outcome, self.now_ns)

    @rule(
        outcome=st.sampled_from([SUCCESS, FAILURE, IGNORED]),
        duration_ms=st.sampled_from([0, 1, 9, 10, 11, 100, 1000]),
    )
    def quick_call(self, outcome: str, duration_ms: int) -> None:
        """Acquires, lets `duration_ms` pass and records, all in one step."""
        expected = self.model.acquire(self.now_ns)
        real = self.breaker.try_acquire()
        self._admitted(real, expected)
        if real is None:
            return
        self.held.pop()
        self.advance(duration_ms)
        {SUCCESS: real.success, FAILURE: real.failure, IGNORED: real.ignore}[outcome]()
        assert isinstance(expected, Permit)
        self.model.record(expected, outcome, self.now_ns)

    @rule(ms=ADVANCES)
    def advance(self, ms: int) -> None:
        # Whole seconds, then the milliseconds: each converts to nanoseconds exactly.
        self.clock.advance(ms // 1000)
        self.clock.advance(ms % 1000 / 1000)
        self.now_ns += ms * NS_PER_MS
        assert self.clock.now() == self.now_ns / 1e9

    @precondition(lambda self: self.model.state == OPEN)
    @rule(offset_ms=st.sampled_from([-1, 0, 0, 1, 7, 999, 1_000]))
    def advance_to_deadline(self, offset_ms: int) -> None:
        """Moves the clock to around the end of the open wait, so trial calls happen often."""
        target_ms = self.model.deadline_ms + offset_ms
        self.advance(max(0, target_ms - self.now_ns // NS_PER_MS))

    # reset twice as often as the others, so forced-open and disabled stretches end sooner
    @rule(action=st.sampled_from(["reset", "force_open", "disable", "reset"]))
    def administer(self, action: str) -> None:
        getattr(self.breaker, action)()
        getattr(self.model, action)()

    @rule()
    def read_state(self) -> None:
        real = self.breaker.state
        assert isinstance(real, CircuitState)
        assert real == self.model.read_state(self.now_ns)

    # -- the invariant -------------------------------------------------------------------------

    @precondition(lambda self: self.ready)
    @invariant()
    def agrees_with_model(self) -> None:
        metrics = self.breaker.metrics()
        expected = self.model.metrics(self.now_ns)
        actual = {name: getattr(metrics, name) for name in expected}
        assert actual == expected
        assert self.seen == self.model.transitions


class ClassifyingMachine(BreakerMachine):
    """Adds calls through ``breaker.call`` and ``permit.record_exception``, with drawn
    ``record_exceptions`` / ``ignore_exceptions`` and exceptions of every kind."""

    @initialize(config=configs(classifying=True), start_ms=STARTS)
    def build(self, config: Config, start_ms: int) -> None:
        self._build(config, start_ms)

    @rule(raised=st.sampled_from(RAISED), duration_ms=st.sampled_from([0, 1, 5, 10, 100, 1000]))
    def call(self, raised: type[BaseException] | None, duration_ms: int) -> None:
        expected = self.model.acquire(self.now_ns)
        error = None if raised is None else raised()
        ran: list[bool] = []

        def work() -> str:
            ran.append(True)
            self.clock.advance(duration_ms / 1000)
            if error is not None:
                raise error
            return "done"

        if isinstance(expected, Rejection):
            with pytest.raises(CircuitOpenError) as refused:
                self.breaker.call(work)
            assert not ran
            assert refused.value.retry_after == expected.retry_after
            return
        if error is None:
            assert self.breaker.call(work) == "done"
        else:
            with pytest.raises(type(error)) as caught:
                self.breaker.call(work)
            assert caught.value is error
        assert ran
        self.now_ns += duration_ms * NS_PER_MS
        self.model.record(expected, self.model.classify(error), self.now_ns)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), raised=st.sampled_from(RAISED[1:]))
    def record_exception(self, data: st.DataObject, raised: type[BaseException]) -> None:
        taken = self._take_permit(data)
        if taken is None:
            return
        real, expected = taken
        error = raised()
        real.record_exception(error)
        assert real.recorded
        self.model.record(expected, self.model.classify(error), self.now_ns)


# Longer runs than hypothesis' default reach half-open and backoff more often; the number of
# runs comes from the loaded profile (conftest.py).
TestBreakerAgreesWithModel = BreakerMachine.TestCase
TestBreakerAgreesWithModel.settings = settings(stateful_step_count=100)
TestBreakerClassifiesLikeModel = ClassifyingMachine.TestCase
TestBreakerClassifiesLikeModel.settings = settings(stateful_step_count=100)

# -- examples of the model itself --------------------------------------------------------------


def _admit(model: BreakerModel, now_ns: int) -> Permit:
    permit = model.acquire(now_ns)
    assert isinstance(permit, Permit)
    return permit


def test_model_trips_on_consecutive_failures_and_backs_off() -> None:
    model = BreakerModel(Config(failure_threshold=2, reset_timeout_ms=1000, backoff_multiplier=2.0))
    for _ in range(2):
        model.record(_admit(model, 0), FAILURE, 0)
    assert model.state == OPEN
    assert model.acquire(400 * NS_PER_MS) == Rejection(0.6)
    assert model.read_state(999 * NS_PER_MS) == OPEN
    probe = _admit(model, 1000 * NS_PER_MS)  # expires: half-open, and admitted as a trial
    assert model.state == HALF_OPEN
    assert model.acquire(1000 * NS_PER_MS) == Rejection(0.0)  # the one trial slot is taken
    model.record(probe, FAILURE, 1000 * NS_PER_MS)
    assert (model.state, model.trips, model.deadline_ms) == (OPEN, 2, 3000)  # waits 2 s now
    model.record(_admit(model, 3000 * NS_PER_MS), SUCCESS, 3000 * NS_PER_MS)
    assert (model.state, model.trips) == (CLOSED, 0)
    assert model.transitions == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert model.metrics(3000 * NS_PER_MS)["rejected"] == 2


def test_model_backoff_default_cap_is_ten_reset_timeouts() -> None:
    model = BreakerModel(Config(failure_threshold=1, reset_timeout_ms=1000, backoff_multiplier=2.0))
    now = 0
    waits = []
    for _ in range(6):  # a failure in closed, then a failed trial each time the wait ends
        model.record(_admit(model, now), FAILURE, now)
        waits.append((model.deadline_ms * NS_PER_MS - now) // NS_PER_MS)
        now = model.deadline_ms * NS_PER_MS
    assert waits == [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]
    assert model.trips == 6


def test_model_count_window_trips_on_rate_once_minimum_is_reached() -> None:
    model = BreakerModel(
        Config(failure_threshold=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=9)
    )
    outcomes = [SUCCESS, SUCCESS, SUCCESS, FAILURE, SUCCESS]  # window [S, S, F, S]: 25 %
    for outcome in outcomes:
        model.record(_admit(model, 0), outcome, 0)
    metrics = model.metrics(0)
    assert (metrics["window_calls"], metrics["failure_rate"]) == (4, 0.25)
    model.record(_admit(model, 0), FAILURE, 0)  # window [S, F, S, F]: 50 %
    assert model.state == OPEN
    assert model.metrics(0)["window_calls"] == 0


def test_model_time_window_forgets_old_seconds() -> None:
    model = BreakerModel(
        Config(
            failure_threshold=None,
            failure_rate_threshold=1.0,
            window_type="time",
            window_size=2,
            minimum_calls=2,
        )
    )
    model.record(_admit(model, 0), FAILURE, 0)
    model.record(_admit(model, 0), SUCCESS, 1_999 * NS_PER_MS)  # second 1: both count
    assert model.metrics(1_999 * NS_PER_MS)["window_calls"] == 2
    assert model.metrics(2_000 * NS_PER_MS)["window_calls"] == 1  # second 0 left the window
    now = 2_500 * NS_PER_MS
    model.record(_admit(model, now), FAILURE, now)  # window: S (second 1), F: 50 %
    assert model.state == CLOSED
    now = 3_000 * NS_PER_MS
    model.record(_admit(model, now), FAILURE, now)  # window: F, F (seconds 2, 3)
    assert model.state == OPEN


def test_model_stale_permits_only_count_in_lifetime_metrics() -> None:
    model = BreakerModel(Config(failure_threshold=1, slow_call_rate_threshold=1.0))
    stale = _admit(model, 0)
    model.reset()  # a closed breaker's reset starts a new period without a transition
    model.record(stale, FAILURE, 0)
    metrics = model.metrics(0)
    assert (metrics["state"], metrics["failures"], metrics["transitions"]) == (CLOSED, 1, 0)
    assert metrics["consecutive_failures"] == 0
    model.disable()
    model.record(_admit(model, 0), FAILURE, 0)
    assert model.state == DISABLED
    model.force_open()
    assert model.acquire(0) == Rejection(None)
    assert model.transitions == [(CLOSED, DISABLED), (DISABLED, FORCED_OPEN)]


@pytest.mark.parametrize(
    ("raised", "record", "ignore", "outcome"),
    [
        (None, (Exception,), (), SUCCESS),
        (ValueError, (Exception,), (), FAILURE),
        (Halt, (Exception,), (), IGNORED),
        (Halt, (Halt,), (), IGNORED),
        (Other, (Boom,), (), SUCCESS),
        (Fizz, (Boom,), (), FAILURE),
        (Fizz, (Boom,), (Fizz,), IGNORED),
        (Fizz, (Fizz,), (Boom,), IGNORED),
    ],
)
def test_model_classifies_exceptions(
    raised: type[BaseException] | None,
    record: tuple[type[BaseException], ...],
    ignore: tuple[type[BaseException], ...],
    outcome: str,
) -> None:
    model = BreakerModel(Config(record_exceptions=record, ignore_exceptions=ignore))
    assert model.classify(None if raised is None else raised()) == outcome


# -- regressions: core bugs the machines found ------------------------------------------------


def test_stale_permit_leaves_count_window_alone() -> None:
    breaker = CircuitBreaker(
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_size=2,
        minimum_calls=2,
        clock=ManualClock(),
    )
    stale = breaker.try_acquire()
    breaker.reset()  # a new closed period
    breaker.acquire().failure()  # window [F]
    stale.success()  # of the earlier period: lifetime counts only
    breaker.acquire().success()  # window [F, S]: 50 % trips
    assert breaker.state == CircuitState.OPEN


def test_stale_permit_leaves_time_window_alone() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_type="time",
        window_size=2,
        minimum_calls=2,
        clock=clock,
    )
    stale = breaker.try_acquire()
    breaker.reset()  # a new closed period
    breaker.acquire().failure()  # second 0
    clock.advance(5.0)  # second 5: the failure left the 2-second window
    stale.success()  # of the earlier period: lifetime counts only
    breaker.acquire().success()  # window [S]: fewer calls than minimum_calls
    assert breaker.state == CircuitState.CLOSED


def test_base_exception_in_record_exceptions_is_ignored() -> None:
    breaker = CircuitBreaker(failure_threshold=1, record_exceptions=(Boom, Halt))

    def halt() -> None:
        raise Halt

    with pytest.raises(Halt):
        breaker.call(halt)
    metrics = breaker.metrics()
    assert (metrics.state, metrics.failures, metrics.ignored) == (CircuitState.CLOSED, 0, 1)


def test_open_breaker_left_alone_for_25_days_admits_a_trial() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    breaker.acquire().failure()  # open until second 1
    clock.advance(25 * 86_400.0)
    assert breaker.try_acquire() is not None
    assert breaker.state == CircuitState.HALF_OPEN


def test_time_window_forgets_calls_at_high_clock_readings() -> None:
    clock = ManualClock(2.0**31 + 5)  # wall-clock seconds get here in 2038
    breaker = CircuitBreaker(
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_type="time",
        window_size=1,
        minimum_calls=2,
        clock=clock,
    )
    breaker.acquire().failure()
    assert breaker.metrics().window_calls == 1
    clock.advance(10.0)  # the failure left the 1-second window
    breaker.acquire().success()  # window [S]: fewer calls than minimum_calls
    assert breaker.state == CircuitState.CLOSED
