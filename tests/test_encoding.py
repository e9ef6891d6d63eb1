"""Property tests of the canonical CBOR codec and of every decoder built on it."""

from __future__ import annotations

from typing import Any

import pytest
from chain_helpers import build_chain, make_network, make_transactions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.application import AccountsApplication
from ledger.blocks import Block
from ledger.encoding import (
    ENCODED_SIZE_MAX,
    NESTING_DEPTH_MAX,
    CodecError,
    _check_plain,
    decode,
    encode,
    expect_bytes,
    expect_int,
    expect_list,
    expect_text,
)
from ledger.messages import (
    MESSAGE_TYPES,
    Batch,
    BatchReply,
    Blocks,
    CheckpointCertificate,
    Commit,
    FetchBlocks,
    FetchSnapshot,
    Hello,
    HelloProof,
    Prepare,
    PrePrepare,
    Query,
    QueryReply,
    Reply,
    Request,
    SnapshotChunk,
    Status,
    StatusQuery,
    StatusReply,
    Subscribe,
    decode_message,
    encode_message,
)
from ledger.snapshots import BucketPart, StateChunk, chunk_starting_at
from ledger.transactions import Transaction, TransactionResult

CBOR_INTEGER_MIN = -(2**64)
CBOR_INTEGER_MAX = 2**64 - 1

scalars = (
    st.none()
    | st.booleans()
    | st.integers(CBOR_INTEGER_MIN, CBOR_INTEGER_MAX)
    | st.binary(max_size=40)
    | st.text(max_size=20)
)
map_keys = st.integers(CBOR_INTEGER_MIN, CBOR_INTEGER_MAX) | st.text(max_size=10)
plain_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(map_keys, children, max_size=5),
    max_leaves=25,
)

NETWORK = make_network("encoding-net")
CHAIN = build_chain(NETWORK, 2, transactions_per_block=3)
TRANSACTIONS = make_transactions(NETWORK, 0, 3)
HASH = bytes(range(32))
SIGNATURE = bytes(range(64))
NONCE = bytes(range(16))

SAMPLE_MESSAGES: list[Any] = [
    PrePrepare(view=2, sequence=7, batch=Batch(2, 2, 1234, tuple(TRANSACTIONS)), replica_id=2, signature=SIGNATURE),
    Prepare(view=1, sequence=3, digest=HASH, replica_id=1, signature=SIGNATURE),
    Commit(view=1, sequence=3, digest=HASH, replica_id=3, signature=SIGNATURE),
    Status(replica_id=0, view=4, height=99),
    FetchBlocks(from_height=5, count=10),
    FetchSnapshot(sequence=100, first_bucket=65535),
    FetchSnapshot(sequence=100, first_bucket=65535, first_entry=40),
    SnapshotChunk(
        CheckpointCertificate(100, HASH, HASH, ((0, SIGNATURE), (2, SIGNATURE))),
        chunk_starting_at(AccountsApplication.from_entries([(HASH, 5, 1)], [("key", "value")]), 0, entries_max=1, bytes_max=1),
    ),
    SnapshotChunk(  # a part of a bucket too large for one chunk
        CheckpointCertificate(100, HASH, HASH, ((0, SIGNATURE),)),
        StateChunk(7, 7, (("value", "key", "value"),), (HASH,) * 16, BucketPart(40, 70, (HASH,) * 8, (HASH,) * 2)),
    ),
    SnapshotChunk(CheckpointCertificate(100, HASH, HASH, ((0, SIGNATURE),)), None),
    Blocks(blocks=tuple(CHAIN)),
    Hello(network_id="encoding-net", replica_id=1, challenge=HASH, genesis_hash=HASH, protocol=(400, 5, 64, 2**62)),
    HelloProof(signature=SIGNATURE),
    Request(transaction=TRANSACTIONS[0]),
    Subscribe(accounts=(NETWORK.client_key.public_key, HASH)),
    Reply(
        batch=BatchReply(replica_id=1, view=0, height=4, block_hash=HASH, replies_root=HASH, leaf_count=3, signature=SIGNATURE),
        transaction_id=HASH,
        result=TransactionResult(False, "bad nonce"),
        index=2,
        position=1,
        path=(HASH, HASH),
    ),
    Query(query_id=9, kind="account", argument=NETWORK.client_key.public_key, min_height=0, nonce=NONCE),
    Query(query_id=10, kind="get", argument="key-1", min_height=7, nonce=NONCE),
    QueryReply(query_id=9, query_digest=HASH, replica_id=2, height=4, result=[10, 1], error="", signature=SIGNATURE),
    StatusQuery(query_id=11),
    StatusReply(
        query_id=11,
        replica_id=3,
        view=1,
        primary=1,
        height=20,
        last_block_hash=HASH,
        stable_checkpoint=16,
        view_changing=False,
        evidence_count=2,
        version="0.1.0",
        uptime_s=3600,
        connected_peers=3,
        store_size_bytes=1 << 20,
        base_height=9,
    ),
    StatusReply(11, 0, 1, 1, 20, HASH, 16, True, ((2, 2), (3, 5))),
]
SAMPLE_ENCODINGS = [encode_message(message) for message in SAMPLE_MESSAGES]
BLOCK_ENCODING = CHAIN[0].encode()
TRANSACTION_ENCODING = TRANSACTIONS[1].encoded

