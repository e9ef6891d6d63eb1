"""A retransmitted request is answered from the recent REPLYs without touching the store, and
answers read back from the ledger are budgeted per client address and in all (a flood of old requests made a
replica decode a block and sign for every 200-byte frame)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from chain_helpers import deterministic_key

from ledger.config import load_replica_config, template_for, write_network
from ledger.framing import ByteBudget, FrameQueue, frame
from ledger.messages import Request, encode_message, make_reply
from ledger.transactions import Put, Transaction, sign_transaction
from node.effects import ClientReply, Effects
from node.recent_replies import (
    LEDGER_ANSWERS_BURST,
    LEDGER_ANSWERS_PER_S,
    LedgerAnswerBudget,
    LedgerAnswerBudgets,
    RecentReplies,
)
from node.runtime import ClientConnection, ReplicaRuntime


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ReplicaRuntime]:
    write_network(template_for(4), tmp_path / "net")
    replica = ReplicaRuntime(load_replica_config(tmp_path / "net" / "replica-0.toml"))
    try:
        yield replica
    finally:
        replica.close()


def queued(queue: FrameQueue) -> list[bytes]:
    payloads = []
    while True:
        try:
            payloads.append(queue._receive.receive_nowait()[0])
        except trio.WouldBlock:
            return payloads


def new_connection() -> ClientConnection:
    return ClientConnection(FrameQueue(256, 1 << 22), ByteBudget(1 << 22))


class StoreReads:
    """Counts the store's lookups and block reads a retransmission makes (and lets them run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, runtime: ReplicaRuntime, location: tuple[int, int] | None = None) -> None:
        self.lookups = 0
        self.block_reads = 0
        self.awaited_lookups = -1
        self.awaited = trio.Event()
        locate = runtime.store.locate_transaction

        def counted_locate(transaction_id: bytes) -> tuple[int, int] | None:
            self.lookups += 1
            if self.lookups == self.awaited_lookups:
                self.awaited.set()
            return location if location is not None else locate(transaction_id)

        def counted_block(height: int) -> Any:
            self.block_reads += 1
            return None  # as if pruned meanwhile: nothing to answer with

        monkeypatch.setattr(runtime.store, "locate_transaction", counted_locate)
        monkeypatch.setattr(runtime.store, "block", counted_block)

    def after_lookups(self, count: int) -> trio.Event:
        """An event set once `count` lookups were made in all."""
        self.awaited_lookups, self.awaited = count, trio.Event()
        return self.awaited


def executed(runtime: ReplicaRuntime, name: str) -> Transaction:
    """A transaction whose nonce the replica's state has used (as after its block executed)."""
    transaction = sign_transaction(runtime.network.identity, deterministic_key(name), 0, Put("k", name))
    runtime.core.application.execute_block([transaction])
    return transaction


