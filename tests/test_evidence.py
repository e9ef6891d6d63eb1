"""Evidence of equivocation: the core finds it (once, bounded, only when both signatures hold), the store keeps it bounded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
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

from ledger.encoding import CodecError
from ledger.evidence import Evidence, EvidenceError
from ledger.messages import Batch, Commit, Prepare, PrePrepare
from ledger.storage import BlockStore
from node.evidence import EvidenceCollector


def proposal_at(core_id: int, sequence: int = 1) -> tuple[object, bytes, bytes]:
    """A backup that accepted the primary's PRE-PREPARE for `sequence`: (core, digest, another digest)."""
    core = new_core(core_id)
    proposal = pre_prepare(sequence, (put(0),))
    core.receive_message(0, proposal)
    core.take_effects()
    other = Batch(0, 0, 99, (put(0),)).digest
    return core, proposal.batch.digest, other


def test_two_conflicting_prepares_from_one_replica_make_one_evidence_with_both_signatures_valid() -> None:
    core, digest, other = proposal_at(1)
    core.receive_message(2, prepare(1, digest, replica=2))
    core.receive_message(2, prepare(1, other, replica=2))
    core.receive_message(2, prepare(1, other, replica=2))  # the same conflict again: nothing new
    [evidence] = core.take_effects().evidence
    assert (evidence.replica_id, evidence.kind, evidence.view, evidence.sequence) == (2, "prepare", 0, 1)
    assert {evidence.first_digest, evidence.second_digest} == {digest, other}
    assert evidence.signatures_valid(NETWORK) == (True, True)
    evidence.verify(NETWORK)
    assert Evidence.decode(evidence.encode()) == evidence
    first, second = evidence.messages()
    assert isinstance(first, Prepare) and isinstance(second, Prepare)


def test_conflicting_commits_are_evidence_too() -> None:
    core, digest, other = proposal_at(1)
    core.receive_message(3, commit(1, digest, replica=3))
    core.receive_message(3, commit(1, other, replica=3))
    [evidence] = core.take_effects().evidence
    assert evidence.key == (3, "commit", 0, 1)
    evidence.verify(NETWORK)
    assert isinstance(evidence.messages()[0], Commit)


def test_a_conflicting_pre_prepare_from_the_primary_is_evidence() -> None:
    core = new_core(1)
    first = pre_prepare(1, (put(0),), timestamp_ms=1)
    second = pre_prepare(1, (put(0),), timestamp_ms=2)
    core.receive_message(0, first)
    core.take_effects()
    core.receive_message(0, second)
    [evidence] = core.take_effects().evidence
    assert evidence.key == (0, "pre-prepare", 0, 1)
    evidence.verify(NETWORK)


def test_a_forged_second_signature_is_no_evidence() -> None:
    core, digest, other = proposal_at(1)
    core.receive_message(2, prepare(1, digest, replica=2))
    core.receive_message(3, prepare(1, other, replica=2, signer=3))  # in replica 2's name, signed by 3
    assert core.take_effects().evidence == []
    # The forgery did not use up the slot: a real conflict is still reported.
    core.receive_message(2, prepare(1, other, replica=2))
    [evidence] = core.take_effects().evidence
    evidence.verify(NETWORK)


def test_forged_pre_prepare_twin_is_no_evidence() -> None:
    core = new_core(1)
    core.receive_message(0, pre_prepare(1, (put(0),), timestamp_ms=1))
    core.take_effects()
    core.receive_message(0, pre_prepare(1, (put(0),), timestamp_ms=2, signer=2))
    assert core.take_effects().evidence == []


def test_no_evidence_against_oneself_or_from_a_duplicate() -> None:
    core, digest, other = proposal_at(1)
    own = core.slots[1].own_prepare
    assert own is not None
    core.receive_message(2, prepare(1, other, replica=1))  # "our own" vote with another digest
    core.receive_message(2, prepare(1, digest, replica=2))
    core.receive_message(2, prepare(1, digest, replica=2))
    assert core.take_effects().evidence == []


def test_a_flood_of_conflicts_stays_bounded() -> None:
    """A replica sending many conflicting votes for every slot in the window: one evidence per
    slot, and after it no more signature checks for that slot."""
    core = new_core(1)
    variants = 20
    for sequence in range(1, core.high + 1):
        proposal = pre_prepare(sequence, (put(sequence - 1),), timestamp_ms=sequence)
        core.receive_message(0, proposal)
        core.receive_message(2, prepare(sequence, proposal.batch.digest, replica=2))
    core.take_effects()
    checks_before = core.signatures.checks
    for sequence in range(1, core.high + 1):
        for variant in range(variants):
            core.receive_message(2, prepare(sequence, Batch(0, 0, 1000 + variant, (put(0),)).digest, replica=2))
    evidence = core.take_effects().evidence
    assert sorted(item.key for item in evidence) == [(2, "prepare", 0, sequence) for sequence in range(1, core.high + 1)]
    assert core.signatures.checks - checks_before == core.high  # the first conflict per slot only


