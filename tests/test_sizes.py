"""The worst-case size bounds of ledger/sizes.py hold for real messages, and every accepted config fits its frames."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ledger import sizes
from ledger.blocks import (
    BLOCK_TRANSACTIONS_MAX,
    REPLICAS_MAX,
    Block,
    BlockHeader,
    CommitCertificate,
)
from ledger.config import (
    ConfigError,
    ProtocolSettings,
    default_protocol,
    faults_tolerated,
    load_client_config,
    log_size_max,
    protocol_problem,
    quorum_size,
    template_for,
    write_network,
)
from ledger.encoding import INTEGER_MAX, encode
from ledger.messages import (
    BLOCKS_PER_RESPONSE_MAX,
    QUERY_NONCE_SIZE,
    REPLY_PATH_LENGTH_MAX,
    SUBSCRIBE_ACCOUNTS_MAX,
    Batch,
    BatchContent,
    Blocks,
    CheckpointCertificate,
    NewView,
    PreparedCertificate,
    PrePrepare,
    PrePrepareHeader,
    Query,
    Request,
    SnapshotChunk,
    Subscribe,
    ViewChange,
    decode_message,
    encode_message,
    make_replies,
)
from ledger.snapshots import (
    CHUNK_BYTES_MAX,
    EDGE_HASHES_MAX,
    ENTRY_BYTES_MAX,
    PAGE_PROOF_LENGTH_MAX,
    PROOF_LENGTH_MAX,
    BucketPart,
    StateChunk,
)
from ledger.transactions import (
    KEY_LENGTH_MAX,
    RESULT_REASON_LENGTH_MAX,
    VALUE_LENGTH_MAX,
    Put,
    Transaction,
    TransactionResult,
)

SIGNATURE = bytes(64)
HASH = bytes(32)
WIDE_CHARACTER = "\U0001f600"  # four bytes in UTF-8
LAST_REPLICA = REPLICAS_MAX - 1  # replica ids of 24 and above take two bytes


def largest_transaction() -> Transaction:
    operation = Put(WIDE_CHARACTER * KEY_LENGTH_MAX, WIDE_CHARACTER * VALUE_LENGTH_MAX)
    return Transaction(bytes(32), INTEGER_MAX, operation, SIGNATURE)


def largest_result() -> TransactionResult:
    return TransactionResult(False, WIDE_CHARACTER * RESULT_REASON_LENGTH_MAX)


def signatures(count: int) -> tuple[tuple[int, bytes], ...]:
    return tuple((LAST_REPLICA, SIGNATURE) for _ in range(count))


def checkpoint_certificate(replica_count: int) -> CheckpointCertificate:
    return CheckpointCertificate(INTEGER_MAX, HASH, HASH, signatures(replica_count))


def header() -> PrePrepareHeader:
    return PrePrepareHeader(INTEGER_MAX, INTEGER_MAX, HASH, LAST_REPLICA, SIGNATURE)


def view_change(replica_count: int, log_size: int, prepares: int) -> ViewChange:
    # The same certificate repeated: the size is what is measured, and it is cheap to build.
    certificate = PreparedCertificate(header(), signatures(prepares))
    return ViewChange(INTEGER_MAX, checkpoint_certificate(replica_count), (certificate,) * log_size, LAST_REPLICA, SIGNATURE)


def new_view(replica_count: int, log_size: int) -> NewView:
    faults, quorum = faults_tolerated(replica_count), quorum_size(replica_count)
    honest = view_change(replica_count, log_size, quorum - 1)
    traitor = view_change(replica_count, log_size, replica_count - 1)
    chosen = (traitor,) * faults + (honest,) * (quorum - faults)
    return NewView(INTEGER_MAX, chosen, (header(),) * log_size, LAST_REPLICA)


def largest_block(transactions: int) -> Block:
    block_header = BlockHeader(INTEGER_MAX, INTEGER_MAX, LAST_REPLICA, HASH, HASH, HASH, HASH, INTEGER_MAX)
    certificate = CommitCertificate(INTEGER_MAX, signatures(REPLICAS_MAX))
    return Block(block_header, (largest_transaction(),) * transactions, (largest_result(),) * transactions, certificate)


def batch(transactions: int) -> Batch:
    return Batch(INTEGER_MAX, LAST_REPLICA, INTEGER_MAX, (largest_transaction(),) * transactions)


def test_transaction_and_client_message_bounds_hold() -> None:
    transaction = largest_transaction()
    assert len(transaction.encoded) == sizes.transaction_size_max()
    assert len(encode_message(Request(transaction))) <= sizes.request_size_max()
    subscribe = Subscribe((bytes(32),) * SUBSCRIBE_ACCOUNTS_MAX)
    assert len(encode_message(subscribe)) <= sizes.subscribe_size_max()
    query = Query(INTEGER_MAX, WIDE_CHARACTER * 32, WIDE_CHARACTER * KEY_LENGTH_MAX, INTEGER_MAX, bytes(QUERY_NONCE_SIZE))
    assert len(encode_message(query)) <= sizes.query_size_max()
    assert sizes.client_message_size_max() <= sizes.CLIENT_FRAME_SIZE_MAX
    assert decode_message(encode_message(Request(transaction))) == Request(transaction)


@pytest.mark.parametrize("transactions", [1, 23, 24, 255, 256, 400])
def test_batch_and_block_bounds_hold(transactions: int) -> None:
    content = batch(transactions)
    assert len(encode_message(PrePrepare(INTEGER_MAX, INTEGER_MAX, content, LAST_REPLICA, SIGNATURE))) <= sizes.pre_prepare_size_max(transactions)
    assert len(encode_message(BatchContent(content))) <= sizes.batch_content_size_max(transactions)
    block = largest_block(transactions)
    assert len(block.encode()) <= sizes.block_size_max(transactions)
    assert sizes.block_size_max(transactions) - len(block.encode()) < 8  # the bound is the real worst case


@pytest.mark.parametrize("transactions", [1, 2, 3, 400, 1024, 1025, BLOCK_TRANSACTIONS_MAX])
def test_reply_bound_holds_with_the_longest_path_of_a_block(transactions: int) -> None:
    """A REPLY carries one signed batch reply and a path of ceil(log2(n)) hashes: the largest
    result, at the first leaf (the longest path), with every integer at its largest."""
    entries = [(HASH, largest_result(), BLOCK_TRANSACTIONS_MAX - 1)] * transactions
    reply = make_replies(LAST_REPLICA, INTEGER_MAX, INTEGER_MAX, HASH, entries, lambda data: SIGNATURE)[0]
    assert len(reply.path) == sizes.reply_path_length_max(transactions) <= REPLY_PATH_LENGTH_MAX
    # Positions and leaf counts are small numbers; the bound counts them at nine bytes.
    assert len(encode_message(reply)) <= sizes.reply_size_max(transactions)
    assert sizes.reply_size_max(transactions) - len(encode_message(reply)) < 40
    assert decode_message(encode_message(reply)) == reply
    assert sizes.reply_size_max(BLOCK_TRANSACTIONS_MAX) <= 64 * 1024


def test_blocks_response_bound_holds() -> None:
    replica_count = 64
    frame_size_max = ProtocolSettings().frame_size_max
    one_large = Blocks((largest_block(400),), checkpoint_certificate(replica_count))
    bound = sizes.blocks_size_max(replica_count, 400, frame_size_max)
    assert len(encode_message(one_large)) <= bound
    # Small blocks up to the budget: as many as the runtime gathers.
    small = largest_block(1)
    count = min(BLOCKS_PER_RESPONSE_MAX, sizes.blocks_response_budget(frame_size_max) // len(small.encode()))
    assert len(encode_message(Blocks((small,) * count, checkpoint_certificate(replica_count)))) <= bound


def largest_snapshot_chunk(replica_count: int, entry_count: int) -> tuple[SnapshotChunk, int]:
    """A SNAPSHOT-CHUNK of `entry_count` of the largest value entries (as many as 1 MiB holds at
    most, or one), the longest proof, the largest part of a bucket and a full certificate; and
    its entries' encoded bytes."""
    entry = ("value", WIDE_CHARACTER * KEY_LENGTH_MAX, WIDE_CHARACTER * VALUE_LENGTH_MAX)
    entry_size = len(encode(list(entry)))
    assert entry_size == ENTRY_BYTES_MAX
    entry_count = min(entry_count, max(1, CHUNK_BYTES_MAX // entry_size))
    part = BucketPart(2**63 - 2, 2**63 - 1, (HASH,) * EDGE_HASHES_MAX, (HASH,) * PAGE_PROOF_LENGTH_MAX)
    chunk = StateChunk(65535, 65535, (entry,) * entry_count, (HASH,) * PROOF_LENGTH_MAX, part)
    return SnapshotChunk(checkpoint_certificate(replica_count), chunk), entry_count * entry_size


@pytest.mark.parametrize("entry_count", [0, 1, 23, 24, 255, 10_000])
def test_snapshot_chunk_bound_holds(entry_count: int) -> None:
    for replica_count in (4, REPLICAS_MAX):
        message, entry_bytes = largest_snapshot_chunk(replica_count, entry_count)
        size = len(encode_message(message))
        assert size <= sizes.snapshot_chunk_size_max(replica_count, entry_bytes, len(message.chunk.entries))
        assert size <= sizes.snapshot_chunk_size_max(replica_count)
    # The largest chunk's message fits the default frame, the largest entry alone fits the
    # smallest frame; a frame's budget leaves room for the rest.
    frame_size_max = ProtocolSettings().frame_size_max
    assert sizes.snapshot_chunk_size_max(REPLICAS_MAX) <= frame_size_max
    assert sizes.snapshot_chunk_size_max(REPLICAS_MAX, ENTRY_BYTES_MAX, 1) <= 64 * 1024
    for frame in (64 * 1024, frame_size_max):
        budget = sizes.snapshot_chunk_bytes_budget(REPLICAS_MAX, frame)
        assert 0 < budget and sizes.snapshot_chunk_size_max(REPLICAS_MAX, budget, 1 << 16) <= frame


def view_change_cases() -> list[tuple[int, int]]:
    """(n, log size) for every n the config accepts: its default log, and the largest it allows."""
    cases = []
    for replica_count in range(4, REPLICAS_MAX + 1):
        settings = default_protocol(replica_count)
        cases.append((replica_count, sizes.log_size(settings.window_size, settings.checkpoint_interval)))
        cases.append((replica_count, log_size_max(replica_count, settings.frame_size_max)))
    return cases


def test_every_accepted_network_size_fits_its_view_change_messages() -> None:
    for replica_count, log_size in view_change_cases():
        frame_size_max = ProtocolSettings().frame_size_max
        quorum = quorum_size(replica_count)
        encoded_view_change = len(encode_message(view_change(replica_count, log_size, quorum - 1)))
        bound = sizes.view_change_size_max(replica_count, quorum, log_size)
        assert encoded_view_change <= bound, (replica_count, log_size)
        encoded_new_view = len(encode_message(new_view(replica_count, log_size)))
        new_view_bound = sizes.new_view_size_max(replica_count, faults_tolerated(replica_count), quorum, log_size)
        assert encoded_new_view <= new_view_bound, (replica_count, log_size)
        assert new_view_bound - encoded_new_view < 64, (replica_count, log_size)  # and is close to it
        assert encoded_new_view <= frame_size_max, (replica_count, log_size)


def test_default_settings_are_accepted_for_every_network_size() -> None:
    for replica_count in range(4, REPLICAS_MAX + 1):
        settings = default_protocol(replica_count)
        assert protocol_problem(replica_count, settings) is None, replica_count
    assert default_protocol(4) == ProtocolSettings()
    assert default_protocol(64).window_size < ProtocolSettings().window_size


def test_largest_allowed_window_is_accepted_and_one_more_is_refused() -> None:
    for replica_count in (4, 7, 45, 46, 63, 64):
        largest = log_size_max(replica_count, ProtocolSettings().frame_size_max)
        fitting = ProtocolSettings(window_size=largest, checkpoint_interval=largest // 2)
        assert protocol_problem(replica_count, fitting) is None
        if largest < 4096:
            refused = replace(fitting, window_size=largest + 1)
            problem = protocol_problem(replica_count, refused)
            assert problem is not None and f"window_size to at most {largest}" in problem


def test_new_view_too_large_for_the_frame_is_refused_with_guidance(tmp_path: Path) -> None:
    """Regression: a 64-replica network with a full 128-sequence log was accepted, and its NEW-VIEW
    (about 21 MB) was dropped as an oversized frame, so no view change could complete."""
    write_network(template_for(64), tmp_path / "net")
    config_path = tmp_path / "net" / "client.toml"
    text = config_path.read_text()
    settings = load_client_config(config_path).network.protocol
    text = text.replace(f"window_size = {settings.window_size}", "window_size = 128")
    text = text.replace(f"checkpoint_interval = {settings.checkpoint_interval}", "checkpoint_interval = 64")
    config_path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_client_config(config_path)
    message = str(raised.value)
    assert "\n" not in message
    assert "NEW-VIEW" in message and "window_size to at most 51" in message


def test_default_batch_of_largest_transactions_fits_and_too_large_a_batch_is_refused() -> None:
    """Regression: 500 transactions of the largest valid size (the old default) make a 9.3 MB block,
    over the 8 MiB frame: such a PRE-PREPARE or Blocks response would be dropped."""
    assert protocol_problem(4, ProtocolSettings()) is None
    problem = protocol_problem(4, ProtocolSettings(batch_size_max=500))
    assert problem is not None and "batch_size_max to at most 451" in problem


def test_log_beyond_what_a_view_change_may_carry_is_refused() -> None:
    problem = protocol_problem(4, ProtocolSettings(window_size=10_000, frame_size_max=64 * 1024 * 1024))
    assert problem is not None and "4096" in problem
