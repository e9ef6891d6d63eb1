"""Readers that hand buffered frames on without waiting still yield, and stop at a closed
connection (found by an adversarial review of the readers' send_nowait)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from chain_helpers import deterministic_key

from ledger.config import load_replica_config, template_for, write_network
from ledger.framing import FRAMES_PER_CHECKPOINT, ByteBudget, FramedStream, FrameQueue, frame
from ledger.messages import FetchBlocks, Request, encode_message
from ledger.sizes import CLIENT_FRAME_SIZE_MAX
from ledger.transactions import Put, sign_transaction
from node.runtime import CLIENT_RECEIVE_CHUNK_SIZE, ClientConnection, ReplicaRuntime


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ReplicaRuntime]:
    write_network(template_for(4), tmp_path / "net")
    replica = ReplicaRuntime(load_replica_config(tmp_path / "net" / "replica-0.toml"))
    try:
        yield replica
    finally:
        replica.close()


async def test_a_peer_chunk_of_tiny_frames_does_not_hold_the_scheduler(runtime: ReplicaRuntime) -> None:
    """The hole: a traitor's 256 KiB chunk of 20-byte frames went into the event queue with no
    yield (126 ms of event loop stall measured, behind which honest votes waited)."""
    frames = 2000
    order: list[str] = []

    async def deliver(peer: int, message: Any) -> None:
        order.append("frame")

    runtime.transport.deliver = deliver
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(frame(encode_message(FetchBlocks(1, 1))) * frames)
    await theirs.aclose()

    async def other_task() -> None:
        while True:
            order.append("other")
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        with trio.fail_after(10):
            await runtime.transport._receive_loop(FramedStream(ours, 1 << 20), 1)
        nursery.cancel_scope.cancel()
    assert order.count("frame") == frames
    longest_run = max(len(run) for run in "".join("f" if item == "frame" else " " for item in order).split())
    # Trio runs each batch of runnable tasks in either order, so two yields' worth at most.
    assert longest_run <= 2 * FRAMES_PER_CHECKPOINT


async def test_a_closed_client_connection_feeds_nothing_more_to_the_core(runtime: ReplicaRuntime) -> None:
    """The hole: a connection evicted while a chunk of its requests was buffered still queued
    all of them (132 of a 16 KiB chunk) to the core, with subscriptions and waiting entries."""
    identity = runtime.network.identity
    payload = b"".join(
        frame(encode_message(Request(sign_transaction(identity, deterministic_key(f"client {number}"), 0, Put("k", "v")))))
        for number in range(100)
    )
    assert len(payload) < CLIENT_RECEIVE_CHUNK_SIZE  # one read takes them all
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(payload)
    connection = ClientConnection(FrameQueue(4096, 1 << 22), ByteBudget(1 << 22))
    handle = runtime._client_request

    async def evicted_after_the_first(connection: ClientConnection, request: Request) -> None:
        await handle(connection, request)
        connection.close()  # as ClientAdmission evicts it for a newcomer

    runtime._client_request = evicted_after_the_first  # type: ignore[method-assign]
    with trio.fail_after(10), connection.cancel_scope:
        await runtime._read_client(FramedStream(ours, CLIENT_FRAME_SIZE_MAX, CLIENT_RECEIVE_CHUNK_SIZE), connection)
    assert runtime.events_receive.statistics().current_buffer_used == 1
