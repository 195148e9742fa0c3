"""Shared test settings: hypothesis profiles and the real-service fixtures.

Hypothesis runs few examples locally and many in CI (``CI`` set, or
``BUTTRESS_HYPOTHESIS_PROFILE=ci``); ``soak`` runs many more, by hand. Tests that need
PostgreSQL or Redis skip with a reason when none answers, and fail instead when
``BUTTRESS_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
from buttress import ManualClock, WriteBehind
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile(
    "ci",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# A long hunt for disagreements, run by hand: BUTTRESS_HYPOTHESIS_PROFILE=soak.
settings.register_profile(
    "soak",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("BUTTRESS_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)

POSTGRES_URL = os.environ.get("BUTTRESS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BUTTRESS_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("BUTTRESS_REQUIRE_SERVICES") == "1"


def _answers(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def _service(url: str, default_port: int, what: str) -> str:
    if _answers(url, default_port):
        return url
    message = f"{what} does not answer at {url}; start it or set the URL variable."
    if REQUIRE_SERVICES:
        pytest.fail(message + " BUTTRESS_REQUIRE_SERVICES=1 makes this a failure.")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL URL, once the server answers."""
    return _service(POSTGRES_URL, 5432, "PostgreSQL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis URL, once the server answers."""
    return _service(REDIS_URL, 6379, "Redis")


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock at 0 s: breaker tests move time by hand and never sleep."""
    return ManualClock()


@pytest.fixture
def quick() -> dict[str, Any]:
    """WriteBehind options for tests: short waits, no exit hook."""
    return {"flush_interval": 0.01, "retry_backoff": (0.0005, 0.005), "close_at_exit": False}


@pytest.fixture
def stores() -> Iterator[list[WriteBehind]]:
    """WriteBehind stores a test makes, closed at its end if it did not close them."""
    made: list[WriteBehind] = []
    yield made
    for store in made:
        if not store.queue.closed:
            store.close(timeout=1)
