"""Worst-case encoded sizes of the large messages, so a configuration can be checked to fit its frames.

Every function returns an upper bound, in bytes, of the canonical CBOR encoding of a message whose
every field takes its largest valid value: integers 9 bytes, replica ids 2, text 4 bytes per
character (UTF-8), lists as long as the decoder and the protocol rules allow. The bounds are
tested against real messages built at those extremes (tests/test_sizes.py).
"""

from __future__ import annotations

from ledger.blocks import HASH_SIZE, REPLICAS_MAX
from ledger.crypto import PUBLIC_KEY_SIZE, SIGNATURE_SIZE
from ledger.messages import (
    BLOCKS_PER_RESPONSE_MAX,
    QUERY_KIND_LENGTH_MAX,
    QUERY_NONCE_SIZE,
    SUBSCRIBE_ACCOUNTS_MAX,
)
from ledger.snapshots import (
    CHUNK_BYTES_MAX,
    CHUNK_ENTRIES_MAX,
    EDGE_HASHES_MAX,
    PAGE_PROOF_LENGTH_MAX,
    PROOF_LENGTH_MAX,
)
from ledger.state_tree import BUCKET_COUNT
from ledger.transactions import KEY_LENGTH_MAX, RESULT_REASON_LENGTH_MAX, VALUE_LENGTH_MAX

UTF8_BYTES_PER_CHARACTER_MAX = 4
INTEGER_SIZE_MAX = 9  # a CBOR integer up to 2**64 - 1: one head byte and eight bytes
# Frames from clients carry requests, subscriptions and queries: the largest is a Subscribe of
# SUBSCRIBE_ACCOUNTS_MAX accounts (client_message_size_max() = 34,830 bytes); a Request with the
# largest valid transaction (17,529 bytes) is 17,538. 64 KiB covers both, with room for changes to Query.
CLIENT_FRAME_SIZE_MAX = 64 * 1024


def head_size(value: int) -> int:
    """The CBOR head of an unsigned integer, or of a length."""
    if value < 24:
        return 1
    if value < 1 << 8:
        return 2
    if value < 1 << 16:
        return 3
    if value < 1 << 32:
        return 5
    return 9


def bytes_size(length: int) -> int:
    return head_size(length) + length


def text_size(characters: int) -> int:
    return bytes_size(characters * UTF8_BYTES_PER_CHARACTER_MAX)


def tag_size(tag: str) -> int:
    return bytes_size(len(tag.encode()))


def message_size(tag: str, field_count: int, fields_size: int) -> int:
    """A message is the array [tag, *fields]."""
    return head_size(field_count + 1) + tag_size(tag) + fields_size


REPLICA_ID_SIZE = head_size(REPLICAS_MAX - 1)
HASH_ENCODED_SIZE = bytes_size(HASH_SIZE)
SIGNATURE_ENCODED_SIZE = bytes_size(SIGNATURE_SIZE)
SIGNATURE_ENTRY_SIZE = head_size(2) + REPLICA_ID_SIZE + SIGNATURE_ENCODED_SIZE  # [replica, signature]


def signature_list_size(count: int) -> int:
    return head_size(count) + count * SIGNATURE_ENTRY_SIZE


def transaction_size_max() -> int:
    """[sender, nonce, operation, signature]; a put of the longest key and value is the largest operation."""
    put = head_size(3) + tag_size("put") + text_size(KEY_LENGTH_MAX) + text_size(VALUE_LENGTH_MAX)
    transfer = head_size(3) + tag_size("transfer") + bytes_size(PUBLIC_KEY_SIZE) + INTEGER_SIZE_MAX
    return head_size(4) + bytes_size(PUBLIC_KEY_SIZE) + INTEGER_SIZE_MAX + max(put, transfer) + SIGNATURE_ENCODED_SIZE


def result_size_max() -> int:
    return head_size(2) + 1 + text_size(RESULT_REASON_LENGTH_MAX)


def batch_size_max(transactions: int) -> int:
    """[view, proposer, timestamp, [transactions]]."""
    return head_size(4) + 2 * INTEGER_SIZE_MAX + REPLICA_ID_SIZE + head_size(transactions) + transactions * transaction_size_max()


