"""The one exception hierarchy of buttress; the Rust core raises these through one mapping."""

from __future__ import annotations

__all__ = [
    "BulkheadFullError",
    "ButtressError",
    "CircuitOpenError",
]


class ButtressError(Exception):
    """Base class of every error buttress raises on purpose."""


class CircuitOpenError(ButtressError):
    """A circuit breaker refused the call.

    Raised as ``CircuitOpenError(name, retry_after)``: ``name`` is the breaker's name,
    ``retry_after`` the seconds until it admits a trial call (``0.0`` when it is half-open and
    every trial slot is taken, ``None`` while it is forced open).

    >>> error = CircuitOpenError("payments", 2.5)
    >>> str(error)
    "Circuit breaker 'payments' is open; retry in 2.500 seconds."
    """

    # Built as ``CircuitOpenError(name, retry_after)``. No ``__init__`` of its own: the
    # arguments stay in ``args``, so raising costs no Python frame and pickling rebuilds it.

    @property
    def name(self) -> str:
        """The name of the breaker that refused the call."""
        return str(self.args[0])

    @property
    def retry_after(self) -> float | None:
        """Seconds until the breaker admits a trial call; None while it is forced open."""
        value = self.args[1]
        return None if value is None else float(value)

    def __str__(self) -> str:
        if self.retry_after is None:
            return (
                f"Circuit breaker '{self.name}' is forced open; "
                "it admits no call until it is reset."
            )
        if self.retry_after == 0.0:
            return (
                f"Circuit breaker '{self.name}' is half-open and every trial call slot is "
                "taken; retry once a trial call has finished."
            )
        return f"Circuit breaker '{self.name}' is open; retry in {self.retry_after:.3f} seconds."


class BulkheadFullError(ButtressError):
    """A bulkhead had no permit to give within its limits.

    Raised as ``BulkheadFullError(name, max_concurrent, reason)``: ``reason`` is ``"full"`` when
    every permit was taken and the caller could not wait, or ``"timeout"`` when it waited the
    longest it was allowed.
    """

    # Built as ``BulkheadFullError(name, max_concurrent, reason)``, arguments kept in ``args``.

    @property
    def name(self) -> str:
        """The name of the bulkhead that had no permit."""
        return str(self.args[0])

    @property
    def max_concurrent(self) -> int:
        """How many calls the bulkhead admits at once."""
        return int(self.args[1])

    @property
    def reason(self) -> str:
        """``"full"`` (could not wait) or ``"timeout"`` (waited the longest allowed)."""
        return str(self.args[2])

    def __str__(self) -> str:
        if self.reason == "timeout":
            return (
                f"Bulkhead '{self.name}' is full: all {self.max_concurrent} permits stayed "
                "taken for the longest wait allowed."
            )
        return (
            f"Bulkhead '{self.name}' is full: all {self.max_concurrent} permits are taken "
            "and no more callers may wait."
        )
