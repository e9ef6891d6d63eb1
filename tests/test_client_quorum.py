"""Sans-IO tests of the client's quorum logic: reply and query quorums, and the read floor."""

from __future__ import annotations

import dataclasses

from client.quorum import ReplyQuorum
from ledger.crypto import PublicKeyCache, signing_domain
from ledger.messages import Reply
from ledger.transactions import TransactionResult
from node.simulator import _key, simulated_network

SEED = 77
NETWORK, REPLICA_KEYS = simulated_network(SEED, 4, [_key(SEED, "client", 0)])
SIGNATURES = PublicKeyCache()
TRANSACTION_ID = bytes(range(32))
BLOCK_HASH = bytes(range(32, 64))
FORGED_SIGNATURE = bytes(64)


def signed_reply(replica_id: int, height: int = 5, reason: str = "") -> Reply:
    unsigned = Reply(replica_id, 0, TRANSACTION_ID, TransactionResult(not reason, reason), height, BLOCK_HASH, 0)
    domain = signing_domain(NETWORK.network_id, "reply")
    return dataclasses.replace(unsigned, signature=REPLICA_KEYS[replica_id].sign(domain, unsigned.signed_bytes()))


def within_replica_count(quorum: ReplyQuorum) -> bool:
    """At most one group per verified replica, and one stored reply per replica (verified or not)."""
    replies = sum(len(group) for group in quorum.groups.values()) + len(quorum.unverified)
    return len(quorum.groups) <= NETWORK.replica_count and replies <= NETWORK.replica_count


def test_forged_reply_flood_keeps_reply_quorum_memory_bounded_by_replica_count() -> None:
    quorum = ReplyQuorum(NETWORK, TRANSACTION_ID, SIGNATURES.verify)
    for number in range(100_000):
        replica_id = number % NETWORK.replica_count
        forged = Reply(replica_id, 0, TRANSACTION_ID, TransactionResult(False, f"forged {number}"), 5, BLOCK_HASH, 0, FORGED_SIGNATURE)
        assert quorum.add(forged) is None
        assert within_replica_count(quorum)
    # The flood held no replica's place: f + 1 genuine matching replies still make the receipt.
    receipt = None
    for replica_id in range(NETWORK.reply_quorum):
        receipt = quorum.add(signed_reply(replica_id))
    assert receipt is not None and receipt.height == 5
    assert receipt.replicas == tuple(range(NETWORK.reply_quorum))
    assert within_replica_count(quorum)
