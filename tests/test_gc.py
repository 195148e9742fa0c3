"""Objects buttress holds (listeners, fallbacks, decorated functions, permits) never keep a
reference cycle alive: the collector sees through the Rust classes."""

from __future__ import annotations

import gc
import weakref

import buttress


class Service:
    """A typical owner: its breaker holds bound methods of the service itself."""

    def __init__(self) -> None:
        self.breaker = buttress.CircuitBreaker(
            "service", fallback=self.fallback, result_is_failure=self.is_bad
        )
        self.breaker.add_listener(self.on_change)
        self.guarded = self.breaker(self.work)
        self.permit = self.breaker.try_acquire()

    def fallback(self) -> int:
        return 0

    def is_bad(self, value: object) -> bool:
        return value is None

    def on_change(self, *transition: object) -> None:
        pass

    def work(self) -> int:
        return 1


def test_a_service_and_its_breaker_are_collected() -> None:
    service = Service()
    assert service.guarded() == 1
    service_ref = weakref.ref(service)
    breaker_ref = weakref.ref(service.breaker)
    del service
    gc.collect()
    assert service_ref() is None
    assert breaker_ref() is None


def test_a_permit_dropped_unrecorded_returns_its_half_open_slot() -> None:
    clock = buttress.ManualClock()
    breaker = buttress.CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=clock)
    breaker.acquire().failure()
    clock.advance(1.0)
    permit = breaker.try_acquire()
    assert permit is not None
    assert breaker.try_acquire() is None  # the only trial slot is taken
    del permit
    gc.collect()
    trial = breaker.try_acquire()
    assert trial is not None
    trial.success()
    assert breaker.state == "closed"
