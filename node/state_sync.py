"""Fetching a certified snapshot from peers, chunk by chunk, trusting none of them (pure, sans-IO).

The caller holds a checkpoint certificate it verified (2f+1 signatures over a sequence, a state
digest and a block hash) and the peers to ask. The fetch splits the 65,536 state buckets into
lanes, one request in flight per lane, each to a different peer; every answer is checked on its
own against the certified state digest (ledger/snapshots.py). A peer whose answer is wrong (a
chunk that does not verify, or of another checkpoint) is dropped for the rest of the fetch; a peer that does not answer in time is passed over for another one and may
be asked again later. With every peer dropped the fetch has failed, and the caller starts
another (with a newer checkpoint, or later).

Work per answer is bounded: answers are taken only from a peer asked, for the range asked, and
verifying one chunk costs at most one hash per entry and two per bucket it covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ledger.application import AccountsApplication
from ledger.messages import CheckpointCertificate, FetchSnapshot, SnapshotChunk
from ledger.snapshots import SnapshotAssembly, SnapshotError
from ledger.state_tree import BUCKET_COUNT

LANES_MAX = 4


@dataclass
class _Lane:
    """A range of buckets fetched in order by one request at a time."""

    first_bucket: int
    end_bucket: int  # exclusive
    peer: int | None = None
    asked_bucket: int | None = None
    asked_ms: int = 0


@dataclass
class SnapshotFetch:
    """One fetch of the state certified by `checkpoint` (already verified by the caller)."""

    checkpoint: CheckpointCertificate
    peers: list[int]
    request_timeout_ms: int
    lanes_max: int = LANES_MAX
    assembly: SnapshotAssembly = field(init=False)
    dropped: set[int] = field(init=False, default_factory=set)
    # A newer stable checkpoint a peer named instead of serving ours: the caller may verify it and start over.
    newer_checkpoint: CheckpointCertificate | None = field(init=False, default=None)
    counters: dict[str, int] = field(init=False, default_factory=dict)
    _lanes: list[_Lane] = field(init=False)
    _peer_cursor: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.peers = sorted(set(self.peers))
        self.assembly = SnapshotAssembly(self.checkpoint.state_digest)
        count = max(1, min(self.lanes_max, len(self.peers)))
        bounds = [BUCKET_COUNT * index // count for index in range(count + 1)]
        self._lanes = [_Lane(bounds[index], bounds[index + 1]) for index in range(count)]

    @property
    def complete(self) -> bool:
        return self.assembly.complete

    @property
    def failed(self) -> bool:
        return not self.complete and not self._usable_peers()

    def application(self) -> AccountsApplication:
        """The state fetched, once complete: its digest is the certified one."""
        return self.assembly.application()

    def _count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def _usable_peers(self) -> list[int]:
        return [peer for peer in self.peers if peer not in self.dropped]

    def _next_peer(self, busy: set[int]) -> int | None:
        """The next usable peer in rotation, preferring one without a request in flight."""
        usable = self._usable_peers()
        if not usable:
            return None
        ordered = [usable[(self._peer_cursor + offset) % len(usable)] for offset in range(len(usable))]
        choice = next((peer for peer in ordered if peer not in busy), ordered[0])
        self._peer_cursor = (usable.index(choice) + 1) % len(usable)
        return choice

    def tick(self, now_ms: int) -> list[tuple[int, FetchSnapshot]]:
        """Requests to send now: one for every lane with buckets missing and nothing in flight
        (or whose request timed out, then to another peer)."""
        sends: list[tuple[int, FetchSnapshot]] = []
        for lane in self._lanes:
            if lane.asked_bucket is not None and now_ms - lane.asked_ms < self.request_timeout_ms:
                continue
            if lane.asked_bucket is not None:
                self._count("snapshot request timed out")
                lane.asked_bucket = None
            missing = self.assembly.first_missing(lane.first_bucket)
            if missing is None or missing >= lane.end_bucket:
                continue
            busy = {other.peer for other in self._lanes if other.asked_bucket is not None and other.peer is not None}
            previous = lane.peer
            if previous is not None:
                busy.add(previous)  # a peer that timed out is passed over if another one is free
            peer = self._next_peer(busy)
            if peer is None:
                break
            lane.peer, lane.asked_bucket, lane.asked_ms = peer, missing, now_ms
            sends.append((peer, FetchSnapshot(self.checkpoint.sequence, missing)))
        return sends

    def receive(self, sender: int, message: SnapshotChunk, now_ms: int) -> list[tuple[int, FetchSnapshot]]:
        """Take an answer; returns the requests to send next (as tick does). An answer is
        matched to the request in flight to its sender for the bucket it starts at; any other
        (late, after a timeout; or never asked) is ignored unverified."""
        wanted = None if message.chunk is None else message.chunk.first_bucket
        lane = next(
            (
                lane for lane in self._lanes
                if lane.peer == sender and lane.asked_bucket is not None and wanted in (None, lane.asked_bucket)
            ),
            None,
        )
        if lane is None:
            self._count("snapshot chunk not asked for")
            return []
        lane.asked_bucket = None
        ours = (self.checkpoint.sequence, self.checkpoint.state_digest, self.checkpoint.block_hash)
        theirs = (message.checkpoint.sequence, message.checkpoint.state_digest, message.checkpoint.block_hash)
        if message.chunk is None:
            # It keeps no snapshot of our checkpoint: not proof of anything, but no use for this fetch.
            if message.checkpoint.sequence > self.checkpoint.sequence and (
                self.newer_checkpoint is None or message.checkpoint.sequence > self.newer_checkpoint.sequence
            ):
                self.newer_checkpoint = message.checkpoint
            self._drop(sender, "snapshot not kept by the peer")
        elif theirs != ours:
            self._drop(sender, "snapshot chunk of another checkpoint")
        else:
            try:
                self.assembly.add(message.chunk)
            except SnapshotError:
                self._drop(sender, "snapshot chunk does not verify")
            else:
                self._count("snapshot chunk taken")
        return self.tick(now_ms)

    def _drop(self, peer: int, reason: str) -> None:
        """Ask this peer nothing more; what was in flight to it is asked of others at once."""
        self._count(reason)
        self.dropped.add(peer)
        for lane in self._lanes:
            if lane.peer == peer:
                lane.asked_bucket = None
