"""Hand-driven schedules that once stalled correct replicas for good; each must now make progress."""

from __future__ import annotations

from typing import Any

from core_network import Network

from ledger.messages import Checkpoint, Commit, Prepare, PrePrepare, ViewChange
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
    vote checks each block) and is not kept, so even a forged one cannot reach a certificate.
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
    assert core.late_votes == 4 and core.counters == {}
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
