"""Shared pieces of the asyncio twins that wait on a Rust core's queue without blocking the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def resolve(future: asyncio.Future[None]) -> None:
    """Marks a queued waiter as served (called through ``loop.call_soon_threadsafe``)."""
    # The waiter may have been cancelled or timed out between hand-off and this callback.
    if not future.done():
        future.set_result(None)


class WaitExpired(Exception):
    """The longest wait allowed passed (internal; each caller raises its own error)."""


def expire(future: asyncio.Future[None]) -> None:
    """Ends a wait with ``WaitExpired`` (called by the waiter's own timer)."""
    if not future.done():
        future.set_exception(WaitExpired())


async def await_turn(
    granted: asyncio.Future[None], wait: float | None, leave: Callable[[bool], bool]
) -> bool:
    """Awaits a queued waiter's turn for at most ``wait`` seconds (None: as long as it takes).

    Returns True once served, and False when the wait ran out. ``leave(timed_out)`` takes the
    waiter out of the queue and returns whether it was served meanwhile; on a timeout that
    decides the result, and on cancellation it must pass on whatever was handed over.
    """
    loop = asyncio.get_running_loop()
    # An own timer rather than asyncio.wait_for: before Python 3.12, wait_for can swallow a
    # cancellation that arrives just as the future completes.
    timer = None if wait is None else loop.call_later(wait, expire, granted)
    try:
        await granted
    except WaitExpired:
        return leave(True)
    except BaseException:
        leave(False)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    return True
