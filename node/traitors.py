"""Traitor replicas: small, named behaviours that wrap an honest core and rewrite what it sends.

A traitor holds its replica's real SigningKey, so everything it sends is validly signed; only the
protocol rules can defeat it. Behaviours never edit the core: they rewrite, withhold, delay or add
to the core's `Effects.send` list, may ignore what the replica receives, and may lie when serving
blocks. They know nothing about the simulator (a `TraitorContext` is all they see), so the same
code can wrap a real replica process. Each is selected by name with parameters and a start time
(`BehaviourSpec`, written as text `name[:key=value,...][@start_ms]` on a command line), and several
combine on one replica (applied in order). A traitor may also rewrite the REPLYs its replica sends
to clients, and, in a real process, hand the transport raw bytes that are no message at all.
"""

from __future__ import annotations

import inspect
import math
import random
import typing
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ledger.blocks import Block, CommitCertificate, results_root
from ledger.config import NetworkConfig
from ledger.crypto import SigningKey
from ledger.encoding import encode
from ledger.merkle import root_from_proof
from ledger.messages import (
    BATCH_REPLY_DOMAIN,
    Batch,
    BatchContent,
    BatchReply,
    Checkpoint,
    CheckpointCertificate,
    Commit,
    ErrorReply,
    Hello,
    HelloProof,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    PrePrepareHeader,
    Query,
    Reply,
    Request,
    SnapshotChunk,
    StatusQuery,
    Subscribe,
    ViewChange,
    encode_message,
    make_replies,
    reply_leaf,
)
from ledger.state_tree import VALUE as VALUE_NAMESPACE
from ledger.transactions import Transaction, TransactionResult
from node.effects import Send
from node.new_view import NULL_BATCH

# Bounds on what a traitor remembers, whatever runs through it.
HISTORY_MAX = 512
COLLECTED_SLOTS_MAX = 4096
HELD_TRANSACTIONS_MAX = 64
DELAYED_SENDS_MAX = 4096
FLOOD_VIEWS_AHEAD_MAX = 1_000
# What a malformed sender may add per round of sends, and the size of one raw frame it makes.
MALFORMED_PER_ROUND_MAX = 16
RAW_FRAME_SIZE_MAX = 4096

# What `withhold` and `deaf` may name in `kinds`: the messages replicas exchange ("Blocks" also
# stands for answering block fetches).
MESSAGE_KIND_NAMES = (
    "PrePrepare",
    "Prepare",
    "Commit",
    "Checkpoint",
    "ViewChange",
    "NewView",
    "FetchBatch",
    "BatchContent",
    "Status",
    "FetchBlocks",
    "Blocks",
    "Request",
)

# The signing domain of each kind of signed message (the keys of the core's `domains`).
SIGNED_KINDS: dict[type, str] = {
    PrePrepare: "pre-prepare",
    PrePrepareHeader: "pre-prepare",
    Prepare: "prepare",
    Commit: "commit",
    Checkpoint: "checkpoint",
    ViewChange: "view-change",
    BatchReply: BATCH_REPLY_DOMAIN,
}


@dataclass
class TraitorContext:
    """What a behaviour may see: the network, its own identity and key, the time, its own random
    source (injected, so a seed replays exactly) and bounded histories of what passed through."""

    network: NetworkConfig
    replica_id: int
    key: SigningKey
    domains: dict[str, bytes]
    random: random.Random
    now_ms: int = 0
    # Whether the host can send raw bytes (a real process can; the simulator passes objects).
    raw_frames: bool = False
    received: deque[tuple[int, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_MAX))
    sent: deque[Any] = field(default_factory=lambda: deque(maxlen=HISTORY_MAX))

    @property
    def peers(self) -> list[int]:
        return [replica for replica in range(self.network.replica_count) if replica != self.replica_id]

    @property
    def log_size(self) -> int:
        """The core's window above the stable checkpoint (L in the paper)."""
        protocol = self.network.protocol
        return max(protocol.window_size, 2 * protocol.checkpoint_interval)

    def sign(self, message: Any, **changes: Any) -> Any:
        """`message` with `changes` applied, signed again with this replica's real key."""
        message = replace(message, **changes)
        kind = SIGNED_KINDS[type(message)]
        return replace(message, signature=self.key.sign(self.domains[kind], message.signed_bytes()))

    def random_digest(self) -> bytes:
        return self.random.randbytes(32)


def expand(context: TraitorContext, sends: list[Send]) -> list[Send]:
    """Broadcasts as one send per peer, so a behaviour can treat peers differently."""
    result = []
    for send in sends:
        if send.to is None:
            result.extend(Send(peer, send.message) for peer in context.peers)
        else:
            result.append(send)
    return result


def own_pre_prepare(context: TraitorContext, message: Any) -> bool:
    return isinstance(message, PrePrepare) and message.replica_id == context.replica_id


@dataclass(frozen=True)
class RawFrame:
    """Bytes for the transport to send to a peer as one frame's payload, unchecked: no message
    at all, or one no honest encoder makes. Only a host that sets `TraitorContext.raw_frames` gets them."""

    payload: bytes


def rebatched(batch: Batch, **changes: Any) -> Batch:
    values = {"view": batch.view, "proposer": batch.proposer, "timestamp_ms": batch.timestamp_ms, "transactions": batch.transactions}
    values.update(changes)
    return Batch(**values)


@dataclass(frozen=True)
class BehaviourSpec:
    """A behaviour by name, its parameters and when it starts; plain data, so a seed can draw it."""

    name: str
    start_ms: int = 0
    parameters: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        parameters = ",".join(f"{key}={value}" for key, value in self.parameters)
        return f"{self.name}({parameters})@{self.start_ms}ms"


@dataclass(frozen=True)
class TraitorSpec:
    replica_id: int
    behaviours: tuple[BehaviourSpec, ...]

    def describe(self) -> str:
        return f"replica {self.replica_id}: " + " + ".join(behaviour.describe() for behaviour in self.behaviours)


