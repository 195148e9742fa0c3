"""Write-behind trades durability for speed, and these tests say so exactly: a process killed
with writes still queued loses them, while one that calls flush() before it exits (or exits
normally, which closes the store at interpreter exit) loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from buttress.caching import SQLiteDatabase
from support import JOIN

CHILD = textwrap.dedent(
    """
    import sys, time
    from buttress.caching import DictCache, SQLiteDatabase, WriteBehind

    class Slow(SQLiteDatabase):
        def write_batch(self, items):
            time.sleep(0.2)  # a slow database: writes pile up in the queue
            super().write_batch(items)

    mode = sys.argv[2]
    store = WriteBehind(DictCache(), Slow(sys.argv[1]), batch_size=10, flush_interval=0.01,
                        close_at_exit=(mode == "exit"))
    for number in range(200):
        store.set(f"k{number}", b"v")
    if mode == "flush":
        assert store.flush(timeout=60)
    print("written", flush=True)
    if mode != "exit":
        time.sleep(60)  # killed here
    """
)


def _run(path: Path, mode: str) -> int:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "written"
            if mode != "exit":
                child.send_signal(signal.SIGKILL)
            child.wait(JOIN * 6)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    database = SQLiteDatabase(path)
    try:
        return sum(database.get(f"k{number}") is not None for number in range(200))
    finally:
        database.close()


def test_a_process_killed_with_writes_queued_loses_them(tmp_path: Path) -> None:
    written = _run(tmp_path / "killed.db", "kill")
    assert written < 200  # honest: what was still queued is gone


def test_flush_before_exit_loses_nothing(tmp_path: Path) -> None:
    assert _run(tmp_path / "flushed.db", "flush") == 200


def test_a_normal_exit_closes_the_store_and_loses_nothing(tmp_path: Path) -> None:
    assert _run(tmp_path / "exited.db", "exit") == 200
