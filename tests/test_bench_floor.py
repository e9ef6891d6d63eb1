"""The benchmark's floor formula (node/bench.py), on made-up primitive costs: no timing here."""

from __future__ import annotations

import pytest

from node.bench import Primitives, compute_floor

VERIFY_S = 100e-6
SIGN_S = 30e-6
BATCH = 100
PRIMITIVES = Primitives(
    verify_s=VERIFY_S, sign_s=SIGN_S, encode_batch_s=0.0, decode_batch_s=0.0, hash_block_s=0.0, batch_size=BATCH, batch_bytes=1
)


def test_the_floor_charges_the_client_f_plus_1_checks_per_batch_with_one_reply_per_batch() -> None:
    """With one signed reply per batch a client checks f + 1 signatures per block (it remembers
    them), not per transaction; with one reply per transaction, f + 1 per transaction."""
    floor = compute_floor(PRIMITIVES, 4, 2)
    faults = 1
    replica_shared = VERIFY_S + (2 * 2 * faults * VERIFY_S + 2 * SIGN_S) / BATCH
    assert floor.client_cpu_s_per_transaction == pytest.approx((faults + 1) * VERIFY_S / BATCH)
    assert floor.replica_cpu_s_per_transaction == pytest.approx(replica_shared + SIGN_S / BATCH)
    assert floor.transactions_per_second == pytest.approx(2 / (4 * (replica_shared + SIGN_S / BATCH) + (faults + 1) * VERIFY_S / BATCH))
    assert floor.per_transaction_reply_transactions_per_second == pytest.approx(2 / (4 * (replica_shared + SIGN_S) + (faults + 1) * VERIFY_S))


def test_the_floor_for_seven_replicas_counts_f_plus_1_of_three() -> None:
    floor = compute_floor(PRIMITIVES, 7, 2)
    assert floor.client_cpu_s_per_transaction == pytest.approx(3 * VERIFY_S / BATCH)
