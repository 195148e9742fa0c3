"""Bulkhead: one acquire + release of a free permit, beside threading's semaphores."""

from __future__ import annotations

import threading
from collections.abc import Callable

import buttress
import pytest
from _harness import BUTTRESS, Bench, Case, Made, registrar

# One permit: a permit that is not given back makes the next acquire in the loop fail at once.
PERMITS = 1

BULKHEAD: list[Case] = []
add = registrar(BULKHEAD)


def _buttress_balanced(bulkhead: buttress.Bulkhead) -> Callable[[], str]:
    before = bulkhead.stats()

    def verify() -> str:
        after = bulkhead.stats()
        assert after.active == 0, f"{after.active} permits never released"
        assert after.rejected == before.rejected
        assert after.max_observed == PERMITS
        accepted = after.accepted - before.accepted
        assert accepted > 0
        return f"{accepted:,} acquired, all released, 0 rejected"

    return verify


def _semaphore_balanced(semaphore: threading.Semaphore) -> Callable[[], str]:
    def verify() -> str:
        # Exactly PERMITS permits are free again: no leak, and no extra permit from a release.
        taken = 0
        while taken <= PERMITS and semaphore.acquire(blocking=False):
            taken += 1
        for _ in range(taken):
            semaphore.release()
        assert taken == PERMITS, f"{taken} permits free, expected {PERMITS}"
        return "all released"

    return verify


@add(BUTTRESS, "try_acquire() + release()")
def _() -> Made:
    bulkhead = buttress.Bulkhead("bench-try-acquire", max_concurrent=PERMITS)

    def run() -> bool:
        if not bulkhead.try_acquire():
            raise AssertionError("the bulkhead refused its free permit")
        bulkhead.release()
        return True

    return run, _buttress_balanced(bulkhead)


@add(BUTTRESS, "acquire() + release()")
def _() -> Made:
    bulkhead = buttress.Bulkhead("bench-acquire", max_concurrent=PERMITS)

    def run() -> bool:
        bulkhead.acquire()  # raises BulkheadFullError (max_wait=0) if the permit leaked
        bulkhead.release()
        return True

    return run, _buttress_balanced(bulkhead)


@add(BUTTRESS, "with")
def _() -> Made:
    bulkhead = buttress.Bulkhead("bench-with", max_concurrent=PERMITS)

    def run() -> bool:
        with bulkhead:  # raises BulkheadFullError (max_wait=0) if the permit leaked
            return True

    return run, _buttress_balanced(bulkhead)


def _semaphore_cases(kind: type[threading.Semaphore], lib: str) -> None:
    @add(lib, "acquire(False) + release()")
    def _() -> Made:
        semaphore = kind(PERMITS)

        def run() -> bool:
            if not semaphore.acquire(False):
                raise AssertionError("the semaphore refused its free permit")
            semaphore.release()
            return True

        return run, _semaphore_balanced(semaphore)

    @add(lib, "acquire() + release()")
    def _() -> Made:
        semaphore = kind(PERMITS)

        def run() -> bool:
            semaphore.acquire()
            semaphore.release()
            return True

        return run, _semaphore_balanced(semaphore)

    @add(lib, "with")
    def _() -> Made:
        semaphore = kind(PERMITS)

        def run() -> bool:
            with semaphore:
                return True

        return run, _semaphore_balanced(semaphore)


_semaphore_cases(threading.Semaphore, "threading.Semaphore")
_semaphore_cases(threading.BoundedSemaphore, "threading.BoundedSemaphore")


@pytest.mark.benchmark(group="bulkhead")
@pytest.mark.parametrize("case", BULKHEAD, ids=lambda case: case.id)
def test_bulkhead(bench: Bench, case: Case) -> None:
    bench(case, expect=True)
