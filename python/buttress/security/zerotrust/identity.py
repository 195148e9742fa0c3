"""Who is calling: the authenticated ``Principal`` and workload identity (SPIFFE over mTLS).

A workload identity is a SPIFFE ID (``spiffe://trust-domain/path``) carried in the URI SAN of
the client certificate (an X.509-SVID). ``WorkloadIdentity`` reads it from:

- the ASGI TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``), where the
  server terminates TLS itself and offers it; the server has already verified the chain
  against its CA, so a certificate it reports with ``client_cert_error`` is ignored;
- or a header set by a trusted proxy (Envoy's ``x-forwarded-client-cert`` or a plain header
  holding the SPIFFE ID), only when ``proxy_header`` is configured and only from the proxy
  addresses listed in ``trusted_proxies``: from anyone else the header is ignored, since a
  client could set it itself.

>>> identity = WorkloadIdentity(trust_domains=["example.org"])
>>> scope = {"type": "http", "headers": [], "client": ("10.0.0.5", 4242)}
>>> identity.from_scope(scope) is None
True
>>> parse_spiffe_id("spiffe://example.org/ns/prod/sa/api").trust_domain
'example.org'
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Collection, Mapping
from typing import Any, Literal

from cryptography import x509

from buttress.security.tokens import VerifiedToken

__all__ = ["Principal", "SpiffeId", "WorkloadIdentity", "parse_spiffe_id"]

# SPIFFE ID standard, section 2: lower-case trust domain; path segments of letters, digits,
# dots, dashes and underscores, never "." or "..".
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_MAX_SPIFFE_ID = 2048


@dataclasses.dataclass(frozen=True)
class SpiffeId:
    """A parsed SPIFFE ID.

    >>> spiffe = parse_spiffe_id("spiffe://example.org/ns/prod/sa/api")
    >>> spiffe.path, str(spiffe)
    ('/ns/prod/sa/api', 'spiffe://example.org/ns/prod/sa/api')
    """

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parses ``value`` as a SPIFFE ID; ``ValueError`` naming what is wrong when it is not one.

    >>> parse_spiffe_id("spiffe://example.org/../etc")
    Traceback (most recent call last):
    ...
    ValueError: 'spiffe://example.org/../etc' is not a SPIFFE ID: a path segment may not be ...
    """
    if not isinstance(value, str):
        raise TypeError(f"A SPIFFE ID must be a str (got {type(value).__name__}).")

    def refuse(why: str) -> ValueError:
        return ValueError(f"{value!r} is not a SPIFFE ID: {why}.")

    if len(value) > _MAX_SPIFFE_ID:
        raise refuse(f"it is longer than {_MAX_SPIFFE_ID} characters")
    if not value.startswith("spiffe://"):
        raise refuse("it must start with 'spiffe://'")
    rest = value[len("spiffe://") :]
    trust_domain, slash, path = rest.partition("/")
    if not trust_domain or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise refuse("the trust domain must be lower-case letters, digits, '.', '-' and '_'")
    if slash:
        segments = path.split("/")
        for segment in segments:
            if segment in (".", ".."):
                raise refuse("a path segment may not be '.' or '..'")
            if not _SEGMENT.fullmatch(segment):
                raise refuse(
                    "path segments must be non-empty letters, digits, '.', '-' and '_' "
                    "(no query, fragment or trailing '/')"
                )
        path = "/" + path
    return SpiffeId(trust_domain, path)


