"""The circuit breaker's states (a separate module so the Rust core can import it early)."""

from __future__ import annotations

import enum

__all__ = ["CircuitState"]


class CircuitState(str, enum.Enum):
    """A circuit breaker's state; compares equal to its lowercase name."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value
