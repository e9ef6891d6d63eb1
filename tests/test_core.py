"""Direct, deterministic tests of the PBFT replica core driven by hand against faulty and Byzantine peers."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from client.quorum import ReplyQuorum
from ledger.application import AccountsApplication
from ledger.blocks import Block, CommitCertificate, results_root, verify_certificate
from ledger.crypto import PublicKeyCache, SigningKey, signing_domain, verify_signature
from ledger.merkle import merkle_root
from ledger.messages import (
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
    PrePrepare,
    PrePrepareHeader,
    ViewChange,
)
from ledger.transactions import Put, Transaction, TransactionResult, sign_transaction
from node.core import LOG_KINDS, ReplicaCore
from node.effects import ClientReply, Effects, Persist, Prune
from node.new_view import NULL_BATCH, new_view_assignments
from node.simulator import _key, simulated_network

# Four replicas (f = 1, quorum 3) with the simulator's settings: batches of at most 8 cut after
# 5 ms, a window of 8, a checkpoint every 4 blocks, status every 100 ms, view-change timeout 500 ms.
SEED = 2024
CLIENT_KEYS = [_key(SEED, "client", index) for index in range(2)]
NETWORK, REPLICA_KEYS = simulated_network(SEED, 4, CLIENT_KEYS)
REPLICA_COUNT = NETWORK.replica_count
SIGNATURES = PublicKeyCache()
STATUS_INTERVAL_MS = NETWORK.protocol.status_interval_ms

Message = TypeVar("Message")
Allow = Callable[[int, int, Any], bool]


# ---- building signed things ----


def domain(kind: str) -> bytes:
    return signing_domain(NETWORK.identity, kind)


def sign(message: Message, signer: int, kind: str) -> Message:
    """`message` with the signature of replica `signer`'s key (whatever replica the message names)."""
    signature = REPLICA_KEYS[signer].sign(domain(kind), message.signed_bytes())  # type: ignore[attr-defined]
    return dataclasses.replace(message, signature=signature)  # type: ignore[type-var]


def put(nonce: int, client: int = 0) -> Transaction:
    return sign_transaction(NETWORK.identity, CLIENT_KEYS[client], nonce, Put(f"key-{nonce}", f"value-{nonce}"))


def with_bad_client_signature(transaction: Transaction) -> Transaction:
    signature = bytes([transaction.signature[0] ^ 1]) + transaction.signature[1:]
    return Transaction(transaction.sender, transaction.nonce, transaction.operation, signature)


def pre_prepare(
    sequence: int,
    transactions: tuple[Transaction, ...],
    view: int = 0,
    sender: int | None = None,
    signer: int | None = None,
    timestamp_ms: int = 0,
    proposer: int | None = None,
) -> PrePrepare:
    """A PRE-PREPARE, by default well formed and signed by the primary of `view`."""
    sender = NETWORK.primary(view) if sender is None else sender
    batch = Batch(view, sender if proposer is None else proposer, timestamp_ms, transactions)
    return sign(PrePrepare(view, sequence, batch, sender), sender if signer is None else signer, "pre-prepare")


def prepare(sequence: int, digest: bytes, replica: int, view: int = 0, signer: int | None = None) -> Prepare:
    return sign(Prepare(view, sequence, digest, replica), replica if signer is None else signer, "prepare")


def commit(sequence: int, digest: bytes, replica: int, view: int = 0, signer: int | None = None) -> Commit:
    return sign(Commit(view, sequence, digest, replica), replica if signer is None else signer, "commit")


def new_core(replica_id: int) -> ReplicaCore:
    application = AccountsApplication(NETWORK.genesis_balances)
    return ReplicaCore(NETWORK, replica_id, REPLICA_KEYS[replica_id], application, check_signature=SIGNATURES.verify)


def sent(effects: Effects, message_type: type[Message]) -> list[Message]:
    return [send.message for send in effects.send if isinstance(send.message, message_type)]


def signed_kinds(effects: Effects) -> set[str]:
    return {record.kind for record in effects.persist}


# ---- a hand-driven network of cores ----


def deliver_everything(sender: int, receiver: int, message: Any) -> bool:
    return True


@dataclass
class Host:
    """What a runtime keeps for one replica: its core, its disk (records and chain) and its outbox."""

    core: ReplicaCore
    records: dict[tuple[str, int, int], Any] = field(default_factory=dict)
    chain: list[Block] = field(default_factory=list)
    replies: list[ClientReply] = field(default_factory=list)
    prunes: list[Prune] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def apply(self, effects: Effects) -> None:
        """Carry effects out as the runtime does: persist, (send: the cluster), store blocks, prune."""
        for record in effects.persist:
            self.records[(record.kind, record.view, record.sequence)] = record.message
        for block in effects.blocks:
            parent = self.chain[-1].block_hash if self.chain else NETWORK.genesis_hash
            assert block.height == len(self.chain) + 1 and block.header.parent_hash == parent
            self.chain.append(block)
        if effects.prune is not None:
            self.prunes.append(effects.prune)
            prune = effects.prune
            for kind, view, sequence in list(self.records):
                if (
                    (kind in LOG_KINDS and sequence <= prune.through_sequence)
                    or (kind == "stable-checkpoint" and sequence < prune.through_sequence)
                    or (kind in ("view-change", "new-view") and view < prune.view)
                ):
                    del self.records[(kind, view, sequence)]
        self.replies.extend(effects.replies)
        self.events.extend(effects.events)

    def restored_core(self, replica_id: int) -> ReplicaCore:
        """A new core built from this host's disk, exactly as the runtime restarts a replica."""
        application = AccountsApplication(NETWORK.genesis_balances)
        for block in self.chain:
            application.execute_block(list(block.transactions))
        ordered = sorted(self.records, key=lambda key: (key[2], key[1], key[0]))
        return ReplicaCore(
            NETWORK,
            replica_id,
            REPLICA_KEYS[replica_id],
            application,
            len(self.chain),
            self.chain[-1].block_hash if self.chain else None,
            [(kind, self.records[(kind, view, sequence)]) for kind, view, sequence in ordered],
            check_signature=SIGNATURES.verify,
        )


class Cluster:
    """Cores wired by hand: sends go to a queue, `settle` delivers them until the network is quiet."""

    def __init__(self, replica_count: int = REPLICA_COUNT) -> None:
        self.hosts = [Host(new_core(index)) for index in range(replica_count)]
        self.queue: deque[tuple[int, int, Any]] = deque()
        self.dropped: list[tuple[int, int, Any]] = []

    def core(self, index: int) -> ReplicaCore:
        return self.hosts[index].core

    def collect(self, index: int) -> Effects:
        host = self.hosts[index]
        effects = host.core.take_effects()
        host.apply(effects)
        for send in effects.send:
            targets = [send.to] if send.to is not None else [r for r in range(len(self.hosts)) if r != index]
            self.queue.extend((index, target, send.message) for target in targets)
        return effects

    def request(self, index: int, transaction: Transaction) -> Effects:
        self.core(index).receive_request(transaction)
        return self.collect(index)

    def tick(self, index: int, now_ms: int) -> Effects:
        self.core(index).tick(now_ms)
        return self.collect(index)

    def deliver(self, receiver: int, sender: int, message: Any) -> Effects:
        """Hand one message to a core (a Byzantine peer's, say) and return what it did."""
        self.core(receiver).receive_message(sender, message)
        return self.collect(receiver)

    def settle(self, allow: Allow = deliver_everything, steps_max: int = 20_000) -> None:
        for _step in range(steps_max):
            if not self.queue:
                return
            sender, receiver, message = self.queue.popleft()
            if not allow(sender, receiver, message):
                self.dropped.append((sender, receiver, message))
            elif isinstance(message, FetchBlocks):
                # Served by the host from its store, as the runtime does; never reaches the core.
                chain = self.hosts[receiver].chain
                blocks = tuple(chain[message.from_height - 1 : message.from_height - 1 + message.count])
                if blocks:
                    self.queue.append((receiver, sender, Blocks(blocks)))
            else:
                self.deliver(receiver, sender, message)
        raise AssertionError(f"the network did not go quiet in {steps_max} steps")

    def restart(self, index: int) -> ReplicaCore:
        self.hosts[index].core = self.hosts[index].restored_core(index)
        return self.core(index)


