"""Garbage, oversized frames and malformed messages on a replica's client and peer ports never crash it."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from client.library import Client
from ledger.config import Address, NetworkConfig
from ledger.crypto import NetworkIdentity, SigningKey, read_key_file, signing_domain
from ledger.encoding import CodecError, encode
from ledger.framing import FRAME_HEADER_SIZE, FrameDecoder, frame
from ledger.messages import (
    Blocks,
    Commit,
    ErrorReply,
    FetchBlocks,
    Hello,
    HelloProof,
    Prepare,
    Query,
    Request,
    Status,
    StatusQuery,
    decode_message,
    encode_message,
    handshake_signed_bytes,
)
from ledger.transactions import Put, Transaction, sign_transaction

from .local_network import LocalNetwork, wait_for_agreement

pytestmark = pytest.mark.integration

EXCHANGE_DEADLINE_S = 10.0
LOG_POLL_INTERVAL_S = 0.02
DEADLINE_S = 60.0
LARGEST_LENGTH_PREFIX = (1 << (8 * FRAME_HEADER_SIZE)) - 1
GARBAGE = random.Random(20240501).randbytes(4096)
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: ledger\r\n\r\n"

# Well-framed payloads that are not valid messages: every one must be refused by the decoder.
MALFORMED_MESSAGES: dict[str, bytes] = {
    "empty": b"",
    "not-cbor": b"\xff\xfe\xfd\xfc",
    "truncated-cbor": encode(["request", [bytes(32), 0, ["put", "key", "value"], bytes(64)]])[:-5],
    "not-an-array": encode({"request": 1}),
    "empty-array": encode([]),
    "unknown-tag": encode(["launch-missiles", 1]),
    "tag-not-text": encode([7, 1]),
    "missing-fields": encode(["request"]),
    "wrong-field-type": encode(["status-query", "one"]),
    "negative-nonce": encode(["request", [bytes(32), -1, ["put", "key", "value"], bytes(64)]]),
    "out-of-range-count": encode(["fetch-blocks", 1, 1_000_000]),
    "short-signature": encode(["request", [bytes(32), 0, ["put", "key", "value"], bytes(3)]]),
    "unknown-operation": encode(["request", [bytes(32), 0, ["mint", "key", 5], bytes(64)]]),
    "float": bytes.fromhex("82") + encode("status-query") + bytes.fromhex("f93c00"),
    "undefined": bytes.fromhex("82") + encode("status-query") + bytes.fromhex("f7"),
    "cbor-tag": bytes.fromhex("82") + encode("status-query") + bytes.fromhex("c11a00000000"),
    "duplicate-map-keys": bytes.fromhex("a2616101616102"),
    "invalid-utf8": bytes.fromhex("8262c328"),
    "deep-nesting": b"\x81" * 10_000 + b"\x00",
    "huge-declared-array": bytes.fromhex("9bffffffffffffffff"),
    "huge-declared-bytes": bytes.fromhex("5b4000000000000000"),
}


@dataclass(frozen=True)
class Outcome:
    """What a replica did with our bytes: the frames it sent back, and whether it closed the connection."""

    frames: list[bytes]
    closed: bool

    def messages(self) -> list[Any]:
        decoded = []
        for payload in self.frames:
            try:
                decoded.append(decode_message(payload))
            except CodecError as error:
                decoded.append(error)
        return decoded


async def exchange(address: Address, payload: bytes, *, half_close: bool, until_error_reply: bool = False) -> Outcome:
    """Send raw bytes; read until the replica closes (or, if asked, until it sends an ErrorReply)."""
    decoder = FrameDecoder()
    frames: list[bytes] = []
    with trio.fail_after(EXCHANGE_DEADLINE_S):
        stream = await trio.open_tcp_stream(address.host, address.port)
        async with stream:
            try:
                await stream.send_all(payload)
                if half_close:
                    await stream.send_eof()
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return Outcome(frames, closed=True)
                    frames.extend(decoder.feed(data))
                    if until_error_reply and any(isinstance(message, ErrorReply) for message in Outcome(frames, False).messages()):
                        return Outcome(frames, closed=False)
            except trio.BrokenResourceError:
                return Outcome(frames, closed=True)  # reset: it closed with our bytes unread


def assert_all_replicas_alive(network: LocalNetwork) -> None:
    assert network.run is not None
    assert not network.run.failures, network.diagnostics()
    for replica_id in range(network.replica_count):
        assert network.replica_alive(replica_id), f"replica {replica_id} died\n{network.diagnostics()}"
        log = network.log_text(replica_id)
        # The catch-all in the client handler logs this: unvalidated input reached code that raised.
        assert "internal error" not in log and "Traceback" not in log, f"replica {replica_id}\n{log}"


async def assert_network_still_commits(network: LocalNetwork, client: Client, key: str) -> None:
    receipt = await client.put(key, "still alive")
    assert receipt.result.ok
    await wait_for_agreement(client, minimum_height=receipt.height)
    assert_all_replicas_alive(network)


def forged_transaction() -> Transaction:
    """A well-formed request whose signature is not the sender's."""
    genuine = sign_transaction(NetworkIdentity("another-network", bytes(32)), SigningKey.generate(), 0, Put("forged", "value"))
    return Transaction(genuine.sender, genuine.nonce, genuine.operation, bytes(64))


