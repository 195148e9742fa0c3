"""Circuit breaker: the Rust core does the work; this layer adds the asyncio forms."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast, overload

from buttress import _core
from buttress.resilience._decorate import decorate
from buttress.resilience._state import CircuitState

__all__ = ["BreakerMetrics", "CircuitBreaker", "CircuitPermit", "CircuitState"]

P = ParamSpec("P")
R = TypeVar("R")

BreakerMetrics = _core.BreakerMetrics
CircuitPermit = _core.CircuitPermit

# Permits taken by `async with breaker:`, innermost last. A context variable, because coroutines
# of one thread interleave: each task sees only the permits it took itself.
_async_permits: contextvars.ContextVar[tuple[tuple[int, CircuitPermit], ...]] = (
    contextvars.ContextVar("buttress_breaker_permits", default=())
)


class CircuitBreaker(_core.CircuitBreaker):
    """Stops calling a failing dependency, then lets a few trial calls find out if it is back.

    It trips after ``failure_threshold`` failures in a row, or when the failure rate or the rate
    of calls slower than ``slow_call_duration`` reaches its threshold over a window of the last
    ``window_size`` calls (``window_type="count"``) or seconds (``"time"``), once
    ``minimum_calls`` were seen. It then refuses calls for ``reset_timeout`` seconds (growing by
    ``backoff_multiplier`` on repeated trips, up to ``max_reset_timeout``, spread by ``jitter``),
    then admits ``half_open_max_calls`` trial calls at once: ``success_threshold`` successes
    close it, a failure opens it again.

    ``with breaker:`` keeps its permit per thread, so enter and exit it on one thread (a
    generator that yields inside the block should use ``try_acquire()`` and the permit
    instead); coroutines use ``async with breaker:``, which keeps its permit per task.

    >>> breaker = CircuitBreaker("inventory", failure_threshold=3, reset_timeout=10.0)
    >>> @breaker
    ... def fetch(item: str) -> int:
    ...     return 7
    >>> fetch("apple")
    7
    >>> with breaker:
    ...     pass
    >>> breaker.state
    <CircuitState.CLOSED: 'closed'>
    """

    __slots__ = ()

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        """Decorates a function or coroutine function so every call goes through the breaker."""
        return decorate(
            func,
            call_async=self.call_async,
            wrap_sync=lambda func: _core.BreakerFunction(self, func),
        )

    async def call_async(
        self, func: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Awaits ``func(*args, **kwargs)`` through the breaker; the asyncio twin of ``call``."""
        if not callable(func):
            raise TypeError(f"func must be callable (got {func!r}).")
        permit = self.try_acquire()
        if permit is None:
            fallback = self.fallback
            if fallback is not None:
                result = fallback(*args, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
                return cast(R, result)
            # Raises CircuitOpenError with the current retry_after (or admits the call, should
            # the wait have ended a moment ago).
            permit = self.acquire()
        try:
            value = await func(*args, **kwargs)
        except BaseException as error:
            permit.record_exception(error)
            raise
        permit.record_result(value)
        return value

    async def __aenter__(self) -> None:
        permit = self.acquire()
        _async_permits.set((*_async_permits.get(), (id(self), permit)))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        permits = _async_permits.get()
        for position in range(len(permits) - 1, -1, -1):
            if permits[position][0] == id(self):
                permit = permits[position][1]
                _async_permits.set(permits[:position] + permits[position + 1 :])
                break
        else:
            raise RuntimeError(
                f"Circuit breaker '{self.name}' was exited by a task that did not enter it; "
                "enter and exit `async with breaker:` in the same task."
            )
        if exc_value is None:
            permit.success()
        else:
            permit.record_exception(exc_value)
        return False