class WorkloadIdentity:
    """Reads the caller's SPIFFE ID from mutual TLS, or from a trusted proxy's header.

    - ``trust_domains``: accept only SPIFFE IDs of these trust domains (None: any).
    - ``proxy_header``: the header a proxy in front of the app sets from the client
      certificate; ``proxy_header_format`` is ``"xfcc"`` (Envoy's
      ``x-forwarded-client-cert``: the last element's ``URI=``) or ``"spiffe_id"`` (the header
      is the ID). Trusted only from peers in ``trusted_proxies`` (addresses or networks),
      which must then be given.
    - ``use_tls_extension``: read the ASGI TLS extension when the server provides it.

    >>> identity = WorkloadIdentity(
    ...     proxy_header="x-spiffe-id", proxy_header_format="spiffe_id",
    ...     trusted_proxies=["127.0.0.1"],
    ... )
    >>> scope = {"headers": [(b"x-spiffe-id", b"spiffe://example.org/billing")],
    ...          "client": ("127.0.0.1", 50000)}
    >>> str(identity.from_scope(scope))
    'spiffe://example.org/billing'
    >>> identity.from_scope({**scope, "client": ("10.1.2.3", 50000)}) is None
    True
    """

    def __init__(
        self,
        *,
        trust_domains: Collection[str] | None = None,
        use_tls_extension: bool = True,
        proxy_header: str | None = None,
        proxy_header_format: Literal["xfcc", "spiffe_id"] = "xfcc",
        trusted_proxies: Collection[str] = (),
    ) -> None:
        if trust_domains is not None:
            if isinstance(trust_domains, str):
                raise TypeError("trust_domains must be a collection of trust domains, not one str.")
            domains = frozenset(trust_domains)
            for domain in domains:
                if not isinstance(domain, str) or not _TRUST_DOMAIN.fullmatch(domain):
                    raise ValueError(
                        f"trust_domains must hold lower-case trust domain names (got {domain!r})."
                    )
            self.trust_domains: frozenset[str] | None = domains
        else:
            self.trust_domains = None
        if not isinstance(use_tls_extension, bool):
            raise TypeError(
                f"use_tls_extension must be a bool (got {type(use_tls_extension).__name__})."
            )
        self.use_tls_extension = use_tls_extension
        if proxy_header is not None and (not isinstance(proxy_header, str) or not proxy_header):
            raise TypeError(f"proxy_header must be a header name or None (got {proxy_header!r}).")
        if proxy_header_format not in ("xfcc", "spiffe_id"):
            raise ValueError(
                f"proxy_header_format must be 'xfcc' or 'spiffe_id' (got {proxy_header_format!r})."
            )
        if isinstance(trusted_proxies, str):
            raise TypeError("trusted_proxies must be a collection of addresses, not one str.")
        try:
            networks = tuple(ipaddress.ip_network(item, strict=False) for item in trusted_proxies)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"trusted_proxies must hold IP addresses or networks ({error})."
            ) from None
        if proxy_header is not None and not networks:
            raise ValueError(
                "trusted_proxies must list the proxy's addresses when proxy_header is set: "
                "without it any client could claim a workload identity by sending the header."
            )
        self.proxy_header = None if proxy_header is None else proxy_header.lower().encode()
        self.proxy_header_format = proxy_header_format
        self.trusted_proxies = networks

    def from_scope(self, scope: Mapping[str, Any]) -> SpiffeId | None:
        """The caller's SPIFFE ID, or None when the request carries none this reader trusts.

        An identity that is present but unusable (not a SPIFFE ID, another trust domain,
        several URI SANs) is treated as absent: the request is then authorized as one without
        a workload identity, never as another workload.
        """
        if self.use_tls_extension:
            found = self._from_tls(scope)
            if found is not None:
                return found
        if self.proxy_header is not None and self._from_trusted_proxy(scope):
            return self._from_header(scope)
        return None

    def from_certificate(self, certificate_pem: str | bytes) -> SpiffeId | None:
        """The SPIFFE ID in a PEM certificate's URI SAN (an X.509-SVID carries exactly one).

        >>> WorkloadIdentity().from_certificate(b"not a certificate") is None
        True
        """
        data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
        try:
            certificate = x509.load_pem_x509_certificate(data)
            names = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, x509.ExtensionNotFound):
            return None
        spiffe = [name for name in names if name.startswith("spiffe://")]
        if len(spiffe) != 1:
            return None
        return self._accept(spiffe[0])

    def _accept(self, value: str) -> SpiffeId | None:
        try:
            spiffe = parse_spiffe_id(value)
        except (TypeError, ValueError):
            return None
        if self.trust_domains is not None and spiffe.trust_domain not in self.trust_domains:
            return None
        return spiffe

    def _from_tls(self, scope: Mapping[str, Any]) -> SpiffeId | None:
        extensions = scope.get("extensions") or {}
        tls = extensions.get("tls") if isinstance(extensions, Mapping) else None
        if not isinstance(tls, Mapping) or tls.get("client_cert_error") is not None:
            return None
        chain = tls.get("client_cert_chain") or ()
        if not chain or not isinstance(chain[0], (str, bytes)):
            return None
        return self.from_certificate(chain[0])

    def _from_trusted_proxy(self, scope: Mapping[str, Any]) -> bool:
        client = scope.get("client")
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except (TypeError, ValueError):
            return False
        return any(address in network for network in self.trusted_proxies)

    def _from_header(self, scope: Mapping[str, Any]) -> SpiffeId | None:
        values = [
            value for name, value in scope.get("headers", ()) if name.lower() == self.proxy_header
        ]
        if len(values) != 1:
            return None  # absent, or sent twice: nothing to trust
        try:
            text = bytes(values[0]).decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        if self.proxy_header_format == "spiffe_id":
            return self._accept(text)
        return self._accept_xfcc(text)

    def _accept_xfcc(self, text: str) -> SpiffeId | None:
        # Envoy appends its own element last; elements before it came from farther hops.
        element = _split_outside_quotes(text, ",")[-1]
        uris = []
        for pair in _split_outside_quotes(element, ";"):
            key, _, value = pair.partition("=")
            if key.strip().lower() == "uri":
                uris.append(value.strip().strip('"'))
        if len(uris) != 1:
            return None
        return self._accept(uris[0])


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