async def test_bad_bytes_on_client_ports_are_refused(network: LocalNetwork, client: Client) -> None:
    frame_size_max = network.network.protocol.frame_size_max
    with trio.fail_after(DEADLINE_S):
        for replica in network.network.replicas:
            address = replica.client_address
            # Garbage: whatever it decodes as, the replica copes; we end the stream so it must finish.
            await exchange(address, GARBAGE, half_close=True)
            # Oversized length prefixes: the replica itself drops the connection.
            for prefix in (LARGEST_LENGTH_PREFIX, frame_size_max + 1):
                outcome = await exchange(address, prefix.to_bytes(FRAME_HEADER_SIZE, "big") + b"\x00" * 64, half_close=False)
                assert outcome.closed and not outcome.frames, f"replica {replica.replica_id}, prefix {prefix}"
            outcome = await exchange(address, HTTP_REQUEST, half_close=False)
            assert outcome.closed, f"replica {replica.replica_id} kept an HTTP request's connection open"
            # Well-framed but malformed: answered with an error, the connection kept.
            for name, payload in MALFORMED_MESSAGES.items():
                outcome = await exchange(address, frame(payload), half_close=False, until_error_reply=True)
                errors = [message for message in outcome.messages() if isinstance(message, ErrorReply)]
                assert errors and errors[0].reason.startswith("malformed message"), f"replica {replica.replica_id}, {name}: {outcome}"
            # Valid messages that a client must not send, or with a forged signature.
            peer_hello = hello(network.network, 0, bytes(32))
            outcome = await exchange(address, frame(encode_message(peer_hello)), half_close=False, until_error_reply=True)
            assert "unexpected message" in outcome.messages()[-1].reason
            forged = forged_transaction()
            outcome = await exchange(address, frame(encode_message(Request(forged))), half_close=False, until_error_reply=True)
            assert outcome.messages()[-1] == ErrorReply(forged.transaction_id, "bad signature")
        assert_all_replicas_alive(network)
        await assert_network_still_commits(network, client, "after-client-port-garbage")


async def test_bad_bytes_on_peer_ports_are_refused(network: LocalNetwork, client: Client) -> None:
    with trio.fail_after(DEADLINE_S):
        for replica in network.network.replicas:
            address = replica.address
            await exchange(address, GARBAGE, half_close=True)
            for prefix in (LARGEST_LENGTH_PREFIX, network.network.protocol.frame_size_max + 1):
                outcome = await exchange(address, prefix.to_bytes(FRAME_HEADER_SIZE, "big") + b"\x00" * 64, half_close=False)
                assert outcome.closed and not outcome.frames
            # Before the handshake, anything but a good hello ends the connection.
            for name, payload in MALFORMED_MESSAGES.items():
                outcome = await exchange(address, frame(payload), half_close=False)
                assert outcome.closed and not outcome.frames, f"replica {replica.replica_id}, {name}"
            other = (replica.replica_id + 1) % network.replica_count
            refused_hellos = {
                "another-network": Hello("another-network", other, os.urandom(32), bytes(32), ()),
                "unknown-replica": hello(network.network, network.replica_count, os.urandom(32)),
                "itself": hello(network.network, replica.replica_id, os.urandom(32)),
                "status-instead": Status(other, 0, 1),
            }
            for name, message in refused_hellos.items():
                outcome = await exchange(address, frame(encode_message(message)), half_close=False)
                assert outcome.closed and not outcome.frames, f"replica {replica.replica_id}, {name}"
            # A good hello, then a proof not made with the claimed replica's key.
            impostor = frame(encode_message(hello(network.network, other, os.urandom(32)))) + frame(
                encode_message(HelloProof(bytes(64)))
            )
            outcome = await exchange(address, impostor, half_close=False)
            assert outcome.closed
        assert_all_replicas_alive(network)
        await assert_network_still_commits(network, client, "after-peer-port-garbage")


