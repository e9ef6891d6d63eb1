"""A replica answers FetchBlocks only when the answer can be queued, and builds it from stored bytes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chain_helpers import LedgerNetwork, build_chain, deterministic_key

from ledger.blocks import Block
from ledger.config import load_replica_config, template_for, write_network
from ledger.encoding import decode
from ledger.framing import ByteBudget, FrameQueue
from ledger.messages import Blocks, FetchBlocks, Request, decode_message, encode_message
from ledger.transactions import Put, sign_transaction
from node.runtime import ClientConnection, ReplicaRuntime

PEER = 1


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ReplicaRuntime]:
    write_network(template_for(4), tmp_path / "net")
    replica = ReplicaRuntime(load_replica_config(tmp_path / "net" / "replica-0.toml"))
    # Blocks that link to this network's genesis (their certificates are not checked by the store).
    signers = LedgerNetwork("unused", tuple(deterministic_key(f"r{index}") for index in range(4)), deterministic_key("c"))
    replica.store.append(build_chain(signers, 6, parent_hash=replica.network.genesis_hash))
    try:
        yield replica
    finally:
        replica.close()


def queued(queue: FrameQueue) -> list[bytes]:
    payloads = []
    while True:
        try:
            payloads.append(queue._receive.receive_nowait()[0])
        except Exception:  # noqa: BLE001 - trio.WouldBlock: the queue is empty
            return payloads


class Counting:
    """Counts calls of the store's readers and of block encoding, while letting them run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, runtime: ReplicaRuntime) -> None:
        self.calls: dict[str, int] = {}
        for name in ("blocks", "block", "encoded_blocks", "iterate_blocks"):
            if hasattr(runtime.store, name):
                monkeypatch.setattr(runtime.store, name, self._wrap(name, getattr(runtime.store, name)))
        for name in ("encode", "to_plain"):
            monkeypatch.setattr(Block, name, self._wrap(f"Block.{name}", getattr(Block, name)))

    def _wrap(self, name: str, function: object) -> object:
        def counted(*arguments: object, **keywords: object) -> object:
            self.calls[name] = self.calls.get(name, 0) + 1
            return function(*arguments, **keywords)  # type: ignore[operator]

        return counted

    def reads(self) -> int:
        return sum(count for name, count in self.calls.items() if not name.startswith("Block."))


def test_fetch_from_a_peer_whose_queue_is_full_is_skipped_without_reading_the_store(
    runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (hole 10a): the blocks were read from SQLite and encoded (twice) even when the
    peer's send queue could not take the answer, which was then dropped."""
    transport = runtime.transport
    transport.connected_out.add(PEER)
    queue = transport.queues[PEER]
    assert queue.put(b"x" * (queue.bytes_max - runtime.blocks_response_size_max + 1))
    counting = Counting(monkeypatch, runtime)
    runtime._serve_fetch(PEER, FetchBlocks(1, 64))
    assert counting.reads() == 0 and not counting.calls.get("Block.encode")
    assert runtime.fetches_skipped == 1
    assert len(queued(queue)) == 1  # only what filled it


def test_fetch_from_a_disconnected_peer_is_skipped(runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch, runtime)
    runtime._serve_fetch(PEER, FetchBlocks(1, 64))
    assert counting.reads() == 0
    assert runtime.fetches_skipped == 1


def test_fetch_answer_is_built_from_stored_bytes_without_encoding_a_block(
    runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = Blocks(tuple(runtime.store.blocks(2, 4)), runtime.core.stable_checkpoint)
    runtime.transport.connected_out.add(PEER)
    counting = Counting(monkeypatch, runtime)
    runtime._serve_fetch(PEER, FetchBlocks(2, 4))
    assert not counting.calls.get("Block.encode") and not counting.calls.get("Block.to_plain")
    assert counting.calls.get("encoded_blocks") == 1
    (payload,) = queued(runtime.transport.queues[PEER])
    monkeypatch.undo()
    assert payload == encode_message(expected)
    assert decode_message(payload) == expected
    assert decode(payload)[0] == "blocks"


def test_fetch_answer_stays_within_half_a_frame_but_always_carries_one_block(runtime: ReplicaRuntime) -> None:
    stored = runtime.store.encoded_blocks(1, 64, 10**9)
    assert len(stored) == 6
    assert runtime.store.encoded_blocks(1, 64, len(stored[0]) + len(stored[1])) == stored[:2]
    assert runtime.store.encoded_blocks(1, 64, 1) == stored[:1]
    assert runtime.store.encoded_blocks(7, 64, 10**9) == []


async def test_a_fresh_request_costs_no_store_lookup_but_a_used_nonce_still_does(
    runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly-once answers come from the store; only a transaction whose nonce is already used
    can be there, so the common case (a new transaction) skips the SQLite query."""
    lookups: list[bytes] = []
    locate = runtime.store.locate_transaction

    def counted(transaction_id: bytes) -> tuple[int, int] | None:
        lookups.append(transaction_id)
        return locate(transaction_id)

    monkeypatch.setattr(runtime.store, "locate_transaction", counted)
    key = deterministic_key("fresh client")
    fresh = sign_transaction(runtime.network.identity, key, 0, Put("k", "v"))
    connection = ClientConnection(FrameQueue(16, 1 << 20), ByteBudget(1 << 20))
    await runtime._client_request(connection, Request(fresh))
    assert lookups == []
    assert runtime.events_receive.receive_nowait() == ("request", None, fresh)
    runtime.core.application.execute_block([fresh])  # its nonce is now used
    again = sign_transaction(runtime.network.identity, key, 0, Put("k", "other"))
    await runtime._client_request(connection, Request(again))
    assert lookups == [again.transaction_id]
