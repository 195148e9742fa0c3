"""Two ``OAuthServer`` instances on one shared store behave as one server, on PostgreSQL and on
Redis: a client registered on one is known to the other; a code redeemed on one is refused on
the other (and the replay revokes the grant); a refresh token rotated on one and reused on the
other revokes the grant; a revocation on one is seen by the other; a key rotated on one is
published by the other's JWKS, whose keys check every token either signed; and two instances
starting (or rotating) at once still agree on the keys.

Each instance has a store object of its own on the same tables or keys, as separate processes
would. The stores come from ``shared_stores`` in test_oauth_storage, so each test has tables or
keys of its own, dropped or deleted afterwards, and skips when the service does not answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from buttress.errors import OAuthError
from buttress.security.oauth import OAuthServer, OAuthStorage
from joserfc import jwt
from joserfc.jwk import KeySet
from oauth_support import pkce_pair
from support import run_threads
from test_oauth_storage import shared_stores

ISSUER = "https://auth.example"
REDIRECT = "https://app.example/callback"
SECRETS = {"web": "web-secret", "api": "api-secret"}


@pytest.fixture(params=["postgres", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], OAuthStorage]]:
    """Makes store objects sharing one fresh set of tables (or keys)."""
    with shared_stores(request, request.param) as make:
        yield make


@pytest.fixture
def servers(make_store: Callable[[], OAuthStorage]) -> tuple[OAuthServer, OAuthServer]:
    """Instances A and B on one store; the clients are registered on A only."""
    a = OAuthServer(
        ISSUER,
        storage=make_store(),
        audience="https://api.example",
        introspection_clients=["api"],
        key_publication_delay=0,
    )
    b = OAuthServer(
        ISSUER,
        storage=make_store(),
        audience="https://api.example",
        introspection_clients=["api"],
        key_publication_delay=0,
    )
    a.register_client("web", client_secret=SECRETS["web"], redirect_uris=[REDIRECT])
    a.register_client("api", client_secret=SECRETS["api"])
    return a, b


def grant(server: OAuthServer) -> tuple[str, str]:
    """Authorizes alice for "web" on ``server``; returns (code, verifier)."""
    verifier, challenge = pkce_pair()
    granted = server.authorize(
        client_id="web", redirect_uri=REDIRECT, subject="alice", code_challenge=challenge
    )
    return granted.code, verifier


def exchange(server: OAuthServer, code: str, verifier: str) -> Any:
    return server.exchange_code(
        code=code,
        client_id="web",
        client_secret=SECRETS["web"],
        code_verifier=verifier,
        redirect_uri=REDIRECT,
    )


def refresh(server: OAuthServer, refresh_token: str | None) -> Any:
    return server.refresh(
        refresh_token=refresh_token or "", client_id="web", client_secret=SECRETS["web"]
    )


def active(server: OAuthServer, token: str | None) -> bool:
    found = server.introspect(token or "", client_id="api", client_secret=SECRETS["api"])
    return bool(found["active"])


def kid_checked_by(server: OAuthServer, access_token: str) -> str:
    """The kid of ``access_token``, once its signature checked out with ``server``'s JWKS."""
    decoded = jwt.decode(access_token, KeySet.import_key_set(server.jwks()), algorithms=["ES256"])
    return str(decoded.header["kid"])


def service_token(server: OAuthServer) -> str:
    return server.client_credentials(client_id="api", client_secret=SECRETS["api"]).access_token


# -- grants ------------------------------------------------------------------------------------


def test_a_code_granted_on_one_instance_is_redeemed_on_the_other(
    servers: tuple[OAuthServer, OAuthServer],
) -> None:
    a, b = servers
    code, verifier = grant(b)  # B knows "web" only through the store
    tokens = exchange(a, code, verifier)
    assert active(b, tokens.access_token)
    assert active(b, tokens.refresh_token)


def test_a_code_redeemed_on_one_instance_is_refused_on_the_other_and_revokes(
    servers: tuple[OAuthServer, OAuthServer],
) -> None:
    a, b = servers
    code, verifier = grant(a)
    tokens = exchange(a, code, verifier)
    with pytest.raises(OAuthError) as caught:
        exchange(b, code, verifier)
    assert caught.value.error == "invalid_grant"
    for server in (a, b):
        assert not active(server, tokens.access_token)
        assert not active(server, tokens.refresh_token)
    with pytest.raises(OAuthError):
        refresh(a, tokens.refresh_token)


def test_a_code_raced_on_both_instances_gives_tokens_once(
    servers: tuple[OAuthServer, OAuthServer],
) -> None:
    a, b = servers
    code, verifier = grant(a)
    barrier = threading.Barrier(8)
    won: list[Any] = []
    refused: list[str] = []
    lock = threading.Lock()

    def redeem(index: int) -> None:
        barrier.wait()
        try:
            tokens = exchange(a if index % 2 else b, code, verifier)
        except OAuthError as error:
            with lock:
                refused.append(error.error)
        else:
            with lock:
                won.append(tokens)

    run_threads(redeem, 8, within=20)
    assert len(won) == 1
    assert refused == ["invalid_grant"] * 7
    # The losers were replays: the winner's tokens are revoked too.
    assert not active(a, won[0].access_token)
    assert not active(b, won[0].refresh_token)