class Behaviour:
    """The do-nothing behaviour; subclasses override what they change."""

    name = "honest"
    # The values a text parameter may take (checked when a spec is parsed).
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, start_ms: int = 0) -> None:
        self.start_ms = start_ms
        self.spec = BehaviourSpec(self.name, start_ms)

    def incoming(self, context: TraitorContext, sender: int, message: Any) -> bool:
        """Whether the core gets this message (False: the traitor ignores it)."""
        return True

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        return sends

    def serve_blocks(self, context: TraitorContext, requester: int, blocks: tuple[Block, ...]) -> tuple[Block, ...]:
        return blocks

    def serve_snapshot(self, context: TraitorContext, requester: int, answer: SnapshotChunk | None) -> SnapshotChunk | None:
        """The answer to a joining replica's FetchSnapshot (None: no answer)."""
        return answer

    def reply(self, context: TraitorContext, reply: Reply) -> Reply | None:
        """The REPLY a client gets (None: it gets nothing)."""
        return reply


class OffByOne(Behaviour):
    """Re-signs its PRE-PREPAREs, PREPAREs and COMMITs with the view or the sequence one off."""

    name = "off_by_one"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"target": ("view", "sequence")}

    def __init__(self, start_ms: int = 0, target: str = "view", delta: int = 1, rate: float = 0.5) -> None:
        super().__init__(start_ms)
        self.target, self.delta, self.rate = target, delta, rate

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        for send in sends:
            message = send.message
            if isinstance(message, PrePrepare | Prepare | Commit) and context.random.random() < self.rate:
                value = getattr(message, self.target) + self.delta
                if value >= (1 if self.target == "sequence" else 0):
                    changes: dict[str, Any] = {self.target: value}
                    if isinstance(message, PrePrepare) and self.target == "view":
                        changes["batch"] = rebatched(message.batch, view=value)
                    message = context.sign(message, **changes)
            result.append(Send(send.to, message))
        return result


class OtherDigest(Behaviour):
    """Votes for, or pre-prepares, a batch digest nobody ever proposed (validly signed)."""

    name = "other_digest"

    def __init__(self, start_ms: int = 0, rate: float = 0.5) -> None:
        super().__init__(start_ms)
        self.rate = rate

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        for send in sends:
            message = send.message
            if context.random.random() < self.rate:
                if isinstance(message, Prepare | Commit):
                    message = context.sign(message, digest=context.random_digest())
                elif own_pre_prepare(context, message):
                    batch = rebatched(message.batch, timestamp_ms=message.batch.timestamp_ms + 1 + context.random.randint(0, 999))
                    message = context.sign(message, batch=batch)
            result.append(Send(send.to, message))
        return result


class ConflictingVotes(Behaviour):
    """Two PREPAREs (or COMMITs) for one slot: the real one to some peers, another digest to the rest
    (the null batch of the view, a digest it saw for another slot, or a random one)."""

    name = "conflicting_votes"

    def __init__(self, start_ms: int = 0, rate: float = 1.0) -> None:
        super().__init__(start_ms)
        self.rate = rate

    def _other_digest(self, context: TraitorContext, vote: Any) -> bytes:
        choice = context.random.random()
        if choice < 0.4:
            return NULL_BATCH.digest
        if choice < 0.7:
            seen = [m.batch.digest for _, m in context.received if isinstance(m, PrePrepare) and m.batch.digest != vote.digest]
            if seen:
                return context.random.choice(seen)
        return context.random_digest()

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        for send in sends:
            message = send.message
            if send.to is None and isinstance(message, Prepare | Commit) and context.random.random() < self.rate:
                twin = context.sign(message, digest=self._other_digest(context, message))
                peers = context.peers
                context.random.shuffle(peers)
                half = max(1, len(peers) // 2)
                result.extend(Send(peer, twin) for peer in peers[:half])
                result.extend(Send(peer, message) for peer in peers[half:])
            else:
                result.append(send)
        return result


class Replay(Behaviour):
    """Now and then re-sends an old message it sent or received to a random peer."""

    name = "replay"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"source": ("sent", "received", "both")}

    def __init__(self, start_ms: int = 0, rate: float = 0.2, source: str = "both") -> None:
        super().__init__(start_ms)
        self.rate, self.source = rate, source

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        if context.random.random() >= self.rate:
            return sends
        pool: list[Any] = []
        if self.source in ("sent", "both"):
            pool.extend(context.sent)
        if self.source in ("received", "both"):
            pool.extend(message for sender, message in context.received if sender >= 0)
        if not pool:
            return sends
        return [*sends, Send(context.random.choice(context.peers), context.random.choice(pool))]


class Withhold(Behaviour):
    """Silent towards some peers (all of them when `peers` is empty), for some kinds or all;
    as a block server it answers those peers nothing."""

    name = "withhold"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"kinds": MESSAGE_KIND_NAMES}

    def __init__(self, start_ms: int = 0, peers: tuple[int, ...] = (), kinds: tuple[str, ...] = ()) -> None:
        super().__init__(start_ms)
        self.peers, self.kinds = set(peers), set(kinds)

    def _withheld(self, peer: int, message: Any) -> bool:
        if self.peers and peer not in self.peers:
            return False
        return not self.kinds or type(message).__name__ in self.kinds

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        return [send for send in expand(context, sends) if not self._withheld(send.to, send.message)]  # type: ignore[arg-type]

    def serve_blocks(self, context: TraitorContext, requester: int, blocks: tuple[Block, ...]) -> tuple[Block, ...]:
        return () if (not self.peers or requester in self.peers) and (not self.kinds or "Blocks" in self.kinds) else blocks


class Deaf(Behaviour):
    """Ignores some of what it receives (a fraction of the messages of the given kinds, or all)."""

    name = "deaf"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"kinds": MESSAGE_KIND_NAMES}

    def __init__(self, start_ms: int = 0, rate: float = 0.5, kinds: tuple[str, ...] = ()) -> None:
        super().__init__(start_ms)
        self.rate, self.kinds = rate, set(kinds)

    def incoming(self, context: TraitorContext, sender: int, message: Any) -> bool:
        if self.kinds and type(message).__name__ not in self.kinds:
            return True
        return context.random.random() >= self.rate


