"""The OAuth server's storage on PostgreSQL (the ``postgres`` extra), for several server
instances sharing one database.

One table per record kind (clients, codes, tokens, signing keys) and one of revoked grant
families, named from a table prefix so several servers (or tests) can share a database. Every
operation is one statement, so one round trip; the atomic steps are single
``UPDATE ... WHERE NOT used RETURNING`` statements, of which PostgreSQL lets exactly one caller
win however many processes race.

A family revocation is remembered in its own table until ``remember_until``: a token saved into
the family afterwards is stored revoked, and reading a token (or rotating a refresh token) also
consults the table, so a token saved while its family was being revoked on another connection
cannot slip through.

>>> storage = PostgresOAuthStorage("postgresql://postgres@127.0.0.1:5432/test")  # doctest: +SKIP
>>> server = OAuthServer("https://auth.example", storage=storage)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from buttress.backends.postgres import postgres_pool
from buttress.pool import ConnectionPool
from buttress.security.oauth.storage import (
    AuthorizationCodeRecord,
    ClientRecord,
    SigningKeyRecord,
    TokenRecord,
)

__all__ = ["PostgresOAuthStorage"]

_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")

_SCHEMA = """
create table if not exists {p}_clients (
    client_id text primary key,
    secret_hash text,
    redirect_uris text[] not null,
    scopes text[] not null,
    grant_types text[] not null
);
create table if not exists {p}_codes (
    code_hash text primary key,
    client_id text not null,
    subject text not null,
    redirect_uri text,
    scope text not null,
    code_challenge text not null,
    code_challenge_method text not null,
    family_id text not null,
    expires_at double precision not null,
    retain_until double precision not null,
    used boolean not null
);
create index if not exists {p}_codes_retain_until on {p}_codes (retain_until);
create table if not exists {p}_tokens (
    token_hash text primary key,
    kind text not null,
    client_id text not null,
    subject text,
    scope text not null,
    family_id text not null,
    issued_at double precision not null,
    expires_at double precision not null,
    audience text,
    token_id text,
    revoked boolean not null,
    used boolean not null
);
create index if not exists {p}_tokens_family on {p}_tokens (family_id);
create index if not exists {p}_tokens_expires_at on {p}_tokens (expires_at);
create table if not exists {p}_revoked_families (
    family_id text primary key,
    remember_until double precision not null
);
create table if not exists {p}_signing_keys (
    kid text primary key,
    private_jwk jsonb not null,
    created_at double precision not null,
    retire_at double precision
);
"""

_TOKEN_COLUMNS = (
    "token_hash, kind, client_id, subject, scope, family_id, issued_at, expires_at, audience, "
    "token_id"
)
_CODE_COLUMNS = (
    "code_hash, client_id, subject, redirect_uri, scope, code_challenge, code_challenge_method, "
    "family_id, expires_at, retain_until, used"
)


class PostgresOAuthStorage:
    """An ``OAuthStorage`` in PostgreSQL: every ``OAuthServer`` given one on the same database
    and ``table_prefix`` behaves as one server (a code redeemed on one is refused on the
    others, a key rotated on one is published by all).

    - ``pool_or_url``: a ``postgresql://`` URL (the store makes a pool of autocommit
      connections from it, with ``pool_options`` going to ``postgres_pool``), or a pool made
      by ``buttress.backends.postgres.postgres_pool``, which the store uses and leaves open
      on ``close()``.
    - ``table_prefix``: lower-case letters, digits and underscores; the tables are
      ``<prefix>_clients``, ``_codes``, ``_tokens``, ``_revoked_families`` and
      ``_signing_keys``, made at once if missing (safely, when several processes start
      together).

    Signing keys are stored as the record holds them: the private JWK, in the clear, in a
    ``jsonb`` column. Give the table the access rights a private key deserves. Text cannot
    hold NUL characters in PostgreSQL; a record holding one is refused by the server.

    >>> storage = PostgresOAuthStorage(  # doctest: +SKIP
    ...     "postgresql://postgres@127.0.0.1:5432/test", table_prefix="auth")
    >>> storage.get_client("nobody") is None  # doctest: +SKIP
    True
    >>> storage.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        pool_or_url: str | ConnectionPool[psycopg.Connection[Any]],
        *,
        table_prefix: str = "buttress_oauth",
        **pool_options: Any,
    ) -> None:
        if not isinstance(table_prefix, str):
            raise TypeError(f"table_prefix must be a str (got {type(table_prefix).__name__}).")
        if not _PREFIX.fullmatch(table_prefix):
            raise ValueError(
                "table_prefix must be lower-case letters, digits and underscores (at most 41), "
                f"starting with a letter or an underscore (got {table_prefix!r})."
            )
        if isinstance(pool_or_url, str):
            pool_options.setdefault("name", f"oauth:{table_prefix}")
            pool_options.setdefault("min_size", 0)
            self.pool: ConnectionPool[psycopg.Connection[Any]] = postgres_pool(
                pool_or_url, autocommit=True, **pool_options
            )
            self._owns_pool = True
        elif isinstance(pool_or_url, ConnectionPool):
            if pool_options:
                raise TypeError(
                    "pool options ("
                    + ", ".join(sorted(pool_options))
                    + ") apply only when pool_or_url is a URL; set them on the pool you pass."
                )
            self.pool = pool_or_url
            self._owns_pool = False
        else:
            raise TypeError(
                "pool_or_url must be a postgresql:// URL or a pool from "
                "buttress.backends.postgres.postgres_pool "
                f"(got {type(pool_or_url).__name__})."
            )
        self.table_prefix = table_prefix
        self._sql = _statements(table_prefix)
        try:
            with self.pool.connection() as conn:
                with conn.transaction():
                    # Two processes creating the schema at once would race on the catalogs.
                    conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (table_prefix,))
                    conn.execute(_SCHEMA.replace("{p}", table_prefix))
                if not conn.autocommit:
                    conn.commit()
        except BaseException:
            if self._owns_pool:
                self.pool.close()
            raise

    def _run(self, name: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Runs one of the store's statements in one round trip; its rows, if any."""
        with self.pool.connection() as conn:
            cursor = conn.execute(self._sql[name], parameters)
            rows = cursor.fetchall() if cursor.description is not None else []
            if not conn.autocommit:
                conn.commit()
        return rows

    # -- clients -------------------------------------------------------------------------------

    def get_client(self, client_id: str) -> ClientRecord | None:
        """The client with this id, or None."""
        rows = self._run("get_client", {"client_id": client_id})
        if not rows:
            return None
        client_id, secret_hash, redirect_uris, scopes, grant_types = rows[0]
        return ClientRecord(
            client_id=client_id,
            secret_hash=secret_hash,
            redirect_uris=tuple(redirect_uris),
            scopes=tuple(scopes),
            grant_types=tuple(grant_types),
        )

    def save_client(self, client: ClientRecord) -> None:
        """Adds the client, or replaces the one with the same id."""
        self._run(
            "save_client",
            {
                "client_id": client.client_id,
                "secret_hash": client.secret_hash,
                "redirect_uris": list(client.redirect_uris),
                "scopes": list(client.scopes),
                "grant_types": list(client.grant_types),
            },
        )

    # -- authorization codes -------------------------------------------------------------------

    def save_code(self, code: AuthorizationCodeRecord) -> None:
        """Stores a new authorization code (or replaces one with the same hash)."""
        self._run(
            "save_code",
            {
                "code_hash": code.code_hash,
                "client_id": code.client_id,
                "subject": code.subject,
                "redirect_uri": code.redirect_uri,
                "scope": code.scope,
                "code_challenge": code.code_challenge,
                "code_challenge_method": code.code_challenge_method,
                "family_id": code.family_id,
                "expires_at": code.expires_at,
                "retain_until": code.retain_until,
                "used": code.used,
            },
        )

    def get_code(self, code_hash: str) -> AuthorizationCodeRecord | None:
        """The code stored under this hash, used or not, or None."""
        rows = self._run("get_code", {"code_hash": code_hash})
        return None if not rows else AuthorizationCodeRecord(*rows[0])

    def use_code(self, code_hash: str) -> bool:
        """Marks the code used in one statement; True only for the one caller that did."""
        return bool(self._run("use_code", {"code_hash": code_hash}))

    # -- tokens --------------------------------------------------------------------------------

    def save_token(self, token: TokenRecord) -> None:
        """Stores a new token, revoked if its family's revocation is remembered."""
        self._run(
            "save_token",
            {
                "token_hash": token.token_hash,
                "kind": token.kind,
                "client_id": token.client_id,
                "subject": token.subject,
                "scope": token.scope,
                "family_id": token.family_id,
                "issued_at": token.issued_at,
                "expires_at": token.expires_at,
                "audience": token.audience,
                "token_id": token.token_id,
                "revoked": token.revoked,
                "used": token.used,
            },
        )

    def get_token(self, token_hash: str) -> TokenRecord | None:
        """The token stored under this hash, or None; revoked if its family is."""
        rows = self._run("get_token", {"token_hash": token_hash})
        return None if not rows else TokenRecord(*rows[0])

    def use_refresh_token(self, token_hash: str) -> bool:
        """Marks an unused, unrevoked refresh token of an unrevoked family used, in one
        statement; True only for the one caller that did."""
        return bool(self._run("use_refresh_token", {"token_hash": token_hash}))

    def revoke_token(self, token_hash: str) -> None:
        """Marks one token revoked (nothing happens for an unknown hash)."""
        self._run("revoke_token", {"token_hash": token_hash})

    def revoke_family(self, family_id: str, remember_until: float) -> None:
        """Revokes every token of the family, and remembers the revocation until
        ``remember_until`` (the later of two), in one statement."""
        self._run("revoke_family", {"family_id": family_id, "remember_until": remember_until})

    # -- signing keys --------------------------------------------------------------------------

    def signing_keys(self) -> list[SigningKeyRecord]:
        """Every stored signing key, oldest first (ties by key id)."""
        return [
            SigningKeyRecord(kid, private_jwk, created_at, retire_at)
            for kid, private_jwk, created_at, retire_at in self._run("signing_keys", {})
        ]

    def save_signing_key(self, key: SigningKeyRecord) -> None:
        """Adds the key, or replaces the one with the same ``kid``."""
        self._run(
            "save_signing_key",
            {
                "kid": key.kid,
                "private_jwk": Jsonb(dict(key.private_jwk)),
                "created_at": key.created_at,
                "retire_at": key.retire_at,
            },
        )

    # -- housekeeping --------------------------------------------------------------------------

    def purge(self, now: float) -> int:
        """Drops expired tokens, codes past ``retain_until``, family revocations past
        ``remember_until`` and keys past ``retire_at``, in one statement; returns how many
        rows went."""
        rows = self._run("purge", {"now": now})
        return int(rows[0][0])

    def close(self) -> None:
        """Closes the pool, if the store made it from a URL; a pool passed in stays open."""
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> PostgresOAuthStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # Not the URL: it may hold a password.
        return f"PostgresOAuthStorage(table_prefix={self.table_prefix!r})"


def _statements(p: str) -> dict[str, str]:
    """The store's statements, with its table names filled in."""
    revoked_family = (
        f"exists (select 1 from {p}_revoked_families f where f.family_id = t.family_id)"
    )
    return {
        "get_client": (
            "select client_id, secret_hash, redirect_uris, scopes, grant_types "
            f"from {p}_clients where client_id = %(client_id)s"
        ),
        "save_client": (
            f"insert into {p}_clients (client_id, secret_hash, redirect_uris, scopes, grant_types) "
            "values (%(client_id)s, %(secret_hash)s, %(redirect_uris)s::text[], "
            "%(scopes)s::text[], %(grant_types)s::text[]) "
            "on conflict (client_id) do update set secret_hash = excluded.secret_hash, "
            "redirect_uris = excluded.redirect_uris, scopes = excluded.scopes, "
            "grant_types = excluded.grant_types"
        ),
        "save_code": (
            f"insert into {p}_codes ({_CODE_COLUMNS}) values (%(code_hash)s, %(client_id)s, "
            "%(subject)s, %(redirect_uri)s, %(scope)s, %(code_challenge)s, "
            "%(code_challenge_method)s, %(family_id)s, %(expires_at)s, %(retain_until)s, "
            "%(used)s) on conflict (code_hash) do update set "
            + ", ".join(f"{column} = excluded.{column}" for column in _CODE_COLUMNS.split(", ")[1:])
        ),
        "get_code": f"select {_CODE_COLUMNS} from {p}_codes where code_hash = %(code_hash)s",
        "use_code": (
            f"update {p}_codes set used = true where code_hash = %(code_hash)s and not used "
            "returning true"
        ),
        "save_token": (
            f"insert into {p}_tokens ({_TOKEN_COLUMNS}, revoked, used) select %(token_hash)s, "
            "%(kind)s, %(client_id)s, %(subject)s, %(scope)s, %(family_id)s, %(issued_at)s, "
            "%(expires_at)s, %(audience)s, %(token_id)s, "
            f"%(revoked)s or exists (select 1 from {p}_revoked_families "
            "where family_id = %(family_id)s), %(used)s "
            "on conflict (token_hash) do update set "
            + ", ".join(
                f"{column} = excluded.{column}"
                for column in [*_TOKEN_COLUMNS.split(", ")[1:], "revoked", "used"]
            )
        ),
        "get_token": (
            f"select {_TOKEN_COLUMNS}, revoked or {revoked_family}, used from {p}_tokens t "
            "where token_hash = %(token_hash)s"
        ),
        # Two racing updates of one row: the second waits for the first, then finds the row
        # used and updates nothing. Exactly one caller gets a row back.
        "use_refresh_token": (
            f"update {p}_tokens t set used = true where token_hash = %(token_hash)s "
            f"and kind = 'refresh_token' and not used and not revoked and not {revoked_family} "
            "returning true"
        ),
        "revoke_token": (
            f"update {p}_tokens set revoked = true where token_hash = %(token_hash)s "
            "and not revoked"
        ),
        "revoke_family": (
            f"with remembered as (insert into {p}_revoked_families (family_id, remember_until) "
            "values (%(family_id)s, %(remember_until)s) on conflict (family_id) do update "
            f"set remember_until = greatest({p}_revoked_families.remember_until, "
            "excluded.remember_until)) "
            f"update {p}_tokens set revoked = true where family_id = %(family_id)s "
            "and not revoked"
        ),
        "signing_keys": (
            f"select kid, private_jwk, created_at, retire_at from {p}_signing_keys "
            "order by created_at, kid"
        ),
        "save_signing_key": (
            f"insert into {p}_signing_keys (kid, private_jwk, created_at, retire_at) "
            "values (%(kid)s, %(private_jwk)s, %(created_at)s, %(retire_at)s) "
            "on conflict (kid) do update set private_jwk = excluded.private_jwk, "
            "created_at = excluded.created_at, retire_at = excluded.retire_at"
        ),
        "purge": (
            f"with tokens as (delete from {p}_tokens where expires_at <= %(now)s returning 1), "
            f"codes as (delete from {p}_codes where retain_until <= %(now)s returning 1), "
            f"families as (delete from {p}_revoked_families where remember_until <= %(now)s "
            "returning 1), "
            f"keys as (delete from {p}_signing_keys where retire_at <= %(now)s returning 1) "
            "select (select count(*) from tokens) + (select count(*) from codes) "
            "+ (select count(*) from families) + (select count(*) from keys)"
        ),
    }
