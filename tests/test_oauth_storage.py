"""Every OAuth store held to one contract: ``InMemoryOAuthStorage``, ``PostgresOAuthStorage``
and ``RedisOAuthStorage`` run the same tests.

Every protocol method, the round trip of every record field (unicode, None, empty tuples), the
atomic steps (using a code, rotating a refresh token) raced by 8 threads with exactly one
winner, a family revocation that also catches tokens saved into the family later (raced too),
and purge. Then what only the shared stores have: bad constructor arguments, pools and clients
passed in, expiry on the Redis server, and the PostgreSQL schema made by several stores at once.

The PostgreSQL and Redis cases take the ``postgres_url`` and ``redis_url`` fixtures, so they
skip (or fail, with ``BUTTRESS_REQUIRE_SERVICES=1``) when no server answers. Each test gets
tables or keys of its own (a fresh table prefix or key prefix), dropped or deleted afterwards,
even when it fails.
"""

from __future__ import annotations

import contextlib
import doctest
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from buttress.backends import postgres_oauth, redis_oauth
from buttress.backends.postgres import postgres_pool
from buttress.backends.postgres_oauth import PostgresOAuthStorage
from buttress.backends.redis_oauth import RedisOAuthStorage
from buttress.security.oauth.storage import (
    AuthorizationCodeRecord,
    ClientRecord,
    InMemoryOAuthStorage,
    OAuthStorage,
    SigningKeyRecord,
    TokenRecord,
)
from support import run_threads

STORES = ["memory", "postgres", "redis"]
TABLES = ("clients", "codes", "tokens", "revoked_families", "signing_keys")
THREADS = 8
# How long the short-lived records of the expiry tests live, and how long the tests wait past it.
SHORT = 0.3
PAST = 0.4


# -- stores and their cleanup (the multi-instance tests use these too) ---------------------------


def unique_table_prefix() -> str:
    return f"bt_oauth_{uuid.uuid4().hex[:12]}"


def unique_key_prefix() -> str:
    return f"buttress-test:oauth:{uuid.uuid4().hex}:"


