"""The OAuth server's storage in Redis (the ``redis`` extra, redis-py), for several server
instances sharing one Redis server.

Every key lives under one prefix, so several servers (or tests) can share a database. Each
record is a hash; codes, tokens and family revocations carry Redis's own expiry (``PEXPIREAT``
at ``retain_until``, ``expires_at`` and ``remember_until``), so the server forgets them by
itself. Every operation is one round trip, and every step that reads and writes is a Lua
script, which Redis runs atomically: of any number of racing callers exactly one uses a code
or rotates a refresh token, and a token saved into a family is either seen by the family's
revocation or sees the revocation's marker itself.

>>> storage = RedisOAuthStorage("redis://127.0.0.1:6379/0", prefix="auth:")  # doctest: +SKIP
>>> server = OAuthServer("https://auth.example", storage=storage)  # doctest: +SKIP
"""

from __future__ import annotations

try:
    import redis
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "buttress.backends.redis_oauth needs redis-py; install it with "
        "`pip install 'buttress[redis]'`."
    ) from error

import json
import math
from collections.abc import Mapping
from typing import Any, cast

from buttress.backends.redis import check_url_and_prefix
from buttress.security.oauth.storage import (
    AuthorizationCodeRecord,
    ClientRecord,
    SigningKeyRecord,
    TokenKind,
    TokenRecord,
)

__all__ = ["RedisOAuthStorage"]

# The latest expiry given to Redis, in milliseconds since the epoch (year 2255); a record
# that lives longer (or forever) gets no expiry and goes only when purged or replaced.
_LATEST_MS = 9_000_000_000_000

# Replaces a hash with the field/value pairs ARGV[2..], expiring at ARGV[1] ms ('' = never).
_REPLACE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if ARGV[1] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[1]) end
"""

# KEYS: the token, its family's set of token hashes, the family's revocation marker.
# ARGV: expiry ms ('' = never), the token hash, then the token's field/value pairs.
# The family's set lives as long as its longest-lived token.
_SAVE_TOKEN = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('HSET', KEYS[1], 'revoked', '1') end
local ttl = redis.call('PTTL', KEYS[2])
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[1] == '' then
    redis.call('PERSIST', KEYS[1])
    redis.call('PERSIST', KEYS[2])
else
    redis.call('PEXPIREAT', KEYS[1], ARGV[1])
    if ttl == -2 then
        redis.call('PEXPIREAT', KEYS[2], ARGV[1])
    elseif ttl >= 0 then
        local now = redis.call('TIME')
        local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
        if now_ms + ttl < tonumber(ARGV[1]) then redis.call('PEXPIREAT', KEYS[2], ARGV[1]) end
    end
end
"""

_USE_CODE = """
if redis.call('HGET', KEYS[1], 'used') == '0' then
    redis.call('HSET', KEYS[1], 'used', '1')
    return 1
end
return 0
"""

_USE_REFRESH_TOKEN = """
local found = redis.call('HMGET', KEYS[1], 'kind', 'used', 'revoked')
if found[1] == 'refresh_token' and found[2] == '0' and found[3] == '0' then
    redis.call('HSET', KEYS[1], 'used', '1')
    return 1
end
return 0
"""

_REVOKE_TOKEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'revoked', '1') end
"""

# KEYS: the family's revocation marker, its set of token hashes. ARGV: remember-until ms
# ('' = forever), the prefix of token keys, the family id. The marker keeps the later of two
# expiries; hashes of tokens Redis has already forgotten (or saved again into another family)
# leave the set.
_REVOKE_FAMILY = """
local remember = ARGV[1]
local old = redis.call('GET', KEYS[1])
if old == '' then
    remember = ''
elseif old and remember ~= '' and tonumber(old) > tonumber(remember) then
    remember = old
end
redis.call('SET', KEYS[1], remember)
if remember ~= '' then redis.call('PEXPIREAT', KEYS[1], remember) end
for _, token_hash in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local token = ARGV[2] .. token_hash
    if redis.call('HGET', token, 'family_id') == ARGV[3] then
        redis.call('HSET', token, 'revoked', '1')
    else
        redis.call('SREM', KEYS[2], token_hash)
    end
end
"""

# KEYS: the hash kid -> key record, the sorted set kid -> retire_at of retired keys.
# ARGV: kid, the record as JSON, retire_at ('' = current key).
_SAVE_SIGNING_KEY = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '' then
    redis.call('ZREM', KEYS[2], ARGV[1])
else
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
end
"""

_PURGE_SIGNING_KEYS = """
local kids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, kid in ipairs(kids) do
    redis.call('HDEL', KEYS[1], kid)
    redis.call('ZREM', KEYS[2], kid)
end
return #kids
"""