class Delay(Behaviour):
    """Holds a fraction of its sends back for `delay_ms` before letting them go."""

    name = "delay"

    def __init__(self, start_ms: int = 0, rate: float = 0.5, delay_ms: int = 300) -> None:
        super().__init__(start_ms)
        self.rate, self.delay_ms = rate, delay_ms
        self.held: deque[tuple[int, Send]] = deque()

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        while self.held and self.held[0][0] <= context.now_ms:
            result.append(self.held.popleft()[1])
        for send in sends:
            if len(self.held) < DELAYED_SENDS_MAX and context.random.random() < self.rate:
                self.held.append((context.now_ms + self.delay_ms, send))
            else:
                result.append(send)
        return result


class EquivocatingPrimary(Behaviour):
    """As primary, sends every pre-prepare in two versions, one to each half of the backups."""

    name = "equivocating_primary"

    def __init__(self, start_ms: int = 0) -> None:
        super().__init__(start_ms)
        self.twins: dict[tuple[int, int], PrePrepare] = {}

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        for send in sends:
            message = send.message
            if send.to is None and own_pre_prepare(context, message):
                key = (message.view, message.sequence)
                twin = self.twins.get(key)
                if twin is None:
                    batch = message.batch
                    twin_batch = rebatched(batch, timestamp_ms=batch.timestamp_ms + 1, transactions=tuple(reversed(batch.transactions)))
                    twin = context.sign(message, batch=twin_batch)
                    if len(self.twins) >= COLLECTED_SLOTS_MAX:
                        self.twins.clear()
                    self.twins[key] = twin
                peers = context.peers
                half = len(peers) // 2
                result.extend(Send(peer, message) for peer in peers[:half])
                result.extend(Send(peer, twin) for peer in peers[half:])
            else:
                result.append(send)
        return result


class SignedHistory:
    """The signed PRE-PREPAREs (NEW-VIEWs' included), PREPAREs and CHECKPOINTs a traitor saw,
    bounded: what genuine certificates it can assemble from other replicas' signatures."""

    def __init__(self) -> None:
        self.headers: dict[tuple[int, int, bytes], PrePrepareHeader] = {}
        self.prepares: dict[tuple[int, int, bytes], dict[int, bytes]] = {}
        self.checkpoints: dict[tuple[int, bytes, bytes], dict[int, bytes]] = {}

    def _collect_header(self, header: PrePrepareHeader) -> None:
        if len(self.headers) < COLLECTED_SLOTS_MAX:
            self.headers[(header.view, header.sequence, header.digest)] = header

    def collect(self, message: Any) -> None:
        if isinstance(message, PrePrepare):
            self._collect_header(message.header)
        elif isinstance(message, NewView):
            for header in message.pre_prepares:
                self._collect_header(header)
        elif isinstance(message, Prepare):
            key = (message.view, message.sequence, message.digest)
            if key in self.prepares or len(self.prepares) < COLLECTED_SLOTS_MAX:
                self.prepares.setdefault(key, {})[message.replica_id] = message.signature
        elif isinstance(message, Checkpoint):
            key = (message.sequence, message.state_digest, message.block_hash)
            if key in self.checkpoints or len(self.checkpoints) < COLLECTED_SLOTS_MAX:
                self.checkpoints.setdefault(key, {})[message.replica_id] = message.signature

    def checkpoint_certificates(self, quorum: int) -> list[CheckpointCertificate]:
        """Every stable checkpoint it can prove, lowest first."""
        return [
            CheckpointCertificate(
                sequence, state_digest, block_hash, tuple(sorted(signatures.items()))[:quorum]
            )
            for (sequence, state_digest, block_hash), signatures in sorted(self.checkpoints.items())
            if len(signatures) >= quorum
        ]

    def prepared_certificates(
        self, network: NetworkConfig, low: int, high: int, below_view: int
    ) -> dict[int, PreparedCertificate]:
        """For each sequence in (low, high], the highest-view prepared certificate from before
        `below_view` that it holds every signature of."""
        found: dict[int, PreparedCertificate] = {}
        for key, header in sorted(self.headers.items()):
            view, sequence, _ = key
            if view >= below_view or not low < sequence <= high:
                continue
            primary = network.primary(view)
            signers = tuple(
                sorted(
                    (replica, signature)
                    for replica, signature in self.prepares.get(key, {}).items()
                    if replica != primary
                )
            )
            if len(signers) >= network.quorum - 1:
                found[sequence] = PreparedCertificate(header, signers[: network.quorum - 1])
        return found


class ForgedViewChange(Behaviour):
    """Rewrites its VIEW-CHANGEs with prepared certificates of its own making, assembled from the
    honest replicas' signed PREPAREs it collected (null batches of a NEW-VIEW included):
    `collected` puts the highest-view certificate it can build at every sequence, `stale` the
    lowest-view one, `fabricated` one PREPARE short (or a prepare signed for another digest).
    With `hoard`, it keeps its own votes for null batches to itself (so the honest replicas may
    never reach the certificate it builds with them), never hands out a batch it certified (as
    batch content or, when it is primary, in a pre-prepare), and
    serves no blocks (which would let the others skip the slot by state transfer)."""

    name = "forged_view_change"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"mode": ("collected", "stale", "fabricated")}

    def __init__(self, start_ms: int = 0, mode: str = "collected", hoard: bool = True) -> None:
        super().__init__(start_ms)
        self.mode, self.hoard = mode, hoard
        self.certified: set[bytes] = set()
        self.history = SignedHistory()
        self.headers, self.prepares = self.history.headers, self.history.prepares

    def _collect(self, message: Any) -> None:
        self.history.collect(message)

    def incoming(self, context: TraitorContext, sender: int, message: Any) -> bool:
        self._collect(message)
        return True

    def _certificates(self, context: TraitorContext, view_change: ViewChange) -> dict[int, list[PreparedCertificate]]:
        needed = context.network.quorum - 1
        low = view_change.checkpoint_sequence
        found: dict[int, list[PreparedCertificate]] = {}
        for key, header in self.headers.items():
            view, sequence, _ = key
            if view >= view_change.new_view or not low < sequence <= low + context.log_size:
                continue
            primary = context.network.primary(view)
            signers = sorted((replica, signature) for replica, signature in self.prepares.get(key, {}).items() if replica != primary)
            if self.mode == "fabricated":
                signers = signers[: needed - 1] if len(signers) >= needed else signers
                if len(signers) < needed and signers:
                    signers.append(signers[0])  # a repeated signer
            elif len(signers) < needed:
                continue
            found.setdefault(sequence, []).append(PreparedCertificate(header, tuple(signers[: max(needed, len(signers))])))
        return found

    def _hoarded(self, context: TraitorContext, message: Any) -> bool:
        if not self.hoard:
            return False
        if isinstance(message, Prepare | Commit) and message.replica_id == context.replica_id:
            return message.digest == NULL_BATCH.digest
        return isinstance(message, BatchContent | PrePrepare) and message.batch.digest in self.certified

    def serve_blocks(self, context: TraitorContext, requester: int, blocks: tuple[Block, ...]) -> tuple[Block, ...]:
        return () if self.hoard else blocks

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        for send in sends:
            message = send.message
            self._collect(message)
            if self._hoarded(context, message):
                continue
            if isinstance(message, ViewChange) and message.replica_id == context.replica_id:
                chosen = {certificate.sequence: certificate for certificate in message.prepared}
                for sequence, candidates in self._certificates(context, message).items():
                    if self.mode == "stale":
                        chosen[sequence] = min(candidates, key=lambda certificate: certificate.view)
                    else:
                        chosen[sequence] = max(candidates, key=lambda certificate: certificate.view)
                prepared = tuple(chosen[sequence] for sequence in sorted(chosen))
                if len(self.certified) < COLLECTED_SLOTS_MAX:
                    self.certified.update(certificate.digest for certificate in prepared)
                if prepared != message.prepared:
                    message = context.sign(message, prepared=prepared)
            result.append(Send(send.to, message))
        return result


