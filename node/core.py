"""The pure PBFT replica: a deterministic state machine fed events, returning effects (sans-IO).

Nothing here touches sockets, clocks, threads or randomness. The runtime (or the simulator) calls
`receive_request`, `receive_message` and `tick`, then `take_effects`, and carries the effects out
in order: persist, send, store blocks, reply. A replica never sends a signed message that is not
yet durable, so restarting an honest replica can never make it sign two things for one slot.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ledger.application import AccountsApplication
from ledger.blocks import (
    Block,
    BlockHeader,
    ChainError,
    CommitCertificate,
    verify_block_contents,
    verify_certificate,
)
from ledger.config import NetworkConfig
from ledger.crypto import PublicKeyCache, SigningKey, signing_domain
from ledger.encoding import CodecError
from ledger.merkle import merkle_root
from ledger.messages import (
    BLOCKS_PER_RESPONSE_MAX,
    Batch,
    Blocks,
    Commit,
    FetchBlocks,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    Status,
)
from ledger.transactions import Transaction, transaction_domain

SignatureCheck = Callable[[bytes, bytes, bytes, bytes], bool]

# Bounds on what one replica holds in memory, whatever its peers and clients do.
PENDING_REQUESTS_MAX = 100_000
VERIFIED_CACHE_MAX = 200_000


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` to replica `to`, or to every other replica when `to` is None."""

    to: int | None
    message: Any


@dataclass(frozen=True, slots=True)
class Persist:
    """Make this own signed message durable before any Send that follows it."""

    kind: str
    view: int
    sequence: int
    message: Any


@dataclass(frozen=True, slots=True)
class ClientReply:
    account: bytes
    reply: Reply


