"""How a replica carries out a round's writes (node/runtime.py): small ones inline, and each persisted message encoded once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from chain_helpers import deterministic_key

import node.runtime as runtime_module
import node.transport as transport_module
from ledger.config import load_replica_config, template_for, write_network
from ledger.framing import FrameQueue
from ledger.messages import PrePrepare
from ledger.transactions import Put, sign_transaction
from node.runtime import (
    EVENTS_PER_ROUND_MAX,
    INLINE_WRITE_EVENTS_MAX,
    INLINE_WRITE_RECORD_BYTES_MAX,
    INLINE_WRITE_TRANSACTIONS_MAX,
    ReplicaRuntime,
    now_ms,
    write_inline,
)


def block_of(transactions: int) -> Any:
    return SimpleNamespace(transactions=[object()] * transactions)


def record_of(size: int) -> tuple[str, int, int, bytes]:
    return ("commit", 0, 1, bytes(size))


def test_a_round_of_one_transaction_at_a_time_writes_inline() -> None:
    assert write_inline(1, [record_of(200)], [])
    assert write_inline(INLINE_WRITE_EVENTS_MAX, [record_of(200)], [block_of(1)])
    assert write_inline(0, [], [block_of(INLINE_WRITE_TRANSACTIONS_MAX)])


def test_a_busy_or_large_round_keeps_the_worker_thread() -> None:
    """Many events (the connections must be served meanwhile), big blocks or big records (a full
    pre-prepare) never stall the event loop on the disk."""
    assert not write_inline(INLINE_WRITE_EVENTS_MAX + 1, [record_of(200)], [])
    assert not write_inline(EVENTS_PER_ROUND_MAX, [], [])
    assert not write_inline(1, [], [block_of(INLINE_WRITE_TRANSACTIONS_MAX + 1)])
    assert not write_inline(1, [], [block_of(INLINE_WRITE_TRANSACTIONS_MAX), block_of(1)])
    assert not write_inline(0, [record_of(INLINE_WRITE_RECORD_BYTES_MAX + 1)], [])


def test_a_pre_prepare_is_encoded_once_for_the_disk_and_the_peers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary's pre-prepare (a whole batch) was encoded for the store and again for the
    peers; now the persisted bytes are what the peers are sent."""
    write_network(template_for(4), tmp_path / "net")
    runtime = ReplicaRuntime(load_replica_config(tmp_path / "net" / "replica-0.toml"))
    try:
        runtime.transport.connected_out.update({1, 2, 3})
        transaction = sign_transaction(runtime.network.identity, deterministic_key("client"), 0, Put("k", "v"))
        runtime.core.receive_request(transaction)
        runtime.core.tick(now_ms())
        effects = runtime.core.take_effects()
        assert any(isinstance(send.message, PrePrepare) for send in effects.send)
        encoded: list[str] = []
        for module in (runtime_module, transport_module):
            original = module.encode_message

            def counted(message: Any, original: Any = original) -> bytes:
                encoded.append(type(message).__name__)
                return original(message)

            monkeypatch.setattr(module, "encode_message", counted)
        trio.run(runtime._carry_out, effects, 1)
        assert encoded.count("PrePrepare") == 1
        [stored] = [record[3] for record in runtime.store.load_messages() if record[0] == "pre-prepare"]
        for peer in (1, 2, 3):
            assert stored in queued(runtime.transport.queues[peer])
    finally:
        runtime.close()


def queued(queue: FrameQueue) -> list[bytes]:
    payloads = []
    while True:
        try:
            payloads.append(queue._receive.receive_nowait()[0])
        except trio.WouldBlock:
            return payloads
