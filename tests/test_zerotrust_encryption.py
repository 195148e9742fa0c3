"""Field encryption: round trips, key rotation and re-wrapping, and ciphertexts moved between
rows or fields, altered, or made under a key the ring no longer has, all refused."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest
from buttress.errors import ButtressError, FieldDecryptionError
from buttress.security import FieldEncryptor, KeyRing
from hypothesis import given
from hypothesis import strategies as st

RING = KeyRing.generate("k1")
FIELDS = FieldEncryptor(RING)


@given(
    value=st.binary(max_size=512),
    record_id=st.text(max_size=40),
    field=st.text(min_size=1, max_size=20),
)
def test_round_trip(value: bytes, record_id: str, field: str) -> None:
    sealed = FIELDS.encrypt(value, record_id=record_id, field=field)
    assert FIELDS.decrypt(sealed, record_id=record_id, field=field) == value
    text = FIELDS.encrypt_text(value, record_id=record_id, field=field)
    assert text.startswith("btfe1:")
    assert FIELDS.decrypt(text, record_id=record_id, field=field) == value


def test_text_values_and_fresh_data_keys() -> None:
    first = FIELDS.encrypt("même chose", record_id="1", field="note")
    second = FIELDS.encrypt("même chose", record_id="1", field="note")
    assert first != second  # a data key and nonces of its own each time
    assert FIELDS.decrypt_text(first, record_id="1", field="note") == "même chose"
    assert b"chose" not in first


def test_the_wire_format_is_as_documented() -> None:
    sealed = FIELDS.encrypt(b"abc", record_id="1", field="f")
    assert sealed[:4] == b"BTFE"
    assert sealed[4] == 1
    assert sealed[5] == 2
    assert sealed[6:8] == b"k1"
    assert len(sealed) == 8 + 12 + 48 + 12 + 3 + 16


@pytest.mark.parametrize(
    ("record_id", "field"),
    [("customer-8", "card"), ("customer-7", "iban"), ("customer-7 ", "card"), ("", "card")],
)
def test_a_value_moved_to_another_row_or_field_is_refused(record_id: str, field: str) -> None:
    sealed = FIELDS.encrypt(b"4111 1111 1111 1111", record_id="customer-7", field="card")
    with pytest.raises(FieldDecryptionError) as caught:
        FIELDS.decrypt(sealed, record_id=record_id, field=field)
    assert caught.value.reason == "authentication_failed"
    assert "another record or field" in str(caught.value)
    assert isinstance(caught.value, ButtressError)


def test_swapping_two_rows_values_is_refused() -> None:
    """A database attacker swaps the encrypted salaries of two rows."""
    rows = {
        rid: FIELDS.encrypt(salary, record_id=rid, field="salary")
        for rid, salary in (("alice", b"100"), ("bob", b"999"))
    }
    rows["alice"], rows["bob"] = rows["bob"], rows["alice"]
    for rid, value in rows.items():
        with pytest.raises(FieldDecryptionError, match="authentication"):
            FIELDS.decrypt(value, record_id=rid, field="salary")


def test_record_and_field_boundaries_are_unambiguous() -> None:
    sealed = FIELDS.encrypt(b"x", record_id="ab", field="c")
    with pytest.raises(FieldDecryptionError):
        FIELDS.decrypt(sealed, record_id="a", field="bc")


@given(data=st.data())
def test_any_altered_byte_is_refused(data: st.DataObject) -> None:
    sealed = bytearray(FIELDS.encrypt(b"top secret", record_id="1", field="f"))
    index = data.draw(st.integers(0, len(sealed) - 1))
    sealed[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(FieldDecryptionError):
        FIELDS.decrypt(bytes(sealed), record_id="1", field="f")


def test_rotation_new_values_use_the_new_key_old_ones_still_decrypt() -> None:
    ring = KeyRing.generate("2024")
    fields = FieldEncryptor(ring)
    old = fields.encrypt(b"old", record_id="1", field="f")
    ring.rotate("2025")
    new = fields.encrypt(b"new", record_id="2", field="f")
    assert fields.key_id_of(old) == "2024"
    assert fields.key_id_of(new) == "2025"
    assert fields.needs_rewrap(old)
    assert not fields.needs_rewrap(new)
    assert fields.decrypt(old, record_id="1", field="f") == b"old"
    assert fields.decrypt(new, record_id="2", field="f") == b"new"


def test_rewrap_moves_a_value_to_the_current_key_and_keeps_its_ciphertext() -> None:
    ring = KeyRing.generate("2024")
    fields = FieldEncryptor(ring)
    old = fields.encrypt(b"payload", record_id="1", field="f")
    ring.rotate("2025")
    rewrapped = fields.rewrap(old, record_id="1", field="f")
    assert fields.key_id_of(rewrapped) == "2025"
    assert rewrapped[-(12 + 7 + 16) :] == old[-(12 + 7 + 16) :]  # the value itself untouched
    ring.remove("2024")
    assert fields.decrypt(rewrapped, record_id="1", field="f") == b"payload"
    with pytest.raises(FieldDecryptionError) as caught:
        fields.decrypt(old, record_id="1", field="f")
    assert caught.value.reason == "unknown_key"
    assert "'2024'" in str(caught.value)
    # Re-wrapping a current value changes nothing; text form too.
    assert fields.rewrap(rewrapped, record_id="1", field="f") == rewrapped
    text = fields.rewrap_text(rewrapped, record_id="1", field="f")
    assert fields.decrypt(text, record_id="1", field="f") == b"payload"


def test_rewrap_refuses_a_value_from_another_place() -> None:
    ring = KeyRing.generate("a")
    fields = FieldEncryptor(ring)
    sealed = fields.encrypt(b"x", record_id="1", field="f")
    ring.rotate("b")
    with pytest.raises(FieldDecryptionError, match="authentication"):
        fields.rewrap(sealed, record_id="2", field="f")


def test_a_value_whose_key_id_is_swapped_is_refused() -> None:
    """Rewriting the header to name another key in the ring does not get past the wrap."""
    ring = KeyRing.generate("k1")
    ring.add("k2", KeyRing.new_key())
    fields = FieldEncryptor(ring)
    sealed = bytearray(fields.encrypt(b"x", record_id="1", field="f"))
    sealed[6:8] = b"k2"
    with pytest.raises(FieldDecryptionError, match="authentication"):
        fields.decrypt(bytes(sealed), record_id="1", field="f")


@pytest.mark.parametrize(
    ("ciphertext", "reason"),
    [
        (b"", "malformed"),
        (b"BTFE", "malformed"),
        (b"XXXX\x01\x02k1" + bytes(100), "malformed"),
        (b"BTFE\x02\x02k1" + bytes(100), "unsupported_version"),
        (b"BTFE\x01\x00" + bytes(100), "malformed"),
        (b"BTFE\x01\x02k1" + bytes(10), "malformed"),
        (b"BTFE\x01\x02\xff\xfe" + bytes(100), "malformed"),
        (b"BTFE\x01\x02k9" + bytes(100), "unknown_key"),
        ("plain text", "malformed"),
        ("btfe1:%%%", "malformed"),
    ],
)
def test_garbage_is_refused_with_a_reason(ciphertext: Any, reason: str) -> None:
    with pytest.raises(FieldDecryptionError) as caught:
        FIELDS.decrypt(ciphertext, record_id="1", field="f")
    assert caught.value.reason == reason
    assert str(caught.value).endswith(".")


def test_keyring_rules() -> None:
    ring = KeyRing({"a": KeyRing.new_key()}, current="a")
    key = KeyRing.new_key()
    ring.add("b", key)
    ring.add("b", key)  # the same key again is fine
    with pytest.raises(ValueError, match="already in the ring with another key"):
        ring.add("b", KeyRing.new_key())
    with pytest.raises(ValueError, match="current key"):
        ring.remove("a")
    with pytest.raises(KeyError):
        ring.remove("zzz")
    assert "a" in repr(ring)
    assert key.hex() not in repr(ring)


@pytest.mark.parametrize(
    ("build_it", "error", "argument"),
    [
        (lambda: KeyRing([], current="a"), TypeError, "keys"),
        (lambda: KeyRing({"a": b"short"}, current="a"), ValueError, "32 bytes"),
        (lambda: KeyRing({"a": "x" * 32}, current="a"), TypeError, "must be bytes"),
        (lambda: KeyRing({"a": bytes(32)}, current="b"), ValueError, "current"),
        (lambda: KeyRing({"": bytes(32)}, current=""), ValueError, "keys"),
        (lambda: KeyRing({"x" * 256: bytes(32)}, current="x"), ValueError, "keys"),
        (lambda: FieldEncryptor("key"), TypeError, "keyring"),
        (lambda: FIELDS.encrypt(1, record_id="1", field="f"), TypeError, "plaintext"),
        (lambda: FIELDS.encrypt(b"x", record_id=1, field="f"), TypeError, "record_id"),
        (lambda: FIELDS.encrypt(b"x", record_id="1", field=""), TypeError, "field"),
        (lambda: FIELDS.decrypt(1, record_id="1", field="f"), TypeError, "ciphertext"),
    ],
)
def test_bad_input_names_the_argument(build_it: Any, error: type[Exception], argument: str) -> None:
    with pytest.raises(error) as caught:
        build_it()
    assert argument in str(caught.value)
    assert str(caught.value).endswith(".")


def test_text_form_is_base64url_of_the_bytes() -> None:
    text = FIELDS.encrypt_text(b"x", record_id="1", field="f")
    raw = text.removeprefix("btfe1:")
    data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    assert data[:4] == b"BTFE"
    assert struct.unpack(">B", data[4:5]) == (1,)
