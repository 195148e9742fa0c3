"""Workload identity: SPIFFE IDs from the ASGI TLS extension (client certificates made here
with ``cryptography``) and from a trusted proxy's header, never from anyone else's."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from buttress.security import Principal, SpiffeId, WorkloadIdentity, parse_spiffe_id
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def certificate(*uris: str, dns: str | None = None) -> str:
    """A self-signed client certificate (PEM) with these URI SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
    if dns is not None:
        names.append(x509.DNSName(dns))
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def tls_scope(chain: list[str], error: str | None = None, **more: Any) -> dict[str, Any]:
    tls = {"client_cert_chain": chain, "client_cert_error": error, "tls_version": 0x0304}
    return {
        "type": "http",
        "headers": [],
        "client": ("10.0.0.9", 1234),
        "extensions": {"tls": tls},
        **more,
    }


WEB = "spiffe://example.org/ns/prod/sa/web"


def test_the_spiffe_id_comes_from_the_client_certificate() -> None:
    identity = WorkloadIdentity()
    found = identity.from_scope(tls_scope([certificate(WEB, dns="web.local")]))
    assert found == SpiffeId("example.org", "/ns/prod/sa/web")
    assert str(found) == WEB


@pytest.mark.parametrize(
    "chain",
    [
        [],
        [certificate()],  # no URI SAN
        [certificate("https://example.org/web")],  # not SPIFFE
        [certificate(WEB, "spiffe://example.org/other")],  # an SVID has exactly one
        [certificate("spiffe://Example.org/web")],  # not a valid SPIFFE ID
        ["not a certificate"],
    ],
)
def test_certificates_without_one_spiffe_id_give_none(chain: list[str]) -> None:
    assert WorkloadIdentity().from_scope(tls_scope(chain)) is None


def test_a_certificate_the_server_flagged_is_ignored() -> None:
    scope = tls_scope([certificate(WEB)], error="certificate verify failed")
    assert WorkloadIdentity().from_scope(scope) is None


def test_trust_domains_limit_what_is_accepted() -> None:
    identity = WorkloadIdentity(trust_domains=["example.org"])
    assert identity.from_scope(tls_scope([certificate(WEB)])) is not None
    other = tls_scope([certificate("spiffe://evil.example/ns/prod/sa/web")])
    assert identity.from_scope(other) is None


def test_the_tls_extension_can_be_turned_off() -> None:
    assert (
        WorkloadIdentity(use_tls_extension=False).from_scope(tls_scope([certificate(WEB)])) is None
    )


def proxy_scope(client: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers), "client": (client, 5555)}


def test_a_proxy_header_is_trusted_only_from_the_trusted_proxies() -> None:
    identity = WorkloadIdentity(
        proxy_header="X-Forwarded-Client-Cert", trusted_proxies=["10.0.0.0/8", "::1"]
    )
    xfcc = (
        b"x-forwarded-client-cert",
        b'By=spiffe://example.org/gw;Hash=abc;Subject="CN=web, O=x";URI=' + WEB.encode(),
    )
    assert str(identity.from_scope(proxy_scope("10.1.2.3", xfcc))) == WEB
    assert str(identity.from_scope(proxy_scope("::1", xfcc))) == WEB
    assert identity.from_scope(proxy_scope("192.168.1.1", xfcc)) is None
    assert identity.from_scope(proxy_scope("not-an-ip", xfcc)) is None
    assert identity.from_scope({"headers": [xfcc]}) is None


def test_xfcc_takes_the_element_the_nearest_proxy_added() -> None:
    identity = WorkloadIdentity(
        proxy_header="x-forwarded-client-cert", trusted_proxies=["10.0.0.1"]
    )
    header = (
        b"x-forwarded-client-cert",
        b"URI=spiffe://example.org/first-hop,By=x;URI=spiffe://example.org/nearest",
    )
    assert (
        str(identity.from_scope(proxy_scope("10.0.0.1", header))) == "spiffe://example.org/nearest"
    )
    twice = proxy_scope("10.0.0.1", header, header)
    assert identity.from_scope(twice) is None  # sent twice: nothing to trust


def test_a_plain_spiffe_id_header() -> None:
    identity = WorkloadIdentity(
        proxy_header="x-spiffe-id", proxy_header_format="spiffe_id", trusted_proxies=["127.0.0.1"]
    )
    scope = proxy_scope("127.0.0.1", (b"x-spiffe-id", WEB.encode()))
    assert str(identity.from_scope(scope)) == WEB
    bad = proxy_scope("127.0.0.1", (b"x-spiffe-id", b"spiffe://example.org/../root"))
    assert identity.from_scope(bad) is None
    binary = proxy_scope("127.0.0.1", (b"x-spiffe-id", b"\xff\xfe"))
    assert identity.from_scope(binary) is None


def test_the_tls_identity_is_preferred_to_the_header() -> None:
    identity = WorkloadIdentity(
        proxy_header="x-spiffe-id", proxy_header_format="spiffe_id", trusted_proxies=["10.0.0.9"]
    )
    scope = tls_scope([certificate(WEB)], headers=[(b"x-spiffe-id", b"spiffe://example.org/x")])
    assert str(identity.from_scope(scope)) == WEB


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("https://example.org/web", "must start with 'spiffe://'"),
        ("spiffe://", "trust domain"),
        ("spiffe://EXAMPLE.org/web", "trust domain"),
        ("spiffe://example.org:8080/web", "trust domain"),
        ("spiffe://user@example.org/web", "trust domain"),
        ("spiffe://example.org/", "path segments"),
        ("spiffe://example.org//web", "path segments"),
        ("spiffe://example.org/web?x=1", "path segments"),
        ("spiffe://example.org/web#x", "path segments"),
        ("spiffe://example.org/./web", "'.' or '..'"),
        ("spiffe://example.org/" + "a" * 3000, "longer than"),
    ],
)
def test_invalid_spiffe_ids(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match="is not a SPIFFE ID") as caught:
        parse_spiffe_id(value)
    assert problem in str(caught.value)


def test_valid_spiffe_ids() -> None:
    assert parse_spiffe_id("spiffe://example.org") == SpiffeId("example.org", "")
    assert parse_spiffe_id("spiffe://a-b_c.d/x.y/z_1-2").path == "/x.y/z_1-2"


def test_principals() -> None:
    workload = Principal.from_workload(parse_spiffe_id(WEB))
    assert workload.subject == WEB
    assert workload.scopes == frozenset()
    assert workload.claims == {}
    assert workload.token_id is None
    assert workload.expires_at is None


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    [
        ({"trust_domains": "example.org"}, TypeError, "trust_domains"),
        ({"trust_domains": ["Example.org"]}, ValueError, "trust_domains"),
        ({"use_tls_extension": "yes"}, TypeError, "use_tls_extension"),
        ({"proxy_header": 7}, TypeError, "proxy_header"),
        ({"proxy_header": "x-id"}, ValueError, "trusted_proxies"),
        ({"proxy_header": "x", "trusted_proxies": "10.0.0.1"}, TypeError, "trusted_proxies"),
        ({"proxy_header": "x", "trusted_proxies": ["nope"]}, ValueError, "trusted_proxies"),
        ({"proxy_header_format": "json"}, ValueError, "proxy_header_format"),
    ],
)
def test_bad_options_name_the_argument(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error) as caught:
        WorkloadIdentity(**options)
    assert argument in str(caught.value)
    assert str(caught.value).endswith(".")
