"""Behaviour of the synchronous circuit breaker: every form, every rule, every knob.

Breaker timing always runs on a `ManualClock`; nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

import buttress
import pytest
from buttress import (
    BreakerMetrics,
    ButtressError,
    CircuitBreaker,
    CircuitOpenError,
    CircuitPermit,
    CircuitState,
    ManualClock,
)
from hypothesis import given
from hypothesis import strategies as st
from support import make_breaker

# ---- helpers -----------------------------------------------------------------------------


class Boom(Exception):
    """The failure the tests raise through breakers."""


class Other(Exception):
    """An exception a breaker is told not to record."""


def raise_(error: BaseException) -> None:
    raise error


def fail(breaker: CircuitBreaker, error: BaseException | None = None) -> None:
    """One failing call through `breaker`; the error must come back out unchanged."""
    error = Boom("boom") if error is None else error
    with pytest.raises(type(error)) as caught:
        breaker.call(raise_, error)
    assert caught.value is error


def succeed(breaker: CircuitBreaker) -> None:
    assert breaker.call(lambda: "ok") == "ok"


def half_open(clock: ManualClock, **options: Any) -> CircuitBreaker:
    """A breaker already moved to half-open (tripped, then waited out)."""
    breaker = make_breaker(clock, **options)
    fail(breaker)
    assert breaker.state is CircuitState.OPEN
    clock.advance(breaker.retry_after or 0.0)
    assert breaker.state is CircuitState.HALF_OPEN
    return breaker


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Collects what goes to sys.unraisablehook (warnings are errors, so pytest's hook would
    fail the test)."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


# ---- construction and state --------------------------------------------------------------


def test_defaults_and_properties(clock: ManualClock) -> None:
    breaker = CircuitBreaker()
    assert breaker.name == "default"
    assert breaker.state is CircuitState.CLOSED
    assert breaker.retry_after == 0.0
    assert breaker.fallback is None
    assert breaker.clock is None
    manual = CircuitBreaker("named", clock=clock)
    assert manual.name == "named"
    assert manual.clock is clock
    assert repr(manual) == "CircuitBreaker(name='named', state='closed')"


def test_default_breaker_trips_after_five_failures_in_a_row() -> None:
    breaker = CircuitBreaker()
    for _ in range(4):
        fail(breaker)
    assert breaker.state == "closed"
    fail(breaker)
    assert breaker.state == "open"
    assert breaker.retry_after == pytest.approx(30.0, abs=0.5)


@pytest.mark.parametrize(
    ("member", "text"),
    [
        (CircuitState.CLOSED, "closed"),
        (CircuitState.OPEN, "open"),
        (CircuitState.HALF_OPEN, "half_open"),
        (CircuitState.FORCED_OPEN, "forced_open"),
        (CircuitState.DISABLED, "disabled"),
    ],
)
def test_circuit_state_members_equal_their_strings(member: CircuitState, text: str) -> None:
    assert member == text
    assert str(member) == text
    assert CircuitState(text) is member
    assert isinstance(member, str)


def test_state_returns_circuit_state_members_through_every_state(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    seen = [breaker.state]
    fail(breaker)
    seen.append(breaker.state)
    clock.advance(10.0)
    seen.append(breaker.state)
    breaker.force_open()
    seen.append(breaker.state)
    breaker.disable()
    seen.append(breaker.state)
    assert seen == ["closed", "open", "half_open", "forced_open", "disabled"]
    for state in seen:
        assert type(state) is CircuitState
    assert seen[0] is CircuitState.CLOSED
    assert seen[2] is CircuitState.HALF_OPEN


def test_open_reads_as_half_open_exactly_when_the_wait_is_over(clock: ManualClock) -> None:
    breaker = make_breaker(clock, reset_timeout=2.0)
    fail(breaker)
    clock.advance(1.999)
    assert breaker.state is CircuitState.OPEN
    assert breaker.retry_after == pytest.approx(0.001, abs=1e-6)
    assert breaker.try_acquire() is None
    clock.advance(0.001)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.retry_after == 0.0


# ---- breaker.call ------------------------------------------------------------------------


def test_call_passes_arguments_and_returns_the_result(clock: ManualClock) -> None:
    breaker = make_breaker(clock)

    def add(a: int, b: int, *, scale: int = 1) -> int:
        return (a + b) * scale

    assert breaker.call(add, 1, 2, scale=10) == 30
    assert breaker.call(add, 1, b=2) == 3
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.successes, metrics.failures) == (2, 2, 0)


def test_call_takes_func_positionally_so_func_may_be_a_keyword_argument(
    clock: ManualClock,
) -> None:
    breaker = make_breaker(clock)
    assert breaker.call(dict, func=1, name="x") == {"func": 1, "name": "x"}


def test_call_reraises_the_same_exception_and_records_a_failure(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    fail(breaker)
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.failures, metrics.consecutive_failures) == (1, 1, 1)
    assert breaker.state is CircuitState.CLOSED


def test_open_breaker_refuses_without_calling(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    fail(breaker)
    called = []
    with pytest.raises(CircuitOpenError) as caught:
        breaker.call(called.append, 1)
    assert called == []
    assert caught.value.name == "svc"
    assert caught.value.retry_after == pytest.approx(10.0)
    assert breaker.metrics().rejected == 1


def test_success_resets_the_run_of_failures(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    fail(breaker)
    fail(breaker)
    succeed(breaker)
    assert breaker.metrics().consecutive_failures == 0
    fail(breaker)
    fail(breaker)
    assert breaker.state is CircuitState.CLOSED
    fail(breaker)
    assert breaker.state is CircuitState.OPEN


# ---- @breaker ----------------------------------------------------------------------------


def test_decorator_keeps_function_metadata(clock: ManualClock) -> None:
    breaker = make_breaker(clock)

    def fetch(item: str, count: int = 1) -> str:
        """Fetches an item."""
        return item * count

    guarded = breaker(fetch)
    assert guarded.__name__ == "fetch"
    assert guarded.__qualname__ == fetch.__qualname__
    assert guarded.__doc__ == "Fetches an item."
    assert guarded.__module__ == __name__
    assert guarded.__wrapped__ is fetch
    assert guarded.breaker is breaker
    assert inspect.signature(guarded) == inspect.signature(fetch)
    assert guarded("ab", count=2) == "abab"


def test_decorator_records_failures_and_refuses_when_open(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    calls = []

    @breaker
    def flaky(x: int) -> int:
        calls.append(x)
        raise Boom(x)

    for x in (1, 2):
        with pytest.raises(Boom):
            flaky(x)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        flaky(3)
    assert calls == [1, 2]


def test_decorator_on_methods_binds_self(clock: ManualClock) -> None:
    breaker = make_breaker(clock)

    class Client:
        def __init__(self, base: str) -> None:
            self.base = base

        @breaker
        def get(self, path: str) -> str:
            """Gets a path."""
            return self.base + path

    first, second = Client("a:"), Client("b:")
    assert first.get("/x") == "a:/x"
    assert second.get(path="/y") == "b:/y"
    assert Client.get(first, "/z") == "a:/z"
    assert Client.get.__name__ == "get"
    assert Client.get.__doc__ == "Gets a path."
    assert Client.get.__qualname__.endswith("Client.get")
    assert first.get.__self__ is first
    assert first.get.__wrapped__.__name__ == "get"
    assert breaker.metrics().successes == 3


def test_decorated_method_failures_count_on_the_shared_breaker(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)

    class Client:
        @breaker
        def get(self) -> None:
            raise Boom

    for client in (Client(), Client()):
        with pytest.raises(Boom):
            client.get()
    assert breaker.state is CircuitState.OPEN


# ---- with breaker: -----------------------------------------------------------------------


def test_with_block_records_success_and_failure(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    with breaker:
        pass
    error = Boom("inside")
    with pytest.raises(Boom) as caught, breaker:
        raise error
    assert caught.value is error  # not swallowed, not replaced
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures) == (1, 1)


def test_with_block_on_open_breaker_raises_before_the_body(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    fail(breaker)
    ran = []
    with pytest.raises(CircuitOpenError), breaker:
        ran.append(1)
    assert ran == []


def test_with_block_enter_returns_none(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    with breaker as entered:
        assert entered is None


def test_nested_breakers_each_record_their_own_outcome(clock: ManualClock) -> None:
    outer = make_breaker(clock, failure_threshold=5)
    inner = CircuitBreaker("inner", failure_threshold=5, clock=clock)
    with outer, inner:
        pass
    with pytest.raises(Boom), outer, inner:
        raise Boom
    for breaker in (outer, inner):
        metrics = breaker.metrics()
        assert (metrics.successes, metrics.failures) == (1, 1)


def test_inner_breaker_refusal_propagates_through_the_outer_one(clock: ManualClock) -> None:
    outer = make_breaker(clock, failure_threshold=5)
    inner = CircuitBreaker("inner", failure_threshold=1, clock=clock)
    fail(inner)
    with pytest.raises(CircuitOpenError) as caught, outer, inner:
        pass
    assert caught.value.name == "inner"
    assert outer.metrics().calls == 1  # the outer block ran and saw an exception


def test_same_breaker_nested_takes_two_permits(clock: ManualClock) -> None:
    breaker = half_open(clock, half_open_max_calls=2, success_threshold=3)
    with breaker, breaker:
        assert breaker.try_acquire() is None
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.metrics().successes == 2
    with breaker:
        pass
    assert breaker.state is CircuitState.CLOSED


def test_exit_without_enter_raises_runtime_error(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    with pytest.raises(RuntimeError, match="svc"):
        breaker.__exit__(None, None, None)
    assert breaker.metrics().calls == 0


def test_exit_on_another_thread_raises_and_the_entering_thread_can_still_exit(
    clock: ManualClock,
) -> None:
    breaker = make_breaker(clock)
    breaker.__enter__()
    errors: list[BaseException] = []

    def exit_elsewhere() -> None:
        try:
            breaker.__exit__(None, None, None)
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=exit_elsewhere)
    thread.start()
    thread.join(5)
    assert len(errors) == 1
    assert breaker.__exit__(None, None, None) is False
    assert breaker.metrics().successes == 1


# ---- permits -----------------------------------------------------------------------------


def test_try_acquire_and_acquire_give_permits_when_closed(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    permit = breaker.try_acquire()
    assert isinstance(permit, CircuitPermit)
    assert permit.recorded is False
    permit.success()
    assert permit.recorded is True
    permit = breaker.acquire()
    permit.failure()
    permit = breaker.acquire()
    permit.ignore()
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures, metrics.ignored) == (1, 1, 1)


def test_open_try_acquire_returns_none_and_acquire_raises(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    breaker.acquire().failure()
    assert breaker.try_acquire() is None
    with pytest.raises(CircuitOpenError) as caught:
        breaker.acquire()
    assert caught.value.retry_after == pytest.approx(10.0)
    assert breaker.metrics().rejected == 2


@pytest.mark.parametrize(
    ("error", "counted_as"),
    [
        (Boom("recorded"), "failures"),
        (Other("not recorded"), "successes"),
        (KeyError("ignored"), "ignored"),
        (KeyboardInterrupt(), "ignored"),
        (asyncio.CancelledError(), "ignored"),
        (SystemExit(1), "ignored"),
        (GeneratorExit(), "ignored"),
    ],
)
def test_permit_record_exception_classifies(
    clock: ManualClock, error: BaseException, counted_as: str
) -> None:
    breaker = make_breaker(clock, record_exceptions=Boom, ignore_exceptions=KeyError)
    permit = breaker.acquire()
    permit.record_exception(error)
    assert permit.recorded
    metrics = breaker.metrics()
    counts = {
        "successes": metrics.successes,
        "failures": metrics.failures,
        "ignored": metrics.ignored,
    }
    assert counts == {name: int(name == counted_as) for name in counts}


def test_permit_record_result_asks_the_predicate(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=3, result_is_failure=lambda value: value is None
    )
    breaker.acquire().record_result("fine")
    breaker.acquire().record_result(None)
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures) == (1, 1)
    plain = make_breaker(clock)
    plain.acquire().record_result(None)
    assert plain.metrics().successes == 1


def test_permit_record_result_with_a_raising_predicate_ignores_the_call(
    clock: ManualClock,
) -> None:
    def predicate(value: object) -> bool:
        raise Other("predicate broke")

    breaker = half_open(clock, result_is_failure=predicate)
    permit = breaker.acquire()
    with pytest.raises(Other, match="predicate broke"):
        permit.record_result(1)
    assert permit.recorded
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.try_acquire() is not None  # the trial slot came back


_RECORDERS: list[Callable[[CircuitPermit], None]] = [
    lambda permit: permit.success(),
    lambda permit: permit.failure(),
    lambda permit: permit.ignore(),
    lambda permit: permit.record_exception(Boom()),
    lambda permit: permit.record_result(1),
]


@pytest.mark.parametrize("first", range(len(_RECORDERS)))
@pytest.mark.parametrize("second", range(len(_RECORDERS)))
def test_recording_twice_raises_and_changes_nothing(
    clock: ManualClock, first: int, second: int
) -> None:
    breaker = make_breaker(clock, failure_threshold=5)
    permit = breaker.acquire()
    _RECORDERS[first](permit)
    before = breaker.metrics()
    with pytest.raises(RuntimeError, match="already recorded"):
        _RECORDERS[second](permit)
    after = breaker.metrics()
    assert (after.successes, after.failures, after.ignored) == (
        before.successes,
        before.failures,
        before.ignored,
    )


def test_dropped_permit_releases_its_half_open_slot(clock: ManualClock) -> None:
    breaker = half_open(clock)
    permit = breaker.try_acquire()
    assert permit is not None
    assert breaker.try_acquire() is None
    del permit
    gc.collect()
    replacement = breaker.try_acquire()
    assert replacement is not None
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.metrics().ignored == 1
    replacement.success()
    assert breaker.state is CircuitState.CLOSED


def test_dropped_recorded_permit_records_nothing_more(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    permit = breaker.acquire()
    permit.success()
    del permit
    gc.collect()
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.ignored) == (1, 0)


def test_permit_as_context_manager(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    with breaker.acquire() as permit:
        assert isinstance(permit, CircuitPermit)
    assert permit.recorded
    with pytest.raises(Boom), breaker.acquire():
        raise Boom
    with breaker.acquire() as permit:
        permit.ignore()  # recorded inside: the exit records nothing more

    def record_then_raise() -> None:
        with breaker.acquire() as permit:
            permit.failure()
            raise Other

    with pytest.raises(Other):
        record_then_raise()
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures, metrics.ignored) == (1, 2, 1)


def test_stale_permit_does_not_touch_the_new_state(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2, reset_timeout=1.0)
    early = breaker.acquire()
    fail(breaker)
    fail(breaker)
    clock.advance(1.0)
    succeed(breaker)
    assert breaker.state is CircuitState.CLOSED
    early.failure()  # admitted in the first closed period
    fail(breaker)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().consecutive_failures == 1


# ---- fallback ----------------------------------------------------------------------------


def test_fallback_gets_the_call_arguments_when_refused(clock: ManualClock) -> None:
    got: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fallback(*args: Any, **kwargs: Any) -> str:
        got.append((args, kwargs))
        return "cached"

    breaker = make_breaker(clock, fallback=fallback)
    assert breaker.fallback is fallback
    fail(breaker)
    called = []
    assert breaker.call(called.append, 1, key="v") == "cached"
    assert called == []
    assert got == [((1,), {"key": "v"})]
    assert breaker.metrics().rejected == 1


def test_fallback_is_never_called_on_admitted_calls(clock: ManualClock) -> None:
    fallback_calls = []
    breaker = make_breaker(clock, failure_threshold=3, fallback=lambda *a: fallback_calls.append(a))
    succeed(breaker)
    fail(breaker)  # the failure propagates; the fallback is only for refusals
    assert fallback_calls == []


def test_fallback_serves_decorated_functions_and_methods(clock: ManualClock) -> None:
    got = []
    breaker = make_breaker(clock, fallback=lambda *args: got.append(args) or "fallback")

    @breaker
    def fetch(x: int) -> int:
        raise Boom

    class Client:
        @breaker
        def get(self, x: int) -> int:
            return x

    with pytest.raises(Boom):
        fetch(1)
    client = Client()
    assert fetch(2) == "fallback"
    assert client.get(3) == "fallback"
    assert got == [(2,), (client, 3)]


def test_fallback_serves_half_open_refusals(clock: ManualClock) -> None:
    breaker = half_open(clock, fallback=lambda: "fallback")
    permit = breaker.acquire()
    assert breaker.call(lambda: "real") == "fallback"
    permit.success()
    assert breaker.call(lambda: "real") == "real"


def test_fallback_errors_propagate(clock: ManualClock) -> None:
    breaker = make_breaker(clock, fallback=lambda: raise_(Other("fallback broke")))
    fail(breaker)
    with pytest.raises(Other, match="fallback broke"):
        breaker.call(lambda: 1)


def test_with_and_acquire_raise_even_with_a_fallback(clock: ManualClock) -> None:
    breaker = make_breaker(clock, fallback=lambda: "fallback")
    fail(breaker)
    with pytest.raises(CircuitOpenError), breaker:
        pass
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    assert breaker.try_acquire() is None


# ---- listeners ---------------------------------------------------------------------------


def test_listeners_see_each_transition_in_order(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    seen: list[tuple[Any, CircuitState, CircuitState]] = []
    breaker.add_listener(lambda b, old, new: seen.append((b, old, new)))
    succeed(breaker)
    assert seen == []
    fail(breaker)
    breaker.try_acquire()  # refused: no transition
    clock.advance(10.0)
    succeed(breaker)  # open -> half_open, then half_open -> closed
    breaker.force_open()
    breaker.disable()
    breaker.reset()
    breaker.reset()  # closed -> closed is no transition
    assert [(old, new) for _, old, new in seen] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("closed", "forced_open"),
        ("forced_open", "disabled"),
        ("disabled", "closed"),
    ]
    for who, old, new in seen:
        assert who is breaker
        assert type(old) is CircuitState
        assert type(new) is CircuitState


def test_reading_state_after_the_wait_notifies_half_open(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    seen = []
    breaker.add_listener(lambda b, old, new: seen.append(new))
    fail(breaker)
    clock.advance(10.0)
    assert breaker.state is CircuitState.HALF_OPEN
    assert seen == ["open", "half_open"]
    assert breaker.state is CircuitState.HALF_OPEN
    assert seen == ["open", "half_open"]


def test_half_open_failure_notifies_reopen(clock: ManualClock) -> None:
    breaker = half_open(clock)
    seen = []
    breaker.add_listener(lambda b, old, new: seen.append((old, new)))
    fail(breaker)
    assert seen == [("half_open", "open")]


def test_listeners_run_in_registration_order(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    order = []
    for tag in "abc":
        breaker.add_listener(functools.partial(lambda tag, *_: order.append(tag), tag))
    fail(breaker)
    assert order == ["a", "b", "c"]


def test_listener_sees_the_new_state_and_may_use_the_breaker(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    seen = []

    def listener(b: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        seen.append((b.state, b.metrics().state, b.retry_after))

    breaker.add_listener(listener)
    fail(breaker)
    assert seen == [("open", "open", pytest.approx(10.0))]


def test_raising_listener_does_not_break_the_call(
    clock: ManualClock, unraisable: list[Any]
) -> None:
    breaker = make_breaker(clock)
    after = []

    def broken(*_: Any) -> None:
        raise Other("listener broke")

    breaker.add_listener(broken)
    breaker.add_listener(lambda *_: after.append(1))
    fail(breaker)  # the call's own exception, not the listener's
    assert breaker.state is CircuitState.OPEN
    assert after == [1]
    assert len(unraisable) == 1
    assert isinstance(unraisable[0].exc_value, Other)
    assert unraisable[0].object is broken
    breaker.reset()  # a transition from an operator action is protected too
    assert len(unraisable) == 2
    assert after == [1, 1]


def test_raising_listener_does_not_break_a_success(
    clock: ManualClock, unraisable: list[Any]
) -> None:
    breaker = half_open(clock)
    breaker.add_listener(lambda *_: raise_(Other("listener broke")))
    assert breaker.call(lambda: 7) == 7
    assert breaker.state is CircuitState.CLOSED
    assert len(unraisable) == 1


def test_remove_listener(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    seen = []

    def listener(*args: Any) -> None:
        seen.append(args)

    breaker.add_listener(listener)
    breaker.remove_listener(listener)
    fail(breaker)
    assert seen == []
    with pytest.raises(ValueError, match="listener"):
        breaker.remove_listener(listener)


def test_remove_unknown_listener_raises_value_error(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    breaker.add_listener(print)
    with pytest.raises(ValueError, match="listener"):
        breaker.remove_listener(lambda *_: None)


def test_listener_added_twice_runs_twice_until_removed_once(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    seen = []

    def listener(*_: Any) -> None:
        seen.append(1)

    breaker.add_listener(listener)
    breaker.add_listener(listener)
    breaker.force_open()
    assert seen == [1, 1]
    breaker.remove_listener(listener)
    breaker.reset()
    assert seen == [1, 1, 1]


def test_bound_method_listener_is_removed_by_an_equal_bound_method(clock: ManualClock) -> None:
    class Watcher:
        def __init__(self) -> None:
            self.seen: list[CircuitState] = []

        def on_change(self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
            self.seen.append(new)

    watcher = Watcher()
    breaker = make_breaker(clock)
    breaker.add_listener(watcher.on_change)
    breaker.force_open()
    breaker.remove_listener(watcher.on_change)  # a new, equal bound-method object
    breaker.reset()
    assert watcher.seen == ["forced_open"]


# ---- what counts as a failure ------------------------------------------------------------


def test_default_records_every_exception(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    fail(breaker, ValueError())
    fail(breaker, OSError())
    fail(breaker, ZeroDivisionError())
    assert breaker.state is CircuitState.OPEN


def test_record_exceptions_limits_failures_to_those_types(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=2, record_exceptions=(ConnectionError, TimeoutError)
    )
    fail(breaker, ConnectionError())
    fail(breaker, Other())  # not recorded: counts as a success
    metrics = breaker.metrics()
    assert (metrics.failures, metrics.successes, metrics.consecutive_failures) == (1, 1, 0)
    fail(breaker, ConnectionRefusedError())  # subclasses count
    fail(breaker, TimeoutError())
    assert breaker.state is CircuitState.OPEN


def test_record_exceptions_accepts_one_class_or_a_list(clock: ManualClock) -> None:
    single = make_breaker(clock, record_exceptions=Boom)
    fail(single, Other())
    assert single.state is CircuitState.CLOSED
    fail(single)
    assert single.state is CircuitState.OPEN
    listed = make_breaker(clock, record_exceptions=[Boom])
    fail(listed)
    assert listed.state is CircuitState.OPEN


def test_ignored_exceptions_count_neither_way(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2, ignore_exceptions=KeyError)
    fail(breaker)
    fail(breaker, KeyError("k"))  # neither breaks the run nor extends it
    metrics = breaker.metrics()
    assert (metrics.calls, metrics.failures, metrics.ignored) == (1, 1, 1)
    assert metrics.consecutive_failures == 1
    fail(breaker)
    assert breaker.state is CircuitState.OPEN


def test_ignore_wins_over_record(clock: ManualClock) -> None:
    breaker = make_breaker(clock, record_exceptions=LookupError, ignore_exceptions=KeyError)
    fail(breaker, KeyError())
    assert breaker.state is CircuitState.CLOSED
    fail(breaker, IndexError())
    assert breaker.state is CircuitState.OPEN


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), asyncio.CancelledError(), SystemExit(0), GeneratorExit()]
)
def test_base_exceptions_are_ignored(clock: ManualClock, error: BaseException) -> None:
    breaker = half_open(clock)
    fail(breaker, error)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.metrics().ignored == 1
    succeed(breaker)  # the trial slot was given back
    assert breaker.state is CircuitState.CLOSED


def test_base_exception_in_with_block_is_ignored(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    with pytest.raises(KeyboardInterrupt), breaker:
        raise KeyboardInterrupt
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().ignored == 1


# ---- result_is_failure -------------------------------------------------------------------


def test_result_is_failure_counts_results_as_failures_but_returns_them(
    clock: ManualClock,
) -> None:
    seen = []

    def predicate(value: object) -> bool:
        seen.append(value)
        return isinstance(value, int) and value >= 500

    breaker = make_breaker(clock, failure_threshold=2, result_is_failure=predicate)
    assert breaker.call(lambda: 200) == 200
    assert breaker.call(lambda: 503) == 503
    assert breaker.metrics().consecutive_failures == 1

    @breaker
    def status() -> int:
        return 500

    assert status() == 500
    assert seen == [200, 503, 500]
    assert breaker.state is CircuitState.OPEN


def test_result_is_failure_uses_truthiness(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=1, result_is_failure=lambda value: value)
    assert breaker.call(list) == []
    assert breaker.state is CircuitState.CLOSED
    assert breaker.call(lambda: [0]) == [0]
    assert breaker.state is CircuitState.OPEN


def test_result_is_failure_is_not_asked_about_exceptions(clock: ManualClock) -> None:
    asked = []
    breaker = make_breaker(clock, failure_threshold=3, result_is_failure=lambda v: asked.append(v))
    fail(breaker)
    with pytest.raises(Boom), breaker:
        raise Boom
    assert asked == []


def test_raising_predicate_propagates_and_ignores_the_call(clock: ManualClock) -> None:
    def predicate(value: object) -> bool:
        raise Other(f"cannot judge {value}")

    breaker = half_open(clock, result_is_failure=predicate)
    with pytest.raises(Other, match="cannot judge 5"):
        breaker.call(lambda: 5)
    assert breaker.state is CircuitState.HALF_OPEN
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures, metrics.ignored) == (0, 1, 1)
    assert breaker.try_acquire() is not None  # the trial slot came back


# ---- metrics -----------------------------------------------------------------------------


def test_metrics_fields(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        failure_rate_threshold=0.75,
        slow_call_rate_threshold=1.0,
        slow_call_duration=1.0,
        window_size=10,
        minimum_calls=4,
        ignore_exceptions=KeyError,
    )
    metrics = breaker.metrics()
    assert isinstance(metrics, BreakerMetrics)
    assert metrics.state is CircuitState.CLOSED
    assert metrics.failure_rate is None
    assert metrics.slow_call_rate is None
    succeed(breaker)
    fail(breaker)
    fail(breaker, KeyError())
    breaker.call(clock.advance, 2.0)  # a slow success
    metrics = breaker.metrics()
    assert metrics.failure_rate is None  # 3 calls: below minimum_calls
    fail(breaker)
    metrics = breaker.metrics()
    assert metrics.state is CircuitState.CLOSED
    assert metrics.window_calls == 4
    assert metrics.window_failures == 2
    assert metrics.window_slow_calls == 1
    assert metrics.failure_rate == 0.5
    assert metrics.slow_call_rate == 0.25
    assert metrics.calls == 4
    assert metrics.successes == 2
    assert metrics.failures == 2
    assert metrics.slow_calls == 1
    assert metrics.ignored == 1
    assert metrics.rejected == 0
    assert metrics.transitions == 0
    assert metrics.consecutive_failures == 1
    assert metrics.consecutive_trips == 0
    assert "state=<CircuitState.CLOSED" in repr(metrics)


def test_metrics_after_trip_count_rejections_and_transitions(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    fail(breaker)
    fail(breaker)
    for _ in range(3):
        assert breaker.try_acquire() is None
    metrics = breaker.metrics()
    assert metrics.state is CircuitState.OPEN
    assert (metrics.window_calls, metrics.consecutive_failures) == (0, 0)
    assert (metrics.rejected, metrics.transitions, metrics.consecutive_trips) == (3, 1, 1)
    assert (metrics.calls, metrics.failures) == (2, 2)


def test_metrics_is_a_snapshot(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    before = breaker.metrics()
    fail(breaker)
    assert before.failures == 0
    assert breaker.metrics().failures == 1


# ---- CircuitOpenError --------------------------------------------------------------------


def test_circuit_open_error_attributes_and_message(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    fail(breaker)
    clock.advance(2.5)
    with pytest.raises(CircuitOpenError) as caught:
        breaker.call(lambda: None)
    error = caught.value
    assert isinstance(error, ButtressError)
    assert isinstance(error, Exception)
    assert error.name == "svc"
    assert error.retry_after == pytest.approx(7.5)
    message = str(error)
    assert "svc" in message
    assert "7.500" in message
    assert message[0].isupper()
    assert message.endswith(".")


def test_circuit_open_error_pickles(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    fail(breaker)
    with pytest.raises(CircuitOpenError) as caught:
        breaker.acquire()
    for error in (caught.value, CircuitOpenError("x", None), CircuitOpenError("y", 0.0)):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is CircuitOpenError
        assert copy.name == error.name
        assert copy.retry_after == error.retry_after
        assert str(copy) == str(error)
        assert copy.args == error.args


def test_forced_open_has_no_retry_after(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    breaker.force_open()
    assert breaker.retry_after is None
    with pytest.raises(CircuitOpenError) as caught:
        breaker.call(lambda: None)
    assert caught.value.retry_after is None
    message = str(caught.value)
    assert "forced open" in message
    assert message[0].isupper()
    assert message.endswith(".")


def test_half_open_with_busy_slots_refuses_with_zero_retry_after(clock: ManualClock) -> None:
    breaker = half_open(clock, half_open_max_calls=2, success_threshold=2)
    first, second = breaker.acquire(), breaker.acquire()
    with pytest.raises(CircuitOpenError) as caught:
        breaker.acquire()
    assert caught.value.retry_after == 0.0
    first.success()
    second.success()
    assert breaker.state is CircuitState.CLOSED


def test_retry_after_counts_down(clock: ManualClock) -> None:
    breaker = make_breaker(clock, reset_timeout=4.0)
    assert breaker.retry_after == 0.0
    fail(breaker)
    assert breaker.retry_after == pytest.approx(4.0)
    clock.advance(1.5)
    assert breaker.retry_after == pytest.approx(2.5)
    clock.advance(2.5)
    assert breaker.retry_after == 0.0


# ---- operator actions --------------------------------------------------------------------


def test_force_open_refuses_whatever_the_clock_says(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    breaker.force_open()
    clock.advance(10_000.0)
    assert breaker.state is CircuitState.FORCED_OPEN
    assert breaker.try_acquire() is None
    breaker.force_open()  # again: no transition
    assert breaker.metrics().transitions == 1
    breaker.reset()
    assert breaker.state is CircuitState.CLOSED
    succeed(breaker)


def test_disable_admits_everything_and_never_trips(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    fail(breaker)
    breaker.disable()
    assert breaker.state is CircuitState.DISABLED
    assert breaker.retry_after == 0.0
    for _ in range(20):
        fail(breaker)
    assert breaker.state is CircuitState.DISABLED
    assert breaker.metrics().window_calls == 0
    breaker.reset()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().consecutive_failures == 0


def test_disabled_breaker_counts_nothing(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=3)
    succeed(breaker)
    breaker.disable()
    before = breaker.metrics()
    for _ in range(5):
        fail(breaker)
        succeed(breaker)
    after = breaker.metrics()
    assert (after.calls, after.successes, after.failures) == (
        before.calls,
        before.successes,
        before.failures,
    )


def test_reset_from_open_closes_and_forgets_the_trips(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock, reset_timeout=1.0, backoff_multiplier=2.0, max_reset_timeout=100.0
    )
    fail(breaker)
    clock.advance(1.0)
    fail(breaker)  # the half-open trial fails: second trip
    assert breaker.retry_after == pytest.approx(2.0)
    breaker.reset()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().consecutive_trips == 0
    fail(breaker)
    assert breaker.retry_after == pytest.approx(1.0)


def test_reset_of_a_closed_breaker_starts_a_fresh_window(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=3,
        failure_rate_threshold=0.5,
        window_size=4,
        minimum_calls=4,
    )
    fail(breaker)
    fail(breaker)
    succeed(breaker)
    transitions = breaker.metrics().transitions
    breaker.reset()
    metrics = breaker.metrics()
    assert metrics.state is CircuitState.CLOSED
    assert (metrics.consecutive_failures, metrics.window_calls) == (0, 0)
    assert metrics.transitions == transitions
    fail(breaker)
    assert breaker.state is CircuitState.CLOSED


# ---- half-open ---------------------------------------------------------------------------


def test_half_open_admits_max_calls_and_closes_after_success_threshold(
    clock: ManualClock,
) -> None:
    breaker = half_open(clock, half_open_max_calls=2, success_threshold=3)
    first, second = breaker.acquire(), breaker.acquire()
    assert breaker.try_acquire() is None
    first.success()
    second.success()
    assert breaker.state is CircuitState.HALF_OPEN
    succeed(breaker)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().consecutive_trips == 0


def test_half_open_failure_reopens_even_after_successes(clock: ManualClock) -> None:
    breaker = half_open(clock, half_open_max_calls=1, success_threshold=3)
    succeed(breaker)
    succeed(breaker)
    fail(breaker)
    assert breaker.state is CircuitState.OPEN
    assert breaker.retry_after == pytest.approx(10.0)


def test_half_open_counts_successes_afresh_after_reopening(clock: ManualClock) -> None:
    breaker = half_open(clock, success_threshold=2)
    succeed(breaker)
    fail(breaker)
    clock.advance(10.0)
    succeed(breaker)
    assert breaker.state is CircuitState.HALF_OPEN
    succeed(breaker)
    assert breaker.state is CircuitState.CLOSED


def test_ignored_trial_does_not_count_toward_success_threshold(clock: ManualClock) -> None:
    breaker = half_open(clock, success_threshold=1, ignore_exceptions=KeyError)
    fail(breaker, KeyError())
    assert breaker.state is CircuitState.HALF_OPEN
    succeed(breaker)
    assert breaker.state is CircuitState.CLOSED


# ---- windows -----------------------------------------------------------------------------


def test_count_window_trips_on_failure_rate_once_minimum_calls_seen(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=None, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    fail(breaker)
    fail(breaker)
    succeed(breaker)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().failure_rate is None
    succeed(breaker)
    assert breaker.state is CircuitState.OPEN


def test_count_window_forgets_the_oldest_call(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=None, failure_rate_threshold=0.75, window_size=4, minimum_calls=4
    )
    for record in (fail, fail, succeed, succeed):
        record(breaker)
    assert breaker.metrics().failure_rate == 0.5
    fail(breaker)  # replaces the first failure
    fail(breaker)  # replaces the second failure
    assert breaker.metrics().failure_rate == 0.5
    assert breaker.state is CircuitState.CLOSED
    fail(breaker)  # replaces a success: 3 of 4
    assert breaker.state is CircuitState.OPEN


def test_count_window_minimum_calls_is_clamped_to_the_window(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=None, failure_rate_threshold=1.0, window_size=3, minimum_calls=50
    )
    fail(breaker)
    fail(breaker)
    assert breaker.state is CircuitState.CLOSED
    fail(breaker)
    assert breaker.state is CircuitState.OPEN


def test_time_window_trips_on_failure_rate_and_forgets_old_seconds(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_type="time",
        window_size=10,
        minimum_calls=4,
    )
    fail(breaker)
    fail(breaker)
    clock.advance(9.5)
    assert breaker.metrics().window_calls == 2
    clock.advance(0.5)  # second 10: second 0 has left the window
    assert breaker.metrics().window_calls == 0
    succeed(breaker)
    succeed(breaker)
    fail(breaker)
    metrics = breaker.metrics()
    assert (metrics.window_calls, metrics.window_failures) == (3, 1)
    assert breaker.state is CircuitState.CLOSED
    fail(breaker)
    assert breaker.state is CircuitState.OPEN


def test_time_window_adds_up_calls_across_seconds(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_type="time",
        window_size=3,
        minimum_calls=2,
    )
    succeed(breaker)
    clock.advance(1.0)
    succeed(breaker)
    clock.advance(1.0)
    fail(breaker)  # 1 of 3 in seconds 0..2
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().failure_rate == pytest.approx(1 / 3)
    clock.advance(1.0)
    fail(breaker)  # seconds 1..3: 2 of 3
    assert breaker.state is CircuitState.OPEN


def test_time_window_does_not_clamp_minimum_calls(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_type="time",
        window_size=1,
        minimum_calls=5,
    )
    for _ in range(4):
        fail(breaker)
    assert breaker.state is CircuitState.CLOSED
    fail(breaker)
    assert breaker.state is CircuitState.OPEN


def slow(clock: ManualClock, seconds: float, error: BaseException | None = None) -> None:
    clock.advance(seconds)
    if error is not None:
        raise error


def test_slow_call_rate_trips_on_slow_successes(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        slow_call_rate_threshold=0.5,
        slow_call_duration=1.0,
        window_size=4,
        minimum_calls=4,
    )
    breaker.call(slow, clock, 1.0)  # exactly the duration counts as slow
    breaker.call(slow, clock, 0.999)
    breaker.call(slow, clock, 5.0)
    assert breaker.state is CircuitState.CLOSED
    breaker.call(slow, clock, 0.0)
    assert breaker.state is CircuitState.OPEN
    metrics = breaker.metrics()
    assert (metrics.slow_calls, metrics.successes, metrics.failures) == (2, 4, 0)


def test_slow_failures_count_as_slow_and_failed(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        failure_rate_threshold=1.0,
        slow_call_rate_threshold=1.0,
        slow_call_duration=1.0,
        window_size=10,
        minimum_calls=10,
    )
    with pytest.raises(Boom):
        breaker.call(slow, clock, 2.0, Boom())
    metrics = breaker.metrics()
    assert (metrics.window_failures, metrics.window_slow_calls) == (1, 1)


def test_slow_call_rate_over_a_time_window(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        slow_call_rate_threshold=1.0,
        slow_call_duration=2.0,
        window_type="time",
        window_size=60,
        minimum_calls=2,
    )
    breaker.call(slow, clock, 3.0)
    with breaker:
        clock.advance(2.0)
    assert breaker.state is CircuitState.OPEN
    assert breaker.metrics().slow_calls == 2


def test_slow_calls_are_not_tracked_without_a_slow_rate(clock: ManualClock) -> None:
    breaker = make_breaker(clock, slow_call_duration=1.0)
    breaker.call(slow, clock, 5.0)
    assert breaker.metrics().slow_calls == 0


def test_slow_trial_call_reopens(clock: ManualClock) -> None:
    breaker = half_open(clock, slow_call_rate_threshold=1.0, slow_call_duration=1.0)
    breaker.call(slow, clock, 1.5)  # succeeds, but slowly
    assert breaker.state is CircuitState.OPEN


def test_consecutive_and_rate_rules_work_together(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock, failure_threshold=3, failure_rate_threshold=0.9, window_size=10, minimum_calls=10
    )
    fail(breaker)
    fail(breaker)
    fail(breaker)
    assert breaker.state is CircuitState.OPEN


def test_stale_outcome_does_not_skew_the_count_window(clock: ManualClock) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_size=4,
        minimum_calls=4,
        reset_timeout=1.0,
    )
    long_call = breaker.acquire()  # admitted while closed; it ends much later
    for _ in range(4):
        breaker.acquire().failure()
    assert breaker.state is CircuitState.OPEN
    clock.advance(1.0)
    succeed(breaker)  # the trial call closes it: a fresh window
    for record in (fail, succeed, succeed, succeed):
        record(breaker)
    long_call.success()  # stale: must not touch the new window
    succeed(breaker)
    fail(breaker)  # the last four calls: S, S, S, F
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().failure_rate == 0.25


def test_stale_outcome_does_not_keep_expired_calls_in_the_time_window(
    clock: ManualClock,
) -> None:
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_type="time",
        window_size=2,
        minimum_calls=3,
        reset_timeout=1.0,
    )
    long_call = breaker.acquire()  # admitted while closed; it ends much later
    for _ in range(3):
        breaker.acquire().failure()
    assert breaker.state is CircuitState.OPEN
    clock.advance(1.0)
    succeed(breaker)  # closes: a fresh window
    fail(breaker)
    fail(breaker)  # two failures at second 1, below minimum_calls
    clock.advance(5.0)  # both leave the 2-second window
    long_call.success()  # stale: must not touch the new window
    succeed(breaker)  # the only call in the window
    assert breaker.state is CircuitState.CLOSED


def test_time_window_sweeps_expired_calls_before_judging(clock: ManualClock) -> None:
    # The control for the stale-outcome case above: without one, expired failures are swept.
    breaker = make_breaker(
        clock,
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_type="time",
        window_size=2,
        minimum_calls=3,
    )
    fail(breaker)
    fail(breaker)
    clock.advance(5.0)
    succeed(breaker)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().window_calls == 1


@given(
    outcomes=st.lists(st.sampled_from("sfi"), max_size=40),
    window_size=st.integers(1, 8),
    minimum_calls=st.integers(1, 10),
    threshold=st.sampled_from([0.25, 0.5, 2 / 3, 0.75, 1.0]),
)
def test_count_window_matches_a_model(
    outcomes: list[str], window_size: int, minimum_calls: int, threshold: float
) -> None:
    breaker = CircuitBreaker(
        failure_threshold=None,
        failure_rate_threshold=threshold,
        window_size=window_size,
        minimum_calls=minimum_calls,
        clock=ManualClock(),
    )
    window: list[bool] = []
    needed = min(minimum_calls, window_size)
    for outcome in outcomes:
        permit = breaker.acquire()
        if outcome == "i":
            permit.ignore()
        else:
            permit.success() if outcome == "s" else permit.failure()
            window = [*window, outcome == "f"][-window_size:]
        failures = sum(window)
        tripped = len(window) >= needed and failures / len(window) >= threshold
        if tripped:
            assert breaker.state is CircuitState.OPEN
            return
        metrics = breaker.metrics()
        assert metrics.state is CircuitState.CLOSED
        assert (metrics.window_calls, metrics.window_failures) == (len(window), failures)
        expected_rate = failures / len(window) if len(window) >= needed else None
        assert metrics.failure_rate == expected_rate


@given(
    steps=st.lists(
        st.tuples(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 2.0, 7.0]), st.sampled_from("sf")),
        max_size=40,
    ),
    window_size=st.integers(1, 5),
    minimum_calls=st.integers(1, 6),
    threshold=st.sampled_from([0.5, 0.75, 1.0]),
)
def test_time_window_matches_a_model(
    steps: list[tuple[float, str]], window_size: int, minimum_calls: int, threshold: float
) -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(
        failure_threshold=None,
        failure_rate_threshold=threshold,
        window_type="time",
        window_size=window_size,
        minimum_calls=minimum_calls,
        clock=clock,
    )
    calls: list[tuple[int, bool]] = []  # (whole second, failed)
    for advance, outcome in steps:
        clock.advance(advance)
        second = int(clock.now())
        permit = breaker.acquire()
        permit.success() if outcome == "s" else permit.failure()
        calls = [call for call in calls if second - call[0] < window_size]
        calls.append((second, outcome == "f"))
        failures = sum(failed for _, failed in calls)
        if len(calls) >= minimum_calls and failures / len(calls) >= threshold:
            assert breaker.state is CircuitState.OPEN
            return
        metrics = breaker.metrics()
        assert metrics.state is CircuitState.CLOSED
        assert (metrics.window_calls, metrics.window_failures) == (len(calls), failures)


# ---- backoff and jitter ------------------------------------------------------------------


def open_waits(clock: ManualClock, breaker: CircuitBreaker, trips: int) -> list[float]:
    """Trips `breaker` `trips` times in a row (each half-open trial failing) and returns each
    open wait."""
    waits = []
    fail(breaker)
    for _ in range(trips):
        wait = breaker.retry_after
        assert wait is not None
        waits.append(wait)
        clock.advance(wait)
        fail(breaker)
    return waits


def test_exponential_backoff_up_to_the_cap(clock: ManualClock) -> None:
    breaker = make_breaker(clock, reset_timeout=1.0, backoff_multiplier=2.0, max_reset_timeout=5.0)
    assert open_waits(clock, breaker, 6) == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    assert breaker.metrics().consecutive_trips == 7


def test_backoff_cap_defaults_to_ten_reset_timeouts(clock: ManualClock) -> None:
    breaker = make_breaker(clock, reset_timeout=1.0, backoff_multiplier=3.0)
    assert open_waits(clock, breaker, 5) == pytest.approx([1.0, 3.0, 9.0, 10.0, 10.0])


def test_no_backoff_by_default(clock: ManualClock) -> None:
    breaker = make_breaker(clock, reset_timeout=2.0)
    assert open_waits(clock, breaker, 4) == pytest.approx([2.0] * 4)


def test_backoff_starts_over_after_closing(clock: ManualClock) -> None:
    breaker = make_breaker(clock, reset_timeout=1.0, backoff_multiplier=2.0, max_reset_timeout=60.0)
    assert open_waits(clock, breaker, 3) == pytest.approx([1.0, 2.0, 4.0])
    clock.advance(8.0)
    succeed(breaker)
    assert breaker.state is CircuitState.CLOSED
    fail(breaker)
    assert breaker.retry_after == pytest.approx(1.0)


def test_jitter_spreads_waits_within_bounds(clock: ManualClock) -> None:
    breaker = make_breaker(clock, reset_timeout=10.0, max_reset_timeout=100.0, jitter=0.5)
    waits = []
    for _ in range(200):
        breaker.reset()
        fail(breaker)
        wait = breaker.retry_after
        assert wait is not None
        waits.append(wait)
    assert min(waits) >= 5.0 - 1e-3
    assert max(waits) <= 15.0 + 1e-3
    assert min(waits) < 7.0
    assert max(waits) > 13.0
    assert len({round(wait, 3) for wait in waits}) > 100


def test_jitter_never_exceeds_the_cap(clock: ManualClock) -> None:
    breaker = make_breaker(clock, reset_timeout=10.0, max_reset_timeout=12.0, jitter=0.5)
    waits = []
    for _ in range(200):
        breaker.reset()
        fail(breaker)
        waits.append(breaker.retry_after)
    assert max(waits) <= 12.0 + 1e-3
    assert min(waits) >= 5.0 - 1e-3
    assert min(waits) < 7.0


@given(
    reset_timeout=st.floats(0.01, 100.0),
    multiplier=st.floats(1.0, 4.0),
    cap_factor=st.floats(1.0, 20.0),
    jitter=st.floats(0.0, 0.99),
    trips=st.integers(1, 6),
)
def test_open_wait_stays_within_jitter_of_the_backoff_and_under_the_cap(
    reset_timeout: float, multiplier: float, cap_factor: float, jitter: float, trips: int
) -> None:
    clock = ManualClock()
    cap = reset_timeout * cap_factor
    breaker = make_breaker(
        clock,
        reset_timeout=reset_timeout,
        backoff_multiplier=multiplier,
        max_reset_timeout=cap,
        jitter=jitter,
    )
    for trip, wait in enumerate(open_waits(clock, breaker, trips)):
        base = min(reset_timeout * multiplier**trip, cap)
        assert wait <= min(base * (1 + jitter), cap) + 1e-3
        assert wait >= max(base * (1 - jitter), 0.001) - 1e-3


# ---- the package-level example -----------------------------------------------------------


def test_module_docstring_example() -> None:
    breaker = buttress.CircuitBreaker("search", failure_threshold=5)
    assert breaker.call(sum, [1, 2, 3]) == 6
