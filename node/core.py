"""The pure PBFT replica: a deterministic state machine fed events, returning effects (sans-IO).

Nothing here touches sockets, clocks, threads or randomness. The runtime (or the simulator) calls
`receive_request`, `receive_message` and `tick`, then `take_effects`, and carries the effects out
in order: persist, send, store blocks, reply. A replica never sends a signed message that is not
yet durable, so restarting an honest replica can never make it sign two things for one slot.

Protocol map (Castro & Liskov, TOCS 2002, the variant with signatures). ReplicaCore is one state
machine; the sub-protocols' methods live beside it, one module each, as mixins over its state:
  normal case      here: _propose, _on_pre_prepare, _on_prepare, _on_commit, _execute_ready
  checkpoints      node/checkpoints.py: _make_checkpoint, _on_checkpoint, _make_stable (watermarks)
  view changes     node/view_change.py: _start_view_change, _on_view_change, _try_new_view, _enter_view
  catching up      node/catch_up.py: status, retransmission, _fetch_blocks, _on_blocks, state sync
  effects          node/effects.py: what a round asks of the host (persist, send, blocks, replies)
Pure helpers beside them: node/new_view.py (the NEW-VIEW rule), node/certificates.py (checks of
signed evidence), node/requests.py (the request queue), node/snapshot_keeper.py (snapshots kept
to serve), node/state_join.py and node/state_sync.py (joining from a snapshot).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ledger.application import AccountsApplication, is_deferred, is_replay
from ledger.blocks import (
    Block,
    BlockHeader,
    CommitCertificate,
    executed_block,
    results_root,
)
from ledger.config import NetworkConfig
from ledger.crypto import VERIFIED_SIGNATURES_MAX, PublicKeyCache, SigningKey, signing_domain
from ledger.messages import (
    BATCH_REPLY_DOMAIN,
    Batch,
    BatchContent,
    Blocks,
    Checkpoint,
    CheckpointCertificate,
    Commit,
    FetchBatch,
    FetchBlocks,
    NewView,
    Prepare,
    PreparedCertificate,
    PreparedRecord,
    PrePrepare,
    PrePrepareHeader,
    Reply,
    ReplyEntry,
    Request,
    SnapshotChunk,
    Status,
    ViewChange,
    make_replies,
    make_reply,
)
from ledger.transactions import Transaction, transaction_domain
from node.catch_up import CatchUp
from node.certificates import (
    CertificateChecks,
    SignatureCheck,
    SignatureMemo,
    SignaturesCheck,
    one_by_one,
    with_signature,
)
from node.checkpoints import CheckpointProtocol
from node.effects import ClientReply, Effects, Persist, Send
from node.evidence import EvidenceCollector
from node.new_view import NULL_BATCH
from node.ordering_monitor import BATCHES_IN_FLIGHT_FILLING_MAX, OrderingMonitor, OrderingWatch
from node.requests import RequestQueue
from node.snapshot_keeper import SnapshotKeeper
from node.state_join import StateJoin
from node.view_change import ViewChangeProtocol

# Bounds on what one replica holds in memory, whatever its peers and clients do.
VERIFIED_CACHE_MAX = 50_000
# Transaction ids whose client signature failed. A transaction id is the hash of all its bytes,
# signature included, and a check is deterministic, so a failed one fails for ever: remembering
# it (bounded, oldest forgotten) makes a re-sent forged batch or request cost no check at all.
FORGED_CACHE_MAX = 10_000
# A batch's unknown client signatures are checked in chunks of this size, then twice that, and so
# on, stopping at the first chunk with a forged one: a forged batch costs at most this many checks
# (as one-by-one checking cost at most one before the checks went to worker threads), while a
# genuine batch of 400 still needs only 7 calls to share among the cores.
SIGNATURE_CHUNK_FIRST = 4
TIMEOUT_DOUBLINGS_MAX = 6

# Kinds of durable records. The first group is garbage collected at the stable checkpoint.
LOG_KINDS = ("pre-prepare", "prepare", "commit", "prepared", "checkpoint")


@dataclass
class Slot:
    """Everything known about one sequence number in the current view."""

    sequence: int
    view: int
    pre_prepare: PrePrepareHeader | None = None
    batch: Batch | None = None
    prepares: dict[int, Prepare] = field(default_factory=dict)
    commits: dict[int, Commit] = field(default_factory=dict)
    # Votes that matched after the quorum, unchecked, one per replica: only ever compared with a
    # later conflicting vote as evidence (which checks both); never counted, never in a certificate.
    late_prepares: dict[int, Prepare] = field(default_factory=dict)
    late_commits: dict[int, Commit] = field(default_factory=dict)
    own_prepare: Prepare | None = None
    own_commit: Commit | None = None
    prepared: bool = False
    committed: bool = False
    last_sent_ms: int = 0

    @property
    def digest(self) -> bytes | None:
        return None if self.pre_prepare is None else self.pre_prepare.digest


class ReplicaCore(CheckpointProtocol, ViewChangeProtocol, OrderingWatch, CatchUp):
    """One replica's PBFT state machine. Deterministic: same events in, same effects out."""

    def __init__(
        self,
        network: NetworkConfig,
        replica_id: int,
        key: SigningKey,
        application: AccountsApplication,
        height: int = 0,
        last_block_hash: bytes | None = None,
        restored_records: list[tuple[str, Any]] | None = None,
        check_signature: SignatureCheck | None = None,
        last_timestamp_ms: int = 0,
        check_signatures: SignaturesCheck | None = None,
        state_sync_allowed: bool = False,
        store_prunes: bool = False,
        signature_memo_entries: int = VERIFIED_SIGNATURES_MAX,
    ) -> None:
        self.network = network
        self.replica_id = replica_id
        self.key = key
        self.application = application
        self.settings = network.protocol
        self.replica_count = network.replica_count
        self.faults = network.faults_tolerated
        self.quorum = network.quorum
        self.replica_keys = network.replica_keys
        self.check_signature: SignatureCheck = check_signature or PublicKeyCache().verify
        # A batch's client signatures are checked together: the runtime's function uses several cores.
        self.check_signatures: SignaturesCheck = check_signatures or one_by_one(self.check_signature)
        self.domains = {
            kind: signing_domain(network.identity, kind)
            for kind in ("pre-prepare", "prepare", "commit", "checkpoint", "view-change", BATCH_REPLY_DOMAIN)
        }
        self.batch_replies_signed = 0  # batch replies signed: one per executed block with an outcome, one per answered retransmission
        self.transaction_domain = transaction_domain(network.identity)
        # L in the paper: how far above the stable checkpoint sequence numbers are accepted.
        self.log_size = max(self.settings.window_size, 2 * self.settings.checkpoint_interval)
        # How many verified replica signatures are remembered; the simulator draws small memos, so
        # that a peer making us check the same evidence again shows within a short run.
        self.signatures = SignatureMemo(self.check_signature, signature_memo_entries)
        self.certificates = CertificateChecks(network, self.domains, self.signatures.verify, self.log_size)

        self.view = 0
        self.view_active = True
        self.height = height
        self.last_block_hash = last_block_hash if last_block_hash is not None else network.genesis_hash
        self.next_sequence = height + 1
        self.last_timestamp_ms = last_timestamp_ms  # the latest block timestamp in the chain
        # The latest timestamp of a batch executed in this view (its slot may be collected).
        self.view_timestamp_floor_ms = 0
        self.low = 0  # the stable checkpoint's sequence: the low watermark
        self.stable_checkpoint: CheckpointCertificate | None = None
        self.now_ms = 0

        self.slots: dict[int, Slot] = {}
        self.prepared: dict[int, PreparedRecord] = {}  # highest-view prepared certificate per sequence
        self.batches: dict[bytes, Batch] = {}  # batch contents by digest, for sequences above low
        self.checkpoints: dict[int, dict[int, Checkpoint]] = {}
        self.own_checkpoints: dict[int, Checkpoint] = {}
        self.signed: dict[tuple[str, int, int], Any] = {}  # what this replica signed, by (kind, view, sequence)
        self.latest_view_changes: dict[int, ViewChange] = {}  # per replica, its highest valid VIEW-CHANGE
        # Replicas whose VIEW-CHANGE there is signed but its certificates not checked yet: it is
        # for a view more than one ahead (node/view_change.py, _check_view_change).
        self.unchecked_view_changes: set[int] = set()
        # Per replica (per primary), the highest view of a VIEW-CHANGE (NEW-VIEW) it signed (sent)
        # that did not hold: nothing more from it up to there is looked at.
        self.refused_view_changes: dict[int, int] = {}
        self.refused_new_views: dict[int, int] = {}
        # When this primary last answered each replica's VIEW-CHANGE for its view with NEW-VIEW (at most n).
        self.new_view_answered_ms: dict[int, int] = {}
        self.own_view_change: ViewChange | None = None
        self.new_view: NewView | None = None
        self.view_change_started_ms: int | None = None  # when a quorum of VIEW-CHANGEs arrived
        self.view_change_attempts = 0
        # PBFT's request timer: started for one request a backup waits for, restarted only when
        # that request executes, so a primary cannot starve one client by serving others.
        self.timed_request: bytes | None = None
        self.request_timer_started_ms: int | None = None
        self.missing_batches: dict[bytes, int] = {}  # digest -> when last asked

        # Requests not yet executed: at the primary, waiting to be proposed; at a backup, watched.
        self.pending = RequestQueue(self.replica_count)
        # At a backup, the requests no pre-prepare of this view carried yet, and the ordering timer.
        self.ordering = OrderingMonitor(self.settings.ordering_timeout_ms)
        self.proposed: set[bytes] = set()
        self.verified: OrderedDict[bytes, None] = OrderedDict()
        self.forged: OrderedDict[bytes, None] = OrderedDict()

        self.peer_heights: dict[int, int] = {}
        self.peer_views: dict[int, int] = {}
        self.fetch_sent_ms: int | None = None
        self.fetch_peer_cursor = 0
        self.height_at_last_status = height
        self.last_status_ms = 0
        # State sync (node/state_join.py): only where the host's store may start from a snapshot
        # (an empty one, or one that already does); an archive replica replays every block.
        self.state_sync_allowed = state_sync_allowed
        # A store that prunes gives up blocks anyway; one that does not becomes an archive as
        # soon as it holds block 1, and from then on must never be replaced by a snapshot.
        self.store_prunes = store_prunes
        self.joining: StateJoin | None = None
        # No join at or below this checkpoint: an attempt at it failed (its peers keep no snapshot
        # of it, or stopped serving it), so the next is at a newer one, or blocks are fetched.
        self.join_failed_through = 0
        # The height of the last install: the next join (unless the blocks after it are pruned)
        # needs a checkpoint JOIN_AGAIN_DISTANCES * state_sync_distance above it, so a joiner
        # catches up the gap by blocks instead of chasing each newer checkpoint.
        self.joined_at: int | None = None
        self.gap_at_install = 0  # how far the newest stable checkpoint was above the install
        # Peers whose block fetch answer began above our next height, with our height then: f + 1
        # of them (one honest) at our current height mean the blocks we need are pruned.
        self.pruned_reports: dict[int, int] = {}
        self.snapshots = SnapshotKeeper()  # the states this replica serves to joining ones

        self.counters: dict[str, int] = {}
        self.late_votes = 0  # votes after their slot's quorum, not checked, kept for evidence only (_late_vote)
        self.evidence = EvidenceCollector(replica_id, self.certificates.signed_by)
        self.effects = Effects()
        if restored_records:
            self._restore(restored_records)
        if self.stable_checkpoint is not None and self.height == self.low:
            # Restarted at its stable checkpoint: the state in hand is the certified one.
            self.snapshots.freeze(self.height, self.application)
            self.snapshots.stable(self.stable_checkpoint)

    # ---- queries about the state ----

    @property
    def primary(self) -> int:
        return self.network.primary(self.view)

    @property
    def is_primary(self) -> bool:
        return self.primary == self.replica_id

    @property
    def high(self) -> int:
        return self.low + self.log_size

    def take_effects(self) -> Effects:
        effects, self.effects = self.effects, Effects()
        if effects.blocks:
            effects.state = self.application.take_changes()
        return effects

    def _reject(self, reason: str, detail: str = "") -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1
        if detail:
            self.effects.events.append(f"rejected: {reason}: {detail}")

    def _timeout_ms(self) -> int:
        return self.settings.view_change_timeout_ms << min(self.view_change_attempts, TIMEOUT_DOUBLINGS_MAX)

    # ---- signing: the one place that enforces "never sign two things for one slot" ----

    def _sign_once(
        self, kind: str, view: int, sequence: int, message: Any, digest: bytes | None, persist: bool = True
    ) -> Any:
        """Sign and persist `message`, or return what was already signed for (kind, view, sequence).

        An honest replica must never sign two different digests for one (view, sequence); if the
        protocol logic ever asked for that, it is our bug, and the assertion stops the replica
        before it can equivocate.
        """
        key = (kind, view, sequence)
        existing = self.signed.get(key)
        if existing is not None:
            existing_digest = existing.header.digest if isinstance(existing, PrePrepare) else getattr(existing, "digest", None)
            assert digest is None or existing_digest == digest, f"refusing to equivocate on {key}"
            return existing
        signature = self.key.sign(self.domains[kind], message.signed_bytes())
        signed = with_signature(message, signature)
        self.signed[key] = signed
        if persist:
            self.effects.persist.append(Persist(kind, view, sequence, signed))
        return signed

    # ---- restart ----

    def _restore(self, records: list[tuple[str, Any]]) -> None:
        """Resume from durable records: adopt own signed messages again, never contradict them."""
        new_views: list[NewView] = []
        for kind, message in records:
            if kind == "stable-checkpoint":
                if message.sequence > self.low:
                    self.stable_checkpoint, self.low = message, message.sequence
            elif kind == "prepared":
                self._remember_prepared(message)
            elif kind == "new-view":
                new_views.append(message)
            elif kind == "view-change":
                if self.own_view_change is None or message.new_view > self.own_view_change.new_view:
                    self.own_view_change = message
            elif kind == "checkpoint":
                self.own_checkpoints[message.sequence] = message
                self.checkpoints.setdefault(message.sequence, {})[self.replica_id] = message
            elif kind in ("pre-prepare", "prepare", "commit"):
                self.signed[(kind, message.view, message.sequence)] = message
                if isinstance(message, PrePrepare):
                    self.batches[message.batch.digest] = message.batch
        self._garbage_collect()
        latest_new_view = max(new_views, key=lambda new_view: new_view.view, default=None)
        view_change_view = self.own_view_change.new_view if self.own_view_change is not None else 0
        signed_view = max((view for _, view, _ in self.signed), default=0)
        if latest_new_view is not None and latest_new_view.view >= view_change_view:
            for header in latest_new_view.pre_prepares if latest_new_view.replica_id == self.replica_id else ():
                self.signed[("pre-prepare", header.view, header.sequence)] = header
            self._enter_view(latest_new_view)
        elif view_change_view > 0:
            self.view, self.view_active = view_change_view, False
            assert self.own_view_change is not None
            self.latest_view_changes[self.replica_id] = self.own_view_change
        self.view = max(self.view, signed_view)
        self.next_sequence = max(
            [self.height + 1, self.low + 1]
            + [sequence + 1 for kind, view, sequence in self.signed if kind == "pre-prepare" and view == self.view]
        )
        for _kind, view, sequence in sorted(self.signed):
            if view == self.view and sequence > self.low:
                self._slot(sequence)
        # Re-sent on the first status interval: peers may never have received them.
        for slot in self.slots.values():
            slot.last_sent_ms = -self.settings.status_interval_ms

    def advance_clock(self, now_ms: int) -> None:
        """Logical time advances without running timers: the host calls it before handing over a
        round's events, so they are judged (batch timestamps, the request timer, arrival times) by
        the time they arrived, not by the last tick's (up to 100 ms old on a quiet replica)."""
        self.now_ms = max(self.now_ms, now_ms)

    def quiet(self) -> bool:
        """Whether nothing here waits on a timer finer than the status interval: no request waiting
        or proposed, no batch proposed and not executed, none being fetched, no peer known to be
        ahead, no view change and no join. The host may then tick less often: a message wakes it
        anyway, and the status exchange runs on the status interval."""
        return (
            self.view_active
            and self.joining is None
            and not self.pending
            and not self.proposed
            and not self.missing_batches
            and self.fetch_sent_ms is None
            and max(self.slots, default=0) <= self.height
            and max(self.peer_heights.values(), default=0) <= self.height
        )

    # ---- events ----

    def tick(self, now_ms: int) -> None:
        """Logical time advances: cut batches, check timers, retransmit, exchange status."""
        self.now_ms = max(self.now_ms, now_ms)
        if self.view_active:
            if self.is_primary:
                self._propose_batches()
            elif (
                self.joining is None
                and self.request_timer_started_ms is not None
                and self.now_ms - self.request_timer_started_ms >= self._timeout_ms()
            ):
                self.effects.events.append(
                    f"request timer expired in view {self.view}: suspecting primary {self.primary}"
                )
                self._start_view_change(self.view + 1)
            elif self.joining is None:
                self._watch_ordering()
        elif self.view_change_started_ms is not None and self.now_ms - self.view_change_started_ms >= self._timeout_ms():
            # PBFT: the NEW-VIEW timer runs only once a quorum asked for this view; a replica
            # alone (cut off, say) keeps asking for the same view instead of running ahead.
            self.effects.events.append(f"view change to {self.view} timed out; trying view {self.view + 1}")
            self._start_view_change(self.view + 1)
        if self.now_ms - self.last_status_ms >= self.settings.status_interval_ms:
            self.last_status_ms = self.now_ms
            self._on_status_interval()
        if self.joining is not None:
            self._join_tick()

    def receive_request(self, transaction: Transaction, relayed_by: int | None = None) -> None:
        """A client's signed transaction, straight from a client or relayed by replica `relayed_by`."""
        transaction_id = transaction.transaction_id
        if transaction_id in self.pending or (self.is_primary and transaction_id in self.proposed):
            return
        busy = self.pending.refusal(transaction, relayed_by)
        if busy is not None:
            self._reject("request queue full" if relayed_by is None else "relayed requests over the relayer's share")
            self.effects.request_errors.append((transaction_id, busy))
            return
        if not self._transaction_signature_valid(transaction):
            self._reject("bad client signature")
            self.effects.request_errors.append((transaction_id, "bad signature"))
            return
        refusal = self.application.check(transaction)
        if refusal is not None:
            self.effects.request_errors.append((transaction_id, refusal))
            return
        self.pending.add(transaction, self.now_ms, relayed_by)
        if self.is_primary:
            if self.view_active and len(self.pending) >= self.settings.batch_size_max:
                self._propose_batches()
        else:
            # PBFT: a backup that hears of a request times it: if it is not executed in time, the
            # primary is suspected and replaced. Clients send every request to every replica, so
            # the primary has it already: the ordering watch relays it only if it is not ordered
            # soon (node/ordering_monitor.py). With the watch off, it is relayed at once, as in
            # PBFT, in case the client could not reach the primary.
            if self.ordering.enabled:
                # Watched unless the unbroken run already carries it: a pre-prepare behind a gap
                # that came before the client's copy must not hide it (an adversarial review).
                if transaction_id not in self.proposed or not self._in_ordered_run(transaction_id):
                    self.ordering.heard(transaction_id, self.now_ms)
            elif transaction_id not in self.proposed:
                self.effects.send.append(Send(self.primary, Request(transaction)))
            self._refresh_request_timer()

    def receive_message(self, sender: int, message: Any) -> None:
        """A message from authenticated peer `sender` (signatures inside are still checked here)."""
        if isinstance(message, Prepare):
            self._on_prepare(message)
        elif isinstance(message, Commit):
            self._on_commit(message)
        elif isinstance(message, PrePrepare):
            self._on_pre_prepare(message)
        elif isinstance(message, Checkpoint):
            self._on_checkpoint(message)
        elif isinstance(message, Request):
            self.receive_request(message.transaction, relayed_by=sender)
        elif isinstance(message, Status):
            self._on_status(sender, message)
        elif isinstance(message, Blocks):
            self._on_blocks(sender, message)
        elif isinstance(message, ViewChange):
            self._on_view_change(sender, message)
        elif isinstance(message, NewView):
            self._on_new_view(sender, message)
        elif isinstance(message, FetchBatch):
            batch = self._find_batch(message.digest)
            if batch is not None:
                self.effects.send.append(Send(sender, BatchContent(batch)))
        elif isinstance(message, BatchContent):
            self._on_batch_content(message.batch)
        elif isinstance(message, SnapshotChunk):
            self._on_snapshot_chunk(sender, message)
        elif isinstance(message, FetchBlocks):
            pass  # answered by the host from its store; never reaches the core
        else:
            self._reject("unexpected message type", type(message).__name__)

    # ---- the primary ----

    def _ready_to_propose(self) -> bool:
        """A new primary proposes only once it holds every batch its view starts with: then it
        knows every timestamp of this view a backup may hold, so a stamp of its own is never
        refused for going back (which would be for good: a PRE-PREPARE cannot be re-stamped).
        Only the slots not executed yet count: an executed one's stamp is in the chain
        (last_timestamp_ms), and its batch may never arrive, since a replica that caught those
        blocks up by fetching them never held their batches and nobody sends them any more (a
        crash test stalled for good: every new primary waited for such a batch)."""
        return all(
            slot.batch is not None for sequence, slot in self.slots.items() if sequence > self.height and slot.pre_prepare is not None
        )

    def _batches_in_flight(self) -> int:
        """Batches of this view proposed (or assigned by its NEW-VIEW) and not executed yet."""
        return sum(1 for sequence, slot in self.slots.items() if sequence > self.height and slot.pre_prepare is not None)

    def _propose_batches(self) -> None:
        if not self._ready_to_propose():
            return
        while self.pending and self.next_sequence <= min(self.high, self.height + self.settings.window_size):
            waited = self.now_ms - self.pending.arrived_ms(self.pending.oldest_id())
            if len(self.pending) < self.settings.batch_size_max:
                # Under load, a batch that is not full waits while earlier ones are still being
                # agreed on: it fills meanwhile, so per-batch work (votes, signatures, disk writes)
                # is shared by more transactions. With nothing in flight there is nothing to wait
                # for: a lone request goes out on the next tick (the runtime ticks right after each
                # round of events). With one batch in flight the next waits batch_wait_ms to gather
                # company. A full batch always goes at once.
                in_flight = self._batches_in_flight()
                if in_flight >= BATCHES_IN_FLIGHT_FILLING_MAX or (in_flight and waited < self.settings.batch_wait_ms):
                    return
            transactions = []
            while self.pending and len(transactions) < self.settings.batch_size_max:
                transaction = self.pending.pop_oldest()
                transaction_id = transaction.transaction_id
                # Already in a batch of this view, or its nonce was used since it arrived.
                if transaction_id in self.proposed or self.application.check(transaction) is not None:
                    continue
                self.proposed.add(transaction_id)
                transactions.append(transaction)
            if transactions:
                self._propose(Batch(self.view, self.replica_id, self._proposal_timestamp(), in_nonce_order(transactions)))

    def _proposal_timestamp(self) -> int:
        """Our clock, but never before a batch already in the chain or in flight: backups refuse
        a stamp that goes back (a previous primary's clock may have run ahead of ours)."""
        in_flight = (slot.batch.timestamp_ms for slot in self.slots.values() if slot.batch is not None)
        return max(self.now_ms, self.last_timestamp_ms, self.view_timestamp_floor_ms, *in_flight)

    def _propose(self, batch: Batch) -> None:
        # Our own stamps never go back either, even once their slots are collected.
        self.view_timestamp_floor_ms = max(self.view_timestamp_floor_ms, batch.timestamp_ms)
        sequence = self.next_sequence
        self.next_sequence += 1
        pre_prepare = self._sign_once(
            "pre-prepare", self.view, sequence, PrePrepare(self.view, sequence, batch, self.replica_id), batch.digest
        )
        self.batches[batch.digest] = batch
        slot = self._slot(sequence)
        slot.pre_prepare, slot.batch = pre_prepare.header, batch
        slot.last_sent_ms = self.now_ms
        self.effects.send.append(Send(None, pre_prepare))
        self._advance(slot)

    # ---- normal-case messages ----

    def _slot(self, sequence: int) -> Slot:
        """The slot for `sequence` in the current view, seeded with whatever this replica signed."""
        slot = self.slots.get(sequence)
        if slot is not None and slot.view == self.view:
            return slot
        slot = Slot(sequence, self.view, last_sent_ms=self.now_ms)
        self.slots[sequence] = slot
        signed_pre_prepare = self.signed.get(("pre-prepare", self.view, sequence))
        if signed_pre_prepare is not None:
            header = signed_pre_prepare.header if isinstance(signed_pre_prepare, PrePrepare) else signed_pre_prepare
            slot.pre_prepare = header
            slot.batch = self._find_batch(header.digest)
        own_prepare = self.signed.get(("prepare", self.view, sequence))
        if own_prepare is not None:
            slot.own_prepare = own_prepare
            slot.prepares[self.replica_id] = own_prepare
        own_commit = self.signed.get(("commit", self.view, sequence))
        if own_commit is not None:
            slot.own_commit = own_commit
            slot.commits[self.replica_id] = own_commit
        return slot

    def _accepts(self, view: int, sequence: int) -> bool:
        if view != self.view or not self.view_active:
            self._reject("wrong view")
            return False
        if not self.low < sequence <= self.high:
            self._reject("outside watermarks")
            return False
        return True

    def _transaction_signature_valid(self, transaction: Transaction) -> bool:
        transaction_id = transaction.transaction_id
        if transaction_id in self.verified:
            return True
        if transaction_id in self.forged:
            return False
        valid = self.check_signature(
            transaction.sender, self.transaction_domain, transaction.signed_bytes(), transaction.signature
        )
        if valid:
            self._remember_verified(transaction_id)
        else:
            self._remember_forged(transaction_id)
        return valid

    def _transaction_signatures_valid(self, transactions: tuple[Transaction, ...]) -> bool:
        """Whether every client signature verifies. Those not known yet are checked in chunks
        (SIGNATURE_CHUNK_FIRST, then doubling), each chunk in one call of check_signatures so the
        host can share it among cores, stopping at the first chunk holding a forged one: a batch
        with a known forged transaction costs no check, any other forged batch at most one chunk
        beyond its genuine transactions, and each transaction at most one check."""
        if any(transaction.transaction_id in self.forged for transaction in transactions):
            return False
        unknown = [transaction for transaction in transactions if transaction.transaction_id not in self.verified]
        chunk_size = SIGNATURE_CHUNK_FIRST
        start = 0
        while start < len(unknown):
            chunk = unknown[start : start + chunk_size]
            if len(chunk) == 1:
                if not self._transaction_signature_valid(chunk[0]):
                    return False
            else:
                results = self.check_signatures(
                    [(transaction.sender, self.transaction_domain, transaction.signed_bytes(), transaction.signature) for transaction in chunk]
                )
                if len(results) != len(chunk):
                    raise AssertionError("check_signatures gave another number of results than it was given checks")
                for transaction, valid in zip(chunk, results, strict=True):
                    if valid:
                        self._remember_verified(transaction.transaction_id)
                    else:
                        self._remember_forged(transaction.transaction_id)
                if not all(results):
                    return False
            start += chunk_size
            chunk_size *= 2
        return True

    def _remember_forged(self, transaction_id: bytes) -> None:
        self.forged[transaction_id] = None
        self.forged.move_to_end(transaction_id)
        if len(self.forged) > FORGED_CACHE_MAX:
            self.forged.popitem(last=False)

    def _remember_verified(self, transaction_id: bytes) -> None:
        self.verified[transaction_id] = None
        self.verified.move_to_end(transaction_id)
        if len(self.verified) > VERIFIED_CACHE_MAX:
            self.verified.popitem(last=False)

    def signature_verified(self, transaction_id: bytes) -> bool:
        """Whether this transaction's client signature is known to verify."""
        return transaction_id in self.verified

    def note_verified_signatures(self, transaction_ids: list[bytes], refused: list[bytes] | None = None) -> None:
        """The host checked these transactions' client signatures (with this core's transaction
        domain): those of `transaction_ids` verified, so the core need not check them again;
        those of `refused` did not, so the core refuses them without a second check (both
        bounded, oldest forgotten; a transaction id covers every byte, signature included)."""
        for transaction_id in transaction_ids:
            self._remember_verified(transaction_id)
        for transaction_id in refused or ():
            self._remember_forged(transaction_id)

    def requests_worth_checking(self, requests: list[tuple[Transaction, int | None]]) -> list[Transaction]:
        """Of these requests (transaction, relaying replica or None), in the order receive_request
        will get them, those whose signature it would check: not already waiting or proposed,
        not known good or forged, and admitted by the queue's limits (counting the earlier ones
        as admitted). The host checks only these ahead, so a request refused as busy still costs
        no signature check."""
        admitted = self.pending.admission_simulator()
        worth: dict[bytes, Transaction] = {}
        for transaction, relayed_by in requests:
            transaction_id = transaction.transaction_id
            if transaction_id in self.pending or transaction_id in worth or (self.is_primary and transaction_id in self.proposed):
                continue
            if transaction_id in self.forged:
                continue  # refused without a check, and takes no room
            if admitted.admit(transaction, relayed_by) and transaction_id not in self.verified:
                worth[transaction_id] = transaction  # a known good one takes room but needs no check
        return list(worth.values())

    def _on_pre_prepare(self, message: PrePrepare) -> None:
        if not self._accepts(message.view, message.sequence):
            return
        if message.replica_id != self.network.primary(message.view):
            self._reject("pre-prepare not from the primary", f"replica {message.replica_id}")
            return
        slot = self._slot(message.sequence)
        digest = message.batch.digest
        if slot.pre_prepare is None and slot.own_prepare is not None and slot.own_prepare.digest != digest:
            # After a restart: we prepared another batch for this slot before; stay with it.
            self._reject("conflicting pre-prepare", f"view {message.view} sequence {message.sequence}")
            return
        if slot.pre_prepare is not None:
            if slot.pre_prepare.digest != digest:
                self._reject("conflicting pre-prepare", f"view {message.view} sequence {message.sequence}")
                self._check_conflict("pre-prepare", slot.pre_prepare, message.header)
            elif slot.batch is None:
                self._adopt_batch(message.batch)  # the content of a NEW-VIEW assignment
            return
        if not self.certificates.signed_by("pre-prepare", message):
            self._reject("bad pre-prepare signature", f"sequence {message.sequence}")
            return
        problem = self._batch_problem(message)
        if problem is not None:
            self._reject("invalid batch", problem)
            return
        slot.pre_prepare, slot.batch = message.header, message.batch
        self.evidence.accepted_pre_prepare(message.header)
        self.batches[digest] = message.batch
        if message.sequence > self.height:
            for transaction in message.batch.transactions:
                self.proposed.add(transaction.transaction_id)
        self.ordering.pre_prepare_arrived()
        self._advance_ordered_run()
        # Votes that arrived before the pre-prepare with another digest never count.
        slot.prepares = {r: p for r, p in slot.prepares.items() if p.digest == digest}
        slot.commits = {r: c for r, c in slot.commits.items() if c.digest == digest}
        if not self.is_primary:
            self._send_prepare(slot)
        self._advance(slot)

    def _batch_problem(self, message: PrePrepare) -> str | None:
        batch = message.batch
        if batch.view != message.view or batch.proposer != message.replica_id:
            return "batch does not name this view and primary"
        if len(batch.transactions) > self.settings.batch_size_max:
            return f"{len(batch.transactions)} transactions exceed the batch limit"
        problem = self._timestamp_problem(message.sequence, batch.timestamp_ms)
        if problem is not None:
            return problem
        if len({transaction.transaction_id for transaction in batch.transactions}) != len(batch.transactions):
            return "a transaction appears twice"
        if not self._transaction_signatures_valid(batch.transactions):
            return "a transaction has a bad client signature"
        return None

    def _timestamp_problem(self, sequence: int, timestamp_ms: int) -> str | None:
        """A new proposal's time must be near our clock and keep the chain's order. (Batches a
        NEW-VIEW re-proposes were checked when first proposed and keep their time.)"""
        skew_max = self.settings.clock_skew_max_ms
        if abs(timestamp_ms - self.now_ms) > skew_max:
            return f"timestamp {timestamp_ms} is more than {skew_max} ms from this replica's clock ({self.now_ms})"
        if timestamp_ms < self.view_timestamp_floor_ms:
            return f"timestamp {timestamp_ms} is before a block of this view ({self.view_timestamp_floor_ms})"
        for other, slot in self.slots.items():
            batch = slot.batch
            if batch is None or not batch.transactions or other == sequence:
                continue
            if (other < sequence and batch.timestamp_ms > timestamp_ms) or (other > sequence and batch.timestamp_ms < timestamp_ms):
                return f"timestamp {timestamp_ms} is out of order with sequence {other}'s ({batch.timestamp_ms})"
        return None

    def _send_prepare(self, slot: Slot) -> None:
        if slot.own_prepare is None:
            slot.own_prepare = self._vote(Prepare, slot)
            slot.prepares[self.replica_id] = slot.own_prepare

    def _vote(self, kind: type[Prepare] | type[Commit], slot: Slot) -> Any:
        """Sign (once), persist and broadcast this replica's PREPARE or COMMIT for the slot."""
        assert slot.pre_prepare is not None
        digest = slot.pre_prepare.digest
        vote = self._sign_once(
            kind.TAG, slot.view, slot.sequence, kind(slot.view, slot.sequence, digest, self.replica_id), digest
        )
        slot.last_sent_ms = self.now_ms
        self.effects.send.append(Send(None, vote))
        return vote

    def _on_prepare(self, message: Prepare) -> None:
        if not self._accepts(message.view, message.sequence):
            return
        if message.replica_id == self.network.primary(message.view):
            self._reject("prepare from the primary")
            return
        slot = self._slot(message.sequence)
        held = slot.prepares.get(message.replica_id) or self._late_held("prepare", slot.late_prepares, message)
        if held is not None:
            # One vote per replica: a duplicate or a conflicting second vote never counts; a
            # conflicting one is evidence against its signer.
            if held.digest != message.digest:
                self._check_conflict("prepare", held, message)
            return
        if slot.digest is not None and message.digest != slot.digest:
            self._reject("prepare for another digest", f"replica {message.replica_id} sequence {message.sequence}")
            return
        if slot.prepared:
            # The same digest, after the quorum: it proves nothing the slot lacks, so its
            # signature is not checked (n - 2f - 1 such votes a block; see _late_vote).
            self._late_vote(slot.late_prepares, message)
            return
        if not self.certificates.signed_by("prepare", message):
            self._reject("bad prepare signature", f"replica {message.replica_id}")
            return
        slot.prepares[message.replica_id] = message
        self._advance(slot)

    def _on_commit(self, message: Commit) -> None:
        if not self._accepts(message.view, message.sequence):
            return
        slot = self._slot(message.sequence)
        held = slot.commits.get(message.replica_id) or self._late_held("commit", slot.late_commits, message)
        if held is not None:
            if held.digest != message.digest:
                self._check_conflict("commit", held, message)
            return
        if slot.digest is not None and message.digest != slot.digest:
            self._reject("commit for another digest", f"replica {message.replica_id} sequence {message.sequence}")
            return
        if slot.committed:
            self._late_vote(slot.late_commits, message)
            return
        if not self.certificates.signed_by("commit", message):
            self._reject("bad commit signature", f"replica {message.replica_id}")
            return
        slot.commits[message.replica_id] = message
        self._advance(slot)

    def _late_vote(self, late: dict[int, Any], message: Prepare | Commit) -> None:
        """A PREPARE or COMMIT matching a slot that already prepared (committed): its signature
        is not checked, which would cost an Ed25519 verify for nothing (at n = 4 one PREPARE and
        one COMMIT a block, a third to two fifths of a replica's vote checks), and it is kept
        apart from the votes that count, so an unchecked signature never reaches a certificate.
        It is kept (one per replica, the first) for one use: a later conflicting vote from the
        same replica, or a VIEW-CHANGE certificate naming it for another digest, is compared with
        it as evidence, and evidence checks both signatures (found by an adversarial review:
        dropping late votes unkept lost evidence against a replica whose matching vote came late,
        such as a key run twice). A forged late vote never frames an honest replica; planted
        first, it can hide another traitor's conflict from this replica until a conflicting vote
        shows it forged (_late_held) and the signer's own late vote takes its place."""
        self.late_votes += 1
        if message.replica_id < self.network.replica_count:
            late.setdefault(message.replica_id, message)

    def _late_held(self, kind: str, late: dict[int, Any], other: Prepare | Commit) -> Any | None:
        """The late vote kept for `other`'s signer, if any. One whose digest differs from
        `other`'s is checked first (once, then remembered by the signature memo): a forged one
        is forgotten, so a traitor's planted forgery costs one check, not two per conflicting
        vote for good, and leaves room for the signer's own late vote (found by an adversarial
        review: 20 conflicting votes cost 40 checks against a planted forgery, 2 against a
        genuine late vote). A forgery found so is counted like one refused on arrival: an operator
        reading ledger_rejections_total sees that someone forges votes."""
        held = late.get(other.replica_id)
        if held is not None and held.digest != other.digest and not self.certificates.signed_by(kind, held):
            del late[other.replica_id]
            self._reject(f"bad {kind} signature", f"replica {other.replica_id} sequence {other.sequence} (a late vote, found forged)")
            return None
        return held

    def _check_conflict(self, kind: str, held: Any, other: Any) -> None:
        """Report `other` as evidence if it and the `held` message prove their signer equivocated."""
        evidence = self.evidence.conflict(kind, held, other)
        if evidence is not None:
            self.effects.evidence.append(evidence)

    def _check_prepared_conflicts(self, certificate: PreparedCertificate) -> None:
        """A verified prepared certificate (from a VIEW-CHANGE) carries the primary's pre-prepare
        and backups' prepares: any that contradicts what we hold for that slot is evidence."""
        header = certificate.pre_prepare
        slot = self.slots.get(certificate.sequence)
        if slot is None or slot.view != certificate.view:
            # The slot went with a view change; the PRE-PREPARE we accepted for it may be remembered.
            held = self.evidence.held_pre_prepare(header.view, header.sequence)
            if held is not None and held.digest != header.digest:
                self._check_conflict("pre-prepare", held, header)
            return
        if slot.pre_prepare is not None and slot.pre_prepare.digest != header.digest:
            self._check_conflict("pre-prepare", slot.pre_prepare, header)
        for replica_id, signature in certificate.prepares:
            other = Prepare(header.view, header.sequence, header.digest, replica_id, signature)
            held = slot.prepares.get(replica_id) or self._late_held("prepare", slot.late_prepares, other)
            if held is not None and held.digest != header.digest:
                self._check_conflict("prepare", held, other)

    def is_prepared(self, slot: Slot) -> bool:
        """The pre-prepare plus matching prepares from quorum - 1 distinct backups."""
        if slot.pre_prepare is None:
            return False
        digest = slot.pre_prepare.digest
        return sum(1 for prepare in slot.prepares.values() if prepare.digest == digest) >= self.quorum - 1

    def is_committed(self, slot: Slot) -> bool:
        """Prepared, plus matching commits from a quorum of distinct replicas."""
        if not slot.prepared:
            return False
        digest = slot.digest
        return sum(1 for commit in slot.commits.values() if commit.digest == digest) >= self.quorum

    def _advance(self, slot: Slot) -> None:
        if not slot.prepared and self.is_prepared(slot):
            slot.prepared = True
            self._record_prepared(slot)
            self._send_commit(slot)
        if slot.prepared and not slot.committed and self.is_committed(slot):
            slot.committed = True
            self._execute_ready()

    def _record_prepared(self, slot: Slot) -> None:
        """Keep (durably) the proof that this slot prepared: view changes must carry it forward."""
        assert slot.pre_prepare is not None
        digest = slot.pre_prepare.digest
        prepares = tuple(
            sorted((replica_id, prepare.signature) for replica_id, prepare in slot.prepares.items() if prepare.digest == digest)
        )
        batch = slot.batch if slot.batch is not None else self._find_batch(digest)
        # Durable before the COMMIT that follows: a view change must carry this certificate
        # forward even if the batch content is still being fetched.
        record = PreparedRecord(PreparedCertificate(slot.pre_prepare, prepares[: self.quorum - 1]), batch)
        if self._remember_prepared(record):
            self.effects.persist.append(Persist("prepared", slot.view, slot.sequence, record))

    def _remember_prepared(self, record: PreparedRecord) -> bool:
        sequence = record.certificate.sequence
        if sequence <= self.low:
            return False
        existing = self.prepared.get(sequence)
        if existing is not None:
            newer = record.certificate.view > existing.certificate.view
            completes = record.certificate.view == existing.certificate.view and existing.batch is None and record.batch is not None
            if not (newer or completes):
                return False
        self.prepared[sequence] = record
        if record.batch is not None:
            self.batches[record.batch.digest] = record.batch
        return True

    def _send_commit(self, slot: Slot) -> None:
        if slot.own_commit is None:
            slot.own_commit = self._vote(Commit, slot)
            slot.commits[self.replica_id] = slot.own_commit

    # ---- batch contents ----

    def _find_batch(self, digest: bytes) -> Batch | None:
        if digest == NULL_BATCH.digest:
            return NULL_BATCH
        return self.batches.get(digest)

    def _adopt_batch(self, batch: Batch) -> None:
        digest = batch.digest
        self.batches[digest] = batch
        self.missing_batches.pop(digest, None)
        for sequence, record in list(self.prepared.items()):
            if record.batch is None and record.certificate.digest == digest:
                completed = PreparedRecord(record.certificate, batch)
                self.prepared[sequence] = completed
                self.effects.persist.append(Persist("prepared", record.certificate.view, sequence, completed))
        for slot in self.slots.values():
            if slot.digest == digest and slot.batch is None:
                slot.batch = batch
                for transaction in batch.transactions:
                    self.proposed.add(transaction.transaction_id)
                if slot.prepared:
                    self._record_prepared(slot)  # now with its batch
        self._advance_ordered_run()
        self._execute_ready()

    def _on_batch_content(self, batch: Batch) -> None:
        if batch.digest not in self.missing_batches:
            return  # unasked for, or already known: never trusted blindly
        if not self._transaction_signatures_valid(batch.transactions):
            self._reject("invalid batch", "a fetched batch has a bad client signature")
            return
        self._adopt_batch(batch)

    # ---- execution ----

    def _execute_ready(self) -> None:
        """Execute committed slots strictly in sequence order, each becoming the next block."""
        while True:
            slot = self.slots.get(self.height + 1)
            if slot is None or not slot.committed or slot.pre_prepare is None:
                return
            if slot.batch is None:
                self._ask_for_batch(slot.pre_prepare.digest)
                return
            digest = slot.pre_prepare.digest
            signatures = tuple(
                sorted((replica_id, commit.signature) for replica_id, commit in slot.commits.items() if commit.digest == digest)
            )
            self.view_timestamp_floor_ms = max(self.view_timestamp_floor_ms, slot.batch.timestamp_ms)
            self._execute_batch(slot.batch, CommitCertificate(slot.view, signatures))

    def _ask_for_batch(self, digest: bytes) -> None:
        asked = self.missing_batches.get(digest)
        if asked is None or self.now_ms - asked >= self.settings.status_interval_ms:
            self.missing_batches[digest] = self.now_ms
            self.effects.send.append(Send(None, FetchBatch(digest)))

    def _execute_batch(self, batch: Batch, certificate: CommitCertificate) -> Block:
        height = self.height + 1
        transactions = list(batch.transactions)
        results = self.application.execute_block(transactions)
        root_of_results = results_root(results)
        header = BlockHeader(
            height=height,
            view=batch.view,
            proposer=batch.proposer,
            parent_hash=self.last_block_hash,
            transactions_root=batch.transactions_root,
            results_root=root_of_results,
            state_digest=self.application.state_digest(),
            timestamp_ms=batch.timestamp_ms,
        )
        # The batch's root is of these transactions, and root_of_results of these results.
        block = executed_block(header, tuple(transactions), tuple(results), certificate, batch.transactions_root, root_of_results)
        if height == 1 and not self.store_prunes:
            self.state_sync_allowed = False  # the store now holds the chain from genesis: an archive
        self.height = height
        self.last_block_hash = header.block_hash
        self.last_timestamp_ms = max(self.last_timestamp_ms, batch.timestamp_ms)
        self.next_sequence = max(self.next_sequence, height + 1)
        self.effects.blocks.append(block)
        senders = set()
        for transaction in transactions:
            transaction_id = transaction.transaction_id
            senders.add(transaction.sender)
            self.pending.remove(transaction_id)
            self.proposed.discard(transaction_id)
            self.ordering.ordered(transaction_id)
        for reply in self._signed_replies(block):
            self.effects.replies.append(ClientReply(block.transactions[reply.index].sender, reply))
        self._drop_stale_requests(senders)
        if self.view_active:
            self.view_change_attempts = 0  # progress in this view: the back-off resets
        self._refresh_request_timer()
        if height % self.settings.checkpoint_interval == 0:
            self._make_checkpoint()
        return block

    def _refresh_request_timer(self) -> None:
        """Keep timing the request the timer runs for while it is pending; once it executed (or
        there is none), time the oldest pending request from now."""
        if self.is_primary or not self.view_active or not self.pending or self.joining is not None:
            # While joining nothing executes here, whatever the primary does: time nothing.
            self.timed_request, self.request_timer_started_ms = None, None
            return
        if self.timed_request in self.pending and self.request_timer_started_ms is not None:
            return
        self.timed_request = self.pending.oldest_id()
        self.request_timer_started_ms = self.now_ms

    def _drop_stale_requests(self, senders: set[bytes]) -> None:
        """Watched requests whose nonce is now used can never execute; stop waiting for them."""
        if not senders or not self.pending:
            return
        for sender in senders:
            for transaction in self.pending.of_account(sender):
                if self.application.check(transaction) is not None:
                    self.pending.remove(transaction.transaction_id)
                    self.ordering.ordered(transaction.transaction_id)

    @staticmethod
    def _reply_entries(block: Block) -> list[ReplyEntry]:
        """The entries of a block that get a REPLY, in block order: its outcomes only.

        A client never holds f + 1 signatures on a deferred "failure" that a later block could
        turn into an execution, nor on a replay's "failure" of a transaction whose outcome is
        elsewhere: their entries are left out of the signed tree, so no path to them exists."""
        return [
            (transaction.transaction_id, result, index)
            for index, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True))
            if not is_replay(result) and not is_deferred(result)
        ]

    def _sign_batch_reply(self, data: bytes) -> bytes:
        self.batch_replies_signed += 1
        return self.key.sign(self.domains[BATCH_REPLY_DOMAIN], data)

    def _signed_replies(self, block: Block) -> list[Reply]:
        """This replica's REPLYs for a block, under one signed batch reply (one Ed25519 signature)."""
        entries = self._reply_entries(block)
        return make_replies(self.replica_id, self.view, block.height, block.block_hash, entries, self._sign_batch_reply)

    def signed_reply(self, block: Block, index: int) -> Reply | None:
        """This replica's REPLY for transaction `index` of a stored block (a retransmitted request),
        or None for an entry that gets no reply (deferred or replayed)."""
        entries = self._reply_entries(block)
        for position, entry in enumerate(entries):
            if entry[2] == index:
                return make_reply(self.replica_id, self.view, block.height, block.block_hash, entries, position, self._sign_batch_reply)
        return None

    # ---- reads and status ----

    def query(self, kind: str, argument: Any) -> Any:
        return self.application.query(kind, argument)


def in_nonce_order(transactions: list[Transaction]) -> tuple[Transaction, ...]:
    """The same transactions, each sender's in nonce order within the places its own took: requests
    that arrived out of order would otherwise be deferred and wait for the client's retry."""
    places: dict[bytes, list[int]] = {}
    for position, transaction in enumerate(transactions):
        places.setdefault(transaction.sender, []).append(position)
    ordered = list(transactions)
    for positions in places.values():
        if len(positions) > 1:
            for position, transaction in zip(positions, sorted((transactions[p] for p in positions), key=lambda t: t.nonce), strict=True):
                ordered[position] = transaction
    return tuple(ordered)
