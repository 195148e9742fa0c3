"""Caching: write-behind over the Rust write queue (cache-aside and write-through to come)."""

from __future__ import annotations

from buttress.caching.writebehind import (
    DELETED,
    CacheBackend,
    Database,
    DictCache,
    SQLiteDatabase,
    WriteBehind,
)

__all__ = [
    "DELETED",
    "CacheBackend",
    "Database",
    "DictCache",
    "SQLiteDatabase",
    "WriteBehind",
]
