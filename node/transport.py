"""Replica-to-replica connections over TCP: signed handshakes, length-prefixed frames, bounded queues.

Each replica dials every peer and uses that connection only to send; it accepts connections only
to receive. One direction per connection keeps reconnection simple: no tie-breaking is needed
when two replicas dial each other at once. Frames queued for a disconnected peer are dropped
when its bounded queue is full; the protocol retransmits what matters.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ledger.config import Address, NetworkConfig
from ledger.crypto import SigningKey, signing_domain, verify_signature
from ledger.encoding import CodecError
from ledger.framing import FramedStream, FrameError, FrameQueue
from ledger.messages import (
    Hello,
    HelloProof,
    decode_message,
    encode_message,
    handshake_signed_bytes,
)

PEER_QUEUE_FRAMES_MAX = 8192
PEER_QUEUE_FRAMES_OF_MAX_SIZE = 4  # a peer's queue holds at most this many maximum-size frames' bytes
HANDSHAKE_TIMEOUT_S = 5.0
DIAL_BACKOFF_S = (0.05, 2.0)
# Warnings about what peers (or strangers) send, per second: a peer flooding bad frames is counted
# in full (bad_frames) but cannot fill the disk with one line per frame.
MALFORMED_LOGGED_PER_SECOND = 50

log = logging.getLogger("node.transport")


class RateLimitedWarnings:
    """At most `per_second` warning lines a second; the next second says how many were left out."""

    def __init__(self, logger: logging.Logger, per_second: int) -> None:
        self.logger, self.per_second = logger, per_second
        self.second = 0
        self.logged = 0
        self.suppressed = 0

    def warning(self, text: str, *arguments: Any) -> None:
        second = int(time.monotonic())
        if second != self.second:
            if self.suppressed:
                self.logger.warning("%d more warnings about peers not logged in the last second", self.suppressed)
            self.second, self.logged, self.suppressed = second, 0, 0
        if self.logged < self.per_second:
            self.logged += 1
            self.logger.warning(text, *arguments)
        else:
            self.suppressed += 1


class ListenError(Exception):
    """A replica cannot listen on one of its addresses; the message names the address."""


async def listen(address: Address) -> list[trio.SocketListener]:
    """Listeners on `address`, or ListenError naming it (most often: another process has the port)."""
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on {address}: {address} is already in use by another process") from None
        raise ListenError(f"cannot listen on {address}: {error.strerror or error}") from None


def _remote_address(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError):
        return "an unknown address"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class HandshakeError(Exception):
    """The peer is not who the configuration says, or did not finish the handshake."""


async def receive_message(framed: FramedStream) -> Any:
    data = await framed.receive()
    if data is None:
        raise HandshakeError("connection closed")
    return decode_message(data)


class PeerTransport:
    """Dials and accepts the other replicas of one network on behalf of replica `replica_id`."""

    def __init__(
        self,
        network: NetworkConfig,
        replica_id: int,
        key: SigningKey,
        deliver: Callable[[int, Any], Awaitable[None]],
        decode: Callable[[bytes], Any] = decode_message,
    ) -> None:
        self.network = network
        self.replica_id = replica_id
        self.key = key
        self.deliver = deliver
        self.decode = decode  # decode_message, perhaps with the replica's KnownTransactions
        self.domain = signing_domain(network.identity, "handshake")
        self.frame_size_max = network.protocol.frame_size_max
        self.queues: dict[int, FrameQueue] = {
            peer.replica_id: FrameQueue(PEER_QUEUE_FRAMES_MAX, PEER_QUEUE_FRAMES_OF_MAX_SIZE * self.frame_size_max)
            for peer in network.replicas
            if peer.replica_id != replica_id
        }
        self.connected_out: set[int] = set()
        # Authenticated incoming connections per peer: the remote address of each. Two at once
        # for one replica id means two processes hold its key (a copy started by mistake, or a
        # traitor's twin): PBFT survives it if counted among the f, but operators must hear of it.
        self.incoming: dict[int, dict[int, str]] = {}
        self.incoming_ids = itertools.count()
        self.duplicate_identities_seen: dict[int, int] = {}  # peer -> times a second connection came
        self.dropped_frames = 0
        self.bad_frames = 0
        self.warnings = RateLimitedWarnings(log, MALFORMED_LOGGED_PER_SECOND)

    # ---- sending ----

    def send(self, to: int | None, message: Any) -> None:
        """Queue a message for one peer, or all peers when `to` is None; never blocks."""
        self.send_encoded(to, encode_message(message))

    def has_room(self, peer: int, size: int) -> bool:
        """Whether a payload of `size` bytes sent to `peer` now would be queued, not dropped."""
        return peer in self.connected_out and peer in self.queues and self.queues[peer].budget.free() >= size

    def send_encoded(self, to: int | None, payload: bytes) -> None:
        """Queue an already-encoded message, as `send` does."""
        targets = self.queues if to is None else ([to] if to in self.queues else [])
        for target in targets:
            if target not in self.connected_out:
                # Like a real network, a peer that is down misses what is sent meanwhile; it
                # recovers through retransmission and state transfer, not a stale backlog.
                self.dropped_frames += 1
                continue
            if not self.queues[target].put(payload):
                self.dropped_frames += 1

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await listen(self.network.replicas[self.replica_id].address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._accept, listeners)
            for peer in self.queues:
                nursery.start_soon(self._dial_forever, peer)
            task_status.started()

    async def _dial_forever(self, peer: int) -> None:
        address = self.network.replicas[peer].address
        backoff = DIAL_BACKOFF_S[0]
        queue = self.queues[peer]
        while True:
            try:
                stream = await trio.open_tcp_stream(address.host, address.port)
            except OSError:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, DIAL_BACKOFF_S[1])
                continue
            try:
                async with stream:
                    framed = FramedStream(stream, self.frame_size_max)
                    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                        await self._handshake_as_dialer(framed, peer)
                    backoff = DIAL_BACKOFF_S[0]
                    self.connected_out.add(peer)
                    log.info("connected to replica %d at %s", peer, address)
                    await self._pump(framed, queue)
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as group:
                log.debug("connection to replica %d lost: %s", peer, group.exceptions[0])
            except* (HandshakeError, CodecError, FrameError) as group:
                self.warnings.warning("handshake with replica %d at %s failed: %s", peer, address, group.exceptions[0])
            if peer in self.connected_out:
                self.connected_out.discard(peer)
                log.info("disconnected from replica %d", peer)
            queue.clear()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, DIAL_BACKOFF_S[1])

    async def _pump(self, framed: FramedStream, queue: FrameQueue) -> None:
        """Write queued frames until the connection breaks; the peer never writes after the handshake."""
        async with trio.open_nursery() as nursery:

            async def watch_for_close() -> None:
                await framed.receive()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_for_close)
            await queue.pump(framed)

    async def _handshake_as_dialer(self, framed: FramedStream, peer: int) -> None:
        challenge = os.urandom(32)
        await framed.send(encode_message(self._hello(challenge)))
        hello = await receive_message(framed)
        proof = await receive_message(framed)
        if not isinstance(hello, Hello) or not isinstance(proof, HelloProof):
            raise HandshakeError("unexpected message during handshake")
        if hello.network_id != self.network.network_id or hello.replica_id != peer:
            raise HandshakeError(f"peer answered as replica {hello.replica_id} of {hello.network_id!r}")
        self._check_same_settings(hello)
        expected = handshake_signed_bytes("accept", challenge, hello.challenge, self.replica_id, peer)
        if not verify_signature(self.network.replicas[peer].public_key, self.domain, expected, proof.signature):
            raise HandshakeError(f"peer does not hold replica {peer}'s key")
        signature = self.key.sign(
            self.domain, handshake_signed_bytes("dial", challenge, hello.challenge, self.replica_id, peer)
        )
        await framed.send(encode_message(HelloProof(signature)))

    def _hello(self, challenge: bytes) -> Hello:
        return Hello(self.network.network_id, self.replica_id, challenge, self.network.genesis_hash, self.network.protocol_values)

    def _check_same_settings(self, hello: Hello) -> None:
        """Refuse a peer whose config file differs from ours: one edited file must not make one
        replica quietly run other rules (timeouts, windows, frame sizes) than the rest."""
        difference = self.network.protocol_difference(hello.genesis_hash, hello.protocol)
        if difference is not None:
            raise HandshakeError(f"replica {hello.replica_id}'s config differs from this one's: it has {difference}")

    @property
    def connected_in(self) -> set[int]:
        return {peer for peer, connections in self.incoming.items() if connections}

    def duplicate_identities(self) -> dict[int, int]:
        """Peers with more than one authenticated incoming connection right now, and how many."""
        return {peer: len(connections) for peer, connections in self.incoming.items() if len(connections) > 1}

    def _add_incoming(self, peer: int, address: str) -> int:
        connections = self.incoming.setdefault(peer, {})
        if connections:
            self.duplicate_identities_seen[peer] = self.duplicate_identities_seen.get(peer, 0) + 1
            others = ", ".join(sorted(connections.values()))
            self.warnings.warning(
                "two connections claim replica %d: from %s and from %s; each proved it holds replica %d's key, "
                "so a second process runs with it (stop the copy), unless the first is a stale connection "
                "of a replica that restarted",
                peer,
                others,
                address,
                peer,
            )
        connection_id = next(self.incoming_ids)
        connections[connection_id] = address
        return connection_id

    # ---- receiving ----

    async def _accept(self, stream: trio.SocketStream) -> None:
        framed = FramedStream(stream, self.frame_size_max)
        peer: int | None = None
        connection_id: int | None = None
        try:
            async with stream:
                with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                    peer = await self._handshake_as_acceptor(framed)
                connection_id = self._add_incoming(peer, _remote_address(stream))
                await self._receive_loop(framed, peer)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except* trio.TooSlowError:
            self.warnings.warning("an incoming connection did not finish the handshake in time")
        except* (HandshakeError, CodecError) as group:
            self.warnings.warning("refused an incoming connection: %s", group.exceptions[0])
        except* FrameError as group:
            self.bad_frames += 1
            self.warnings.warning("dropped replica %s: %s", peer, group.exceptions[0])
        finally:
            if peer is not None and connection_id is not None:
                # Only this connection: another one from the same replica id may still be open.
                del self.incoming[peer][connection_id]

    async def _handshake_as_acceptor(self, framed: FramedStream) -> int:
        hello = await receive_message(framed)
        if not isinstance(hello, Hello):
            raise HandshakeError("expected a hello")
        if hello.network_id != self.network.network_id:
            raise HandshakeError(f"peer belongs to network {hello.network_id!r}")
        peer = hello.replica_id
        if peer >= self.network.replica_count or peer == self.replica_id:
            raise HandshakeError(f"unknown replica {peer}")
        self._check_same_settings(hello)
        challenge = os.urandom(32)
        signature = self.key.sign(
            self.domain, handshake_signed_bytes("accept", hello.challenge, challenge, peer, self.replica_id)
        )
        await framed.send(encode_message(self._hello(challenge)))
        await framed.send(encode_message(HelloProof(signature)))
        proof = await receive_message(framed)
        expected = handshake_signed_bytes("dial", hello.challenge, challenge, peer, self.replica_id)
        if not isinstance(proof, HelloProof) or not verify_signature(
            self.network.replicas[peer].public_key, self.domain, expected, proof.signature
        ):
            raise HandshakeError(f"peer claiming to be replica {peer} does not hold its key")
        return peer

    async def _receive_loop(self, framed: FramedStream, peer: int) -> None:
        while True:
            data = await framed.receive()  # yields at least every FRAMES_PER_CHECKPOINT frames
            if data is None:
                return
            try:
                message = self.decode(data)
            except CodecError as error:
                self.bad_frames += 1
                self.warnings.warning("dropped a malformed message from replica %d: %s", peer, error)
                continue
            await self.deliver(peer, message)
