"""The one decorator shape shared by the guards (breaker, bulkhead)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any


def _is_async(func: Callable[..., Any]) -> bool:
    """A coroutine function, or a callable object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(func) or (
        not inspect.isfunction(func)
        and inspect.iscoroutinefunction(inspect.getattr_static(type(func), "__call__", None))
    )


def decorate(
    func: Callable[..., Any],
    *,
    call_async: Callable[..., Awaitable[Any]],
    wrap_sync: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Callable[..., Any]:
    """Wraps ``func`` so every call goes through a guard, keeping its metadata.

    Coroutine functions are awaited through ``call_async(func, *args, **kwargs)``; plain
    functions are wrapped by ``wrap_sync(func)``, which must bind like a function so decorated
    methods still receive their instance.
    """
    if not callable(func):
        raise TypeError(f"func must be callable (got {func!r}).")
    if _is_async(func):

        @functools.wraps(func)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            return await call_async(func, *args, **kwargs)

        return guarded
    return functools.update_wrapper(wrap_sync(func), func)
