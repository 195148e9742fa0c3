"""Circuit breaker: buttress beside pybreaker and circuitbreaker, closed and open."""

from __future__ import annotations

from collections.abc import Callable

import buttress
import circuitbreaker
import pybreaker
import pytest
from _harness import BARE_FORM, BASELINE, BUTTRESS, FLOOR, Bench, Case, Made, registrar
from buttress import CircuitOpenError, CircuitState

RESULT = 1
REJECTED = "rejected"
# Long enough that no open breaker gets to half-open during a run (buttress allows 24 days).
RESET_TIMEOUT = 7 * 24 * 3600.0


def work() -> int:
    """The trivial function every successful call runs."""
    return RESULT


class Boom(Exception):
    pass


# --- breaker-success: a successful call through a closed breaker ------------------------------

SUCCESS: list[Case] = []
success = registrar(SUCCESS)


def _buttress_closed(breaker: buttress.CircuitBreaker) -> Callable[[], str]:
    before = breaker.metrics()

    def verify() -> str:
        after = breaker.metrics()
        assert breaker.state is CircuitState.CLOSED, breaker.state
        assert after.failures == before.failures
        assert after.rejected == before.rejected
        successes = after.successes - before.successes
        assert successes > 0
        return f"closed; {successes:,} successes, 0 failures"

    return verify


def _pybreaker_closed(breaker: pybreaker.CircuitBreaker) -> Callable[[], str]:
    def verify() -> str:
        assert breaker.current_state == pybreaker.STATE_CLOSED, breaker.current_state
        assert breaker.fail_counter == 0
        return "closed; 0 failures"

    return verify


def _circuitbreaker_closed(breaker: circuitbreaker.CircuitBreaker) -> Callable[[], str]:
    def verify() -> str:
        assert breaker.state == circuitbreaker.STATE_CLOSED, breaker.state
        assert breaker.failure_count == 0
        return "closed; 0 failures"

    return verify


@success(BASELINE, BARE_FORM)
def _() -> Made:
    def run() -> int:
        return work()

    return run, lambda: "returned 1"


@success(BUTTRESS, "@breaker")
def _() -> Made:
    breaker = buttress.CircuitBreaker("bench-success-decorator")
    guarded = breaker(work)

    def run() -> int:
        return guarded()

    return run, _buttress_closed(breaker)


@success(BUTTRESS, "call()")
def _() -> Made:
    breaker = buttress.CircuitBreaker("bench-success-call")

    def run() -> int:
        return breaker.call(work)

    return run, _buttress_closed(breaker)


@success(BUTTRESS, "with")
def _() -> Made:
    breaker = buttress.CircuitBreaker("bench-success-with")

    def run() -> int:
        with breaker:
            return work()

    return run, _buttress_closed(breaker)


@success("pybreaker", "call()")
def _() -> Made:
    breaker = pybreaker.CircuitBreaker(name="bench-success-call")

    def run() -> int:
        return breaker.call(work)

    return run, _pybreaker_closed(breaker)


@success("pybreaker", "@decorator")
def _() -> Made:
    breaker = pybreaker.CircuitBreaker(name="bench-success-decorator")
    guarded = breaker(work)

    def run() -> int:
        return guarded()

    return run, _pybreaker_closed(breaker)


@success("pybreaker", "with calling()")
def _() -> Made:
    breaker = pybreaker.CircuitBreaker(name="bench-success-with")

    def run() -> int:
        with breaker.calling():
            return work()

    return run, _pybreaker_closed(breaker)


@success("circuitbreaker", "@circuit")
def _() -> Made:
    breaker = circuitbreaker.CircuitBreaker(name="bench-success-decorator")
    guarded = breaker(work)  # what @circuit(...) does

    def run() -> int:
        return guarded()

    return run, _circuitbreaker_closed(breaker)


@success("circuitbreaker", "with")
def _() -> Made:
    # circuitbreaker's __enter__ does nothing (it never refuses a `with` block, even when
    # open); its __exit__ records the outcome.
    breaker = circuitbreaker.CircuitBreaker(name="bench-success-with")

    def run() -> int:
        with breaker:
            return work()

    return run, _circuitbreaker_closed(breaker)