def commit_transaction(cluster: Cluster, transaction: Transaction, now_ms: int, allow: Allow = deliver_everything) -> None:
    """The client sends to the primary of view 0, which cuts a batch at `now_ms`; then deliver."""
    cluster.request(0, transaction)
    cluster.tick(0, now_ms)
    cluster.settle(allow)


# ---- the normal case ----


def test_normal_case_a_request_becomes_a_certified_block_and_a_signed_reply_on_every_replica() -> None:
    cluster = Cluster()
    transaction = put(0)
    commit_transaction(cluster, transaction, now_ms=10)

    block = cluster.hosts[0].chain[0]
    assert block.transactions == (transaction,) and block.results == (TransactionResult(True),)
    assert block.header.view == 0 and block.header.proposer == 0
    quorum = ReplyQuorum(NETWORK, transaction.transaction_id, SIGNATURES.verify)
    receipts = []
    for index, host in enumerate(cluster.hosts):
        assert [stored.block_hash for stored in host.chain] == [block.block_hash]
        assert host.core.height == 1 and host.core.last_block_hash == block.block_hash
        assert host.core.query("get", "key-0") == "value-0"
        certificate = host.chain[0].certificate
        assert certificate is not None and len({replica for replica, _ in certificate.signatures}) >= NETWORK.quorum
        verify_certificate(host.chain[0].header, certificate, NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)
        assert host.core.counters == {}
        [client_reply] = host.replies
        reply = client_reply.reply
        assert client_reply.account == transaction.sender
        assert reply.replica_id == index
        assert reply.matching_key() == (transaction.transaction_id, TransactionResult(True), 1, block.block_hash, 0)
        assert reply.path_leads_to_root() and reply.batch.leaf_count == 1
        assert verify_signature(REPLICA_KEYS[index].public_key, domain("batch-reply"), reply.batch.signed_bytes(), reply.batch.signature)
        receipts.append(quorum.add(reply))
    # The client accepts at f + 1 = 2 matching signed replies.
    assert receipts[0] is None and receipts[1] is not None
    assert receipts[1].block_hash == block.block_hash and receipts[1].result.ok


@dataclass
class CountingKey:
    """A replica's key that counts what it signs, by domain."""

    key: SigningKey
    signed: list[bytes] = field(default_factory=list)

    @property
    def public_key(self) -> bytes:
        return self.key.public_key

    def sign(self, domain: bytes, message: bytes) -> bytes:
        self.signed.append(domain)
        return self.key.sign(domain, message)


VOTE_DOMAINS = {domain(kind) for kind in ("pre-prepare", "prepare", "commit", "checkpoint", "view-change")}


def test_a_replica_signs_one_batch_reply_per_block_however_many_transactions_it_holds() -> None:
    cluster = Cluster()
    counting = CountingKey(REPLICA_KEYS[1])
    cluster.hosts[1].core = ReplicaCore(
        NETWORK, 1, counting, AccountsApplication(NETWORK.genesis_balances), check_signature=SIGNATURES.verify  # type: ignore[arg-type]
    )
    transactions = [put(nonce, client) for client in range(2) for nonce in range(3)]
    for transaction in transactions:
        cluster.request(0, transaction)
    cluster.tick(0, 10)
    cluster.settle()
    [block] = cluster.hosts[1].chain
    assert len(block.transactions) == len(transactions)
    # Everything but its protocol votes: one signature, the batch reply, for six replies.
    assert [signed for signed in counting.signed if signed not in VOTE_DOMAINS] == [domain("batch-reply")]
    replies = [client_reply.reply for client_reply in cluster.hosts[1].replies]
    assert sorted(reply.index for reply in replies) == list(range(len(transactions)))
    assert len({reply.batch for reply in replies}) == 1
    assert cluster.core(1).batch_replies_signed == 1
    # A retransmitted request is answered from the stored block with the very same reply.
    for reply in replies:
        assert cluster.core(1).signed_reply(block, reply.index) == reply
    for reply in replies:
        assert reply.transaction_id == block.transactions[reply.index].transaction_id and reply.path_leads_to_root()
    # Every client still gets its receipt from f + 1 such replies (replicas 1 and 2).
    for transaction in transactions:
        quorum = ReplyQuorum(NETWORK, transaction.transaction_id, SIGNATURES.verify)
        found = [
            receipt
            for host in cluster.hosts[1:3]
            for client_reply in host.replies
            if (receipt := quorum.add(client_reply.reply)) is not None
        ]
        assert len(found) == 1 and found[0].block_hash == block.block_hash


# ---- pre-prepares from a faulty or Byzantine primary ----


BAD_PRE_PREPARES: dict[str, tuple[Callable[[], PrePrepare], str]] = {
    "from a replica that is not the primary": (
        lambda: pre_prepare(1, (put(0),), sender=2),
        "pre-prepare not from the primary",
    ),
    "with a bad signature": (lambda: pre_prepare(1, (put(0),), signer=2), "bad pre-prepare signature"),
    "unsigned": (lambda: dataclasses.replace(pre_prepare(1, (put(0),)), signature=bytes(64)), "bad pre-prepare signature"),
    "with a transaction whose client signature is bad": (
        lambda: pre_prepare(1, (put(1), with_bad_client_signature(put(0)))),
        "invalid batch",
    ),
    "with a duplicated transaction": (lambda: pre_prepare(1, (put(0), put(1), put(0))), "invalid batch"),
    "with a batch naming another primary": (lambda: pre_prepare(1, (put(0),), proposer=2), "invalid batch"),
    "with more transactions than a batch may hold": (
        lambda: pre_prepare(1, tuple(put(nonce) for nonce in range(NETWORK.protocol.batch_size_max + 1))),
        "invalid batch",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PRE_PREPARES))
def test_bad_pre_prepare_is_rejected_and_leaves_the_slot_open(case: str) -> None:
    build, reason = BAD_PRE_PREPARES[case]
    core = new_core(1)
    core.receive_message(0, build())
    effects = core.take_effects()
    assert core.counters == {reason: 1}
    assert effects.send == [] and effects.persist == []
    assert core.signed == {}
    # The honest pre-prepare for the same slot is still accepted afterwards.
    honest = pre_prepare(1, (put(0),))
    core.receive_message(0, honest)
    effects = core.take_effects()
    assert [(p.view, p.sequence, p.digest, p.replica_id) for p in sent(effects, Prepare)] == [(0, 1, honest.batch.digest, 1)]
    assert core.counters == {reason: 1}


