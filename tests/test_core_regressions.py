"""Hand-driven schedules that once stalled correct replicas for good; each must now make progress."""

from __future__ import annotations

import itertools
from typing import Any

from core_network import Network
from test_core import (
    NETWORK,
    commit,
    new_core,
    pre_prepare,
    prepare,
    prepared_certificate,
    put,
    view_change,
)

from ledger.messages import Batch, Checkpoint, Commit, Prepare, PrePrepare, ViewChange
from ledger.transactions import Put, sign_transaction


def test_lost_view_changes_do_not_leave_replicas_waiting_forever() -> None:
    """The primary of view 1 is down; replica 0 reaches a quorum for view 1, times out and moves
    to view 2, while view-1 VIEW-CHANGEs to replicas 2 and 3 were lost. Replica 0's later message
    must still count toward their quorum, or nobody ever starts the NEW-VIEW timer."""
    network = Network()
    network.down = {1}
    network.start_view_change((0, 2, 3), 1)

    def lost(sender: int, receiver: int, message: Any) -> bool:
        return (
            isinstance(message, ViewChange)
            and message.new_view == 1
            and ((sender == 3 and receiver == 2) or (sender == 0 and receiver in (2, 3)))
        )

    while network.cores[0].view == 1:
        network.deliver(lost)
        network.tick(50)
        network.drop(lost)
    network.run(60_000)
    views = {network.cores[index].view for index in (0, 2, 3)}
    assert len(views) == 1 and views.pop() >= 2
    assert all(network.cores[index].view_active for index in (0, 2, 3))


def test_a_batch_reproposed_after_a_checkpoint_jump_is_not_garbage_collected() -> None:
    """Backups that prepared sequence 5 without reaching 'prepared' adopt a newer stable checkpoint
    while entering the new view; the batch the NEW-VIEW re-proposes must survive that clean-up."""
    network = Network()

    def checkpoints_to_one_and_two(sender: int, receiver: int, message: Any) -> bool:
        return isinstance(message, Checkpoint) and receiver in (1, 2)

    for nonce in range(4):
        network.submit(nonce)
        network.tick(10)
        for _ in range(5):
            network.deliver(checkpoints_to_one_and_two)
    assert network.heights == [4, 4, 4, 4]

    def only_the_primary_prepares(sender: int, receiver: int, message: Any) -> bool:
        return (
            (isinstance(message, PrePrepare) and receiver == 3)
            or (isinstance(message, Prepare | Commit) and receiver != 0)
            or checkpoints_to_one_and_two(sender, receiver, message)
        )

    network.submit(4)
    network.tick(10)
    for _ in range(5):
        network.deliver(only_the_primary_prepares)
    assert 5 in network.cores[0].prepared and 5 not in network.cores[1].prepared
    network.start_view_change((0, 1, 2, 3), 1)
    network.deliver(only_the_primary_prepares)
    network.down = {0}  # the old primary says nothing more
    network.run(60_000)
    for index in (1, 2, 3):
        assert network.cores[index].height == 5, f"replica {index} stalled at {network.cores[index].height}"


def test_a_new_primary_missing_batches_of_executed_blocks_still_proposes() -> None:
    """Found by the crash test (20 rounds of SIGKILL and restart, n = 4): a replica that caught
    blocks up by fetching them never held their batches, and a NEW-VIEW re-proposing those
    executed sequences (below any stable checkpoint) left it waiting as primary for batches
    nobody would send; every new primary in turn waited so, and the network stalled for good."""
    network = Network()
    for nonce in range(3):
        network.submit(nonce)
        network.run(200)
    network.start_view_change((0, 1, 2, 3), 1)
    network.run(3000)
    primary = network.cores[1]
    assert primary.is_primary and primary.view_active
    executed = [sequence for sequence in primary.slots if sequence <= primary.height]
    assert executed  # the view starts with slots already executed here
    for sequence in executed:
        primary.slots[sequence].batch = None  # as after catching those blocks up by fetch
    transaction = sign_transaction(network.config.identity, network.client, 3, Put("key", "3"))
    for index, core in enumerate(network.cores):
        core.receive_request(transaction)
        network.collect(index)
    height_before = network.heights[1]
    network.run(3000)
    assert min(network.heights) > height_before
    assert [core.view for core in network.cores] == [1, 1, 1, 1]  # ordered by this primary, no view change


