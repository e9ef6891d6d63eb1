"""Length-prefixed frames with a hard size limit: a sans-IO decoder and a thin Trio stream wrapper."""

from __future__ import annotations

import math
from collections import deque

import trio

FRAME_HEADER_SIZE = 4
FRAME_SIZE_MAX_DEFAULT = 8 * 1024 * 1024
RECEIVE_CHUNK_SIZE = 256 * 1024
# FramedStream.receive handing buffered frames on without waiting yields after this many:
# a 256 KiB chunk of tiny frames is thousands of them, and an adversarial review measured a
# 126 ms stall of the event loop behind one peer's chunk without it (13 ms with a yield per frame).
FRAMES_PER_CHECKPOINT = 64


class FrameError(ValueError):
    """The peer announced a frame larger than allowed; the connection should be closed."""


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(FRAME_HEADER_SIZE, "big") + payload


class FrameDecoder:
    """Feed it bytes as they arrive; take whole frames out. Buffers at most one frame."""

    def __init__(self, frame_size_max: int = FRAME_SIZE_MAX_DEFAULT) -> None:
        self._buffer = bytearray()
        self._frame_size_max = frame_size_max
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Whole frames completed by `data`. An oversized frame raises FrameError, after the
        valid frames before it have been handed out (on the next call if some were)."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= FRAME_HEADER_SIZE:
            size = int.from_bytes(self._buffer[:FRAME_HEADER_SIZE], "big")
            if size > self._frame_size_max:
                self._error = FrameError(f"frame of {size} bytes exceeds the limit of {self._frame_size_max}")
                if frames:
                    break
                raise self._error
            end = FRAME_HEADER_SIZE + size
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[FRAME_HEADER_SIZE:end]))
            del self._buffer[:end]
        return frames


class FramedStream:
    """A trio stream carrying frames; reading stops with FrameError on an oversized frame."""

    def __init__(self, stream: trio.abc.Stream, frame_size_max: int, receive_chunk_size: int = RECEIVE_CHUNK_SIZE) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(frame_size_max)
        self.ready: deque[bytes] = deque()
        self.receive_chunk_size = receive_chunk_size
        self._taken_without_reading = 0

    @property
    def has_frame(self) -> bool:
        """Whether receive() has a frame already read (it will not wait for the peer). True only
        while one task reads this stream, as each connection has exactly one reader (the pump
        only writes): a second reader could take the frame first and leave receive() waiting."""
        return bool(self.ready)

    async def receive(self) -> bytes | None:
        """The next frame, or None at end of stream. A frame already read is handed out without
        reading the socket, and so without yielding, except every FRAMES_PER_CHECKPOINT of them:
        the readers queue events without yielding too (node/runtime.py), and a chunk of tiny
        frames must not hold the scheduler."""
        if self.ready:
            self._taken_without_reading += 1
            if self._taken_without_reading >= FRAMES_PER_CHECKPOINT:
                self._taken_without_reading = 0
                await trio.lowlevel.checkpoint()
        while not self.ready:
            data = await self.stream.receive_some(self.receive_chunk_size)
            self._taken_without_reading = 0  # reading the socket yielded
            if not data:
                return None
            self.ready.extend(self.decoder.feed(data))
            if not self.ready:
                self.decoder.feed(b"")  # raises a pending FrameError
        return self.ready.popleft()

    async def send(self, payload: bytes) -> None:
        await self.stream.send_all(frame(payload))


class ByteBudget:
    """A count of bytes held, never above `bytes_max`: one per queue, or shared by several queues."""

    def __init__(self, bytes_max: int, parent: ByteBudget | None = None) -> None:
        self.bytes_max = bytes_max
        self.used = 0
        self.parent = parent  # bytes taken here are taken from the parent too
        self._released = trio.Event()  # set (and replaced) whenever bytes are given back

    def free(self) -> int:
        own = self.bytes_max - self.used
        return own if self.parent is None else min(own, self.parent.free())

    def take(self, size: int) -> bool:
        if self.used + size > self.bytes_max or (self.parent is not None and not self.parent.take(size)):
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used -= size
        assert self.used >= 0, "a budget was given back more than was taken"
        if self.parent is not None:
            self.parent.give_back(size)
        self._released.set()
        self._released = trio.Event()

    async def wait_for_room(self, size: int) -> None:
        """Until `size` bytes are free here (and in every parent). Bytes given back anywhere below
        the top budget reach it, so waiting on the top one sees every release that could help."""
        top = self
        while top.parent is not None:
            top = top.parent
        while self.free() < size:
            await top._released.wait()


class FrameQueue:
    """Payloads waiting to be written to one connection, bounded in count and in bytes.

    Bytes matter: a peer that asks for blocks and never reads must not make us buffer gigabytes.
    `put` never blocks; it refuses (returns False) when the queue is full, and the caller counts it.
    A payload's bytes are counted until it has been written, not merely taken off the queue, so
    the bound covers what a stalled write holds too. A payload may be charged to another budget
    (shared by several queues) instead of the queue's own.
    """

    def __init__(self, frames_max: int, bytes_max: int) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, ByteBudget]](frames_max)
        self.budget = ByteBudget(bytes_max)

    @property
    def bytes_max(self) -> int:
        return self.budget.bytes_max

    @property
    def queued_bytes(self) -> int:
        return self.budget.used

    def put(self, payload: bytes, budget: ByteBudget | None = None) -> bool:
        charged = budget if budget is not None else self.budget
        if not charged.take(len(payload)):
            return False
        try:
            self._send.send_nowait((payload, charged))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            charged.give_back(len(payload))
            return False
        return True

    def clear(self) -> None:
        while True:
            try:
                payload, charged = self._receive.receive_nowait()
            except trio.WouldBlock:
                return
            charged.give_back(len(payload))

    async def pump(self, framed: FramedStream, frames_per_write_max: int = 256, write_timeout_s: float = math.inf) -> None:
        """Write everything queued, coalescing what is already waiting into one write: a replica
        replying to a batch sends one segment to a client, not one syscall per reply. A write that
        takes longer than `write_timeout_s` raises trio.TooSlowError."""
        async for first in self._receive:
            taken = [first]
            while len(taken) < frames_per_write_max:
                try:
                    taken.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            parts: list[bytes] = []
            for payload, _ in taken:
                parts += [len(payload).to_bytes(FRAME_HEADER_SIZE, "big"), payload]
            data = b"".join(parts)
            # Only the joined copy stays alive during the write; the budgets still count it.
            charges = [(len(payload), charged) for payload, charged in taken]
            del parts, taken, first
            try:
                # move_on_after is a bare cancel scope; fail_after wraps one in a generator-based
                # context manager, a few microseconds per write (one per message at low load).
                with trio.move_on_after(write_timeout_s) as writing:
                    await framed.stream.send_all(data)
                if writing.cancelled_caught:
                    raise trio.TooSlowError
            finally:
                for size, charged in charges:
                    charged.give_back(size)
