"""Bearer token authentication: JWTs checked against a JWKS with joserfc.

``TokenValidator`` is the resource server's check of a JWT access token (RFC 7519, RFC 9068):
the signature against a key of the issuer's JSON Web Key Set, an explicit allow-list of
signature algorithms, the issuer, the audience, ``exp``, ``nbf`` and ``iat`` with a small
leeway, required claims, and with ``access_token=True`` the RFC 9068 profile (``typ`` header
``at+jwt``; ``iss``, ``exp``, ``aud``, ``sub``, ``client_id``, ``iat`` and ``jti`` present). Every
refusal raises ``buttress.errors.InvalidTokenError``, whose ``reason`` names what was wrong and
whose ``error`` is RFC 6750's ``invalid_token`` for the 401 response.

The key set is either fixed (``StaticKeySet``: a joserfc ``KeySet`` or a JWKS dict) or fetched
from the issuer's ``jwks_uri`` (``RemoteKeySet``): cached for ``cache_ttl`` seconds, fetched
again when a token names a key id the cache does not hold (the issuer rotated its keys), and
never more often than once per ``min_refetch_interval`` so a flood of tokens with made-up key
ids cannot hammer the issuer.

What is never trusted from a token: its ``alg`` beyond the allow-list (``none`` and the HMAC
algorithms cannot be allowed at all, so a public key can never be used as an HMAC secret), and
its ``jku``, ``x5u``, ``jwk`` and ``x5c`` headers (keys come only from the configured key set).

>>> from joserfc import jwt
>>> from joserfc.jwk import ECKey, KeySet
>>> signing_key = ECKey.generate_key("P-256", parameters={"kid": "k1"})
>>> validator = TokenValidator(
...     issuer="https://issuer.example",
...     audience="https://api.example",
...     jwks=KeySet([ECKey.import_key(signing_key.as_dict(private=False))]),
...     clock=lambda: 1_700_000_000,
... )
>>> token = jwt.encode(
...     {"alg": "ES256", "kid": "k1"},
...     {"iss": "https://issuer.example", "aud": "https://api.example", "sub": "alice",
...      "exp": 1_700_000_300, "scope": "orders:read"},
...     signing_key,
... )
>>> verified = validator.validate(token)
>>> verified.subject, sorted(verified.scopes)
('alice', ['orders:read'])
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx
from joserfc import jws
from joserfc.errors import (
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import Key, KeySet
from joserfc.jws import CompactSignature, JWSRegistry
from joserfc.jwt import JWTClaimsRegistry

from buttress._core import LocalCache
from buttress.errors import InvalidTokenError, KeySetUnavailableError

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "KeySource",
    "RemoteKeySet",
    "StaticKeySet",
    "TokenValidator",
    "VerifiedToken",
    "is_loopback_host",
]

#: The signature algorithms a validator may allow: asymmetric only, so a key published in a
#: JWKS can never double as an HMAC secret.
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "ES256K",
        "EdDSA",
        "Ed25519",
        "Ed448",
    }
)

#: The allow-list a validator uses unless told otherwise.
DEFAULT_ALGORITHMS: tuple[str, ...] = ("ES256", "Ed25519", "EdDSA", "RS256", "PS256")

# RFC 9068 section 2.2: the claims every JWT access token carries.
_ACCESS_TOKEN_CLAIMS = ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")
# Headers that would make the signature cover something other than the base64url payload
# (RFC 7797) have no place in a JWT.
_FORBIDDEN_HEADERS = ("b64",)
_MAX_TOKEN_BYTES = 16 * 1024
_MAX_JWKS_BYTES = 1024 * 1024


class _AllowListRegistry(JWSRegistry):
    """joserfc's registry, held to the validator's allow-list.

    joserfc warns (``SecurityWarning``) when ``EdDSA`` is used, because RFC 9864 deprecates
    that polymorphic name in favour of ``Ed25519``/``Ed448``. Here an algorithm is only ever
    reached when the deployer listed it explicitly, so the warning would only be noise (and an
    error under ``-W error``).
    """

    def get_alg(self, name: str) -> Any:
        if not self.allowed or name not in self.allowed or name not in self.algorithms:
            raise InvalidTokenError(
                "algorithm_not_allowed",
                f"The token is signed with algorithm {name!r}, which this validator does not "
                "allow.",
            )
        return self.algorithms[name]


@runtime_checkable
class KeySource(Protocol):
    """Where a validator finds the key that verifies a token: ``StaticKeySet`` or
    ``RemoteKeySet``, or any object with these two methods.

    ``find_key(kid, alg)`` returns the key with that key id (any key when ``kid`` is None and
    exactly one fits ``alg``) or raises ``InvalidTokenError`` (reason ``unknown_key``); a
    remote source may refetch its set first and raise ``KeySetUnavailableError`` when it
    cannot.

    >>> isinstance(StaticKeySet({"keys": []}), KeySource)
    True
    """

    def find_key(self, kid: str | None, alg: str) -> Key:
        """The key that verifies a token with this ``kid`` header and algorithm."""
        ...

    async def find_key_async(self, kid: str | None, alg: str) -> Key:
        """``find_key`` for asyncio: a remote set fetches without blocking the loop."""
        ...


def _import_key_set(value: KeySet | Mapping[str, Any], argument: str) -> KeySet:
    if isinstance(value, KeySet):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{argument} must be a joserfc KeySet or a JWKS dict with a 'keys' list "
            f"(got {type(value).__name__})."
        )
    keys = value.get("keys")
    if not isinstance(keys, list):
        raise ValueError(f"{argument} must be a JWKS: a dict whose 'keys' member is a list.")
    if not keys:
        return KeySet([])
    try:
        return KeySet.import_key_set({"keys": keys})
    except (JoseError, ValueError, TypeError) as error:
        raise ValueError(f"{argument} holds a key joserfc cannot import: {error}.") from error


def _pick_key(keys: KeySet, kid: str | None, alg: str, where: str) -> Key | None:
    """The key of ``keys`` that verifies ``alg`` signatures under ``kid``; None when no key
    has that id. A key with the id that cannot verify ``alg`` (another type, another curve,
    ``use: enc``, another ``alg``) is refused outright: refetching would not change it."""
    model = JWSRegistry.algorithms[alg]
    if kid is None:
        fitting = []
        for key in keys:
            try:
                model.check_key(key)
            except JoseError:
                continue
            fitting.append(key)
        if len(fitting) == 1:
            return fitting[0]
        if not fitting:
            return None
        raise InvalidTokenError(
            "unknown_key",
            f"The token names no key id (kid) and {where} holds {len(fitting)} keys that could "
            "verify it; the issuer must set kid.",
        )
    named = [key for key in keys if key.kid == kid]
    if not named:
        return None
    for key in named:
        try:
            model.check_key(key)
        except JoseError:
            continue
        return key
    raise InvalidTokenError(
        "key_mismatch",
        f"The key {kid!r} of {where} cannot verify a signature made with algorithm {alg!r}.",
    )


def _unknown_key(kid: str | None, where: str) -> InvalidTokenError:
    if kid is None:
        return InvalidTokenError(
            "unknown_key", f"No key of {where} can verify the token's signature."
        )
    return InvalidTokenError("unknown_key", f"No key of {where} has the token's key id {kid!r}.")


class StaticKeySet:
    """A fixed key set: a joserfc ``KeySet`` or a JWKS dict (``{"keys": [...]}``).

    >>> from joserfc.jwk import ECKey
    >>> key = ECKey.generate_key("P-256", parameters={"kid": "k1"}, private=False)
    >>> keys = StaticKeySet({"keys": [key.as_dict()]})
    >>> keys.find_key("k1", "ES256").kid
    'k1'
    """

    def __init__(self, jwks: KeySet | Mapping[str, Any]) -> None:
        self._keys = _import_key_set(jwks, "jwks")

    @property
    def keys(self) -> KeySet:
        """The key set."""
        return self._keys

    def find_key(self, kid: str | None, alg: str) -> Key:
        """The key with id ``kid`` that verifies ``alg``; ``InvalidTokenError`` if none."""
        key = _pick_key(self._keys, kid, alg, "the key set")
        if key is None:
            raise _unknown_key(kid, "the key set")
        return key

    async def find_key_async(self, kid: str | None, alg: str) -> Key:
        """``find_key`` (nothing to wait for)."""
        return self.find_key(kid, alg)

    def __repr__(self) -> str:
        return f"StaticKeySet({len(self._keys.keys)} keys)"


def _check_seconds(value: object, argument: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be a number of seconds (got {type(value).__name__}).")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        least = "more than 0" if positive else "0 or more"
        raise ValueError(f"{argument} must be a finite number of seconds, {least} (got {value}).")
    return seconds


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is this machine (``localhost`` or a loopback address): the one place
    plain http is allowed for an issuer or a key set URL.

    >>> is_loopback_host("127.0.0.1"), is_loopback_host("::1"), is_loopback_host("example.com")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteKeySet:
    """The issuer's key set, fetched from its ``jwks_uri`` with httpx and cached.

    - The set is fetched on first use and again once it is ``cache_ttl`` seconds old. When a
      refresh fails, the keys already held stay in use and the fetch is retried later.
    - A token naming a key id the cache lacks makes the set be fetched again at once (the
      issuer rotated its keys), but at most once per ``min_refetch_interval`` seconds: a flood
      of tokens with unknown ids costs the issuer one request per interval. Concurrent lookups
      share one fetch.
    - Only ``https`` URLs are accepted, except ``http`` to a loopback address (tests, sidecars).
    - ``http_client``/``async_http_client`` (httpx clients you own and close) set proxies,
      certificates or transports; without them each fetch uses a short-lived client.

    >>> keys = RemoteKeySet("https://issuer.example/.well-known/jwks.json", cache_ttl=600)
    >>> keys.url
    'https://issuer.example/.well-known/jwks.json'
    """

    def __init__(
        self,
        url: str,
        *,
        cache_ttl: float = 300.0,
        min_refetch_interval: float = 30.0,
        timeout: float = 5.0,
        http_client: httpx.Client | None = None,
        async_http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be a str (got {type(url).__name__}).")
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"url must be an absolute https URL of a JWKS (got {url!r}).")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError(
                f"url must use https: key sets fetched over plain http could be forged in "
                f"transit (got {url!r}). Plain http is accepted only for loopback addresses."
            )
        self._cache_ttl = _check_seconds(cache_ttl, "cache_ttl", positive=True)
        self._min_refetch_interval = _check_seconds(min_refetch_interval, "min_refetch_interval")
        self._timeout = _check_seconds(timeout, "timeout", positive=True)
        if http_client is not None and not isinstance(http_client, httpx.Client):
            raise TypeError(
                f"http_client must be an httpx.Client or None (got {type(http_client).__name__})."
            )
        if async_http_client is not None and not isinstance(async_http_client, httpx.AsyncClient):
            raise TypeError(
                "async_http_client must be an httpx.AsyncClient or None "
                f"(got {type(async_http_client).__name__})."
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds (got {clock!r}).")
        self.url = url
        self._http_client = http_client
        self._async_http_client = async_http_client
        self._clock = clock
        # Guards the cached set and the fetch bookkeeping; never held across a fetch.
        self._state_lock = threading.Lock()
        # One fetch at a time per thread world and per event loop, so lookups that arrive
        # while a fetch runs wait for its keys instead of being refused.
        self._fetch_lock = threading.Lock()
        self._async_fetch_locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Lock
        ] = weakref.WeakKeyDictionary()
        self._keys: KeySet | None = None
        self._fetched_at = -math.inf
        self._last_attempt = -math.inf
        self._generation = 0
        self._fetches = 0

    @property
    def fetches(self) -> int:
        """How many times the set was requested from the issuer (successfully or not)."""
        with self._state_lock:
            return self._fetches

    @property
    def keys(self) -> KeySet | None:
        """The cached key set, or None before the first successful fetch."""
        with self._state_lock:
            return self._keys

    # -- lookups ---------------------------------------------------------------------------

    def find_key(self, kid: str | None, alg: str) -> Key:
        """The key with id ``kid`` that verifies ``alg``, fetching the set when it is missing,
        stale, or lacks ``kid``.

        Raises ``InvalidTokenError`` (``unknown_key``) when the set has no such key and may
        not be fetched again yet, and ``KeySetUnavailableError`` when a fetch this lookup
        needed failed.
        """
        keys, generation, stale = self._snapshot()
        if keys is None or stale:
            keys = self._refresh_sync(generation, required=keys is None) or keys
        if keys is None:
            raise self._not_fetched_yet()
        key = _pick_key(keys, kid, alg, self._where)
        if key is None and kid is not None:
            _, generation, _ = self._snapshot()
            refreshed = self._refresh_sync(generation, required=True)
            if refreshed is not None:
                key = _pick_key(refreshed, kid, alg, self._where)
        if key is None:
            raise _unknown_key(kid, self._where)
        return key

    async def find_key_async(self, kid: str | None, alg: str) -> Key:
        """``find_key`` for asyncio: fetches with an ``httpx.AsyncClient``."""
        keys, generation, stale = self._snapshot()
        if keys is None or stale:
            keys = await self._refresh_async(generation, required=keys is None) or keys
        if keys is None:
            raise self._not_fetched_yet()
        key = _pick_key(keys, kid, alg, self._where)
        if key is None and kid is not None:
            _, generation, _ = self._snapshot()
            refreshed = await self._refresh_async(generation, required=True)
            if refreshed is not None:
                key = _pick_key(refreshed, kid, alg, self._where)
        if key is None:
            raise _unknown_key(kid, self._where)
        return key

    def refresh(self) -> KeySet:
        """Fetches the set now, whatever the cache and the rate limit say; returns it.

        >>> RemoteKeySet("https://127.0.0.1:1/jwks").refresh()  # doctest: +SKIP
        """
        with self._fetch_lock:
            self._claim_attempt(force=True)
            return self._install(self._fetch_sync())

    async def refresh_async(self) -> KeySet:
        """``refresh`` for asyncio."""
        async with self._async_fetch_lock():
            self._claim_attempt(force=True)
            return self._install(await self._fetch_async())

    # -- the cache and the rate limit ----------------------------------------------------

    def _not_fetched_yet(self) -> KeySetUnavailableError:
        return KeySetUnavailableError(
            self.url,
            "no key set has been fetched yet and the last attempt was less than "
            f"{self._min_refetch_interval:g} seconds ago",
        )

    @property
    def _where(self) -> str:
        return f"the key set at {self.url}"

    def _snapshot(self) -> tuple[KeySet | None, int, bool]:
        with self._state_lock:
            stale = self._clock() - self._fetched_at >= self._cache_ttl
            return self._keys, self._generation, stale

    def _claim_attempt(self, *, force: bool = False) -> bool:
        """Whether this caller may fetch now; if so, the attempt is booked so that nobody
        else fetches within ``min_refetch_interval`` (failed attempts count too, so an issuer
        that is down is not hammered either)."""
        with self._state_lock:
            now = self._clock()
            if not force and now - self._last_attempt < self._min_refetch_interval:
                return False
            self._last_attempt = now
            self._fetches += 1
            return True

    def _install(self, keys: KeySet) -> KeySet:
        with self._state_lock:
            self._keys = keys
            self._fetched_at = self._clock()
            self._generation += 1
            return keys

    def _refresh_sync(self, seen_generation: int, *, required: bool) -> KeySet | None:
        """Fetches the set unless someone else did since ``seen_generation`` or the rate
        limit forbids it; returns the newest set (None when nothing newer could be had).
        A failed fetch raises when ``required`` and is otherwise forgotten (the old keys stay
        in use)."""
        with self._fetch_lock:
            keys, generation, _ = self._snapshot()
            if generation != seen_generation:
                return keys
            if not self._claim_attempt():
                return None
            try:
                return self._install(self._fetch_sync())
            except KeySetUnavailableError:
                if required:
                    raise
                return None

    async def _refresh_async(self, seen_generation: int, *, required: bool) -> KeySet | None:
        async with self._async_fetch_lock():
            keys, generation, _ = self._snapshot()
            if generation != seen_generation:
                return keys
            if not self._claim_attempt():
                return None
            try:
                return self._install(await self._fetch_async())
            except KeySetUnavailableError:
                if required:
                    raise
                return None

    def _async_fetch_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        with self._state_lock:
            lock = self._async_fetch_locks.get(loop)
            if lock is None:
                lock = self._async_fetch_locks[loop] = asyncio.Lock()
            return lock

    # -- fetching --------------------------------------------------------------------------

    def _fetch_sync(self) -> KeySet:
        # Redirects are never followed (not even by a given client that would), and the
        # answer is read only up to _MAX_JWKS_BYTES.
        try:
            if self._http_client is not None:
                return self._read_sync(self._http_client)
            with httpx.Client(timeout=self._timeout, follow_redirects=False) as client:
                return self._read_sync(client)
        except httpx.HTTPError as error:
            raise KeySetUnavailableError(self.url, f"the request failed ({error!r})") from error

    def _read_sync(self, client: httpx.Client) -> KeySet:
        # httpx times each read; the deadline bounds the whole answer, so an issuer that
        # trickles bytes cannot hold the fetch (and every lookup waiting on it) for long.
        deadline = time.monotonic() + self._timeout
        with client.stream(
            "GET", self.url, timeout=self._timeout, follow_redirects=False
        ) as response:
            self._check_status(response)
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                self._check_size(body, deadline)
        return self._parse(bytes(body))

    async def _fetch_async(self) -> KeySet:
        try:
            if self._async_http_client is not None:
                return await self._read_async(self._async_http_client)
            async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as client:
                return await self._read_async(client)
        except httpx.HTTPError as error:
            raise KeySetUnavailableError(self.url, f"the request failed ({error!r})") from error

    async def _read_async(self, client: httpx.AsyncClient) -> KeySet:
        deadline = time.monotonic() + self._timeout
        async with client.stream(
            "GET", self.url, timeout=self._timeout, follow_redirects=False
        ) as response:
            self._check_status(response)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                self._check_size(body, deadline)
        return self._parse(bytes(body))

    def _check_status(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise KeySetUnavailableError(
                self.url, f"the issuer answered HTTP {response.status_code}"
            )

    def _check_size(self, body: bytearray, deadline: float) -> None:
        if len(body) > _MAX_JWKS_BYTES:
            raise KeySetUnavailableError(
                self.url, f"the answer is larger than {_MAX_JWKS_BYTES} bytes"
            )
        if time.monotonic() > deadline:
            raise KeySetUnavailableError(
                self.url, f"the answer took longer than the {self._timeout} s timeout"
            )

    def _parse(self, content: bytes) -> KeySet:
        try:
            document = json.loads(content)
        except (ValueError, RecursionError) as error:
            raise KeySetUnavailableError(self.url, "the answer is not JSON") from error
        if not isinstance(document, dict):
            raise KeySetUnavailableError(self.url, "the answer is not a JWKS object")
        try:
            return _import_key_set(document, "the JWKS")
        except ValueError as error:
            raise KeySetUnavailableError(self.url, str(error).rstrip(".")) from error

    def __repr__(self) -> str:
        return f"RemoteKeySet({self.url!r}, cache_ttl={self._cache_ttl})"


class VerifiedToken:
    """A token whose signature and claims checked out: its header and claims, read-only,
    and the claims a resource server usually wants, parsed.

    >>> token = VerifiedToken({"alg": "ES256"}, {"sub": "alice", "scope": "a b", "exp": 10})
    >>> token.subject, sorted(token.scopes), token.expires_at
    ('alice', ['a', 'b'], 10.0)
    """

    __slots__ = ("claims", "header")

    def __init__(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> None:
        self.header: Mapping[str, Any] = MappingProxyType(dict(header))
        self.claims: Mapping[str, Any] = MappingProxyType(dict(claims))

    @property
    def subject(self) -> str | None:
        """The ``sub`` claim."""
        value = self.claims.get("sub")
        return value if isinstance(value, str) else None

    @property
    def issuer(self) -> str | None:
        """The ``iss`` claim."""
        value = self.claims.get("iss")
        return value if isinstance(value, str) else None

    @property
    def audience(self) -> tuple[str, ...]:
        """The ``aud`` claim as a tuple (a single audience becomes a 1-tuple)."""
        value = self.claims.get("aud")
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(item for item in value if isinstance(item, str))
        return ()

    @property
    def client_id(self) -> str | None:
        """The ``client_id`` claim (RFC 9068): the OAuth client the token was issued to."""
        value = self.claims.get("client_id")
        return value if isinstance(value, str) else None

    @property
    def token_id(self) -> str | None:
        """The ``jti`` claim: the token's unique id (what revocation lists hold)."""
        value = self.claims.get("jti")
        return value if isinstance(value, str) else None

    @property
    def expires_at(self) -> float | None:
        """The ``exp`` claim in seconds since the epoch."""
        return _numeric(self.claims.get("exp"))

    @property
    def issued_at(self) -> float | None:
        """The ``iat`` claim in seconds since the epoch."""
        return _numeric(self.claims.get("iat"))

    @property
    def scopes(self) -> frozenset[str]:
        """The granted scopes: the space-separated ``scope`` claim (RFC 8693, RFC 9068), or a
        ``scp`` list as some issuers write it."""
        scope = self.claims.get("scope")
        if isinstance(scope, str):
            return frozenset(scope.split())
        scp = self.claims.get("scp")
        if isinstance(scp, str):
            return frozenset(scp.split())
        if isinstance(scp, list):
            return frozenset(item for item in scp if isinstance(item, str))
        return frozenset()

    def __repr__(self) -> str:
        return (
            f"VerifiedToken(subject={self.subject!r}, issuer={self.issuer!r}, "
            f"token_id={self.token_id!r})"
        )


