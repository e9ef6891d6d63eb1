"""Length-prefixed frames with a hard size limit: a sans-IO decoder and a thin Trio stream wrapper."""

from __future__ import annotations

import trio

FRAME_HEADER_SIZE = 4
FRAME_SIZE_MAX_DEFAULT = 8 * 1024 * 1024
RECEIVE_CHUNK_SIZE = 256 * 1024


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

    def __init__(self, stream: trio.abc.Stream, frame_size_max: int) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(frame_size_max)
        self.ready: list[bytes] = []

    async def receive(self) -> bytes | None:
        """The next frame, or None at end of stream."""
        while not self.ready:
            data = await self.stream.receive_some(RECEIVE_CHUNK_SIZE)
            if not data:
                return None
            self.ready.extend(self.decoder.feed(data))
            if not self.ready:
                self.decoder.feed(b"")  # raises a pending FrameError
        return self.ready.pop(0)

    async def send(self, payload: bytes) -> None:
        await self.stream.send_all(frame(payload))


class FrameQueue:
    """Payloads waiting to be written to one connection, bounded in count and in bytes.

    Bytes matter: a peer that asks for blocks and never reads must not make us buffer gigabytes.
    `put` never blocks; it refuses (returns False) when the queue is full, and the caller counts it.
    """

    def __init__(self, frames_max: int, bytes_max: int) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](frames_max)
        self.bytes_max = bytes_max
        self.queued_bytes = 0

    def put(self, payload: bytes) -> bool:
        if self.queued_bytes + len(payload) > self.bytes_max:
            return False
        try:
            self._send.send_nowait(payload)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.queued_bytes += len(payload)
        return True

    def _take(self, payload: bytes) -> bytes:
        self.queued_bytes -= len(payload)
        return frame(payload)

    def clear(self) -> None:
        while True:
            try:
                self._take(self._receive.receive_nowait())
            except trio.WouldBlock:
                return

    async def pump(self, framed: FramedStream, frames_per_write_max: int = 256) -> None:
        """Write everything queued, coalescing what is already waiting into one write: a replica
        replying to a batch sends one segment to a client, not one syscall per reply."""
        async for payload in self._receive:
            chunks = [self._take(payload)]
            while len(chunks) < frames_per_write_max:
                try:
                    chunks.append(self._take(self._receive.receive_nowait()))
                except trio.WouldBlock:
                    break
            await framed.stream.send_all(b"".join(chunks))