def pre_prepare_size_max(transactions: int) -> int:
    fields = 2 * INTEGER_SIZE_MAX + batch_size_max(transactions) + REPLICA_ID_SIZE + SIGNATURE_ENCODED_SIZE
    return message_size("pre-prepare", 5, fields)


def batch_content_size_max(transactions: int) -> int:
    return message_size("batch", 1, batch_size_max(transactions))


def block_size_max(transactions: int) -> int:
    """[header, [transactions], [results], certificate]; a stored certificate may list up to
    REPLICAS_MAX signatures (the decoder's limit), the header has eight fields."""
    header = head_size(8) + 3 * INTEGER_SIZE_MAX + REPLICA_ID_SIZE + 4 * HASH_ENCODED_SIZE
    certificate = head_size(2) + INTEGER_SIZE_MAX + signature_list_size(REPLICAS_MAX)
    body = head_size(transactions) + transactions * transaction_size_max()
    results = head_size(transactions) + transactions * result_size_max()
    return head_size(4) + header + body + results + certificate


def checkpoint_certificate_fields_size_max(replica_count: int) -> int:
    """[sequence, state digest, block hash, [signatures]]: at most one signature per replica."""
    return head_size(4) + INTEGER_SIZE_MAX + 2 * HASH_ENCODED_SIZE + signature_list_size(replica_count)


def blocks_response_budget(frame_size_max: int) -> int:
    """How many bytes of blocks a Blocks response gathers; the first block is sent whatever its size."""
    return frame_size_max // 2


def blocks_size_max(replica_count: int, transactions: int, frame_size_max: int) -> int:
    """A Blocks response: blocks up to the budget (or one block beyond it) and a checkpoint certificate."""
    blocks = max(blocks_response_budget(frame_size_max), block_size_max(transactions))
    fields = head_size(BLOCKS_PER_RESPONSE_MAX) + blocks + checkpoint_certificate_fields_size_max(replica_count)
    return message_size("blocks", 2, fields)


def prepared_certificate_size_max(prepares: int) -> int:
    """[pre-prepare header, [prepares]]; the header is [view, sequence, digest, replica, signature]."""
    return head_size(2) + pre_prepare_header_size_max() + signature_list_size(prepares)


def pre_prepare_header_size_max() -> int:
    return head_size(5) + 2 * INTEGER_SIZE_MAX + HASH_ENCODED_SIZE + REPLICA_ID_SIZE + SIGNATURE_ENCODED_SIZE


def view_change_fields_size_max(replica_count: int, log_size: int, prepares: int) -> int:
    """The five fields of a VIEW-CHANGE (without their array head) carrying `log_size` prepared
    certificates of `prepares` signatures each: the core accepts at most one certificate per
    sequence in (checkpoint, checkpoint + log_size]."""
    return (
        INTEGER_SIZE_MAX
        + checkpoint_certificate_fields_size_max(replica_count)
        + head_size(log_size)
        + log_size * prepared_certificate_size_max(prepares)
        + REPLICA_ID_SIZE
        + SIGNATURE_ENCODED_SIZE
    )


def view_change_size_max(replica_count: int, quorum: int, log_size: int) -> int:
    """An honest replica's VIEW-CHANGE: its certificates carry exactly quorum - 1 prepares."""
    return message_size("view-change", 5, view_change_fields_size_max(replica_count, log_size, quorum - 1))


def new_view_size_max(replica_count: int, faults: int, quorum: int, log_size: int) -> int:
    """An honest primary's NEW-VIEW: a quorum of valid VIEW-CHANGEs and up to log_size pre-prepare headers.

    At most f of those VIEW-CHANGEs come from traitors, whose certificates may carry a prepare
    from every replica but the primary (n - 1); the honest ones carry quorum - 1.
    """
    count = quorum
    traitors = min(faults, count)
    honest = view_change_fields_size_max(replica_count, log_size, count - 1)
    traitor = view_change_fields_size_max(replica_count, log_size, replica_count - 1)
    view_changes = head_size(count) + count * head_size(5) + (count - traitors) * honest + traitors * traitor
    headers = head_size(log_size) + log_size * pre_prepare_header_size_max()
    return message_size("new-view", 4, INTEGER_SIZE_MAX + view_changes + headers + REPLICA_ID_SIZE)


def request_size_max() -> int:
    return message_size("request", 1, transaction_size_max())