@dataclasses.dataclass(frozen=True)
class Principal:
    """The authenticated caller: a verified token, a workload identity, or both.

    ``subject`` is the token's ``sub`` (or its ``client_id`` for a client-credentials token
    without one), or the SPIFFE ID when only the workload was authenticated.

    >>> token = VerifiedToken({"alg": "ES256"}, {"sub": "alice", "scope": "orders:read"})
    >>> principal = Principal.from_token(token, workload=parse_spiffe_id("spiffe://ex.org/web"))
    >>> principal.subject, sorted(principal.scopes), principal.workload_id
    ('alice', ['orders:read'], 'spiffe://ex.org/web')
    """

    subject: str
    token: VerifiedToken | None = None
    workload: SpiffeId | None = None

    @classmethod
    def from_token(cls, token: VerifiedToken, workload: SpiffeId | None = None) -> Principal:
        """The principal a verified token (and maybe a workload identity) stands for."""
        subject = token.subject or token.client_id or ""
        return cls(subject, token, workload)

    @classmethod
    def from_workload(cls, workload: SpiffeId) -> Principal:
        """A principal authenticated by its workload identity alone.

        >>> Principal.from_workload(parse_spiffe_id("spiffe://ex.org/job")).subject
        'spiffe://ex.org/job'
        """
        return cls(str(workload), None, workload)

    @property
    def claims(self) -> Mapping[str, Any]:
        """The token's claims (empty without a token)."""
        return self.token.claims if self.token is not None else {}

    @property
    def scopes(self) -> frozenset[str]:
        """The token's scopes (empty without a token)."""
        return self.token.scopes if self.token is not None else frozenset()

    @property
    def workload_id(self) -> str | None:
        """The SPIFFE ID as a str, or None."""
        return None if self.workload is None else str(self.workload)

    @property
    def client_id(self) -> str | None:
        """The token's ``client_id``, or None."""
        return None if self.token is None else self.token.client_id

    @property
    def token_id(self) -> str | None:
        """The token's ``jti``, or None."""
        return None if self.token is None else self.token.token_id

    @property
    def expires_at(self) -> float | None:
        """When the token expires (seconds since the epoch), or None without a token."""
        return None if self.token is None else self.token.expires_at
