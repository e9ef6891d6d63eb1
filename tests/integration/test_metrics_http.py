"""Each replica serves Prometheus metrics and /health over HTTP; hostile HTTP clients are closed, never a crash."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ledger.config import Address, load_replica_config
from node.http import HTTP_CONNECTIONS_MAX, REQUEST_HEAD_SIZE_MAX

from .local_network import (
    NODE_COMMAND,
    READY_LINE,
    STATUS_POLL_INTERVAL_S,
    LocalNetwork,
    run_client_cli,
    run_command,
)

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0


def metrics_address(network: LocalNetwork, replica_id: int) -> Address:
    address = load_replica_config(network.replica_config_path(replica_id)).metrics_address
    assert address is not None, "init wrote no [metrics]"
    return address


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    answer = b""
    try:
        while data := await stream.receive_some(65536):
            answer += data
    except (trio.BrokenResourceError, OSError):
        pass  # closed with our bytes unread: the kernel resets the connection
    return answer


async def exchange(address: Address, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(address.host, address.port)
    async with stream:
        try:
            await stream.send_all(request)
        except (trio.BrokenResourceError, OSError):
            pass  # refused part-way: what it answered is still to be read
        return await read_until_closed(stream)


async def http_get(address: Address, path: str) -> tuple[int, bytes]:
    answer = await exchange(address, f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def wait_for_health(address: Address, expected_status: int) -> dict[str, Any]:
    """Poll /health until it answers `expected_status` (the replica may still be starting)."""
    last: object = None
    try:
        with trio.fail_after(DEADLINE_S):
            while True:
                try:
                    status, body = await http_get(address, "/health")
                    last = (status, body)
                    if status == expected_status:
                        return json.loads(body)
                except (OSError, IndexError, ValueError) as error:
                    last = error
                await trio.sleep(STATUS_POLL_INTERVAL_S)
    except trio.TooSlowError:
        raise AssertionError(f"/health on {address} did not answer {expected_status}: last {last!r}") from None


async def scrape(address: Address) -> dict[str, float]:
    status, body = await http_get(address, "/metrics")
    assert status == 200, body
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if not sample.labels
    }


@pytest.mark.parametrize("replica_count", [4], ids=["n4"])
async def test_metrics_count_a_committed_put_and_health_is_ok(network: LocalNetwork, replica_count: int) -> None:
    address = metrics_address(network, 1)
    health = await wait_for_health(address, 200)
    assert health["status"] == "ok" and health["peers"] >= network.network.quorum - 1, health
    before = await scrape(address)
    assert before["ledger_peers"] == replica_count - 1
    put = await run_client_cli(network, "put", "metrics-key", "value")
    assert put.exit_code == 0, put.describe()
    with trio.fail_after(DEADLINE_S):
        while True:
            after = await scrape(address)
            if after["ledger_transactions_committed_total"] > before["ledger_transactions_committed_total"]:
                break
            await trio.sleep(STATUS_POLL_INTERVAL_S)
    assert after["ledger_blocks_committed_total"] >= 1
    assert after["ledger_height"] >= 1
    assert after["ledger_batch_size_transactions_count"] >= 1
    # Every replica answers on its own port, and `ledger-node up` reported each one healthy.
    for replica_id in range(replica_count):
        await wait_for_health(metrics_address(network, replica_id), 200)
    assert network.run is not None
    with trio.fail_after(DEADLINE_S):
        while True:
            healthy = {line.split()[1] for line in network.run.lines if re.match(r"replica \d+ healthy: ", line)}
            if healthy == {str(replica_id) for replica_id in range(replica_count)}:
                break
            await trio.sleep(STATUS_POLL_INTERVAL_S)
    ready = [line for line in network.run.lines if READY_LINE.match(line)]
    assert all(" metrics 127.0.0.1:" in line for line in ready), ready


@pytest.mark.parametrize("replica_count", [4], ids=["n4"])
async def test_garbage_oversized_and_idle_http_clients_are_closed_and_the_replica_keeps_serving(
    network: LocalNetwork, replica_count: int
) -> None:
    address = metrics_address(network, 0)
    await wait_for_health(address, 200)
    with trio.fail_after(DEADLINE_S):
        garbage = await exchange(address, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)) + b"\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 "), garbage[:80]
        oversized = await exchange(address, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (8 * REQUEST_HEAD_SIZE_MAX))
        assert oversized == b"" or oversized.startswith(b"HTTP/1.1 431 "), oversized[:80]
        assert (await http_get(address, "/metrics/../../etc/passwd"))[0] == 404
        # More idle connections than the limit: those past it are closed unanswered, the others
        # answered 408 once their request head has not arrived in time.
        idle = [await trio.open_tcp_stream(address.host, address.port) for _ in range(HTTP_CONNECTIONS_MAX + 4)]
        answers: list[bytes] = []

        async def read_idle(stream: trio.SocketStream) -> None:
            async with stream:
                answers.append(await read_until_closed(stream))

        async with trio.open_nursery() as nursery:
            for stream in idle:
                nursery.start_soon(read_idle, stream)
        assert sorted(answer[:12] for answer in answers) == [b""] * 4 + [b"HTTP/1.1 408"] * HTTP_CONNECTIONS_MAX
    health = await wait_for_health(address, 200)
    assert health["status"] == "ok"
    assert network.replica_alive(0)


@pytest.mark.parametrize("replica_count", [4], ids=["n4"])
async def test_health_is_503_with_a_reason_when_the_peers_are_down(initialised_network: LocalNetwork, replica_count: int) -> None:
    network = initialised_network
    process = await trio.lowlevel.open_process(
        [*NODE_COMMAND, "run", str(network.replica_config_path(0))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        health = await wait_for_health(metrics_address(network, 0), 503)
        assert health["status"] == "unavailable"
        assert health["reason"] == f"connected to 0 of {replica_count - 1} peers, {network.network.quorum - 1} needed for a quorum"
        assert health["peers"] == 0 and health["height"] == 0
        assert process.returncode is None
    finally:
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.mark.parametrize("replica_count", [4], ids=["n4"])
async def test_a_taken_metrics_port_stops_the_replica_in_one_line_and_up_reports_nothing_healthy(
    initialised_network: LocalNetwork, replica_count: int
) -> None:
    """Another process answering on the metrics port must never pass for the replica's health."""
    network = initialised_network
    address = metrics_address(network, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((address.host, address.port))
        squatter.listen()
        run = await run_command([*NODE_COMMAND, "run", str(network.replica_config_path(0))])
        up = await run_command([*NODE_COMMAND, "up", str(network.directory), "--only", "0"])
    assert run.exit_code == 2, run.describe()
    assert run.stderr.strip() == f"ledger-node: metrics: cannot listen on {address}: {address} is already in use by another process"
    assert "replica 0 exited with code 2" in up.stdout, up.describe()
    assert not any(READY_LINE.match(line) or " healthy" in line for line in up.stdout.splitlines()), up.describe()