def test_second_conflicting_pre_prepare_for_a_slot_is_rejected() -> None:
    core = new_core(1)
    first = pre_prepare(1, (put(0),), timestamp_ms=1)
    second = pre_prepare(1, (put(0),), timestamp_ms=2)  # same request, another batch: another digest
    assert first.batch.digest != second.batch.digest
    core.receive_message(0, first)
    [own] = sent(core.take_effects(), Prepare)
    assert own.digest == first.batch.digest
    core.receive_message(0, second)
    effects = core.take_effects()
    assert core.counters == {"conflicting pre-prepare": 1}
    assert effects.send == [] and effects.persist == []
    assert core.slots[1].digest == first.batch.digest
    assert core.signed[("prepare", 0, 1)] == own
    # The same pre-prepare again is harmless: nothing new is signed or sent.
    core.receive_message(0, first)
    assert not core.take_effects().send


# ---- votes: one per replica ----


def test_a_replicas_duplicate_or_conflicting_prepares_count_once() -> None:
    core = new_core(0)  # the primary counts prepares from quorum - 1 = 2 distinct backups
    core.receive_request(put(0))
    core.tick(10)
    [proposal] = sent(core.take_effects(), PrePrepare)
    digest = proposal.batch.digest
    other = Batch(0, 0, 99, (put(0),)).digest

    core.receive_message(1, prepare(1, other, replica=1))  # conflicts with the pre-prepare
    core.receive_message(1, prepare(1, digest, replica=1))
    core.receive_message(1, prepare(1, digest, replica=1))  # the same vote again
    core.receive_message(1, prepare(1, other, replica=1))  # a second, conflicting vote
    core.receive_message(3, prepare(1, digest, replica=2, signer=3))  # forged in replica 2's name
    core.receive_message(0, prepare(1, digest, replica=0))  # the primary does not prepare
    effects = core.take_effects()
    assert core.counters == {"prepare for another digest": 1, "bad prepare signature": 1, "prepare from the primary": 1}
    assert set(core.slots[1].prepares) == {1} and core.slots[1].prepares[1].digest == digest
    assert not core.slots[1].prepared and sent(effects, Commit) == []

    core.receive_message(2, prepare(1, digest, replica=2))
    [own_commit] = sent(core.take_effects(), Commit)
    assert core.slots[1].prepared and own_commit.digest == digest


def test_a_replicas_duplicate_or_conflicting_commits_count_once() -> None:
    core = new_core(1)
    proposal = pre_prepare(1, (put(0),))
    digest = proposal.batch.digest
    other = Batch(0, 0, 99, (put(0),)).digest
    core.receive_message(0, proposal)
    core.receive_message(2, prepare(1, digest, replica=2))
    [own_commit] = sent(core.take_effects(), Commit)
    assert own_commit.digest == digest

    core.receive_message(2, commit(1, digest, replica=2))
    core.receive_message(2, commit(1, digest, replica=2))
    core.receive_message(2, commit(1, other, replica=2))  # second vote, another digest
    core.receive_message(3, commit(1, other, replica=3))
    core.receive_message(3, commit(1, digest, replica=0, signer=3))  # forged in replica 0's name
    effects = core.take_effects()
    assert core.counters == {"commit for another digest": 1, "bad commit signature": 1}
    assert set(core.slots[1].commits) == {1, 2}
    assert not core.slots[1].committed and effects.blocks == [] and core.height == 0

    core.receive_message(3, commit(1, digest, replica=3))
    [block] = core.take_effects().blocks
    assert core.height == 1 and block.transactions == proposal.batch.transactions
    assert block.certificate is not None and {replica for replica, _ in block.certificate.signatures} == {1, 2, 3}
    verify_certificate(block.header, block.certificate, NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)


# ---- watermarks and views ----

HIGH = max(NETWORK.protocol.window_size, 2 * NETWORK.protocol.checkpoint_interval)  # low 0 + log size
DIGEST = Batch(0, 0, 0, (put(0),)).digest

OUT_OF_PLACE: dict[str, tuple[Callable[[], Any], str]] = {
    "pre-prepare above the high watermark": (lambda: pre_prepare(HIGH + 1, (put(0),)), "outside watermarks"),
    "prepare above the high watermark": (lambda: prepare(HIGH + 1, DIGEST, replica=1), "outside watermarks"),
    "commit above the high watermark": (lambda: commit(HIGH + 1, DIGEST, replica=3), "outside watermarks"),
    "commit at the low watermark": (lambda: commit(0, DIGEST, replica=3), "outside watermarks"),
    "pre-prepare for a later view": (lambda: pre_prepare(1, (put(0),), view=1), "wrong view"),
    "prepare for a later view": (lambda: prepare(1, DIGEST, replica=3, view=1), "wrong view"),
    "commit for a later view": (lambda: commit(1, DIGEST, replica=3, view=1), "wrong view"),
    "checkpoint far above the watermarks": (
        lambda: sign(Checkpoint(8 * HIGH, bytes(32), bytes(32), 3), 3, "checkpoint"),
        "checkpoint too far ahead",
    ),
}


@pytest.mark.parametrize("case", list(OUT_OF_PLACE))
def test_messages_outside_the_watermarks_or_for_another_view_are_dropped(case: str) -> None:
    build, reason = OUT_OF_PLACE[case]
    core = new_core(2)
    core.receive_message(3, build())
    effects = core.take_effects()
    assert core.counters == {reason: 1}
    assert effects.send == [] and effects.persist == []
    assert core.slots == {} and core.checkpoints == {}


def test_the_high_watermark_itself_is_accepted() -> None:
    core = new_core(2)
    proposal = pre_prepare(HIGH, (put(0),))
    core.receive_message(0, proposal)
    [own] = sent(core.take_effects(), Prepare)
    assert (own.sequence, own.digest) == (HIGH, proposal.batch.digest) and core.counters == {}


def test_normal_case_messages_are_dropped_during_a_view_change() -> None:
    core = new_core(2)
    core.receive_request(put(0))  # a backup starts its request timer
    core.tick(NETWORK.protocol.view_change_timeout_ms)
    view_changes = sent(core.take_effects(), ViewChange)
    assert {(message.new_view, message.replica_id) for message in view_changes} == {(1, 2)}
    assert core.view == 1 and not core.view_active
    for message in (pre_prepare(1, (put(0),)), prepare(1, DIGEST, replica=3), pre_prepare(1, (put(0),), view=1)):
        core.receive_message(0, message)
    assert core.counters == {"wrong view": 3}
    assert core.take_effects().send == []


# ---- view changes: forged proofs ----

BATCH_A = Batch(0, 0, 0, (put(0),))
STATE = bytes(range(32))
BLOCK_HASH = bytes(range(32, 64))


def prepared_certificate(
    view: int = 0,
    sequence: int = 1,
    proposer: int = 0,
    pre_prepare_signer: int = 0,
    prepare_signers: tuple[tuple[int, int], ...] = ((1, 1), (2, 2)),
) -> PreparedCertificate:
    """A prepared certificate for BATCH_A; prepare_signers are (claimed replica, actual signer)."""
    header = sign(PrePrepareHeader(view, sequence, BATCH_A.digest, proposer), pre_prepare_signer, "pre-prepare")
    prepares = tuple(
        (replica, prepare(sequence, BATCH_A.digest, replica, view=view, signer=signer).signature)
        for replica, signer in prepare_signers
    )
    return PreparedCertificate(header, prepares)


