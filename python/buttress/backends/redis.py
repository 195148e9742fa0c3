"""Redis as a shared cache for ``WriteBehind``, ``CacheAside`` and ``WriteThrough`` (the
``redis`` extra, redis-py).

Every entry lives under one key prefix, so several caches (or applications) can share a
database and ``clear()`` removes only its own entries. A TTL becomes Redis's own expiry
(``SET ... PX``), so entries expire on the server for every process at once. Values are bytes,
or whatever a ``Codec`` turns into bytes and back. Each call is one round trip; asyncio code
uses the ``*_async`` twins, which talk through a ``redis.asyncio`` client.
"""

from __future__ import annotations

try:
    import redis
    import redis.asyncio
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "buttress.backends.redis needs redis-py; install it with `pip install 'buttress[redis]'`."
    ) from error

import asyncio
import math
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from buttress.caching.writebehind import Key

__all__ = ["Codec", "RedisCache", "check_url_and_prefix"]

# Keys per SCAN step and per UNLINK in clear(): big enough to need few round trips, small
# enough that no single command holds the server up.
_CLEAR_BATCH = 500
# The longest expiry Redis accepts is "now" plus this, in milliseconds, with room to spare.
_LONGEST_PX = 2**62
# The characters Redis's glob patterns (SCAN MATCH) give a meaning to.
_GLOB_SPECIAL = frozenset(b"*?[]\\")


