"""Attacks a replica holding its own valid key (or a hostile client) could make on the core; each
test reproduced its hole before the fix, driving `ReplicaCore` directly."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest
from core_network import Network

from client.quorum import ReplyQuorum
from ledger.application import is_deferred, is_replay
from ledger.crypto import PublicKeyCache, SigningKey
from ledger.messages import (
    Batch,
    BatchContent,
    Commit,
    FetchBatch,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Request,
    ViewChange,
)
from ledger.transactions import Put, Transaction, sign_transaction
from node.core import ReplicaCore
from node.new_view import NULL_BATCH
from node.requests import RequestQueue


def test_a_reproposed_null_batch_of_an_earlier_view_is_found_and_committed() -> None:
    """Hole 1: a replica prepared view 1's null batch at sequence 1 while the PREPAREs to everyone
    else were lost; its VIEW-CHANGE carries that certificate into view 2, whose NEW-VIEW re-proposes
    null(1). Only the current view's null batch used to be recognised, so every replica committed
    sequence 1 and then asked for its content forever, in every later view too."""
    network = Network()
    first = network.submit(0)
    network.tick(10)  # the primary proposes it at sequence 1

    # Sequence 1 reaches nobody; then the primary proposes a second batch at sequence 2.
    network.drop(lambda sender, receiver, message: isinstance(message, PrePrepare) and message.sequence == 1)
    network.cores[0].receive_request(sign_transaction(network.config.identity, network.other, 0, Put("key", "other")))
    network.collect(0)
    network.tick(10)

    def sequence_two_prepares_only(sender: int, receiver: int, message: Any) -> bool:
        return isinstance(message, Commit) or (isinstance(message, PrePrepare | Prepare) and message.sequence == 1)

    for _ in range(5):
        network.deliver(sequence_two_prepares_only)
    assert all(2 in network.cores[index].prepared for index in range(3))
    assert not any(1 in network.cores[index].prepared for index in range(3))

    # View 1: sequence 1 becomes null(1); its PREPAREs reach only replica 3, which alone prepares it.
    network.start_view_change((0, 1, 2, 3), 1)
    null_one = NULL_BATCH.digest

    def null_prepares_only_to_three(sender: int, receiver: int, message: Any) -> bool:
        late = isinstance(message, Prepare | Commit) and message.sequence == 1 and message.view == 1
        return (late and receiver != 3) or (isinstance(message, Commit) and message.view == 1)

    for _ in range(6):
        network.deliver(null_prepares_only_to_three)
    assert all(network.cores[index].view == 1 and network.cores[index].view_active for index in range(3))
    assert network.cores[3].prepared[1].certificate.digest == null_one
    assert not any(1 in network.cores[index].prepared and network.cores[index].prepared[1].certificate.view == 1 for index in range(3))

    # View 2 re-proposes null(1) at sequence 1 (replica 3's VIEW-CHANGE is among the quorum the
    # new primary uses); everyone must find the batch and move on.
    network.start_view_change((1, 2, 3), 2)
    network.deliver()
    assert any(header.digest == null_one for header in network.cores[2].new_view.pre_prepares)
    network.down = {3}  # a traitor would never serve that batch's content: nobody else holds it
    network.run(20_000)
    for index in range(3):
        core = network.cores[index]
        assert core.view == 2 and core.view_active
        assert core.height >= 2, f"replica {index} stalled at height {core.height}"
        assert null_one not in core.missing_batches
    # The first transaction never made it into a block; offered again, it executes.
    network.cores[2].receive_request(first)
    network.collect(2)
    network.run(5_000)
    assert all(network.cores[index].application.account(network.client.public_key).nonce == 1 for index in range(3))


def resigned(message: ViewChange, new_view: int, key: SigningKey, domain: bytes) -> ViewChange:
    unsigned = dataclasses.replace(message, new_view=new_view, signature=b"")
    return dataclasses.replace(unsigned, signature=key.sign(domain, unsigned.signed_bytes()))


def test_a_resigned_view_change_flood_costs_one_check_per_copy() -> None:
    """Hole 6: a traitor re-signs one VIEW-CHANGE with new_view 1, 2, 3, ...; each copy made every
    replica re-verify every certificate inside (72 ms per 31 KB message at n=4). Each certificate
    must cost its Ed25519 checks once, whatever carries it."""
    network = Network()
    for nonce in range(3):
        network.submit(nonce)
        network.tick(10)
        for _ in range(4):
            network.deliver()
    assert network.heights == [3, 3, 3, 3]
    traitor = network.cores[3]
    traitor._start_view_change(1)
    [genuine] = [send.message for send in traitor.take_effects().send if isinstance(send.message, ViewChange)]
    assert len(genuine.prepared) == 3

    checks = 0
    verifier = PublicKeyCache()

    def counting(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
        nonlocal checks
        checks += 1
        return verifier.verify(public_key, domain, message, signature)

    victim = ReplicaCore(network.config, 0, network.keys[0], network.cores[0].application, 3, network.cores[0].last_block_hash, check_signature=counting)
    copies = 40
    for new_view in range(1, copies + 1):
        victim.receive_message(3, resigned(genuine, new_view, network.keys[3], traitor.domains["view-change"]))
    assert victim.latest_view_changes[3].new_view == copies
    certificate_signatures = sum(1 + len(certificate.prepares) for certificate in genuine.prepared)
    # One check per copy for its own signature, plus each certificate signature once.
    assert checks <= copies + certificate_signatures, checks


def signed_pre_prepare(network: Network, sequence: int, transactions: tuple[Transaction, ...], view: int = 0, timestamp_ms: int = 1) -> PrePrepare:
    primary = network.config.primary(view)
    unsigned = PrePrepare(view, sequence, Batch(view, primary, timestamp_ms, transactions), primary)
    return dataclasses.replace(unsigned, signature=network.keys[primary].sign(network.cores[primary].domains["pre-prepare"], unsigned.signed_bytes()))


def traitor_primary_proposes(network: Network, pre_prepares: list[PrePrepare]) -> None:
    """Replica 0 is the traitor: its own core stays out, its signed pre-prepares reach the rest."""
    network.down = {0}
    for pre_prepare in pre_prepares:
        for index in (1, 2, 3):
            network.cores[index].tick(network.now_ms)
            network.cores[index].receive_message(0, pre_prepare)
            network.collect(index)
    network.run(2_000)


def test_a_failed_receipt_never_comes_true_later() -> None:
    """Hole 2: a traitor primary orders a client's nonce-1 transaction before its nonce-0 one, so
    every honest replica signed "failed: bad nonce" (an f+1 proof that it failed); then it orders
    it again and it executes. A result signed by f+1 replicas must be final."""
    network = Network()
    first = sign_transaction(network.config.identity, network.client, 0, Put("key", "first"))
    second = sign_transaction(network.config.identity, network.client, 1, Put("key", "second"))
    traitor_primary_proposes(
        network,
        [signed_pre_prepare(network, 1, (second,)), signed_pre_prepare(network, 2, (first,)), signed_pre_prepare(network, 3, (second,))],
    )
    assert [network.cores[index].height for index in (1, 2, 3)] == [3, 3, 3]
    outcomes: dict[bytes, set[tuple[bool, int]]] = {}
    for reply in network.replies:
        outcomes.setdefault(reply.transaction_id, set()).add((reply.result.ok, reply.height))
    # Every honest replica signed one outcome per transaction, and the second one executed.
    assert outcomes[second.transaction_id] == {(True, 3)}
    assert outcomes[first.transaction_id] == {(True, 2)}
    quorum = ReplyQuorum(network.config, second.transaction_id)
    receipts = [receipt for reply in network.replies if (receipt := quorum.add(reply)) is not None]
    assert receipts and all(receipt.result.ok for receipt in receipts)
    assert network.cores[1].application.account(network.client.public_key).nonce == 2


def test_deferred_and_replayed_entries_have_no_leaf_under_any_signed_batch_reply() -> None:
    """One batch reply signs a whole block, so its tree must leave out the entries that get no
    reply: block 1 holds a deferred entry beside an executed one, block 3 only a replay. Every
    honest batch reply covers the executed entry alone, and no path, position or relabelling of
    an honest reply makes f + 1 of them vouch for the deferred "failure"."""
    network = Network()
    first = sign_transaction(network.config.identity, network.client, 0, Put("key", "first"))
    second = sign_transaction(network.config.identity, network.client, 1, Put("key", "second"))
    traitor_primary_proposes(
        network,
        [signed_pre_prepare(network, 1, (second, first)), signed_pre_prepare(network, 2, (second,)), signed_pre_prepare(network, 3, (first,))],
    )
    assert [network.cores[index].height for index in (1, 2, 3)] == [3, 3, 3]
    block_one = network.blocks[1][0]
    assert is_deferred(block_one.results[0]) and block_one.results[1].ok and is_replay(network.blocks[1][2].results[0])
    by_height: dict[int, list[Any]] = {}
    for reply in network.replies:
        by_height.setdefault(reply.height, []).append(reply)
    assert sorted(by_height) == [1, 2]  # the replay's block 3 gets no reply at all
    assert {(reply.transaction_id, reply.index, reply.batch.leaf_count) for reply in by_height[1]} == {(first.transaction_id, 1, 1)}
    # Asked again (a retransmission answered from the store): the deferred entry still gets nothing.
    assert network.cores[1].signed_reply(block_one, 0) is None
    assert network.cores[1].signed_reply(network.blocks[1][2], 0) is None
    assert network.cores[1].signed_reply(block_one, 1) in by_height[1]
    quorum = ReplyQuorum(network.config, second.transaction_id)
    for reply in by_height[1]:
        # The honest signature and path, relabelled as the deferred entry (the tree's only leaf is `first`).
        forged = dataclasses.replace(reply, transaction_id=second.transaction_id, result=block_one.results[0], index=0)
        assert quorum.add(forged) is None
    assert quorum.replied == set()
    receipts = [receipt for reply in network.replies if (receipt := quorum.add(reply)) is not None]
    assert receipts and {(receipt.height, receipt.result.ok) for receipt in receipts} == {(2, True)}


def test_a_relayed_reordering_by_a_traitor_backup_cannot_fail_a_transaction_either() -> None:
    """Hole 2, second form: a traitor backup hands an honest primary the nonce-1 transaction first."""
    network = Network()
    first = sign_transaction(network.config.identity, network.client, 0, Put("key", "first"))
    second = sign_transaction(network.config.identity, network.client, 1, Put("key", "second"))
    network.cores[0].receive_message(3, Request(second))
    network.collect(0)
    network.tick(10)
    network.deliver()
    network.cores[0].receive_request(first)
    network.collect(0)
    network.run(3_000)
    assert {reply.result.ok for reply in network.replies if reply.transaction_id == second.transaction_id} <= {True}
    # The client retransmits what it has no receipt for; it then executes once.
    network.cores[0].receive_request(second)
    network.collect(0)
    network.run(3_000)
    results = {(reply.result.ok, reply.height) for reply in network.replies if reply.transaction_id == second.transaction_id}
    assert len(results) == 1 and next(iter(results))[0]


def test_an_honest_primary_orders_each_senders_requests_by_nonce_within_a_batch() -> None:
    """Requests that arrive out of order share a batch in nonce order, so none is deferred."""
    network = Network()
    later = sign_transaction(network.config.identity, network.client, 1, Put("key", "later"))
    earlier = sign_transaction(network.config.identity, network.client, 0, Put("key", "earlier"))
    other = sign_transaction(network.config.identity, network.other, 0, Put("other", "x"))
    for transaction in (later, other, earlier):
        network.cores[0].receive_request(transaction)
    network.collect(0)
    network.run(1_000)
    assert network.cores[1].height == 1
    assert {(reply.transaction_id, reply.result.ok) for reply in network.replies} == {
        (transaction.transaction_id, True) for transaction in (later, other, earlier)
    }


NOW_MS = 1_700_000_000_000


@pytest.mark.parametrize(
    "timestamp_ms",
    [0, 2**63 - 1, NOW_MS - 3_000_000, NOW_MS + 3_000_000, NOW_MS - 1_000],
    ids=["zero", "largest", "far past", "far future", "before the previous block"],
)
def test_a_pre_prepare_with_an_implausible_timestamp_is_refused(timestamp_ms: int) -> None:
    """Hole 4: block timestamps were whatever the primary said (0 and 2**63 - 1 were committed).
    Backups refuse a stamp further than clock_skew_max_ms from their clock, or before a block
    they already hold; the last case is within the skew, so only the order catches it."""
    network = Network()
    assert network.config.protocol.clock_skew_max_ms > 3_000
    network.tick(NOW_MS)
    first = sign_transaction(network.config.identity, network.client, 0, Put("key", "first"))
    traitor_primary_proposes(network, [signed_pre_prepare(network, 1, (first,), timestamp_ms=NOW_MS)])
    assert [network.cores[index].height for index in (1, 2, 3)] == [1, 1, 1]
    second = sign_transaction(network.config.identity, network.client, 1, Put("key", "second"))
    refused_before = network.cores[1].counters.get("invalid batch", 0)
    traitor_primary_proposes(network, [signed_pre_prepare(network, 2, (second,), timestamp_ms=timestamp_ms)])
    assert [network.cores[index].height for index in (1, 2, 3)] == [1, 1, 1]
    assert network.cores[1].counters.get("invalid batch", 0) == refused_before + 1


def test_plausible_timestamps_are_accepted_and_never_go_back() -> None:
    network = Network()
    network.tick(NOW_MS)
    for nonce in range(3):
        network.cores[0].receive_request(sign_transaction(network.config.identity, network.client, nonce, Put("key", str(nonce))))
        network.collect(0)
        network.run(1_000)
    assert network.cores[1].height == 3
    stamps = [block.header.timestamp_ms for block in network.blocks[1]]
    assert stamps == sorted(stamps) and all(abs(stamp - NOW_MS) < 10_000 for stamp in stamps)


def test_one_lost_relay_does_not_make_a_backup_suspect_an_honest_primary() -> None:
    """Hole 10c: a request a client gave only to a backup was relayed to the primary once; if that
    one message was lost, the backup's timer expired and it voted the honest primary out."""
    network = Network()
    transaction = sign_transaction(network.config.identity, network.client, 0, Put("key", "relayed"))
    network.cores[1].receive_request(transaction)
    network.collect(1)
    relays_lost: list[int] = []

    def first_relay_lost(sender: int, receiver: int, message: Any) -> bool:
        # The backup relays it once the ordering watch sees it wait (node/ordering_monitor.py).
        if isinstance(message, Request) and not relays_lost:
            relays_lost.append(network.now_ms)
            return True
        return False

    for _ in range(3 * network.config.protocol.view_change_timeout_ms // 10):
        network.tick(10)
        network.deliver(first_relay_lost)
    assert relays_lost, "a relay was sent, and lost"
    assert all(core.view == 0 for core in network.cores)
    assert all(core.height == 1 for core in network.cores)


def test_a_traitor_relaying_a_flood_fills_only_its_own_share_of_the_queue() -> None:
    """Hole 10b: a traitor replica relaying valid requests from fresh accounts (they cost nothing)
    filled the primary's whole queue; requests honest backups relayed were refused, their timers
    expired, and the honest primary was voted out. (A small queue here; the rule is the same.)"""
    network = Network()
    primary = network.cores[0]
    primary.pending = RequestQueue(4, requests_max=80)
    primary.view_active = False  # hold proposals, so what the flood leaves waiting stays visible
    flood = [
        sign_transaction(network.config.identity, SigningKey.from_private_bytes(hashlib.sha256(b"flood %d" % index).digest()), 0, Put("spam", str(index)))
        for index in range(200)
    ]
    for transaction in flood:
        primary.receive_message(3, Request(transaction))
    assert len(primary.pending) == 80 // (2 * 4)
    assert primary.counters["relayed requests over the relayer's share"] == 190
    honest = sign_transaction(network.config.identity, network.client, 0, Put("key", "honest"))
    primary.take_effects()
    primary.receive_message(1, Request(honest))
    assert honest.transaction_id in primary.pending
    assert not primary.take_effects().request_errors


def test_one_account_cannot_queue_more_than_its_share() -> None:
    network = Network()
    core = network.cores[1]
    for nonce in range(100):
        core.receive_request(sign_transaction(network.config.identity, network.client, nonce, Put("key", str(nonce))))
    assert len(core.pending) == 64
    errors = core.take_effects().request_errors
    assert len(errors) == 36 and all(reason.startswith("replica busy") for _, reason in errors)


def test_a_traitor_stamp_hidden_from_the_next_primary_does_not_get_it_voted_out() -> None:
    """Found in review of hole 4: a traitor primary stamps a batch near the top of the allowed skew
    and hides it from the next primary; the batch prepares elsewhere and view 1 re-proposes it. The
    new primary, lacking that batch's content, stamped its first proposal with its own clock, and
    backups refused it for good ("out of order"). A new primary now proposes only once it holds
    every batch its view starts with, so it always knows the time it must not go below."""
    network = Network()
    skew = network.config.protocol.clock_skew_max_ms
    network.tick(10_000)
    traitor_transaction = sign_transaction(network.config.identity, network.other, 0, Put("traitor", "x"))
    high = signed_pre_prepare(network, 1, (traitor_transaction,), timestamp_ms=network.now_ms + skew - 1)
    network.down = {0}
    for index in (2, 3):  # hidden from replica 1, the next primary
        network.cores[index].receive_message(0, high)
        network.collect(index)
    for _ in range(2):
        network.deliver(lambda sender, receiver, message: isinstance(message, FetchBatch | BatchContent))
    assert all(1 in network.cores[index].prepared for index in (2, 3))
    honest = sign_transaction(network.config.identity, network.client, 0, Put("key", "honest"))
    for index in (1, 2, 3):
        network.cores[index].receive_request(honest)
        network.collect(index)
    network.drop(lambda sender, receiver, message: receiver == 0)
    network.start_view_change((1, 2, 3), 1)
    network.deliver()
    network.tick(10)
    for _ in range(30):
        network.tick(10)
        network.deliver()
    for index in (1, 2, 3):
        core = network.cores[index]
        assert (core.view, core.view_active) == (1, True)
        assert core.height == 2, f"replica {index} at height {core.height}: {core.counters}"
    assert "invalid batch" not in network.cores[2].counters


def test_a_client_flood_straight_to_the_primary_leaves_room_for_relays() -> None:
    """Found in review of hole 10b: a client's own requests could use the whole queue, so a hostile
    client with fresh accounts filled it and an honest backup's relay was refused anyway."""
    network = Network()
    primary = network.cores[0]
    primary.pending = RequestQueue(4, requests_max=80)
    primary.view_active = False
    accounts = [SigningKey.from_private_bytes(hashlib.sha256(b"flood account %d" % index).digest()) for index in range(2)]
    for index in range(100):
        primary.receive_request(sign_transaction(network.config.identity, accounts[index // 64], index % 64, Put("spam", str(index))))
    assert len(primary.pending) == 40
    primary.take_effects()
    honest = sign_transaction(network.config.identity, network.client, 0, Put("key", "honest"))
    primary.receive_message(1, Request(honest))
    assert honest.transaction_id in primary.pending
    assert not primary.take_effects().request_errors


def committed_network(sequences: int) -> tuple[Network, list[PreparedCertificate]]:
    """Four cores that committed `sequences` one-transaction blocks in view 0, and the prepared
    certificates replica 3 kept on the way (checkpoints garbage-collect them from its log)."""
    network = Network()
    kept: dict[int, PreparedCertificate] = {}
    for nonce in range(sequences):
        network.submit(nonce)
        network.tick(10)
        for _ in range(4):
            network.deliver()
            kept.update(
                (sequence, prepared.certificate)
                for sequence, prepared in network.cores[3].prepared.items()
            )
    assert network.heights == [sequences] * 4
    return network, [kept[sequence] for sequence in sorted(kept)]


def counting_victim(network: Network, memo_entries: int) -> tuple[ReplicaCore, list[int]]:
    """A fresh replica 0 of `network` whose every Ed25519 check is counted, with a memo of
    `memo_entries` verified signatures (the history a traitor cycles through outgrows it)."""
    checks = [0]
    verifier = PublicKeyCache()

    def counting(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
        checks[0] += 1
        return verifier.verify(public_key, domain, message, signature)

    victim = ReplicaCore(
        network.config,
        0,
        network.keys[0],
        network.cores[0].application,
        3,
        network.cores[0].last_block_hash,
        check_signature=counting,
        signature_memo_entries=memo_entries,
    )
    return victim, checks


def traitor_view_change(
    network: Network, new_view: int, prepared: tuple[PreparedCertificate, ...]
) -> ViewChange:
    """Replica 3's VIEW-CHANGE for `new_view`, signed with its own key, carrying `prepared`."""
    traitor = network.cores[3]
    unsigned = ViewChange(new_view, None, prepared, 3)
    return dataclasses.replace(
        unsigned,
        signature=network.keys[3].sign(traitor.domains["view-change"], unsigned.signed_bytes()),
    )


def test_an_old_window_flood_costs_one_check_per_view_change() -> None:
    """Hole 13: a traitor sends VIEW-CHANGEs for views 2, 3, 4, ... each carrying another slice
    of the genuine certificates it kept from history. Each was checked on arrival, and once the
    history it cycles through outgrew the signature memo every one cost every replica all its
    certificates' checks again (~388 at n = 4, L = 128), for one signature of the traitor's own.
    A VIEW-CHANGE for a view more than one ahead now costs its own signature; its certificates are
    checked when that view comes near."""
    network, history = committed_network(8)
    victim, checks = counting_victim(network, memo_entries=4)  # smaller than the 24 in history

    copies = 40
    for index in range(copies):
        # Two certificates each (6 signatures), the slices cycling through all the history.
        slice_ = (history[(2 * index) % 8], history[(2 * index + 1) % 8])
        victim.receive_message(
            3,
            traitor_view_change(
                network, 2 + index, tuple(sorted(slice_, key=lambda c: c.pre_prepare.sequence))
            ),
        )
    assert victim.latest_view_changes[3].new_view == copies + 1
    assert 3 in victim.unchecked_view_changes
    # Checked on arrival, each would have cost 1 + 2 * 3 = 7: here each costs its own signature.
    assert checks[0] == copies, checks[0]
    assert victim.counters.get("invalid view-change") is None


def test_a_far_view_change_is_checked_when_its_view_comes_near_and_refused_for_good() -> None:
    """The other half of hole 13's fix: certificates held unchecked still count for nothing until
    they hold. A forged certificate in a VIEW-CHANGE for view 2 is found once the replica moves to
    view 1; the VIEW-CHANGE is dropped, and nothing more its signer sends up to view 2 is looked at."""
    network, history = committed_network(2)
    genuine = history[0]
    forged = dataclasses.replace(
        genuine, prepares=((1, genuine.prepares[0][1]), (2, genuine.prepares[0][1]))
    )
    victim, checks = counting_victim(network, memo_entries=64)
    victim.receive_message(3, traitor_view_change(network, 2, (forged,)))
    assert victim.latest_view_changes[3].new_view == 2 and checks[0] == 1
    victim.take_effects()

    victim._start_view_change(1)
    effects = victim.take_effects()
    assert any(
        "invalid view-change" in event and "from replica 3" in event for event in effects.events
    ), effects.events
    assert 3 not in victim.latest_view_changes and 3 not in victim.unchecked_view_changes
    assert victim.counters.get("invalid view-change") == 1

    before = checks[0]
    victim.receive_message(3, traitor_view_change(network, 2, (genuine,)))
    assert checks[0] == before and 3 not in victim.latest_view_changes  # not even its signature
    victim.receive_message(3, traitor_view_change(network, 3, (genuine,)))
    assert victim.latest_view_changes[3].new_view == 3  # a later view is looked at again


def test_a_replayed_view_change_pulls_one_new_view_per_status_interval() -> None:
    """Hole 14: the primary of an active view answers a VIEW-CHANGE for that view with its NEW-VIEW
    (the asker missed it). A replay costs no check (the memo knows it) but each answer is a whole
    NEW-VIEW carrying 2f + 1 VIEW-CHANGEs: 100 replays of one made the primary send 100 NEW-VIEWs,
    about 3 times the bytes they cost the traitor here (a 357-byte VIEW-CHANGE, 1,049-byte
    NEW-VIEWs), far more when the others' VIEW-CHANGEs carry full windows and the replayed one is
    small. Now it answers each replica at most once per status interval, its retransmit interval."""
    network, _ = committed_network(8)
    network.start_view_change((1, 2, 3), 1)
    for _ in range(6):
        network.deliver()
    primary = network.cores[1]
    assert primary.view == 1 and primary.view_active and primary.new_view is not None
    asked = next(view_change for view_change in primary.new_view.view_changes if view_change.replica_id == 3)
    primary.take_effects()

    def new_views_sent() -> list[Any]:
        return [send for send in primary.take_effects().send if send.message is primary.new_view]

    answers = []
    for _ in range(100):
        primary.receive_message(3, asked)
        answers += new_views_sent()
    assert len(answers) == 1 and answers[0].to == 3
    # A replica that still asks one status interval later is answered again: a lost answer
    # costs the asker one of its retransmit intervals, never the view.
    primary.tick(primary.now_ms + primary.settings.status_interval_ms)
    primary.take_effects()
    primary.receive_message(3, asked)
    assert len(new_views_sent()) == 1
    primary.receive_message(3, asked)
    assert new_views_sent() == []
