"""The scenario runner's link proxy (node/link_proxy.py) in isolation: delay, cut, partition and heal, order, bounds."""

from __future__ import annotations

import functools
import random

import pytest
import trio
import trio.testing

from ledger.config import Address
from node.link_proxy import LINK_BUFFER_BYTES_MAX, LINK_CONNECTIONS_MAX, LinkProxy, LinkProxyError

HOST = "127.0.0.1"


class Target:
    """A peer's real port: keeps every connection it accepts and what arrived on it."""

    def __init__(self, reading: bool = True) -> None:
        self.reading = trio.Event()
        if reading:
            self.reading.set()
        self.connections: list[bytearray] = []
        self.streams: list[trio.SocketStream] = []
        self.arrived = trio.Condition()
        self.port = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        received = bytearray()
        self.connections.append(received)
        self.streams.append(stream)
        async with self.arrived:
            self.arrived.notify_all()
        await self.reading.wait()
        while data := await stream.receive_some(65536):
            received += data
            async with self.arrived:
                self.arrived.notify_all()

    async def wait_for(self, condition) -> None:  # noqa: ANN001
        async with self.arrived:
            while not condition():
                await self.arrived.wait()


async def start(nursery: trio.Nursery, target: Target, delay_ms: int = 0, jitter_ms: int = 0) -> LinkProxy:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, target.handler, 0, host=HOST))
    target.port = listeners[0].socket.getsockname()[1]
    proxy = LinkProxy(HOST, seed=1)
    proxy.add_link("0->1", Address(HOST, target.port), delay_ms, jitter_ms)
    await nursery.start(proxy.run)
    return proxy


async def dial(proxy: LinkProxy, name: str = "0->1") -> trio.SocketStream:
    return await trio.open_tcp_stream(HOST, proxy.link(name).listen_port)


async def test_bytes_arrive_in_order_through_a_jittery_link() -> None:
    payload = random.Random(7).randbytes(3 * 1024 * 1024)
    target = Target()
    async with trio.open_nursery() as nursery:
        proxy = await start(nursery, target, delay_ms=1, jitter_ms=20)
        stream = await dial(proxy)
        for offset in range(0, len(payload), 5000):  # many small writes, each drawing its own jitter
            await stream.send_all(payload[offset : offset + 5000])
        with trio.fail_after(30):
            await target.wait_for(lambda: target.connections and len(target.connections[0]) == len(payload))
        assert bytes(target.connections[0]) == payload
        assert proxy.link("0->1").bytes_forwarded == len(payload)
        nursery.cancel_scope.cancel()


async def test_a_delayed_link_holds_each_chunk_for_its_delay(mock_clock: trio.testing.MockClock) -> None:
    target = Target()
    async with trio.open_nursery() as nursery:
        proxy = await start(nursery, target, delay_ms=500)
        stream = await dial(proxy)
        await stream.send_all(b"hello")
        await trio.testing.wait_all_tasks_blocked()
        assert target.connections == [bytearray()]  # connected, nothing delivered yet
        mock_clock.jump(0.499)
        await trio.testing.wait_all_tasks_blocked()
        assert target.connections == [bytearray()]
        mock_clock.jump(0.002)
        with trio.fail_after(5):
            await target.wait_for(lambda: target.connections[0] == b"hello")
        # A delay changed at runtime applies to what is sent from then on.
        proxy.set_delay(["0->1"], 0)
        await stream.send_all(b" world")
        with trio.fail_after(5):
            await target.wait_for(lambda: target.connections[0] == b"hello world")
        nursery.cancel_scope.cancel()


async def test_a_cut_closes_the_connection_and_the_dialer_can_reconnect() -> None:
    target = Target()
    async with trio.open_nursery() as nursery:
        proxy = await start(nursery, target)
        stream = await dial(proxy)
        await stream.send_all(b"first")
        with trio.fail_after(5):
            await target.wait_for(lambda: target.connections and target.connections[0] == b"first")
        proxy.cut(["0->1"])
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # the dialer sees its connection close
        again = await dial(proxy)
        await again.send_all(b"second")
        with trio.fail_after(5):
            await target.wait_for(lambda: len(target.connections) == 2 and target.connections[1] == b"second")
        assert proxy.link("0->1").cut_connections == 1
        nursery.cancel_scope.cancel()


