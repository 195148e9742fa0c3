"""Field encryption: AES-256-GCM envelope encryption bound to a record and a field.

Each value gets a data key of its own (32 random bytes). The value is encrypted with the data
key; the data key is encrypted ("wrapped") with the current key-encryption key (KEK) of a
``KeyRing``. Both encryptions are AES-256-GCM (``cryptography``'s ``AESGCM``), and both
authenticate the same *context*: the format header, the record id and the field name. A
ciphertext copied into another row or another column therefore fails to decrypt, and so does
one whose bytes were changed.

Rotating the KEK (``KeyRing.rotate``) makes new values use the new key while old values still
decrypt with the key named in their header; ``FieldEncryptor.rewrap`` moves an old value to the
current key by re-wrapping its data key only (the value's own ciphertext is not touched).

Wire format, version 1 (all integers big-endian)::

    offset  size  field
    0       4     magic b"BTFE"
    4       1     format version, 0x01
    5       1     n = length of the KEK id in bytes (1..255)
    6       n     KEK id, UTF-8
    6+n     12    nonce of the key wrap
    18+n    48    wrapped data key: AES-256-GCM(KEK, wrap nonce, data key, wrap AAD): 32 + 16 tag
    66+n    12    nonce of the value
    78+n    ...   AES-256-GCM(data key, value nonce, value, value AAD): len + 16

    context           = b"buttress-field-v1"
                        + u32 len(record id) + record id (UTF-8)
                        + u32 len(field) + field (UTF-8)
    wrap AAD          = bytes [0, 6+n) (magic, version, KEK id length, KEK id) + context
    value AAD         = bytes [0, 5) (magic, version) + context

The value's AAD leaves the KEK id out so that re-wrapping replaces only the header and the
wrapped data key: the data key is bound to the KEK id, record and field by the wrap, and the
value to its data key, record and field by its own tag.

The text form (``encrypt_text``/``decrypt`` of a str) is ``"btfe1:"`` followed by the
unpadded base64url of those bytes, for text columns.

Nonces are random (96 bits). With one KEK, wrap at most about 2**32 values (NIST SP 800-38D's
bound for random nonces) before rotating; every value's data key is fresh, so the value
nonces never repeat under one key.

>>> ring = KeyRing.generate("2024-06")
>>> fields = FieldEncryptor(ring)
>>> secret = fields.encrypt(b"4111 1111 1111 1111", record_id="customer-7", field="card")
>>> fields.decrypt(secret, record_id="customer-7", field="card")
b'4111 1111 1111 1111'
>>> fields.decrypt(secret, record_id="customer-8", field="card")
Traceback (most recent call last):
...
buttress.errors.FieldDecryptionError: The encrypted value failed authentication: ...
"""

from __future__ import annotations

import base64
import os
import secrets
import struct
import threading
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from buttress.errors import FieldDecryptionError

__all__ = ["FORMAT_VERSION", "FieldEncryptor", "KeyRing"]

#: The wire format version this module writes.
FORMAT_VERSION = 1
_MAGIC = b"BTFE"
_TEXT_PREFIX = "btfe1:"
_CONTEXT_LABEL = b"buttress-field-v1"
_NONCE = 12
_KEY = 32
_TAG = 16
_WRAPPED = _KEY + _TAG


def _check_key_id(key_id: object, argument: str = "key_id") -> str:
    if not isinstance(key_id, str):
        raise TypeError(f"{argument} must be a str (got {type(key_id).__name__}).")
    if not 1 <= len(key_id.encode("utf-8")) <= 255:
        raise ValueError(f"{argument} must be 1 to 255 bytes of UTF-8 (got {key_id!r}).")
    return key_id