def checkpoint_certificate(
    sequence: int = 4, signers: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2))
) -> CheckpointCertificate:
    signatures = tuple(
        (replica, sign(Checkpoint(sequence, STATE, BLOCK_HASH, replica), signer, "checkpoint").signature)
        for replica, signer in signers
    )
    return CheckpointCertificate(sequence, STATE, BLOCK_HASH, signatures)


def view_change(
    checkpoint: CheckpointCertificate | None = None,
    prepared: tuple[PreparedCertificate, ...] = (),
    new_view: int = 1,
    replica: int = 3,
    signer: int = 3,
) -> ViewChange:
    return sign(ViewChange(new_view, checkpoint, prepared, replica), signer, "view-change")


FORGED_VIEW_CHANGES: dict[str, tuple[Callable[[], ViewChange], str]] = {
    "signed by another replica": (lambda: view_change(prepared=(prepared_certificate(),), signer=2), "bad signature"),
    "a prepare with a bad signature": (
        lambda: view_change(prepared=(prepared_certificate(prepare_signers=((1, 1), (2, 3))),)),
        "bad prepare signature from replica 2",
    ),
    "too few prepares": (
        lambda: view_change(prepared=(prepared_certificate(prepare_signers=((1, 1),)),)),
        "without enough prepares",
    ),
    "one prepare counted twice": (
        lambda: view_change(prepared=(prepared_certificate(prepare_signers=((1, 1), (1, 1))),)),
        "repeats a signer",
    ),
    "the primary's own prepare counted": (
        lambda: view_change(prepared=(prepared_certificate(prepare_signers=((0, 0), (1, 1))),)),
        "counts the primary",
    ),
    "a pre-prepare from a replica that was not that view's primary": (
        lambda: view_change(prepared=(prepared_certificate(proposer=1, pre_prepare_signer=1),)),
        "not signed by primary 0",
    ),
    "a pre-prepare with a forged primary signature": (
        lambda: view_change(prepared=(prepared_certificate(pre_prepare_signer=3),)),
        "not signed by primary 0",
    ),
    "a certificate from the new view itself": (
        lambda: view_change(prepared=(prepared_certificate(view=1, proposer=1, pre_prepare_signer=1, prepare_signers=((2, 2), (3, 3))),)),
        "not older than the new one",
    ),
    "a certificate above the watermarks": (
        lambda: view_change(prepared=(prepared_certificate(sequence=HIGH + 1),)),
        "outside",
    ),
    "a certificate at or below its own checkpoint": (
        lambda: view_change(checkpoint=checkpoint_certificate(), prepared=(prepared_certificate(sequence=4),)),
        "outside",
    ),
    "a checkpoint certificate without a quorum": (
        lambda: view_change(checkpoint=checkpoint_certificate(signers=((0, 0), (1, 1)))),
        "checkpoint certificate without a quorum",
    ),
    "a checkpoint certificate with a forged signature": (
        lambda: view_change(checkpoint=checkpoint_certificate(signers=((0, 0), (1, 1), (2, 3)))),
        "checkpoint certificate: bad signature from replica 2",
    ),
    "a checkpoint certificate repeating a signer": (
        lambda: view_change(checkpoint=checkpoint_certificate(signers=((0, 0), (1, 1), (1, 1)))),
        "repeats or invents a signer",
    ),
    "a checkpoint certificate inventing a signer": (
        lambda: view_change(checkpoint=checkpoint_certificate(signers=((0, 0), (1, 1), (REPLICA_COUNT, 2)))),
        "repeats or invents a signer",
    ),
    "a checkpoint certificate between checkpoints": (
        lambda: view_change(checkpoint=checkpoint_certificate(sequence=3)),
        "not a checkpoint",
    ),
}


@pytest.mark.parametrize("case", list(FORGED_VIEW_CHANGES))
def test_view_change_with_a_forged_proof_is_rejected(case: str) -> None:
    build, problem = FORGED_VIEW_CHANGES[case]
    core = new_core(2)
    core.receive_message(3, build())
    effects = core.take_effects()
    assert core.counters == {"invalid view-change": 1}
    assert any(problem in event for event in effects.events), effects.events
    assert 3 not in core.latest_view_changes
    assert effects.send == [] and core.view == 0 and core.view_active


@pytest.mark.parametrize(
    "build",
    [
        lambda: view_change(prepared=(prepared_certificate(),)),
        lambda: view_change(checkpoint=checkpoint_certificate(), prepared=(prepared_certificate(sequence=5),)),
        lambda: view_change(),
    ],
    ids=["a prepared certificate", "a checkpoint and a certificate above it", "nothing prepared"],
)
def test_a_well_formed_view_change_is_accepted(build: Callable[[], ViewChange]) -> None:
    core = new_core(2)
    message = build()
    core.receive_message(3, message)
    assert core.counters == {}
    assert core.latest_view_changes[3] == message
    # One replica alone (f = 1) cannot pull others into a view change.
    assert core.view == 0 and core.view_active and core.take_effects().send == []


def test_f_plus_one_view_changes_for_a_higher_view_make_a_replica_join() -> None:
    core = new_core(2)
    core.receive_message(3, view_change(new_view=5))
    assert core.view == 0 and core.view_active
    core.receive_message(1, view_change(new_view=5, replica=1, signer=1))
    [own] = sent(core.take_effects(), ViewChange)
    assert (own.new_view, own.replica_id) == (5, 2) and core.view == 5 and not core.view_active


def test_votes_signed_for_a_network_with_the_same_id_and_keys_but_other_balances_are_refused() -> None:
    """Network B has network A's id and replica keys but other genesis balances (a staging copy,
    or A re-created): A's signed messages must not count on B, where f+1 VIEW-CHANGEs would pull
    a replica into a view change and a PRE-PREPARE would be prepared."""
    other = dataclasses.replace(NETWORK, genesis_balances={key.public_key: 5 for key in CLIENT_KEYS})
    assert other.network_id == NETWORK.network_id and other.replica_keys == NETWORK.replica_keys
    assert other.genesis_hash != NETWORK.genesis_hash

    def core_of_b(replica_id: int) -> ReplicaCore:
        application = AccountsApplication(other.genesis_balances)
        return ReplicaCore(other, replica_id, REPLICA_KEYS[replica_id], application, check_signature=SIGNATURES.verify)

    core = core_of_b(2)
    core.receive_message(3, view_change(new_view=5))
    core.receive_message(1, view_change(new_view=5, replica=1, signer=1))
    assert sent(core.take_effects(), ViewChange) == [] and core.view == 0 and core.view_active
    assert core.latest_view_changes == {} and sum(core.counters.values()) == 2
    backup = core_of_b(1)
    backup.receive_message(0, pre_prepare(1, (put(0),)))
    assert backup.take_effects().send == [] and backup.signed == {} and sum(backup.counters.values()) == 1


