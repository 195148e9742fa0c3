"""Cleaning up after PostgresEventStore tests: what a store made for a table prefix, dropped
or listed."""

from __future__ import annotations

import psycopg

__all__ = ["drop_event_tables", "event_leftovers"]


def drop_event_tables(url: str, prefix: str) -> None:
    """Drops what a PostgresEventStore made for `prefix`, first ending any session still using
    it (a store a failed run left open must not hold the drop up)."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("set lock_timeout = '10s'")
        admin.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where pid <> pg_backend_pid() and datname = current_database() "
            "and position(%s in query) > 0",
            (prefix,),
        )
        admin.execute(f"drop table if exists {prefix}_events, {prefix}_head cascade")
        admin.execute(f"drop function if exists {prefix}_append")


def event_leftovers(url: str, prefix: str) -> list[str]:
    """Tables and functions on the server whose names start with `prefix`."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "select relname from pg_class where starts_with(relname, %s) "
            "union all select proname from pg_proc where starts_with(proname, %s)",
            (prefix, prefix),
        ).fetchall()
    return sorted(str(name) for (name,) in rows)