def _check_key(key: object, key_id: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(
            f"The key {key_id!r} must be bytes (got {type(key).__name__}); use "
            "KeyRing.new_key() to make one."
        )
    if len(key) != _KEY:
        raise ValueError(f"The key {key_id!r} must be 32 bytes for AES-256 (got {len(key)} bytes).")
    return bytes(key)


class KeyRing:
    """Key-encryption keys by id, one of them current.

    New values are wrapped with the current key; any key in the ring unwraps the values that
    name it. Keep retired keys in the ring until every value wrapped with them was re-wrapped
    (``FieldEncryptor.rewrap``), then ``remove`` them. Load keys from your secret store (KMS,
    Vault); the ring only holds them in memory.

    >>> ring = KeyRing({"k1": KeyRing.new_key()}, current="k1")
    >>> new_id = ring.rotate("k2")
    >>> ring.current_id, sorted(ring.key_ids)
    ('k2', ['k1', 'k2'])
    """

    def __init__(self, keys: Mapping[str, bytes], *, current: str) -> None:
        if not isinstance(keys, Mapping):
            raise TypeError(
                f"keys must be a mapping of key id to 32-byte key (got {type(keys).__name__})."
            )
        checked = {
            _check_key_id(key_id, "keys"): _check_key(key, key_id) for key_id, key in keys.items()
        }
        _check_key_id(current, "current")
        if current not in checked:
            raise ValueError(f"current must be one of the ring's key ids (got {current!r}).")
        # Replaced whole on every change, so readers never need the lock.
        self._keys = checked
        self._current = current
        self._lock = threading.Lock()

    @staticmethod
    def new_key() -> bytes:
        """A fresh random 256-bit key.

        >>> len(KeyRing.new_key())
        32
        """
        return AESGCM.generate_key(bit_length=256)

    @classmethod
    def generate(cls, key_id: str) -> KeyRing:
        """A ring with one fresh key, current.

        >>> KeyRing.generate("k1").current_id
        'k1'
        """
        return cls({key_id: cls.new_key()}, current=key_id)

    @property
    def current_id(self) -> str:
        """The id of the key new values are wrapped with."""
        return self._current

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of every key in the ring."""
        return frozenset(self._keys)

    def add(self, key_id: str, key: bytes, *, make_current: bool = False) -> None:
        """Adds a key (a new one, or an old one still needed to decrypt old values).

        >>> ring = KeyRing.generate("k1")
        >>> ring.add("k0", KeyRing.new_key())
        >>> ring.current_id
        'k1'
        """
        _check_key_id(key_id)
        material = _check_key(key, key_id)
        with self._lock:
            existing = self._keys.get(key_id)
            if existing is not None and not secrets.compare_digest(existing, material):
                raise ValueError(
                    f"key_id {key_id!r} is already in the ring with another key; key ids name "
                    "one key forever, so pick a new id."
                )
            self._keys = {**self._keys, key_id: material}
            if make_current:
                self._current = key_id

    def rotate(self, key_id: str) -> str:
        """Adds a fresh key under ``key_id`` and makes it current; returns ``key_id``.

        >>> KeyRing.generate("k1").rotate("k2")
        'k2'
        """
        self.add(key_id, self.new_key(), make_current=True)
        return key_id

    def remove(self, key_id: str) -> None:
        """Removes a retired key; values still wrapped with it can no longer be decrypted.

        >>> ring = KeyRing.generate("k1")
        >>> ring.remove("k1")
        Traceback (most recent call last):
        ...
        ValueError: key_id 'k1' is the current key; rotate to another key before removing it.
        """
        with self._lock:
            if key_id == self._current:
                raise ValueError(
                    f"key_id {key_id!r} is the current key; rotate to another key before "
                    "removing it."
                )
            if key_id not in self._keys:
                raise KeyError(f"key_id {key_id!r} is not in the ring.")
            self._keys = {name: key for name, key in self._keys.items() if name != key_id}

    def _get(self, key_id: str) -> bytes | None:
        return self._keys.get(key_id)

    def _current_key(self) -> tuple[str, bytes]:
        # Under the lock: a rotation (and a removal of the key it retired) between reading the
        # current id and the keys would leave the id without its key.
        with self._lock:
            return self._current, self._keys[self._current]

    def __repr__(self) -> str:
        # Never the key material.
        return f"KeyRing(key_ids={sorted(self._keys)!r}, current={self._current!r})"


def _context(prefix: bytes, record_id: str, field: str) -> bytes:
    record = record_id.encode("utf-8")
    name = field.encode("utf-8")
    return b"".join(
        (
            prefix,
            _CONTEXT_LABEL,
            struct.pack(">I", len(record)),
            record,
            struct.pack(">I", len(name)),
            name,
        )
    )


def _check_place(record_id: object, field: object) -> tuple[str, str]:
    if not isinstance(record_id, str):
        raise TypeError(
            f"record_id must be a str (got {type(record_id).__name__}); pass str(id) for "
            "numeric ids."
        )
    if not isinstance(field, str) or not field:
        raise TypeError(f"field must be a non-empty str (got {field!r}).")
    return record_id, field


class _Parsed:
    __slots__ = ("header", "key_id", "value_nonce", "value_sealed", "wrap_nonce", "wrapped")

    def __init__(self, data: bytes) -> None:
        if len(data) < 6 or data[:4] != _MAGIC:
            raise FieldDecryptionError(
                "malformed", "The value is not a buttress encrypted field (wrong magic bytes)."
            )
        if data[4] != FORMAT_VERSION:
            raise FieldDecryptionError(
                "unsupported_version",
                f"The value uses encrypted field format version {data[4]}; this version of "
                f"buttress reads version {FORMAT_VERSION}. Upgrade buttress to read it.",
            )
        size = data[5]
        end = 6 + size
        if size == 0 or len(data) < end + _NONCE + _WRAPPED + _NONCE + _TAG:
            raise FieldDecryptionError("malformed", "The encrypted value is truncated.")
        try:
            self.key_id = data[6:end].decode("utf-8")
        except UnicodeDecodeError:
            raise FieldDecryptionError(
                "malformed", "The encrypted value's key id is not UTF-8."
            ) from None
        self.header = data[:end]
        self.wrap_nonce = data[end : end + _NONCE]
        self.wrapped = data[end + _NONCE : end + _NONCE + _WRAPPED]
        rest = end + _NONCE + _WRAPPED
        self.value_nonce = data[rest : rest + _NONCE]
        self.value_sealed = data[rest + _NONCE :]


def _as_bytes(ciphertext: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(ciphertext, str):
        if not ciphertext.startswith(_TEXT_PREFIX):
            raise FieldDecryptionError(
                "malformed",
                f"The value is not a buttress encrypted field (text form starts with "
                f"{_TEXT_PREFIX!r}).",
            )
        encoded = ciphertext[len(_TEXT_PREFIX) :]
        try:
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            raise FieldDecryptionError(
                "malformed", "The encrypted value's text form is not base64url."
            ) from None
    if isinstance(ciphertext, (bytes, bytearray, memoryview)):
        return bytes(ciphertext)
    raise TypeError(
        f"ciphertext must be bytes or the str text form (got {type(ciphertext).__name__})."
    )


class FieldEncryptor:
    """Encrypts and decrypts field values with a ``KeyRing`` (format in the module docstring).

    >>> fields = FieldEncryptor(KeyRing.generate("k1"))
    >>> token = fields.encrypt_text("alice@example.com", record_id="42", field="email")
    >>> token.startswith("btfe1:")
    True
    >>> fields.decrypt_text(token, record_id="42", field="email")
    'alice@example.com'
    """

    def __init__(self, keyring: KeyRing) -> None:
        if not isinstance(keyring, KeyRing):
            raise TypeError(f"keyring must be a KeyRing (got {type(keyring).__name__}).")
        self.keyring = keyring

    def encrypt(
        self, plaintext: bytes | bytearray | memoryview | str, *, record_id: str, field: str
    ) -> bytes:
        """``plaintext`` (a str is encoded as UTF-8) encrypted for ``record_id``'s ``field``."""
        record_id, field = _check_place(record_id, field)
        if isinstance(plaintext, str):
            value = plaintext.encode("utf-8")
        elif isinstance(plaintext, (bytes, bytearray, memoryview)):
            value = bytes(plaintext)
        else:
            raise TypeError(f"plaintext must be bytes or str (got {type(plaintext).__name__}).")
        key_id, kek = self.keyring._current_key()
        encoded_id = key_id.encode("utf-8")
        header = _MAGIC + bytes((FORMAT_VERSION, len(encoded_id))) + encoded_id
        data_key = AESGCM.generate_key(bit_length=256)
        wrap_nonce = os.urandom(_NONCE)
        wrapped = AESGCM(kek).encrypt(wrap_nonce, data_key, _context(header, record_id, field))
        value_nonce = os.urandom(_NONCE)
        sealed = AESGCM(data_key).encrypt(value_nonce, value, _value_context(record_id, field))
        return b"".join((header, wrap_nonce, wrapped, value_nonce, sealed))

    def encrypt_text(
        self, plaintext: bytes | bytearray | memoryview | str, *, record_id: str, field: str
    ) -> str:
        """``encrypt``, in the ``btfe1:`` base64url text form for text columns."""
        data = self.encrypt(plaintext, record_id=record_id, field=field)
        return _TEXT_PREFIX + base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    def decrypt(
        self, ciphertext: bytes | bytearray | memoryview | str, *, record_id: str, field: str
    ) -> bytes:
        """The plaintext of ``ciphertext`` (bytes or the text form), which must have been made
        for ``record_id``'s ``field``; ``FieldDecryptionError`` otherwise."""
        record_id, field = _check_place(record_id, field)
        parsed = _Parsed(_as_bytes(ciphertext))
        data_key = self._unwrap(parsed, record_id, field)
        return _open_value(parsed, data_key, record_id, field)

    def decrypt_text(
        self, ciphertext: bytes | bytearray | memoryview | str, *, record_id: str, field: str
    ) -> str:
        """``decrypt``, decoded as UTF-8."""
        return self.decrypt(ciphertext, record_id=record_id, field=field).decode("utf-8")

    def key_id_of(self, ciphertext: bytes | bytearray | memoryview | str) -> str:
        """The id of the KEK that wrapped ``ciphertext``'s data key.

        >>> fields = FieldEncryptor(KeyRing.generate("k1"))
        >>> fields.key_id_of(fields.encrypt(b"x", record_id="1", field="f"))
        'k1'
        """
        return _Parsed(_as_bytes(ciphertext)).key_id

    def needs_rewrap(self, ciphertext: bytes | bytearray | memoryview | str) -> bool:
        """Whether ``ciphertext`` is wrapped with another key than the current one."""
        return self.key_id_of(ciphertext) != self.keyring.current_id

    def rewrap(
        self, ciphertext: bytes | bytearray | memoryview | str, *, record_id: str, field: str
    ) -> bytes:
        """``ciphertext`` with its data key re-wrapped under the current KEK (unchanged when it
        already is). The value's own ciphertext is kept; it is checked first, so only a value
        that belongs to ``record_id``'s ``field`` is re-wrapped. Returns bytes; use
        ``rewrap_text`` for the text form.

        >>> ring = KeyRing.generate("k1")
        >>> fields = FieldEncryptor(ring)
        >>> old = fields.encrypt(b"secret", record_id="1", field="f")
        >>> _ = ring.rotate("k2")
        >>> new = fields.rewrap(old, record_id="1", field="f")
        >>> fields.key_id_of(new), fields.decrypt(new, record_id="1", field="f")
        ('k2', b'secret')
        """
        record_id, field = _check_place(record_id, field)
        data = _as_bytes(ciphertext)
        parsed = _Parsed(data)
        data_key = self._unwrap(parsed, record_id, field)
        # Prove the value belongs here before vouching for it under the new key.
        _open_value(parsed, data_key, record_id, field)
        key_id, kek = self.keyring._current_key()
        if key_id == parsed.key_id:
            return data
        encoded_id = key_id.encode("utf-8")
        header = _MAGIC + bytes((FORMAT_VERSION, len(encoded_id))) + encoded_id
        wrap_nonce = os.urandom(_NONCE)
        wrapped = AESGCM(kek).encrypt(wrap_nonce, data_key, _context(header, record_id, field))
        return b"".join((header, wrap_nonce, wrapped, parsed.value_nonce, parsed.value_sealed))

    def rewrap_text(
        self, ciphertext: bytes | bytearray | memoryview | str, *, record_id: str, field: str
    ) -> str:
        """``rewrap``, in the text form."""
        data = self.rewrap(ciphertext, record_id=record_id, field=field)
        return _TEXT_PREFIX + base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    def _unwrap(self, parsed: _Parsed, record_id: str, field: str) -> bytes:
        kek = self.keyring._get(parsed.key_id)
        if kek is None:
            raise FieldDecryptionError(
                "unknown_key",
                f"The value was encrypted with key {parsed.key_id!r}, which is not in the "
                "keyring. Add that key to the KeyRing (keep retired keys until every value is "
                "re-wrapped).",
            )
        try:
            return AESGCM(kek).decrypt(
                parsed.wrap_nonce, parsed.wrapped, _context(parsed.header, record_id, field)
            )
        except InvalidTag:
            raise _failed(record_id, field) from None


def _value_context(record_id: str, field: str) -> bytes:
    return _context(_MAGIC + bytes((FORMAT_VERSION,)), record_id, field)


def _open_value(parsed: _Parsed, data_key: bytes, record_id: str, field: str) -> bytes:
    try:
        return AESGCM(data_key).decrypt(
            parsed.value_nonce, parsed.value_sealed, _value_context(record_id, field)
        )
    except InvalidTag:
        raise _failed(record_id, field) from None


def _failed(record_id: str, field: str) -> FieldDecryptionError:
    return FieldDecryptionError(
        "authentication_failed",
        "The encrypted value failed authentication: it was made for another record or field, "
        f"or it was altered. It belongs to another place than record {record_id!r}, field "
        f"{field!r}.",
    )