def test_the_new_primary_sends_new_view_once_a_quorum_asks_for_its_view() -> None:
    core = new_core(2)  # the primary of view 2
    first, second = view_change(new_view=2), view_change(new_view=2, replica=1, signer=1)
    core.receive_message(3, first)
    core.receive_message(1, second)  # f + 1: it joins, and its own view-change completes the quorum
    effects = core.take_effects()
    [own] = sent(effects, ViewChange)
    [new_view] = sent(effects, NewView)
    assert new_view.view == 2 and new_view.replica_id == 2 and new_view.pre_prepares == ()
    assert [message.replica_id for message in new_view.view_changes] == [1, 2, 3]
    assert Persist("new-view", 2, 0, new_view) in effects.persist
    assert core.view == 2 and core.view_active and core.is_primary


# ---- view changes driven end to end, and NEW-VIEW checks ----


@dataclass
class ViewChangeScenario:
    """Primary 0 prepared BATCH at sequence 1 with replicas 1 and 2, then fell silent; replica 3 saw
    nothing of it. Replicas 1, 2 and 3 timed out and moved to view 1; replica 1 sent NEW-VIEW,
    which replica 2 accepted and which is held back from replica 3."""

    cluster: Cluster
    new_view: NewView
    batch: Batch


def without_replica_zero(sender: int, receiver: int, message: Any) -> bool:
    return 0 not in (sender, receiver)


def view_change_scenario() -> ViewChangeScenario:
    cluster = Cluster()
    transaction = put(0)
    for index in range(REPLICA_COUNT):
        cluster.request(index, transaction)  # the client broadcast: backups start their timers
    cluster.settle()
    cluster.tick(0, 10)

    def no_commits_and_nothing_to_replica_three(sender: int, receiver: int, message: Any) -> bool:
        return receiver != 3 and not isinstance(message, Commit)

    cluster.settle(no_commits_and_nothing_to_replica_three)
    batch = cluster.core(0).slots[1].batch
    assert batch is not None and batch.transactions == (transaction,)
    assert [cluster.core(index).slots[1].prepared for index in range(3)] == [True, True, True]
    assert all(host.chain == [] for host in cluster.hosts)

    for index in (1, 2, 3):
        cluster.tick(index, 10 + NETWORK.protocol.view_change_timeout_ms)

    def new_view_not_to_replica_three(sender: int, receiver: int, message: Any) -> bool:
        return without_replica_zero(sender, receiver, message) and not (receiver == 3 and isinstance(message, NewView))

    cluster.settle(new_view_not_to_replica_three)
    held = [message for _, receiver, message in cluster.dropped if receiver == 3 and isinstance(message, NewView)]
    new_view = held[0]
    assert held == [new_view] * len(held)  # answered again to every view-change from replica 3
    assert [view_change.replica_id for view_change in new_view.view_changes] == [1, 2, 3]
    assert [(header.sequence, header.digest) for header in new_view.pre_prepares] == [(1, batch.digest)]
    assert cluster.core(2).view == 1 and cluster.core(2).view_active
    assert cluster.core(3).view == 1 and not cluster.core(3).view_active
    return ViewChangeScenario(cluster, new_view, batch)


def test_view_change_carries_a_prepared_batch_into_the_new_view_and_commits_it() -> None:
    scenario = view_change_scenario()
    cluster, batch = scenario.cluster, scenario.batch
    effects = cluster.deliver(3, 1, scenario.new_view)
    core = cluster.core(3)
    assert core.view == 1 and core.view_active and "invalid new-view" not in core.counters
    # The backup enters the view, prepares the re-proposed batch, and asks for its content.
    assert [(p.view, p.sequence, p.digest, p.replica_id) for p in sent(effects, Prepare)] == [(1, 1, batch.digest, 3)]
    assert sent(effects, FetchBatch) == [FetchBatch(batch.digest)]
    assert Persist("new-view", 1, 0, scenario.new_view) in effects.persist

    cluster.settle(without_replica_zero)
    for index in (1, 2, 3):
        cluster.tick(index, 800)  # retransmission of what view-changing replica 3 dropped
    cluster.settle(without_replica_zero)
    hashes = {cluster.hosts[index].chain[0].block_hash for index in (1, 2, 3)}
    assert len(hashes) == 1
    for index in (1, 2, 3):
        [block] = cluster.hosts[index].chain
        assert block.transactions == batch.transactions
        # The block keeps the view and primary that first proposed it; its commits are from view 1.
        assert (block.header.view, block.header.proposer) == (0, 0)
        assert block.certificate is not None and block.certificate.view == 1
        verify_certificate(block.header, block.certificate, NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)


def reassigned(view_changes: tuple[ViewChange, ...], view: int = 1, primary: int = 1) -> tuple[PrePrepareHeader, ...]:
    """The pre-prepares these view-changes imply, signed by the new primary."""
    _, assignments = new_view_assignments(view_changes)
    return tuple(
        sign(PrePrepareHeader(view, sequence, digest, primary), primary, "pre-prepare") for sequence, digest in assignments
    )


FORGED_NEW_VIEWS: dict[str, tuple[Callable[[NewView], NewView], str]] = {
    "a prepared batch replaced by a null one": (
        lambda genuine: dataclasses.replace(
            genuine, pre_prepares=(sign(PrePrepareHeader(1, 1, NULL_BATCH.digest, 1), 1, "pre-prepare"),)
        ),
        "not the ones its view-changes imply",
    ),
    "the prepared batch left out": (
        lambda genuine: dataclasses.replace(genuine, pre_prepares=()),
        "not the ones its view-changes imply",
    ),
    "a batch nobody prepared added": (
        lambda genuine: dataclasses.replace(
            genuine,
            pre_prepares=genuine.pre_prepares
            + (sign(PrePrepareHeader(1, 2, NULL_BATCH.digest, 1), 1, "pre-prepare"),),
        ),
        "not the ones its view-changes imply",
    ),
    "sent by a replica that is not the new primary": (
        lambda genuine: dataclasses.replace(genuine, replica_id=2),
        "not the view's primary",
    ),
    "too few view-changes": (
        lambda genuine: NewView(1, genuine.view_changes[:2], reassigned(genuine.view_changes[:2]), 1),
        "only 2 view-changes, 3 needed",
    ),
    "a view-change counted twice": (
        lambda genuine: dataclasses.replace(
            genuine, view_changes=(genuine.view_changes[0],) * 2 + genuine.view_changes[1:2]
        ),
        "another view or repeated",
    ),
    "a view-change for another view": (
        lambda genuine: dataclasses.replace(
            genuine, view_changes=genuine.view_changes[:2] + (view_change(new_view=2),)
        ),
        "another view or repeated",
    ),
    "a view-change with a forged prepared certificate": (
        lambda genuine: dataclasses.replace(
            genuine,
            view_changes=genuine.view_changes[:2]
            + (view_change(prepared=(prepared_certificate(prepare_signers=((1, 1),)),)),),
        ),
        "without enough prepares",
    ),
    "a pre-prepare not signed by the new primary": (
        lambda genuine: dataclasses.replace(
            genuine, pre_prepares=tuple(sign(header, 2, "pre-prepare") for header in genuine.pre_prepares)
        ),
        "not signed by the primary",
    ),
}