def test_a_vote_after_its_slots_quorum_is_dropped_unchecked_and_in_no_certificate() -> None:
    """A PREPARE matching a slot that already prepared, or a COMMIT matching one that already
    committed, proves nothing new: it costs no signature check (at n = 4 a third of a replica's
    vote checks each block) and is kept apart from the votes that count, so even a forged one
    cannot reach a certificate.
    A vote before the quorum is still checked: a forged one is refused as before."""
    network = Network()
    network.submit(0)
    late = {}

    def hold_replica_3s_votes_to_1(sender: int, receiver: int, message: Any) -> bool:
        if sender == 3 and receiver == 1 and isinstance(message, Prepare | Commit):
            late[type(message)] = message
            return True
        return False

    for _ in range(10):
        network.tick(10)
        network.deliver(hold_replica_3s_votes_to_1)
    assert network.heights[1] == 1 and set(late) == {Prepare, Commit}
    core = network.cores[1]

    def no_check(*_: Any) -> bool:
        raise AssertionError("a late vote's signature was checked")

    core.certificates.verify = no_check  # type: ignore[method-assign]
    for message in late.values():
        forged = message.__class__(message.view, message.sequence, message.digest, message.replica_id, bytes(64))
        core.receive_message(3, forged)
        core.receive_message(3, message)
    # The forged one came first: kept apart, unchecked (for evidence only); the genuine one is then a duplicate.
    assert core.late_votes == 2 and core.counters == {}
    slot = core.slots.get(1)
    assert slot is None or (3 not in slot.prepares and 3 not in slot.commits)
    assert 3 not in {replica_id for replica_id, _ in network.blocks[1][0].certificate.signatures}


def test_a_forged_vote_before_the_quorum_is_still_checked_and_refused() -> None:
    """The other side of dropping late votes unchecked: one that could count is checked."""
    network = Network()
    network.submit(0)
    network.tick(10)
    network.deliver(lambda sender, receiver, message: isinstance(message, Prepare | Commit))
    core = network.cores[1]
    pre_prepare = core.slots[1].pre_prepare
    assert pre_prepare is not None and not core.slots[1].prepared
    core.receive_message(2, Prepare(pre_prepare.view, 1, pre_prepare.digest, 2, bytes(64)))
    assert core.counters.get("bad prepare signature") == 1 and 2 not in core.slots[1].prepares and core.late_votes == 0


# Found by an adversarial review of dropping late votes: kept nowhere, a late matching vote left
# nothing for its signer's conflicting vote (or a VIEW-CHANGE certificate) to be compared with.


def prepared_backup() -> tuple[Any, bytes, bytes]:
    """Replica 1 with slot 1 prepared (its own PREPARE and replica 2's): replica 3's is late."""
    core = new_core(1)
    proposal = pre_prepare(1, (put(5),))
    core.receive_message(0, proposal)
    core.receive_message(2, prepare(1, proposal.batch.digest, replica=2))
    assert core.slots[1].prepared
    core.take_effects()
    return core, proposal.batch.digest, Batch(0, 0, 99, (put(5),)).digest


def test_a_late_prepare_then_a_conflicting_one_from_the_same_replica_is_evidence() -> None:
    """What the simulator's conflicting_votes traitor and a key run twice (twins) do once its
    status-interval retransmissions reach a peer in both versions."""
    core, digest, other = prepared_backup()
    core.receive_message(3, prepare(1, digest, replica=3))  # after the quorum
    core.receive_message(3, prepare(1, other, replica=3))  # the same replica, the same slot, another digest
    evidence = core.take_effects().evidence
    assert [item.key for item in evidence] == [(3, "prepare", 0, 1)]
    evidence[0].verify(NETWORK)