def drop_oauth_tables(url: str, prefix: str) -> None:
    """Drops the tables a PostgresOAuthStorage made for ``prefix``, and checks none is left."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("set lock_timeout = '10s'")
        admin.execute("drop table if exists " + ", ".join(f"{prefix}_{table}" for table in TABLES))
        left = admin.execute(
            "select relname from pg_class where starts_with(relname, %s)", (prefix,)
        ).fetchall()
    assert left == []


def wipe(url: str, prefix: str) -> None:
    """Deletes every key under ``prefix`` (matched as bytes, no glob), and checks none is left."""
    start = prefix.encode()
    with redis.Redis.from_url(url) as raw:
        names = [name for name in raw.scan_iter(count=1000) if name.startswith(start)]
        if names:
            raw.unlink(*names)
        assert not any(name.startswith(start) for name in raw.scan_iter(count=1000))


@contextlib.contextmanager
def shared_stores(
    request: pytest.FixtureRequest, kind: str
) -> Iterator[Callable[[], OAuthStorage]]:
    """Makes ``kind`` ("postgres" or "redis") store objects that all share one fresh table or
    key prefix, as separate processes would; closes them and drops their tables or keys
    afterwards."""
    made: list[PostgresOAuthStorage | RedisOAuthStorage] = []
    make: Callable[[], OAuthStorage]
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        table_prefix = unique_table_prefix()

        def make() -> OAuthStorage:
            made.append(PostgresOAuthStorage(url, table_prefix=table_prefix, max_size=THREADS))
            return made[-1]

        def cleanup() -> None:
            drop_oauth_tables(url, table_prefix)

    else:
        url = request.getfixturevalue("redis_url")
        key_prefix = unique_key_prefix()

        def make() -> OAuthStorage:
            made.append(RedisOAuthStorage(url, prefix=key_prefix))
            return made[-1]

        def cleanup() -> None:
            wipe(url, key_prefix)

    try:
        yield make
    finally:
        for store in made:
            store.close()
        cleanup()


@pytest.fixture(params=STORES)
def storage(request: pytest.FixtureRequest) -> Iterator[OAuthStorage]:
    """Each store in turn, empty, on tables or keys of its own."""
    if request.param == "memory":
        yield InMemoryOAuthStorage()
        return
    with shared_stores(request, request.param) as make:
        yield make()


# -- records -------------------------------------------------------------------------------------


def code_record(code_hash: str = "c0de", **changes: Any) -> AuthorizationCodeRecord:
    now = time.time()
    fields: dict[str, Any] = {
        "code_hash": code_hash,
        "client_id": "spa-ü",
        "subject": "alice-日本",
        "redirect_uri": "https://app.example/cb?q=é",
        "scope": "read write",
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
        "family_id": "family-1",
        "expires_at": now + 60.123456789,
        "retain_until": now + 3600.000001,
    }
    fields.update(changes)
    return AuthorizationCodeRecord(**fields)


def token_record(token_hash: str = "t0ken", **changes: Any) -> TokenRecord:
    now = time.time()
    fields: dict[str, Any] = {
        "token_hash": token_hash,
        "kind": "refresh_token",
        "client_id": "spa-ü",
        "subject": "alice-日本",
        "scope": "read",
        "family_id": "family-1",
        "issued_at": now - 0.000001,
        "expires_at": now + 600.5,
    }
    fields.update(changes)
    return TokenRecord(**fields)


# -- the protocol ----------------------------------------------------------------------------------


def test_every_store_implements_the_protocol(storage: OAuthStorage) -> None:
    assert isinstance(storage, OAuthStorage)
    assert type(storage).__name__ in repr(storage)


def test_clients_round_trip_and_are_replaced(storage: OAuthStorage) -> None:
    public = ClientRecord("spa-ü", None, (), (), ())
    confidential = ClientRecord(
        "svc-日本",
        "scrypt$ab$cd",
        ("https://app.example/cb", "http://127.0.0.1/é"),
        ("read", "write"),
        ("authorization_code", "refresh_token", "client_credentials"),
    )
    assert storage.get_client("spa-ü") is None
    storage.save_client(public)
    storage.save_client(confidential)
    assert storage.get_client("spa-ü") == public
    assert storage.get_client("svc-日本") == confidential
    assert storage.get_client("spa-") is None
    replaced = ClientRecord("spa-ü", "hash", ("https://x/cb",), ("read",), ("refresh_token",))
    storage.save_client(replaced)
    assert storage.get_client("spa-ü") == replaced
    storage.save_client(public)  # a secret hash replaced by None is gone, not kept
    assert storage.get_client("spa-ü") == public


def test_codes_round_trip_and_are_used_once(storage: OAuthStorage) -> None:
    code = code_record()
    plain = code_record("c0de-2", redirect_uri=None, scope="", used=True)
    assert storage.get_code(code.code_hash) is None
    assert storage.use_code(code.code_hash) is False  # unknown
    storage.save_code(code)
    storage.save_code(plain)
    assert storage.get_code(code.code_hash) == code
    assert storage.get_code(plain.code_hash) == plain
    assert storage.use_code(plain.code_hash) is False  # saved used
    assert storage.use_code(code.code_hash) is True
    assert storage.use_code(code.code_hash) is False
    assert storage.get_code(code.code_hash) == code_record(
        expires_at=code.expires_at, retain_until=code.retain_until, used=True
    )


def test_tokens_round_trip(storage: OAuthStorage) -> None:
    access = token_record(
        "access-1",
        kind="access_token",
        audience="https://api.example/ü",
        token_id="jti-日本",
        scope="",
    )
    bare = token_record("refresh-1", subject=None)
    flagged = token_record("refresh-2", revoked=True, used=True, family_id="family-2")
    for token in (access, bare, flagged):
        assert storage.get_token(token.token_hash) is None
        storage.save_token(token)
    for token in (access, bare, flagged):
        assert storage.get_token(token.token_hash) == token
    replaced = token_record("refresh-1", scope="read write")
    storage.save_token(replaced)
    assert storage.get_token("refresh-1") == replaced


def test_a_refresh_token_is_used_once_and_only_when_live(storage: OAuthStorage) -> None:
    storage.save_token(token_record("refresh"))
    storage.save_token(token_record("access", kind="access_token"))
    storage.save_token(token_record("revoked", revoked=True))
    assert storage.use_refresh_token("unknown") is False
    assert storage.use_refresh_token("access") is False
    assert storage.use_refresh_token("revoked") is False
    assert storage.use_refresh_token("refresh") is True
    assert storage.use_refresh_token("refresh") is False
    found = storage.get_token("refresh")
    assert found is not None
    assert found.used
    assert not found.revoked


def test_revoke_token_marks_one_token(storage: OAuthStorage) -> None:
    storage.save_token(token_record("a"))
    storage.save_token(token_record("b"))
    storage.revoke_token("a")
    storage.revoke_token("unknown")  # nothing happens, nothing is made
    assert storage.get_token("unknown") is None
    assert storage.get_token("a") == token_record("a", revoked=True, **_times(storage, "a"))
    found = storage.get_token("b")
    assert found is not None
    assert not found.revoked
    assert storage.use_refresh_token("a") is False


def _times(storage: OAuthStorage, token_hash: str) -> dict[str, float]:
    found = storage.get_token(token_hash)
    assert found is not None
    return {"issued_at": found.issued_at, "expires_at": found.expires_at}


def test_revoke_family_revokes_its_tokens_and_later_ones(storage: OAuthStorage) -> None:
    now = time.time()
    storage.save_token(token_record("mine-1"))
    storage.save_token(token_record("mine-2", kind="access_token"))
    storage.save_token(token_record("other", family_id="family-2"))
    storage.revoke_family("family-1", now + 60)
    assert _revoked(storage, "mine-1", "mine-2", "other") == [True, True, False]
    assert storage.use_refresh_token("mine-1") is False
    storage.save_token(token_record("later"))
    assert _revoked(storage, "later") == [True]
    assert storage.use_refresh_token("later") is False
    storage.revoke_family("unknown-family", now + 60)  # nothing to revoke yet
    storage.save_token(token_record("late", family_id="unknown-family"))
    assert _revoked(storage, "late", "other") == [True, False]


def test_a_token_saved_again_into_another_family_leaves_the_first(
    storage: OAuthStorage,
) -> None:
    storage.save_token(token_record("moved", family_id="first"))
    storage.save_token(token_record("moved", family_id="second"))
    storage.revoke_family("first", time.time() + 60)
    assert _revoked(storage, "moved") == [False]
    storage.revoke_family("second", time.time() + 60)
    assert _revoked(storage, "moved") == [True]


def test_a_family_revocation_is_forgotten_after_remember_until(storage: OAuthStorage) -> None:
    now = time.time()
    storage.revoke_family("long", now + 60)
    storage.revoke_family("long", now + SHORT)  # the later of the two is kept
    storage.revoke_family("short", now + SHORT)
    time.sleep(PAST)
    storage.purge(time.time())
    storage.save_token(token_record("in-long", family_id="long"))
    storage.save_token(token_record("in-short", family_id="short"))
    assert _revoked(storage, "in-long", "in-short") == [True, False]


def _revoked(storage: OAuthStorage, *token_hashes: str) -> list[bool]:
    found = [storage.get_token(token_hash) for token_hash in token_hashes]
    return [token is not None and token.revoked for token in found]


def test_signing_keys_round_trip_oldest_first(storage: OAuthStorage) -> None:
    assert storage.signing_keys() == []
    now = time.time()
    jwk = {"kty": "EC", "crv": "P-256", "x": "ü-x", "y": "y", "d": "secret", "kid": "k2"}
    second = SigningKeyRecord("k2", jwk, created_at=now + 0.000001)
    first = SigningKeyRecord("k1", {"kty": "EC"}, created_at=now, retire_at=now + 600.25)
    third = SigningKeyRecord("k3-日本", {}, created_at=now + 2)
    for key in (second, third, first):
        storage.save_signing_key(key)
    found = storage.signing_keys()
    assert found == [first, second, third]
    assert [dict(key.private_jwk) for key in found] == [{"kty": "EC"}, jwk, {}]
    retired = SigningKeyRecord("k2", jwk, created_at=second.created_at, retire_at=now + 1)
    storage.save_signing_key(retired)
    storage.save_signing_key(SigningKeyRecord("k1", {"kty": "EC"}, created_at=now))  # current
    assert storage.signing_keys() == [
        SigningKeyRecord("k1", {"kty": "EC"}, created_at=now),
        retired,
        third,
    ]


def test_purge_drops_what_has_expired(storage: OAuthStorage) -> None:
    assert storage.purge(time.time()) == 0
    now = time.time()
    soon = now + SHORT
    storage.save_client(ClientRecord("cli", None, (), (), ()))
    storage.save_code(code_record("old-code", expires_at=soon, retain_until=soon))
    storage.save_code(code_record("new-code", expires_at=soon))
    storage.save_token(token_record("old-token", expires_at=soon))
    storage.save_token(token_record("new-token"))
    storage.revoke_family("old-family", soon)
    storage.revoke_family("new-family", now + 60)
    storage.save_signing_key(SigningKeyRecord("old-key", {}, created_at=now, retire_at=soon))
    storage.save_signing_key(SigningKeyRecord("retiring", {}, created_at=now, retire_at=now + 60))
    storage.save_signing_key(SigningKeyRecord("current", {}, created_at=now))
    time.sleep(PAST)
    removed = storage.purge(time.time())
    # Redis expires codes, tokens and revocations by itself: purge has only the key left.
    assert removed == (1 if isinstance(storage, RedisOAuthStorage) else 4)
    assert storage.get_code("old-code") is None
    assert storage.get_token("old-token") is None
    assert storage.get_code("new-code") is not None
    assert storage.get_token("new-token") is not None
    assert storage.get_client("cli") is not None
    assert sorted(key.kid for key in storage.signing_keys()) == ["current", "retiring"]
    storage.save_token(token_record("a", family_id="old-family"))
    storage.save_token(token_record("b", family_id="new-family"))
    assert _revoked(storage, "a", "b") == [False, True]
    assert storage.purge(time.time()) == 0


# -- races ---------------------------------------------------------------------------------------


def race(attempt: Callable[[], bool]) -> None:
    """Runs ``attempt`` on THREADS threads released together; exactly one may win."""
    barrier = threading.Barrier(THREADS)
    wins: list[bool] = []
    lock = threading.Lock()

    def worker(_: int) -> None:
        barrier.wait()
        won = attempt()
        with lock:
            wins.append(won)

    run_threads(worker, THREADS, within=20)
    assert sorted(wins) == [False] * (THREADS - 1) + [True]


def test_racing_threads_use_a_code_once(storage: OAuthStorage) -> None:
    for round_ in range(3):
        code_hash = f"code-{round_}"
        storage.save_code(code_record(code_hash))
        race(lambda code_hash=code_hash: storage.use_code(code_hash))
        found = storage.get_code(code_hash)
        assert found is not None
        assert found.used


def test_racing_threads_rotate_a_refresh_token_once(storage: OAuthStorage) -> None:
    for round_ in range(3):
        token_hash = f"refresh-{round_}"
        storage.save_token(token_record(token_hash))
        race(lambda token_hash=token_hash: storage.use_refresh_token(token_hash))
        found = storage.get_token(token_hash)
        assert found is not None
        assert found.used


def test_no_token_escapes_a_family_revoked_while_tokens_are_saved(storage: OAuthStorage) -> None:
    # Without the revocation table consulted on reads, PostgreSQL lets tokens escape here: an
    # insert and the revoking update that run at once do not see each other.
    for round_ in range(5):
        family = f"family-{round_}"
        barrier = threading.Barrier(THREADS)

        def worker(index: int, family: str = family, barrier: Any = barrier) -> None:
            barrier.wait()
            if index == 0:
                storage.revoke_family(family, time.time() + 60)
                return
            for n in range(10):
                storage.save_token(token_record(f"{family}-{index}-{n}", family_id=family))

        run_threads(worker, THREADS, within=20)
        hashes = [f"{family}-{index}-{n}" for index in range(1, THREADS) for n in range(10)]
        assert all(_revoked(storage, *hashes))
        assert not any(storage.use_refresh_token(token_hash) for token_hash in hashes)


# -- what only the shared stores have --------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: PostgresOAuthStorage(5432), TypeError, "pool_or_url must be a postgresql://"),
        (lambda: PostgresOAuthStorage(None), TypeError, r"pool_or_url .*\(got NoneType\)"),
        (
            lambda: PostgresOAuthStorage("postgresql://x", table_prefix="Bad-Name"),
            ValueError,
            "table_prefix must be lower-case letters",
        ),
        (
            lambda: PostgresOAuthStorage("postgresql://x", table_prefix=7),
            TypeError,
            r"table_prefix must be a str \(got int\)",
        ),
        (lambda: RedisOAuthStorage(6379), TypeError, "url must be a redis:// URL string"),
        (lambda: RedisOAuthStorage(prefix=b"x:"), TypeError, r"prefix must be a str \(got bytes"),
        (lambda: RedisOAuthStorage(prefix=""), ValueError, "prefix must not be empty"),
        (lambda: RedisOAuthStorage(client="redis://x"), TypeError, "client must be a redis.Redis"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(
    make: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        make()
    assert str(raised.value).endswith(".")


def test_pool_options_with_a_pool_passed_in_are_refused() -> None:
    pool = postgres_pool("postgresql://127.0.0.1:1/none", min_size=0)
    try:
        with pytest.raises(TypeError, match=r"pool options \(max_size\) apply only when"):
            PostgresOAuthStorage(pool, max_size=3)
    finally:
        pool.close()


def test_the_docstring_examples_run() -> None:
    for module in (postgres_oauth, redis_oauth):
        assert module.__all__ == [name for name in module.__all__ if getattr(module, name).__doc__]
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


def test_a_postgres_store_uses_a_pool_passed_in_and_leaves_it_open(postgres_url: str) -> None:
    prefix = unique_table_prefix()
    # Not autocommit: the store must commit what it writes.
    pool = postgres_pool(postgres_url, min_size=0, max_size=2)
    try:
        store = PostgresOAuthStorage(pool, table_prefix=prefix)
        store.save_client(ClientRecord("cli", None, (), (), ()))
        assert store.use_code("none") is False
        store.close()
        assert not pool.closed
        with PostgresOAuthStorage(postgres_url, table_prefix=prefix) as other:
            assert other.get_client("cli") == ClientRecord("cli", None, (), (), ())
            assert "postgresql://" not in repr(other)  # a URL may hold a password
    finally:
        pool.close()
        drop_oauth_tables(postgres_url, prefix)


def test_postgres_stores_starting_at_once_make_the_schema_once(postgres_url: str) -> None:
    prefix = unique_table_prefix()
    stores: list[PostgresOAuthStorage] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def start(_: int) -> None:
        barrier.wait()
        store = PostgresOAuthStorage(postgres_url, table_prefix=prefix, max_size=1)
        with lock:
            stores.append(store)

    try:
        run_threads(start, 4, within=20)
        stores[0].save_client(ClientRecord("cli", None, (), (), ()))
        assert all(store.get_client("cli") is not None for store in stores)
    finally:
        for store in stores:
            store.close()
        drop_oauth_tables(postgres_url, prefix)


def test_redis_forgets_codes_tokens_and_revocations_by_itself(redis_url: str) -> None:
    prefix = unique_key_prefix()
    raw = redis.Redis.from_url(redis_url)
    try:
        with RedisOAuthStorage(redis_url, prefix=prefix) as store:
            now = time.time()
            store.save_code(code_record("code", retain_until=now + 60))
            store.save_token(token_record("token", expires_at=now + 120))
            store.save_token(token_record("soon", expires_at=now + SHORT, family_id="f"))
            store.revoke_family("f", now + 90)
            store.save_client(ClientRecord("cli", None, (), (), ()))
            assert 59_000 < raw.pttl(f"{prefix}code:code") <= 60_000
            assert 119_000 < raw.pttl(f"{prefix}token:token") <= 120_000
            # A family lives as long as its longest-lived token; a revocation until told.
            assert 119_000 < raw.pttl(f"{prefix}family:family-1") <= 120_000
            assert 89_000 < raw.pttl(f"{prefix}revoked_family:f") <= 90_000
            assert raw.pttl(f"{prefix}client:cli") == -1
            time.sleep(PAST)
            assert store.get_token("soon") is None  # no purge needed
            assert not raw.exists(f"{prefix}family:f")
    finally:
        raw.close()
        wipe(redis_url, prefix)


def test_a_redis_store_leaves_a_client_passed_in_open(redis_url: str) -> None:
    prefix = unique_key_prefix()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = RedisOAuthStorage(prefix=prefix, client=client)
        store.save_token(token_record("t", subject=None))
        assert store.get_token("t") == token_record("t", subject=None, **_times(store, "t"))
        store.save_signing_key(SigningKeyRecord("k", {"d": "ü"}, created_at=1.5))
        assert store.signing_keys() == [SigningKeyRecord("k", {"d": "ü"}, created_at=1.5)]
        store.close()
        assert client.ping()
    finally:
        client.close()
        wipe(redis_url, prefix)