@pytest.mark.parametrize("case", list(FORGED_NEW_VIEWS))
def test_forged_new_view_is_rejected(case: str) -> None:
    forge, problem = FORGED_NEW_VIEWS[case]
    scenario = view_change_scenario()
    cluster = scenario.cluster
    core = cluster.core(3)
    effects = cluster.deliver(3, 1, forge(scenario.new_view))
    assert core.counters.get("invalid new-view") == 1
    assert any(problem in event for event in effects.events), effects.events
    assert core.view == 1 and not core.view_active and core.slots == {}
    assert effects.send == [] and effects.persist == []
    # It came over the primary's own link, so the primary is faulty: nothing more it sends for
    # this view is looked at (a traitor primary could otherwise make every backup check the
    # certificates in NEW-VIEW after NEW-VIEW); the view times out like any with a faulty primary.
    effects = cluster.deliver(3, 1, scenario.new_view)
    assert not core.view_active and core.counters.get("invalid new-view") == 1
    assert effects.send == [] and effects.persist == []


@pytest.mark.parametrize("case", list(FORGED_NEW_VIEWS))
def test_a_new_view_relayed_by_another_replica_is_refused_and_spoils_nothing(case: str) -> None:
    """A NEW-VIEW has no signature of its own, so only the primary's link vouches for it: one sent
    by another replica is refused, forged or not, and the primary's own is still accepted."""
    forge, _ = FORGED_NEW_VIEWS[case]
    scenario = view_change_scenario()
    cluster = scenario.cluster
    core = cluster.core(3)
    for message in (forge(scenario.new_view), scenario.new_view):
        effects = cluster.deliver(3, 2, message)
        assert any(
            "sent by replica 2, not the view's primary 1" in event for event in effects.events
        ), effects.events
    assert core.counters.get("invalid new-view") == 2 and not core.view_active
    effects = cluster.deliver(3, 1, scenario.new_view)
    assert core.view_active and core.counters.get("invalid new-view") == 2
    assert [p.digest for p in sent(effects, Prepare)] == [scenario.batch.digest]


def strip_prepared(message: ViewChange, replica_id: int | None = None) -> ViewChange:
    """The same VIEW-CHANGE with its prepared certificates removed, keeping the original signature."""
    replica = message.replica_id if replica_id is None else replica_id
    return dataclasses.replace(message, prepared=(), replica_id=replica)


@pytest.mark.parametrize("relabel", [False, True], ids=["prepared certificates stripped", "relabelled as replica 0"])
def test_new_view_whose_view_changes_were_altered_after_signing_is_rejected(relabel: bool) -> None:
    scenario = view_change_scenario()
    cluster = scenario.cluster
    core = cluster.core(3)
    by_replica = {message.replica_id: message for message in scenario.new_view.view_changes}
    # Replica 3 verified the view-changes of replicas 1 and 2 when they arrived; both carry the
    # prepared certificate for sequence 1. The Byzantine new primary re-uses their signatures.
    if relabel:
        view_changes = (strip_prepared(by_replica[2], replica_id=0), strip_prepared(by_replica[2]), by_replica[3])
    else:
        view_changes = (strip_prepared(by_replica[1]), strip_prepared(by_replica[2]), by_replica[3])
    assert reassigned(view_changes) == ()  # as altered, nothing at all is carried into view 1
    cluster.deliver(3, 1, NewView(1, view_changes, (), 1))
    assert core.counters.get("invalid new-view") == 1
    assert not core.view_active


# ---- batch contents ----


def test_batch_content_never_asked_for_is_ignored() -> None:
    core = new_core(2)
    core.receive_message(1, BatchContent(BATCH_A))
    effects = core.take_effects()
    assert not effects and core.counters == {}
    assert BATCH_A.digest not in core.batches


def test_requested_batch_content_is_adopted_only_when_its_digest_matches() -> None:
    scenario = view_change_scenario()
    cluster, batch = scenario.cluster, scenario.batch
    core = cluster.core(3)
    cluster.deliver(3, 1, scenario.new_view)
    assert core.slots[1].batch is None and batch.digest in core.missing_batches

    other = Batch(0, 0, 0, (put(0, client=1),))
    cluster.deliver(3, 2, BatchContent(other))
    assert core.slots[1].batch is None and other.digest not in core.batches
    assert batch.digest in core.missing_batches

    cluster.deliver(3, 2, BatchContent(batch))
    assert core.slots[1].batch == batch and core.batches[batch.digest] == batch
    assert core.missing_batches == {}


# ---- state transfer: fetched blocks ----


def isolating_replica_three(sender: int, receiver: int, message: Any) -> bool:
    return 3 not in (sender, receiver)


def behind_replica() -> tuple[Cluster, list[Block]]:
    """Replicas 0, 1 and 2 commit two blocks while replica 3 hears nothing."""
    cluster = Cluster()
    commit_transaction(cluster, put(0), 10, isolating_replica_three)
    commit_transaction(cluster, put(1), 20, isolating_replica_three)
    chain = cluster.hosts[0].chain
    assert len(chain) == 2 and cluster.core(3).height == 0
    return cluster, chain


def with_certificate(block: Block, signatures: tuple[tuple[int, bytes], ...] | None, view: int = 0) -> Block:
    return dataclasses.replace(block, certificate=None if signatures is None else CommitCertificate(view, signatures))


def signatures_of(block: Block) -> tuple[tuple[int, bytes], ...]:
    assert block.certificate is not None
    return block.certificate.signatures


BAD_FETCHED_BLOCKS: dict[str, Callable[[list[Block]], Block]] = {
    "no certificate": lambda chain: with_certificate(chain[0], None),
    "the certificate of another block": lambda chain: with_certificate(chain[0], signatures_of(chain[1])),
    "too few commit signatures": lambda chain: with_certificate(chain[0], signatures_of(chain[0])[:2]),
    "one commit signature repeated": lambda chain: with_certificate(chain[0], signatures_of(chain[0])[:1] * 3),
    "a forged commit signature": lambda chain: with_certificate(
        chain[0], signatures_of(chain[0])[:2] + ((2, commit(1, chain[0].header.batch_digest(), 2, signer=3).signature),)
    ),
    "commits from another view": lambda chain: with_certificate(chain[0], signatures_of(chain[0]), view=1),
    "transactions that do not match the header": lambda chain: dataclasses.replace(
        chain[0], transactions=(put(5),)
    ),
    "a transaction missing": lambda chain: dataclasses.replace(chain[0], transactions=(), results=()),
    "a transaction repeated": lambda chain: dataclasses.replace(
        chain[0],
        header=dataclasses.replace(
            chain[0].header, transactions_root=merkle_root([chain[0].transactions[0].transaction_id] * 2)
        ),
        transactions=chain[0].transactions * 2,
        results=chain[0].results * 2,
    ),
    "results that do not match the transactions": lambda chain: dataclasses.replace(chain[0], results=()),
}


@pytest.mark.parametrize("case", list(BAD_FETCHED_BLOCKS))
def test_fetched_block_that_does_not_verify_is_ignored_and_counted(case: str) -> None:
    cluster, chain = behind_replica()
    core = cluster.core(3)
    effects = cluster.deliver(3, 2, Blocks((BAD_FETCHED_BLOCKS[case](chain), chain[1])))
    assert core.counters == {"bad fetched block": 1}
    assert effects.blocks == [] and effects.replies == [] and core.height == 0
    assert core.last_block_hash == NETWORK.genesis_hash and core.query("get", "key-0") is None