class ViewChangeFlood(Behaviour):
    """Re-signs its VIEW-CHANGE over and over with an ever higher new view, so every replica
    checks every certificate inside again each time."""

    name = "view_change_flood"

    def __init__(self, start_ms: int = 0, burst: int = 2, rate: float = 0.5) -> None:
        super().__init__(start_ms)
        self.burst, self.rate = burst, rate
        self.template: ViewChange | None = None
        self.next_view = 1
        self.first_view = 1

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        for send in sends:
            message = send.message
            if isinstance(message, ViewChange) and message.replica_id == context.replica_id:
                if self.template is None or len(message.prepared) >= len(self.template.prepared):
                    self.template = message
                if message.new_view >= self.next_view:
                    self.next_view = self.first_view = message.new_view + 1
        if context.random.random() >= self.rate:
            return sends
        template = self.template or ViewChange(1, None, (), context.replica_id)
        extra = []
        for _ in range(self.burst):
            if self.next_view - self.first_view >= FLOOD_VIEWS_AHEAD_MAX:
                break
            extra.append(Send(None, context.sign(template, new_view=self.next_view)))
            self.next_view += 1
        return [*sends, *extra]


class OldWindowFlood(Behaviour):
    """VIEW-CHANGEs for ever higher views, each carrying another OLD window of genuine evidence
    it collected (a stable checkpoint's certificate and the prepared certificates above it), one
    window after the other. Each costs it one signature; a replica that checked every certificate
    of every VIEW-CHANGE on arrival checked hundreds of signatures for each, once the windows
    cycled through outgrew its memo of checked signatures (found by an adversarial review)."""

    name = "old_window_flood"

    def __init__(self, start_ms: int = 0, burst: int = 2, rate: float = 0.5) -> None:
        super().__init__(start_ms)
        self.burst, self.rate = burst, rate
        self.history = SignedHistory()
        self.next_view = self.first_view = 1
        self.window = 0  # which window the next VIEW-CHANGE carries

    def incoming(self, context: TraitorContext, sender: int, message: Any) -> bool:
        self.history.collect(message)
        return True

    def _window(self, context: TraitorContext, new_view: int) -> ViewChange:
        checkpoints: list[CheckpointCertificate | None] = [
            None,
            *self.history.checkpoint_certificates(context.network.quorum),
        ]
        checkpoint = checkpoints[self.window % len(checkpoints)]
        self.window += 1
        low = checkpoint.sequence if checkpoint is not None else 0
        certificates = self.history.prepared_certificates(
            context.network, low, low + context.log_size, new_view
        )
        prepared = tuple(certificates[sequence] for sequence in sorted(certificates))
        return context.sign(ViewChange(new_view, checkpoint, prepared, context.replica_id))

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        for send in sends:
            message = send.message
            self.history.collect(message)
            if (
                isinstance(message, ViewChange)
                and message.replica_id == context.replica_id
                and message.new_view >= self.next_view
            ):
                self.next_view = self.first_view = message.new_view + 1
        if context.random.random() >= self.rate:
            return sends
        extra = []
        for _ in range(self.burst):
            if self.next_view - self.first_view >= FLOOD_VIEWS_AHEAD_MAX:
                break
            extra.append(Send(None, self._window(context, self.next_view)))
            self.next_view += 1
        return [*sends, *extra]


class WithdrawnViewChange(Behaviour):
    """After each VIEW-CHANGE of its own for view v, sends another for v + 1 that is well formed
    but carries a prepared certificate whose pre-prepare is forged, so its receivers refuse it and
    forget the one for v. Aimed at the NEW-VIEW timer: a replica whose quorum for v was complete
    only with this traitor's VIEW-CHANGE once timed out alone into v + 1 (found by a review)."""

    name = "withdrawn_view_change"

    def __init__(self, start_ms: int = 0, rate: float = 1.0) -> None:
        super().__init__(start_ms)
        self.rate = rate

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        for send in sends:
            result.append(send)
            message = send.message
            if isinstance(message, ViewChange) and message.replica_id == context.replica_id and context.random.random() < self.rate:
                sequence = message.checkpoint_sequence + 1
                view = message.new_view
                header = PrePrepareHeader(view, sequence, context.random_digest(), context.network.primary(view), bytes(64))
                forged = PreparedCertificate(header, ())
                result.append(Send(send.to, context.sign(message, new_view=view + 1, prepared=(forged,))))
        return result


