"""What the OAuth 2.0 server keeps, and where: the records and the storage protocol.

The server keeps four kinds of record: registered clients (with their secrets hashed),
authorization codes, tokens (access and refresh, each stored under the SHA-256 of its value so a
leaked table leaks no usable token) and signing keys. A *grant family* ties together everything
issued from one authorization: the code, the first tokens, and every rotated refresh token and
access token after them. Replaying a used code or reusing a rotated refresh token revokes the
whole family.

``OAuthStorage`` is the protocol a store implements; ``InMemoryOAuthStorage`` is the default.
For several server instances, ``buttress.backends.postgres_oauth.PostgresOAuthStorage`` and
``buttress.backends.redis_oauth.RedisOAuthStorage`` implement it on a shared engine, each
atomic step one statement (``UPDATE ... WHERE NOT used RETURNING``) or one Lua script. The
server calls it from worker threads, so an implementation must be safe to call from several
threads at once.

>>> storage = InMemoryOAuthStorage()
>>> storage.get_client("nobody") is None
True
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "AuthorizationCodeRecord",
    "ClientRecord",
    "InMemoryOAuthStorage",
    "OAuthStorage",
    "SigningKeyRecord",
    "TokenRecord",
]

TokenKind = Literal["access_token", "refresh_token"]


@dataclass(frozen=True)
class ClientRecord:
    """A registered client. ``secret_hash`` is None for a public client (a browser or native
    app, which cannot keep a secret); otherwise it is the output of ``hash_client_secret``.

    >>> client = ClientRecord("spa", None, ("https://app.example/cb",), ("read",),
    ...                       ("authorization_code", "refresh_token"))
    >>> client.public
    True
    """

    client_id: str
    secret_hash: str | None
    redirect_uris: tuple[str, ...]
    scopes: tuple[str, ...]
    grant_types: tuple[str, ...]

    @property
    def public(self) -> bool:
        """True for a public client: it has no secret and authenticates with ``none``."""
        return self.secret_hash is None


@dataclass(frozen=True)
class AuthorizationCodeRecord:
    """An authorization code, stored under the SHA-256 of its value.

    ``expires_at`` ends its redemption window; ``retain_until`` is how long the record is kept
    after it was used, so that a replay is still recognised (and the family revoked) while
    tokens issued from it may live. ``used`` turns true exactly once (``use_code``).

    >>> code = AuthorizationCodeRecord("c0ffee", "spa", "alice", "https://app.example/cb",
    ...     "read", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "S256", "family-1",
    ...     expires_at=60.0, retain_until=3600.0)
    >>> code.used
    False
    """

    code_hash: str
    client_id: str
    subject: str
    redirect_uri: str | None
    scope: str
    code_challenge: str
    code_challenge_method: str
    family_id: str
    expires_at: float
    retain_until: float
    used: bool = False


@dataclass(frozen=True)
class TokenRecord:
    """An access or refresh token, stored under the SHA-256 of its value.

    ``subject`` is None for a client credentials token. A refresh token becomes ``used`` when
    it is rotated; a used refresh token presented again is reuse, which revokes its family.

    >>> token = TokenRecord("ab12", "refresh_token", "spa", "alice", "read", "family-1",
    ...                     issued_at=0.0, expires_at=86400.0)
    >>> token.active_at(10.0)
    True
    """

    token_hash: str
    kind: TokenKind
    client_id: str
    subject: str | None
    scope: str
    family_id: str
    issued_at: float
    expires_at: float
    audience: str | None = None
    token_id: str | None = None
    revoked: bool = False
    used: bool = False

    def active_at(self, now: float) -> bool:
        """True when the token is neither expired, revoked nor (for refresh tokens) used."""
        return not (self.revoked or self.used) and now < self.expires_at


@dataclass(frozen=True)
class SigningKeyRecord:
    """A key that signs (or signed) access tokens: its private JWK as a dict.

    The key with ``retire_at`` None is the current one and signs new tokens; a retired key
    only stays published in the JWKS until ``retire_at``, when every token it signed has
    expired.

    >>> SigningKeyRecord("k1", {"kty": "EC"}, created_at=0.0).retire_at is None
    True
    """

    kid: str
    private_jwk: Mapping[str, Any] = field(repr=False)
    created_at: float
    retire_at: float | None = None


@runtime_checkable
class OAuthStorage(Protocol):
    """Where the OAuth server keeps its records. Implementations must be thread-safe, and the
    methods documented as atomic must be atomic across every process sharing the store.

    >>> isinstance(InMemoryOAuthStorage(), OAuthStorage)
    True
    """

    def get_client(self, client_id: str) -> ClientRecord | None:
        """The client with this id, or None."""
        ...

    def save_client(self, client: ClientRecord) -> None:
        """Adds the client, or replaces the one with the same id."""
        ...

    def save_code(self, code: AuthorizationCodeRecord) -> None:
        """Stores a new authorization code."""
        ...

    def get_code(self, code_hash: str) -> AuthorizationCodeRecord | None:
        """The code stored under this hash, used or not, or None."""
        ...

    def use_code(self, code_hash: str) -> bool:
        """Atomically marks the code used; True only for the one caller that did so."""
        ...

    def save_token(self, token: TokenRecord) -> None:
        """Stores a new token. A token whose family was revoked is stored revoked, so a token
        issued while its family was being revoked cannot slip through."""
        ...

    def get_token(self, token_hash: str) -> TokenRecord | None:
        """The token stored under this hash, or None."""
        ...

    def use_refresh_token(self, token_hash: str) -> bool:
        """Atomically marks an unused, unrevoked refresh token used; True only for the one
        caller that did so."""
        ...

    def revoke_token(self, token_hash: str) -> None:
        """Marks one token revoked (nothing happens for an unknown hash)."""
        ...

    def revoke_family(self, family_id: str, remember_until: float) -> None:
        """Revokes every token of the family, and any saved into it until ``remember_until``."""
        ...

    def signing_keys(self) -> list[SigningKeyRecord]:
        """Every stored signing key, oldest first."""
        ...

    def save_signing_key(self, key: SigningKeyRecord) -> None:
        """Adds the key, or replaces the one with the same ``kid``."""
        ...

    def purge(self, now: float) -> int:
        """Drops expired tokens, codes past ``retain_until``, forgotten family revocations and
        signing keys past ``retire_at``; returns how many records went."""
        ...


class InMemoryOAuthStorage:
    """The default store: dictionaries behind one lock, for one process.

    Everything is lost when the process ends (clients included), which suits tests, development
    and a single-process server that re-registers its clients at start.

    >>> storage = InMemoryOAuthStorage()
    >>> storage.save_client(ClientRecord("cli", None, (), (), ("authorization_code",)))
    >>> storage.get_client("cli").public
    True
    """

    def __init__(self) -> None:
        # One lock for all maps: the atomic steps (use a code, rotate a refresh token, revoke a
        # family) each touch one map, and the operations are short, so finer locks buy nothing.
        self._lock = threading.Lock()
        self._clients: dict[str, ClientRecord] = {}
        self._codes: dict[str, AuthorizationCodeRecord] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._revoked_families: dict[str, float] = {}
        self._keys: dict[str, SigningKeyRecord] = {}

    def get_client(self, client_id: str) -> ClientRecord | None:
        """The client with this id, or None."""
        with self._lock:
            return self._clients.get(client_id)

    def save_client(self, client: ClientRecord) -> None:
        """Adds the client, or replaces the one with the same id."""
        with self._lock:
            self._clients[client.client_id] = client

    def save_code(self, code: AuthorizationCodeRecord) -> None:
        """Stores a new authorization code."""
        with self._lock:
            self._codes[code.code_hash] = code

    def get_code(self, code_hash: str) -> AuthorizationCodeRecord | None:
        """The code stored under this hash, or None."""
        with self._lock:
            return self._codes.get(code_hash)

    def use_code(self, code_hash: str) -> bool:
        """Marks the code used; True only for the first caller."""
        with self._lock:
            code = self._codes.get(code_hash)
            if code is None or code.used:
                return False
            self._codes[code_hash] = replace(code, used=True)
            return True

    def save_token(self, token: TokenRecord) -> None:
        """Stores a new token (revoked if its family was revoked)."""
        with self._lock:
            if token.family_id in self._revoked_families:
                token = replace(token, revoked=True)
            self._tokens[token.token_hash] = token

    def get_token(self, token_hash: str) -> TokenRecord | None:
        """The token stored under this hash, or None."""
        with self._lock:
            return self._tokens.get(token_hash)

    def use_refresh_token(self, token_hash: str) -> bool:
        """Marks the refresh token used; True only for the first caller."""
        with self._lock:
            token = self._tokens.get(token_hash)
            if token is None or token.kind != "refresh_token" or token.used or token.revoked:
                return False
            self._tokens[token_hash] = replace(token, used=True)
            return True

    def revoke_token(self, token_hash: str) -> None:
        """Marks one token revoked."""
        with self._lock:
            token = self._tokens.get(token_hash)
            if token is not None:
                self._tokens[token_hash] = replace(token, revoked=True)

    def revoke_family(self, family_id: str, remember_until: float) -> None:
        """Revokes every token of the family, now and until ``remember_until``."""
        with self._lock:
            self._revoked_families[family_id] = max(
                remember_until, self._revoked_families.get(family_id, remember_until)
            )
            for token_hash, token in self._tokens.items():
                if token.family_id == family_id and not token.revoked:
                    self._tokens[token_hash] = replace(token, revoked=True)

    def signing_keys(self) -> list[SigningKeyRecord]:
        """Every stored signing key, oldest first."""
        with self._lock:
            return sorted(self._keys.values(), key=lambda key: key.created_at)

    def save_signing_key(self, key: SigningKeyRecord) -> None:
        """Adds the key, or replaces the one with the same ``kid``."""
        with self._lock:
            self._keys[key.kid] = key

    def purge(self, now: float) -> int:
        """Drops what has expired; returns how many records went."""
        with self._lock:
            tokens = [h for h, t in self._tokens.items() if t.expires_at <= now]
            codes = [h for h, c in self._codes.items() if c.retain_until <= now]
            families = [f for f, until in self._revoked_families.items() if until <= now]
            keys = [
                kid
                for kid, key in self._keys.items()
                if key.retire_at is not None and key.retire_at <= now
            ]
            for token_hash in tokens:
                del self._tokens[token_hash]
            for code_hash in codes:
                del self._codes[code_hash]
            for family_id in families:
                del self._revoked_families[family_id]
            for kid in keys:
                del self._keys[kid]
            return len(tokens) + len(codes) + len(families) + len(keys)

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"InMemoryOAuthStorage(clients={len(self._clients)}, codes={len(self._codes)}, "
                f"tokens={len(self._tokens)}, signing_keys={len(self._keys)})"
            )