def test_good_fetched_blocks_are_applied_with_the_replicas_own_execution() -> None:
    cluster, chain = behind_replica()
    core = cluster.core(3)
    effects = cluster.deliver(3, 2, Blocks(tuple(chain)))
    assert core.counters == {}
    assert [block.block_hash for block in effects.blocks] == [block.block_hash for block in chain]
    assert core.height == 2 and core.last_block_hash == chain[1].block_hash
    assert core.query("get", "key-1") == "value-1"
    assert [reply.reply.height for reply in effects.replies] == [1, 2]
    assert any("caught up 2 blocks from replica 2" in event for event in effects.events)


def test_fetched_block_claiming_another_state_is_applied_with_the_replicas_own_results() -> None:
    cluster, chain = behind_replica()
    core = cluster.core(3)
    # The commit certificate covers the batch, not the state: a lying peer can rewrite the rest.
    made_up = (TransactionResult(False, "made up"),)
    lying_header = dataclasses.replace(
        chain[0].header, state_digest=bytes(32), parent_hash=bytes(32), results_root=results_root(made_up)
    )
    lying = dataclasses.replace(chain[0], header=lying_header, results=made_up)
    verify_certificate(lying.header, lying.certificate, NETWORK.identity, NETWORK.replica_keys, NETWORK.quorum)
    effects = cluster.deliver(3, 2, Blocks((lying, chain[1])))
    assert core.counters == {}
    assert [block.block_hash for block in effects.blocks] == [block.block_hash for block in chain]
    assert effects.blocks[0].results == (TransactionResult(True),)
    assert effects.blocks[0].header.state_digest == chain[0].header.state_digest != bytes(32)
    assert any("claims another state; using our own execution" in event for event in effects.events)


def test_a_good_fetched_block_is_kept_when_the_next_one_is_bad() -> None:
    cluster, chain = behind_replica()
    core = cluster.core(3)
    effects = cluster.deliver(3, 2, Blocks((chain[0], with_certificate(chain[1], signatures_of(chain[1])[:2]))))
    assert core.counters == {"bad fetched block": 1}
    assert [block.block_hash for block in effects.blocks] == [chain[0].block_hash] and core.height == 1


def test_fetched_blocks_that_do_not_follow_the_chain_are_skipped() -> None:
    cluster, chain = behind_replica()
    core = cluster.core(3)
    effects = cluster.deliver(3, 2, Blocks((chain[1],)))  # a gap: block 1 is missing
    assert not effects.blocks and core.height == 0 and core.counters == {}


def test_a_behind_replica_catches_up_through_status_and_fetching() -> None:
    cluster, chain = behind_replica()
    for now_ms in (STATUS_INTERVAL_MS, 2 * STATUS_INTERVAL_MS):
        for index in range(REPLICA_COUNT):
            cluster.tick(index, now_ms)
        cluster.settle()
    assert [block.block_hash for block in cluster.hosts[3].chain] == [block.block_hash for block in chain]


# ---- restart from the replica's own records ----


def no_commits(sender: int, receiver: int, message: Any) -> bool:
    return not isinstance(message, Commit)