def check_url_and_prefix(url: object, prefix: object, keeps: str) -> None:
    """Refuses a URL that is not a str and an empty or non-str key prefix; ``keeps`` says
    what the prefix keeps apart, for the message.

    >>> check_url_and_prefix("redis://127.0.0.1:6379/0", "", "this store's keys")
    Traceback (most recent call last):
    ...
    ValueError: prefix must not be empty: it keeps this store's keys apart from everything ...
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a redis:// URL string (got {type(url).__name__}).")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str (got {type(prefix).__name__}).")
    if not prefix:
        raise ValueError(
            f"prefix must not be empty: it keeps {keeps} apart from everything "
            "else in the database."
        )


@runtime_checkable
class Codec(Protocol):
    """Turns cached values into bytes and back: ``dumps(value) -> bytes`` and
    ``loads(data) -> value``. The ``pickle`` module fits as it is, but only pickle when
    everyone who can write to the Redis server is trusted: loading a pickle runs code.

    >>> import json
    >>> class JsonCodec:
    ...     def dumps(self, value): return json.dumps(value).encode()
    ...     def loads(self, data): return json.loads(data)
    >>> isinstance(JsonCodec(), Codec)
    True
    """

    def dumps(self, value: Any, /) -> bytes: ...
    def loads(self, data: bytes, /) -> Any: ...


class RedisCache:
    """A cache in Redis, shared by every process that uses the same ``url`` and ``prefix``.

    - ``prefix``: put before every key (``"buttress:"`` + ``"user:1"``); ``clear()`` removes
      the keys under it and nothing else. It must not be empty. Prefixes that start alike
      overlap: ``clear()`` of ``"app:"`` also removes the entries of ``"app:users:"``.
    - ``codec``: how values become bytes; without one, values must be bytes (``bytearray``
      and ``memoryview`` are copied to bytes) and come back as bytes.
    - ``client``, ``async_client``: redis-py clients to use instead of making them from
      ``url`` (the asyncio one is made on first use of an ``*_async`` method). Clients passed
      in are left open by ``close()``; they must not decode responses.

    A client made from ``url`` keeps a blocking pool of at most 50 connections: a call that
    finds them all busy waits up to 20 seconds for one rather than failing at once. The URL's
    ``max_connections`` and ``timeout`` query options change those.

    Keys are str (stored as UTF-8), bytes, or int (stored in decimal), so the int ``1`` and
    the str ``"1"`` name the same entry. ``blocking`` is True: each call waits on the network,
    so asyncio front ends call the ``*_async`` twins instead.

    >>> cache = RedisCache("redis://127.0.0.1:6379/0", prefix="example:")
    >>> cache.set("user:1", "Ada")
    Traceback (most recent call last):
    TypeError: value must be bytes when the RedisCache has no codec (got str); ...
    >>> cache.set("user:1", b"Ada", ttl=60)  # doctest: +SKIP
    >>> cache.get("user:1")  # doctest: +SKIP
    b'Ada'
    >>> cache.close()
    """

    blocking = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "buttress:",
        codec: Codec | None = None,
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
    ) -> None:
        check_url_and_prefix(url, prefix, "this cache's keys, and what clear() removes,")
        if codec is not None and not isinstance(codec, Codec):
            raise TypeError(
                "codec must have dumps(value) -> bytes and loads(data) -> value "
                f"(got {type(codec).__name__})."
            )
        self.url = url
        self.prefix = prefix
        self.codec = codec
        self._prefix = prefix.encode()
        self._pattern = bytes(_escaped(self._prefix)) + b"*"
        self._owns_client = client is None
        if client is None:
            client = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url))
        _check_client("url" if self._owns_client else "client", client)
        self.client: redis.Redis = client
        self._owns_async_client = async_client is None
        if async_client is not None:
            _check_client("async_client", async_client)
        self._async_client = async_client
        # The loop a lazily made asyncio client belongs to (its connections can't move).
        self._async_loop: asyncio.AbstractEventLoop | None = None
        # Held only to make the asyncio client, so two threads never make two.
        self._async_lock = threading.Lock()

    # -- checking and encoding, shared by the blocking and the asyncio calls -------------------

    def _key(self, key: Key) -> bytes:
        """The Redis key of ``key``: the prefix, then the key's bytes."""
        if isinstance(key, str):
            try:
                return self._prefix + key.encode()
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"key must be encodable as UTF-8 (got {key!r}): {error.reason}."
                ) from None
        if isinstance(key, bytes):
            return self._prefix + key
        if isinstance(key, int) and not isinstance(key, bool):
            return self._prefix + b"%d" % key
        raise TypeError(f"key must be a str, bytes or int (got {type(key).__name__}).")

    def _encode(self, value: Any) -> bytes:
        """``value`` as the bytes stored in Redis."""
        if self.codec is None:
            if isinstance(value, bytes):
                return value
            if isinstance(value, (bytearray, memoryview)):
                return bytes(value)
            raise TypeError(
                "value must be bytes when the RedisCache has no codec "
                f"(got {type(value).__name__}); encode it first or give the cache a codec."
            )
        data = self.codec.dumps(value)
        if isinstance(data, bytes):
            return data
        if isinstance(data, (bytearray, memoryview)):
            return bytes(data)
        raise TypeError(
            f"codec.dumps must return bytes (got {type(data).__name__} for a "
            f"{type(value).__name__} value); make it encode its output."
        )

    def _decode(self, data: object, default: Any) -> Any:
        """The value of what GET answered: ``default`` on a miss."""
        if data is None:
            return default
        if not isinstance(data, bytes):  # pragma: no cover - clients that decode are refused
            raise TypeError(f"Redis answered {type(data).__name__}, not bytes.")
        return data if self.codec is None else self.codec.loads(data)

    def _write(self, key: Key, value: Any, ttl: float | None) -> tuple[bytes, bytes, int | None]:
        """The Redis key, the stored bytes and the expiry in milliseconds of a ``set``; raises
        before anything is sent when one of them is wrong."""
        return self._key(key), self._encode(value), _milliseconds(ttl)

    def check(self, key: Key, value: Any) -> None:
        """Raises what ``set`` would for a key, or (without a codec) a value, this cache
        refuses; sends nothing. ``WriteBehind`` calls it before it queues a write."""
        self._key(key)
        if self.codec is None:
            self._encode(value)

    # -- blocking calls ------------------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value cached under ``key``, or ``default`` when there is none (or it expired)."""
        return self._decode(self.client.get(self._key(key)), default)

    def set(self, key: Key, value: Any, ttl: float | None = None) -> None:
        """Caches ``value`` under ``key``, for ``ttl`` seconds (rounded up to whole
        milliseconds) or, with None, until it is deleted or evicted."""
        name, data, px = self._write(key, value, ttl)
        self.client.set(name, data, px=px)

    def delete(self, key: Key) -> None:
        """Removes ``key``'s entry, if there is one."""
        self.client.unlink(self._key(key))

    def clear(self) -> None:
        """Removes every entry under this cache's prefix (and no other key), a batch of keys
        at a time. Entries written while it runs may survive."""
        for batch in _batches(self.client.scan_iter(match=self._pattern, count=_CLEAR_BATCH)):
            self.client.unlink(*batch)

    def close(self) -> None:
        """Closes the blocking client's connections, if this cache made it. ``close_async()``
        closes the asyncio client too."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> RedisCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- asyncio twins -------------------------------------------------------------------------

    @property
    def async_client(self) -> redis.asyncio.Redis:
        """The ``redis.asyncio`` client of the ``*_async`` calls, made from ``url`` on first
        use. One made here belongs to the event loop that first used it."""
        with self._async_lock:
            if self._async_client is None:
                pool = redis.asyncio.BlockingConnectionPool.from_url(self.url)
                self._async_client = redis.asyncio.Redis.from_pool(pool)
                _check_client("url", self._async_client)
                self._async_loop = asyncio.get_running_loop()
            elif self._async_loop is not None and self._async_loop is not _running_loop():
                raise RuntimeError(
                    "This RedisCache's asyncio client belongs to another event loop; call "
                    "close_async() in that loop first, or use one RedisCache per loop."
                )
            return self._async_client

    async def get_async(self, key: Key, default: Any = None) -> Any:
        """``get`` without blocking the event loop."""
        name = self._key(key)
        return self._decode(await self.async_client.get(name), default)

    async def set_async(self, key: Key, value: Any, ttl: float | None = None) -> None:
        """``set`` without blocking the event loop."""
        name, data, px = self._write(key, value, ttl)
        await self.async_client.set(name, data, px=px)

    async def delete_async(self, key: Key) -> None:
        """``delete`` without blocking the event loop."""
        name = self._key(key)
        await self.async_client.unlink(name)

    async def clear_async(self) -> None:
        """``clear`` without blocking the event loop."""
        client = self.async_client
        batch: list[bytes] = []
        async for name in client.scan_iter(match=self._pattern, count=_CLEAR_BATCH):
            batch.append(name)
            if len(batch) == _CLEAR_BATCH:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)

    async def close_async(self) -> None:
        """Closes the clients this cache made, the asyncio one included; a later
        ``*_async`` call makes a new one."""
        with self._async_lock:
            client = self._async_client if self._owns_async_client else None
            if client is not None:
                self._async_client = None
                self._async_loop = None
        if client is not None:
            await client.aclose()
        self.close()

    async def __aenter__(self) -> RedisCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close_async()

    def __repr__(self) -> str:
        return f"RedisCache({self.url!r}, prefix={self.prefix!r})"


def _milliseconds(ttl: float | None) -> int | None:
    """``ttl`` seconds as Redis's PX milliseconds, rounded up so a tiny TTL still expires
    rather than being refused or kept forever."""
    if ttl is None:
        return None
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool):
        raise TypeError(f"ttl must be a number of seconds, or None (got {ttl!r}).")
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive, finite number of seconds (got {ttl!r}).")
    milliseconds = max(1, math.ceil(ttl * 1000))
    if milliseconds > _LONGEST_PX:
        raise ValueError(
            f"ttl must be at most {_LONGEST_PX // 1000} seconds for Redis (got {ttl!r}); "
            "pass None for no expiry."
        )
    return milliseconds


def _escaped(prefix: bytes) -> Iterator[int]:
    """``prefix`` with Redis's glob characters escaped, so SCAN MATCH takes it literally."""
    for byte in prefix:
        if byte in _GLOB_SPECIAL:
            yield ord("\\")
        yield byte


def _batches(names: Iterable[bytes]) -> Iterator[list[bytes]]:
    """``names`` in lists of at most ``_CLEAR_BATCH``."""
    batch: list[bytes] = []
    for name in names:
        batch.append(name)
        if len(batch) == _CLEAR_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_client(name: str, client: redis.Redis | redis.asyncio.Redis) -> None:
    """Refuses a client that decodes answers to str: cached values are bytes."""
    if client.get_encoder().decode_responses:
        raise ValueError(
            f"{name} must not decode responses (decode_responses=True): the cache stores "
            "bytes; use a codec to store other values."
        )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
