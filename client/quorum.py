"""Sans-IO quorum logic for clients: accept a result only when enough replicas signed the same thing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ledger.config import NetworkConfig
from ledger.crypto import signing_domain, verify_signature
from ledger.encoding import encode
from ledger.messages import QueryReply, Reply
from ledger.transactions import TransactionResult

SignatureCheck = Callable[[bytes, bytes, bytes, bytes], bool]


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

    A reply with a bad signature, for another transaction, or from a replica that already
    answered is ignored (and counted), so f traitors can neither forge nor block a receipt.
    """

    def __init__(self, network: NetworkConfig, transaction_id: bytes, check: SignatureCheck = verify_signature) -> None:
        self.network = network
        self.transaction_id = transaction_id
        self.check = check
        self.domain = signing_domain(network.network_id, "reply")
        self.replied: set[int] = set()  # replicas whose reply verified
        self.groups: dict[tuple[Any, ...], list[Reply]] = {}
        self.unverified: dict[int, Reply] = {}  # at most one per replica: its latest
        self.ignored = 0

    def add(self, reply: Reply) -> Receipt | None:
        """Signatures are checked lazily, only once matching replies could reach f + 1: usually
        exactly f + 1 checks per transaction, however many replicas answer. An unverified reply
        holds no place: a forged one is dropped when checked, and never blocks a genuine one.

        Memory stays bounded by the replica count whatever arrives: at most one unverified reply
        per replica (its latest), and a group exists only once a reply in it verified, each
        replica verifying at most once."""
        if (
            reply.transaction_id != self.transaction_id
            or reply.replica_id >= self.network.replica_count
            or reply.replica_id in self.replied
        ):
            self.ignored += 1
            return None
        self.unverified[reply.replica_id] = reply
        key = reply.matching_key()
        verified = self.groups.get(key, [])
        candidates = [waiting for waiting in self.unverified.values() if waiting.matching_key() == key]
        needed = self.network.reply_quorum
        if len(verified) + len(candidates) < needed:
            return None
        for candidate in candidates:
            del self.unverified[candidate.replica_id]
            public_key = self.network.replica_keys[candidate.replica_id]
            if self.check(public_key, self.domain, candidate.signed_bytes(), candidate.signature):
                verified.append(candidate)
                self.replied.add(candidate.replica_id)
            else:
                self.ignored += 1
        if verified:
            self.groups[key] = verified
        if len(verified) < needed:
            return None
        return Receipt(
            reply.transaction_id,
            reply.result,
            reply.height,
            reply.block_hash,
            reply.index,
            tuple(sorted(r.replica_id for r in verified)),
            # The lowest view in the group: a traitor cannot point the client at a far-off primary.
            min(r.view for r in verified),
        )


class QueryQuorum:
    """Collects signed QUERY-REPLYs until a quorum of replicas give the same answer.

    Reads are not ordered, so replicas at different heights may differ; the caller retries
    when every replica answered and no answer reached the quorum.
    """

    def __init__(
        self,
        network: NetworkConfig,
        query_id: int,
        needed: int | None = None,
        check: SignatureCheck = verify_signature,
        counts: Callable[[QueryReply], bool] | None = None,
    ) -> None:
        self.network = network
        self.query_id = query_id
        self.needed = needed if needed is not None else network.quorum
        self.check = check
        # Answers that are valid but must not count toward an answer (e.g. "I lack that block").
        self.counts = counts
        self.domain = signing_domain(network.network_id, "query-reply")
        self.replied: set[int] = set()
        self.groups: dict[bytes, list[QueryReply]] = {}
        self.ignored = 0

    def add(self, reply: QueryReply) -> QueryReply | None:
        if (
            reply.query_id != self.query_id
            or reply.replica_id >= self.network.replica_count
            or reply.replica_id in self.replied
            or not self.check(self.network.replica_keys[reply.replica_id], self.domain, reply.signed_bytes(), reply.signature)
        ):
            self.ignored += 1
            return None
        self.replied.add(reply.replica_id)
        if self.counts is not None and not self.counts(reply):
            return None
        group = self.groups.setdefault(encode([reply.result, reply.error]), [])
        group.append(reply)
        if len(group) >= self.needed:
            return max(group, key=lambda item: item.height)
        return None

    @property
    def exhausted(self) -> bool:
        """Every replica answered and none of the answers can still reach the quorum."""
        return len(self.replied) >= self.network.replica_count
