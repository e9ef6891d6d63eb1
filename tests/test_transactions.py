"""Tests of signed transactions: encoding, identity, validation and tamper detection."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from chain_helpers import deterministic_key
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.crypto import NetworkIdentity, verify_signature
from ledger.encoding import CodecError, encode
from ledger.transactions import (
    AMOUNT_MAX,
    KEY_LENGTH_MAX,
    VALUE_LENGTH_MAX,
    Put,
    Transaction,
    TransactionResult,
    Transfer,
    sign_transaction,
    transaction_domain,
)

NETWORK = NetworkIdentity("transactions-net", bytes(32))
SENDERS = [deterministic_key(f"sender-{index}") for index in range(2)]
RECIPIENT = deterministic_key("recipient").public_key

transfers = st.builds(Transfer, st.binary(min_size=32, max_size=32), st.integers(1, AMOUNT_MAX))
puts = st.builds(Put, st.text(min_size=1, max_size=20), st.text(max_size=40))
operations = transfers | puts
nonces = st.integers(0, 2**63 - 1)


def signature_valid(transaction: Transaction, network: NetworkIdentity = NETWORK) -> bool:
    return verify_signature(
        transaction.sender, transaction_domain(network), transaction.signed_bytes(), transaction.signature
    )


@given(sender_index=st.integers(0, 1), nonce=nonces, operation=operations)
@settings(derandomize=True, max_examples=60)
def test_signed_transaction_round_trips_and_verifies(sender_index: int, nonce: int, operation: Any) -> None:
    transaction = sign_transaction(NETWORK, SENDERS[sender_index], nonce, operation)
    assert signature_valid(transaction)
    decoded = Transaction.decode(transaction.encoded)
    assert decoded == transaction
    assert decoded.encoded == transaction.encoded
    assert decoded.transaction_id == transaction.transaction_id
    assert signature_valid(decoded)
    assert sign_transaction(NETWORK, SENDERS[sender_index], nonce, operation).encoded == transaction.encoded


@given(nonce=nonces, operation=operations, other_operation=operations, flip=st.integers(1, 255))
@settings(derandomize=True, max_examples=60)
def test_tampered_transaction_fails_verification(
    nonce: int, operation: Any, other_operation: Any, flip: int
) -> None:
    transaction = sign_transaction(NETWORK, SENDERS[0], nonce, operation)
    tampered_signature = bytearray(transaction.signature)
    tampered_signature[flip % len(tampered_signature)] ^= flip
    tampered = [
        dataclasses.replace(transaction, nonce=nonce + 1 if nonce < 2**63 - 1 else nonce - 1),
        dataclasses.replace(transaction, sender=SENDERS[1].public_key),
        dataclasses.replace(transaction, signature=bytes(tampered_signature)),
    ]
    if other_operation != operation:
        tampered.append(dataclasses.replace(transaction, operation=other_operation))
    for forgery in tampered:
        assert not signature_valid(forgery)
        assert forgery.transaction_id != transaction.transaction_id
    assert not signature_valid(transaction, NetworkIdentity("another-net", NETWORK.genesis_hash))
    assert not signature_valid(transaction, NetworkIdentity(NETWORK.network_id, b"\x01" * 32))


def test_transaction_id_is_the_hash_of_the_encoding_signature_included() -> None:
    first = sign_transaction(NETWORK, SENDERS[0], 0, Put("key", "value"))
    second = sign_transaction(NETWORK, SENDERS[0], 1, Put("key", "value"))
    other_network = sign_transaction(NetworkIdentity("another-net", NETWORK.genesis_hash), SENDERS[0], 0, Put("key", "value"))
    assert len({first.transaction_id, second.transaction_id, other_network.transaction_id}) == 3
    assert first.encoded == encode(first.to_plain())


def valid_plain() -> list[Any]:
    return sign_transaction(NETWORK, SENDERS[0], 3, Transfer(RECIPIENT, 10)).to_plain()


def with_operation(operation: Any) -> list[Any]:
    plain = valid_plain()
    plain[2] = operation
    return plain


@pytest.mark.parametrize(
    "plain",
    [
        pytest.param(with_operation(["transfer", RECIPIENT, 0]), id="zero-amount"),
        pytest.param(with_operation(["transfer", RECIPIENT, -5]), id="negative-amount"),
        pytest.param(with_operation(["transfer", RECIPIENT, AMOUNT_MAX + 1]), id="amount-too-large"),
        pytest.param(with_operation(["transfer", RECIPIENT, True]), id="boolean-amount"),
        pytest.param(with_operation(["transfer", RECIPIENT[:31], 5]), id="short-recipient"),
        pytest.param(with_operation(["transfer", RECIPIENT]), id="transfer-missing-amount"),
        pytest.param(with_operation(["put", "", "value"]), id="empty-key"),
        pytest.param(with_operation(["put", "k" * (KEY_LENGTH_MAX + 1), "v"]), id="key-too-long"),
        pytest.param(with_operation(["put", "key", "v" * (VALUE_LENGTH_MAX + 1)]), id="value-too-long"),
        pytest.param(with_operation(["put", "key", b"bytes"]), id="value-not-text"),
        pytest.param(with_operation(["mint", RECIPIENT, 5]), id="unknown-kind"),
        pytest.param(with_operation([]), id="empty-operation"),
        pytest.param(with_operation(["put", "key", "value", "extra"]), id="extra-operand"),
        pytest.param(valid_plain()[:3], id="missing-signature"),
        pytest.param([*valid_plain(), b"extra"], id="extra-field"),
        pytest.param([valid_plain()[0][:31], *valid_plain()[1:]], id="short-sender"),
        pytest.param([*valid_plain()[:3], valid_plain()[3][:63]], id="short-signature"),
        pytest.param([valid_plain()[0], -1, *valid_plain()[2:]], id="negative-nonce"),
        pytest.param([valid_plain()[0], 2**63, *valid_plain()[2:]], id="nonce-too-large"),
        pytest.param({"sender": RECIPIENT}, id="map-not-array"),
    ],
)
def test_malformed_transactions_are_refused(plain: Any) -> None:
    with pytest.raises(CodecError):
        Transaction.decode(encode(plain))


def test_boundary_values_are_accepted() -> None:
    largest = sign_transaction(NETWORK, SENDERS[0], 2**63 - 1, Transfer(RECIPIENT, AMOUNT_MAX))
    assert Transaction.decode(largest.encoded) == largest
    widest = sign_transaction(NETWORK, SENDERS[0], 0, Put("k" * KEY_LENGTH_MAX, "v" * VALUE_LENGTH_MAX))
    assert Transaction.decode(widest.encoded) == widest
    empty_value = sign_transaction(NETWORK, SENDERS[0], 0, Put("k", ""))
    assert Transaction.decode(empty_value.encoded) == empty_value


@given(ok=st.booleans(), reason=st.text(max_size=256))
@settings(derandomize=True, max_examples=30)
def test_transaction_result_round_trips(ok: bool, reason: str) -> None:
    result = TransactionResult(ok, reason)
    assert TransactionResult.from_plain(result.to_plain()) == result


def test_transaction_result_refuses_malformed_input_and_describes_itself() -> None:
    for plain in ([1, ""], [True], [True, "x" * 257], [False, b"reason"], None):
        with pytest.raises(CodecError):
            TransactionResult.from_plain(plain)
    assert TransactionResult(True).describe() == "ok"
    assert TransactionResult(False, "bad nonce 3, expected 2").describe() == "failed: bad nonce 3, expected 2"