class NonceReorder(Behaviour):
    """As primary, puts a client's later nonce ahead of its earlier one in a batch (so honest
    replicas sign 'bad nonce' for it), then slips that same transaction into a later batch."""

    name = "nonce_reorder"

    def __init__(self, start_ms: int = 0, repeats: int = 2) -> None:
        super().__init__(start_ms)
        self.repeats = repeats
        self.rewritten: dict[tuple[int, int], PrePrepare] = {}
        self.held: dict[bytes, list[Any]] = {}  # transaction id -> [transaction, re-proposals left]

    def _reorder(self, context: TraitorContext, message: PrePrepare) -> PrePrepare:
        batch = message.batch
        transactions = sorted(batch.transactions, key=lambda transaction: -transaction.nonce)
        lowest: dict[bytes, int] = {}
        for transaction in batch.transactions:
            lowest[transaction.sender] = min(lowest.get(transaction.sender, transaction.nonce), transaction.nonce)
        for transaction in transactions:
            if transaction.nonce > lowest[transaction.sender] and len(self.held) < HELD_TRANSACTIONS_MAX:
                self.held.setdefault(transaction.transaction_id, [transaction, self.repeats])
        present = {transaction.transaction_id for transaction in transactions}
        room = context.network.protocol.batch_size_max - len(transactions)
        for transaction_id, entry in list(self.held.items()):
            if room <= 0:
                break
            if transaction_id in present:
                continue
            transactions.append(entry[0])
            room -= 1
            entry[1] -= 1
            if entry[1] <= 0:
                del self.held[transaction_id]
        if tuple(transactions) == batch.transactions:
            return message
        return context.sign(message, batch=rebatched(batch, transactions=tuple(transactions)))

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        for send in sends:
            message = send.message
            if own_pre_prepare(context, message):
                key = (message.view, message.sequence)
                if key not in self.rewritten:
                    if len(self.rewritten) >= COLLECTED_SLOTS_MAX:
                        self.rewritten.clear()
                    self.rewritten[key] = self._reorder(context, message)
                message = self.rewritten[key]
            result.append(Send(send.to, message))
        return result


class ExtremeTimestamps(Behaviour):
    """As primary, stamps its batches 0, 2**63 - 1, or far in the past or future (re-signed)."""

    name = "extreme_timestamps"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"choice": ("any", "zero", "maximum", "past", "future")}

    def __init__(self, start_ms: int = 0, choice: str = "any") -> None:
        super().__init__(start_ms)
        self.choice = choice
        self.rewritten: dict[tuple[int, int], PrePrepare] = {}

    def _timestamp(self, context: TraitorContext) -> int:
        options = {
            "zero": 0,
            "maximum": 2**63 - 1,
            "past": max(0, context.now_ms - 10**12),
            "future": context.now_ms + 10**12,
        }
        return options[self.choice] if self.choice in options else context.random.choice(list(options.values()))

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        for send in sends:
            message = send.message
            if own_pre_prepare(context, message) and message.batch.transactions:
                key = (message.view, message.sequence)
                if key not in self.rewritten:
                    if len(self.rewritten) >= COLLECTED_SLOTS_MAX:
                        self.rewritten.clear()
                    batch = rebatched(message.batch, timestamp_ms=self._timestamp(context))
                    self.rewritten[key] = context.sign(message, batch=batch)
                message = self.rewritten[key]
            result.append(Send(send.to, message))
        return result


class LyingBlockServer(Behaviour):
    """Answers block fetches with altered blocks: results (with a matching results root and state
    digest, so only re-execution can tell), a transaction, the certificate, or the parent link;
    or (mode `gap`, never drawn by `any`) leaves out the first block, so its answer looks like a
    replica that pruned the blocks asked for."""

    name = "lying_block_server"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"mode": ("any", "results", "transactions", "certificate", "link", "gap")}

    def __init__(self, start_ms: int = 0, mode: str = "any") -> None:
        super().__init__(start_ms)
        self.mode = mode

    def _lie(self, context: TraitorContext, block: Block) -> Block:
        mode = self.mode if self.mode != "any" else context.random.choice(["results", "transactions", "certificate", "link"])
        header = block.header
        if mode == "results" and block.results:
            index = context.random.randrange(len(block.results))
            flipped = TransactionResult(not block.results[index].ok, "" if not block.results[index].ok else "lie")
            results = block.results[:index] + (flipped,) + block.results[index + 1 :]
            header = replace(header, results_root=results_root(results), state_digest=context.random_digest())
            return Block(header, block.transactions, results, block.certificate)
        if mode == "transactions" and block.transactions:
            return Block(header, block.transactions[1:], block.results[1:], block.certificate)
        if mode == "certificate" and block.certificate is not None:
            signatures = block.certificate.signatures
            kept = signatures[: len(signatures) - 1] + tuple((replica, context.random_digest() * 2) for replica, _ in signatures[-1:])
            return Block(header, block.transactions, block.results, CommitCertificate(block.certificate.view, kept))
        return Block(replace(header, parent_hash=context.random_digest()), block.transactions, block.results, block.certificate)

    def serve_blocks(self, context: TraitorContext, requester: int, blocks: tuple[Block, ...]) -> tuple[Block, ...]:
        if not blocks:
            return blocks
        if self.mode == "gap":
            return blocks[1:]
        index = context.random.randrange(len(blocks))
        return blocks[:index] + (self._lie(context, blocks[index]),) + blocks[index + 1 :]


class LyingSnapshotServer(Behaviour):
    """Answers a joining replica's snapshot fetches with lies: an entry's value changed, an entry
    left out, a proof hash changed (each caught by checking the chunk against the certified root),
    a made-up newer checkpoint with no chunk (its signatures are not a quorum's), or no answer."""

    name = "lying_snapshot_server"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"mode": ("any", "entry", "omit", "proof", "checkpoint", "silent")}

    def __init__(self, start_ms: int = 0, mode: str = "any") -> None:
        super().__init__(start_ms)
        self.mode = mode

    def serve_snapshot(self, context: TraitorContext, requester: int, answer: SnapshotChunk | None) -> SnapshotChunk | None:
        if answer is None:
            return None
        mode = self.mode if self.mode != "any" else context.random.choice(["entry", "omit", "proof", "checkpoint", "silent"])
        chunk = answer.chunk
        if mode == "silent":
            return None
        if mode == "checkpoint" or chunk is None:
            made_up = replace(
                answer.checkpoint,
                sequence=answer.checkpoint.sequence + 1000 * context.network.protocol.checkpoint_interval,
                state_digest=context.random_digest(),
                block_hash=context.random_digest(),
            )
            return SnapshotChunk(made_up, None)
        if mode == "proof" and chunk.proof:
            index = context.random.randrange(len(chunk.proof))
            proof = chunk.proof[:index] + (context.random_digest(),) + chunk.proof[index + 1 :]
            return SnapshotChunk(answer.checkpoint, replace(chunk, proof=proof))
        if not chunk.entries:
            return SnapshotChunk(answer.checkpoint, replace(chunk, entries=((VALUE_NAMESPACE, "made-up", "lie"),)))
        index = context.random.randrange(len(chunk.entries))
        if mode == "omit":
            return SnapshotChunk(answer.checkpoint, replace(chunk, entries=chunk.entries[:index] + chunk.entries[index + 1 :]))
        namespace, key, value = chunk.entries[index]
        changed = (value[0] + 1, value[1]) if isinstance(value, tuple) else value + "!"
        entries = chunk.entries[:index] + ((namespace, key, changed),) + chunk.entries[index + 1 :]
        return SnapshotChunk(answer.checkpoint, replace(chunk, entries=entries))