class RedisOAuthStorage:
    """An ``OAuthStorage`` in Redis: every ``OAuthServer`` given one on the same Redis server
    and ``prefix`` behaves as one server (a code redeemed on one is refused on the others, a
    key rotated on one is published by all).

    - ``url``: the Redis server, when no ``client`` is given. A client made from it keeps a
      blocking pool of connections (at most 50, waiting up to 20 seconds for one).
    - ``prefix``: put before every key (``"buttress:oauth:"`` + ``"token:<hash>"``); it must
      not be empty.
    - ``client``: a redis-py client to use instead; ``close()`` leaves it open.

    Codes, tokens and family revocations expire on the Redis server, so ``purge`` only has
    retired signing keys left to remove (and counts only those). Signing keys are stored as
    the record holds them: the private JWK, in the clear; protect the server accordingly. The
    scripts name keys they compute, so use one Redis server (with replicas if you like), not
    Redis Cluster.

    >>> storage = RedisOAuthStorage("redis://127.0.0.1:6379/0", prefix="auth:")
    >>> storage.get_client("nobody") is None  # doctest: +SKIP
    True
    >>> storage.close()
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "buttress:oauth:",
        client: redis.Redis | None = None,
    ) -> None:
        check_url_and_prefix(url, prefix, "this store's keys")
        if client is not None and not isinstance(client, redis.Redis):
            raise TypeError(
                f"client must be a redis.Redis client, or None (got {type(client).__name__})."
            )
        self.url = url
        self.prefix = prefix
        self._owns_client = client is None
        if client is None:
            client = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url))
        self.client: redis.Redis = client
        self._keys = prefix + "signing_keys"
        self._retiring = prefix + "retiring_signing_keys"
        self._replace = client.register_script(_REPLACE)
        self._save_token = client.register_script(_SAVE_TOKEN)
        self._use_code = client.register_script(_USE_CODE)
        self._use_refresh_token = client.register_script(_USE_REFRESH_TOKEN)
        self._revoke_token = client.register_script(_REVOKE_TOKEN)
        self._revoke_family = client.register_script(_REVOKE_FAMILY)
        self._save_signing_key = client.register_script(_SAVE_SIGNING_KEY)
        self._purge_signing_keys = client.register_script(_PURGE_SIGNING_KEYS)

    # -- clients -------------------------------------------------------------------------------

    def get_client(self, client_id: str) -> ClientRecord | None:
        """The client with this id, or None."""
        found = self._hash(self.prefix + "client:" + client_id)
        if found is None:
            return None
        return ClientRecord(
            client_id=found["client_id"],
            secret_hash=found.get("secret_hash"),
            redirect_uris=tuple(json.loads(found["redirect_uris"])),
            scopes=tuple(json.loads(found["scopes"])),
            grant_types=tuple(json.loads(found["grant_types"])),
        )

    def save_client(self, client: ClientRecord) -> None:
        """Adds the client, or replaces the one with the same id."""
        fields = _fields(
            client_id=client.client_id,
            secret_hash=client.secret_hash,
            redirect_uris=json.dumps(list(client.redirect_uris)),
            scopes=json.dumps(list(client.scopes)),
            grant_types=json.dumps(list(client.grant_types)),
        )
        self._replace(keys=[self.prefix + "client:" + client.client_id], args=["", *fields])

    # -- authorization codes -------------------------------------------------------------------

    def save_code(self, code: AuthorizationCodeRecord) -> None:
        """Stores a new authorization code, which Redis forgets at ``retain_until``."""
        fields = _fields(
            code_hash=code.code_hash,
            client_id=code.client_id,
            subject=code.subject,
            redirect_uri=code.redirect_uri,
            scope=code.scope,
            code_challenge=code.code_challenge,
            code_challenge_method=code.code_challenge_method,
            family_id=code.family_id,
            expires_at=code.expires_at,
            retain_until=code.retain_until,
            used=code.used,
        )
        self._replace(
            keys=[self.prefix + "code:" + code.code_hash],
            args=[_expiry(code.retain_until), *fields],
        )

    def get_code(self, code_hash: str) -> AuthorizationCodeRecord | None:
        """The code stored under this hash, used or not, or None."""
        found = self._hash(self.prefix + "code:" + code_hash)
        if found is None:
            return None
        return AuthorizationCodeRecord(
            code_hash=found["code_hash"],
            client_id=found["client_id"],
            subject=found["subject"],
            redirect_uri=found.get("redirect_uri"),
            scope=found["scope"],
            code_challenge=found["code_challenge"],
            code_challenge_method=found["code_challenge_method"],
            family_id=found["family_id"],
            expires_at=float(found["expires_at"]),
            retain_until=float(found["retain_until"]),
            used=found["used"] == "1",
        )

    def use_code(self, code_hash: str) -> bool:
        """Marks the code used, atomically; True only for the one caller that did."""
        return bool(self._use_code(keys=[self.prefix + "code:" + code_hash]))

    # -- tokens --------------------------------------------------------------------------------

    def save_token(self, token: TokenRecord) -> None:
        """Stores a new token, which Redis forgets at ``expires_at``; it is stored revoked
        while its family's revocation is remembered."""
        fields = _fields(
            token_hash=token.token_hash,
            kind=token.kind,
            client_id=token.client_id,
            subject=token.subject,
            scope=token.scope,
            family_id=token.family_id,
            issued_at=token.issued_at,
            expires_at=token.expires_at,
            audience=token.audience,
            token_id=token.token_id,
            revoked=token.revoked,
            used=token.used,
        )
        self._save_token(
            keys=[
                self.prefix + "token:" + token.token_hash,
                self.prefix + "family:" + token.family_id,
                self.prefix + "revoked_family:" + token.family_id,
            ],
            args=[_expiry(token.expires_at), token.token_hash, *fields],
        )

    def get_token(self, token_hash: str) -> TokenRecord | None:
        """The token stored under this hash, or None."""
        found = self._hash(self.prefix + "token:" + token_hash)
        if found is None:
            return None
        return TokenRecord(
            token_hash=found["token_hash"],
            kind=cast(TokenKind, found["kind"]),
            client_id=found["client_id"],
            subject=found.get("subject"),
            scope=found["scope"],
            family_id=found["family_id"],
            issued_at=float(found["issued_at"]),
            expires_at=float(found["expires_at"]),
            audience=found.get("audience"),
            token_id=found.get("token_id"),
            revoked=found["revoked"] == "1",
            used=found["used"] == "1",
        )

    def use_refresh_token(self, token_hash: str) -> bool:
        """Marks an unused, unrevoked refresh token used, atomically; True only for the one
        caller that did."""
        return bool(self._use_refresh_token(keys=[self.prefix + "token:" + token_hash]))

    def revoke_token(self, token_hash: str) -> None:
        """Marks one token revoked (nothing happens for an unknown hash)."""
        self._revoke_token(keys=[self.prefix + "token:" + token_hash])

    def revoke_family(self, family_id: str, remember_until: float) -> None:
        """Revokes every token of the family, and any saved into it until ``remember_until``
        (the later of two), atomically."""
        self._revoke_family(
            keys=[
                self.prefix + "revoked_family:" + family_id,
                self.prefix + "family:" + family_id,
            ],
            args=[_expiry(remember_until), self.prefix + "token:", family_id],
        )

    # -- signing keys --------------------------------------------------------------------------

    def signing_keys(self) -> list[SigningKeyRecord]:
        """Every stored signing key, oldest first (ties by key id)."""
        records = []
        for kid, data in cast(dict[Any, Any], self.client.hgetall(self._keys)).items():
            found = json.loads(data)
            records.append(
                SigningKeyRecord(
                    kid=_text(kid),
                    private_jwk=found["private_jwk"],
                    created_at=found["created_at"],
                    retire_at=found["retire_at"],
                )
            )
        return sorted(records, key=lambda record: (record.created_at, record.kid))

    def save_signing_key(self, key: SigningKeyRecord) -> None:
        """Adds the key, or replaces the one with the same ``kid``."""
        data = json.dumps(
            {
                "private_jwk": dict(key.private_jwk),
                "created_at": float(key.created_at),
                "retire_at": None if key.retire_at is None else float(key.retire_at),
            }
        )
        retire_at = "" if key.retire_at is None else repr(float(key.retire_at))
        self._save_signing_key(keys=[self._keys, self._retiring], args=[key.kid, data, retire_at])

    # -- housekeeping --------------------------------------------------------------------------

    def purge(self, now: float) -> int:
        """Drops signing keys past ``retire_at``, atomically, and returns how many went. Codes,
        tokens and family revocations need no purge: Redis expires them by itself."""
        return int(
            self._purge_signing_keys(keys=[self._keys, self._retiring], args=[repr(float(now))])
        )

    def close(self) -> None:
        """Closes the client's connections, if the store made the client from ``url``."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> RedisOAuthStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisOAuthStorage(prefix={self.prefix!r})"

    def _hash(self, name: str) -> dict[str, str] | None:
        """The fields of the hash ``name``, as text; None when it does not exist."""
        found = cast(Mapping[Any, Any], self.client.hgetall(name))
        if not found:
            return None
        return {_text(field): _text(value) for field, value in found.items()}


def _fields(**values: str | float | bool | None) -> list[str]:
    """Field/value pairs for HSET: a bool as ``1``/``0``, a float exactly (``repr``); a None
    is left out, so it reads back as a missing field."""
    pairs: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, (int, float)):
            text = repr(float(value))
        else:
            text = value
        pairs += (name, text)
    return pairs


def _expiry(at: float) -> str:
    """``at`` (seconds since the epoch) as PEXPIREAT's milliseconds, rounded up so Redis never
    forgets a record early; '' (no expiry) for a time too far off (or infinite). A time in the
    past makes Redis drop the record at once, as a purge would."""
    if math.isnan(at) or at * 1000 >= _LATEST_MS:
        return ""
    if at <= 0:
        return "1"
    return str(math.ceil(at * 1000))


def _text(value: object) -> str:
    """What Redis answered, as text (a client may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)