def test_the_collector_remembers_a_bounded_number_of_slots_per_replica() -> None:
    collector = EvidenceCollector(1, lambda kind, message: True, keys_per_replica_max=4)
    for sequence in range(1, 50):
        held = Prepare(0, sequence, bytes([1]) * 32, 2, bytes(64))
        other = Prepare(0, sequence, bytes([2]) * 32, 2, bytes(64))
        assert collector.conflict("prepare", held, other) is not None
        assert collector.conflict("prepare", held, other) is None  # once per slot
    assert len(collector.reported[2]) == 4 and collector.found == 49
    own = Prepare(0, 1, bytes([1]) * 32, 1, bytes(64))
    assert collector.conflict("prepare", own, dataclasses.replace(own, digest=bytes([2]) * 32)) is None


def test_a_view_change_certificate_against_a_held_pre_prepare_is_evidence() -> None:
    """An equivocating primary sends each backup one version; the VIEW-CHANGE of a backup that
    prepared the other version shows it to the first."""
    core = new_core(1)
    mine = pre_prepare(1, (put(5),))
    core.receive_message(0, mine)
    core.receive_message(2, prepare(1, mine.batch.digest, replica=2))
    core.take_effects()
    certificate = prepared_certificate(prepare_signers=((2, 2), (3, 3)))  # for BATCH_A, another batch
    assert certificate.digest != mine.batch.digest
    core.receive_message(3, view_change(prepared=(certificate,)))
    evidence = core.take_effects().evidence
    assert sorted(item.key for item in evidence) == [(0, "pre-prepare", 0, 1), (2, "prepare", 0, 1)]
    for item in evidence:
        item.verify(NETWORK)


def test_a_pre_prepare_accepted_before_a_view_change_still_convicts_an_equivocating_primary() -> None:
    """The slots go when this replica joins the view change; the other version arrives after."""
    core = new_core(2)
    mine = pre_prepare(1, (put(5),))
    core.receive_message(0, mine)
    core.receive_message(0, view_change(replica=0, signer=0))
    core.receive_message(3, view_change(replica=3, signer=3))  # f + 1 ask for view 1: join them
    assert core.view == 1 and not core.view_active and not core.slots
    core.take_effects()
    certificate = prepared_certificate(prepare_signers=((1, 1), (3, 3)))
    core.receive_message(1, view_change(prepared=(certificate,), replica=1, signer=1))
    [evidence] = core.take_effects().evidence
    assert evidence.key == (0, "pre-prepare", 0, 1)
    evidence.verify(NETWORK)


@pytest.mark.parametrize("case", ["same digest", "unknown replica", "bad signature", "bad encoding"])
def test_bad_evidence_does_not_verify(case: str) -> None:
    core, digest, other = proposal_at(1)
    core.receive_message(2, prepare(1, digest, replica=2))
    core.receive_message(2, prepare(1, other, replica=2))
    [evidence] = core.take_effects().evidence
    if case == "bad encoding":
        with pytest.raises(CodecError):
            Evidence.from_plain(["vote", *evidence.to_plain()[1:]])
        return
    changed = {
        "same digest": dataclasses.replace(evidence, second_digest=evidence.first_digest),
        "unknown replica": dataclasses.replace(evidence, replica_id=7),
        "bad signature": dataclasses.replace(evidence, second_signature=evidence.first_signature),
    }[case]
    with pytest.raises(EvidenceError):
        changed.verify(NETWORK)


def made_evidence(replica_id: int, sequence: int) -> Evidence:
    first = Prepare(0, sequence, bytes([1]) * 32, replica_id, bytes(64))
    second = Prepare(0, sequence, bytes([2]) * 32, replica_id, bytes(64))
    return Evidence.of("prepare", first, second)


def test_store_keeps_evidence_bounded_per_replica_and_in_total(tmp_path: Path) -> None:
    store = BlockStore.open(tmp_path / "ledger.sqlite3", NETWORK.genesis_hash)
    try:
        new = store.add_evidence([made_evidence(1, 1), made_evidence(1, 1)], per_replica_max=5, total_max=8)
        assert new == [made_evidence(1, 1)]  # a repeat is not new
        # One traitor floods: only its own newest five are kept.
        store.add_evidence([made_evidence(1, sequence) for sequence in range(2, 40)], per_replica_max=5, total_max=8)
        assert [item.sequence for item in store.evidence(replica_id=1)] == [39, 38, 37, 36, 35]
        store.add_evidence([made_evidence(2, 1), made_evidence(3, 1)], per_replica_max=5, total_max=8)
        assert store.evidence_count() == 7
        assert {item.replica_id for item in store.evidence()} == {1, 2, 3}
        store.add_evidence([made_evidence(2, sequence) for sequence in range(2, 6)], per_replica_max=5, total_max=8)
        assert store.evidence_count() == 8  # the total bound drops the oldest overall
        assert len(store.evidence(limit=3)) == 3
    finally:
        store.close()
    reopened = BlockStore.open(tmp_path / "ledger.sqlite3", NETWORK.genesis_hash)
    try:
        assert reopened.evidence_count() == 8  # durable
    finally:
        reopened.close()


def test_pre_prepare_evidence_round_trips_as_headers() -> None:
    first = pre_prepare(1, (put(0),), timestamp_ms=1)
    second = pre_prepare(1, (put(0),), timestamp_ms=2)
    evidence = Evidence.of("pre-prepare", first.header, second.header)
    evidence.verify(NETWORK)
    assert all(not isinstance(message, PrePrepare) for message in evidence.messages())
