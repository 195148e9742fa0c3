"""RedisCache against the real server at BUTTRESS_REDIS_URL: round trips with and without a
codec, expiry on the server, bad input refused before anything is sent, clear() that keeps to
its prefix (glob characters and all), the asyncio twins, the cache under CacheAside,
WriteThrough and WriteBehind, and threads hammering one cache."""

from __future__ import annotations

import asyncio
import json
import math
import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio
from buttress.backends.redis import Codec, RedisCache
from buttress.caching import CacheAside, WriteBehind, WriteThrough
from buttress.caching.writebehind import MISSING, CacheBackend
from support import JOIN, CountingDatabase

# Nothing listens here: a call that reached the network would raise ConnectionError.
DEAD_URL = "redis://127.0.0.1:1/0"


class JsonCodec:
    def dumps(self, value: Any) -> bytes:
        return json.dumps(value).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackCodec:
    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder()

    def dumps(self, value: Any) -> bytes:
        return self.encoder.encode(value)

    def loads(self, data: bytes) -> Any:
        return self.decoder.decode(data)


def unique_prefix() -> str:
    return f"buttress-test:{uuid.uuid4().hex}:"


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client, to look behind the cache's back."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(raw: redis.Redis) -> Iterator[str]:
    """A prefix no other test uses; its keys are removed afterwards."""
    made = unique_prefix()
    try:
        yield made
    finally:
        wipe(raw, made)


def wipe(raw: redis.Redis, prefix: str) -> None:
    """Removes every key that starts with ``prefix``, matched as bytes (no glob involved)."""
    start = prefix.encode()
    names = [name for name in raw.scan_iter(count=1000) if name.startswith(start)]
    if names:
        raw.unlink(*names)


