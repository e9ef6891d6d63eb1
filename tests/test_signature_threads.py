"""Client signatures checked together: on worker threads in the runtime, in one call from the core."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from test_core import NETWORK, Cluster, new_core, pre_prepare, put, sent, with_bad_client_signature

from ledger.crypto import SigningKey, verify_signature
from ledger.messages import Prepare
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


def test_a_pre_prepares_client_signatures_are_checked_in_one_call_and_one_bad_one_refuses_the_batch() -> None:
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
        assert calls == [len(transactions)]
        assert [prepare.sequence for prepare in sent(backup.take_effects(), Prepare)] == [1]
        assert all(backup.signature_verified(transaction.transaction_id) for transaction in transactions)

        forged = (*transactions[:-1], with_bad_client_signature(transactions[-1]))
        other = new_core(2)
        other.check_signatures = counting
        other.receive_message(0, pre_prepare(1, forged))
        assert calls[-1] == len(forged)
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


def test_a_signature_the_host_found_bad_is_refused_without_a_second_check_in_that_round_only() -> None:
    """A flood of forged requests must cost one check each, not the host's and then the core's."""
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
    cluster.request(0, forged)  # a later round: nothing noted, so the core checks it itself
    assert len(checked) == 1 and len(primary.pending) == 0
