"""Traitor replicas: small, named behaviours that wrap an honest core and rewrite what it sends.

A traitor holds its replica's real SigningKey, so everything it sends is validly signed; only the
protocol rules can defeat it. Behaviours never edit the core: they rewrite, withhold, delay or add
to the core's `Effects.send` list, may ignore what the replica receives, and may lie when serving
blocks. They know nothing about the simulator (a `TraitorContext` is all they see), so the same
code can wrap a real replica process. Each is selected by name with parameters and a start time
(`BehaviourSpec`), and several combine on one replica (applied in order).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ledger.blocks import Block, CommitCertificate, results_root
from ledger.config import NetworkConfig
from ledger.crypto import SigningKey
from ledger.messages import (
    Batch,
    BatchContent,
    Checkpoint,
    Commit,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    PrePrepareHeader,
    Reply,
    Request,
    ViewChange,
)
from ledger.transactions import Transaction, TransactionResult
from node.core import Send
from node.new_view import NULL_BATCH

# Bounds on what a traitor remembers, whatever runs through it.
HISTORY_MAX = 512
COLLECTED_SLOTS_MAX = 4096
HELD_TRANSACTIONS_MAX = 64
DELAYED_SENDS_MAX = 4096
FLOOD_VIEWS_AHEAD_MAX = 1_000

# The signing domain of each kind of signed message (the keys of the core's `domains`).
SIGNED_KINDS: dict[type, str] = {
    PrePrepare: "pre-prepare",
    PrePrepareHeader: "pre-prepare",
    Prepare: "prepare",
    Commit: "commit",
    Checkpoint: "checkpoint",
    ViewChange: "view-change",
    Reply: "reply",
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

    def __init__(self, start_ms: int = 0) -> None:
        self.start_ms = start_ms

    def incoming(self, context: TraitorContext, sender: int, message: Any) -> bool:
        """Whether the core gets this message (False: the traitor ignores it)."""
        return True

    def outgoing(self, context: TraitorContext, sends: list[Send]) -> list[Send]:
        return sends

    def serve_blocks(self, context: TraitorContext, requester: int, blocks: tuple[Block, ...]) -> tuple[Block, ...]:
        return blocks


class OffByOne(Behaviour):
    """Re-signs its PRE-PREPAREs, PREPAREs and COMMITs with the view or the sequence one off."""

    name = "off_by_one"

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

    def __init__(self, start_ms: int = 0, mode: str = "collected", hoard: bool = True) -> None:
        super().__init__(start_ms)
        self.mode, self.hoard = mode, hoard
        self.certified: set[bytes] = set()
        self.headers: dict[tuple[int, int, bytes], PrePrepareHeader] = {}
        self.prepares: dict[tuple[int, int, bytes], dict[int, bytes]] = {}

    def _collect_header(self, header: PrePrepareHeader) -> None:
        if len(self.headers) < COLLECTED_SLOTS_MAX:
            self.headers[(header.view, header.sequence, header.digest)] = header

    def _collect(self, message: Any) -> None:
        if isinstance(message, PrePrepare):
            self._collect_header(message.header)
        elif isinstance(message, NewView):
            for header in message.pre_prepares:
                self._collect_header(header)
        elif isinstance(message, Prepare):
            key = (message.view, message.sequence, message.digest)
            if key in self.prepares or len(self.prepares) < COLLECTED_SLOTS_MAX:
                self.prepares.setdefault(key, {})[message.replica_id] = message.signature

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
    digest, so only re-execution can tell), a transaction, the certificate, or the parent link."""

    name = "lying_block_server"

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
        index = context.random.randrange(len(blocks))
        return blocks[:index] + (self._lie(context, blocks[index]),) + blocks[index + 1 :]


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
        NonceReorder,
        ExtremeTimestamps,
        LyingBlockServer,
        Twins,
    )
}


def make_behaviour(spec: BehaviourSpec) -> Behaviour:
    if spec.name not in BEHAVIOURS:
        raise ValueError(f"unknown traitor behaviour {spec.name!r}; known: {', '.join(sorted(BEHAVIOURS))}")
    return BEHAVIOURS[spec.name](spec.start_ms, **dict(spec.parameters))


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
        for behaviour in self._active(now_ms):
            sends = behaviour.outgoing(self.context, sends)
        for send in sends:
            self.context.sent.append(send.message)
        return sends

    def serve_blocks(self, requester: int, blocks: tuple[Block, ...], now_ms: int) -> tuple[Block, ...]:
        for behaviour in self._active(now_ms):
            blocks = behaviour.serve_blocks(self.context, requester, blocks)
        self.blocks_served += len(blocks)
        return blocks

    @property
    def twin_side(self) -> tuple[int, ...] | None:
        for behaviour in self.behaviours:
            if isinstance(behaviour, Twins):
                return behaviour.side
        return None


def make_traitor(spec: TraitorSpec, network: NetworkConfig, key: SigningKey, domains: dict[str, bytes], seed: int) -> Traitor:
    context = TraitorContext(network, spec.replica_id, key, domains, random.Random(f"traitor/{seed}/{spec.replica_id}"))
    return Traitor(context, [make_behaviour(behaviour) for behaviour in spec.behaviours])

