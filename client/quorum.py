"""Sans-IO quorum logic for clients: accept a result only when enough replicas signed the same thing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ledger.config import NetworkConfig
from ledger.crypto import signing_domain, verify_signature
from ledger.encoding import encode
from ledger.messages import BATCH_REPLY_DOMAIN, PRUNED, BatchReply, Query, QueryReply, Reply
from ledger.transactions import TransactionResult

SignatureCheck = Callable[[bytes, bytes, bytes, bytes], bool]
BATCH_SIGNATURES_MAX = 4096  # checked batch replies a client remembers (about 300 bytes each)


class BatchSignatures:
    """Checks batch replies' signatures against the network's replica keys, remembering (bounded,
    oldest forgotten first) the batch replies that verified.

    One signed batch reply covers every transaction of a block, and a replica sends the same one
    with each of them: a client with many transactions in a block checks it once. A batch reply
    is remembered whole (replica id, view, height, block hash, root, leaf count and signature),
    so only one equal in every field, and so signed by the same key over the same bytes, is
    recognised; failures are never remembered, so a forgery is checked (and refused) each time
    and can push out no genuine entry faster than it costs the forger.
    """

    def __init__(self, network: NetworkConfig, check: SignatureCheck = verify_signature, entries_max: int = BATCH_SIGNATURES_MAX) -> None:
        self.check = check
        self.entries_max = entries_max
        self.domain = signing_domain(network.identity, BATCH_REPLY_DOMAIN)
        self.replica_keys = network.replica_keys
        self.verified: OrderedDict[BatchReply, None] = OrderedDict()
        self.checks = 0  # signature checks actually run (the rest were remembered)

    def verify(self, batch: BatchReply) -> bool:
        if batch in self.verified:
            self.verified.move_to_end(batch)
            return True
        if not 0 <= batch.replica_id < len(self.replica_keys):
            return False
        self.checks += 1
        if not self.check(self.replica_keys[batch.replica_id], self.domain, batch.signed_bytes(), batch.signature):
            return False
        self.verified[batch] = None
        if len(self.verified) > self.entries_max:
            self.verified.popitem(last=False)
        return True


@dataclass(frozen=True, slots=True)
class Receipt:
    """A transaction's outcome, vouched for by `replicas` (at least f + 1 of them)."""

    transaction_id: bytes
    result: TransactionResult
    height: int
    block_hash: bytes
    index: int
    replicas: tuple[int, ...]
    view: int