def _numeric(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        return None


def _strings(value: object, argument: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items: tuple[object, ...] = (value,)
    elif isinstance(value, Iterable):
        items = tuple(value)
    else:
        raise TypeError(
            f"{argument} must be a str or a collection of str (got {type(value).__name__})."
        )
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ValueError(f"{argument} must hold at least one non-empty str (got {value!r}).")
    return tuple(str(item) for item in items)


class TokenValidator:
    """Checks JWT bearer tokens for one resource server (sync and asyncio).

    - ``issuer``: the exact ``iss`` accepted; ``audience``: this server's identifier, or several
      (a token passes when its ``aud`` holds any of them).
    - ``jwks``: a ``KeySet``, a JWKS dict, a ``KeySource`` (``StaticKeySet``,
      ``RemoteKeySet``), or the ``jwks_uri`` as a str (a ``RemoteKeySet`` with its defaults).
    - ``algorithms``: the allow-list; only asymmetric algorithms (``ASYMMETRIC_ALGORITHMS``)
      may be listed, so ``none`` and HMAC are always refused.
    - ``leeway``: seconds of clock skew forgiven on ``exp``, ``nbf`` and ``iat``.
    - ``required_claims``: claims that must be present (``exp`` always is).
    - ``access_token=True``: the RFC 9068 profile (``typ`` ``at+jwt`` and its claims).
    - ``token_type``: a ``typ`` header to demand without the rest of the profile.
    - ``clock``: seconds since the epoch (``time.time``), replaceable in tests.
    - ``cache_size``, ``cache_ttl``: tokens that passed every check are remembered (at most
      ``cache_size``, each at most ``cache_ttl`` seconds and never past its ``exp``), so the
      next request with the same token costs a lookup instead of a signature check. A hit
      still asks the key set for the token's key and must find the very key that verified it:
      a key rotated out of the set ends its tokens' hits. ``cache_size=0`` checks every time.

    ``validate`` returns a ``VerifiedToken`` or raises ``InvalidTokenError``, whose ``reason``
    is one of ``malformed``, ``algorithm_not_allowed``, ``wrong_token_type``, ``unknown_key``,
    ``key_mismatch``, ``bad_signature``, ``expired``, ``not_yet_valid``, ``issued_in_future``,
    ``wrong_issuer``, ``wrong_audience``, ``missing_claim`` and ``invalid_claim``; a key set that
    cannot be fetched raises ``KeySetUnavailableError`` instead (answer 503, not 401).

    >>> from joserfc.jwk import ECKey
    >>> key = ECKey.generate_key("P-256", parameters={"kid": "k1"}, private=False)
    >>> validator = TokenValidator(
    ...     issuer="https://issuer.example", audience="api", jwks={"keys": [key.as_dict()]},
    ...     algorithms=["ES256"], access_token=True,
    ... )
    >>> validator.validate("not a token")
    Traceback (most recent call last):
    ...
    buttress.errors.InvalidTokenError: The token is not a well-formed signed JWT ...
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | Collection[str],
        jwks: KeySet | Mapping[str, Any] | KeySource | str,
        algorithms: Collection[str] = DEFAULT_ALGORITHMS,
        leeway: float = 30.0,
        required_claims: Collection[str] = (),
        access_token: bool = False,
        token_type: str | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
        cache_ttl: float = 60.0,
    ) -> None:
        if not isinstance(issuer, str) or not issuer:
            raise TypeError(
                f"issuer must be the issuer identifier as a non-empty str (got {issuer!r})."
            )
        self.issuer = issuer
        self.audiences = _strings(audience, "audience")
        if isinstance(jwks, str):
            self.keys: KeySource = RemoteKeySet(jwks)
        elif isinstance(jwks, KeySource):
            self.keys = jwks
        elif isinstance(jwks, (KeySet, Mapping)):
            self.keys = StaticKeySet(jwks)
        else:
            raise TypeError(
                "jwks must be a joserfc KeySet, a JWKS dict, a KeySource (StaticKeySet, "
                f"RemoteKeySet) or a JWKS URL (got {type(jwks).__name__})."
            )
        allowed = _strings(algorithms, "algorithms")
        refused = sorted(set(allowed) - ASYMMETRIC_ALGORITHMS)
        if refused:
            raise ValueError(
                f"algorithms may list only asymmetric signature algorithms "
                f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))}); remove {', '.join(refused)}. "
                "'none' and the HMAC algorithms are refused so a public key can never be used "
                "as a shared secret."
            )
        self.algorithms = frozenset(allowed)
        self._registry = _AllowListRegistry(algorithms=sorted(self.algorithms))
        # RFC 7515 section 4: a header parameter the recipient does not understand is ignored
        # unless it is listed in "crit" (which joserfc still enforces).
        self._registry.strict_check_header = False
        self.leeway = _check_seconds(leeway, "leeway")
        if self.leeway > 300:
            raise ValueError(
                f"leeway must be at most 300 seconds; a larger one would keep expired tokens "
                f"alive (got {leeway})."
            )
        if isinstance(required_claims, str):
            raise TypeError("required_claims must be a collection of claim names, not one str.")
        claims = tuple(required_claims)
        if not all(isinstance(name, str) and name for name in claims):
            raise TypeError(f"required_claims must hold non-empty str (got {claims!r}).")
        if not isinstance(access_token, bool):
            raise TypeError(f"access_token must be a bool (got {type(access_token).__name__}).")
        if token_type is not None and (not isinstance(token_type, str) or not token_type):
            raise TypeError(f"token_type must be a non-empty str or None (got {token_type!r}).")
        if access_token:
            claims += _ACCESS_TOKEN_CLAIMS
            token_type = token_type or "at+jwt"
        self.required_claims = tuple(dict.fromkeys(("exp", "iss", "aud", *claims)))
        self.token_type = None if token_type is None else _media_type(token_type)
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds (got {clock!r}).")
        self._clock = clock
        if isinstance(cache_size, bool) or not isinstance(cache_size, int):
            raise TypeError(f"cache_size must be an int (got {type(cache_size).__name__}).")
        if cache_size < 0:
            raise ValueError(f"cache_size must be 0 (no cache) or more (got {cache_size}).")
        self.cache_ttl = _check_seconds(cache_ttl, "cache_ttl")
        # token -> (what it said, the key that verified it, the end of its hits on our clock)
        self._verified: LocalCache | None = (
            LocalCache(cache_size) if cache_size and self.cache_ttl else None
        )

    # -- the public checks -----------------------------------------------------------------

    def validate(self, token: str | bytes) -> VerifiedToken:
        """Checks ``token`` completely and returns what it says; ``InvalidTokenError`` if it
        fails any check.

        >>> validator = TokenValidator(issuer="i", audience="a", jwks={"keys": []})
        >>> validator.validate("e30.e30.")
        Traceback (most recent call last):
        ...
        buttress.errors.InvalidTokenError: The token is not a well-formed signed JWT ...
        """
        hit = self._remembered(token)
        if hit is not None:
            verified, key, alg, kid = hit
            if self.keys.find_key(kid, alg) is key:
                return verified
        signed = self._parse(token)
        alg, kid = self._check_header(signed)
        key = self.keys.find_key(kid, alg)
        return self._remember(token, self._finish(signed, key), key, alg, kid)

    async def validate_async(self, token: str | bytes) -> VerifiedToken:
        """``validate`` for asyncio: a remote key set is fetched without blocking the loop.

        >>> validator = TokenValidator(issuer="i", audience="a", jwks={"keys": []})
        >>> asyncio.run(validator.validate_async("x.y.z"))
        Traceback (most recent call last):
        ...
        buttress.errors.InvalidTokenError: The token is not a well-formed signed JWT ...
        """
        hit = self._remembered(token)
        if hit is not None:
            verified, key, alg, kid = hit
            if await self.keys.find_key_async(kid, alg) is key:
                return verified
        signed = self._parse(token)
        alg, kid = self._check_header(signed)
        key = await self.keys.find_key_async(kid, alg)
        return self._remember(token, self._finish(signed, key), key, alg, kid)

    # -- the cache of verified tokens ------------------------------------------------------

    def _remembered(self, token: object) -> tuple[VerifiedToken, Key, str, str | None] | None:
        if self._verified is None or not isinstance(token, (str, bytes)):
            return None
        entry = self._verified.get(token)
        if entry is None:
            return None
        verified, key, alg, kid, until = entry
        if self._clock() >= until:
            self._verified.delete(token)
            return None
        return verified, key, alg, kid

    def _remember(
        self, token: str | bytes, verified: VerifiedToken, key: Key, alg: str, kid: str | None
    ) -> VerifiedToken:
        if self._verified is not None:
            # Never past exp: after it, the full check (and its leeway) decides again.
            expires = verified.expires_at
            until = min(self._clock() + self.cache_ttl, math.inf if expires is None else expires)
            self._verified.set(token, (verified, key, alg, kid, until))
        return verified

    # -- the steps -------------------------------------------------------------------------

    def _parse(self, token: str | bytes) -> CompactSignature:
        if isinstance(token, str):
            try:
                raw = token.encode("ascii")
            except UnicodeEncodeError:
                raise _malformed() from None
        elif isinstance(token, bytes):
            raw = token
        else:
            raise TypeError(f"token must be a str or bytes (got {type(token).__name__}).")
        if len(raw) > _MAX_TOKEN_BYTES:
            raise InvalidTokenError(
                "malformed", f"The token is longer than {_MAX_TOKEN_BYTES} bytes."
            )
        try:
            signed = jws.extract_compact(raw, registry=self._registry)
        except (JoseError, ValueError, TypeError):
            raise _malformed() from None
        if not isinstance(signed.headers(), dict):
            raise _malformed()
        return signed

    def _check_header(self, signed: CompactSignature) -> tuple[str, str | None]:
        header: dict[str, Any] = signed.headers()
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidTokenError(
                "algorithm_not_allowed",
                f"The token is signed with algorithm {alg!r}, which this validator does not allow.",
            )
        for name in _FORBIDDEN_HEADERS:
            if name in header:
                raise InvalidTokenError(
                    "malformed", f"The token's header has {name!r}, which a JWT may not use."
                )
        if self.token_type is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _media_type(typ) != self.token_type:
                raise InvalidTokenError(
                    "wrong_token_type",
                    f"The token's typ header is {typ!r}, but this validator accepts only "
                    f"{self.token_type!r}.",
                )
        crit = header.get("crit", [])
        if not isinstance(crit, list) or not all(isinstance(name, str) for name in crit):
            raise InvalidTokenError(
                "malformed", "The token's crit header is not a list of header names."
            )
        try:
            self._registry.check_header(header)
        except JoseError as error:
            raise InvalidTokenError(
                "malformed",
                f"The token's header is not acceptable ({error.description}); a critical "
                "header parameter this validator does not understand, or a bad value.",
            ) from None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidTokenError("malformed", "The token's kid header is not a string.")
        return alg, kid

    def _finish(self, signed: CompactSignature, key: Key) -> VerifiedToken:
        try:
            valid = jws.validate_compact(signed, key, registry=self._registry)
        except InvalidTokenError:
            raise
        except JoseError as error:
            raise InvalidTokenError(
                "key_mismatch", f"The token's key cannot verify its algorithm ({error.error})."
            ) from None
        if not valid:
            raise InvalidTokenError(
                "bad_signature", "The token's signature does not verify; it was altered or forged."
            )
        try:
            claims = json.loads(signed.payload)
        except ValueError:
            raise InvalidTokenError("malformed", "The token's payload is not JSON.") from None
        if not isinstance(claims, dict):
            raise InvalidTokenError("malformed", "The token's payload is not a JSON object.")
        self._check_claims(claims)
        return VerifiedToken(signed.headers(), claims)

    def _check_claims(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        options: dict[str, Any] = {name: {"essential": True} for name in self.required_claims}
        options["iss"] = {"essential": True, "value": self.issuer}
        options["aud"] = {"essential": True, "values": list(self.audiences)}
        # joserfc counts whole seconds; rounding the leeway up never refuses a token the
        # configured leeway would accept.
        registry = JWTClaimsRegistry(now=int(now), leeway=math.ceil(self.leeway), **options)
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if isinstance(value, int) and _numeric(value) is None:
                raise _claim_error(name, value)  # too large for a float: no NumericDate
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise InvalidTokenError("expired", "The token has expired.") from None
        except MissingClaimError as error:
            raise InvalidTokenError(
                "missing_claim", f"The token lacks the required claim(s) {error.claim}."
            ) from None
        except InvalidClaimError as error:
            raise _claim_error(error.claim, claims.get(error.claim)) from None
        # joserfc compares against whole seconds; this is the exact check.
        if claims["exp"] <= now - self.leeway:
            raise InvalidTokenError("expired", "The token has expired.")


def _media_type(value: str) -> str:
    """RFC 9068 section 4: ``typ`` compares case-insensitively, ``application/`` optional."""
    lowered = value.lower()
    return lowered.removeprefix("application/")


def _malformed() -> InvalidTokenError:
    return InvalidTokenError(
        "malformed", "The token is not a well-formed signed JWT (JWS compact serialization)."
    )


def _claim_error(claim: str, value: object) -> InvalidTokenError:
    numeric = _numeric(value) is not None
    if claim == "iss":
        return InvalidTokenError("wrong_issuer", "The token was issued by another issuer.")
    if claim == "aud":
        return InvalidTokenError("wrong_audience", "The token is meant for another audience.")
    if claim == "nbf" and numeric:
        return InvalidTokenError("not_yet_valid", "The token is not valid yet (nbf).")
    if claim == "iat" and numeric:
        return InvalidTokenError("issued_in_future", "The token was issued in the future (iat).")
    return InvalidTokenError("invalid_claim", f"The token's claim {claim!r} has an invalid value.")
