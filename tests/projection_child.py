"""The projection the projection tests use, and a child process that runs it.

``Applied`` writes one row per event it is given, with no unique key, so an event applied
twice shows up as two rows. Run as a script, this module feeds ``Applied`` from a store with a
``ProjectionRunner`` (one JSON argument says which store, which database and how), printing
each position it handles, so that a test can kill it with SIGKILL part-way through a batch,
or run two of them against one PostgreSQL database.

    python projection_child.py '{"store": {...}, "database": {...}, "name": ..., ...}'

- ``store``: ``{"kind": "durable", "path": dir}`` (this process becomes the log's one writer)
  or ``{"kind": "postgres", "url": dsn, "prefix": table_prefix}``.
- ``database``: ``{"kind": "sqlite", "path": file}`` or ``{"kind": "postgres", "url": dsn}``.
- ``mode``: ``"catch_up"`` (one catch-up, then exit) or ``"until"`` (catch up again and again
  until the runner's position reaches ``until``, for at most ``deadline`` seconds).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

import psycopg
from buttress import RecordedEvent
from buttress.events import EventStore, Projection, ProjectionRunner
from psycopg.conninfo import make_conninfo

# What the child prints when it is ready, and after a clean finish.
READY = "ready"
DONE = "done"


class Applied(Projection):
    """One row per event handled: (position, stream, type, runner). ``delay`` seconds are spent
    in each ``handle`` (after the insert, inside the batch's transaction); ``echo`` prints the
    position handled; ``fail_at`` makes the first handling of those positions raise."""

    def __init__(
        self,
        name: str,
        table: str,
        *,
        postgres: bool = False,
        delay: float = 0.0,
        echo: bool = False,
        event_types: frozenset[str] | None = None,
        stream_prefix: str | None = None,
        fail_at: frozenset[int] = frozenset(),
    ) -> None:
        self.name = name
        self.event_types = event_types
        self.stream_prefix = stream_prefix
        self.table = table
        self.mark = "%s" if postgres else "?"
        self.delay = delay
        self.echo = echo
        self.fail_at = set(fail_at)
        self.runner = str(os.getpid())
        self.setups = 0
        self.handled: list[int] = []

    def setup(self, conn: Any) -> None:
        self.setups += 1
        conn.execute(
            f"create table if not exists {self.table} (position bigint not null, "
            "stream text not null, type text not null, runner text not null)"
        )

    def handle(self, conn: Any, event: RecordedEvent) -> None:
        if event.position in self.fail_at:
            self.fail_at.discard(event.position)
            raise RuntimeError(f"handle failed at position {event.position}")
        m = self.mark
        conn.execute(
            f"insert into {self.table} values ({m}, {m}, {m}, {m})",
            (event.position, event.stream, event.type, self.runner),
        )
        self.handled.append(event.position)
        if self.echo:
            print(event.position, flush=True)
        if self.delay:
            time.sleep(self.delay)

    def reset(self, conn: Any) -> None:
        conn.execute(f"delete from {self.table}")


def schema_dsn(url: str, schema: str) -> str:
    """A connection string for `url` whose search path is `schema` only."""
    return make_conninfo(url, options=f"-c search_path={schema}")


def create_schema(url: str) -> str:
    """A new, empty schema on the server; its name."""
    schema = f"t_proj_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"create schema {schema}")
    return schema


def drop_schema(url: str, schema: str) -> None:
    """Drops `schema` and everything in it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("set lock_timeout = '20s'")
        conn.execute(f"drop schema if exists {schema} cascade")


def open_store(config: dict[str, Any]) -> Any:
    if config["kind"] == "durable":
        return EventStore(config["path"], fsync="never")
    from buttress.backends.postgres_events import PostgresEventStore

    return PostgresEventStore(config["url"], table_prefix=config["prefix"], max_size=2)


def open_runner(store: Any, config: dict[str, Any]) -> tuple[ProjectionRunner, Any]:
    """The runner, and the pool to close after it (None when the runner owns its pool)."""
    database = config["database"]
    postgres = database["kind"] == "postgres"
    projection = Applied(
        config["name"],
        config["table"],
        postgres=postgres,
        delay=config.get("delay", 0.0),
        echo=config.get("echo", False),
    )
    options = {"batch_size": config.get("batch_size", 256)}
    if not postgres:
        return ProjectionRunner(store, projection, database["path"], **options), None
    from buttress.backends.postgres import postgres_pool

    pool = postgres_pool(database["url"], min_size=0, max_size=2, name="projection-child")
    return ProjectionRunner(store, projection, pool, **options), pool


def main(config: dict[str, Any]) -> int:
    store = open_store(config["store"])
    runner, pool = open_runner(store, config)
    print(READY, flush=True)
    try:
        if config.get("mode", "catch_up") == "catch_up":
            runner.catch_up()
        else:
            deadline = time.monotonic() + config.get("deadline", 30.0)
            while runner.position < config["until"]:
                if time.monotonic() > deadline:
                    print(f"timed out at position {runner.position}", flush=True)
                    return 3
                runner.catch_up(timeout=0.05)
        print(DONE, runner.position, flush=True)
        return 0
    finally:
        runner.close()
        if pool is not None:
            pool.close()
        store.close()


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