class ReplyQuorum:
    """Collects REPLYs for one transaction until f + 1 distinct replicas agree.

    A reply is counted only if its Merkle path leads from this transaction's leaf to the root
    its replica signed, and that signature (over the whole block's batch reply) verifies. A reply
    with a bad path or signature, for another transaction, or from a replica that already
    answered is ignored (and counted), so f traitors can neither forge nor block a receipt.
    With `replica_ids_authenticated` (the caller ties each reply's replica id to that replica's
    own connection, as the client library does), a replica whose reply failed its signature
    check is not heard again for this transaction, so a traitor's forgeries cost the client one
    check, not one per frame. Without it a reply may claim any id, so nobody is silenced (that
    would let a forger silence an honest replica in its name).
    """

    # One quorum per transaction in flight: slots keep each small, and give the garbage
    # collector, which walks every young object in flight, one object fewer per transaction.
    __slots__ = (
        "network",
        "replica_ids_authenticated",
        "transaction_id",
        "batch_signatures",
        "replied",
        "groups",
        "unverified",
        "forgers",
        "ignored",
        "receipt",
        "proven_paths",
        "replica_count",
        "reply_quorum",
    )

    def __init__(
        self,
        network: NetworkConfig,
        transaction_id: bytes,
        check: SignatureCheck = verify_signature,
        replica_ids_authenticated: bool = False,
        batch_signatures: BatchSignatures | None = None,
    ) -> None:
        """`batch_signatures`: shared by a client's quorums, so each batch reply is checked once
        for all the transactions it covers; without it this quorum checks with `check` alone."""
        self.network = network
        self.replica_ids_authenticated = replica_ids_authenticated
        self.transaction_id = transaction_id
        self.batch_signatures = batch_signatures if batch_signatures is not None else BatchSignatures(network, check)
        self.replied: set[int] = set()  # replicas whose reply verified
        self.groups: dict[tuple[Any, ...], list[Reply]] = {}
        self.unverified: dict[int, Reply] = {}  # at most one per replica: its latest
        self.forgers: set[int] = set()  # replicas whose reply failed its signature check
        self.ignored = 0
        self.receipt: Receipt | None = None  # once decided; later replies change nothing
        # Paths already hashed to their root, with the leaf they proved (at most one per replica):
        # honest replicas of one block send identical ones, so each is hashed once.
        self.proven_paths: set[tuple[Any, ...]] = set()
        self.replica_count = network.replica_count
        self.reply_quorum = network.reply_quorum

    def add(self, reply: Reply) -> Receipt | None:
        """The path is checked at once (a few hashes); signatures lazily, only once matching
        replies could reach f + 1: usually exactly f + 1 checks per transaction, however many
        replicas answer (and a client's memo of checked batch replies makes most of those free:
        one signature covers every transaction of the block). An unverified reply holds no
        place: a forged one is dropped when checked, and never blocks a genuine one.

        Memory stays bounded by the replica count whatever arrives: at most one unverified reply
        per replica (its latest, its path at most REPLY_PATH_LENGTH_MAX hashes), and a group
        exists only once a reply in it verified, each replica verifying at most once.

        Once decided, the receipt is returned once; later replies are dropped unchecked (the
        n - f - 1 replies that follow the deciding one cost nothing)."""
        if self.receipt is not None:
            return None
        if (
            reply.transaction_id != self.transaction_id
            or reply.replica_id >= self.replica_count
            or reply.replica_id in self.replied
            or reply.replica_id in self.forgers
        ):
            self.ignored += 1
            return None
        # Everything the path check depends on (the transaction id is this quorum's own).
        path_key = (reply.result, reply.index, reply.position, reply.batch.leaf_count, reply.batch.replies_root, reply.path)
        if path_key not in self.proven_paths:
            if not reply.path_leads_to_root():
                self.ignored += 1
                return None
            if len(self.proven_paths) < self.replica_count:
                self.proven_paths.add(path_key)
        key = reply.matching_key()
        self.unverified[reply.replica_id] = reply
        verified = self.groups.get(key)
        candidates = [waiting for waiting in self.unverified.values() if waiting.matching_key() == key]
        needed = self.reply_quorum
        if (len(verified) if verified is not None else 0) + len(candidates) < needed:
            return None
        if verified is None:
            verified = []
        for candidate in candidates:
            del self.unverified[candidate.replica_id]
            if self.batch_signatures.verify(candidate.batch):
                verified.append(candidate)
                self.replied.add(candidate.replica_id)
            else:
                self.ignored += 1
                if self.replica_ids_authenticated:
                    self.forgers.add(candidate.replica_id)
        if verified:
            self.groups[key] = verified
        if len(verified) < needed:
            return None
        self.receipt = Receipt(
            reply.transaction_id,
            reply.result,
            reply.height,
            reply.block_hash,
            reply.index,
            tuple(sorted(r.replica_id for r in verified)),
            # The lowest view in the group: a traitor cannot point the client at a far-off primary.
            min(r.view for r in verified),
        )
        return self.receipt