def test_a_late_commit_then_a_conflicting_one_from_the_same_replica_is_evidence() -> None:
    core, digest, other = prepared_backup()
    core.receive_message(0, commit(1, digest, replica=0))
    core.receive_message(2, commit(1, digest, replica=2))
    assert core.slots[1].committed
    core.take_effects()
    core.receive_message(3, commit(1, digest, replica=3))  # after the quorum
    core.receive_message(3, commit(1, other, replica=3))
    evidence = core.take_effects().evidence
    assert [item.key for item in evidence] == [(3, "commit", 0, 1)]
    evidence[0].verify(NETWORK)


def test_a_view_change_certificate_convicts_a_backup_whose_matching_prepare_came_late() -> None:
    """An equivocating primary plus one backup voting for both versions: the VIEW-CHANGE of a
    replica that prepared the other version carries replica 3's other PREPARE."""
    core, digest, _ = prepared_backup()
    core.receive_message(3, prepare(1, digest, replica=3))  # after the quorum
    certificate = prepared_certificate(prepare_signers=((2, 2), (3, 3)))  # BATCH_A, the other version
    assert certificate.digest != digest
    core.receive_message(2, view_change(prepared=(certificate,), replica=2, signer=2))
    keys = sorted(item.key for item in core.take_effects().evidence)
    assert keys == [(0, "pre-prepare", 0, 1), (2, "prepare", 0, 1), (3, "prepare", 0, 1)]


# From an adversarial review of keeping late votes unchecked: a forgery planted first in another
# replica's name must never frame it, never stop a slot, and cost one check at most.
def forged(message: Any) -> Any:
    return message.__class__(message.view, message.sequence, message.digest, message.replica_id, bytes(64))


def committed_backup() -> tuple[Any, bytes, bytes]:
    core, digest, other = prepared_backup()
    core.receive_message(0, commit(1, digest, replica=0))
    core.receive_message(2, commit(1, digest, replica=2))
    assert core.slots[1].committed
    core.take_effects()
    return core, digest, other


def test_fuzz_forged_votes_never_frame_an_honest_replica_and_all_evidence_verifies() -> None:
    """Every order of forged/genuine late and conflicting votes naming replicas 0,2,3 (3 is the
    only one that signs both digests): evidence only ever against 3, always verifying."""
    for kind in ("prepare", "commit"):
        make = prepare if kind == "prepare" else commit
        for names in ((2,), (3,), (0,)) if kind == "commit" else ((2,), (3,)):
            r = names[0]
            core0, digest, other = (committed_backup() if kind == "commit" else prepared_backup())
            pool = [make(1, digest, replica=r), forged(make(1, digest, replica=r)), forged(make(1, other, replica=r))]
            if r == 3:
                pool.append(make(1, other, replica=r))
            for order in itertools.permutations(pool):
                core, digest2, _ = (committed_backup() if kind == "commit" else prepared_backup())
                for message in order:
                    core.receive_message(1 if r != 1 else 2, message)
                for item in core.take_effects().evidence:
                    assert item.replica_id == 3
                    item.verify(NETWORK)


def test_a_planted_forged_late_vote_costs_one_check_not_two_per_conflicting_vote() -> None:
    """CPU: with a forged late vote held, each conflicting vote of a new digest costs two Ed25519
    checks (other succeeds and enters the memo, held fails and is never remembered as failed, the
    slot never marked reported), where a genuine held costs one check once, then nothing."""
    def run(plant_forged: bool) -> int:
        core, digest, _ = prepared_backup()
        if plant_forged:
            core.receive_message(3, forged(prepare(1, digest, replica=3)))
        else:
            core.receive_message(3, prepare(1, digest, replica=3))
        before = core.signatures.checks
        for k in range(20):
            core.receive_message(3, prepare(1, bytes([k]) * 32, replica=3))
        return core.signatures.checks - before

    genuine, planted = run(False), run(True)
    assert planted <= genuine + 1, (genuine, planted)


