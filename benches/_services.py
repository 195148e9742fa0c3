"""The database servers some benchmark groups talk to, shared by every bench file.

A group on a server that does not answer is skipped, or fails under
``BUTTRESS_REQUIRE_SERVICES=1`` (as CI runs it), the same rule as the tests.
"""

from __future__ import annotations

import os

import psycopg
import pytest

POSTGRES_URL = os.environ.get("BUTTRESS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("BUTTRESS_REQUIRE_SERVICES") == "1"

_postgres_answers: bool | None = None


def postgres_answered() -> bool:
    """Whether PostgreSQL answered when it was first asked (False before that)."""
    return bool(_postgres_answers)


def require_postgres() -> None:
    """Skips the calling test when PostgreSQL does not answer, or fails it when services are
    required; the server is asked once per run."""
    global _postgres_answers
    if _postgres_answers is None:
        try:
            psycopg.connect(POSTGRES_URL, connect_timeout=2).close()
            _postgres_answers = True
        except psycopg.OperationalError:
            _postgres_answers = False
    if not _postgres_answers:
        message = f"PostgreSQL does not answer at {POSTGRES_URL} (BUTTRESS_POSTGRES_URL)"
        if REQUIRE_SERVICES:
            pytest.fail(message + "; BUTTRESS_REQUIRE_SERVICES=1 makes this a failure.")
        pytest.skip(message)