class WrongReplies(Behaviour):
    """Tells clients lies in REPLYs: the result turned around, the height or the index moved, or
    a block hash made up, each in a validly signed batch reply whose path leads to its (wrong)
    root, so only the f + 1 rule can defeat it; or (mode `path`) a lie under the honest signed
    root, whose path then leads nowhere. A client must never accept one: f + 1 must match."""

    name = "wrong_replies"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"mode": ("any", "result", "height", "index", "block", "path")}

    def __init__(self, start_ms: int = 0, mode: str = "any", rate: float = 1.0) -> None:
        super().__init__(start_ms)
        self.mode, self.rate = mode, rate
        self.lies = 0

    def reply(self, context: TraitorContext, reply: Reply) -> Reply | None:
        if context.random.random() >= self.rate:
            return reply
        mode = self.mode if self.mode != "any" else context.random.choice(["result", "height", "index", "block", "path"])
        self.lies += 1
        if mode == "height":
            return replace(reply, batch=context.sign(reply.batch, height=reply.height + context.random.randint(1, 3)))
        if mode == "block":
            return replace(reply, batch=context.sign(reply.batch, block_hash=context.random_digest()))
        ok = reply.result.ok
        lie = (
            replace(reply, index=reply.index + 1)
            if mode == "index"
            else replace(reply, result=TransactionResult(not ok, "refused" if ok else ""))
        )
        if mode == "path":
            return lie  # the honest signature, over a root the altered leaf does not lead to
        root = root_from_proof(reply_leaf(lie.transaction_id, lie.result, lie.index), lie.position, lie.batch.leaf_count, list(lie.path))
        assert root is not None  # the honest path has the right length for its position
        return replace(lie, batch=context.sign(lie.batch, replies_root=root))


class CensoringPrimary(Behaviour):
    """Never lets one client's requests reach its core (from the client or relayed by a backup),
    so as primary it never orders them and as backup it neither relays nor times out for them.
    `account` is the client's public key in hex, or `any_one`: the first account it sees."""

    name = "censoring_primary"

    def __init__(self, start_ms: int = 0, account: str = "any_one") -> None:
        super().__init__(start_ms)
        self.account: bytes | None = None
        if account != "any_one":
            try:
                self.account = bytes.fromhex(account)
            except ValueError:
                raise ValueError(f"account: expected 64 hex digits or any_one, got {account!r}") from None
            if len(self.account) != 32:
                raise ValueError(f"account: expected 64 hex digits (a public key), got {len(account)}")
        self.censored = 0

    def incoming(self, context: TraitorContext, sender: int, message: Any) -> bool:
        if not isinstance(message, Request):
            return True
        account = message.transaction.sender
        if self.account is None:
            self.account = account
        if account != self.account:
            return True
        self.censored += 1
        return False


class SlowPrimary(Behaviour):
    """As primary, holds each pre-prepare it sends for `fraction` of the tightest timer it must
    beat: the backups' ordering timer (node/ordering_monitor.py), or the view-change timeout when
    that watch is off. Below 1, slow enough to drag every batch out, not enough to be replaced."""

    name = "slow_primary"

    def __init__(self, start_ms: int = 0, fraction: float = 0.9) -> None:
        super().__init__(start_ms)
        if not 0.0 <= fraction <= 10.0:
            raise ValueError(f"fraction: expected a number from 0 to 10, got {fraction}")
        self.fraction = fraction
        self.held: deque[tuple[int, Send]] = deque()
        self.delayed = 0

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        result = []
        while self.held and self.held[0][0] <= context.now_ms:
            result.append(self.held.popleft()[1])
        protocol = context.network.protocol
        hold_ms = int(self.fraction * (protocol.ordering_timeout_ms or protocol.view_change_timeout_ms))
        for send in sends:
            if own_pre_prepare(context, send.message) and len(self.held) < DELAYED_SENDS_MAX:
                self.held.append((context.now_ms + hold_ms, send))
                self.delayed += 1
            else:
                result.append(send)
        return result


