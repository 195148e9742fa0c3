"""Client secrets, stored hashed with scrypt and compared in constant time.

scrypt comes with Python's ``hashlib`` (OpenSSL), so storing secrets safely needs no extra
package. A hash is a self-describing string, ``scrypt$<n>$<r>$<p>$<salt>$<digest>`` (salt and
digest base64url), so the cost can be raised later without breaking stored hashes.

>>> stored = hash_client_secret("s3cret-value")
>>> verify_client_secret("s3cret-value", stored), verify_client_secret("guess", stored)
(True, False)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading

__all__ = ["VerifiedSecrets", "hash_client_secret", "verify_client_secret"]

# OWASP's scrypt floor (2^17 with r=8) costs ~0.3 s per check on a small machine; every token
# request of a confidential client pays it, so the default is 2^14 (16 MiB, tens of ms), which
# is still far beyond what makes guessing a random client secret feasible.
_N = 2**14
_R = 8
_P = 1
_DIGEST_BYTES = 32
_SALT_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=256 * n * r + 1024 * 1024,
        dklen=_DIGEST_BYTES,
    )


def hash_client_secret(secret: str) -> str:
    """Hashes a client secret for storage (scrypt with a random salt).

    >>> hash_client_secret("s3cret-value").startswith("scrypt$")
    True
    """
    if not isinstance(secret, str):
        raise TypeError(f"secret must be a str (got {type(secret).__name__}).")
    if not secret:
        raise ValueError("secret must not be empty; give a confidential client a real secret.")
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(secret, salt, _N, _R, _P)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_client_secret(secret: str, stored_hash: str) -> bool:
    """True when ``secret`` matches ``stored_hash``; the digests are compared in constant time.

    A stored hash that is not in the ``scrypt$...`` format raises ``ValueError``: that is a
    damaged record, not a wrong secret.

    >>> verify_client_secret("x", hash_client_secret("y"))
    False
    """
    parts = stored_hash.split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("wrong shape")
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = _unb64(parts[4]), _unb64(parts[5])
    except ValueError as error:
        raise ValueError(
            "The stored client secret hash is not in the 'scrypt$n$r$p$salt$digest' format; "
            "the client record is damaged. Register the client again with its secret."
        ) from error
    try:
        actual = _scrypt(secret, salt, n, r, p)
    except UnicodeEncodeError:
        # A secret that is not valid text cannot match; refusing it takes no special path.
        actual = b""
    return hmac.compare_digest(actual, expected)


class VerifiedSecrets:
    """The secrets that passed a scrypt check, remembered so that the next request with the same
    secret costs an HMAC instead of a scrypt (tens of milliseconds, every token request of a
    confidential client).

    Only a secret that verified is remembered, so every guess still pays a scrypt. What is kept
    is an HMAC-SHA256, under a key made at random for this process, of the stored hash and the
    secret: never the secret, and worth nothing without this process's memory. A client
    registered again has a new stored hash, so its old secret is forgotten with it. At most
    ``max_entries`` are kept, the oldest dropped first.

    >>> stored = hash_client_secret("s3cret-value")
    >>> secrets = VerifiedSecrets()
    >>> secrets.verify("s3cret-value", stored), secrets.verify("s3cret-value", stored)
    (True, True)
    >>> secrets.verify("guess", stored)
    False
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int):
            raise TypeError(f"max_entries must be an int (got {type(max_entries).__name__}).")
        if max_entries < 1:
            raise ValueError(f"max_entries must be 1 or more (got {max_entries}).")
        self.max_entries = max_entries
        self._key = os.urandom(32)
        # stored hash -> tag of the secret that verified against it. Dicts keep insertion
        # order, so the first key is the oldest.
        self._known: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def verify(self, secret: str, stored_hash: str) -> bool:
        """``verify_client_secret``, answered from memory for a secret that verified before."""
        try:
            tag = hmac.new(
                self._key,
                stored_hash.encode("utf-8") + b"\0" + secret.encode("utf-8"),
                hashlib.sha256,
            ).digest()
        except UnicodeEncodeError:
            return False  # not valid text: it cannot match (verify_client_secret agrees)
        known = self._known.get(stored_hash)
        if known is not None and hmac.compare_digest(known, tag):
            return True
        if not verify_client_secret(secret, stored_hash):
            return False
        with self._lock:
            self._known.pop(stored_hash, None)
            while len(self._known) >= self.max_entries:
                del self._known[next(iter(self._known))]
            self._known[stored_hash] = tag
        return True
