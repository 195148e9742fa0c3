"""Caching: an in-process cache (Rust, S3-FIFO), write-behind over the Rust write queue,
cache-aside with single-flight loading, and write-through."""

from __future__ import annotations

from buttress._core import LocalCache
from buttress.caching.aside import CacheAside, WriteThrough
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
    "CacheAside",
    "CacheBackend",
    "Database",
    "DictCache",
    "LocalCache",
    "SQLiteDatabase",
    "WriteBehind",
    "WriteThrough",
]
