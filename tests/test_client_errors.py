"""An internal error answering one client message is contained: an error reply, a rate-limited log line, the connection and replica go on."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from client import ports
from ledger.config import load_replica_config, template_for, write_network
from ledger.framing import FramedStream
from ledger.messages import ErrorReply, StatusQuery, StatusReply, decode_message, encode_message
from ledger.sizes import CLIENT_FRAME_SIZE_MAX
from node.runtime import CLIENT_ERRORS_LOGGED_PER_SECOND, ReplicaRuntime

DEADLINE_S = 20.0


@pytest.fixture
async def runtime(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ReplicaRuntime]:
    """Replica 0 of a 4-replica network, running in this process on free ports (its peers never start)."""
    base_port = ports.pick_base_port(4, random.Random())
    assert base_port is not None
    write_network(template_for(4, base_port=base_port), tmp_path / "net")
    replica = ReplicaRuntime(load_replica_config(tmp_path / "net" / "replica-0.toml"))
    try:
        with trio.CancelScope() as scope:
            await nursery.start(replica.run)
            yield replica
            scope.cancel()
    finally:
        replica.close()


async def connect(runtime: ReplicaRuntime) -> FramedStream:
    address = runtime.network.replicas[runtime.config.replica_id].client_address
    stream = await trio.open_tcp_stream(address.host, address.port)
    return FramedStream(stream, CLIENT_FRAME_SIZE_MAX)


async def ask_status(framed: FramedStream, query_id: int) -> object:
    await framed.send(encode_message(StatusQuery(query_id)))
    data = await framed.receive()
    assert data is not None, "the replica closed the connection"
    return decode_message(data)


async def test_an_error_building_a_status_reply_is_answered_and_the_connection_keeps_serving(
    runtime: ReplicaRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: an exception while building a status reply ended the client's connection (and
    logged a traceback for every such request); it is now answered with an ErrorReply, logged at
    most CLIENT_ERRORS_LOGGED_PER_SECOND times a second, and the next request is served."""
    failures_left = [40]
    healthy_status = runtime._status

    def failing_status(query_id: int) -> StatusReply:
        if failures_left[0] > 0:
            failures_left[0] -= 1
            raise OSError("store size unavailable")  # as a stat of the store's files can fail
        return healthy_status(query_id)

    monkeypatch.setattr(runtime, "_status", failing_status)
    caplog.set_level(logging.ERROR, logger="node.replica")
    with trio.fail_after(DEADLINE_S):
        framed = await connect(runtime)
        for query_id in range(40):
            answer = await ask_status(framed, query_id)
            assert isinstance(answer, ErrorReply), answer
            assert "internal error answering status-query" in answer.reason
        answer = await ask_status(framed, 99)
        assert isinstance(answer, StatusReply) and answer.query_id == 99, answer
    errors = [record for record in caplog.records if "internal error answering" in record.getMessage()]
    # Within one second, or straddling two at most.
    assert 1 <= len(errors) <= 2 * CLIENT_ERRORS_LOGGED_PER_SECOND, len(errors)
    assert "store size unavailable" in errors[0].getMessage()
    assert runtime.metrics.client_errors._value.get() == 40
