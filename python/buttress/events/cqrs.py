"""Command and query buses: one handler per message type, with middleware around each dispatch.

>>> import dataclasses
>>> @dataclasses.dataclass
... class Greet:
...     name: str
>>> bus = CommandBus(middleware=[LoggingMiddleware()])
>>> @bus.handles(Greet)
... def greet(command: Greet) -> str:
...     return f"hello {command.name}"
>>> bus.dispatch(Greet("Ada"))
'hello Ada'

Middleware is a callable ``(message, call_next) -> result``. In ``dispatch_async`` a middleware
may be an ``async def`` (it awaits ``call_next(message)``); a plain one that returns
``call_next(message)`` works in both. ``RetryOnConflict`` retries a command whose append met
``WrongExpectedVersionError`` (the handler must reload what it decides on, as handlers do).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from buttress.errors import NoHandlerError, WrongExpectedVersionError

__all__ = [
    "CommandBus",
    "LoggingMiddleware",
    "Middleware",
    "NoHandlerError",
    "QueryBus",
    "RetryOnConflict",
    "ValidationMiddleware",
]

H = TypeVar("H", bound=Callable[..., Any])
Handler = Callable[[Any], Any]
Middleware = Callable[[Any, Callable[[Any], Any]], Any]


class _Bus:
    _kind = "bus"

    def __init__(self, middleware: Iterable[Middleware] = ()) -> None:
        self._handlers: dict[type, Handler] = {}
        self._middleware = list(middleware)
        for layer in self._middleware:
            if not callable(layer):
                raise TypeError(f"middleware must hold callables (got {layer!r}).")

    def register(self, message_type: type, handler: Handler) -> None:
        """Makes ``handler`` the one handler of ``message_type``."""
        if not isinstance(message_type, type):
            raise TypeError(f"message_type must be a class (got {message_type!r}).")
        if not callable(handler):
            raise TypeError(f"handler must be callable (got {handler!r}).")
        if message_type in self._handlers:
            raise ValueError(
                f"{message_type.__qualname__} already has a handler on this {self._kind}: "
                f"{self._handlers[message_type]!r}. Each message type has exactly one."
            )
        self._handlers[message_type] = handler

    def handles(self, message_type: type) -> Callable[[H], H]:
        """Decorator form of ``register``."""

        def register(handler: H) -> H:
            self.register(message_type, handler)
            return handler

        return register

    def _handler(self, message: object) -> Handler:
        handler = self._handlers.get(type(message))
        if handler is None:
            raise NoHandlerError(self._kind, type(message).__qualname__)
        return handler

    def dispatch(self, message: object) -> Any:
        """Runs the message through the middleware to its handler; returns the handler's
        result."""
        handler = self._handler(message)
        call: Callable[[Any], Any] = handler
        for layer in reversed(self._middleware):
            call = _wrap(layer, call)
        return call(message)

    async def dispatch_async(self, message: object) -> Any:
        """``dispatch`` for asyncio: ``async def`` handlers and middleware are awaited."""
        handler = self._handler(message)

        async def innermost(current: Any) -> Any:
            return await _resolve(handler(current))

        call: Callable[[Any], Awaitable[Any]] = innermost
        for layer in reversed(self._middleware):
            call = _wrap_async(layer, call)
        return await call(message)

    def __contains__(self, message_type: object) -> bool:
        return message_type in self._handlers


def _wrap(layer: Middleware, call_next: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda message: layer(message, call_next)


def _wrap_async(
    layer: Middleware, call_next: Callable[[Any], Awaitable[Any]]
) -> Callable[[Any], Awaitable[Any]]:
    specific = getattr(layer, "call_async", None)

    async def call(message: Any) -> Any:
        if specific is not None:
            return await specific(message, call_next)
        return await _resolve(layer(message, call_next))

    return call


async def _resolve(value: Any) -> Any:
    while inspect.isawaitable(value):
        value = await value
    return value


class CommandBus(_Bus):
    """Routes each command to its one handler."""

    _kind = "command bus"


class QueryBus(_Bus):
    """Routes each query to its one handler."""

    _kind = "query bus"


class LoggingMiddleware:
    """Logs each message, how long its handler took, and any exception."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.DEBUG) -> None:
        self.logger = logger or logging.getLogger("buttress.cqrs")
        self.level = level

    def __call__(self, message: Any, call_next: Callable[[Any], Any]) -> Any:
        started = time.perf_counter()
        try:
            result = call_next(message)
        except Exception:
            self._failed(message, started)
            raise
        self._done(message, started)
        return result

    async def call_async(self, message: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        try:
            result = await call_next(message)
        except Exception:
            self._failed(message, started)
            raise
        self._done(message, started)
        return result

    def _done(self, message: Any, started: float) -> None:
        if self.logger.isEnabledFor(self.level):
            elapsed = (time.perf_counter() - started) * 1000
            self.logger.log(
                self.level, "%s handled in %.2f ms", type(message).__qualname__, elapsed
            )

    def _failed(self, message: Any, started: float) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        self.logger.exception("%s failed after %.2f ms", type(message).__qualname__, elapsed)


class ValidationMiddleware:
    """Validates each message before its handler runs: with ``validator(message)`` when given,
    else with the message's own ``validate()`` method when it has one. A validator raises to
    refuse the message."""

    def __init__(self, validator: Callable[[Any], object] | None = None) -> None:
        if validator is not None and not callable(validator):
            raise TypeError(f"validator must be callable (got {validator!r}).")
        self.validator = validator

    def _validate(self, message: Any) -> None:
        if self.validator is not None:
            self.validator(message)
            return
        validate = getattr(message, "validate", None)
        if callable(validate):
            validate()

    def __call__(self, message: Any, call_next: Callable[[Any], Any]) -> Any:
        self._validate(message)
        return call_next(message)

    async def call_async(self, message: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        self._validate(message)
        return await call_next(message)


class RetryOnConflict:
    """Runs the handler again when it raised ``WrongExpectedVersionError`` (another writer
    changed the aggregate first), up to ``attempts`` times in all, waiting a random time up to
    ``backoff`` seconds (doubling each time) in between. The handler must load what it decides
    on afresh each time, which a handler that gets its aggregate from a repository does."""

    def __init__(self, attempts: int = 3, backoff: float = 0.01) -> None:
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ValueError(f"attempts must be a whole number from 1 (got {attempts!r}).")
        if not isinstance(backoff, (int, float)) or not 0 <= backoff < math.inf:
            raise ValueError(
                f"backoff must be a finite number of seconds from 0 (got {backoff!r})."
            )
        self.attempts = attempts
        self.backoff = float(backoff)

    def _pause(self, attempt: int) -> float:
        return random.uniform(0, self.backoff * (2**attempt))

    def __call__(self, message: Any, call_next: Callable[[Any], Any]) -> Any:
        for attempt in range(self.attempts):
            try:
                return call_next(message)
            except WrongExpectedVersionError:
                if attempt + 1 == self.attempts:
                    raise
                time.sleep(self._pause(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def call_async(self, message: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        for attempt in range(self.attempts):
            try:
                return await call_next(message)
            except WrongExpectedVersionError:
                if attempt + 1 == self.attempts:
                    raise
                await asyncio.sleep(self._pause(attempt))
        raise AssertionError("unreachable")  # pragma: no cover