@dataclass
class Effects:
    """What the host must do, in this order: persist, send, store blocks, reply to clients."""

    persist: list[Persist] = field(default_factory=list)
    send: list[Send] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    replies: list[ClientReply] = field(default_factory=list)
    request_errors: list[tuple[bytes, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.persist or self.send or self.blocks or self.replies or self.request_errors or self.events)


@dataclass
class Slot:
    """Everything known about one sequence number in the current view."""

    sequence: int
    view: int
    pre_prepare: PrePrepare | None = None
    prepares: dict[int, Prepare] = field(default_factory=dict)
    commits: dict[int, Commit] = field(default_factory=dict)
    own_prepare: Prepare | None = None
    own_commit: Commit | None = None
    committed: bool = False
    last_sent_ms: int = 0

    @property
    def digest(self) -> bytes | None:
        return None if self.pre_prepare is None else self.pre_prepare.batch.digest


class ReplicaCore:
    """One replica's PBFT state machine. Deterministic: same events in, same effects out."""

    def __init__(
        self,
        network: NetworkConfig,
        replica_id: int,
        key: SigningKey,
        application: AccountsApplication,
        height: int = 0,
        last_block_hash: bytes | None = None,
        restored_messages: list[Any] | None = None,
        check_signature: SignatureCheck | None = None,
    ) -> None:
        self.network = network
        self.replica_id = replica_id
        self.key = key
        self.application = application
        self.settings = network.protocol
        self.replica_count = network.replica_count
        self.quorum = network.quorum
        self.replica_keys = network.replica_keys
        self.check_signature: SignatureCheck = check_signature or PublicKeyCache().verify
        self.domains = {
            kind: signing_domain(network.network_id, kind) for kind in ("pre-prepare", "prepare", "commit", "reply")
        }
        self.transaction_domain = transaction_domain(network.network_id)

        self.view = 0
        self.height = height
        self.last_block_hash = last_block_hash if last_block_hash is not None else network.genesis_hash
        self.next_sequence = height + 1
        self.slots: dict[int, Slot] = {}
        self.now_ms = 0

        # Requests not yet executed: at the primary, waiting to be proposed; at a backup, watched.
        self.pending: OrderedDict[bytes, Transaction] = OrderedDict()
        self.pending_since_ms: dict[bytes, int] = {}
        self.proposed: set[bytes] = set()
        self.verified: OrderedDict[bytes, None] = OrderedDict()

        self.peer_heights: dict[int, int] = {}
        self.fetch_sent_ms: int | None = None
        self.fetch_peer_cursor = 0
        self.height_at_last_status = height
        self.last_status_ms = 0

        self.counters: dict[str, int] = {}
        self.effects = Effects()
        for message in restored_messages or []:
            self._restore(message)

    # ---- queries about the state ----

    @property
    def primary(self) -> int:
        return self.network.primary(self.view)

    @property
    def is_primary(self) -> bool:
        return self.primary == self.replica_id

    def take_effects(self) -> Effects:
        effects, self.effects = self.effects, Effects()
        return effects

    def _reject(self, reason: str, detail: str = "") -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1
        if detail:
            self.effects.events.append(f"rejected: {reason}: {detail}")

    # ---- restart ----

    def _restore(self, message: Any) -> None:
        """Re-adopt an own signed message from disk: it will be re-sent, never contradicted."""
        if message.sequence <= self.height or message.view != self.view:
            return
        slot = self._slot(message.sequence)
        if isinstance(message, PrePrepare):
            slot.pre_prepare = message
            self.next_sequence = max(self.next_sequence, message.sequence + 1)
            self.proposed.update(t.transaction_id for t in message.batch.transactions)
        elif isinstance(message, Prepare):
            slot.own_prepare = message
            slot.prepares[self.replica_id] = message
        elif isinstance(message, Commit):
            slot.own_commit = message
            slot.commits[self.replica_id] = message

    # ---- events ----

    def tick(self, now_ms: int) -> None:
        """Logical time advances; cut batches, retransmit stalled slots, exchange status."""
        self.now_ms = max(self.now_ms, now_ms)
        if self.is_primary:
            self._propose_batches()
        if self.now_ms - self.last_status_ms >= self.settings.status_interval_ms:
            self.last_status_ms = self.now_ms
            self._on_status_interval()

    def receive_request(self, transaction: Transaction) -> None:
        """A client's signed transaction, straight from the client or forwarded by a backup."""
        transaction_id = transaction.transaction_id
        if transaction_id in self.pending or transaction_id in self.proposed:
            return
        if len(self.pending) >= PENDING_REQUESTS_MAX:
            self._reject("request queue full")
            self.effects.request_errors.append((transaction_id, "replica busy: request queue full"))
            return
        if not self._transaction_signature_valid(transaction):
            self._reject("bad client signature")
            self.effects.request_errors.append((transaction_id, "bad signature"))
            return
        refusal = self.application.check(transaction)
        if refusal is not None:
            self.effects.request_errors.append((transaction_id, refusal))
            return
        self.pending[transaction_id] = transaction
        self.pending_since_ms[transaction_id] = self.now_ms
        if self.is_primary:
            if self._unproposed_count() >= self.settings.batch_size_max:
                self._propose_batches()
        else:
            # PBFT: a backup that hears of a request relays it to the primary, in case the
            # client could not reach it.
            self.effects.send.append(Send(self.primary, Request(transaction)))

    def receive_message(self, sender: int, message: Any) -> None:
        """A message from authenticated peer `sender` (signatures are still checked here)."""
        if isinstance(message, Prepare):
            self._on_prepare(message)
        elif isinstance(message, Commit):
            self._on_commit(message)
        elif isinstance(message, PrePrepare):
            self._on_pre_prepare(message)
        elif isinstance(message, Request):
            self.receive_request(message.transaction)
        elif isinstance(message, Status):
            self._on_status(sender, message)
        elif isinstance(message, FetchBlocks):
            pass  # answered by the host from its store; never reaches the core
        elif isinstance(message, Blocks):
            self._on_blocks(sender, message)
        else:
            self._reject("unexpected message type", type(message).__name__)

    # ---- the primary ----

    def _unproposed_count(self) -> int:
        return len(self.pending)

    def _propose_batches(self) -> None:
        while self.pending and self.next_sequence <= self.height + self.settings.window_size:
            oldest = next(iter(self.pending))
            waited = self.now_ms - self.pending_since_ms[oldest]
            if len(self.pending) < self.settings.batch_size_max and waited < self.settings.batch_wait_ms:
                return
            transactions = []
            while self.pending and len(transactions) < self.settings.batch_size_max:
                transaction_id, transaction = self.pending.popitem(last=False)
                self.pending_since_ms.pop(transaction_id, None)
                self.proposed.add(transaction_id)
                transactions.append(transaction)
            self._propose(Batch(self.view, self.replica_id, self.now_ms, tuple(transactions)))

    def _propose(self, batch: Batch) -> None:
        sequence = self.next_sequence
        self.next_sequence += 1
        unsigned = PrePrepare(self.view, sequence, batch, self.replica_id)
        pre_prepare = PrePrepare(
            self.view, sequence, batch, self.replica_id, self.key.sign(self.domains["pre-prepare"], unsigned.signed_bytes())
        )
        slot = self._slot(sequence)
        slot.pre_prepare = pre_prepare
        slot.last_sent_ms = self.now_ms
        self.effects.persist.append(Persist("pre-prepare", self.view, sequence, pre_prepare))
        self.effects.send.append(Send(None, pre_prepare))
        self._advance(slot)

    # ---- normal-case messages ----

    def _slot(self, sequence: int) -> Slot:
        slot = self.slots.get(sequence)
        if slot is None or slot.view != self.view:
            slot = Slot(sequence, self.view, last_sent_ms=self.now_ms)
            self.slots[sequence] = slot
        return slot

    def _in_window(self, view: int, sequence: int) -> bool:
        if view != self.view:
            self._reject("wrong view")
            return False
        if not self.height < sequence <= self.height + 2 * self.settings.window_size:
            self._reject("outside watermarks")
            return False
        return True

    def _signed_by(self, kind: str, message: Any) -> bool:
        if message.replica_id >= self.replica_count:
            return False
        return self.check_signature(
            self.replica_keys[message.replica_id], self.domains[kind], message.signed_bytes(), message.signature
        )

    def _transaction_signature_valid(self, transaction: Transaction) -> bool:
        transaction_id = transaction.transaction_id
        if transaction_id in self.verified:
            return True
        valid = self.check_signature(
            transaction.sender, self.transaction_domain, transaction.signed_bytes(), transaction.signature
        )
        if valid:
            self.verified[transaction_id] = None
            if len(self.verified) > VERIFIED_CACHE_MAX:
                self.verified.popitem(last=False)
        return valid

    def _on_pre_prepare(self, message: PrePrepare) -> None:
        if not self._in_window(message.view, message.sequence):
            return
        if message.replica_id != self.network.primary(message.view):
            self._reject("pre-prepare not from the primary", f"replica {message.replica_id}")
            return
        slot = self._slot(message.sequence)
        if slot.pre_prepare is not None:
            if slot.pre_prepare.batch.digest != message.batch.digest:
                self._reject("conflicting pre-prepare", f"view {message.view} sequence {message.sequence}")
            return
        if not self._signed_by("pre-prepare", message):
            self._reject("bad pre-prepare signature", f"sequence {message.sequence}")
            return
        problem = self._batch_problem(message)
        if problem is not None:
            self._reject("invalid batch", problem)
            return
        slot.pre_prepare = message
        for transaction in message.batch.transactions:
            self.proposed.add(transaction.transaction_id)
        # Votes that arrived before the pre-prepare with a different digest never count.
        digest = message.batch.digest
        slot.prepares = {r: p for r, p in slot.prepares.items() if p.digest == digest}
        slot.commits = {r: c for r, c in slot.commits.items() if c.digest == digest}
        if slot.own_prepare is None and not self.is_primary:
            self._send_prepare(slot)
        self._advance(slot)

    def _batch_problem(self, message: PrePrepare) -> str | None:
        batch = message.batch
        if batch.view != message.view or batch.proposer != message.replica_id:
            return "batch does not name this view and primary"
        if len(batch.transactions) > self.settings.batch_size_max:
            return f"{len(batch.transactions)} transactions exceed the batch limit"
        seen: set[bytes] = set()
        for transaction in batch.transactions:
            if transaction.transaction_id in seen:
                return "a transaction appears twice"
            seen.add(transaction.transaction_id)
            if not self._transaction_signature_valid(transaction):
                return "a transaction has a bad client signature"
        return None

    def _send_prepare(self, slot: Slot) -> None:
        assert slot.pre_prepare is not None and slot.own_prepare is None
        unsigned = Prepare(slot.view, slot.sequence, slot.pre_prepare.batch.digest, self.replica_id)
        prepare = Prepare(
            unsigned.view,
            unsigned.sequence,
            unsigned.digest,
            self.replica_id,
            self.key.sign(self.domains["prepare"], unsigned.signed_bytes()),
        )
        slot.own_prepare = prepare
        slot.prepares[self.replica_id] = prepare
        slot.last_sent_ms = self.now_ms
        self.effects.persist.append(Persist("prepare", slot.view, slot.sequence, prepare))
        self.effects.send.append(Send(None, prepare))

    def _on_prepare(self, message: Prepare) -> None:
        if not self._in_window(message.view, message.sequence):
            return
        if message.replica_id == self.network.primary(message.view):
            self._reject("prepare from the primary")
            return
        slot = self._slot(message.sequence)
        if message.replica_id in slot.prepares:
            return  # one vote per replica: a duplicate or a conflicting second vote never counts
        if slot.digest is not None and message.digest != slot.digest:
            self._reject("prepare for another digest", f"replica {message.replica_id} sequence {message.sequence}")
            return
        if not self._signed_by("prepare", message):
            self._reject("bad prepare signature", f"replica {message.replica_id}")
            return
        slot.prepares[message.replica_id] = message
        self._advance(slot)

    def _on_commit(self, message: Commit) -> None:
        if not self._in_window(message.view, message.sequence):
            return
        slot = self._slot(message.sequence)
        if message.replica_id in slot.commits:
            return
        if slot.digest is not None and message.digest != slot.digest:
            self._reject("commit for another digest", f"replica {message.replica_id} sequence {message.sequence}")
            return
        if not self._signed_by("commit", message):
            self._reject("bad commit signature", f"replica {message.replica_id}")
            return
        slot.commits[message.replica_id] = message
        self._advance(slot)

    def is_prepared(self, slot: Slot) -> bool:
        """The pre-prepare plus matching prepares from quorum - 1 distinct backups."""
        if slot.pre_prepare is None:
            return False
        digest = slot.pre_prepare.batch.digest
        votes = sum(1 for prepare in slot.prepares.values() if prepare.digest == digest)
        return votes >= self.quorum - 1

    def is_committed(self, slot: Slot) -> bool:
        """Prepared, plus matching commits from a quorum of distinct replicas."""
        if not self.is_prepared(slot):
            return False
        digest = slot.digest
        return sum(1 for commit in slot.commits.values() if commit.digest == digest) >= self.quorum

    def _advance(self, slot: Slot) -> None:
        if slot.own_commit is None and self.is_prepared(slot):
            self._send_commit(slot)
        if not slot.committed and self.is_committed(slot):
            slot.committed = True
            self._execute_ready()

    def _send_commit(self, slot: Slot) -> None:
        assert slot.pre_prepare is not None
        unsigned = Commit(slot.view, slot.sequence, slot.pre_prepare.batch.digest, self.replica_id)
        commit = Commit(
            unsigned.view,
            unsigned.sequence,
            unsigned.digest,
            self.replica_id,
            self.key.sign(self.domains["commit"], unsigned.signed_bytes()),
        )
        slot.own_commit = commit
        slot.commits[self.replica_id] = commit
        slot.last_sent_ms = self.now_ms
        self.effects.persist.append(Persist("commit", slot.view, slot.sequence, commit))
        self.effects.send.append(Send(None, commit))

    # ---- execution ----

    def _execute_ready(self) -> None:
        """Execute committed slots strictly in sequence order, each becoming the next block."""
        while True:
            slot = self.slots.get(self.height + 1)
            if slot is None or not slot.committed or slot.pre_prepare is None:
                return
            digest = slot.pre_prepare.batch.digest
            signatures = tuple(
                sorted((replica_id, commit.signature) for replica_id, commit in slot.commits.items() if commit.digest == digest)
            )
            self._execute_batch(slot.pre_prepare.batch, CommitCertificate(slot.view, signatures))

    def _execute_batch(self, batch: Batch, certificate: CommitCertificate) -> Block:
        height = self.height + 1
        transactions = list(batch.transactions)
        results = self.application.execute_block(transactions)
        header = BlockHeader(
            height=height,
            view=batch.view,
            proposer=batch.proposer,
            parent_hash=self.last_block_hash,
            transactions_root=merkle_root([t.transaction_id for t in transactions]),
            state_digest=self.application.state_digest(),
            timestamp_ms=batch.timestamp_ms,
        )
        block = Block(header, tuple(transactions), tuple(results), certificate)
        self.height = height
        self.last_block_hash = header.block_hash
        self.next_sequence = max(self.next_sequence, height + 1)
        self.slots.pop(height, None)
        self.effects.blocks.append(block)
        for index, transaction in enumerate(transactions):
            transaction_id = transaction.transaction_id
            self.pending.pop(transaction_id, None)
            self.pending_since_ms.pop(transaction_id, None)
            self.proposed.discard(transaction_id)
            self.effects.replies.append(ClientReply(transaction.sender, self.signed_reply(block, index)))
        return block

    def signed_reply(self, block: Block, index: int) -> Reply:
        """This replica's signed REPLY for transaction `index` of a block (new or from the store)."""
        unsigned = Reply(
            self.replica_id, self.view, block.transactions[index].transaction_id, block.results[index], block.height, block.block_hash, index
        )
        return Reply(
            unsigned.replica_id,
            unsigned.view,
            unsigned.transaction_id,
            unsigned.result,
            unsigned.height,
            unsigned.block_hash,
            unsigned.index,
            self.key.sign(self.domains["reply"], unsigned.signed_bytes()),
        )

    # ---- catching up: status exchange and block fetching ----

    def _on_status_interval(self) -> None:
        self.effects.send.append(Send(None, Status(self.replica_id, self.view, self.height)))
        stalled = self.height == self.height_at_last_status
        self.height_at_last_status = self.height
        self._retransmit()
        best = max(self.peer_heights.values(), default=0)
        fetch_due = self.fetch_sent_ms is None or self.now_ms - self.fetch_sent_ms >= 2 * self.settings.status_interval_ms
        far_behind = best > self.height + self.settings.window_size
        if best > self.height and (stalled or far_behind) and fetch_due:
            self._fetch_blocks()

    def _fetch_blocks(self) -> None:
        # Rotate among the peers that claim to be ahead, so one lying or slow peer cannot stall us.
        ahead = [replica for replica, height in sorted(self.peer_heights.items()) if height > self.height]
        if not ahead:
            return
        peer = ahead[self.fetch_peer_cursor % len(ahead)]
        self.fetch_peer_cursor += 1
        self.fetch_sent_ms = self.now_ms
        self.effects.send.append(Send(peer, FetchBlocks(self.height + 1, BLOCKS_PER_RESPONSE_MAX)))

    def _retransmit(self) -> None:
        """Re-send own messages for slots that made no progress: lost messages must not stall us."""
        interval = self.settings.status_interval_ms
        for sequence in sorted(self.slots):
            slot = self.slots[sequence]
            if slot.committed and sequence <= self.height:
                continue
            if self.now_ms - slot.last_sent_ms < interval:
                continue
            slot.last_sent_ms = self.now_ms
            if self.is_primary and slot.pre_prepare is not None:
                self.effects.send.append(Send(None, slot.pre_prepare))
            if slot.own_prepare is not None:
                self.effects.send.append(Send(None, slot.own_prepare))
            if slot.own_commit is not None:
                self.effects.send.append(Send(None, slot.own_commit))

    def _on_status(self, sender: int, message: Status) -> None:
        if message.replica_id != sender:
            self._reject("status for another replica")
            return
        self.peer_heights[sender] = message.height

    def _on_blocks(self, sender: int, message: Blocks) -> None:
        """Apply fetched blocks whose commit certificates verify; trust the sender for nothing.

        Only the certified batch is taken from the peer. Results, state digest and block hash
        are recomputed by executing it, so a peer cannot slip in a wrong state.
        """
        self.fetch_sent_ms = None
        applied = 0
        for block in message.blocks:
            if block.height <= self.height:
                continue
            if block.height != self.height + 1:
                break
            try:
                verify_block_contents(block)
                verify_certificate(
                    block.header, block.certificate, self.network.network_id, self.replica_keys, self.quorum, self.check_signature
                )
            except (ChainError, CodecError) as error:
                self._reject("bad fetched block", f"from replica {sender}: {error}")
                return
            header = block.header
            batch = Batch(header.view, header.proposer, header.timestamp_ms, block.transactions)
            assert block.certificate is not None
            own = self._execute_batch(batch, block.certificate)
            if own.block_hash != block.block_hash:
                self.effects.events.append(
                    f"fetched block {block.height} from replica {sender} claims another state; using our own execution"
                )
            applied += 1
        if applied:
            self.effects.events.append(f"caught up {applied} blocks from replica {sender}, height {self.height}")
            self._prune_slots()
            self._execute_ready()

    def _prune_slots(self) -> None:
        for sequence in [s for s in self.slots if s <= self.height]:
            del self.slots[sequence]

    # ---- reads ----

    def query(self, kind: str, argument: Any) -> Any:
        return self.application.query(kind, argument)
