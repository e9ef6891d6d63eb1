"""A TCP proxy on every replica-to-replica link, for the scenario runner: delays, cuts and partitions set at runtime.

Each ordered link (one replica process dialing one peer) gets a listener of its own; the dialer's
config names that listener as the peer's address, and the proxy forwards the bytes to wherever the
link points (the peer's real port, or one of two twins). The replicas under test stay unmodified:
they authenticate each other end to end through the proxy, which never reads what it forwards.

Per link: a delay (fixed plus a uniform jitter, milliseconds) for every chunk in both directions;
`cut` closes the link's open connections (the dialer reconnects); `block` (a partition) cuts them
and closes every new one at once until `unblock`. Bytes within a connection are never reordered:
a chunk is released no earlier than the one before it. Everything is bounded: each direction of a
connection holds at most LINK_BUFFER_BYTES_MAX bytes (then the proxy stops reading, so TCP pushes
back on the sender), and a link holds at most LINK_CONNECTIONS_MAX connections at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from ledger.config import Address

CHUNK_SIZE_MAX = 16 * 1024
LINK_BUFFER_CHUNKS = 16
LINK_BUFFER_BYTES_MAX = (LINK_BUFFER_CHUNKS + 2) * CHUNK_SIZE_MAX  # the queue, plus one chunk each being read and written
# The dialer's connection, plus a stale one still closing after a reconnect.
LINK_CONNECTIONS_MAX = 2
CONNECT_TIMEOUT_S = 2.0
DELAY_MS_MAX = 10_000


class LinkProxyError(ValueError):
    """A link setting out of range, or a link that does not exist."""


@dataclass(eq=False)
class Link:
    """One ordered link: what connects to `listen_port` is forwarded to `target` (None: nowhere, refused)."""

    name: str
    target: Address | None
    source_host: str | None = None  # when set, a connection from any other address is refused (in --hosts mode each dialer has its own)
    delay_ms: int = 0
    jitter_ms: int = 0
    blocked: bool = False
    listen_port: int = 0
    connections: set[trio.CancelScope] = field(default_factory=set)
    accepted: int = 0
    refused: int = 0  # closed at once: blocked, pointing nowhere, too many open, or the target unreachable
    cut_connections: int = 0
    bytes_forwarded: int = 0
    buffered_bytes: int = 0
    buffered_bytes_peak: int = 0

    def cut(self) -> None:
        for scope in list(self.connections):
            scope.cancel()
        self.cut_connections += len(self.connections)


def _check_delay(delay_ms: int, jitter_ms: int) -> None:
    for name, value in (("delay_ms", delay_ms), ("jitter_ms", jitter_ms)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= DELAY_MS_MAX:
            raise LinkProxyError(f"{name}: expected a whole number of milliseconds 0..{DELAY_MS_MAX}, got {value!r}")


def _from(stream: trio.SocketStream, host: str | None) -> bool:
    """Whether the connection comes from `host` (any host when None): nobody else takes the link's slots."""
    if host is None:
        return True
    try:
        return bool(stream.socket.getpeername()[0] == host)
    except (OSError, IndexError):
        return False


