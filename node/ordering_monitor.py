"""A backup's watch on the primary's pace (pure): requests it holds must reach a pre-prepare soon.

PBFT's request timer (view_change_timeout_ms, from a request's arrival to its execution) replaces
a primary that stops, not one that is merely slow: a primary that holds every pre-prepare for just
under that timer drags each request out by seconds and stays primary for good (Aardvark, NSDI'09,
showed such primaries cutting throughput by orders of magnitude; the slow-primary scenario cut ours
to a tenth). Clients send each request to every replica, so a backup knows what the primary was
given, and it knows what an honest primary does with it: with fewer than
BATCHES_IN_FLIGHT_FILLING_MAX batches in flight it proposes within batch_wait_ms.

So a backup runs one more timer, the ordering timer, for the oldest request it holds that no
pre-prepare of this view has carried in the unbroken run of sequence numbers above its height (a
batch behind a gap cannot execute, so a primary cannot hide a held pre-prepare behind later ones).
It runs while, as far as the backup can see, the primary has room to propose and the backup itself
is not behind (a lost pre-prepare that f + 1 backups voted on, a batch it still fetches, f + 1
peers higher); time the primary is busy pauses it and never resets it, and it moves on only when
that oldest request is carried, so neither a flash of busy batches nor others' traffic buys a
primary a fresh start. At half of ordering_timeout_ms the backup relays the waiting requests to the
primary (a client may have reached only the backups); at ordering_timeout_ms it suspects the
primary and asks for a view change. A request that waits while the primary has no room (it is
busy) is relayed once it waited half the request timer, so a client that reaches only the backups
cannot make them suspect a busy, honest primary either.

A slow primary can then add about ordering_timeout_ms to each request, not view_change_timeout_ms.
What this does not catch: a primary that keeps BATCHES_IN_FLIGHT_FILLING_MAX batches, or a full
one, in flight all the time (of others' requests, or of its own accounts' transactions) pauses the timer, and can
then hold one client's request until the request timer expires (PBFT's own bound).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from ledger.messages import Request
from ledger.transactions import Transaction
from node.effects import Send

# A primary proposes a batch short of batch_size_max only while fewer than this many are in flight
# (node/core.py); a backup expects no more of it than that.
BATCHES_IN_FLIGHT_FILLING_MAX = 2
# Stale entries (requests that left the pending queue without the monitor hearing of it) are
# dropped from the front; this bounds the rest. The pending queue holds at most 100,000.
WATCHED_REQUESTS_MAX = 100_000


class OrderingMonitor:
    """Requests this backup holds that no pre-prepare of this view carried yet, and the timer."""

    def __init__(self, timeout_ms: int, watched_max: int = WATCHED_REQUESTS_MAX) -> None:
        self.timeout_ms = timeout_ms  # 0: the monitor is off
        self.watched_max = watched_max
        # transaction id -> when it became one to wait for in this view, oldest first; not yet relayed.
        self.fresh: OrderedDict[bytes, int] = OrderedDict()
        # Relayed to the primary in this view and still not in a pre-prepare (same values).
        self.relayed: OrderedDict[bytes, int] = OrderedDict()
        self.timer_for: bytes | None = None  # the oldest waiting request, which the timer runs for
        # How long it waited while the primary had room: time the primary is busy pauses the
        # timer, never resets it (a flash of two batches in flight must not buy a fresh start).
        self.timer_waited_ms = 0
        self.room_since_ms: int | None = None  # since when the primary has had room, unbroken
        self.last_room_step_ms = 0
        self.timer_relayed = False  # whether what waits was relayed for the request timed now
        # Armed once a pre-prepare of this view arrived: a new primary first fetches the batches its
        # view starts with, and it is not suspected before it has shown it is ready (what waits
        # is still relayed to it).
        self.armed = False
        # The unbroken run of pre-prepared sequences above the height reaches this far; requests
        # in batches up to it count as ordered (node/core.py keeps it up to date).
        self.ordered_through = 0
        self.expirations = 0

    @property
    def enabled(self) -> bool:
        return self.timeout_ms > 0

    def __len__(self) -> int:
        return len(self.fresh) + len(self.relayed)

    def heard(self, transaction_id: bytes, now_ms: int) -> None:
        """A request the primary should order now waits here."""
        if transaction_id in self.fresh or transaction_id in self.relayed:
            return
        if len(self) >= self.watched_max:
            (self.relayed if self.relayed else self.fresh).popitem(last=False)
        self.fresh[transaction_id] = now_ms

    def ordered(self, transaction_id: bytes) -> None:
        """It is in a pre-prepare of this view, executed, or can never execute: stop waiting for it."""
        if self.fresh.pop(transaction_id, None) is None:
            self.relayed.pop(transaction_id, None)

    def new_view(self, waiting: Iterable[bytes], now_ms: int) -> None:
        """A view starts (or this replica leaves one): every request still waiting waits anew."""
        self.fresh = OrderedDict.fromkeys(waiting, now_ms)
        self.relayed = OrderedDict()
        self.timer_for, self.timer_waited_ms, self.timer_relayed, self.room_since_ms = None, 0, False, None
        self.armed = False
        self.ordered_through = 0

    def pre_prepare_arrived(self) -> None:
        """The primary proposed something in this view: it is ready to be judged."""
        self.armed = True

    def oldest(self) -> tuple[bytes, int] | None:
        """The oldest waiting request and since when it waits. Relayed entries left the front of
        `fresh` in order, so they are the older ones."""
        for queue in (self.relayed, self.fresh):
            if queue:
                return next(iter(queue.items()))
        return None

    def drop_stale(self, still_waiting: object) -> None:
        """Drop, from the front, entries `still_waiting` (a container of ids) no longer holds."""
        for queue in (self.fresh, self.relayed):
            while queue and next(iter(queue)) not in still_waiting:  # type: ignore[operator]
                queue.popitem(last=False)

    def due_for_relay(self, now_ms: int, waited_ms: int, count_max: int) -> list[bytes]:
        """Requests waiting here at least `waited_ms` and not relayed yet (at most count_max), now relayed."""
        due = []
        while self.fresh and len(due) < count_max:
            transaction_id, since_ms = next(iter(self.fresh.items()))
            if now_ms - since_ms < waited_ms:
                break
            self.fresh.popitem(last=False)
            self.relayed[transaction_id] = since_ms
            due.append(transaction_id)
        return due

    def step(self, now_ms: int, primary_has_room: bool) -> str | None:
        """Advance the timer: None, "relay" (relay what waits, once per request timed) or
        "expired" (only once armed: before, relaying is all it does)."""
        if not (self.enabled and len(self)):
            self.timer_for, self.timer_waited_ms, self.timer_relayed, self.room_since_ms = None, 0, False, None
            return None
        if not primary_has_room:
            self.room_since_ms = None  # paused: what was waited with room is kept
            return None
        if self.room_since_ms is None:
            self.room_since_ms = self.last_room_step_ms = now_ms
        oldest = self.oldest()
        assert oldest is not None
        if oldest[0] != self.timer_for:
            # Started, or the request it ran for was carried: time the oldest one, from when it
            # came or the primary got room, whichever is later. Each request has its own
            # deadline; a primary cannot chain one hold after another.
            self.timer_for, self.timer_relayed = oldest[0], False
            self.timer_waited_ms = now_ms - max(oldest[1], self.room_since_ms)
        else:
            self.timer_waited_ms += now_ms - self.last_room_step_ms
        self.last_room_step_ms = now_ms
        if not self.armed:
            # A primary not yet proposing in its view is not judged: time enough to relay to it,
            # and once it proposed, the rest of the timeout.
            self.timer_waited_ms = min(self.timer_waited_ms, self.timeout_ms // 2)
        waited = self.timer_waited_ms
        if waited >= self.timeout_ms and self.armed:
            self.expirations += 1
            self.timer_for, self.timer_waited_ms, self.timer_relayed = None, 0, False
            return "expired"
        if waited >= self.timeout_ms // 2 and not self.timer_relayed:
            self.timer_relayed = True
            return "relay"
        return None


class OrderingWatch:
    """A mixin of ReplicaCore (node/core.py): the backup's side of the watch, run on each tick."""

    ordering: OrderingMonitor
    faults: int
    missing_batches: dict[bytes, int]
    peer_heights: dict[int, int]
    pending: Any
    proposed: set[bytes]
    slots: dict[int, Any]
    settings: Any
    effects: Any
    height: int
    high: int
    now_ms: int
    view: int
    primary: int

    def _proposed_here(self, slot: Any) -> bool:
        """The primary proposed this slot, as far as this backup knows: it holds the pre-prepare,
        or f + 1 backups voted on one (at least one of them honest: the pre-prepare to us was
        lost). The primary's own COMMIT does not count: found by an adversarial review, a primary
        that sent each backup the pre-prepare of another slot plus its own commit for the one it
        lacked made every honest backup pause, and held requests for 2.7 s unreplaced."""
        if slot.pre_prepare is not None:
            return True
        voters = (slot.prepares.keys() | slot.commits.keys()) - {self.primary}
        return len(voters) > self.faults

    def _primary_owes_a_proposal(self) -> bool:
        """Whether an honest primary would be proposing now, as far as this backup can tell: fewer
        than BATCHES_IN_FLIGHT_FILLING_MAX batches in the unbroken run above our height and its
        window open, and we are not behind ourselves (then what we miss is ours to fetch, not the
        primary's to send). A backup behind the primary sees more in flight than the primary does,
        so it errs towards patience."""
        if self.missing_batches:
            return False
        heights = sorted(self.peer_heights.values(), reverse=True)
        if len(heights) > self.faults and heights[self.faults] > self.height:
            return False  # f + 1 peers are ahead: at least one honest replica is
        run = 0
        while run < BATCHES_IN_FLIGHT_FILLING_MAX:
            slot = self.slots.get(self.height + run + 1)
            if slot is None or not self._proposed_here(slot):
                break
            if slot.pre_prepare is None or slot.batch is None:
                return False  # the pre-prepare to us was lost (its retransmission will come), or its content is being fetched
            if len(slot.batch.transactions) >= self.settings.batch_size_max:
                # A full batch in flight: the primary proposes as fast as batches fill, and under
                # that load replicas see requests in different orders, so our oldest may wait a
                # batch or two at an honest primary (1,024 in flight at n = 4 made one backup
                # suspect it). A primary keeping full batches in flight to pause us is the known gap.
                return False
            run += 1
        return run < BATCHES_IN_FLIGHT_FILLING_MAX and self.height + run + 1 <= min(self.high, self.height + self.settings.window_size)

    def _in_ordered_run(self, transaction_id: bytes) -> bool:
        """Whether a batch of the unbroken run above our height carries it (rare to ask: only for
        a request that reaches a backup after a pre-prepare carrying it)."""
        for sequence in range(self.height + 1, self.ordering.ordered_through + 1):
            slot = self.slots.get(sequence)
            if slot is not None and slot.batch is not None and any(t.transaction_id == transaction_id for t in slot.batch.transactions):
                return True
        return False

    def _advance_ordered_run(self) -> None:
        """Requests in the unbroken run of pre-prepared batches above our height are ordered: they
        execute as soon as the votes are in. One behind a gap still waits for the primary."""
        monitor = self.ordering
        monitor.ordered_through = max(monitor.ordered_through, self.height)
        while True:
            slot = self.slots.get(monitor.ordered_through + 1)
            if slot is None or slot.pre_prepare is None or slot.batch is None:
                return
            for transaction in slot.batch.transactions:
                monitor.ordered(transaction.transaction_id)
            monitor.ordered_through += 1

    def _relayed_requests(self, count_max: int) -> list[Transaction]:
        """What a backup re-relays each status interval, in case a relay was lost: with the watch
        on, the requests it relayed (the rest the primary had from the client); else the oldest."""
        if not self.ordering.enabled:
            return self.pending.oldest(count_max)
        ids = itertools.islice((i for i in self.ordering.relayed if i in self.pending), count_max)
        return [self.pending.transaction(transaction_id) for transaction_id in ids]

    def _watch_ordering(self) -> None:
        """Relay what waited too long, and suspect a primary that leaves requests unordered while
        it has room to propose (node/ordering_monitor.py)."""
        monitor = self.ordering
        if not monitor.enabled or not len(monitor):
            monitor.step(self.now_ms, False)
            return
        monitor.drop_stale(self.pending)
        batch_size_max = self.settings.batch_size_max
        # Waiting while the primary is busy is no fault, but half the request timer is long
        # enough: the primary may never have heard of it.
        relay = monitor.due_for_relay(self.now_ms, self._timeout_ms() // 2, batch_size_max)
        outcome = monitor.step(self.now_ms, self._primary_owes_a_proposal())
        if outcome == "relay":
            relay += monitor.due_for_relay(self.now_ms, 0, batch_size_max)  # all that wait, oldest first
        for transaction_id in relay:
            if transaction_id in self.pending:
                self.effects.send.append(Send(self.primary, Request(self.pending.transaction(transaction_id))))
        if outcome == "expired":
            self.effects.events.append(
                f"ordering timer expired in view {self.view}: primary {self.primary} left a request unordered for "
                f"{monitor.timeout_ms} ms while it had room ({len(monitor)} requests waited here)"
            )
            self._start_view_change(self.view + 1)
