"""Bulkhead: isolated partitions of concurrency, with asyncio twins and a registry."""

from __future__ import annotations

import asyncio
import enum
import functools
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

from buttress import _core
from buttress._waiting import await_turn, resolve
from buttress.errors import BulkheadFullError
from buttress.resilience._decorate import decorate

__all__ = ["Bulkhead", "BulkheadRegistry", "BulkheadStats"]

P = ParamSpec("P")
R = TypeVar("R")

BulkheadStats = _core.BulkheadStats


class Bulkhead(_core.Bulkhead):
    """Admits at most ``max_concurrent`` calls at once, so one slow dependency cannot take
    every worker.

    Callers past the limit wait in FIFO order, at most ``max_waiting`` of them, each for at
    most ``max_wait`` seconds (``None``: as long as it takes; ``0``: never); past that
    ``BulkheadFullError``. Permits come back on every path: success, exception, timeout and
    cancellation.

    >>> bulkhead = Bulkhead("reports", max_concurrent=2, max_waiting=10, max_wait=1.0)
    >>> with bulkhead:
    ...     bulkhead.stats().active
    1
    >>> bulkhead.call(len, "abc")
    3
    """

    __slots__ = ()

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, func: Callable[P, Any]) -> Callable[P, Any]:
        """Decorates a function or coroutine function so every call holds a permit."""

        def wrap_sync(func: Callable[P, Any]) -> Callable[P, Any]:
            def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
                return self.call(func, *args, **kwargs)

            return guarded

        return decorate(func, call_async=self.call_async, wrap_sync=wrap_sync)

    async def acquire_async(self, timeout: float | None = None) -> None:
        """Takes a permit without blocking the event loop, waiting up to ``timeout`` seconds
        (default: ``max_wait``). Raises ``BulkheadFullError`` when none came in time."""
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        waiter = self._enqueue(
            functools.partial(loop.call_soon_threadsafe, resolve, granted), timeout
        )
        if waiter is None:
            return
        wait = timeout if timeout is not None else self.max_wait

        def leave(timed_out: bool) -> bool:
            served: bool = self._abandon(waiter, timed_out)
            if served and not timed_out:
                self.release()  # handed over just as the caller was cancelled
            return served

        if not await await_turn(granted, wait, leave):
            raise BulkheadFullError(self.name, self.max_concurrent, "timeout")

    async def call_async(
        self, func: Callable[P, Awaitable[R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Awaits ``func(*args, **kwargs)`` holding a permit; the asyncio twin of ``call``."""
        if not callable(func):
            raise TypeError(f"func must be callable (got {func!r}).")
        await self.acquire_async()
        try:
            return await func(*args, **kwargs)
        finally:
            self.release()

    async def __aenter__(self) -> None:
        await self.acquire_async()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self.release()
        return False


def _same(have: object, asked: object) -> bool:
    # The bulkhead keeps seconds as whole nanoseconds, so compare floats to that precision.
    if isinstance(have, float) and isinstance(asked, (int, float)):
        return abs(have - asked) < 1e-9 * max(1.0, abs(asked))
    return have == asked


class _Unset(enum.Enum):
    TOKEN = 0


class BulkheadRegistry:
    """Named bulkheads, created on first use with shared defaults, so each dependency gets its
    own partition and a slow one cannot take the others' capacity.

    >>> registry = BulkheadRegistry(max_concurrent=4)
    >>> payments = registry.get("payments", max_concurrent=8)
    >>> registry.get("payments") is payments
    True
    >>> sorted(registry)
    ['payments']
    """

    def __init__(
        self,
        *,
        max_concurrent: int = 25,
        max_waiting: int = 100,
        max_wait: float | None = 0.0,
    ) -> None:
        # Building one bulkhead checks the defaults now rather than at first use.
        Bulkhead(
            "defaults", max_concurrent=max_concurrent, max_waiting=max_waiting, max_wait=max_wait
        )
        self._defaults: dict[str, Any] = {
            "max_concurrent": max_concurrent,
            "max_waiting": max_waiting,
            "max_wait": max_wait,
        }
        self._bulkheads: dict[str, Bulkhead] = {}
        # Guards creation only; lookups of an existing partition read the dict directly.
        self._lock = threading.Lock()

    def get(
        self,
        name: str,
        *,
        max_concurrent: int | None = None,
        max_waiting: int | None = None,
        max_wait: float | _Unset | None = _Unset.TOKEN,
    ) -> Bulkhead:
        """The bulkhead called ``name``, created with the defaults and these overrides if new.

        Asking again with different limits raises ``ValueError`` rather than silently
        returning a partition with limits other than the ones asked for."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a string (got {name!r}).")
        asked: dict[str, Any] = {}
        if max_concurrent is not None:
            asked["max_concurrent"] = max_concurrent
        if max_waiting is not None:
            asked["max_waiting"] = max_waiting
        if not isinstance(max_wait, _Unset):
            asked["max_wait"] = max_wait
        bulkhead = self._bulkheads.get(name)
        if bulkhead is None:
            with self._lock:
                bulkhead = self._bulkheads.get(name)
                if bulkhead is None:
                    bulkhead = Bulkhead(name, **{**self._defaults, **asked})
                    self._bulkheads[name] = bulkhead
                    return bulkhead
        clashes = {
            key: value for key, value in asked.items() if not _same(getattr(bulkhead, key), value)
        }
        if clashes:
            raise ValueError(
                f"Bulkhead '{name}' already exists with other limits than {clashes}; "
                "use one configuration per name."
            )
        return bulkhead

    def __getitem__(self, name: str) -> Bulkhead:
        return self._bulkheads[name]

    def __contains__(self, name: object) -> bool:
        return name in self._bulkheads

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._bulkheads))

    def __len__(self) -> int:
        return len(self._bulkheads)

    def stats(self) -> dict[str, BulkheadStats]:
        """Each partition's stats, by name."""
        return {name: bulkhead.stats() for name, bulkhead in list(self._bulkheads.items())}

    def __repr__(self) -> str:
        return f"BulkheadRegistry({sorted(self._bulkheads)!r})"