class LinkProxy:
    """The links of one network, each listening on `host` (port chosen by the kernel)."""

    def __init__(self, host: str, seed: int = 0) -> None:
        self.host = host
        self.links: dict[str, Link] = {}
        self.random = random.Random(seed)  # jitter draws: not a secret, and a seed makes them repeatable

    def add_link(self, name: str, target: Address | None, delay_ms: int = 0, jitter_ms: int = 0, source_host: str | None = None) -> Link:
        if name in self.links:
            raise LinkProxyError(f"link {name!r} already exists")
        _check_delay(delay_ms, jitter_ms)
        link = Link(name, target, source_host, delay_ms, jitter_ms)
        self.links[name] = link
        return link

    def link(self, name: str) -> Link:
        try:
            return self.links[name]
        except KeyError:
            raise LinkProxyError(f"no link {name!r}") from None

    # ---- changed at runtime ----

    def set_delay(self, names: Iterable[str], delay_ms: int, jitter_ms: int = 0) -> None:
        """From now on (chunks already queued keep their release time)."""
        _check_delay(delay_ms, jitter_ms)
        for name in names:
            link = self.link(name)
            link.delay_ms, link.jitter_ms = delay_ms, jitter_ms

    def cut(self, names: Iterable[str]) -> None:
        for name in names:
            self.link(name).cut()

    def block(self, names: Iterable[str]) -> None:
        for name in names:
            link = self.link(name)
            link.blocked = True
            link.cut()

    def unblock(self, names: Iterable[str]) -> None:
        for name in names:
            self.link(name).blocked = False

    # ---- running ----

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for every link added so far; `listen_port` is set on each when this has started."""
        async with trio.open_nursery() as nursery:
            for link in self.links.values():
                listeners = await trio.open_tcp_listeners(0, host=self.host)
                link.listen_port = listeners[0].socket.getsockname()[1]
                nursery.start_soon(self._serve_listeners, link, listeners)
            task_status.started()

    async def _serve_listeners(self, link: Link, listeners: list[trio.SocketListener]) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            await self._forward(link, stream)

        await trio.serve_listeners(handler, listeners)

    def _delay_s(self, link: Link) -> float:
        jitter = self.random.randint(0, link.jitter_ms) if link.jitter_ms else 0
        return (link.delay_ms + jitter) / 1000

    async def _forward(self, link: Link, inbound: trio.SocketStream) -> None:
        async with inbound:
            if link.blocked or link.target is None or len(link.connections) >= LINK_CONNECTIONS_MAX or not _from(inbound, link.source_host):
                link.refused += 1
                return
            link.accepted += 1
            with trio.CancelScope() as scope:
                # Registered before connecting: a block that comes meanwhile cuts this one too.
                link.connections.add(scope)
                try:
                    outbound = None
                    with trio.move_on_after(CONNECT_TIMEOUT_S):
                        try:
                            outbound = await trio.open_tcp_stream(link.target.host, link.target.port)
                        except OSError:
                            pass
                    if outbound is None:
                        link.refused += 1
                        return
                    async with outbound, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, link, inbound, outbound, nursery.cancel_scope)
                        nursery.start_soon(self._pipe, link, outbound, inbound, nursery.cancel_scope)
                finally:
                    link.connections.discard(scope)

    async def _pipe(self, link: Link, source: trio.SocketStream, destination: trio.SocketStream, connection: trio.CancelScope) -> None:
        """One direction: read, hold each chunk for the link's delay, write, in order. When the source
        ends (or either side fails) what was read is still written, then the whole connection closes."""
        sender, receiver = trio.open_memory_channel[tuple[float, bytes]](LINK_BUFFER_CHUNKS)
        held = 0  # this direction's share of link.buffered_bytes, given back whatever way it ends

        def account(size: int) -> None:
            nonlocal held
            held += size
            link.buffered_bytes += size
            link.buffered_bytes_peak = max(link.buffered_bytes_peak, link.buffered_bytes)

        async def read() -> None:
            release_at = 0.0
            async with sender:
                while True:
                    data = await source.receive_some(CHUNK_SIZE_MAX)
                    if not data:
                        return
                    account(len(data))
                    # Never before the chunk ahead of it: a shorter jitter draw must not overtake.
                    release_at = max(release_at, trio.current_time() + self._delay_s(link))
                    await sender.send((release_at, data))

        async def write() -> None:
            async with receiver:
                async for release_at, data in receiver:
                    try:
                        await trio.sleep_until(release_at)
                        await destination.send_all(data)
                        link.bytes_forwarded += len(data)
                    finally:
                        account(-len(data))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(write)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            link.buffered_bytes -= held
            connection.cancel()
