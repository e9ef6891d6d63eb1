"""Traitor behaviours: what they send is validly signed by the traitor's real key, yet breaks the protocol."""

from __future__ import annotations

import random

import pytest

from ledger.blocks import verify_block_contents
from ledger.crypto import signing_domain, verify_signature
from ledger.messages import Batch, BatchContent, Commit, NewView, Prepare, PrePrepare, ViewChange
from ledger.transactions import Put, sign_transaction
from node.core import Send
from node.new_view import NULL_BATCH
from node.simulator import Scenario, Simulation, _key, simulated_network
from node.traitors import (
    BEHAVIOURS,
    SIGNED_KINDS,
    BehaviourSpec,
    Traitor,
    TraitorContext,
    TraitorSpec,
    make_behaviour,
    make_traitor,
)

SEED = 11
CLIENT = _key(SEED, "client", 0)
NETWORK, KEYS = simulated_network(SEED, 4, [CLIENT])
DOMAINS = {kind: signing_domain(NETWORK.network_id, kind) for kind in ("pre-prepare", "prepare", "commit", "checkpoint", "view-change", "reply")}


def context(replica_id: int = 0, now_ms: int = 1_000) -> TraitorContext:
    return TraitorContext(NETWORK, replica_id, KEYS[replica_id], DOMAINS, random.Random(1), now_ms)


def traitor(name: str, replica_id: int = 0, start_ms: int = 0, **parameters: object) -> Traitor:
    spec = TraitorSpec(replica_id, (BehaviourSpec(name, start_ms, tuple(parameters.items())),))
    traitor = make_traitor(spec, NETWORK, KEYS[replica_id], DOMAINS, SEED)
    return traitor


def validly_signed(message: object) -> bool:
    kind = SIGNED_KINDS[type(message)]
    replica_id = message.replica_id  # type: ignore[attr-defined]
    return verify_signature(KEYS[replica_id].public_key, DOMAINS[kind], message.signed_bytes(), message.signature)  # type: ignore[attr-defined]


def signed_pre_prepare(view: int = 0, sequence: int = 1, nonces: tuple[int, ...] = (0, 1), timestamp_ms: int = 500) -> PrePrepare:
    transactions = tuple(sign_transaction(NETWORK.network_id, CLIENT, nonce, Put("k", f"v{nonce}")) for nonce in nonces)
    return context(NETWORK.primary(view)).sign(PrePrepare(view, sequence, Batch(view, NETWORK.primary(view), timestamp_ms, transactions), NETWORK.primary(view)))


def signed_vote(kind: type[Prepare] | type[Commit], replica_id: int, digest: bytes, view: int = 0, sequence: int = 1) -> Prepare | Commit:
    return context(replica_id).sign(kind(view, sequence, digest, replica_id))


def votes_per_slot(sends: list[Send]) -> dict[tuple[int, int], set[bytes]]:
    slots: dict[tuple[int, int], set[bytes]] = {}
    for send in sends:
        message = send.message
        digest = message.batch.digest if isinstance(message, PrePrepare) else message.digest
        slots.setdefault((message.view, message.sequence), set()).add(digest)
    return slots


def test_every_named_behaviour_can_be_built_from_its_spec() -> None:
    for name in BEHAVIOURS:
        assert make_behaviour(BehaviourSpec(name)).name == name
    with pytest.raises(ValueError, match="unknown traitor behaviour"):
        make_behaviour(BehaviourSpec("polite"))


def test_a_behaviour_is_inactive_before_its_start_time() -> None:
    prepare = signed_vote(Prepare, 1, b"\x01" * 32)
    late = traitor("other_digest", replica_id=1, start_ms=2_000, rate=1.0)
    assert late.send([Send(None, prepare)], now_ms=1_999) == [Send(None, prepare)]
    after = late.send([Send(None, prepare)], now_ms=2_000)
    assert after[0].message.digest != prepare.digest and validly_signed(after[0].message)