def test_a_refresh_token_rotated_on_one_instance_and_reused_on_the_other_revokes(
    servers: tuple[OAuthServer, OAuthServer],
) -> None:
    a, b = servers
    first = exchange(a, *grant(a))
    second = refresh(a, first.refresh_token)
    assert active(b, second.refresh_token)
    with pytest.raises(OAuthError) as caught:
        refresh(b, first.refresh_token)
    assert caught.value.error == "invalid_grant"
    for token in (first.access_token, second.access_token, second.refresh_token):
        assert not active(a, token)
        assert not active(b, token)
    with pytest.raises(OAuthError):
        refresh(a, second.refresh_token)


def test_a_refresh_token_rotates_on_alternate_instances(
    servers: tuple[OAuthServer, OAuthServer],
) -> None:
    a, b = servers
    tokens = exchange(a, *grant(a))
    for server in (b, a, b, a):
        tokens = refresh(server, tokens.refresh_token)
    assert active(a, tokens.access_token)
    assert active(b, tokens.refresh_token)


def test_a_revocation_on_one_instance_holds_on_the_other(
    servers: tuple[OAuthServer, OAuthServer],
) -> None:
    a, b = servers
    tokens = exchange(a, *grant(a))
    b.revoke(tokens.refresh_token or "", client_id="web", client_secret=SECRETS["web"])
    assert not active(a, tokens.access_token)  # the whole grant went with its refresh token
    assert not a.token_is_active(tokens.refresh_token or "")


# -- signing keys --------------------------------------------------------------------------------


def test_a_key_rotated_on_one_instance_is_published_and_used_by_the_other(
    servers: tuple[OAuthServer, OAuthServer],
) -> None:
    a, b = servers
    before = service_token(a)
    old_kid = kid_checked_by(b, before)
    new_kid = a.rotate_signing_key()
    assert [key["kid"] for key in b.jwks()["keys"]] == [old_kid, new_kid]
    after_a, after_b = service_token(a), service_token(b)
    for server in (a, b):
        # The old key stays published while its tokens live; both now sign with the new one.
        assert kid_checked_by(server, before) == old_kid
        assert kid_checked_by(server, after_a) == new_kid
        assert kid_checked_by(server, after_b) == new_kid
    assert a.jwks() == b.jwks()


def test_instances_starting_at_once_agree_on_their_keys(
    make_store: Callable[[], OAuthStorage],
) -> None:
    # Both may make a "first" key; both keys are published, and from then on both instances
    # sign with the same one (the newest current key in the store).
    instances = [OAuthServer(ISSUER, storage=make_store()) for _ in range(4)]
    instances[0].register_client("api", client_secret=SECRETS["api"])
    barrier = threading.Barrier(len(instances))
    first_tokens: list[str] = [""] * len(instances)

    def start(index: int) -> None:
        barrier.wait()
        first_tokens[index] = service_token(instances[index])

    run_threads(start, len(instances), within=20)
    published = instances[0].jwks()
    assert all(server.jwks() == published for server in instances)
    for server in instances:
        for token in first_tokens:
            kid_checked_by(server, token)
    kids = {kid_checked_by(server, service_token(server)) for server in instances}
    assert len(kids) == 1


def test_instances_rotating_at_once_keep_every_token_checkable(
    servers: tuple[OAuthServer, OAuthServer],
) -> None:
    a, b = servers
    before = service_token(a)
    barrier = threading.Barrier(2)

    def rotate(index: int) -> None:
        barrier.wait()
        (a, b)[index].rotate_signing_key()

    run_threads(rotate, 2, within=20)
    after = [service_token(a), service_token(b)]
    assert a.jwks() == b.jwks()
    for server in (a, b):
        for token in (before, *after):
            kid_checked_by(server, token)
    assert kid_checked_by(a, after[0]) == kid_checked_by(b, after[1])


def test_sealed_signing_keys_are_shared_by_instances_with_the_encryptor(
    make_store: Callable[[], OAuthStorage],
) -> None:
    from buttress.security.zerotrust import FieldEncryptor, KeyRing

    encryptor = FieldEncryptor(KeyRing.generate("kek-1"))
    a = OAuthServer(ISSUER, storage=make_store(), key_encryptor=encryptor, key_publication_delay=0)
    b = OAuthServer(ISSUER, storage=make_store(), key_encryptor=encryptor, key_publication_delay=0)
    a.register_client("api", client_secret=SECRETS["api"])
    token = a.client_credentials(client_id="api", client_secret=SECRETS["api"]).access_token
    # What the engine holds cannot sign: no private scalar, only the sealed form.
    for record in b.storage.signing_keys():
        assert "d" not in record.private_jwk
        assert str(record.private_jwk["sealed_private_jwk"]).startswith("btfe1:")
    assert jwt.decode(token, KeySet.import_key_set(b.jwks())).claims["client_id"] == "api"
    assert b.client_credentials(client_id="api", client_secret=SECRETS["api"]).access_token
    # An instance without the encryptor cannot use the sealed keys.
    c = OAuthServer(ISSUER, storage=make_store(), key_publication_delay=0)
    with pytest.raises(ValueError, match="sealed"):
        c.jwks()
