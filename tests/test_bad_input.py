"""Bad arguments raise ValueError or TypeError naming the argument, and a breaker, bulkhead,
registry or clock that already has state keeps all of it after a refused call."""

from __future__ import annotations

import math
from typing import Any

import pytest
from buttress import (
    Bulkhead,
    BulkheadRegistry,
    CircuitBreaker,
    CircuitState,
    ManualClock,
)
from support import bulkhead_stats

NAN = math.nan
INF = math.inf


class Boom(Exception):
    """A failure to put some state into a breaker."""


def assert_names(error: pytest.ExceptionInfo[BaseException], argument: str) -> None:
    assert argument in str(error.value), f"{argument!r} not named in {str(error.value)!r}"


# ---- CircuitBreaker(...) -----------------------------------------------------------------

BREAKER_BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    # counts
    ({"failure_threshold": 0}, ValueError, "failure_threshold"),
    ({"failure_threshold": -1}, ValueError, "failure_threshold"),
    ({"failure_threshold": 2**32}, ValueError, "failure_threshold"),
    ({"window_size": 0}, ValueError, "window_size"),
    ({"window_size": -5}, ValueError, "window_size"),
    ({"window_size": 2**20 + 1}, ValueError, "window_size"),
    ({"window_type": "time", "window_size": 86_401}, ValueError, "window_size"),
    ({"minimum_calls": 0}, ValueError, "minimum_calls"),
    ({"minimum_calls": -1}, ValueError, "minimum_calls"),
    ({"half_open_max_calls": 0}, ValueError, "half_open_max_calls"),
    ({"half_open_max_calls": -2}, ValueError, "half_open_max_calls"),
    ({"half_open_max_calls": 65_536}, ValueError, "half_open_max_calls"),
    ({"success_threshold": 0}, ValueError, "success_threshold"),
    ({"success_threshold": -1}, ValueError, "success_threshold"),
    ({"success_threshold": 65_536}, ValueError, "success_threshold"),
    # rates
    ({"failure_rate_threshold": 0.0}, ValueError, "failure_rate_threshold"),
    ({"failure_rate_threshold": -0.5}, ValueError, "failure_rate_threshold"),
    ({"failure_rate_threshold": 1.01}, ValueError, "failure_rate_threshold"),
    ({"failure_rate_threshold": NAN}, ValueError, "failure_rate_threshold"),
    ({"failure_rate_threshold": INF}, ValueError, "failure_rate_threshold"),
    ({"slow_call_rate_threshold": 0.0}, ValueError, "slow_call_rate_threshold"),
    ({"slow_call_rate_threshold": 2.0}, ValueError, "slow_call_rate_threshold"),
    ({"slow_call_rate_threshold": NAN}, ValueError, "slow_call_rate_threshold"),
    # window type
    ({"window_type": "sliding"}, ValueError, "window_type"),
    ({"window_type": ""}, ValueError, "window_type"),
    ({"window_type": "COUNT"}, ValueError, "window_type"),
    # seconds
    ({"reset_timeout": 0.0}, ValueError, "reset_timeout"),
    ({"reset_timeout": -1.0}, ValueError, "reset_timeout"),
    ({"reset_timeout": NAN}, ValueError, "reset_timeout"),
    ({"reset_timeout": INF}, ValueError, "reset_timeout"),
    ({"reset_timeout": 25 * 86_400.0}, ValueError, "reset_timeout"),
    ({"slow_call_duration": -0.001}, ValueError, "slow_call_duration"),
    ({"slow_call_duration": NAN}, ValueError, "slow_call_duration"),
    ({"slow_call_duration": INF}, ValueError, "slow_call_duration"),
    ({"max_reset_timeout": -1.0}, ValueError, "max_reset_timeout"),
    ({"max_reset_timeout": NAN}, ValueError, "max_reset_timeout"),
    ({"max_reset_timeout": INF}, ValueError, "max_reset_timeout"),
    ({"reset_timeout": 10.0, "max_reset_timeout": 5.0}, ValueError, "max_reset_timeout"),
    # backoff and jitter
    ({"backoff_multiplier": 0.5}, ValueError, "backoff_multiplier"),
    ({"backoff_multiplier": -2.0}, ValueError, "backoff_multiplier"),
    ({"backoff_multiplier": NAN}, ValueError, "backoff_multiplier"),
    ({"backoff_multiplier": INF}, ValueError, "backoff_multiplier"),
    ({"jitter": -0.1}, ValueError, "jitter"),
    ({"jitter": 1.0}, ValueError, "jitter"),
    ({"jitter": NAN}, ValueError, "jitter"),
    ({"jitter": INF}, ValueError, "jitter"),
    # callables
    ({"fallback": 5}, TypeError, "fallback"),
    ({"fallback": "default"}, TypeError, "fallback"),
    ({"result_is_failure": 5}, TypeError, "result_is_failure"),
    ({"result_is_failure": True}, TypeError, "result_is_failure"),
    # exception classes
    ({"record_exceptions": 5}, TypeError, "record_exceptions"),
    ({"record_exceptions": "ValueError"}, TypeError, "record_exceptions"),
    ({"record_exceptions": int}, TypeError, "record_exceptions"),
    ({"record_exceptions": ValueError()}, TypeError, "record_exceptions"),
    ({"record_exceptions": (ValueError, 5)}, TypeError, "record_exceptions"),
    ({"record_exceptions": [OSError, object]}, TypeError, "record_exceptions"),
    ({"ignore_exceptions": 5}, TypeError, "ignore_exceptions"),
    ({"ignore_exceptions": (KeyError, "x")}, TypeError, "ignore_exceptions"),
    ({"ignore_exceptions": str}, TypeError, "ignore_exceptions"),
    # clock
    ({"clock": 5}, TypeError, "clock"),
    ({"clock": "manual"}, TypeError, "clock"),
    ({"clock": lambda: 0.0}, TypeError, "clock"),
    ({"clock": ManualClock}, TypeError, "clock"),
]


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    BREAKER_BAD,
    ids=[f"{argument}={options[argument]!r}" for options, _, argument in BREAKER_BAD],
)
def test_circuit_breaker_rejects_bad_arguments(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error) as caught:
        CircuitBreaker("bad", **options)
    assert_names(caught, argument)