def test_off_by_one_re_signs_view_and_sequence() -> None:
    prepare = signed_vote(Prepare, 1, b"\x01" * 32, view=3, sequence=5)
    for target, expected in (("view", (4, 5)), ("sequence", (3, 6))):
        sent = traitor("off_by_one", replica_id=1, target=target, delta=1, rate=1.0).send([Send(None, prepare)], 0)
        message = sent[0].message
        assert (message.view, message.sequence) == expected and validly_signed(message)
    pre_prepare = signed_pre_prepare(view=0)
    shifted = traitor("off_by_one", target="view", delta=1, rate=1.0).send([Send(None, pre_prepare)], 0)[0].message
    assert shifted.view == 1 and shifted.batch.view == 1 and validly_signed(shifted)


def test_other_digest_pre_prepares_and_votes_for_batches_never_proposed() -> None:
    pre_prepare = signed_pre_prepare()
    commit = signed_vote(Commit, 0, pre_prepare.batch.digest)
    sent = traitor("other_digest", rate=1.0).send([Send(None, pre_prepare), Send(None, commit)], 0)
    assert sent[0].message.batch.digest != pre_prepare.batch.digest and validly_signed(sent[0].message)
    assert sent[1].message.digest not in (pre_prepare.batch.digest, commit.digest) and validly_signed(sent[1].message)


def test_conflicting_votes_send_two_digests_for_one_slot_to_different_peers() -> None:
    prepare = signed_vote(Prepare, 1, b"\x02" * 32)
    sent = traitor("conflicting_votes", replica_id=1, rate=1.0).send([Send(None, prepare)], 0)
    assert {send.to for send in sent} == {0, 2, 3}
    assert len(votes_per_slot(sent)[(0, 1)]) == 2
    assert all(validly_signed(send.message) for send in sent)


def test_equivocating_primary_sends_two_batches_for_one_slot() -> None:
    pre_prepare = signed_pre_prepare()
    sent = traitor("equivocating_primary").send([Send(None, pre_prepare)], 0)
    assert {send.to for send in sent} == {1, 2, 3}
    assert len(votes_per_slot(sent)[(0, 1)]) == 2
    assert all(validly_signed(send.message) for send in sent)
    again = traitor("equivocating_primary").send([Send(None, pre_prepare)], 0)
    assert [send.message for send in again] == [send.message for send in sent]  # retransmissions stay consistent


def test_replay_re_sends_an_old_message() -> None:
    replayer = traitor("replay", replica_id=1, rate=1.0, source="received")
    old = signed_vote(Prepare, 2, b"\x03" * 32)
    replayer.receive(2, old, 0)
    sent = replayer.send([], 10)
    assert [send.message for send in sent] == [old] and sent[0].to != 1


def test_withhold_is_silent_to_chosen_peers_and_serves_them_no_blocks() -> None:
    prepare = signed_vote(Prepare, 1, b"\x04" * 32)
    silent = traitor("withhold", replica_id=1, peers=(0, 2), kinds=())
    assert [send.to for send in silent.send([Send(None, prepare)], 0)] == [3]
    assert silent.serve_blocks(2, ("block",), 0) == ()  # type: ignore[arg-type]
    assert traitor("withhold", replica_id=1, peers=(), kinds=("Commit",)).send([Send(None, prepare)], 0) != []


def test_delay_holds_sends_back() -> None:
    prepare = signed_vote(Prepare, 1, b"\x05" * 32)
    delayer = traitor("delay", replica_id=1, rate=1.0, delay_ms=300)
    assert delayer.send([Send(None, prepare)], 100) == []
    assert delayer.send([], 399) == []
    assert delayer.send([], 400) == [Send(None, prepare)]