def test_forged_late_votes_in_every_name_never_stop_a_prepared_slot_committing() -> None:
    core, digest, other = prepared_backup()
    for r in range(4):
        core.receive_message(2, forged(prepare(1, digest, replica=r)))
        core.receive_message(2, forged(prepare(1, other, replica=r)))
    for r in (0, 2):
        core.receive_message(r, forged(commit(1, digest, replica=r)))
    assert not core.slots[1].committed
    core.receive_message(0, commit(1, digest, replica=0))
    core.receive_message(2, commit(1, digest, replica=2))
    assert core.slots[1].committed and core.height == 1
    assert all(sig != bytes(64) for _, sig in core.slots[1].prepares.items() for sig in [sig.signature])
    assert not core.take_effects().evidence


def test_a_forged_late_vote_is_counted_as_a_bad_signature_once_a_conflict_shows_it() -> None:
    """Found in a review: a forged late vote was forgotten but never counted, so an operator saw
    nothing in ledger_rejections_total. It costs no check on arrival (so it is not counted then),
    and is counted once, under the reason a forged vote refused on arrival has."""
    for kind, make in (("prepare", prepare), ("commit", commit)):
        core, digest, other = committed_backup()
        core.receive_message(2, forged(make(1, digest, replica=3)))  # late: kept unchecked, not counted
        assert core.counters == {}
        core.receive_message(3, make(1, other, replica=3))  # shows it forged
        core.receive_message(3, make(1, bytes(32), replica=3))  # nothing held any more: not counted again
        assert core.counters.get(f"bad {kind} signature") == 1, (kind, core.counters)


def test_a_planted_forged_late_vote_is_forgotten_when_a_conflict_shows_it_and_the_signers_own_takes_its_place() -> None:
    """A traitor's forgery planted first in replica 3's name hides 3's conflict only until a
    conflicting vote shows it forged: then it is forgotten, 3's own late vote is kept, and 3's
    next conflicting vote is evidence."""
    core, digest, other = prepared_backup()
    core.receive_message(2, forged(prepare(1, digest, replica=3)))  # planted by a traitor
    core.receive_message(3, prepare(1, other, replica=3))  # shows it forged: forgotten
    assert 3 not in core.slots[1].late_prepares
    core.receive_message(3, prepare(1, digest, replica=3))  # 3's own late vote, resent
    core.receive_message(3, prepare(1, other, replica=3))
    evidence = core.take_effects().evidence
    assert [item.key for item in evidence] == [(3, "prepare", 0, 1)]
    evidence[0].verify(NETWORK)


def test_a_refused_view_change_that_had_completed_the_quorum_stops_the_new_view_timer() -> None:
    """Found in a review: the NEW-VIEW timer, started once a quorum asked for a view, kept running
    when one of those VIEW-CHANGEs was later refused (its signer, a traitor, replaced it by one
    for the next view with a bad certificate). The replica then timed out alone into a view that
    no quorum had asked for. Now the timer stops until a quorum asks again."""
    core = new_core(2)
    core.receive_message(3, view_change(new_view=1, replica=3, signer=3))
    core.receive_message(0, view_change(new_view=1, replica=0, signer=0))  # f + 1 ask: 2 joins view 1
    assert core.view == 1 and not core.view_active and core.view_change_started_ms is not None
    bad_certificate = prepared_certificate(prepare_signers=((1, 1), (2, 3)))  # replica 2's PREPARE signed by 3
    core.receive_message(3, view_change(new_view=2, prepared=(bad_certificate,), replica=3, signer=3))
    assert core.counters == {"invalid view-change": 1} and 3 not in core.latest_view_changes
    assert core.view_change_started_ms is None
    core.tick(10 * NETWORK.protocol.view_change_timeout_ms)
    assert core.view == 1  # still asking for view 1, not running ahead alone
    core.receive_message(1, view_change(new_view=1, replica=1, signer=1))  # a quorum again
    assert core.view_change_started_ms is not None