@pytest.mark.benchmark(group="breaker-success")
@pytest.mark.parametrize("case", SUCCESS, ids=lambda case: case.id)
def test_breaker_success(bench: Bench, case: Case) -> None:
    bench(case, expect=RESULT)


# --- breaker-rejected: a call while the breaker is open ---------------------------------------

REJECTED_CASES: list[Case] = []
rejected = registrar(REJECTED_CASES)


def _spy() -> tuple[Callable[[], int], list[int]]:
    """A function that notes every time it runs: an open breaker must never let it."""
    admitted: list[int] = []

    def guarded_work() -> int:
        admitted.append(1)
        return RESULT

    return guarded_work, admitted


def _open_buttress(name: str) -> buttress.CircuitBreaker:
    breaker = buttress.CircuitBreaker(name, failure_threshold=1, reset_timeout=RESET_TIMEOUT)
    with pytest.raises(Boom), breaker:
        raise Boom
    assert breaker.state is CircuitState.OPEN, breaker.state
    return breaker


def _buttress_open(breaker: buttress.CircuitBreaker, admitted: list[int]) -> Callable[[], str]:
    before = breaker.metrics().rejected

    def verify() -> str:
        assert not admitted, f"{len(admitted)} calls ran through an open breaker"
        assert breaker.state is CircuitState.OPEN, breaker.state
        count = breaker.metrics().rejected - before
        assert count > 0
        return f"open throughout; {count:,} rejected, 0 admitted"

    return verify


def _open_pybreaker(name: str) -> pybreaker.CircuitBreaker:
    breaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=RESET_TIMEOUT, name=name)

    def fail() -> None:
        raise Boom

    with pytest.raises(pybreaker.CircuitBreakerError):  # tripping raises it too
        breaker.call(fail)
    assert breaker.current_state == pybreaker.STATE_OPEN
    return breaker


def _pybreaker_open(breaker: pybreaker.CircuitBreaker, admitted: list[int]) -> Callable[[], str]:
    def verify() -> str:
        assert not admitted, f"{len(admitted)} calls ran through an open breaker"
        assert breaker.current_state == pybreaker.STATE_OPEN, breaker.current_state
        return "open throughout; 0 admitted"

    return verify


def _open_circuitbreaker(name: str) -> circuitbreaker.CircuitBreaker:
    breaker = circuitbreaker.CircuitBreaker(
        failure_threshold=1, recovery_timeout=RESET_TIMEOUT, name=name
    )
    with pytest.raises(Boom), breaker:
        raise Boom
    assert breaker.state == circuitbreaker.STATE_OPEN
    return breaker


def _circuitbreaker_open(
    breaker: circuitbreaker.CircuitBreaker, admitted: list[int]
) -> Callable[[], str]:
    def verify() -> str:
        assert not admitted, f"{len(admitted)} calls ran through an open breaker"
        assert breaker.state == circuitbreaker.STATE_OPEN, breaker.state
        return "open throughout; 0 admitted"

    return verify


@rejected(BUTTRESS, "call() raising")
def _() -> Made:
    breaker = _open_buttress("bench-rejected-call")
    guarded_work, admitted = _spy()

    def run() -> object:
        try:
            return breaker.call(guarded_work)
        except CircuitOpenError:
            return REJECTED

    return run, _buttress_open(breaker, admitted)


@rejected(BUTTRESS, "@breaker raising")
def _() -> Made:
    breaker = _open_buttress("bench-rejected-decorator")
    guarded_work, admitted = _spy()
    guarded = breaker(guarded_work)

    def run() -> object:
        try:
            return guarded()
        except CircuitOpenError:
            return REJECTED

    return run, _buttress_open(breaker, admitted)


@rejected(BUTTRESS, "try_acquire() -> None")
def _() -> Made:
    breaker = _open_buttress("bench-rejected-try-acquire")
    guarded_work, admitted = _spy()

    def run() -> object:
        permit = breaker.try_acquire()
        if permit is None:
            return REJECTED
        with permit:
            return guarded_work()

    return run, _buttress_open(breaker, admitted)


@rejected(BUTTRESS, "acquire() raising")
def _() -> Made:
    breaker = _open_buttress("bench-rejected-acquire")
    guarded_work, admitted = _spy()

    def run() -> object:
        try:
            permit = breaker.acquire()
        except CircuitOpenError:
            return REJECTED
        with permit:
            return guarded_work()

    return run, _buttress_open(breaker, admitted)


