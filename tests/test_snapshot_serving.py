"""The snapshot serving budget: a peer cannot buy more than its share of a replica's time."""

from __future__ import annotations

from ledger.messages import FetchSnapshot
from node.snapshot_serving import (
    PEER_ENTRIES_PER_SECOND,
    REQUEST_COST_ENTRIES,
    WAITING_PER_PEER_MAX,
    ServingBudget,
)

FULL_CHUNK = 65_536


def serve_flood(budget: ServingBudget, peer: int, requests: int, now_s: float) -> int:
    """Requests answered at once with full chunks; the rest wait (bounded)."""
    served = 0
    for bucket in range(requests):
        if budget.may_serve(peer, now_s):
            budget.charge(peer, FULL_CHUNK, now_s)
            served += 1
        else:
            budget.wait(peer, FetchSnapshot(16, bucket))
    return served


def test_a_flooding_peer_is_served_about_one_full_chunk_a_second() -> None:
    # Found by an adversarial review: 64 answers a second per peer cost 9.9 s of event loop a second
    # on a large state. Now the budget is in entries.
    budget = ServingBudget()
    served = serve_flood(budget, 1, 1_000, 0.0)
    assert served == 1
    assert len(budget.waiting[1]) == WAITING_PER_PEER_MAX and budget.dropped == 1_000 - 1 - WAITING_PER_PEER_MAX
    # Ten seconds later it has been paid about ten chunks' worth, not thousands.
    total = served
    for tick in range(1, 1_001):
        now_s = tick / 100
        payable = budget.next_payable(now_s)
        while payable is not None:
            budget.charge(payable[0], FULL_CHUNK, now_s)
            total += 1
            payable = budget.next_payable(now_s)
        serve_flood(budget, 1, 10, now_s)
    assert total <= 10 * PEER_ENTRIES_PER_SECOND // FULL_CHUNK + 2


def test_another_peer_is_still_served_while_one_floods() -> None:
    budget = ServingBudget()
    serve_flood(budget, 1, 100, 0.0)
    assert budget.may_serve(2, 0.0)


def test_tiny_answers_cost_their_request_too() -> None:
    budget = ServingBudget()
    served = 0
    while budget.may_serve(1, 0.0):
        budget.charge(1, 0, 0.0)
        served += 1
    assert served == PEER_ENTRIES_PER_SECOND // REQUEST_COST_ENTRIES