async def test_a_retransmitted_request_for_a_recent_transaction_is_answered_without_the_store(
    runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    transaction = executed(runtime, "recent")
    [result] = runtime.core.application.execute_block([transaction])  # a replay: any result will do here
    reply = make_reply(0, 0, 1, b"\x01" * 32, [(transaction.transaction_id, result, 0)], 0, lambda data: b"\x02" * 64)
    follower = new_connection()
    runtime._subscribe(follower, transaction.sender)
    await runtime._carry_out(Effects(replies=[ClientReply(transaction.sender, reply)]))
    [sent] = queued(follower.queue)
    reads = StoreReads(monkeypatch, runtime)
    retransmitting = new_connection()
    await runtime._client_request(retransmitting, Request(transaction))
    assert queued(retransmitting.queue) == [sent]  # the very bytes sent when the block was written
    assert (reads.lookups, reads.block_reads) == (0, 0)
    assert runtime.events_receive.statistics().current_buffer_used == 0  # not handed to the core


async def test_a_flood_of_old_retransmissions_is_answered_from_the_ledger_only_within_the_budget(
    runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """The hole: each request for an old transaction made the replica read and decode its block
    and sign a batch reply again, for a 200-byte frame; one client could keep a replica busy."""
    transaction = executed(runtime, "old")
    reads = StoreReads(monkeypatch, runtime, location=(1, 0))
    flooding = new_connection()
    extra = 10
    for _ in range(int(LEDGER_ANSWERS_BURST) + extra):
        await runtime._client_request(flooding, Request(transaction))
    assert reads.block_reads == LEDGER_ANSWERS_BURST
    assert runtime.retransmits_unanswered == extra
    # The budget refills: a second later the connection gets LEDGER_ANSWERS_PER_S more.
    mock_clock.jump(1.0)
    for _ in range(int(LEDGER_ANSWERS_PER_S) + 1):
        await runtime._client_request(flooding, Request(transaction))
    assert reads.block_reads == LEDGER_ANSWERS_BURST + LEDGER_ANSWERS_PER_S
    # Another connection has a budget of its own.
    await runtime._client_request(new_connection(), Request(transaction))
    assert reads.block_reads == LEDGER_ANSWERS_BURST + LEDGER_ANSWERS_PER_S + 1


def test_recent_replies_keep_the_newest_within_the_bound() -> None:
    recent = RecentReplies(size_max=3)
    for number in range(5):
        recent.remember(bytes([number]), b"reply %d" % number)
    assert len(recent) == 3
    assert recent.get(bytes([1])) is None
    assert recent.get(bytes([4])) == b"reply 4"


def test_ledger_answer_budget_refills_at_its_rate_up_to_its_burst() -> None:
    budget = LedgerAnswerBudget(now_s=0.0, rate_per_s=2.0, burst=3.0)
    assert [budget.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert [budget.take(0.5) for _ in range(2)] == [True, False]
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]  # never above the burst
    assert budget.take(99.0) is False  # a clock that goes back refills nothing


async def test_reconnecting_does_not_buy_a_fresh_budget_of_ledger_answers(
    runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review of the per-connection budget: connect, send a burst, disconnect, repeat.
    Every connection from one address shares one budget (over real TCP on 127.0.0.1)."""
    transaction = executed(runtime, "reconnecting")
    runtime.ledger_answer_budgets = LedgerAnswerBudgets(rate_per_s=0.0)  # no refill: exact counts
    reads = StoreReads(monkeypatch, runtime, location=(1, 0))
    frames = frame(encode_message(Request(transaction))) * int(LEDGER_ANSWERS_BURST)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, runtime._serve_client, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        for connection_number in range(3):
            handled = reads.after_lookups((connection_number + 1) * int(LEDGER_ANSWERS_BURST))
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(frames)
            with trio.fail_after(10):
                await handled.wait()
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert reads.block_reads == LEDGER_ANSWERS_BURST  # one burst for the address, not one a connection
    assert runtime.retransmits_unanswered == 2 * LEDGER_ANSWERS_BURST


def test_ledger_answer_budgets_are_shared_by_address_and_bounded() -> None:
    budgets = LedgerAnswerBudgets(addresses_max=2)
    first = budgets.for_address("10.0.0.1", 0.0)
    assert budgets.for_address("10.0.0.1", 5.0) is first
    budgets.for_address("10.0.0.2", 0.0)
    budgets.for_address("10.0.0.1", 0.0)  # the most recent again
    budgets.for_address("10.0.0.3", 0.0)  # forgets 10.0.0.2, the least recent
    assert len(budgets) == 2
    assert budgets.for_address("10.0.0.1", 0.0) is first


async def test_a_reply_nobody_followed_is_still_answered_without_the_ledger_budget(
    runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a client reconnecting while its block executed had no REPLY kept, so
    its retransmission fell to the address's ledger budget, which others behind the same
    address (a NAT, an IPv6 /64) could drain by replaying old public transactions."""
    transaction = executed(runtime, "reconnecting as it executed")
    [result] = runtime.core.application.execute_block([transaction])
    reply = make_reply(0, 0, 1, b"\x01" * 32, [(transaction.transaction_id, result, 0)], 0, lambda data: b"\x02" * 64)
    await runtime._carry_out(Effects(replies=[ClientReply(transaction.sender, reply)]))  # no follower
    runtime.ledger_answer_budgets = LedgerAnswerBudgets(rate_per_s=0.0, burst=0.0)  # drained
    reads = StoreReads(monkeypatch, runtime)
    retransmitting = new_connection()
    await runtime._client_request(retransmitting, Request(transaction))
    assert queued(retransmitting.queue) == [encode_message(reply)]
    assert (reads.lookups, reads.block_reads, runtime.retransmits_unanswered) == (0, 0, 0)


def test_ledger_answers_of_all_addresses_together_are_bounded() -> None:
    """Found by review: the 256 /64s of one /56 each had a budget of their own, 62,464 answers
    in 10 s (about 1 ms of the event loop each)."""
    budgets = LedgerAnswerBudgets(total_rate_per_s=0.0, total_burst=100.0)
    granted = sum(budgets.for_address(f"2001:db8:0:{number:x}::", 0.0).take(0.0) for number in range(256) for _ in range(64))
    assert granted == 100
    # A refused answer costs the address nothing: its own budget is still full.
    assert budgets.for_address("2001:db8:0:ff::", 0.0).tokens == LEDGER_ANSWERS_BURST
