"""Joining by state sync: fetch a certified snapshot, then the block it belongs to, then install (pure).

A replica far behind the newest stable checkpoint (more than `state_sync_distance` blocks), whose
store may start from a snapshot (an empty store, or one that already starts from one), does not
replay the history. Given a checkpoint certificate it verified (2f+1 CHECKPOINTs over sequence,
state digest and block hash), it
  1. fetches the state at that sequence chunk by chunk from its peers (node/state_sync.py: every
     chunk checked against the certified state digest, a peer with a bad chunk dropped);
  2. fetches the block at that sequence from its peers (FetchBlocks of one block): taken only if
     its hash is the certified one and its contents match its header;
  3. hands both to the core, which installs them (the host stores them in one transaction) and
     then catches up the blocks after it as any replica behind does.
When the fetch fails (every peer dropped, or its deadline passed) the caller starts again from
the newest certificate it holds.
"""

from __future__ import annotations

from typing import Any

from ledger.application import AccountsApplication
from ledger.blocks import Block, ChainError, verify_block_contents
from ledger.encoding import CodecError
from ledger.messages import CheckpointCertificate, FetchBlocks, SnapshotChunk
from node.state_sync import SnapshotFetch

# An attempt that took no chunk (and, once the state is complete, got no block) for this many
# request timeouts has failed: the caller starts again from its newest certificate, or falls back
# to blocks. Counted from the last progress, not the start: a large state takes as long as it takes.
ATTEMPT_TIMEOUTS_MAX = 20


class StateJoin:
    """One attempt to join at `checkpoint`; `peers` are the replicas to ask."""

    def __init__(self, checkpoint: CheckpointCertificate, peers: list[int], request_timeout_ms: int, now_ms: int) -> None:
        self.checkpoint = checkpoint
        self.peers = sorted(peers)
        self.request_timeout_ms = request_timeout_ms
        self.started_ms = now_ms
        self.progress_ms = now_ms  # when a chunk was last taken
        # The fetch's own deadline counts from its start; this attempt's counts from its last
        # progress (failed below), so a large state takes as long as it needs.
        self.fetch = SnapshotFetch(checkpoint, list(self.peers), request_timeout_ms, deadline_ms=1 << 62)
        self.block_asked_ms: int | None = None
        self.block_cursor = 0
        self.counters: dict[str, int] = {}
        self.not_kept_by: set[int] = set()  # peers that answered they keep no snapshot of it

    def _count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def failed(self, now_ms: int) -> bool:
        """Every peer dropped, or no progress for ATTEMPT_TIMEOUTS_MAX timeouts (a silent peer must not hold it)."""
        return self.fetch.failed or now_ms - self.progress_ms >= ATTEMPT_TIMEOUTS_MAX * self.request_timeout_ms

    @property
    def chunks_taken(self) -> int:
        return self.fetch.counters.get("snapshot chunk taken", 0)

    @property
    def state_complete(self) -> bool:
        return self.fetch.complete

    def application(self) -> AccountsApplication:
        return self.fetch.application()

    def tick(self, now_ms: int) -> list[tuple[int, Any]]:
        """What to send now: chunk requests until the state is complete, then the block."""
        if not self.fetch.complete:
            return list(self.fetch.tick(now_ms))
        if self.block_asked_ms is not None and now_ms - self.block_asked_ms < self.request_timeout_ms:
            return []
        # Rotate: a peer that does not answer, or answers with another block, is passed over.
        peer = self.peers[self.block_cursor % len(self.peers)]
        self.block_cursor += 1
        self.block_asked_ms = now_ms
        return [(peer, FetchBlocks(self.checkpoint.sequence, 1))]

    def receive_chunk(self, sender: int, message: SnapshotChunk, now_ms: int) -> list[tuple[int, Any]]:
        taken = self.chunks_taken
        if message.chunk is None and sender in self.peers:
            self.not_kept_by.add(sender)
        sends = list(self.fetch.receive(sender, message, now_ms))
        if self.chunks_taken > taken:
            self.progress_ms = now_ms
        if self.fetch.complete:
            sends += self.tick(now_ms)
        return sends

    def receive_blocks(self, sender: int, blocks: tuple[Block, ...]) -> Block | None:
        """The block of the checkpoint, if `blocks` holds it as certified; otherwise None (and the
        next tick asks another peer)."""
        if not self.fetch.complete:
            return None
        for block in blocks:
            if block.height != self.checkpoint.sequence:
                continue
            if block.block_hash != self.checkpoint.block_hash or block.header.state_digest != self.checkpoint.state_digest:
                self._count("snapshot block is not the certified one")
                return None
            try:
                verify_block_contents(block)
            except (ChainError, CodecError):
                self._count("snapshot block contents do not match its header")
                return None
            return block
        return None