DECODERS = {
    "decode": decode,
    "decode_message": decode_message,
    "Block.decode": Block.decode,
    "Transaction.decode": Transaction.decode,
}


def decodes_or_refuses(decoder: Any, data: bytes) -> None:
    """The only failure a decoder may show for bad input is CodecError."""
    try:
        decoder(data)
    except CodecError:
        pass


# ---- encoding ----


@given(plain_values)
@settings(derandomize=True)
def test_encoding_round_trips(value: Any) -> None:
    assert decode(encode(value)) == value


@given(plain_values)
@settings(derandomize=True)
def test_encoding_is_deterministic_byte_for_byte(value: Any) -> None:
    encoded = encode(value)
    assert encode(value) == encoded
    assert encode(decode(encoded)) == encoded


@given(st.dictionaries(map_keys, scalars, min_size=2, max_size=8))
@settings(derandomize=True)
def test_map_encoding_ignores_insertion_order(mapping: dict[Any, Any]) -> None:
    reversed_mapping = dict(reversed(list(mapping.items())))
    assert encode(reversed_mapping) == encode(mapping)


@given(plain_values)
@settings(derandomize=True)
def test_every_strict_prefix_of_an_encoding_is_refused(value: Any) -> None:
    encoded = encode(value)
    for length in range(len(encoded)):
        with pytest.raises(CodecError):
            decode(encoded[:length])


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("half-precision float", bytes.fromhex("f93c00")),
        ("double float", bytes.fromhex("fb3ff0000000000000")),
        ("undefined", bytes.fromhex("f7")),
        ("simple value", bytes.fromhex("e0")),
        ("unknown tag", bytes.fromhex("d86400")),
        ("datetime tag", bytes.fromhex("c11a00000000")),
        ("set tag", bytes.fromhex("d9010283010203")),
        ("indefinite array", bytes.fromhex("9f0102ff")),
        ("indefinite text", bytes.fromhex("7f6161ff")),
        ("duplicate map key", bytes.fromhex("a201010102")),
        ("array as map key", bytes.fromhex("a182010201")),
        ("bytes as map key", bytes.fromhex("a1416101")),
        ("invalid utf-8 text", bytes.fromhex("62c328")),
        ("break outside indefinite item", bytes.fromhex("ff")),
        ("reserved additional information", bytes.fromhex("1c")),
        ("empty input", b""),
    ],
)
def test_disallowed_or_malformed_cbor_is_refused(name: str, data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


def test_decode_refuses_what_is_not_bytes() -> None:
    with pytest.raises(CodecError):
        decode("a0")  # type: ignore[arg-type]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    encoded = encode([1, b"two", "three"])
    assert decode(bytearray(encoded)) == [1, b"two", "three"]
    assert decode(memoryview(encoded)) == [1, b"two", "three"]


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(CodecError, match="exceeds"):
        decode(bytes(ENCODED_SIZE_MAX + 1))


def test_nesting_beyond_the_limit_is_refused() -> None:
    nested: Any = 0
    for _ in range(NESTING_DEPTH_MAX + 2):
        nested = [nested]
    with pytest.raises(CodecError):
        decode(encode(nested))
    shallow: Any = 0
    for _ in range(NESTING_DEPTH_MAX - 1):
        shallow = [shallow]
    assert decode(encode(shallow)) == shallow


def test_plain_check_keeps_its_depth_limit_and_types_after_it_became_iterative() -> None:
    """The checker behind every decode (made iterative for speed): a value at depth
    NESTING_DEPTH_MAX passes, one deeper is refused, inside lists and maps alike, and a float or
    a non-text, non-integer map key is refused at any depth."""

    def nested(depth: int, container: str, leaf: Any) -> Any:
        value = leaf
        for _ in range(depth):
            value = [value] if container == "list" else {"k": value}
        return value

    for container in ("list", "map"):
        _check_plain(nested(NESTING_DEPTH_MAX, container, 0), 0)
        _check_plain(nested(NESTING_DEPTH_MAX, container, []), 0)
        with pytest.raises(CodecError, match="nesting"):
            _check_plain(nested(NESTING_DEPTH_MAX + 1, container, 0), 0)
        with pytest.raises(CodecError, match="nesting"):
            _check_plain(nested(NESTING_DEPTH_MAX + 1, container, {}), 0)
        with pytest.raises(CodecError, match="float"):
            _check_plain(nested(5, container, [1, b"x", 1.5]), 0)
    for key in (b"bytes", True, None):
        with pytest.raises(CodecError, match="map keys"):
            _check_plain([{"fine": 1}, {key: 1}], 0)


@given(plain_values, st.binary(min_size=1, max_size=8))
@settings(derandomize=True, max_examples=20)
def test_trailing_bytes_after_the_item_are_refused(value: Any, extra: bytes) -> None:
    with pytest.raises(CodecError):
        decode(encode(value) + extra)


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("c249010000000000000000"),  # tag 2: positive bignum 2**64
        bytes.fromhex("c3420101"),  # tag 3: negative bignum -258
        bytes.fromhex("d81c00"),  # tag 28: shareable 0
    ],
    ids=["bignum", "negative-bignum", "shareable"],
)
def test_built_in_semantic_tags_are_refused(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


def shared_reference_bomb(levels: int) -> bytes:
    """CBOR where each level is a two-item array holding the next level twice, by shared reference.

    It is 6 bytes per level, but decodes to a DAG whose tree walk visits 2**levels nodes.
    """
    data = bytes.fromhex("d81c820000")
    for index in range(levels - 2, -1, -1):
        reference = index + 1
        reference_bytes = bytes([reference]) if reference < 24 else bytes([0x18, reference])
        data = bytes.fromhex("d81c82") + data + bytes.fromhex("d81d") + reference_bytes
    return data


def test_shared_references_are_refused() -> None:
    # Twelve levels (72 bytes) make only 4096 nodes: quick to run, while still showing the bug.
    with pytest.raises(CodecError):
        decode(shared_reference_bomb(12))


# ---- validators ----


def test_validators_check_type_and_range() -> None:
    assert expect_int(5, "count", 1, 10) == 5
    for bad in (True, "5", 5.0, None):
        with pytest.raises(CodecError, match="count"):
            expect_int(bad, "count")
    with pytest.raises(CodecError, match="count: 11 is outside"):
        expect_int(11, "count", 1, 10)
    with pytest.raises(CodecError, match="outside"):
        expect_int(-1, "count")
    with pytest.raises(CodecError, match="digest: expected 32 bytes"):
        expect_bytes(b"x" * 31, "digest", 32)
    with pytest.raises(CodecError, match="exceeds"):
        expect_bytes(b"x" * 11, "blob", length_max=10)
    with pytest.raises(CodecError, match="name: expected text"):
        expect_text(b"text", "name")
    with pytest.raises(CodecError, match="items: expected 2 items"):
        expect_list([1], "items", length=2)


# ---- queries: the new fields are validated, and the digest covers the whole question ----

GOOD_QUERY_FIELDS: list[Any] = [3, "get", "x", 5, NONCE]
GOOD_QUERY_REPLY_FIELDS: list[Any] = [3, HASH, 1, 5, "value", "", SIGNATURE]


@pytest.mark.parametrize(
    ("position", "value"),
    [
        (3, -1),  # min height below 0
        (3, "5"),
        (3, True),
        (3, 2**64),
        (4, bytes(15)),  # nonce of the wrong size
        (4, bytes(17)),
        (4, "nonce"),
        (4, None),
    ],
)
def test_query_with_malformed_min_height_or_nonce_is_refused(position: int, value: Any) -> None:
    fields = list(GOOD_QUERY_FIELDS)
    fields[position] = value
    with pytest.raises(CodecError):
        decode_message(encode(["query", *fields]))


def test_query_missing_the_new_fields_is_refused() -> None:
    with pytest.raises(CodecError):
        decode_message(encode(["query", 3, "get", "x"]))
    with pytest.raises(CodecError):
        decode_message(encode(["query", 3, "get", "x", 5]))


GOOD_STATUS_REPLY_FIELDS = SAMPLE_MESSAGES[[type(message) for message in SAMPLE_MESSAGES].index(StatusReply)].fields()


def test_status_reply_of_the_old_ten_field_layout_or_longer_is_refused() -> None:
    assert len(GOOD_STATUS_REPLY_FIELDS) == 15
    with pytest.raises(CodecError):
        decode_message(encode(["status-reply", *GOOD_STATUS_REPLY_FIELDS[:10]]))
    with pytest.raises(CodecError):
        decode_message(encode(["status-reply", *GOOD_STATUS_REPLY_FIELDS, 0]))


@pytest.mark.parametrize(
    ("position", "value"),
    [
        pytest.param(10, "v" * 65, id="version-too-long"),
        pytest.param(10, "0.1\x1b[2J", id="version-with-a-terminal-escape"),
        pytest.param(10, "0.1\n0.2", id="version-with-a-line-break"),
        pytest.param(10, "0.1.0é", id="version-not-ascii"),
        pytest.param(10, 1, id="version-not-text"),
        pytest.param(11, -1, id="negative-uptime"),
        pytest.param(11, "1", id="uptime-not-a-number"),
        pytest.param(12, 64, id="more-peers-than-replicas"),
        pytest.param(12, True, id="peers-a-boolean"),
        pytest.param(13, -1, id="negative-store-size"),
        pytest.param(14, -1, id="negative-base-height"),
        pytest.param(14, "9", id="base-height-not-a-number"),
    ],
)
def test_status_reply_with_malformed_new_fields_is_refused(position: int, value: Any) -> None:
    fields = list(GOOD_STATUS_REPLY_FIELDS)
    fields[position] = value
    with pytest.raises(CodecError):
        decode_message(encode(["status-reply", *fields]))


@pytest.mark.parametrize("digest", [bytes(31), bytes(33), "digest", None, 7])
def test_query_reply_with_malformed_query_digest_is_refused(digest: Any) -> None:
    fields = list(GOOD_QUERY_REPLY_FIELDS)
    fields[1] = digest
    with pytest.raises(CodecError):
        decode_message(encode(["query-reply", *fields]))
    with pytest.raises(CodecError):
        decode_message(encode(["query-reply", *fields[:1], *fields[2:]]))  # the old layout, without a digest


def test_query_digest_covers_every_field_of_the_question() -> None:
    query = Query(3, "get", "x", 5, NONCE)
    assert decode_message(encode_message(query)).digest == query.digest
    others = [
        Query(4, "get", "x", 5, NONCE),
        Query(3, "account", "x", 5, NONCE),
        Query(3, "get", "y", 5, NONCE),
        Query(3, "get", "x", 6, NONCE),
        Query(3, "get", "x", 5, bytes(16)),
    ]
    assert len({query.digest, *(other.digest for other in others)}) == 1 + len(others)


# ---- every decoder, fed random, truncated and mutated input ----


@pytest.mark.parametrize("decoder_name", sorted(DECODERS))
@given(data=st.binary(max_size=200))
@settings(derandomize=True, max_examples=150)
def test_random_bytes_only_raise_codec_error(decoder_name: str, data: bytes) -> None:
    decodes_or_refuses(DECODERS[decoder_name], data)


@pytest.mark.parametrize("decoder_name", sorted(DECODERS))
@given(value=plain_values)
@settings(derandomize=True, max_examples=100)
def test_random_plain_values_only_raise_codec_error(decoder_name: str, value: Any) -> None:
    decodes_or_refuses(DECODERS[decoder_name], encode(value))


@pytest.mark.parametrize("tag", sorted(MESSAGE_TYPES))
@given(fields=st.lists(plain_values, max_size=9))
@settings(derandomize=True, max_examples=25)
def test_every_message_tag_with_random_fields_only_raises_codec_error(tag: str, fields: list[Any]) -> None:
    decodes_or_refuses(decode_message, encode([tag, *fields]))


def all_valid_encodings() -> list[tuple[Any, bytes]]:
    return [
        *[(decode_message, encoding) for encoding in SAMPLE_ENCODINGS],
        (Block.decode, BLOCK_ENCODING),
        (Transaction.decode, TRANSACTION_ENCODING),
    ]


@given(st.data())
@settings(derandomize=True, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_truncated_valid_encodings_raise_codec_error(data: st.DataObject) -> None:
    decoder, encoding = data.draw(st.sampled_from(all_valid_encodings()))
    length = data.draw(st.integers(0, len(encoding) - 1))
    with pytest.raises(CodecError):
        decoder(encoding[:length])


@given(st.data())
@settings(derandomize=True, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_valid_encodings_with_flipped_bytes_only_raise_codec_error(data: st.DataObject) -> None:
    decoder, encoding = data.draw(st.sampled_from(all_valid_encodings()))
    mutated = bytearray(encoding)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    decodes_or_refuses(decoder, bytes(mutated))


def replace_somewhere(plain: Any, data: st.DataObject) -> Any:
    """Replace one randomly chosen element, at any depth, with a random plain value."""
    if isinstance(plain, list) and plain and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(plain) - 1))
        copy = list(plain)
        copy[index] = replace_somewhere(plain[index], data)
        return copy
    return data.draw(plain_values)


@given(st.data())
@settings(derandomize=True, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_structurally_mutated_encodings_only_raise_codec_error(data: st.DataObject) -> None:
    decoder, encoding = data.draw(st.sampled_from(all_valid_encodings()))
    decodes_or_refuses(decoder, encode(replace_somewhere(decode(encoding), data)))


# ---- round trips of the ledger's own objects ----


@pytest.mark.parametrize("message", SAMPLE_MESSAGES, ids=lambda message: message.TAG)
def test_messages_round_trip_byte_for_byte(message: Any) -> None:
    encoded = encode_message(message)
    decoded = decode_message(encoded)
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode_message(decoded) == encoded


def test_unknown_or_missing_message_tag_is_refused() -> None:
    for plain in ([], ["no-such-message", 1], [7, 1], {"tag": "status"}, "status"):
        with pytest.raises(CodecError):
            decode_message(encode(plain))


def test_blocks_round_trip_byte_for_byte() -> None:
    for block in CHAIN:
        decoded = Block.decode(block.encode())
        assert decoded == block
        assert decoded.block_hash == block.block_hash
        assert decoded.encode() == block.encode()


def test_transactions_round_trip_byte_for_byte() -> None:
    for transaction in TRANSACTIONS:
        decoded = Transaction.decode(transaction.encoded)
        assert decoded == transaction
        assert decoded.encoded == transaction.encoded
        assert decoded.transaction_id == transaction.transaction_id


def test_frames_before_an_oversized_one_are_still_delivered() -> None:
    from ledger.framing import FrameDecoder, FrameError, frame

    decoder = FrameDecoder(frame_size_max=64 * 1024)
    data = frame(b"first") + frame(b"second") + (10**9).to_bytes(4, "big") + b"xx"
    assert decoder.feed(data) == [b"first", b"second"]
    with pytest.raises(FrameError):
        decoder.feed(b"")
    assert FrameDecoder().feed(frame(b"a")[:3]) == []
