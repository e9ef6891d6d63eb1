"""The encodings assembled from parts already encoded (a transaction's bytes spliced into a batch,
a block, a PRE-PREPARE, a reply) are byte for byte the generic canonical encoding of the same value."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from chain_helpers import deterministic_key
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.blocks import (
    Block,
    BlockHeader,
    ChainError,
    CommitCertificate,
    executed_block,
    results_root,
    verify_block_contents,
)
from ledger.crypto import NetworkIdentity
from ledger.encoding import digest, encode
from ledger.merkle import merkle_root
from ledger.messages import (
    Batch,
    BatchContent,
    BatchReply,
    PreparedCertificate,
    PreparedRecord,
    PrePrepare,
    PrePrepareHeader,
    Reply,
    Request,
    encode_message,
    encode_replies,
    make_replies,
    reply_leaf,
)
from ledger.transactions import (
    AMOUNT_MAX,
    KEY_LENGTH_MAX,
    Put,
    Transaction,
    TransactionResult,
    Transfer,
    sign_transaction,
)

NETWORK = NetworkIdentity("assembled-net", bytes(32))
SENDER = deterministic_key("assembled sender")

transfers = st.builds(Transfer, st.binary(min_size=32, max_size=32), st.integers(1, AMOUNT_MAX))
puts = st.builds(Put, st.text(min_size=1, max_size=KEY_LENGTH_MAX), st.text(max_size=300))
operations = transfers | puts
nonces = st.integers(0, 2**63 - 1)
results = st.builds(TransactionResult, st.booleans(), st.text(max_size=40)) | st.just(TransactionResult(True))
# Lengths either side of the CBOR head boundaries (24, 256, 65,536) matter for the assembled heads.
counts = st.sampled_from([0, 1, 23, 24, 25, 255, 256, 300])
integers = st.sampled_from([0, 1, 23, 24, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**63 - 1])


def generic(message: Any) -> bytes:
    return encode([message.TAG, *message.fields()])


def transactions(count: int, operation: Any, nonce: int) -> tuple[Transaction, ...]:
    return tuple(sign_transaction(NETWORK, SENDER, (nonce + index) % 2**63, operation) for index in range(count))


@given(nonce=nonces, operation=operations)
@settings(derandomize=True, max_examples=80)
def test_a_transaction_body_is_cut_from_its_encoding(nonce: int, operation: Any) -> None:
    transaction = sign_transaction(NETWORK, SENDER, nonce, operation)
    assert transaction.signed_bytes() == encode(transaction.body_plain())
    decoded = Transaction.decode(transaction.encoded)
    assert decoded.signed_bytes() == encode(decoded.body_plain())
    assert Transaction.from_plain(transaction.to_plain()) == transaction


@given(result=results)
@settings(derandomize=True, max_examples=40)
def test_a_result_encoding_is_the_generic_one(result: TransactionResult) -> None:
    assert result.encoded() == encode(result.to_plain())


@given(count=st.sampled_from([0, 1, 23, 24, 25]), view=integers, timestamp_ms=integers, operation=operations, sequence=integers)
@settings(derandomize=True, max_examples=30)
def test_messages_carrying_a_batch_encode_as_the_generic_encoding(
    count: int, view: int, timestamp_ms: int, operation: Any, sequence: int
) -> None:
    batch = Batch(view, 3, timestamp_ms, transactions(count, operation, view))
    assert batch.encoded == encode(batch.to_plain())
    pre_prepare = PrePrepare(view, max(1, sequence), batch, 3, bytes(range(64)))
    header = PrePrepareHeader(view, max(1, sequence), batch.digest, 3, bytes(64))
    certificate = PreparedCertificate(header, ((1, bytes(64)), (2, bytes(range(64)))))
    for message in (pre_prepare, PreparedRecord(certificate, batch), PreparedRecord(certificate, None), BatchContent(batch)):
        assert encode_message(message) == generic(message)
    for transaction in batch.transactions:
        assert encode_message(Request(transaction)) == generic(Request(transaction))


@given(count=counts, result=results, height=integers, operation=operations, signed=st.booleans())
@settings(derandomize=True, max_examples=25)
def test_a_block_encodes_as_the_generic_encoding(count: int, result: TransactionResult, height: int, operation: Any, signed: bool) -> None:
    body = transactions(count, operation, height)
    outcomes = tuple(result if index % 3 else TransactionResult(True) for index in range(count))
    header = BlockHeader(height, 1, 0, bytes(32), merkle_root([t.transaction_id for t in body]), results_root(outcomes), bytes(32), height)
    certificate = CommitCertificate(2, ((0, bytes(64)), (1, bytes(range(64))))) if signed else None
    block = Block(header, body, outcomes, certificate)
    assert block.encode() == encode(block.to_plain())
    assert results_root(outcomes) == merkle_root([digest(encode(outcome.to_plain())) for outcome in outcomes])


@given(count=st.sampled_from([1, 2, 23, 24, 25, 100]), result=results, index_base=integers, height=integers)
@settings(derandomize=True, max_examples=30)
def test_replies_encode_as_the_generic_encoding(count: int, result: TransactionResult, index_base: int, height: int) -> None:
    entries = [(digest(bytes([index % 256, index // 256])), result if index % 2 else TransactionResult(True), min(index + index_base % 9_000, 9_999)) for index in range(count)]
    for transaction_id, outcome, index in entries:
        assert reply_leaf(transaction_id, outcome, index) == encode([transaction_id, outcome.to_plain(), index])
    replies = make_replies(2, height, max(1, height), bytes(range(32)), entries, lambda data: bytes(64))
    # Two replica's replies in one call, so each batch reply's encoding is kept apart.
    others = make_replies(3, 0, 1, bytes(32), entries[:1], lambda data: bytes(range(64)))
    everything: list[Reply] = [*replies, *others]
    assert encode_replies(everything) == [generic(reply) for reply in everything]
    assert isinstance(replies[0].batch, BatchReply)


def test_a_block_checks_its_contents_against_roots_of_those_contents() -> None:
    body = transactions(5, Put("key", "value"), 7)
    outcomes = (TransactionResult(True),) * 4 + (TransactionResult(False, "insufficient funds"),)
    transactions_root, outcomes_root = merkle_root([t.transaction_id for t in body]), results_root(outcomes)
    header = BlockHeader(3, 1, 0, bytes(32), transactions_root, outcomes_root, bytes(32), 9)
    executed = executed_block(header, body, outcomes, None, transactions_root, outcomes_root)
    decoded = Block.decode(executed.encode())
    assert decoded == executed and (decoded.computed_transactions_root(), decoded.computed_results_root()) == (executed.computed_transactions_root(), executed.computed_results_root()) == (transactions_root, outcomes_root)
    verify_block_contents(executed)
    verify_block_contents(decoded)
    # Other contents under the same header: their own roots are computed, and the check fails.
    for tampered in (Block(header, body, (TransactionResult(True),) * 5, None), Block(header, body[::-1], outcomes, None)):
        with pytest.raises(ChainError):
            verify_block_contents(tampered)


def test_a_reply_with_fields_no_replica_would_send_still_encodes_as_the_generic_encoding() -> None:
    """A traitor may rewrite a reply before it is encoded: a huge index, a short id."""
    (reply,) = make_replies(1, 0, 1, bytes(32), [(bytes(32), TransactionResult(True), 0)], lambda data: bytes(64))
    for odd in (dataclasses.replace(reply, index=2**64), dataclasses.replace(reply, transaction_id=b"short", position=2**70)):
        assert encode_replies([odd]) == [generic(odd)]
    assert reply_leaf(bytes(31), TransactionResult(False, "x"), 2**64) == encode([bytes(31), [False, "x"], 2**64])


def test_a_batch_keeps_no_second_copy_of_its_encoding() -> None:
    """Batch.encoded is assembled on each use, not cached on the batch: a batch lives in the
    message log for the whole watermark window, and its transactions already hold their own
    encodings (an adversarial review measured +33% per batch with the cached copy)."""
    batch = Batch(1, 3, 1000, transactions(8, Put("k", "v"), 1))
    assert batch.encoded == encode(batch.to_plain())
    assert "encoded" not in batch.__dict__