async def test_a_partition_refuses_the_link_until_it_heals() -> None:
    target = Target()
    async with trio.open_nursery() as nursery:
        proxy = await start(nursery, target)
        stream = await dial(proxy)
        await stream.send_all(b"before")
        with trio.fail_after(5):
            await target.wait_for(lambda: target.connections and target.connections[0] == b"before")
        proxy.block(["0->1"])
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""
        # While partitioned, a new connection is closed at once and never reaches the target.
        blocked = await dial(proxy)
        with trio.fail_after(5):
            assert await blocked.receive_some(100) == b""
        await trio.testing.wait_all_tasks_blocked()
        assert len(target.connections) == 1
        assert proxy.link("0->1").refused == 1
        proxy.unblock(["0->1"])
        healed = await dial(proxy)
        await healed.send_all(b"after")
        with trio.fail_after(5):
            await target.wait_for(lambda: len(target.connections) == 2 and target.connections[1] == b"after")
        nursery.cancel_scope.cancel()


async def test_a_link_buffers_a_bounded_amount_and_pushes_back_on_the_sender() -> None:
    payload = random.Random(8).randbytes(48 * 1024 * 1024)  # far more than the kernel's socket buffers
    target = Target(reading=False)
    sent = 0
    async with trio.open_nursery() as nursery:
        proxy = await start(nursery, target)
        stream = await dial(proxy)

        async def send_everything() -> None:
            nonlocal sent
            for offset in range(0, len(payload), 65536):
                await stream.send_all(payload[offset : offset + 65536])
                sent += 65536

        nursery.start_soon(send_everything)
        # The target reads nothing: everything stops once the buffers are full.
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        link = proxy.link("0->1")
        assert sent < len(payload)
        assert 0 < link.buffered_bytes_peak <= LINK_BUFFER_BYTES_MAX
        target.reading.set()
        with trio.fail_after(60):
            await target.wait_for(lambda: len(target.connections[0]) == len(payload))
        assert bytes(target.connections[0]) == payload
        assert link.buffered_bytes_peak <= LINK_BUFFER_BYTES_MAX
        nursery.cancel_scope.cancel()


async def test_a_link_holds_a_bounded_number_of_connections() -> None:
    target = Target()
    async with trio.open_nursery() as nursery:
        proxy = await start(nursery, target)
        streams = [await dial(proxy) for _ in range(LINK_CONNECTIONS_MAX)]
        with trio.fail_after(5):
            await target.wait_for(lambda: len(target.connections) == LINK_CONNECTIONS_MAX)
        extra = await dial(proxy)
        with trio.fail_after(5):
            assert await extra.receive_some(100) == b""
        assert proxy.link("0->1").refused == 1 and len(streams) == LINK_CONNECTIONS_MAX
        nursery.cancel_scope.cancel()


async def test_a_link_pointing_nowhere_refuses_and_bad_settings_are_refused() -> None:
    proxy = LinkProxy(HOST)
    proxy.add_link("twin->2", None)
    with pytest.raises(LinkProxyError, match="already exists"):
        proxy.add_link("twin->2", None)
    with pytest.raises(LinkProxyError, match="delay_ms"):
        proxy.add_link("x", None, delay_ms=-1)
    with pytest.raises(LinkProxyError, match="jitter_ms"):
        proxy.set_delay(["twin->2"], 0, 10**9)
    with pytest.raises(LinkProxyError, match="no link"):
        proxy.block(["nope"])
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        stream = await dial(proxy, "twin->2")
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""
        assert proxy.link("twin->2").refused == 1
        nursery.cancel_scope.cancel()


async def test_a_link_for_one_dialer_refuses_connections_from_other_addresses() -> None:
    target = Target()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, target.handler, 0, host=HOST))
        proxy = LinkProxy(HOST)
        proxy.add_link("mine", Address(HOST, listeners[0].socket.getsockname()[1]), source_host=HOST)
        proxy.add_link("theirs", Address(HOST, listeners[0].socket.getsockname()[1]), source_host="10.213.0.99")
        await nursery.start(proxy.run)
        stranger = await dial(proxy, "theirs")
        with trio.fail_after(5):
            assert await stranger.receive_some(100) == b""
        mine = await dial(proxy, "mine")
        await mine.send_all(b"ok")
        with trio.fail_after(5):
            await target.wait_for(lambda: target.connections == [bytearray(b"ok")])
        assert proxy.link("theirs").refused == 1
        nursery.cancel_scope.cancel()
