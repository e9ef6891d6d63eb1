"""Client signatures checked together: on worker threads in the runtime, in one call from the core."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import pytest
from test_core import (
    CLIENT_KEYS,
    NETWORK,
    REPLICA_KEYS,
    Cluster,
    new_core,
    pre_prepare,
    put,
    sent,
    sign,
    with_bad_client_signature,
)

from ledger.application import AccountsApplication
from ledger.crypto import PublicKeyCache, SigningKey, verify_signature
from ledger.messages import Batch, Prepare, PrePrepare
from ledger.transactions import Put, Transaction
from node.core import SIGNATURE_CHUNK_FIRST, ReplicaCore
from node.requests import PENDING_PER_ACCOUNT_MAX
from node.signature_threads import PARALLEL_CHECKS_MIN, SignatureThreads

DOMAIN = b"test-domain"


def checks(count: int, bad: set[int]) -> list[tuple[bytes, bytes, bytes, bytes]]:
    key = SigningKey.generate()
    items = []
    for index in range(count):
        message = index.to_bytes(4, "big")
        signature = key.sign(DOMAIN, message)
        if index in bad:
            signature = bytes([signature[0] ^ 1]) + signature[1:]
        items.append((key.public_key, DOMAIN, message, signature))
    return items


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("count", [0, 1, PARALLEL_CHECKS_MIN - 1, PARALLEL_CHECKS_MIN, 101])
def test_signature_threads_give_each_checks_result_in_order(threads: int, count: int) -> None:
    bad = {index for index in range(count) if index % 7 == 3}
    items = checks(count, bad)
    pool = SignatureThreads(threads)
    try:
        assert pool.check(items) == [verify_signature(*item) for item in items]
        assert pool.check(items) == [index not in bad for index in range(count)]
    finally:
        pool.close()


def test_a_pre_prepares_client_signatures_are_checked_in_a_few_shared_calls_and_one_bad_one_refuses_the_batch() -> None:
    calls: list[int] = []
    pool = SignatureThreads(2)

    def counting(items: Sequence[tuple[bytes, bytes, bytes, bytes]]) -> list[bool]:
        calls.append(len(items))
        return pool.check(items)

    try:
        transactions = tuple(put(nonce) for nonce in range(NETWORK.protocol.batch_size_max))
        backup = new_core(1)
        backup.check_signatures = counting
        backup.receive_message(0, pre_prepare(1, transactions))
        assert sum(calls) == len(transactions) and len(calls) <= len(transactions).bit_length(), calls
        assert [prepare.sequence for prepare in sent(backup.take_effects(), Prepare)] == [1]
        assert all(backup.signature_verified(transaction.transaction_id) for transaction in transactions)

        forged = (*transactions[:-1], with_bad_client_signature(transactions[-1]))
        other = new_core(2)
        other.check_signatures = counting
        checked_before = sum(calls)
        other.receive_message(0, pre_prepare(1, forged))
        assert sum(calls) - checked_before == len(forged)  # the forged one is last: every chunk is checked
        assert sent(other.take_effects(), Prepare) == []
        assert other.counters.get("invalid batch") == 1
    finally:
        pool.close()


def test_signatures_the_host_checked_are_not_checked_again_by_the_core() -> None:
    cluster = Cluster()
    primary = cluster.core(0)
    transaction = put(0)
    primary.note_verified_signatures([transaction.transaction_id])
    primary.check_signature = lambda *item: pytest.fail("checked again")  # type: ignore[assignment]
    cluster.request(0, transaction)
    assert len(primary.pending) == 1


def test_a_signature_the_host_found_bad_is_refused_without_a_second_check_ever() -> None:
    """A flood of forged requests must cost one check each, not the host's and then the core's;
    and the same forged bytes again cost nothing (a transaction id covers the signature)."""
    cluster = Cluster()
    primary = cluster.core(0)
    forged = with_bad_client_signature(put(0))
    checked: list[bytes] = []
    real_check = primary.check_signature

    def counting(*item: bytes) -> bool:
        checked.append(item[2])
        return real_check(*item)

    primary.check_signature = counting
    primary.note_verified_signatures([], [forged.transaction_id])
    effects = cluster.request(0, forged)
    assert checked == [] and effects.request_errors == [(forged.transaction_id, "bad signature")]
    cluster.request(0, forged)  # a later round: still known forged
    assert checked == [] and len(primary.pending) == 0


def _forged_signature(random_source: random.Random) -> bytes:
    raw = bytearray(random_source.randbytes(64))
    raw[63] &= 0x0F  # S below the group order: the check cannot stop early, it verifies in full
    return bytes(raw)


def test_a_resent_forged_batch_from_a_traitor_primary_costs_a_bounded_number_of_checks() -> None:
    """Regression (adversarial review): a traitor primary re-sent one validly signed PRE-PREPARE
    of 400 forged client transactions, and every copy was checked in full: 8,001 Ed25519 checks
    for 20 copies (before checking in one call it was 21). Now a forged batch stops at the first
    chunk with a bad signature, and a forged transaction id is remembered."""
    random_source = random.Random(7)
    batch_size = 400
    network = dataclasses.replace(NETWORK, protocol=dataclasses.replace(NETWORK.protocol, batch_size_max=batch_size))
    keys = PublicKeyCache()
    counted = [0]

    def counting(*item: bytes) -> bool:
        counted[0] += 1
        return keys.verify(*item)

    backup = ReplicaCore(network, 1, REPLICA_KEYS[1], AccountsApplication(network.genesis_balances), check_signature=counting)
    sender = CLIENT_KEYS[0].public_key
    forged = tuple(Transaction(sender, nonce, Put(f"k{nonce}", "v"), _forged_signature(random_source)) for nonce in range(batch_size))
    message = sign(PrePrepare(0, 1, Batch(0, 0, 0, forged), 0), 0, "pre-prepare")
    for _ in range(20):
        backup.receive_message(0, message)
        backup.take_effects()
    # The PRE-PREPARE's own signature once (memoised), one chunk of client signatures once.
    assert counted[0] <= 1 + SIGNATURE_CHUNK_FIRST, counted[0]
    assert backup.counters.get("invalid batch", 0) == 20
    # A new forged batch (fresh forged signatures, forged one last behind genuine ones) costs at
    # most one chunk beyond its genuine transactions, and the genuine ones once.
    genuine = tuple(put(nonce) for nonce in range(8))
    late_forgery = Transaction(sender, 99, Put("late", "v"), _forged_signature(random_source))
    before = counted[0]
    backup.receive_message(0, sign(PrePrepare(0, 2, Batch(0, 0, 0, (*genuine, late_forgery)), 0), 0, "pre-prepare"))
    backup.take_effects()
    assert counted[0] - before <= 1 + len(genuine) + 1, counted[0] - before


def test_a_genuine_batch_is_still_checked_once_per_signature_in_a_few_shared_calls() -> None:
    calls: list[int] = []
    keys = PublicKeyCache()

    def together(items: Sequence[tuple[bytes, bytes, bytes, bytes]]) -> list[bool]:
        calls.append(len(items))
        return [keys.verify(*item) for item in items]

    backup = new_core(1)
    backup.check_signatures = together
    count = NETWORK.protocol.batch_size_max
    transactions = tuple(put(nonce) for nonce in range(count))
    backup.receive_message(0, pre_prepare(1, transactions))
    assert sum(calls) == count and len(calls) <= count.bit_length(), calls  # chunks of 4, 8, 16, ...
    assert any(isinstance(send.message, Prepare) for send in backup.take_effects().send)


def test_requests_refused_as_busy_are_not_checked_ahead_by_the_host() -> None:
    """Regression (adversarial review): the runtime checked every unknown request of a round
    ahead, also those the queue then refused as busy (documented as costing no check)."""
    core = new_core(0)
    core.view_active = False  # keep requests waiting: this primary proposes nothing here
    for nonce in range(PENDING_PER_ACCOUNT_MAX - 2):
        core.receive_request(put(nonce))
    core.take_effects()
    flood = [(put(nonce), None) for nonce in range(PENDING_PER_ACCOUNT_MAX - 2, PENDING_PER_ACCOUNT_MAX + 500)]
    worth = core.requests_worth_checking(flood)
    # Room for two more of this account: only those two would be checked by the core.
    assert [transaction.nonce for transaction in worth] == [PENDING_PER_ACCOUNT_MAX - 2, PENDING_PER_ACCOUNT_MAX - 1]
    # Known good and already waiting ones are not checked again either.
    core.note_verified_signatures([worth[0].transaction_id])
    assert [transaction.nonce for transaction in core.requests_worth_checking(flood)] == [PENDING_PER_ACCOUNT_MAX - 1]
