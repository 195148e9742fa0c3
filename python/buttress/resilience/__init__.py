"""Resilience patterns: circuit breaker and bulkhead."""

from buttress.resilience.breaker import BreakerMetrics, CircuitBreaker, CircuitPermit, CircuitState
from buttress.resilience.bulkhead import Bulkhead, BulkheadRegistry, BulkheadStats

__all__ = [
    "BreakerMetrics",
    "Bulkhead",
    "BulkheadRegistry",
    "BulkheadStats",
    "CircuitBreaker",
    "CircuitPermit",
    "CircuitState",
]