WRONG_TYPES: list[tuple[type[Any], dict[str, Any], str]] = [
    (CircuitBreaker, {"name": 5}, "name"),
    (CircuitBreaker, {"failure_threshold": 1.5}, "failure_threshold"),
    (CircuitBreaker, {"failure_threshold": "5"}, "failure_threshold"),
    (CircuitBreaker, {"window_size": None}, "window_size"),
    (CircuitBreaker, {"reset_timeout": "10"}, "reset_timeout"),
    (CircuitBreaker, {"jitter": None}, "jitter"),
    (CircuitBreaker, {"window_type": None}, "window_type"),
    (Bulkhead, {"name": None}, "name"),
    (Bulkhead, {"max_concurrent": 2.5}, "max_concurrent"),
    (Bulkhead, {"max_waiting": "10"}, "max_waiting"),
    (Bulkhead, {"max_wait": "1s"}, "max_wait"),
]
WRONG_TYPE_IDS = [
    f"{factory.__name__}-{argument}={options[argument]!r}"
    for factory, options, argument in WRONG_TYPES
]


@pytest.mark.parametrize(("factory", "options", "argument"), WRONG_TYPES, ids=WRONG_TYPE_IDS)
def test_wrong_types_name_the_argument(
    factory: type[Any], options: dict[str, Any], argument: str
) -> None:
    with pytest.raises(TypeError) as caught:
        factory(**options)
    assert_names(caught, argument)


@pytest.mark.parametrize(("factory", "options", "argument"), WRONG_TYPES, ids=WRONG_TYPE_IDS)
def test_wrong_types_raise_type_error(
    factory: type[Any], options: dict[str, Any], argument: str
) -> None:
    with pytest.raises(TypeError) as caught:
        factory(**options)
    # Until the message names it, the argument is at least named in a note.
    assert any(argument in note for note in getattr(caught.value, "__notes__", []))


HUGE_COUNTS = [
    (CircuitBreaker, "failure_threshold"),
    (CircuitBreaker, "window_size"),
    (CircuitBreaker, "half_open_max_calls"),
    (Bulkhead, "max_concurrent"),
    (Bulkhead, "max_waiting"),
]