@rejected("pybreaker", "call() raising")
def _() -> Made:
    breaker = _open_pybreaker("bench-rejected-call")
    guarded_work, admitted = _spy()

    def run() -> object:
        try:
            return breaker.call(guarded_work)
        except pybreaker.CircuitBreakerError:
            return REJECTED

    return run, _pybreaker_open(breaker, admitted)


@rejected("pybreaker", "@decorator raising")
def _() -> Made:
    breaker = _open_pybreaker("bench-rejected-decorator")
    guarded_work, admitted = _spy()
    guarded = breaker(guarded_work)

    def run() -> object:
        try:
            return guarded()
        except pybreaker.CircuitBreakerError:
            return REJECTED

    return run, _pybreaker_open(breaker, admitted)


@rejected("circuitbreaker", "@circuit raising")
def _() -> Made:
    # The decorator is circuitbreaker's only form that refuses calls (`with` never does).
    breaker = _open_circuitbreaker("bench-rejected-decorator")
    guarded_work, admitted = _spy()
    guarded = breaker(guarded_work)

    def run() -> object:
        try:
            return guarded()
        except circuitbreaker.CircuitBreakerError:
            return REJECTED

    return run, _circuitbreaker_open(breaker, admitted)


def _refuse() -> None:
    raise CircuitOpenError("bench-floor", RESET_TIMEOUT)


class _PlainError(Exception):
    pass


def _refuse_plainly() -> None:
    raise _PlainError


@rejected(FLOOR, "Python callee raising CircuitOpenError")
def _() -> Made:
    # What raising and catching buttress's error costs without any breaker: the floor of the
    # raising forms above.
    def run() -> object:
        try:
            return _refuse()
        except CircuitOpenError:
            return REJECTED

    return run, lambda: "caught"


@rejected(FLOOR, "Python callee raising Exception subclass")
def _() -> Made:
    def run() -> object:
        try:
            return _refuse_plainly()
        except _PlainError:
            return REJECTED

    return run, lambda: "caught"


@pytest.mark.benchmark(group="breaker-rejected")
@pytest.mark.parametrize("case", REJECTED_CASES, ids=lambda case: case.id)
def test_breaker_rejected(bench: Bench, case: Case) -> None:
    bench(case, expect=REJECTED)


# --- breaker-parts: where buttress's time goes (profile aid, no peers) ------------------------

PARTS: list[Case] = []
part = registrar(PARTS)


@part(BASELINE, BARE_FORM)
def _() -> Made:
    def run() -> int:
        return work()

    return run, lambda: "returned 1"


@part(BUTTRESS, "name (one PyO3 getter)")
def _() -> Made:
    breaker = buttress.CircuitBreaker("bench-parts-name")

    def run() -> int:
        breaker.name  # noqa: B018 - the attribute read is what is timed
        return work()

    return run, lambda: "returned 1"


@part(BUTTRESS, "try_acquire() + success()")
def _() -> Made:
    breaker = buttress.CircuitBreaker("bench-parts-permit")

    def run() -> int:
        permit = breaker.try_acquire()
        result = work()
        permit.success()
        return result

    return run, _buttress_closed(breaker)


@part(BUTTRESS, "__enter__() + __exit__() called")
def _() -> Made:
    breaker = buttress.CircuitBreaker("bench-parts-enter-exit")

    def run() -> int:
        breaker.__enter__()
        result = work()
        breaker.__exit__(None, None, None)
        return result

    return run, _buttress_closed(breaker)


@part(BUTTRESS, "with")
def _() -> Made:
    breaker = buttress.CircuitBreaker("bench-parts-with")

    def run() -> int:
        with breaker:
            return work()

    return run, _buttress_closed(breaker)


class _NoOp:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> bool:
        return False


@part(FLOOR, "with a no-op Python class")
def _() -> Made:
    manager = _NoOp()

    def run() -> int:
        with manager:
            return work()

    return run, lambda: "returned 1"


@pytest.mark.benchmark(group="breaker-parts")
@pytest.mark.parametrize("case", PARTS, ids=lambda case: case.id)
def test_breaker_parts(bench: Bench, case: Case) -> None:
    bench(case, expect=RESULT)
