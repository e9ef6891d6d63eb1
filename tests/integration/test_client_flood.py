"""A client that opens every connection it can, or opens them and says nothing, cannot lock others out."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
import trio

from client.library import open_client
from ledger.config import Address
from ledger.framing import FRAME_HEADER_SIZE, FrameDecoder, frame
from ledger.messages import StatusQuery, Subscribe, encode_message
from ledger.sizes import CLIENT_FRAME_SIZE_MAX

from .replica_processes import connected_client, replica_processes, resident_memory_bytes

pytestmark = pytest.mark.integration

# Linux routes all of 127.0.0.0/8 to the loopback device: the attacker uses 16 other addresses,
# enough to fill a replica's 256 client slots at 16 per address; the honest client uses 127.0.0.1.
ATTACKER_HOSTS = tuple(f"127.0.0.{2 + index}" for index in range(16))
ATTEMPTS_PER_REPLICA = 600
SUBSCRIBED_ACCOUNTS = 256
DEADLINE_S = 120.0
PEAK_RESIDENT_BYTES_MAX = 256 * 2**20


def allow_open_files(count: int) -> int:
    """Raise this process's open-file limit towards `count`; returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


async def open_as_attacker(address: Address, host: str) -> trio.SocketStream | None:
    """A connection from an attacker's address that asks for its status, follows many accounts and
    leaves the largest frame a client may send unfinished (so the replica buffers it), then idles."""
    try:
        stream = await trio.open_tcp_stream(address.host, address.port, local_address=host)
    except OSError:
        return None
    try:
        subscribe = Subscribe(tuple(os.urandom(32) for _ in range(SUBSCRIBED_ACCOUNTS)))
        unfinished = CLIENT_FRAME_SIZE_MAX.to_bytes(FRAME_HEADER_SIZE, "big") + bytes(CLIENT_FRAME_SIZE_MAX - 1)
        await stream.send_all(frame(encode_message(StatusQuery(7))) + frame(encode_message(subscribe)) + unfinished)
    except (trio.BrokenResourceError, OSError):
        await stream.aclose()
        return None
    return stream


async def kept_open(stream: trio.SocketStream) -> bool:
    """Whether the replica kept the connection: it answers the status query, or closes a refused one."""
    decoder = FrameDecoder()
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return False
            if decoder.feed(data):
                return True
    except trio.BrokenResourceError:
        return False


async def closed_by_replica(stream: trio.SocketStream) -> None:
    """Until the replica closes the connection (we never send anything more)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


async def test_one_address_holding_every_connection_it_can_does_not_lock_out_other_clients(tmp_path: Path) -> None:
    """Regression (hole 5): 256 idle connections from one address filled a replica's client table,
    so no other client could connect. Now one address holds at most client_connections_per_address_max,
    and when a few addresses fill the table a newcomer takes the place of one of theirs."""
    allow_open_files(4 * ATTEMPTS_PER_REPLICA + 512)
    async with replica_processes(tmp_path / "net", 4) as replicas:
        network = replicas.network
        per_address = network.protocol.client_connections_per_address_max
        held: list[trio.SocketStream] = []
        try:
            with trio.fail_after(DEADLINE_S):
                async with connected_client(replicas) as probe:
                    await probe.wait_until_ready(deadline_s=30)  # every replica listens
                kept: dict[int, int] = {}
                for replica in network.replicas:
                    streams = []
                    for attempt in range(ATTEMPTS_PER_REPLICA):
                        host = ATTACKER_HOSTS[attempt % len(ATTACKER_HOSTS)]
                        stream = await open_as_attacker(replica.client_address, host)
                        if stream is not None:
                            streams.append((host, stream))
                    held += [stream for _, stream in streams]
                    kept_by_host: dict[str, int] = {}

                    async def check(host: str, stream: trio.SocketStream, kept_by_host: dict[str, int] = kept_by_host) -> None:
                        still_open = await kept_open(stream)
                        kept_by_host[host] = kept_by_host.get(host, 0) + still_open

                    async with trio.open_nursery() as nursery:
                        for host, stream in streams:
                            nursery.start_soon(check, host, stream)
                    assert max(kept_by_host.values()) <= per_address, kept_by_host
                    kept[replica.replica_id] = sum(kept_by_host.values())
                # Every slot is taken, and no address holds more than its share.
                assert all(count == network.protocol.client_connections_max for count in kept.values()), kept
                assert per_address * len(ATTACKER_HOSTS) == network.protocol.client_connections_max
                # The attacker still holds its connections; an honest client from another address is served.
                async with open_client(replicas.client_config_path) as client:
                    await client.wait_until_ready(deadline_s=30)
                    receipt = await client.put("honest", "served while flooded")
                    assert receipt.result.ok
                    assert await client.get("honest") == "served while flooded"
                peaks = {replica_id: resident_memory_bytes(replicas.pid(replica_id), "VmHWM") for replica_id in range(4)}
                print("attacker connections kept per replica:", kept)
                print("peak resident memory per replica under the flood (MiB):", {r: round(p / 2**20, 1) for r, p in peaks.items()})
                assert max(peaks.values()) < PEAK_RESIDENT_BYTES_MAX, peaks
        finally:
            for stream in held:
                with trio.CancelScope(shield=True):
                    await stream.aclose()


async def test_connections_that_send_no_frame_are_closed_and_clients_reconnect(tmp_path: Path) -> None:
    """Regression (hole 5): a connection that never sent a complete frame was kept for ever."""
    settings = "client_first_frame_timeout_ms = 300\nclient_idle_timeout_ms = 1000\n"
    async with replica_processes(tmp_path / "net", 4, settings) as replicas:
        with trio.fail_after(DEADLINE_S):
            async with connected_client(replicas) as client:
                await client.wait_until_ready(deadline_s=30)
                address = replicas.network.replicas[0].client_address
                silent = await trio.open_tcp_stream(address.host, address.port)
                partial = await trio.open_tcp_stream(address.host, address.port)
                # Half a frame: a header announcing 100 bytes, then 10 of them.
                await partial.send_all((100).to_bytes(FRAME_HEADER_SIZE, "big") + bytes(10))
                quiet = await trio.open_tcp_stream(address.host, address.port)
                await quiet.send_all(frame(encode_message(StatusQuery(9))))
                async with silent, partial, quiet:
                    await closed_by_replica(silent)
                    await closed_by_replica(partial)
                    await closed_by_replica(quiet)  # one frame, then nothing for the idle timeout
                # The library reconnects by itself: the client that idled meanwhile is still served.
                receipt = await client.put("after-timeouts", "still served")
                assert receipt.result.ok
