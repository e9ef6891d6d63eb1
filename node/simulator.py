"""Deterministic simulation: n replica cores, seeded network faults, invariants checked at every step.

Everything random comes from one `random.Random(seed)`, and time is a logical clock, so a failing
seed replays exactly: `ledger-node simulate --seed S` (or `make sim SEED=S`).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from client.quorum import Receipt, ReplyQuorum
from ledger.application import AccountsApplication, is_final
from ledger.blocks import Block, ChainError, verify_certificate, verify_execution
from ledger.config import Address, NetworkConfig, ProtocolSettings, ReplicaInfo
from ledger.crypto import PublicKeyCache, SigningKey
from ledger.messages import Blocks, FetchBlocks, PrePrepare, Reply
from ledger.transactions import Put, Transaction, Transfer, sign_transaction
from node.core import LOG_KINDS, Effects, Persist, Prune, ReplicaCore

CoreFactory = Callable[..., ReplicaCore]


class SimulationFailure(AssertionError):
    """An invariant broke, or the network did not finish; the message starts with the seed."""


@dataclass
class Scenario:
    """The knobs of one run. `from_seed` draws the network's misbehaviour from the seed."""

    seed: int
    replica_count: int = 4
    clients: int = 3
    transactions_per_client: int = 8
    loss_rate: float = 0.0
    duplicate_rate: float = 0.0
    delay_ms_min: int = 1
    delay_ms_max: int = 10
    tick_ms: int = 5
    client_timeout_ms: int = 400
    faults_until_ms: int = 3_000
    time_limit_ms: int = 120_000
    equivocating_primary: bool = False
    require_liveness: bool = True
    core_factory: CoreFactory = ReplicaCore
    # Faulty replicas: (replica, from_ms, until_ms). All end by faults_until_ms, when the network heals.
    crashes: tuple[tuple[int, int, int], ...] = ()
    stalls: tuple[tuple[int, int, int], ...] = ()
    partitions: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def from_seed(cls, seed: int, replica_count: int = 4, faults: bool = True, **overrides: Any) -> Scenario:
        """Draw the network's behaviour from the seed: loss, delay, duplication, and up to f faulty
        replicas (the primary half the time) that crash and restart, stall, or are cut off."""
        draw = random.Random(f"scenario/{seed}")
        values: dict[str, Any] = dict(
            seed=seed,
            replica_count=replica_count,
            loss_rate=draw.choice([0.0, 0.01, 0.05, 0.1]),
            duplicate_rate=draw.choice([0.0, 0.02, 0.1]),
            delay_ms_min=draw.randint(0, 3),
            delay_ms_max=draw.choice([5, 20, 60]),
        )
        if faults:
            faulty_count = draw.randint(0, (replica_count - 1) // 3)
            candidates = list(range(1, replica_count))
            faulty = draw.sample(candidates, faulty_count)
            if faulty and draw.random() < 0.5:
                faulty[0] = 0  # the primary of view 0
            horizon = values.get("faults_until_ms", cls.faults_until_ms)
            crashes, stalls, partitions = [], [], []
            for replica in faulty:
                start = draw.randint(0, horizon // 2)
                end = draw.randint(start + 1, horizon)
                kind = draw.choice(["crash", "crash", "stall", "partition"])
                {"crash": crashes, "stall": stalls, "partition": partitions}[kind].append((replica, start, end))
            values.update(crashes=tuple(crashes), stalls=tuple(stalls), partitions=tuple(partitions))
        values.update(overrides)
        return cls(**values)


@dataclass
class SimulatedReplica:
    """One replica: its core (replaced on restart) and its disk (records and chain) that survive."""

    core: ReplicaCore
    chain: list[Block] = field(default_factory=list)
    records: dict[tuple[str, int, int], Any] = field(default_factory=dict)
    transaction_ids: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    crashed: bool = False
    paused_until_ms: int = 0
    isolated: bool = False

    def persist(self, record: Persist) -> None:
        self.records[(record.kind, record.view, record.sequence)] = record.message

    def prune(self, prune: Prune) -> None:
        """The same rule as the SQLite store (ledger/storage.py prune_messages)."""
        for key in list(self.records):
            kind, view, sequence = key
            if (
                (kind in LOG_KINDS and sequence <= prune.through_sequence)
                or (kind == "stable-checkpoint" and sequence < prune.through_sequence)
                or (kind in ("view-change", "new-view") and view < prune.view)
            ):
                del self.records[key]

    def restored_records(self) -> list[tuple[str, Any]]:
        return [(key[0], self.records[key]) for key in sorted(self.records, key=lambda key: (key[2], key[1], key[0]))]


@dataclass
class SimulatedClient:
    key: SigningKey
    nonce: int = 0
    submitted: int = 0
    in_flight: Transaction | None = None
    quorum: ReplyQuorum | None = None
    sent_at_ms: int = 0
    receipts: list[Receipt] = field(default_factory=list)


@dataclass
class SimulationReport:
    seed: int
    replica_count: int
    steps: int
    time_ms: int
    height: int
    receipts: int
    messages_sent: int
    messages_dropped: int
    view: int
    crashes: int


def _key(seed: int, role: str, index: int) -> SigningKey:
    return SigningKey.from_private_bytes(hashlib.sha256(f"{seed}/{role}/{index}".encode()).digest())


def simulated_network(seed: int, replica_count: int, client_keys: list[SigningKey]) -> tuple[NetworkConfig, list[SigningKey]]:
    keys = [_key(seed, "replica", index) for index in range(replica_count)]
    replicas = tuple(
        ReplicaInfo(index, key.public_key, Address("sim", 2 * index + 1), Address("sim", 2 * index + 2))
        for index, key in enumerate(keys)
    )
    protocol = ProtocolSettings(
        batch_size_max=8,
        batch_wait_ms=5,
        window_size=8,
        checkpoint_interval=4,
        status_interval_ms=100,
        view_change_timeout_ms=500,
        request_timeout_ms=400,
        clock_skew_max_ms=5_000,
    )
    balances = {key.public_key: 1_000 for key in client_keys}
    return NetworkConfig(f"sim-{seed}", replicas, protocol, balances), keys


class Simulation:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.random = random.Random(scenario.seed)
        self.clients = [SimulatedClient(_key(scenario.seed, "client", index)) for index in range(scenario.clients)]
        self.network, self.replica_keys = simulated_network(
            scenario.seed, scenario.replica_count, [client.key for client in self.clients]
        )
        self.signatures = PublicKeyCache()
        self.replicas = [SimulatedReplica(self._new_core(index, None)) for index in range(scenario.replica_count)]
        self.queue: list[tuple[int, int, str, Any]] = []
        self.counter = 0
        self.now_ms = 0
        self.steps = 0
        self.committed: dict[int, bytes] = {}
        self.signed_digests: dict[tuple[int, str, int, int], bytes] = {}
        self.messages_sent = 0
        self.messages_dropped = 0
        self.crash_count = 0
        self.client_view = 0
        self.traitors = {0} if scenario.equivocating_primary else set()

    def _new_core(self, index: int, replica: SimulatedReplica | None) -> ReplicaCore:
        """A fresh core; after a crash, rebuilt from the replica's disk exactly as the runtime does."""
        application = AccountsApplication(self.network.genesis_balances)
        chain = replica.chain if replica is not None else []
        for block in chain:
            verify_execution(application, block)
        return self.scenario.core_factory(
            self.network,
            index,
            self.replica_keys[index],
            application,
            len(chain),
            chain[-1].block_hash if chain else None,
            replica.restored_records() if replica is not None else None,
            check_signature=self.signatures.verify,
            last_timestamp_ms=max((block.header.timestamp_ms for block in chain), default=0),
        )

    def fail(self, text: str) -> SimulationFailure:
        return SimulationFailure(
            f"seed {self.scenario.seed} (n={self.scenario.replica_count}) at t={self.now_ms}ms step {self.steps}: {text}"
        )

    # ---- the event queue ----

    def schedule(self, delay_ms: int, kind: str, payload: Any) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (self.now_ms + delay_ms, self.counter, kind, payload))

    def faulty_period(self) -> bool:
        return self.now_ms < self.scenario.faults_until_ms

    def transmit(self, kind: str, payload: Any) -> None:
        """Deliver after a seeded delay; while faults are on, maybe drop or duplicate it."""
        self.messages_sent += 1
        copies = 1
        if self.faulty_period():
            if self.random.random() < self.scenario.loss_rate:
                self.messages_dropped += 1
                return
            if self.random.random() < self.scenario.duplicate_rate:
                copies = 2
        for _ in range(copies):
            self.schedule(self.random.randint(self.scenario.delay_ms_min, self.scenario.delay_ms_max), kind, payload)

    # ---- running ----

    def run(self) -> SimulationReport:
        for index in range(self.scenario.replica_count):
            self.schedule(index, "tick", index)
        self.schedule(0, "client-tick", None)
        for replica, start, end in self.scenario.crashes:
            self.schedule(start, "crash", replica)
            self.schedule(end, "restart", replica)
        for replica, start, end in self.scenario.stalls:
            self.schedule(start, "stall", (replica, end))
        for replica, start, end in self.scenario.partitions:
            self.schedule(start, "isolate", replica)
            self.schedule(end, "reconnect", replica)
        while self.queue:
            time_ms, _, kind, payload = heapq.heappop(self.queue)
            self.now_ms = time_ms
            if self.now_ms > self.scenario.time_limit_ms:
                break
            self.steps += 1
            self.step(kind, payload)
            if self.finished():
                break
        if self.scenario.require_liveness and not self.finished():
            done = sum(len(client.receipts) for client in self.clients)
            wanted = self.scenario.clients * self.scenario.transactions_per_client
            heights = [len(replica.chain) for replica in self.replicas]
            views = [replica.core.view for replica in self.replicas]
            raise self.fail(f"liveness: {done}/{wanted} transactions confirmed, replica heights {heights}, views {views}")
        return SimulationReport(
            self.scenario.seed,
            self.scenario.replica_count,
            self.steps,
            self.now_ms,
            max(len(replica.chain) for replica in self.replicas),
            sum(len(client.receipts) for client in self.clients),
            self.messages_sent,
            self.messages_dropped,
            max(replica.core.view for replica in self.replicas),
            self.crash_count,
        )

    def finished(self) -> bool:
        wanted = self.scenario.transactions_per_client
        if any(len(client.receipts) < wanted for client in self.clients):
            return False
        if self.faulty_period():
            return False
        heights = {len(self.replicas[index].chain) for index in self.honest()}
        return len(heights) == 1

    def honest(self) -> list[int]:
        return [index for index in range(self.scenario.replica_count) if index not in self.traitors]

    def reachable(self, index: int) -> bool:
        replica = self.replicas[index]
        return not replica.crashed and not replica.isolated

    def step(self, kind: str, payload: Any) -> None:
        if kind == "tick":
            index = payload
            replica = self.replicas[index]
            if not replica.crashed and self.now_ms >= replica.paused_until_ms:
                replica.core.tick(self.now_ms)
                self.apply(index)
            self.schedule(self.scenario.tick_ms, "tick", index)
        elif kind == "deliver":
            sender, receiver, message = payload
            replica = self.replicas[receiver]
            if not self.reachable(receiver) or not self.reachable(sender):
                self.messages_dropped += 1
                return
            if self.now_ms < replica.paused_until_ms:
                self.schedule(replica.paused_until_ms - self.now_ms, kind, payload)
                return
            if isinstance(message, FetchBlocks):
                self.serve_fetch(receiver, sender, message)
                return
            replica.core.tick(self.now_ms)
            replica.core.receive_message(sender, message)
            self.apply(receiver)
        elif kind == "request":
            receiver, transaction = payload
            replica = self.replicas[receiver]
            if not self.reachable(receiver):
                return
            if self.now_ms < replica.paused_until_ms:
                self.schedule(replica.paused_until_ms - self.now_ms, kind, payload)
                return
            location = replica.transaction_ids.get(transaction.transaction_id)
            if location is not None:
                # As the runtime does from its store: a request already executed gets its reply again.
                height, position = location
                self.transmit("reply", replica.core.signed_reply(replica.chain[height - 1], position))
                return
            replica.core.tick(self.now_ms)
            replica.core.receive_request(transaction)
            self.apply(receiver)
        elif kind == "reply":
            self.on_reply(payload)
        elif kind == "client-tick":
            self.client_tick()
            self.schedule(self.scenario.tick_ms * 4, "client-tick", None)
        elif kind == "crash":
            # Whatever the core held in memory is lost; its disk (records and chain) survives.
            self.replicas[payload].crashed = True
            self.crash_count += 1
        elif kind == "restart":
            replica = self.replicas[payload]
            replica.core = self._new_core(payload, replica)
            replica.crashed = False
        elif kind == "stall":
            replica_index, until_ms = payload
            self.replicas[replica_index].paused_until_ms = until_ms
        elif kind == "isolate":
            self.replicas[payload].isolated = True
        elif kind == "reconnect":
            self.replicas[payload].isolated = False

    def serve_fetch(self, server: int, requester: int, request: FetchBlocks) -> None:
        chain = self.replicas[server].chain
        blocks = tuple(chain[request.from_height - 1 : request.from_height - 1 + request.count])
        if blocks:
            self.transmit("deliver", (server, requester, Blocks(blocks, self.replicas[server].core.stable_checkpoint)))

    # ---- carrying out effects, and the invariants ----

    def apply(self, index: int) -> None:
        replica = self.replicas[index]
        effects = replica.core.take_effects()
        if index in self.traitors:
            effects = self.equivocate(index, effects)
        for record in effects.persist:
            self.check_signed_once(index, record)
            replica.persist(record)
        for send in effects.send:
            targets = [send.to] if send.to is not None else [r for r in range(self.scenario.replica_count) if r != index]
            for target in targets:
                self.transmit("deliver", (index, target, send.message))
        for block in effects.blocks:
            self.check_block(index, block)
        if effects.prune is not None:
            replica.prune(effects.prune)
        for reply in effects.replies:
            self.transmit("reply", reply.reply)

    def check_signed_once(self, index: int, record: Persist) -> None:
        """No honest replica signs two different pre-prepares, prepares or commits for one slot,
        not even across crashes (the record of what it signed outlives its memory here)."""
        if index in self.traitors or record.kind not in ("pre-prepare", "prepare", "commit"):
            return
        message = record.message
        digest = message.header.digest if isinstance(message, PrePrepare) else message.digest
        key = (index, record.kind, record.view, record.sequence)
        previous = self.signed_digests.setdefault(key, digest)
        if previous != digest:
            raise self.fail(f"equivocation: replica {index} signed two {record.kind}s for view {record.view} sequence {record.sequence}")

    def equivocate(self, index: int, effects: Effects) -> Effects:
        """A traitor primary: every pre-prepare goes out in two versions, one to each half."""
        honest_sends = []
        for send in effects.send:
            message = send.message
            if send.to is None and isinstance(message, PrePrepare):
                batch = message.batch
                twin_batch = type(batch)(batch.view, batch.proposer, batch.timestamp_ms + 1, tuple(reversed(batch.transactions)))
                unsigned = PrePrepare(message.view, message.sequence, twin_batch, index)
                twin = PrePrepare(
                    message.view,
                    message.sequence,
                    twin_batch,
                    index,
                    self.replica_keys[index].sign(self.replicas[index].core.domains["pre-prepare"], unsigned.signed_bytes()),
                )
                others = [r for r in range(self.scenario.replica_count) if r != index]
                half = len(others) // 2
                for target in others[:half]:
                    honest_sends.append(type(send)(target, message))
                for target in others[half:]:
                    honest_sends.append(type(send)(target, twin))
            else:
                honest_sends.append(send)
        effects.send = honest_sends
        return effects

    def check_block(self, index: int, block: Block) -> None:
        replica = self.replicas[index]
        expected_parent = replica.chain[-1].block_hash if replica.chain else self.network.genesis_hash
        if block.height != len(replica.chain) + 1:
            raise self.fail(f"replica {index} committed block {block.height} after {len(replica.chain)}")
        if block.header.parent_hash != expected_parent:
            raise self.fail(f"hash chain: replica {index} block {block.height} does not link to its parent")
        if index not in self.traitors:
            agreed = self.committed.setdefault(block.height, block.block_hash)
            if agreed != block.block_hash:
                raise self.fail(f"agreement: replicas committed different blocks at height {block.height}")
            try:
                verify_certificate(
                    block.header, block.certificate, self.network.network_id, self.network.replica_keys, self.network.quorum, self.signatures.verify
                )
            except ChainError as error:
                raise self.fail(f"certificate: replica {index}: {error}") from None
        for position, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True)):
            earlier = replica.transaction_ids.get(transaction.transaction_id)
            if earlier is not None and result.ok:
                raise self.fail(f"exactly-once: replica {index} executed a transaction twice (blocks {earlier[0]} and {block.height})")
            if earlier is None and is_final(result):
                replica.transaction_ids[transaction.transaction_id] = (block.height, position)
        replica.chain.append(block)

    # ---- the clients ----

    def client_tick(self) -> None:
        accounts = [client.key.public_key for client in self.clients]
        for client in self.clients:
            if client.in_flight is None and client.submitted < self.scenario.transactions_per_client:
                operation: Any
                if self.random.random() < 0.5:
                    recipient = self.random.choice(accounts)
                    operation = Transfer(recipient, self.random.randint(1, 10))
                else:
                    operation = Put(f"key-{self.random.randint(0, 5)}", f"value-{self.random.randint(0, 1000)}")
                transaction = sign_transaction(self.network.network_id, client.key, client.nonce, operation)
                client.in_flight = transaction
                client.quorum = ReplyQuorum(self.network, transaction.transaction_id, self.signatures.verify)
                client.submitted += 1
                client.sent_at_ms = self.now_ms
                self.transmit("request", (self.network.primary(self.client_view), transaction))
            elif client.in_flight is not None and self.now_ms - client.sent_at_ms >= self.scenario.client_timeout_ms:
                # PBFT: a client that waited too long sends its request to every replica.
                client.sent_at_ms = self.now_ms
                for replica in range(self.scenario.replica_count):
                    self.transmit("request", (replica, client.in_flight))

    def on_reply(self, reply: Reply) -> None:
        for client in self.clients:
            if client.quorum is not None and client.quorum.transaction_id == reply.transaction_id:
                receipt = client.quorum.add(reply)
                if receipt is not None:
                    if not receipt.result.ok:
                        raise self.fail(f"validity: a well-formed transaction failed: {receipt.result.reason}")
                    client.receipts.append(receipt)
                    client.in_flight = None
                    client.quorum = None
                    client.nonce += 1
                    self.client_view = max(self.client_view, receipt.view)


def run_simulation(scenario: Scenario) -> SimulationReport:
    return Simulation(scenario).run()
