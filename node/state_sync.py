"""Fetching a certified snapshot from peers, chunk by chunk, trusting none of them (pure, sans-IO).

The caller holds a checkpoint certificate it verified (2f+1 signatures over a sequence, a state
digest and a block hash) and the peers to ask. The fetch splits the 65,536 state buckets into
lanes, one request in flight per lane, each to a different peer, for the first bucket (and entry:
a bucket too large for one chunk comes in parts) the lane still misses; every answer is checked
on its own against the certified state digest (ledger/snapshots.py), so whoever sent it and
whenever it arrives, an answer that verifies is taken.

Peers: one whose answer is wrong (a chunk that does not verify, or of another checkpoint) or who
keeps no snapshot of ours is dropped for the rest of the fetch. One that does not answer in time
is passed over for another, and dropped after TIMEOUTS_IN_A_ROW_MAX timeouts with no chunk taken
from it in between (requests that time out within one timeout of each other count once), so a
silent peer costs a few timeouts, not one per request, and an honest peer slower than the
timeout (but answering within a few of them) is kept. An answer that comes after its request
timed out is still verified and taken, if it answers one of the last ASKED_REMEMBERED_MAX
requests made of that peer: peers slower than the timeout still finish.

The fetch has failed when every peer is dropped or `deadline_ms` has passed since it started
(its first tick or answer); the caller starts another (with a newer checkpoint, or later). Peers
that keep no snapshot of ours may name a newer stable checkpoint: every one named is kept, one per
peer, in `newer_checkpoints`, unverified (this module holds no keys): the caller checks their
signatures and moves to the highest valid one. Time is only the caller's `now_ms`.

Work per answer is bounded: an answer is verified only if it answers a request made of its
sender (the bucket and entry asked, once), and verifying one chunk costs at most two hashes per
entry, two per bucket it covers and, for a part of a bucket, two per level of its page tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ledger.application import AccountsApplication
from ledger.messages import CheckpointCertificate, FetchSnapshot, SnapshotChunk
from ledger.snapshots import SnapshotAssembly, SnapshotError
from ledger.state_tree import BUCKET_COUNT

LANES_MAX = 4
TIMEOUTS_IN_A_ROW_MAX = 3
ASKED_REMEMBERED_MAX = 8
# Long enough for a state of millions of entries from slow peers; the caller may give its own.
DEADLINE_MS = 600_000


@dataclass
class _Lane:
    """A range of buckets fetched in order by one request at a time."""

    first_bucket: int
    end_bucket: int  # exclusive
    peer: int | None = None
    asked: tuple[int, int] | None = None  # the (bucket, entry) of the request in flight
    asked_ms: int = 0


@dataclass
class _Peer:
    """What the fetch remembers of one peer."""

    timeouts_in_a_row: int = 0
    # When a timeout was last counted: requests in flight together that time out together count
    # once, so a peer is dropped for being silent for TIMEOUTS_IN_A_ROW_MAX timeouts of time,
    # not for having been asked by several lanes at once.
    timeout_counted_ms: int | None = None
    # The (bucket, entry) of the latest requests to it not answered yet, oldest first: an answer
    # to one of them is verified even after its request timed out; an answer to anything else is not.
    asked: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class SnapshotFetch:
    """One fetch of the state certified by `checkpoint` (already verified by the caller)."""

    checkpoint: CheckpointCertificate
    peers: list[int]
    request_timeout_ms: int
    lanes_max: int = LANES_MAX
    deadline_ms: int = DEADLINE_MS
    timeouts_in_a_row_max: int = TIMEOUTS_IN_A_ROW_MAX
    assembly: SnapshotAssembly = field(init=False)
    dropped: set[int] = field(init=False, default_factory=set)
    # Newer stable checkpoints peers named instead of serving ours, unverified, one per peer: the
    # caller verifies them and may start over from the highest valid one.
    newer_checkpoints: dict[int, CheckpointCertificate] = field(init=False, default_factory=dict)
    counters: dict[str, int] = field(init=False, default_factory=dict)
    started_ms: int | None = field(init=False, default=None)
    expired: bool = field(init=False, default=False)
    _lanes: list[_Lane] = field(init=False)
    _peer_states: dict[int, _Peer] = field(init=False)
    _peer_cursor: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.request_timeout_ms <= 0 or self.deadline_ms <= 0 or self.timeouts_in_a_row_max <= 0:
            raise ValueError("request_timeout_ms, deadline_ms and timeouts_in_a_row_max must be positive")
        self.peers = sorted(set(self.peers))
        self.assembly = SnapshotAssembly(self.checkpoint.state_digest)
        self._peer_states = {peer: _Peer() for peer in self.peers}
        count = max(1, min(self.lanes_max, len(self.peers)))
        bounds = [BUCKET_COUNT * index // count for index in range(count + 1)]
        self._lanes = [_Lane(bounds[index], bounds[index + 1]) for index in range(count)]

    @property
    def complete(self) -> bool:
        return self.assembly.complete

    @property
    def failed(self) -> bool:
        """Every peer dropped, or the deadline passed (as of the last tick or answer)."""
        return not self.complete and (self.expired or not self._usable_peers())

    def application(self) -> AccountsApplication:
        """The state fetched, once complete: its digest is the certified one."""
        return self.assembly.application()

    def _count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def _usable_peers(self) -> list[int]:
        return [peer for peer in self.peers if peer not in self.dropped]

    def _next_peer(self, busy: set[int]) -> int | None:
        """The next usable peer in rotation, preferring one without a request in flight, then
        one with fewer timeouts in a row."""
        usable = self._usable_peers()
        if not usable:
            return None
        ordered = [usable[(self._peer_cursor + offset) % len(usable)] for offset in range(len(usable))]
        choice = min(ordered, key=lambda peer: (peer in busy, self._peer_states[peer].timeouts_in_a_row))
        self._peer_cursor = (usable.index(choice) + 1) % len(usable)
        return choice

    def _past_deadline(self, now_ms: int) -> bool:
        if self.started_ms is None:
            self.started_ms = now_ms
        if not self.expired and not self.complete and now_ms - self.started_ms >= self.deadline_ms:
            self.expired = True
            self._count("snapshot fetch past its deadline")
        return self.expired

    def tick(self, now_ms: int) -> list[tuple[int, FetchSnapshot]]:
        """Requests to send now: one for every lane with buckets missing and nothing in flight
        (or whose request timed out, then to another peer). Nothing once failed or complete."""
        if self._past_deadline(now_ms) or self.complete:
            return []
        for lane in self._lanes:
            if lane.asked is not None and now_ms - lane.asked_ms >= self.request_timeout_ms:
                self._count("snapshot request timed out")
                lane.asked = None
                assert lane.peer is not None
                state = self._peer_states[lane.peer]
                if state.timeout_counted_ms is None or now_ms - state.timeout_counted_ms >= self.request_timeout_ms:
                    state.timeouts_in_a_row += 1
                    state.timeout_counted_ms = now_ms
                if state.timeouts_in_a_row >= self.timeouts_in_a_row_max and lane.peer not in self.dropped:
                    self._drop(lane.peer, "snapshot peer dropped after timeouts")
        sends: list[tuple[int, FetchSnapshot]] = []
        for lane in self._lanes:
            if lane.asked is not None:
                continue
            missing = self.assembly.first_missing(lane.first_bucket)
            if missing is None or missing >= lane.end_bucket:
                continue
            position = (missing, self.assembly.first_missing_entry(missing))  # past a large bucket's parts taken
            busy = {other.peer for other in self._lanes if other.asked is not None and other.peer is not None}
            previous = lane.peer
            if previous is not None:
                busy.add(previous)  # the lane's last peer (maybe one that timed out) is passed over if another one is free
            peer = self._next_peer(busy)
            if peer is None:
                break
            lane.peer, lane.asked, lane.asked_ms = peer, position, now_ms
            asked = self._peer_states[peer].asked
            if position in asked:
                asked.remove(position)
            asked.append(position)
            del asked[:-ASKED_REMEMBERED_MAX]
            sends.append((peer, FetchSnapshot(self.checkpoint.sequence, *position)))
        return sends

    def receive(self, sender: int, message: SnapshotChunk, now_ms: int) -> list[tuple[int, FetchSnapshot]]:
        """Take an answer; returns the requests to send next (as tick does). An answer is
        verified only if it answers one of the latest requests made of its sender (in time or
        late) for the bucket and entry it starts at, once; any other is ignored unverified."""
        if self._past_deadline(now_ms) or self.complete:
            self._count("snapshot answer after the fetch ended")
            return []
        state = self._peer_states.get(sender)
        if state is None or sender in self.dropped:
            self._count("snapshot chunk not asked for")
            return []
        if message.chunk is None:
            position = state.asked[0] if state.asked else None  # it keeps no snapshot: an answer to any request
        else:
            position = (message.chunk.first_bucket, message.chunk.first_entry)
            position = position if position in state.asked else None
        if position is None:
            self._count("snapshot chunk not asked for")
            return []
        state.asked.remove(position)
        lane = next((lane for lane in self._lanes if lane.peer == sender and lane.asked == position), None)
        if lane is None:
            self._count("snapshot late answer")  # its request timed out, or its buckets came from another peer
        else:
            lane.asked = None
        ours = (self.checkpoint.sequence, self.checkpoint.state_digest, self.checkpoint.block_hash)
        theirs = (message.checkpoint.sequence, message.checkpoint.state_digest, message.checkpoint.block_hash)
        if message.chunk is None:
            # It keeps no snapshot of our checkpoint: not proof of anything, but no use for this fetch.
            if message.checkpoint.sequence > self.checkpoint.sequence:
                self.newer_checkpoints[sender] = message.checkpoint
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
                state.timeouts_in_a_row = 0
                for other in self._lanes:
                    if other.asked is not None and self.assembly.is_covered(*other.asked):
                        other.asked = None  # answered by another peer: ask for what is still missing
        return self.tick(now_ms)

    def _drop(self, peer: int, reason: str) -> None:
        """Ask this peer nothing more, nor take anything from it; what was in flight to it is
        asked of others at once."""
        self._count(reason)
        self.dropped.add(peer)
        self._peer_states[peer].asked.clear()
        for lane in self._lanes:
            if lane.peer == peer:
                lane.asked = None