def subscribe_size_max() -> int:
    return message_size("subscribe", 1, head_size(SUBSCRIBE_ACCOUNTS_MAX) + SUBSCRIBE_ACCOUNTS_MAX * bytes_size(PUBLIC_KEY_SIZE))


def query_size_max() -> int:
    """A query whose argument is the longest valid key (the largest argument any query kind reads)."""
    # id, kind, argument, min_height, nonce
    return message_size(
        "query",
        5,
        2 * INTEGER_SIZE_MAX + text_size(QUERY_KIND_LENGTH_MAX) + text_size(KEY_LENGTH_MAX) + bytes_size(QUERY_NONCE_SIZE),
    )


def reply_path_length_max(transactions: int) -> int:
    """The hashes on a REPLY's Merkle path in a block of that many outcomes: ceil(log2(n))."""
    return (max(transactions, 1) - 1).bit_length()


def reply_size_max(transactions: int) -> int:
    """A REPLY from a block of `transactions` outcomes: [batch reply, transaction id, result,
    index, position, path]; the batch reply is [replica, view, height, block hash, root, leaf
    count, signature]. With BLOCK_TRANSACTIONS_MAX (14 hashes on the path) it is 1,738 bytes,
    far below the smallest frame a network may configure (64 KiB)."""
    batch_reply = head_size(7) + REPLICA_ID_SIZE + 4 * INTEGER_SIZE_MAX + 2 * HASH_ENCODED_SIZE + SIGNATURE_ENCODED_SIZE
    path_length = reply_path_length_max(transactions)
    path = head_size(path_length) + path_length * HASH_ENCODED_SIZE
    return message_size("reply", 6, batch_reply + HASH_ENCODED_SIZE + result_size_max() + 2 * INTEGER_SIZE_MAX + path)


def client_message_size_max() -> int:
    """The largest valid message a client sends: CLIENT_FRAME_SIZE_MAX must hold it."""
    return max(request_size_max(), subscribe_size_max(), query_size_max())


def log_size(window_size: int, checkpoint_interval: int) -> int:
    """L in the paper, as node/core.py computes it: how far above the stable checkpoint sequences go."""
    return max(window_size, 2 * checkpoint_interval)


def state_chunk_size_max(entry_bytes: int, entries: int) -> int:
    """[first bucket, last bucket, [entries], [proof], part] with `entries` entries of
    `entry_bytes` encoded bytes in all, the longest proof and the largest part of a bucket
    ([first entry, entry count, [edge hashes], [page proof]])."""
    part = (
        head_size(4) + 2 * INTEGER_SIZE_MAX + head_size(EDGE_HASHES_MAX) + EDGE_HASHES_MAX * HASH_ENCODED_SIZE
        + head_size(PAGE_PROOF_LENGTH_MAX) + PAGE_PROOF_LENGTH_MAX * HASH_ENCODED_SIZE
    )
    return (
        head_size(5) + 2 * head_size(BUCKET_COUNT - 1) + head_size(entries) + entry_bytes
        + head_size(PROOF_LENGTH_MAX) + PROOF_LENGTH_MAX * HASH_ENCODED_SIZE + part
    )


def snapshot_chunk_size_max(
    replica_count: int, entry_bytes: int = CHUNK_BYTES_MAX, entries: int = CHUNK_ENTRIES_MAX
) -> int:
    """A SNAPSHOT-CHUNK: the checkpoint certificate and a chunk (by default the largest a decoder
    accepts: 1 MiB of entries, a part's hashes and the longest proofs)."""
    fields = checkpoint_certificate_fields_size_max(replica_count) + state_chunk_size_max(entry_bytes, entries)
    return message_size("snapshot-chunk", 2, fields)


def snapshot_chunk_bytes_budget(replica_count: int, frame_size_max: int) -> int:
    """The entry bytes a served chunk may hold so that its SNAPSHOT-CHUNK fits the frame:
    CHUNK_BYTES_MAX (1 MiB), less in a smaller frame. A single entry over this is sent alone
    (at most ENTRY_BYTES_MAX, 17,421 bytes, which the smallest frame allowed holds with the rest)."""
    overhead = snapshot_chunk_size_max(replica_count, 0, CHUNK_ENTRIES_MAX)
    return max(0, min(CHUNK_BYTES_MAX, frame_size_max - overhead))