class MalformedSender(Behaviour):
    """Now and then adds messages no honest replica sends: signatures that do not verify (random
    bytes, another kind's signing domain, another replica's id, content changed after signing),
    kinds replicas never exchange (client REPLYs, queries, handshakes, errors), and, where the host
    can send raw bytes, frames that are no message (garbage, unknown tags, wrong field counts and
    types, numbers out of range, nesting too deep, truncated encodings)."""

    name = "malformed_sender"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"kinds": ("signature", "type", "raw")}

    def __init__(self, start_ms: int = 0, rate: float = 0.3, burst: int = 1, kinds: tuple[str, ...] = ()) -> None:
        super().__init__(start_ms)
        if not 1 <= burst <= MALFORMED_PER_ROUND_MAX:
            raise ValueError(f"burst: expected 1 to {MALFORMED_PER_ROUND_MAX}, got {burst}")
        self.rate, self.burst = rate, burst
        self.kinds = tuple(kinds) or self.choices["kinds"]
        self.sent_malformed = 0

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        kinds = [kind for kind in self.kinds if kind != "raw" or context.raw_frames]
        if not kinds or context.random.random() >= self.rate:
            return sends
        extra = []
        for _ in range(self.burst):
            kind = context.random.choice(kinds)
            if kind == "signature":
                message: Any = self._bad_signature(context, sends)
            elif kind == "type":
                message = self._wrong_type(context)
            else:
                message = RawFrame(self._raw_payload(context, sends))
            extra.append(Send(context.random.choice(context.peers), message))
        self.sent_malformed += len(extra)
        return [*sends, *extra]

    def _bad_signature(self, context: TraitorContext, sends: list[Send]) -> Any:
        # Only this round's messages: each malformed copy is new, as a fresh attack would be.
        own = [
            send.message
            for send in sends
            if isinstance(send.message, Prepare | Commit | Checkpoint | PrePrepare | ViewChange)
            and send.message.replica_id == context.replica_id
        ]
        if own:
            message = context.random.choice(own)
        else:
            message = context.sign(Prepare(0, 1, context.random_digest(), context.replica_id))
        variant = context.random.choice(["random", "domain", "impostor", "altered"])
        if variant == "random":
            return replace(message, signature=context.random.randbytes(64))
        if variant == "domain":
            kind = SIGNED_KINDS[type(message)]
            other = context.random.choice([name for name in sorted(set(SIGNED_KINDS.values())) if name != kind])
            return replace(message, signature=context.key.sign(context.domains[other], message.signed_bytes()))
        if variant == "impostor":
            return context.sign(message, replica_id=context.random.choice(context.peers))
        if isinstance(message, ViewChange):
            return replace(message, new_view=message.new_view + 1)
        return replace(message, sequence=message.sequence + 1)

    def _wrong_type(self, context: TraitorContext) -> Any:
        network = context.network
        choice = context.random.randrange(6)
        if choice == 0:
            domain = context.domains[BATCH_REPLY_DOMAIN]
            entries = [(context.random_digest(), TransactionResult(True), 0)]
            [reply] = make_replies(context.replica_id, 0, 1, context.random_digest(), entries, lambda data: context.key.sign(domain, data))
            return reply
        if choice == 1:
            return ErrorReply(context.random_digest(), "not a message for a replica")
        if choice == 2:
            return StatusQuery(context.random.randrange(2**32))
        if choice == 3:
            return Subscribe((context.random_digest(),))
        if choice == 4:
            return Query(context.random.randrange(2**32), "balance", context.random_digest(), 0, context.random.randbytes(16))
        if context.random.random() < 0.5:
            return HelloProof(context.random.randbytes(64))
        return Hello(network.network_id, context.replica_id, context.random.randbytes(32), network.genesis_hash, network.protocol_values)

    def _raw_payload(self, context: TraitorContext, sends: list[Send]) -> bytes:
        choice = context.random.randrange(8)
        if choice == 0:
            payload = context.random.randbytes(context.random.randint(0, 256))
        elif choice == 1:
            payload = encode(["no-such-message", 1, b"\x00"])
        elif choice == 2:
            payload = encode(["prepare", 1])  # too few fields
        elif choice == 3:
            payload = encode(["prepare", "view", -1, b"short", "me", 7])  # wrong types
        elif choice == 4:
            payload = encode(["commit", 2**63, 2**64 - 1, bytes(32), 2**40, bytes(64)])  # out of range
        elif choice == 5:
            payload = b"\x81" * 200 + b"\x00"  # arrays nested far too deep
        elif choice == 6:
            payload = encode({"tag": "prepare"})  # not an array at all
        else:
            whole = encode_message(sends[0].message) if sends and not isinstance(sends[0].message, RawFrame) else encode(["status", 0, 0, 0])
            payload = whole[: max(1, len(whole) // 2)]  # cut short
        return payload[:RAW_FRAME_SIZE_MAX]


class Twins(Behaviour):
    """Two instances of this replica's key, each honest on its own side of a partition: the host
    runs the second instance and gives it the peers in `side` (Twins, Bano et al.). Nothing to
    rewrite here; the host reads `side`."""

    name = "twins"

    def __init__(self, start_ms: int = 0, side: tuple[int, ...] = ()) -> None:
        super().__init__(start_ms)
        self.side = tuple(side)


BEHAVIOURS: dict[str, Callable[..., Behaviour]] = {
    behaviour.name: behaviour
    for behaviour in (
        OffByOne,
        OtherDigest,
        ConflictingVotes,
        Replay,
        Withhold,
        Deaf,
        Delay,
        EquivocatingPrimary,
        ForgedViewChange,
        ViewChangeFlood,
        OldWindowFlood,
        WithdrawnViewChange,
        NonceReorder,
        ExtremeTimestamps,
        LyingBlockServer,
        LyingSnapshotServer,
        WrongReplies,
        CensoringPrimary,
        SlowPrimary,
        MalformedSender,
        Twins,
    )
}


def make_behaviour(spec: BehaviourSpec) -> Behaviour:
    if spec.name not in BEHAVIOURS:
        raise ValueError(f"unknown traitor behaviour {spec.name!r}; known: {', '.join(sorted(BEHAVIOURS))}")
    behaviour = BEHAVIOURS[spec.name](spec.start_ms, **dict(spec.parameters))
    behaviour.spec = spec
    return behaviour


# ---- behaviours as text: name[:key=value,key=value][@start_ms] ----


class TraitorSpecError(ValueError):
    """A behaviour written as text does not parse; the message says what is wrong and what is known."""


def behaviour_parameters(name: str) -> dict[str, tuple[Any, Any]]:
    """Each parameter of a behaviour with its type and default, from its constructor."""
    factory = BEHAVIOURS[name]
    hints = typing.get_type_hints(factory.__init__)  # type: ignore[misc]
    signature = inspect.signature(factory.__init__)  # type: ignore[misc]
    return {
        parameter: (hints[parameter], value.default)
        for parameter, value in signature.parameters.items()
        if parameter not in ("self", "start_ms")
    }


def _parse_value(kind: Any, text: str, where: str) -> Any:
    if typing.get_origin(kind) is tuple:
        item_kind = typing.get_args(kind)[0]
        return tuple(_parse_value(item_kind, item, where) for item in text.split("+")) if text else ()
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise TraitorSpecError(f"{where}: expected true or false, got {text!r}")
        return text.lower() == "true"
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise TraitorSpecError(f"{where}: expected a whole number, got {text!r}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise TraitorSpecError(f"{where}: expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise TraitorSpecError(f"{where}: expected a finite number, got {text!r}")
        return value
    if not text:
        raise TraitorSpecError(f"{where}: expected a value")
    return text


def parse_behaviour_spec(text: str) -> BehaviourSpec:
    """`name[:key=value,key=value][@start_ms]`, e.g. `withhold:peers=1+2,kinds=Commit@5000`:
    values are typed by the behaviour's parameters (lists joined with '+', booleans true/false),
    the start is milliseconds from the replica's start. Raises TraitorSpecError naming the problem."""
    spec_text = text.strip()
    start_ms = 0
    if "@" in spec_text:
        spec_text, start_text = spec_text.rsplit("@", 1)
        try:
            start_ms = int(start_text.removesuffix("ms"))
        except ValueError:
            raise TraitorSpecError(f"traitor {text!r}: the start after '@' must be whole milliseconds, got {start_text!r}") from None
        if start_ms < 0:
            raise TraitorSpecError(f"traitor {text!r}: the start after '@' must not be negative")
    name, _, parameters_text = spec_text.partition(":")
    name = name.strip()
    if name not in BEHAVIOURS:
        raise TraitorSpecError(f"traitor {text!r}: unknown behaviour {name!r}; known: {', '.join(sorted(BEHAVIOURS))}")
    known = behaviour_parameters(name)
    parameters: dict[str, Any] = {}
    for item in parameters_text.split(",") if parameters_text.strip() else ():
        key, equals, value_text = item.partition("=")
        key = key.strip()
        if not equals:
            raise TraitorSpecError(f"traitor {text!r}: expected key=value, got {item!r}")
        if key not in known:
            listed = ", ".join(known) if known else "none"
            raise TraitorSpecError(f"traitor {text!r}: {name} has no parameter {key!r}; its parameters: {listed}")
        if key in parameters:
            raise TraitorSpecError(f"traitor {text!r}: parameter {key!r} given twice")
        where = f"traitor {text!r}: {key}"
        value = _parse_value(known[key][0], value_text.strip(), where)
        if key == "rate" and not 0.0 <= value <= 1.0:
            raise TraitorSpecError(f"{where}: a rate is from 0 to 1, got {value}")
        allowed = BEHAVIOURS[name].choices.get(key)  # type: ignore[attr-defined]
        if allowed is not None:
            for choice in value if isinstance(value, tuple) else (value,):
                if choice not in allowed:
                    raise TraitorSpecError(f"{where}: {choice!r} is not one of {', '.join(allowed)}")
        parameters[key] = value
    spec = BehaviourSpec(name, start_ms, tuple(parameters.items()))
    try:
        make_behaviour(spec)
    except ValueError as error:
        raise TraitorSpecError(f"traitor {text!r}: {error}") from None
    return spec


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(_format_value(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_behaviour_spec(spec: BehaviourSpec) -> str:
    """The text parse_behaviour_spec reads back as `spec`."""
    text = spec.name
    if spec.parameters:
        text += ":" + ",".join(f"{key}={_format_value(value)}" for key, value in spec.parameters)
    if spec.start_ms:
        text += f"@{spec.start_ms}"
    return text


class Traitor:
    """A replica's behaviours around its honest core: what it receives, sends and serves."""

    def __init__(self, context: TraitorContext, behaviours: list[Behaviour]) -> None:
        self.context = context
        self.behaviours = behaviours
        self.blocks_served = 0

    def _active(self, now_ms: int) -> list[Behaviour]:
        self.context.now_ms = max(self.context.now_ms, now_ms)
        return [behaviour for behaviour in self.behaviours if self.context.now_ms >= behaviour.start_ms]

    def receive(self, sender: int, message: Any, now_ms: int) -> bool:
        """Whether the core gets `message` (from replica `sender`, or -1 for a client)."""
        self.context.received.append((sender, message))
        delivered = True
        for behaviour in self._active(now_ms):
            delivered = behaviour.incoming(self.context, sender, message) and delivered
        return delivered

    def receive_request(self, transaction: Transaction, now_ms: int) -> bool:
        return self.receive(-1, Request(transaction), now_ms)

    def send(self, sends: list[Send], now_ms: int) -> list[Send]:
        """What the replica sends instead of `sends`; raw frames only where the host can send them."""
        for behaviour in self._active(now_ms):
            sends = behaviour.outgoing(self.context, sends)
        result = []
        for send in sends:
            if isinstance(send.message, RawFrame):
                if not self.context.raw_frames or send.to is None:
                    continue
                send = Send(send.to, RawFrame(send.message.payload[:RAW_FRAME_SIZE_MAX]))
            else:
                self.context.sent.append(send.message)
            result.append(send)
        return result

    def reply(self, reply: Reply, now_ms: int) -> Reply | None:
        """The REPLY a client gets instead of `reply` (None: it gets nothing)."""
        for behaviour in self._active(now_ms):
            changed = behaviour.reply(self.context, reply)
            if changed is None:
                return None
            reply = changed
        return reply

    def serve_blocks(self, requester: int, blocks: tuple[Block, ...], now_ms: int) -> tuple[Block, ...]:
        for behaviour in self._active(now_ms):
            blocks = behaviour.serve_blocks(self.context, requester, blocks)
        self.blocks_served += len(blocks)
        return blocks

    def serve_snapshot(self, requester: int, answer: SnapshotChunk | None, now_ms: int) -> SnapshotChunk | None:
        for behaviour in self._active(now_ms):
            answer = behaviour.serve_snapshot(self.context, requester, answer)
        return answer

    def describe(self) -> str:
        return ", ".join(format_behaviour_spec(behaviour.spec) for behaviour in self.behaviours)

    @property
    def twin_side(self) -> tuple[int, ...] | None:
        for behaviour in self.behaviours:
            if isinstance(behaviour, Twins):
                return behaviour.side
        return None


def make_traitor(spec: TraitorSpec, network: NetworkConfig, key: SigningKey, domains: dict[str, bytes], seed: int) -> Traitor:
    context = TraitorContext(network, spec.replica_id, key, domains, random.Random(f"traitor/{seed}/{spec.replica_id}"))
    return Traitor(context, [make_behaviour(behaviour) for behaviour in spec.behaviours])