@pytest.mark.parametrize(
    ("factory", "argument"),
    HUGE_COUNTS,
    ids=[f"{factory.__name__}-{argument}" for factory, argument in HUGE_COUNTS],
)
def test_huge_counts_raise_value_error_naming_the_argument(
    factory: type[Any], argument: str
) -> None:
    with pytest.raises(ValueError, match=argument) as caught:
        factory(**{argument: 2**70})
    assert_names(caught, argument)


def test_valid_edge_values_are_accepted() -> None:
    CircuitBreaker(failure_threshold=None, failure_rate_threshold=1.0)
    CircuitBreaker(slow_call_rate_threshold=1e-9, slow_call_duration=0.0)
    CircuitBreaker(window_size=1, minimum_calls=1, half_open_max_calls=65_535)
    CircuitBreaker(window_type="time", window_size=86_400)
    CircuitBreaker(reset_timeout=24 * 86_400.0)
    CircuitBreaker(jitter=0.999, backoff_multiplier=1.0)
    CircuitBreaker(reset_timeout=1.0, max_reset_timeout=1.0)
    CircuitBreaker(record_exceptions=BaseException, ignore_exceptions=())
    CircuitBreaker(clock=None, fallback=None, result_is_failure=None)


# ---- Bulkhead(...) -----------------------------------------------------------------------

BULKHEAD_BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"max_concurrent": 0}, ValueError, "max_concurrent"),
    ({"max_concurrent": -1}, ValueError, "max_concurrent"),
    ({"max_concurrent": 2**32}, ValueError, "max_concurrent"),
    ({"max_waiting": -1}, ValueError, "max_waiting"),
    ({"max_waiting": 2**32}, ValueError, "max_waiting"),
    ({"max_wait": -0.5}, ValueError, "max_wait"),
    ({"max_wait": NAN}, ValueError, "max_wait"),
    ({"max_wait": INF}, ValueError, "max_wait"),
    ({"max_wait": -INF}, ValueError, "max_wait"),
]


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    BULKHEAD_BAD,
    ids=[f"{argument}={options[argument]!r}" for options, _, argument in BULKHEAD_BAD],
)
def test_bulkhead_rejects_bad_arguments(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error) as caught:
        Bulkhead("bad", **options)
    assert_names(caught, argument)


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    BULKHEAD_BAD,
    ids=[f"{argument}={options[argument]!r}" for options, _, argument in BULKHEAD_BAD],
)
def test_bulkhead_registry_rejects_bad_defaults(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error) as caught:
        BulkheadRegistry(**options)
    assert_names(caught, argument)


# ---- calls with bad arguments keep the state ---------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(100.0)


@pytest.fixture
def busy_breaker(clock: ManualClock) -> CircuitBreaker:
    """A breaker with state worth keeping: calls, a run of failures, a listener."""
    breaker = CircuitBreaker("busy", failure_threshold=3, reset_timeout=5.0, clock=clock)
    breaker.call(lambda: None)
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call(_raise_boom)
    return breaker


def _raise_boom() -> None:
    raise Boom


def snapshot(breaker: CircuitBreaker) -> tuple[Any, ...]:
    metrics = breaker.metrics()
    return (
        metrics.state,
        metrics.calls,
        metrics.successes,
        metrics.failures,
        metrics.ignored,
        metrics.rejected,
        metrics.transitions,
        metrics.consecutive_failures,
        metrics.window_calls,
    )


BAD_BREAKER_CALLS: list[tuple[str, Any, type[Exception], str]] = [
    ("call(5)", lambda b: b.call(5), TypeError, "func"),
    ("call(None)", lambda b: b.call(None), TypeError, "func"),
    ("call('f')", lambda b: b.call("f", 1), TypeError, "func"),
    ("decorate(5)", lambda b: b(5), TypeError, "func"),
    ("add_listener(5)", lambda b: b.add_listener(5), TypeError, "listener"),
    ("add_listener(None)", lambda b: b.add_listener(None), TypeError, "listener"),
    ("remove_listener(unknown)", lambda b: b.remove_listener(print), ValueError, "listener"),
]


