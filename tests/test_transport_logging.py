"""The peer transport's log stays bounded whatever a peer sends: a traitor holding a valid key
(node/traitors.py malformed_sender) must not fill the disk with one warning per bad frame."""

from __future__ import annotations

import logging

import pytest

from ledger.messages import Prepare, encode_message
from node.simulator import _key, simulated_network
from node.transport import MALFORMED_LOGGED_PER_SECOND, PeerTransport

NETWORK, KEYS = simulated_network(3, 4, [_key(3, "client", 0)])


class ScriptedFrames:
    """Stands in for a FramedStream: hands out the given frames, then the end of the stream."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    async def receive(self) -> bytes | None:
        return self.frames.pop(0) if self.frames else None


async def test_malformed_frames_from_a_peer_are_counted_but_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    delivered = []

    async def deliver(peer: int, message: object) -> None:
        delivered.append((peer, message))

    transport = PeerTransport(NETWORK, 0, KEYS[0], deliver)
    good = encode_message(Prepare(0, 1, bytes(32), 2, bytes(64)))
    frames = [b"\xff garbage"] * 5_000 + [good]
    with caplog.at_level(logging.WARNING, logger="node.transport"):
        await transport._receive_loop(ScriptedFrames(frames), 2)  # type: ignore[arg-type]
    assert transport.bad_frames == 5_000
    assert [peer for peer, _ in delivered] == [2]  # the good frame after them still arrives
    # One second of test at most: the limit per second, plus one line saying how many were not logged.
    assert len(caplog.records) <= 2 * MALFORMED_LOGGED_PER_SECOND + 2
