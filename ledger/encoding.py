"""Canonical CBOR encoding and the validators every decoder uses before trusting a value."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import cbor2

# Anything larger is refused before cbor2 sees it; frames have their own, smaller limits.
ENCODED_SIZE_MAX = 64 * 1024 * 1024
NESTING_DEPTH_MAX = 32
INTEGER_MAX = 2**63 - 1


class CodecError(ValueError):
    """Raised for any input that is not a well-formed, in-range encoding of the expected object."""


def encode(value: Any) -> bytes:
    """Deterministic CBOR (RFC 8949 canonical): the same value always gives the same bytes."""
    return cbor2.dumps(value, canonical=True)


def array_head(count: int) -> bytes:
    """The canonical CBOR head of an array of `count` items: an array is this head, then its items'
    encodings one after another, so an array of already-encoded items can be assembled without decoding them."""
    if count < 24:
        return bytes([0x80 | count])
    for marker, width in ((0x98, 1), (0x99, 2), (0x9A, 4), (0x9B, 8)):
        if count < 1 << (8 * width):
            return bytes([marker]) + count.to_bytes(width, "big")
    raise CodecError(f"array of {count} items is too long")


_SMALL_UNSIGNED = [bytes([value]) for value in range(24)]


def encode_unsigned(value: int) -> bytes:
    """encode(value) for an integer in [0, 2**64): its head alone (major type 0)."""
    if type(value) is not int or value < 0:
        # A bool or a negative number has another encoding: refuse rather than hash a wrong one.
        raise CodecError(f"encode_unsigned: expected an integer of at least 0, got {value!r}")
    if value < 24:
        return _SMALL_UNSIGNED[value]
    for marker, width in ((0x18, 1), (0x19, 2), (0x1A, 4), (0x1B, 8)):
        if value < 1 << (8 * width):
            return bytes([marker]) + value.to_bytes(width, "big")
    raise CodecError(f"integer {value} is too large")


def encode_hash(value: bytes) -> bytes:
    """encode(value) for a 32-byte string: its head 0x58 0x20, then the bytes."""
    return _HASH_HEAD + value if type(value) is bytes and len(value) == 32 else encode(value)


_HASH_HEAD = b"\x58\x20"


def encode_items(items: list[Any]) -> bytes:
    """The items' encodings one after another: encode(items) without its array head. With
    array_head, an encoding is assembled from parts some of which are already encoded."""
    return encode(items)[len(array_head(len(items))):]


def digest(data: bytes) -> bytes:
    """The one hash function of the ledger: SHA-256."""
    return hashlib.sha256(data).digest()


def _refuse_tag(decoder: Any, tag: Any) -> NoReturn:
    raise CodecError(f"CBOR tag {tag.tag} is not allowed")


class _RefuseEveryTag(Mapping[int, Any]):
    """cbor2 decodes some tags itself (bignums, shared references, dates...) unless told otherwise.

    Shared references (tags 28/29) in particular let a few hundred bytes expand into an
    exponentially large structure. Our encoding uses no tags at all, so every one is refused.
    """

    def __getitem__(self, tag: int) -> Any:
        def refuse(*arguments: Any) -> NoReturn:
            raise CodecError(f"CBOR tag {tag} is not allowed")

        return refuse

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_TAGS = _RefuseEveryTag()


def decode(data: bytes) -> Any:
    """Decode exactly one CBOR item made only of ints, byte strings, text, arrays, maps, booleans
    and null, with nothing after it.

    Any failure, whatever cbor2 raises underneath, becomes a CodecError.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("expected bytes")
    if len(data) > ENCODED_SIZE_MAX:
        raise CodecError(f"encoding of {len(data)} bytes exceeds {ENCODED_SIZE_MAX}")
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(
            stream,
            tag_hook=_refuse_tag,
            semantic_decoders=_NO_TAGS,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=NESTING_DEPTH_MAX,
        ).decode()
    except CodecError:
        raise
    except Exception as error:  # cbor2 raises several types, and RecursionError/MemoryError too
        raise CodecError(f"malformed CBOR: {error}") from None
    if stream.tell() != len(data):
        raise CodecError(f"{len(data) - stream.tell()} unexpected bytes after the CBOR item")
    _check_plain(value, 0)
    return value


# What cbor2 makes of the items we allow, by exact type: a subclass (or anything else) is refused.
_SCALAR_TYPES = frozenset({type(None), bool, int, bytes, str})
_KEY_TYPES = frozenset({int, str})


def _check_plain(value: Any, depth: int) -> None:
    """Refuse anything but the plain items `decode` allows, nested at most NESTING_DEPTH_MAX deep.
    Iterative, and a container's scalar items are checked in its own loop: every message is
    decoded through here, most of it lists of scalars."""
    scalars, keys = _SCALAR_TYPES, _KEY_TYPES
    waiting = [(value, depth)]
    while waiting:
        value, depth = waiting.pop()
        kind = type(value)
        if kind in scalars:
            if depth > NESTING_DEPTH_MAX:
                raise CodecError("nesting too deep")
            continue
        if kind is list:
            items = value
        elif kind is dict:
            if any(type(key) not in keys for key in value):
                raise CodecError("map keys must be text or integers")
            items = value.values()
        else:
            raise CodecError(f"CBOR value of type {kind.__name__} is not allowed")
        if depth >= NESTING_DEPTH_MAX and (depth > NESTING_DEPTH_MAX or items):
            raise CodecError("nesting too deep")
        for item in items:
            if type(item) not in scalars:
                waiting.append((item, depth + 1))


# Validators: each returns the value with its precise type, or raises CodecError naming the field.


def expect_int(value: Any, name: str, minimum: int = 0, maximum: int = INTEGER_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CodecError(f"{name}: expected an integer")
    if not minimum <= value <= maximum:
        raise CodecError(f"{name}: {value} is outside [{minimum}, {maximum}]")
    return value


def expect_bytes(value: Any, name: str, length: int | None = None, length_max: int = 1 << 20) -> bytes:
    if not isinstance(value, bytes):
        raise CodecError(f"{name}: expected bytes")
    if length is not None and len(value) != length:
        raise CodecError(f"{name}: expected {length} bytes, got {len(value)}")
    if len(value) > length_max:
        raise CodecError(f"{name}: {len(value)} bytes exceeds {length_max}")
    return value


def expect_text(value: Any, name: str, length_max: int = 1 << 16) -> str:
    if not isinstance(value, str):
        raise CodecError(f"{name}: expected text")
    if len(value) > length_max:
        raise CodecError(f"{name}: {len(value)} characters exceeds {length_max}")
    return value


def expect_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise CodecError(f"{name}: expected a boolean")
    return value


def expect_list(value: Any, name: str, length: int | None = None, length_max: int = 1 << 16) -> list[Any]:
    if not isinstance(value, list):
        raise CodecError(f"{name}: expected an array")
    if length is not None and len(value) != length:
        raise CodecError(f"{name}: expected {length} items, got {len(value)}")
    if len(value) > length_max:
        raise CodecError(f"{name}: {len(value)} items exceeds {length_max}")
    return value