@pytest.mark.parametrize(
    ("call", "error", "argument"),
    [case[1:] for case in BAD_BREAKER_CALLS],
    ids=[case[0] for case in BAD_BREAKER_CALLS],
)
def test_bad_breaker_calls_keep_the_state(
    busy_breaker: CircuitBreaker, call: Any, error: type[Exception], argument: str
) -> None:
    seen: list[tuple[CircuitState, CircuitState]] = []

    def listener(_: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        seen.append((old, new))

    busy_breaker.add_listener(listener)
    before = snapshot(busy_breaker)
    with pytest.raises(error) as caught:
        call(busy_breaker)
    assert_names(caught, argument)
    assert snapshot(busy_breaker) == before
    # The run of failures and the listener survived: one more failure trips and notifies.
    with pytest.raises(Boom):
        busy_breaker.call(_raise_boom)
    assert busy_breaker.state is CircuitState.OPEN
    assert seen == [("closed", "open")]


def test_bad_call_on_open_breaker_is_not_a_rejection(
    busy_breaker: CircuitBreaker, clock: ManualClock
) -> None:
    with pytest.raises(Boom):
        busy_breaker.call(_raise_boom)
    before = snapshot(busy_breaker)
    retry_after = busy_breaker.retry_after
    with pytest.raises(TypeError, match="func"):
        busy_breaker.call(5)
    assert snapshot(busy_breaker) == before
    assert busy_breaker.retry_after == retry_after


def test_bad_call_in_half_open_takes_no_trial_slot(
    busy_breaker: CircuitBreaker, clock: ManualClock
) -> None:
    with pytest.raises(Boom):
        busy_breaker.call(_raise_boom)
    clock.advance(5.0)
    assert busy_breaker.state is CircuitState.HALF_OPEN
    for _ in range(3):
        with pytest.raises(TypeError):
            busy_breaker.call(5)
    busy_breaker.call(lambda: None)
    assert busy_breaker.state is CircuitState.CLOSED


@pytest.mark.parametrize("bad", [5, "boom", ValueError], ids=["int", "str", "class"])
def test_record_exception_rejects_non_exceptions(busy_breaker: CircuitBreaker, bad: Any) -> None:
    permit = busy_breaker.acquire()
    before = snapshot(busy_breaker)
    with pytest.raises(TypeError) as caught:
        permit.record_exception(bad)
    assert_names(caught, "error")
    assert not permit.recorded
    assert snapshot(busy_breaker) == before
    permit.failure()


def test_adding_a_bad_listener_keeps_the_good_ones(busy_breaker: CircuitBreaker) -> None:
    seen = []
    busy_breaker.add_listener(lambda *_: seen.append(1))
    with pytest.raises(TypeError):
        busy_breaker.add_listener(object())
    busy_breaker.force_open()
    assert seen == [1]


# ---- ManualClock -------------------------------------------------------------------------


@pytest.mark.parametrize("start", [-1.0, NAN, INF])
def test_manual_clock_rejects_bad_start(start: float) -> None:
    with pytest.raises(ValueError, match="start") as caught:
        ManualClock(start)
    assert_names(caught, "start")


@pytest.mark.parametrize("seconds", [-0.001, NAN, INF, -INF])
def test_manual_clock_advance_rejects_bad_seconds(clock: ManualClock, seconds: float) -> None:
    with pytest.raises(ValueError, match="seconds") as caught:
        clock.advance(seconds)
    assert_names(caught, "seconds")
    assert clock.now() == 100.0


@pytest.mark.parametrize("seconds", [99.999, 0.0, NAN, INF, -1.0])
def test_manual_clock_set_rejects_going_back_and_bad_seconds(
    clock: ManualClock, seconds: float
) -> None:
    with pytest.raises(ValueError, match="seconds") as caught:
        clock.set(seconds)
    assert_names(caught, "seconds")
    assert clock.now() == 100.0


def test_manual_clock_moves_forward(clock: ManualClock) -> None:
    clock.set(100.0)  # setting the current time is not going back
    clock.advance(0.0)
    clock.set(150.5)
    clock.advance(0.25)
    assert clock.now() == 150.75
    assert repr(clock) == "ManualClock(now=150.75)"


def test_a_breaker_keeps_its_state_when_its_clock_refuses_to_go_back(
    busy_breaker: CircuitBreaker, clock: ManualClock
) -> None:
    with pytest.raises(Boom):
        busy_breaker.call(_raise_boom)
    remaining = busy_breaker.retry_after
    with pytest.raises(ValueError, match="seconds"):
        clock.set(0.0)
    assert busy_breaker.retry_after == remaining
    assert busy_breaker.state is CircuitState.OPEN


# ---- Bulkhead calls ----------------------------------------------------------------------


@pytest.fixture
def busy_bulkhead() -> Bulkhead:
    bulkhead = Bulkhead("busy", max_concurrent=2, max_waiting=3, max_wait=0.0)
    bulkhead.acquire()
    assert bulkhead.try_acquire()
    bulkhead.release()
    return bulkhead


BAD_BULKHEAD_CALLS: list[tuple[str, Any, type[Exception], str]] = [
    ("acquire(timeout=-1)", lambda b: b.acquire(timeout=-1), ValueError, "timeout"),
    ("acquire(timeout=nan)", lambda b: b.acquire(timeout=NAN), ValueError, "timeout"),
    ("acquire(timeout=inf)", lambda b: b.acquire(timeout=INF), ValueError, "timeout"),
    ("call(5)", lambda b: b.call(5), TypeError, "func"),
    ("call(None)", lambda b: b.call(None), TypeError, "func"),
    ("decorate(5)", lambda b: b(5), TypeError, "func"),
]


@pytest.mark.parametrize(
    ("call", "error", "argument"),
    [case[1:] for case in BAD_BULKHEAD_CALLS],
    ids=[case[0] for case in BAD_BULKHEAD_CALLS],
)
def test_bad_bulkhead_calls_keep_the_state(
    busy_bulkhead: Bulkhead, call: Any, error: type[Exception], argument: str
) -> None:
    before = bulkhead_stats(busy_bulkhead)
    with pytest.raises(error) as caught:
        call(busy_bulkhead)
    assert_names(caught, argument)
    assert bulkhead_stats(busy_bulkhead) == before
    assert busy_bulkhead.try_acquire() is True  # the free permit is still free
    busy_bulkhead.release()
    busy_bulkhead.release()
    assert busy_bulkhead.stats().active == 0


@pytest.mark.parametrize("timeout", [-1.0, NAN, INF])
async def test_acquire_async_rejects_bad_timeout(busy_bulkhead: Bulkhead, timeout: float) -> None:
    before = bulkhead_stats(busy_bulkhead)
    with pytest.raises(ValueError, match="timeout") as caught:
        await busy_bulkhead.acquire_async(timeout=timeout)
    assert_names(caught, "timeout")
    assert bulkhead_stats(busy_bulkhead) == before


async def test_call_async_rejects_non_callables(busy_bulkhead: Bulkhead) -> None:
    before = bulkhead_stats(busy_bulkhead)
    with pytest.raises(TypeError) as caught:
        await busy_bulkhead.call_async(5)  # type: ignore[arg-type]
    assert_names(caught, "func")
    assert bulkhead_stats(busy_bulkhead) == before


async def test_breaker_call_async_rejects_non_callables(busy_breaker: CircuitBreaker) -> None:
    before = snapshot(busy_breaker)
    with pytest.raises(TypeError) as caught:
        await busy_breaker.call_async(5)  # type: ignore[arg-type]
    assert_names(caught, "func")
    assert snapshot(busy_breaker) == before


# ---- BulkheadRegistry --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    [
        ({"max_concurrent": 0}, ValueError, "max_concurrent"),
        ({"max_waiting": -1}, ValueError, "max_waiting"),
        ({"max_wait": -1.0}, ValueError, "max_wait"),
        ({"max_wait": NAN}, ValueError, "max_wait"),
    ],
)
def test_registry_get_with_bad_limits_stores_nothing(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    registry = BulkheadRegistry()
    kept = registry.get("kept", max_concurrent=2)
    with pytest.raises(error) as caught:
        registry.get("new", **options)
    assert_names(caught, argument)
    assert "new" not in registry
    assert list(registry) == ["kept"]
    assert registry.get("kept") is kept
    fresh = registry.get("new")  # the name is still free for a good configuration
    assert fresh.max_concurrent == 25


@pytest.mark.parametrize("name", [5, None, b"bytes"])
def test_registry_get_rejects_non_string_names(name: Any) -> None:
    registry = BulkheadRegistry()
    with pytest.raises(TypeError) as caught:
        registry.get(name)
    assert_names(caught, "name")
    assert len(registry) == 0