def stored(raw: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    """Every key under ``prefix`` (without it) and its raw value."""
    start = prefix.encode()
    names = [name for name in raw.scan_iter(count=1000) if name.startswith(start)]
    values = raw.mget(names) if names else []
    return {name[len(start) :]: value for name, value in zip(names, values, strict=True)}


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[RedisCache]:
    made = RedisCache(redis_url, prefix=prefix)
    try:
        yield made
    finally:
        made.close()


# ---- round trips -------------------------------------------------------------------------


def test_bytes_go_in_and_come_back(cache: RedisCache, raw: redis.Redis, prefix: str) -> None:
    cache.set("user:1", b"ada")
    cache.set(b"user:2", bytearray(b"grace"))
    cache.set(3, memoryview(b"edsger"))
    assert cache.get("user:1") == b"ada"
    assert cache.get(b"user:2") == b"grace"
    assert type(cache.get(b"user:2")) is bytes
    assert cache.get(3) == b"edsger"
    assert stored(raw, prefix) == {b"user:1": b"ada", b"user:2": b"grace", b"3": b"edsger"}
    cache.set("user:1", b"lovelace")
    assert cache.get("user:1") == b"lovelace"
    assert cache.delete("user:1") is None
    assert cache.get("user:1") is None
    cache.delete("user:1")  # deleting a missing key is fine


def test_int_and_str_keys_of_the_same_digits_share_an_entry(cache: RedisCache) -> None:
    cache.set(1, b"one")
    assert cache.get("1") == b"one"
    cache.set(b"-12", b"minus twelve")
    assert cache.get(-12) == b"minus twelve"
    cache.set("é", b"utf-8")
    assert cache.get("é".encode()) == b"utf-8"


def test_a_miss_gives_the_default_and_stored_empty_bytes_are_not_a_miss(
    cache: RedisCache,
) -> None:
    assert cache.get("nothing") is None
    assert cache.get("nothing", MISSING) is MISSING
    cache.set("empty", b"")
    assert cache.get("empty", MISSING) == b""


@pytest.mark.parametrize(
    "codec", [JsonCodec(), MsgpackCodec(), pickle], ids=["json", "msgpack", "pickle-module"]
)
def test_a_codec_round_trips_values(redis_url: str, prefix: str, codec: Codec) -> None:
    assert isinstance(codec, Codec)
    with RedisCache(redis_url, prefix=prefix, codec=codec) as cache:
        value = {"name": "Ada", "langs": ["en", "fr"], "age": 36, "ok": True}
        cache.set("user:1", value)
        assert cache.get("user:1") == value
        cache.set("nothing", None)
        assert cache.get("nothing", MISSING) is None  # a stored None is not a miss
        assert cache.get("missing", MISSING) is MISSING
        cache.set("text", "plain")
        assert cache.get("text") == "plain"


def test_a_codec_that_does_not_give_bytes_is_refused(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    with (
        # The json module fits the protocol, but its dumps gives str.
        RedisCache(redis_url, prefix=prefix, codec=json) as cache,
        pytest.raises(TypeError, match=r"codec\.dumps must return bytes \(got str"),
    ):
        cache.set("k", {"a": 1})
    assert stored(raw, prefix) == {}


def test_it_is_a_blocking_cache_backend(cache: RedisCache) -> None:
    assert isinstance(cache, CacheBackend)
    assert RedisCache.blocking is True
    assert repr(cache).startswith("RedisCache('redis://")


# ---- expiry ------------------------------------------------------------------------------


def test_an_entry_expires_on_the_server(cache: RedisCache, raw: redis.Redis, prefix: str) -> None:
    cache.set("short", b"v", ttl=0.05)
    cache.set("long", b"v", ttl=60)
    assert 0 < raw.pttl(f"{prefix}long") <= 60_000
    assert raw.pttl(f"{prefix}short") <= 50
    deadline = time.monotonic() + JOIN
    while cache.get("short", MISSING) is not MISSING:
        assert time.monotonic() < deadline, "the entry did not expire"
        time.sleep(0.005)
    assert raw.exists(f"{prefix}short") == 0
    assert cache.get("long") == b"v"


class RecordingRedis(redis.Redis):
    """A redis-py client that remembers every command it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(args)
        return super().execute_command(*args, **options)


@pytest.mark.parametrize(
    ("ttl", "milliseconds"),
    [(10.0001, 10_001), (10, 10_000), (0.0015, 2), (1e-9, 1), (2.5e-4, 1)],
    ids=repr,
)
def test_a_ttl_goes_as_whole_milliseconds_rounded_up(
    redis_url: str, prefix: str, ttl: float, milliseconds: int
) -> None:
    client = RecordingRedis.from_url(redis_url)
    try:
        cache = RedisCache(prefix=prefix, client=client)
        cache.set("k", b"v", ttl=ttl)
        cache.close()  # leaves a client passed in open
        assert client.sent == [("SET", f"{prefix}k".encode(), b"v", "PX", milliseconds)]
        assert client.pttl(f"{prefix}k") <= milliseconds  # -2 once expired
    finally:
        client.close()


def test_a_set_without_ttl_drops_an_earlier_expiry(
    cache: RedisCache, raw: redis.Redis, prefix: str
) -> None:
    cache.set("k", b"1", ttl=30)
    cache.set("k", b"2")
    assert raw.pttl(f"{prefix}k") == -1
    assert cache.get("k") == b"2"


@pytest.mark.parametrize(
    ("ttl", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        (2.0**62, ValueError),
        (True, TypeError),
        ("5", TypeError),
    ],
    ids=repr,
)
def test_a_bad_ttl_is_refused_and_changes_nothing(
    cache: RedisCache, raw: redis.Redis, prefix: str, ttl: Any, error: type[Exception]
) -> None:
    cache.set("k", b"before")
    with pytest.raises(error, match=r"^ttl must be"):
        cache.set("k", b"after", ttl=ttl)
    with pytest.raises(error, match=r"^ttl must be"):
        cache.set("new", b"after", ttl=ttl)
    assert stored(raw, prefix) == {b"k": b"before"}
    assert raw.pttl(f"{prefix}k") == -1


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", [True, 1.5, None, bytearray(b"k"), ("a",)], ids=repr)
def test_a_bad_key_is_refused_by_every_call(
    cache: RedisCache, raw: redis.Redis, prefix: str, key: Any
) -> None:
    for call in (
        lambda: cache.set(key, b"v"),
        lambda: cache.get(key),
        lambda: cache.delete(key),
    ):
        with pytest.raises(TypeError, match=r"^key must be a str, bytes or int \(got "):
            call()
    assert stored(raw, prefix) == {}


def test_a_key_that_is_not_utf8_is_refused(
    cache: RedisCache, raw: redis.Redis, prefix: str
) -> None:
    with pytest.raises(ValueError, match=r"^key must be encodable as UTF-8"):
        cache.set("\udc80", b"v")
    assert stored(raw, prefix) == {}


@pytest.mark.parametrize("value", ["text", 5, None, {"a": 1}, [b"x"]], ids=repr)
def test_without_a_codec_a_value_that_is_not_bytes_is_refused(
    cache: RedisCache, raw: redis.Redis, prefix: str, value: Any
) -> None:
    cache.set("k", b"before")
    with pytest.raises(TypeError, match=r"^value must be bytes .* \(got "):
        cache.set("k", value)
    with pytest.raises(TypeError, match=r"^value must be bytes"):
        cache.set("new", value, ttl=5)
    assert stored(raw, prefix) == {b"k": b"before"}


async def test_bad_input_is_refused_before_anything_is_sent() -> None:
    # No server at DEAD_URL: only a refusal before the network can give these errors.
    cache = RedisCache(DEAD_URL, prefix="nowhere:")
    try:
        with pytest.raises(TypeError, match=r"^value"):
            cache.set("k", "text")
        with pytest.raises(TypeError, match=r"^key"):
            cache.get(1.5)
        with pytest.raises(ValueError, match=r"^ttl"):
            cache.set("k", b"v", ttl=0)
        with pytest.raises(TypeError, match=r"^value"):
            await cache.set_async("k", "text")
        with pytest.raises(TypeError, match=r"^key"):
            await cache.delete_async(None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"^ttl"):
            await cache.set_async("k", b"v", ttl=-1)
    finally:
        await cache.close_async()


def bad_options() -> list[tuple[str, Any, type[Exception], str]]:
    """(id, a function making the options, the error, the start of its message)."""
    return [
        ("empty-prefix", lambda: {"prefix": ""}, ValueError, r"^prefix must not be empty"),
        ("bytes-prefix", lambda: {"prefix": b"p:"}, TypeError, r"^prefix must be a str"),
        ("object-codec", lambda: {"codec": object()}, TypeError, r"^codec must have dumps"),
        (
            "decoding-client",
            lambda: {"client": redis.Redis.from_url(DEAD_URL, decode_responses=True)},
            ValueError,
            r"^client must not decode responses",
        ),
        (
            "decoding-async-client",
            lambda: {"async_client": redis.asyncio.Redis.from_url(DEAD_URL, decode_responses=True)},
            ValueError,
            r"^async_client must not decode responses",
        ),
        (
            "decoding-url",
            lambda: {"url": DEAD_URL + "?decode_responses=True"},
            ValueError,
            r"^url must not decode responses",
        ),
        ("bytes-url", lambda: {"url": b"redis://x"}, TypeError, r"^url must be"),
    ]


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [case[1:] for case in bad_options()],
    ids=[case[0] for case in bad_options()],
)
def test_bad_options_name_the_argument(make: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        RedisCache(**make())


# ---- clear -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mine", "neighbour"),
    [("plain:", "plainer:"), ("*:", "any:"), ("[ab]:", "a:"), ("?:", "x:"), ("\\x:", "x:")],
    ids=["plain", "star", "brackets", "question", "backslash"],
)
def test_clear_removes_its_prefix_and_nothing_else(
    redis_url: str, raw: redis.Redis, mine: str, neighbour: str
) -> None:
    base = unique_prefix()
    try:
        with (
            RedisCache(redis_url, prefix=base + mine) as cache,
            RedisCache(redis_url, prefix=base + neighbour) as other,
        ):
            for number in range(1_234):  # more than one batch
                cache.set(f"k{number}", b"v")
            for number in range(20):
                other.set(f"k{number}", b"kept")
            raw.set(base + "outside", b"kept")
            cache.clear()
            assert stored(raw, base + mine) == {}
            assert stored(raw, base + neighbour) == {f"k{n}".encode(): b"kept" for n in range(20)}
            assert raw.get(base + "outside") == b"kept"
            cache.clear()  # nothing left to clear
            cache.set("again", b"v")
            assert cache.get("again") == b"v"
    finally:
        wipe(raw, base)


# ---- asyncio twins -----------------------------------------------------------------------


async def test_the_async_twins_match_the_blocking_calls(
    redis_url: str, prefix: str, raw: redis.Redis
) -> None:
    async with RedisCache(redis_url, prefix=prefix, codec=JsonCodec()) as cache:
        await cache.set_async("user:1", {"name": "Ada"})
        assert await cache.get_async("user:1") == {"name": "Ada"}
        assert cache.get("user:1") == {"name": "Ada"}  # the same entry, either way
        assert await cache.get_async("missing", MISSING) is MISSING
        await cache.set_async(2, None)
        assert await cache.get_async("2", MISSING) is None
        await cache.delete_async("user:1")
        assert await cache.get_async("user:1") is None
        await cache.set_async("short", [1], ttl=0.05)
        assert raw.pttl(f"{prefix}short") <= 50
        deadline = time.monotonic() + JOIN
        while await cache.get_async("short", MISSING) is not MISSING:
            assert time.monotonic() < deadline, "the entry did not expire"
            await asyncio.sleep(0.005)
        for number in range(600):
            await cache.set_async(number, number)
        await cache.clear_async()
        assert stored(raw, prefix) == {}


async def test_async_calls_run_concurrently_on_one_loop(redis_url: str, prefix: str) -> None:
    # More tasks than the pool's 50 connections: the extra ones wait for a free connection.
    async with RedisCache(redis_url, prefix=prefix) as cache:
        await asyncio.gather(*(cache.set_async(n, b"%d" % n) for n in range(200)))
        got = await asyncio.gather(*(cache.get_async(n) for n in range(200)))
        assert got == [b"%d" % n for n in range(200)]


async def test_an_async_client_passed_in_is_used_and_left_open(redis_url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        cache = RedisCache(redis_url, prefix=prefix, async_client=client)
        assert cache.async_client is client
        await cache.set_async("k", b"v")
        await cache.close_async()
        assert await client.get(f"{prefix}k") == b"v"  # still open
    finally:
        await client.aclose()


def test_the_made_async_client_belongs_to_one_loop_until_closed(
    redis_url: str, prefix: str
) -> None:
    cache = RedisCache(redis_url, prefix=prefix)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        first.run_until_complete(cache.set_async("k", b"v"))
        with pytest.raises(RuntimeError, match="another event loop; call close_async"):
            second.run_until_complete(cache.get_async("k"))
        first.run_until_complete(cache.close_async())
        assert second.run_until_complete(cache.get_async("k")) == b"v"
        second.run_until_complete(cache.close_async())
    finally:
        first.close()
        second.close()


def test_more_threads_than_connections_wait_for_one(redis_url: str, prefix: str) -> None:
    with RedisCache(redis_url + "?max_connections=4", prefix=prefix) as cache:
        start = threading.Barrier(24)
        errors: list[BaseException] = []

        def work(number: int) -> None:
            try:
                start.wait(JOIN)
                for round_ in range(20):
                    cache.set(number, b"%d" % round_)
                    assert cache.get(number) == b"%d" % round_
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []


# ---- under the caching services ----------------------------------------------------------


def test_cache_aside_loads_a_stampeded_key_once(
    cache: RedisCache, raw: redis.Redis, prefix: str
) -> None:
    database = CountingDatabase(delay=0.05)
    database.data["hot"] = b"value"
    aside = CacheAside(cache, database, ttl=30)
    start = threading.Barrier(16)
    got: list[Any] = []

    def read() -> None:
        start.wait(JOIN)
        got.append(aside.get("hot"))

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert got == [b"value"] * 16
    assert database.reads == 1
    assert 0 < raw.pttl(f"{prefix}hot") <= 30_000
    assert aside.get("hot") == b"value"
    assert database.reads == 1  # from Redis
    aside.put("hot", b"new")
    assert raw.exists(f"{prefix}hot") == 0  # the write dropped the entry
    assert aside.get("hot") == b"new"
    aside.delete("hot")
    assert aside.get("hot", "gone") == "gone"


def test_cache_aside_shares_entries_between_services(redis_url: str, prefix: str) -> None:
    database = CountingDatabase()
    database.data["k"] = b"v"
    with RedisCache(redis_url, prefix=prefix) as one, RedisCache(redis_url, prefix=prefix) as two:
        assert CacheAside(one, database).get("k") == b"v"
        assert CacheAside(two, database).get("k") == b"v"
    assert database.reads == 1  # the second service found the first one's entry


def test_write_through_writes_the_database_then_redis(
    cache: RedisCache, raw: redis.Redis, prefix: str
) -> None:
    database = CountingDatabase()
    through = WriteThrough(cache, database, ttl=30)
    through.put("k", b"v1")
    assert database.data == {"k": b"v1"}
    assert raw.get(f"{prefix}k") == b"v1"
    assert 0 < raw.pttl(f"{prefix}k") <= 30_000
    database.refuse = True
    with pytest.raises(ConnectionError):
        through.put("k", b"v2")
    assert raw.get(f"{prefix}k") == b"v1"  # the refused write left the cache alone
    database.refuse = False
    through.delete("k")
    assert database.data == {}
    assert raw.exists(f"{prefix}k") == 0
    database.data["other"] = b"loaded"
    assert through.get("other") == b"loaded"
    assert raw.get(f"{prefix}other") == b"loaded"


def test_write_behind_over_redis_reads_pending_writes_and_drains_on_close(
    cache: RedisCache, raw: redis.Redis, prefix: str
) -> None:
    database = CountingDatabase()
    database.write_gate = threading.Event()  # holds every batch back, so writes stay pending
    store = WriteBehind(cache, database, batch_size=16, flush_interval=0.01, close_at_exit=False)
    try:
        expected: dict[str, bytes] = {}
        for number in range(300):
            key = f"user:{number % 40}"
            store.set(key, b"%d" % number)
            expected[key] = b"%d" % number
        store.delete("user:7")
        del expected["user:7"]
        assert database.data == {}
        raw.unlink(f"{prefix}user:3")  # Redis dropped it (evicted); the pending write remains
        assert store.get("user:3") == expected["user:3"]
        assert store.get("user:7", "gone") == "gone"
    finally:
        database.write_gate.set()
        left = store.close(timeout=JOIN)
    assert left == []
    assert database.data == expected
    assert stored(raw, prefix) == {
        key.encode(): value for key, value in expected.items() if key != "user:3"
    }


# ---- races and failures between the service and a network cache ------------------------


class HeldCache:
    """A RedisCache whose ``set`` of one value waits for ``release``: a slow round trip."""

    def __init__(self, cache: RedisCache, held: bytes) -> None:
        self.cache = cache
        self.held = held
        self.reached = threading.Event()
        self.release = threading.Event()

    def get(self, key: Any, default: Any = None) -> Any:
        return self.cache.get(key, default)

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        if value == self.held:
            self.reached.set()
            assert self.release.wait(JOIN)
        self.cache.set(key, value, ttl)

    def delete(self, key: Any) -> None:
        self.cache.delete(key)


def test_write_behind_get_after_racing_sets_agrees_with_the_database(
    cache: RedisCache,
) -> None:
    """Two sets of one key queue in one order and reach Redis in the other (a slow round
    trip): the overtaken one must not leave its older value in the cache."""
    held = HeldCache(cache, b"older")
    database = CountingDatabase()
    store = WriteBehind(held, database, flush_interval=0.01, close_at_exit=False)
    try:
        first = threading.Thread(target=store.set, args=("k", b"older"))
        first.start()
        assert held.reached.wait(JOIN)  # "older" is queued; its cache write is on the way
        store.set("k", b"newer")
        held.release.set()
        first.join(JOIN)
        assert store.flush(timeout=JOIN)
        assert database.data == {"k": b"newer"}
        assert store.get("k") == b"newer"
    finally:
        held.release.set()
        store.close(timeout=JOIN)


def test_write_through_get_after_racing_puts_agrees_with_the_database(
    cache: RedisCache,
) -> None:
    held = HeldCache(cache, b"older")
    database = CountingDatabase()
    through = WriteThrough(held, database)
    first = threading.Thread(target=through.put, args=("k", b"older"))
    first.start()
    try:
        assert held.reached.wait(JOIN)
        through.put("k", b"newer")
    finally:
        held.release.set()
        first.join(JOIN)
    assert database.data == {"k": b"newer"}
    assert through.get("k") == b"newer"


def test_write_through_a_value_the_cache_refuses_leaves_no_stale_entry(
    cache: RedisCache,
) -> None:
    database = CountingDatabase()
    through = WriteThrough(cache, database)
    through.put("k", b"old")
    with pytest.raises(TypeError, match=r"^value"):
        through.put("k", "new, but not bytes")
    assert through.get("k") == database.data["k"]


def test_write_behind_a_set_that_raises_writes_nothing(cache: RedisCache) -> None:
    database = CountingDatabase()
    store = WriteBehind(cache, database, flush_interval=0.01, close_at_exit=False)
    try:
        with pytest.raises(TypeError, match=r"^value"):
            store.set("k", "not bytes")
        assert store.flush(timeout=JOIN)
        assert database.data == {}
    finally:
        store.close(timeout=JOIN)


# ---- stress ------------------------------------------------------------------------------


def test_threads_hammering_one_cache_leave_a_consistent_state(
    cache: RedisCache, raw: redis.Redis, prefix: str
) -> None:
    threads_count, rounds = 8, 300
    errors: list[BaseException] = []
    finals: dict[str, bytes | None] = {}
    start = threading.Barrier(threads_count)

    def hammer(worker: int) -> None:
        try:
            start.wait(JOIN)
            mine = [f"own:{worker}:{n}" for n in range(5)]
            last: dict[str, bytes | None] = dict.fromkeys(mine)
            for number in range(rounds):
                key = mine[number % 5]
                if number % 7 == 3:
                    cache.delete(key)
                    last[key] = None
                else:
                    value = b"%d:%d" % (worker, number)
                    cache.set(key, value, ttl=60 if number % 2 else None)
                    last[key] = value
                assert cache.get(key) == last[key]  # read-your-writes on its own keys
                shared = f"shared:{number % 3}"
                cache.set(shared, b"%d:%d" % (worker, number))
                seen = cache.get(shared)
                assert seen is None or seen.count(b":") == 1
                if number % 50 == 0:
                    cache.delete(shared)
            finals.update(last)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(threads_count)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert errors == []
    assert time.monotonic() - began < 60
    everything = stored(raw, prefix)
    for key, value in finals.items():
        assert cache.get(key) == value
        assert everything.get(key.encode()) == value
    own = {name for name in everything if name.startswith(b"own:")}
    assert own == {key.encode() for key, value in finals.items() if value is not None}
    for number in range(3):
        value = cache.get(f"shared:{number}")
        assert value is None or value.count(b":") == 1
