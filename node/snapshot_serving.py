"""How much snapshot serving a replica does for its peers: a work budget per peer and in all.

Building a chunk costs about 2 us per entry on the event loop (up to 65,536 entries, 1 MiB, about
0.15 s), and a FetchSnapshot costs its sender 19 bytes: a peer must not be able to buy seconds of
a replica's time per second. So answers are paid for in entries (plus a fixed cost per request),
from a token bucket per peer and one shared by all; a request that cannot be paid for now waits
(the newest few per peer) until the buckets refill. A joiner accepts late answers, so waiting slows
a flood's victims down without making honest joiners drop the peer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ledger.messages import FetchSnapshot

# Entries a peer may be served per second (about one full chunk) and all peers together (two).
PEER_ENTRIES_PER_SECOND = 65_536
ALL_ENTRIES_PER_SECOND = 2 * PEER_ENTRIES_PER_SECOND
REQUEST_COST_ENTRIES = 256  # what an answer costs beyond its entries (the walk, the proof, the encoding)
WAITING_PER_PEER_MAX = 4  # a joiner has at most this many requests in flight (node/state_sync.py LANES_MAX)


@dataclass
class _Bucket:
    rate_per_s: float
    tokens: float
    refilled_s: float = 0.0

    def refill(self, now_s: float) -> None:
        self.tokens = min(self.rate_per_s, self.tokens + (now_s - self.refilled_s) * self.rate_per_s)
        self.refilled_s = now_s


@dataclass
class ServingBudget:
    """Token buckets in entries; `now_s` comes from the caller (a monotonic clock)."""

    peer_rate: int = PEER_ENTRIES_PER_SECOND
    all_rate: int = ALL_ENTRIES_PER_SECOND
    _peers: dict[int, _Bucket] = field(default_factory=dict)
    _all: _Bucket | None = None
    waiting: dict[int, deque[FetchSnapshot]] = field(default_factory=dict)
    deferred = 0  # requests that had to wait
    dropped = 0  # waiting requests pushed out by newer ones from the same peer

    def _buckets(self, peer: int, now_s: float) -> tuple[_Bucket, _Bucket]:
        if self._all is None:
            self._all = _Bucket(self.all_rate, self.all_rate, now_s)
        bucket = self._peers.get(peer)
        if bucket is None:
            bucket = self._peers[peer] = _Bucket(self.peer_rate, self.peer_rate, now_s)
        bucket.refill(now_s)
        self._all.refill(now_s)
        return bucket, self._all

    def may_serve(self, peer: int, now_s: float) -> bool:
        """Whether a request from `peer` is served now: both buckets hold something (an answer
        may overdraw them once; the debt is paid before the next)."""
        own, shared = self._buckets(peer, now_s)
        return own.tokens > 0 and shared.tokens > 0

    def charge(self, peer: int, entries: int, now_s: float) -> None:
        own, shared = self._buckets(peer, now_s)
        cost = entries + REQUEST_COST_ENTRIES
        own.tokens -= cost
        shared.tokens -= cost

    def wait(self, peer: int, request: FetchSnapshot) -> None:
        """Keep the request for later: the newest WAITING_PER_PEER_MAX per peer."""
        queue = self.waiting.setdefault(peer, deque())
        if len(queue) >= WAITING_PER_PEER_MAX:
            queue.popleft()
            self.dropped += 1
        queue.append(request)
        self.deferred += 1

    def next_payable(self, now_s: float) -> tuple[int, FetchSnapshot] | None:
        """A waiting request that may be served now (peers in turn), taken off its queue."""
        for peer in sorted(self.waiting):
            queue = self.waiting[peer]
            if queue and self.may_serve(peer, now_s):
                request = queue.popleft()
                if not queue:
                    del self.waiting[peer]
                return peer, request
        return None