def test_restarted_backup_never_signs_a_different_prepare_or_commit() -> None:
    cluster = Cluster()
    commit_transaction(cluster, put(0), 10)
    commit_transaction(cluster, put(1), 20, no_commits)  # sequence 2 prepares everywhere, commits are lost
    host = cluster.hosts[1]
    signed_prepare, signed_commit = host.records[("prepare", 0, 2)], host.records[("commit", 0, 2)]
    assert host.core.height == 1 and ("prepared", 0, 2) in host.records
    digest = signed_prepare.digest

    # A Byzantine primary offers the restarted replica another batch for (view 0, sequence 2).
    restored = host.restored_core(1)
    assert restored.height == 1 and restored.last_block_hash == host.chain[0].block_hash
    conflicting = pre_prepare(2, (put(1),), timestamp_ms=999)
    restored.receive_message(0, conflicting)
    for replica in (2, 3):
        restored.receive_message(replica, prepare(2, conflicting.batch.digest, replica))
    effects = restored.take_effects()
    assert not signed_kinds(effects) & {"prepare", "commit"}
    assert sent(effects, Prepare) == [] and sent(effects, Commit) == []
    assert restored.signed[("prepare", 0, 2)] == signed_prepare and restored.signed[("commit", 0, 2)] == signed_commit

    # The honest run: restarted, it re-sends exactly what it signed, and finishes sequence 2.
    core = cluster.restart(1)
    assert cluster.tick(1, STATUS_INTERVAL_MS // 2).send == []
    effects = cluster.tick(1, STATUS_INTERVAL_MS)
    assert sent(effects, Prepare) == [signed_prepare] and sent(effects, Commit) == [signed_commit]
    assert not signed_kinds(effects) & {"prepare", "commit"}
    cluster.queue.clear()
    for index in range(REPLICA_COUNT):
        cluster.tick(index, 2 * STATUS_INTERVAL_MS)  # the others re-send their pre-prepare, prepares, commits
    cluster.settle()
    assert core.slots[2].digest == digest and core.counters == {}
    assert host.records[("prepare", 0, 2)] == signed_prepare and host.records[("commit", 0, 2)] == signed_commit
    assert all(len(other.chain) == 2 for other in cluster.hosts)
    assert [block.block_hash for block in host.chain] == [block.block_hash for block in cluster.hosts[0].chain]
    assert host.chain[1].transactions == (put(1),)


def test_restarted_primary_retransmits_its_pre_prepare_with_the_batch_and_never_reuses_the_sequence() -> None:
    cluster = Cluster()
    cluster.request(0, put(0))
    [proposal] = sent(cluster.tick(0, 10), PrePrepare)
    cluster.settle(lambda sender, receiver, message: sender != 0)  # the primary crashes: all of it is lost
    assert cluster.hosts[0].records[("pre-prepare", 0, 1)] == proposal

    core = cluster.restart(0)
    assert core.is_primary and core.view == 0 and core.slots[1].batch == proposal.batch
    cluster.request(0, put(1))
    [second] = sent(cluster.tick(0, STATUS_INTERVAL_MS // 2), PrePrepare)
    assert second.sequence == 2 and second.batch.transactions == (put(1),)
    effects = cluster.tick(0, STATUS_INTERVAL_MS)
    assert sent(effects, PrePrepare) == [proposal]
    assert [send.to for send in effects.send if send.message == proposal] == [None]
    cluster.settle()
    for host in cluster.hosts:
        assert [block.transactions for block in host.chain] == [(put(0),), (put(1),)]
    assert len({host.chain[1].block_hash for host in cluster.hosts}) == 1


# ---- checkpoints and garbage collection ----


def test_checkpoint_quorum_makes_it_stable_moves_the_watermarks_and_collects_the_log() -> None:
    interval = NETWORK.protocol.checkpoint_interval
    cluster = Cluster()

    def hold_checkpoints_to_replica_three(sender: int, receiver: int, message: Any) -> bool:
        return not (receiver == 3 and isinstance(message, Checkpoint))

    for nonce in range(interval):
        commit_transaction(cluster, put(nonce), 10 * (nonce + 1), hold_checkpoints_to_replica_three)
    for index in range(3):
        core = cluster.core(index)
        assert core.low == interval and core.stable_checkpoint is not None
        assert cluster.hosts[index].prunes == [Prune(interval, 0)]
        assert not [key for key in cluster.hosts[index].records if key[0] in LOG_KINDS]

    core = cluster.core(3)
    assert core.height == interval and core.low == 0
    assert sorted(core.slots) == list(range(1, interval + 1)) and core.signed
    own = core.own_checkpoints[interval]
    held = {sender: message for sender, receiver, message in cluster.dropped if receiver == 3}

    # A replica lying about the state, and a forged checkpoint, do not count towards the quorum.
    core.receive_message(1, sign(Checkpoint(interval, bytes(32), own.block_hash, 1), 1, "checkpoint"))
    core.receive_message(2, sign(Checkpoint(interval, own.state_digest, own.block_hash, 2), 3, "checkpoint"))
    core.receive_message(0, held[0])
    core.receive_message(0, held[0])
    effects = core.take_effects()
    assert core.counters == {"bad checkpoint signature": 1}
    assert core.low == 0 and effects.prune is None

    core.receive_message(2, held[2])
    effects = core.take_effects()
    assert core.low == interval and core.high == interval + HIGH
    assert effects.prune == Prune(interval, 0)
    certificate = core.stable_checkpoint
    assert certificate is not None and (certificate.state_digest, certificate.block_hash) == (own.state_digest, own.block_hash)
    assert [replica for replica, _ in certificate.signatures] == [0, 2, 3]
    for replica, signature in certificate.signatures:
        vote = Checkpoint(interval, own.state_digest, own.block_hash, replica)
        assert verify_signature(REPLICA_KEYS[replica].public_key, domain("checkpoint"), vote.signed_bytes(), signature)
    assert Persist("stable-checkpoint", 0, interval, certificate) in effects.persist
    # Everything at or below the stable checkpoint is gone.
    assert core.slots == {} and core.signed == {} and core.prepared == {}
    assert core.checkpoints == {} and core.own_checkpoints == {} and core.batches == {}
    cluster.hosts[3].apply(effects)
    assert not [key for key in cluster.hosts[3].records if key[0] in LOG_KINDS]

    # The window moved: the old sequence numbers are refused, the new high watermark accepted.
    core.receive_message(0, pre_prepare(interval, (put(9),)))
    core.receive_message(1, prepare(interval + HIGH + 1, DIGEST, replica=1))
    assert core.counters == {"bad checkpoint signature": 1, "outside watermarks": 2}
    core.receive_message(0, pre_prepare(interval + HIGH, (put(interval),), timestamp_ms=core.last_timestamp_ms))
    [own_prepare] = sent(core.take_effects(), Prepare)
    assert own_prepare.sequence == interval + HIGH


def test_byzantine_new_primary_cannot_replace_a_committed_batch() -> None:
    cluster = Cluster()
    committed = put(0)
    for index in range(REPLICA_COUNT):
        cluster.request(index, committed)
    cluster.settle()
    cluster.tick(0, 10)

    def commits_reach_only_replica_zero(sender: int, receiver: int, message: Any) -> bool:
        return receiver != 3 and (receiver == 0 or not isinstance(message, Commit))

    cluster.settle(commits_reach_only_replica_zero)
    [block] = cluster.hosts[0].chain  # honest replica 0 committed the batch at height 1
    assert block.transactions == (committed,)

    # Replica 0 is cut off; 1, 2 and 3 time out. Replica 1, primary of view 1, is the traitor.
    for index in (1, 2, 3):
        cluster.tick(index, 10 + NETWORK.protocol.view_change_timeout_ms)

    def from_one_two_three_to_two_and_three(sender: int, receiver: int, message: Any) -> bool:
        return sender != 0 and receiver in (2, 3)

    cluster.settle(from_one_two_three_to_two_and_three)
    signed = {index: cluster.hosts[index].records[("view-change", 1, 0)] for index in (1, 2, 3)}
    assert signed[1].prepared and signed[2].prepared and not signed[3].prepared
    # Replica 2 verified the view-changes of 1 and 3, replica 3 those of 1 and 2 (their own never).
    cluster.deliver(2, 1, NewView(1, (strip_prepared(signed[1], 0), strip_prepared(signed[1]), signed[3]), (), 1))
    cluster.deliver(3, 1, NewView(1, (strip_prepared(signed[1]), strip_prepared(signed[2]), signed[3]), (), 1))
    cluster.queue.clear()
    replacement = pre_prepare(1, (put(0, client=1),), view=1)
    for index in (2, 3):
        cluster.deliver(index, 1, replacement)
    cluster.settle(from_one_two_three_to_two_and_three)
    for index in (2, 3):
        cluster.deliver(index, 1, commit(1, replacement.batch.digest, 1, view=1))
    # Agreement: no two honest replicas commit different blocks at the same height.
    committed_first = {cluster.hosts[index].chain[0].block_hash for index in (0, 2, 3) if cluster.hosts[index].chain}
    assert committed_first == {block.block_hash}


def test_under_load_the_primary_fills_a_batch_while_two_are_in_flight_and_sends_a_full_one_at_once() -> None:
    """A batch short of batch_size_max waits while two earlier ones are still being agreed on (so
    batches grow with the load); a lone request goes on the next tick; a full batch at once."""
    cluster = Cluster()
    proposals = [sent(cluster.request(0, put(0)), PrePrepare)]
    proposals.append(sent(cluster.tick(0, 10), PrePrepare))
    cluster.request(0, put(1))
    proposals.append(sent(cluster.tick(0, 20), PrePrepare))
    assert [len(found) for found in proposals] == [0, 1, 1], "each request goes on the next tick"
    for nonce in (2, 3):
        cluster.request(0, put(nonce))
    assert sent(cluster.tick(0, 30), PrePrepare) == [], "two batches in flight: the third keeps filling"
    cluster.settle()
    assert cluster.core(0).height == 2
    (filled,) = sent(cluster.tick(0, 40), PrePrepare)
    assert [transaction.nonce for transaction in filled.batch.transactions] == [2, 3]
    cluster.request(0, put(4))
    assert sent(cluster.tick(0, 50), PrePrepare) != [], "one batch in flight: a second may go"
    batch_size_max = NETWORK.protocol.batch_size_max
    full = [sent(cluster.request(0, put(nonce)), PrePrepare) for nonce in range(5, 5 + batch_size_max)]
    assert [len(found) for found in full] == [0] * (batch_size_max - 1) + [1], "a full batch goes at once"
    cluster.settle()
    assert cluster.core(0).height == 5 and all(host.core.height == 5 for host in cluster.hosts)


def test_an_idle_primary_orders_a_lone_request_without_waiting_batch_wait_ms() -> None:
    """One transaction at a time: nothing is in flight, so there is nothing to gather company
    for while waiting. With a batch in flight, the next one still waits batch_wait_ms."""
    cluster = Cluster()
    wait_ms = NETWORK.protocol.batch_wait_ms
    assert wait_ms > 1
    cluster.tick(0, 1_000)
    cluster.request(0, put(0))
    effects = cluster.tick(0, 1_000)  # the same moment: no time has passed since it arrived
    assert [send.message.sequence for send in effects.send if isinstance(send.message, PrePrepare)] == [1]
    cluster.request(0, put(1))
    waiting = cluster.tick(0, 1_000 + wait_ms - 1)
    assert not [send for send in waiting.send if isinstance(send.message, PrePrepare)]
    later = cluster.tick(0, 1_000 + wait_ms)
    assert [send.message.sequence for send in later.send if isinstance(send.message, PrePrepare)] == [2]
