"""A PRE-PREPARE's transactions decoded before from a REQUEST are reused only on an exact match:
with KnownTransactions a message decodes to what it decodes to without it, or fails the same way."""

from __future__ import annotations

import pytest
from chain_helpers import deterministic_key, make_network, make_transactions

from ledger.encoding import CodecError, encode
from ledger.messages import Batch, PrePrepare, decode_message, encode_message
from ledger.transactions import KnownTransactions, Transfer, sign_transaction

NETWORK = make_network("known-net")
TRANSACTIONS = make_transactions(NETWORK, 0, 3)


def pre_prepare_bytes(batch_plain: list[object]) -> bytes:
    return encode(["pre-prepare", 0, 1, batch_plain, 0, bytes(64)])


def test_a_known_transaction_is_reused_and_the_message_is_the_same() -> None:
    known = KnownTransactions()
    for transaction in TRANSACTIONS:
        known.add(transaction)
    data = encode_message(PrePrepare(0, 1, Batch(0, 0, 5, tuple(TRANSACTIONS)), 0, bytes(64)))
    reused = decode_message(data, known)
    assert reused == decode_message(data)
    assert all(a is b for a, b in zip(reused.batch.transactions, TRANSACTIONS, strict=True))


def test_a_different_transaction_under_a_known_signature_is_decoded_on_its_own() -> None:
    """A forged REQUEST (or PRE-PREPARE) reusing someone's signature with another operation."""
    known = KnownTransactions()
    genuine = TRANSACTIONS[0]
    known.add(genuine)
    forged_plain = genuine.to_plain()
    forged_plain[2] = ["put", "other key", "other value"]
    decoded = decode_message(pre_prepare_bytes([0, 0, 5, [forged_plain]]), known)
    [transaction] = decoded.batch.transactions
    assert transaction is not genuine
    assert transaction.operation.to_plain() == ["put", "other key", "other value"]
    assert transaction.transaction_id != genuine.transaction_id


@pytest.mark.parametrize("amount", [True, 1.0])
def test_a_value_equal_but_of_another_type_is_refused_as_without_the_memo(amount: object) -> None:
    """`==` takes True and 1.0 for 1: the memo must not turn a malformed transfer into a valid one."""
    key = deterministic_key("sender")
    genuine = sign_transaction(NETWORK.identity, key, 0, Transfer(bytes(32), 1))
    known = KnownTransactions()
    known.add(genuine)
    malformed = genuine.to_plain()
    malformed[2] = ["transfer", bytes(32), amount]
    data = pre_prepare_bytes([0, 0, 5, [malformed]])
    with pytest.raises(CodecError):
        decode_message(data)
    with pytest.raises(CodecError):
        decode_message(data, known)


def test_known_transactions_are_bounded_oldest_first() -> None:
    known = KnownTransactions(size_max=2)
    for transaction in TRANSACTIONS:
        known.add(transaction)
    assert len(known) == 2
    assert known.get(TRANSACTIONS[0].signature) is None
    assert known.get(TRANSACTIONS[2].signature) is TRANSACTIONS[2]
