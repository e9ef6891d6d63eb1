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
        self.replied: set[int] = set()
        self.groups: dict[tuple[Any, ...], list[Reply]] = {}
        self.ignored = 0

    def add(self, reply: Reply) -> Receipt | None:
        if (
            reply.transaction_id != self.transaction_id
            or reply.replica_id >= self.network.replica_count
            or reply.replica_id in self.replied
            or not self.check(self.network.replica_keys[reply.replica_id], self.domain, reply.signed_bytes(), reply.signature)
        ):
            self.ignored += 1
            return None
        self.replied.add(reply.replica_id)
        group = self.groups.setdefault(reply.matching_key(), [])
        group.append(reply)
        if len(group) < self.network.reply_quorum:
            return None
        return Receipt(
            reply.transaction_id,
            reply.result,
            reply.height,
            reply.block_hash,
            reply.index,
            tuple(sorted(r.replica_id for r in group)),
            max(r.view for r in group),
        )


class QueryQuorum:
    """Collects signed QUERY-REPLYs until a quorum of replicas give the same answer.

    Reads are not ordered, so replicas at different heights may differ; the caller retries
    when every replica answered and no answer reached the quorum.
    """

    def __init__(self, network: NetworkConfig, query_id: int, needed: int | None = None, check: SignatureCheck = verify_signature) -> None:
        self.network = network
        self.query_id = query_id
        self.needed = needed if needed is not None else network.quorum
        self.check = check
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
        group = self.groups.setdefault(encode([reply.result, reply.error]), [])
        group.append(reply)
        if len(group) >= self.needed:
            return max(group, key=lambda item: item.height)
        return None

    @property
    def exhausted(self) -> bool:
        """Every replica answered and none of the answers can still reach the quorum."""
        return len(self.replied) >= self.network.replica_count