def hello(network: NetworkConfig, replica_id: int, challenge: bytes) -> Hello:
    """A HELLO as a replica of `network` sends it (same genesis, same protocol settings)."""
    return Hello(network.network_id, replica_id, challenge, network.genesis_hash, network.protocol_values)


async def handshake_as(stream: trio.SocketStream, network: NetworkConfig, key: SigningKey, claimed: int, target: int) -> None:
    """Complete the dialer side of the peer handshake, as replica `claimed` holding its real key."""
    decoder = FrameDecoder()
    challenge = os.urandom(32)
    await stream.send_all(frame(encode_message(hello(network, claimed, challenge))))
    received: list[Any] = []
    while len(received) < 2:
        data = await stream.receive_some(65536)
        assert data, "the replica closed the connection during the handshake"
        received.extend(decode_message(payload) for payload in decoder.feed(data))
    answer, _ = received
    assert isinstance(answer, Hello) and answer.replica_id == target
    domain = signing_domain(network.identity, "handshake")
    proof = HelloProof(key.sign(domain, handshake_signed_bytes("dial", challenge, answer.challenge, claimed, target)))
    await stream.send_all(frame(encode_message(proof)))


async def wait_for_log(network: LocalNetwork, replica_id: int, phrase: str, count: int = 1) -> None:
    """Poll a replica's log until it reports `phrase` `count` times: its account of what it refused."""
    try:
        with trio.fail_after(EXCHANGE_DEADLINE_S):
            while network.log_text(replica_id).count(phrase) < count:
                await trio.sleep(LOG_POLL_INTERVAL_S)
    except trio.TooSlowError:
        found = network.log_text(replica_id).count(phrase)
        raise AssertionError(f"replica {replica_id} logged {phrase!r} {found} times, expected {count}\n{network.diagnostics()}") from None


async def test_authenticated_peer_sending_nonsense_does_not_crash_a_replica(network: LocalNetwork, client: Client) -> None:
    network_config = network.network
    status = await wait_for_agreement(client)
    next_sequence = status.height + 1
    with trio.fail_after(DEADLINE_S):
        for replica in network_config.replicas:
            target = replica.replica_id
            claimed = (target + 1) % network.replica_count
            key = read_key_file(network.replica_key_path(claimed))
            nonsense = [
                *MALFORMED_MESSAGES.values(),
                encode_message(Status(target, 0, 5)),  # a status in another replica's name
                encode_message(Status(claimed, 0, 2**63 - 1)),  # an absurd height
                encode_message(Prepare(0, next_sequence, bytes(32), 1, bytes(64))),
                encode_message(Commit(0, 2**62, bytes(32), claimed, bytes(64))),  # far outside the watermarks
                encode_message(Commit(1, next_sequence, bytes(32), claimed, bytes(64))),  # a view not started
                encode_message(FetchBlocks(2**63 - 1, 64)),
                encode_message(Blocks(())),
                encode_message(Request(forged_transaction())),
                encode_message(Query(1, "account", bytes(32), 0, bytes(16))),  # client messages on a peer link
                encode_message(StatusQuery(1)),
                encode_message(hello(network_config, claimed, bytes(32))),
                # Last, so that once it is reported every message before it has been through the core.
                encode_message(Commit(0, next_sequence, bytes(32), claimed, bytes(64))),
            ]
            stream = await trio.open_tcp_stream(replica.address.host, replica.address.port)
            async with stream:
                await handshake_as(stream, network_config, key, claimed, target)
                await stream.send_all(b"".join(frame(payload) for payload in nonsense))
                await wait_for_log(network, target, f"dropped a malformed message from replica {claimed}", len(MALFORMED_MESSAGES))
                await wait_for_log(network, target, f"rejected: bad commit signature: replica {claimed}")
                # Then an oversized frame: the replica must drop this link (and only this link).
                await stream.send_all(LARGEST_LENGTH_PREFIX.to_bytes(FRAME_HEADER_SIZE, "big"))
                try:
                    while await stream.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass
            await wait_for_log(network, target, f"dropped replica {claimed}: frame of {LARGEST_LENGTH_PREFIX} bytes")
        assert_all_replicas_alive(network)
        await assert_network_still_commits(network, client, "after-authenticated-nonsense")