class QueryQuorum:
    """Collects signed QUERY-REPLYs to one query until `needed` replicas give the same answer.

    Only answers to exactly this query count: same id, and a signature over this query's digest
    (which covers its kind, argument, min_height and fresh nonce), so an honest replica's answer
    to another question, or to an earlier query with the same id, is ignored. Answers from state
    below the query's min_height do not count either (the replica says it is behind, or lies).
    Reads are not ordered, so replicas at different heights may differ; the caller asks again
    once no answer can reach `needed` any more.
    """

    def __init__(
        self,
        network: NetworkConfig,
        query: Query,
        needed: int | None = None,
        check: SignatureCheck = verify_signature,
        counts: Callable[[QueryReply], bool] | None = None,
    ) -> None:
        self.network = network
        self.query = query
        self.needed = needed if needed is not None else network.quorum
        if not network.reply_quorum <= self.needed <= network.replica_count:
            # Fewer than f + 1 could all be traitors: such an "answer" would prove nothing.
            raise ValueError(f"needed must be between f + 1 = {network.reply_quorum} and n = {network.replica_count}")
        self.check = check
        # Answers that are valid but must not count toward an answer (e.g. "I lack that block").
        self.counts = counts
        self.domain = signing_domain(network.identity, "query-reply")
        self.replied: set[int] = set()
        self.behind: dict[int, int] = {}  # replica -> the height it reported below min_height
        self.groups: dict[bytes, list[QueryReply]] = {}
        self.ignored = 0
        self.answer: QueryReply | None = None  # once decided, later replies change nothing
        self.answer_group: tuple[QueryReply, ...] = ()  # once decided: the `needed`+ signed replies that agree
        self.vouched_height = 0  # once answered: a height the answer is vouched for at (see below)

    def add(self, reply: QueryReply) -> QueryReply | None:
        """The accepted answer once `needed` replicas signed it identically, else None.

        The reply returned is the one whose height is `vouched_height`, so the height shown
        with an answer is never one a traitor inflated."""
        if self.answer is not None:
            return None
        if (
            reply.query_id != self.query.query_id
            or reply.query_digest != self.query.digest
            or reply.replica_id >= self.network.replica_count
            or reply.replica_id in self.replied
            or not self.check(self.network.replica_keys[reply.replica_id], self.domain, reply.signed_bytes(), reply.signature)
        ):
            self.ignored += 1
            return None
        self.replied.add(reply.replica_id)
        if reply.height < self.query.min_height or reply.behind:
            self.behind[reply.replica_id] = reply.height
            return None
        if self.counts is not None and not self.counts(reply):
            return None
        # Pruned replicas refuse alike but name their own first kept block: "pruned" is one answer.
        key = encode([None, PRUNED]) if reply.error.startswith(PRUNED) else encode([reply.result, reply.error])
        group = self.groups.setdefault(key, [])
        group.append(reply)
        if len(group) < self.needed:
            return None
        # The vouched height, which the client's read floor rises to: the (f + 1)-th highest height
        # in the group. At most f members are traitors, who may report any height they like.
        # - Reachable: at least one of the f + 1 members at or above it is honest, so some honest
        #   replica has reached it, and all honest replicas catch up: a later read asked from this
        #   floor can be answered (a traitor's inflated height could otherwise stall the client).
        # - Sound: in a group of 2f + 1 (a quorum) it is also the (f + 1)-th lowest, so at least one
        #   honest member is at or below it: the floor is at least the height of an honest replica
        #   that gave this answer, so every later read comes from state no older than this answer's
        #   (monotonic reads). For a group of only f + 1, as block-hash reads use, it is the lowest
        #   height: still reachable, and a block hash, once certified, never changes anyway.
        faults = self.network.faults_tolerated
        ordered = sorted(group, key=lambda item: item.height)
        chosen = ordered[len(ordered) - faults - 1]
        self.answer, self.vouched_height = chosen, chosen.height
        self.answer_group = tuple(group)
        return chosen

    @property
    def exhausted(self) -> bool:
        """No answer can reach `needed` any more, even if every replica yet to answer agrees with the
        largest group: time to ask again (the replicas that were behind may have caught up)."""
        largest = max((len(group) for group in self.groups.values()), default=0)
        waiting = self.network.replica_count - len(self.replied)
        return largest + waiting < self.needed