def test_forged_view_change_carries_a_null_batch_certificate_built_from_honest_prepares() -> None:
    """Hole 1's setting: the traitor (replica 2) saw view 1's NEW-VIEW assign null(1) to sequence 3
    and the honest PREPAREs for it; its VIEW-CHANGE for view 2 carries that certificate."""
    empty = NULL_BATCH
    header = context(1).sign(PrePrepare(1, 3, empty, 1)).header
    forger = traitor("forged_view_change", replica_id=2, mode="collected")
    forger.receive(1, NewView(1, (), (header,), 1), 0)
    for replica_id in (0, 3):
        forger.receive(replica_id, signed_vote(Prepare, replica_id, empty.digest, view=1, sequence=3), 0)
    honest = context(2).sign(ViewChange(2, None, (), 2))
    sent = forger.send([Send(None, honest)], 0)
    view_change = sent[0].message
    assert validly_signed(view_change)
    [certificate] = view_change.prepared
    assert (certificate.view, certificate.sequence, certificate.digest) == (1, 3, empty.digest)
    assert certificate.pre_prepare == header
    for replica_id, signature in certificate.prepares:
        vote = Prepare(1, 3, empty.digest, replica_id)
        assert verify_signature(KEYS[replica_id].public_key, DOMAINS["prepare"], vote.signed_bytes(), signature)
    # It hoards: its own vote for the null batch (so honest replicas may never prepare it), the
    # certified batch itself (as content or in its own pre-prepare), and its blocks.
    own = signed_vote(Prepare, 2, empty.digest, view=1, sequence=3)
    assert forger.send([Send(None, own)], 0) == []
    assert forger.send([Send(0, BatchContent(empty))], 0) == []
    assert forger.send([Send(None, context(2).sign(PrePrepare(2, 3, empty, 2)))], 0) == []
    assert forger.serve_blocks(0, ("block",), 0) == ()  # type: ignore[arg-type]


def test_view_change_flood_re_signs_ever_higher_views() -> None:
    flooder = traitor("view_change_flood", replica_id=1, burst=3, rate=1.0)
    own = context(1).sign(ViewChange(1, None, (), 1))
    sent = flooder.send([Send(None, own)], 0) + flooder.send([], 5)
    views = [send.message.new_view for send in sent]
    assert views == [1, 2, 3, 4, 5, 6, 7]
    assert all(validly_signed(send.message) for send in sent)


def test_nonce_reorder_orders_a_later_nonce_first_then_proposes_it_again() -> None:
    reorderer = traitor("nonce_reorder", repeats=1)
    first = reorderer.send([Send(None, signed_pre_prepare(sequence=1, nonces=(0, 1)))], 0)[0].message
    assert [transaction.nonce for transaction in first.batch.transactions] == [1, 0] and validly_signed(first)
    later = reorderer.send([Send(None, signed_pre_prepare(sequence=2, nonces=(2,)))], 10)[0].message
    assert [transaction.nonce for transaction in later.batch.transactions] == [2, 1] and validly_signed(later)


@pytest.mark.parametrize("choice, expected", [("zero", 0), ("maximum", 2**63 - 1), ("future", 1_000 + 10**12)])
def test_extreme_timestamps_re_sign_the_batch(choice: str, expected: int) -> None:
    sent = traitor("extreme_timestamps", choice=choice).send([Send(None, signed_pre_prepare())], 1_000)[0].message
    assert sent.batch.timestamp_ms == expected and validly_signed(sent)


def test_lying_block_server_alters_what_it_serves() -> None:
    simulation = Simulation(Scenario.from_seed(2, 4, faults=False))
    simulation.run()
    blocks = tuple(simulation.replicas[1].chain[:4])
    for mode in ("results", "transactions", "certificate", "link"):
        served = traitor("lying_block_server", replica_id=1, mode=mode).serve_blocks(2, blocks, 0)
        assert served != blocks and len(served) == len(blocks)
    lie = traitor("lying_block_server", replica_id=1, mode="results").serve_blocks(2, blocks[:1], 0)[0]
    verify_block_contents(lie)  # consistent on its face: only re-execution can tell
    assert lie.header.state_digest != blocks[0].header.state_digest


def test_twins_name_their_side() -> None:
    assert traitor("twins", side=(1, 2)).twin_side == (1, 2)
    assert traitor("replay").twin_side is None
