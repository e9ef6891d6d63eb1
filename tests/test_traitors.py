"""Traitor behaviours: what they send is validly signed by the traitor's real key, yet breaks the protocol."""

from __future__ import annotations

import random

import pytest

from client.quorum import ReplyQuorum
from ledger.application import AccountsApplication
from ledger.blocks import verify_block_contents
from ledger.crypto import signing_domain, verify_signature
from ledger.encoding import CodecError
from ledger.messages import (
    BATCH_REPLY_DOMAIN,
    MESSAGE_TYPES,
    Batch,
    BatchContent,
    Checkpoint,
    Commit,
    NewView,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    ViewChange,
    decode_message,
    make_replies,
)
from ledger.transactions import Put, TransactionResult, sign_transaction
from node.core import ReplicaCore
from node.effects import Send
from node.new_view import NULL_BATCH
from node.simulator import Scenario, Simulation, _key, simulated_network
from node.traitors import (
    BEHAVIOURS,
    RAW_FRAME_SIZE_MAX,
    SIGNED_KINDS,
    BehaviourSpec,
    RawFrame,
    Traitor,
    TraitorContext,
    TraitorSpec,
    TraitorSpecError,
    format_behaviour_spec,
    make_behaviour,
    make_traitor,
    parse_behaviour_spec,
)

SEED = 11
CLIENT = _key(SEED, "client", 0)
NETWORK, KEYS = simulated_network(SEED, 4, [CLIENT])
DOMAINS = {kind: signing_domain(NETWORK.identity, kind) for kind in ("pre-prepare", "prepare", "commit", "checkpoint", "view-change", BATCH_REPLY_DOMAIN)}


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
    transactions = tuple(sign_transaction(NETWORK.identity, CLIENT, nonce, Put("k", f"v{nonce}")) for nonce in nonces)
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


def test_old_window_flood_sends_ever_higher_views_each_with_another_window_of_genuine_evidence() -> (
    None
):
    """Hole 13's traitor: it keeps the honest signatures it saw and cycles through the windows it
    can prove, a stable checkpoint's certificate and the prepared certificates above it."""
    flooder = traitor("old_window_flood", replica_id=3, burst=3, rate=1.0)
    for sequence in (1, 2, 5, 6):
        pre_prepare = signed_pre_prepare(sequence=sequence, nonces=(sequence,))
        flooder.receive(0, pre_prepare, 0)
        for replica_id in (1, 2):
            flooder.receive(
                replica_id,
                signed_vote(Prepare, replica_id, pre_prepare.batch.digest, sequence=sequence),
                0,
            )
    for replica_id in (0, 1, 2):
        flooder.receive(
            replica_id,
            context(replica_id).sign(Checkpoint(4, b"\x07" * 32, b"\x08" * 32, replica_id)),
            0,
        )
    own = context(3).sign(ViewChange(1, None, (), 3))
    sent = flooder.send([Send(None, own)], 0) + flooder.send([], 5)
    assert sent[0].message == own
    floods = [send.message for send in sent[1:]]
    assert [view_change.new_view for view_change in floods] == [2, 3, 4, 5, 6, 7]
    assert all(validly_signed(view_change) for view_change in floods)
    windows = [
        (
            view_change.checkpoint_sequence,
            [certificate.sequence for certificate in view_change.prepared],
        )
        for view_change in floods
    ]
    assert windows == [(0, [1, 2, 5, 6]), (4, [5, 6])] * 3  # windows (0, 8] and (4, 12]
    for view_change in floods:
        for certificate in view_change.prepared:
            for replica_id, signature in certificate.prepares:
                vote = Prepare(0, certificate.sequence, certificate.digest, replica_id)
                assert verify_signature(
                    KEYS[replica_id].public_key, DOMAINS["prepare"], vote.signed_bytes(), signature
                )


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


# ---- the behaviours added for real processes, and their text form ----

OTHER_CLIENT = _key(SEED, "client", 1)


def honest_reply(replica_id: int, transaction_id: bytes = b"\x07" * 32) -> Reply:
    """Replica `replica_id`'s reply for the second of three outcomes of block 3, in one signed batch."""
    entries = [(b"\x05" * 32, TransactionResult(True), 0), (transaction_id, TransactionResult(True), 1), (b"\x06" * 32, TransactionResult(True), 2)]
    domain = DOMAINS[BATCH_REPLY_DOMAIN]
    return make_replies(replica_id, 0, 3, b"\x08" * 32, entries, lambda data: KEYS[replica_id].sign(domain, data))[1]


def test_wrong_replies_sign_lies_a_client_never_accepts() -> None:
    for mode in ("result", "height", "index", "block", "path"):
        liar = traitor("wrong_replies", replica_id=1, mode=mode)
        honest = honest_reply(1)
        lie = liar.reply(honest, 0)
        assert lie is not None and validly_signed(lie.batch)
        assert lie.matching_key() != honest.matching_key()
        # Every lie but `path` passes every check a client makes of one reply on its own.
        assert lie.path_leads_to_root() == (mode != "path"), mode
        # f + 1 = 2 must match: the lie with one honest reply is no receipt; two honest ones are.
        quorum = ReplyQuorum(NETWORK, honest.transaction_id, verify_signature)
        assert quorum.add(lie) is None
        assert quorum.add(honest_reply(2)) is None
        receipt = quorum.add(honest_reply(3))
        assert receipt is not None and receipt.result.ok and receipt.height == 3 and 1 not in receipt.replicas


def test_censoring_primary_keeps_one_clients_requests_from_its_core() -> None:
    censor = traitor("censoring_primary", replica_id=0)
    chosen = sign_transaction(NETWORK.identity, CLIENT, 0, Put("k", "v"))
    other = sign_transaction(NETWORK.identity, OTHER_CLIENT, 0, Put("k", "v"))
    assert censor.receive_request(chosen, 0) is False  # any_one: the first account it sees
    assert censor.receive_request(other, 0) is True
    assert censor.receive(2, Request(chosen), 0) is False  # relayed by a backup: dropped too
    assert censor.receive(2, signed_vote(Prepare, 2, b"\x01" * 32), 0) is True
    named = traitor("censoring_primary", account=OTHER_CLIENT.public_key.hex())
    assert named.receive_request(chosen, 0) is True and named.receive_request(other, 0) is False
    with pytest.raises(ValueError, match="account"):
        make_behaviour(BehaviourSpec("censoring_primary", 0, (("account", "abc"),)))


def test_a_censoring_primary_is_replaced_and_the_censored_client_commits() -> None:
    """PBFT's answer to censorship: the client retransmits to all, backups time out, view change."""
    scenario = Scenario(3, traitors=(TraitorSpec(0, (BehaviourSpec("censoring_primary"),)),), transactions_per_client=3)
    simulation = Simulation(scenario)
    report = simulation.run()
    assert simulation.traitor_wrappers[0].behaviours[0].censored > 0
    assert report.receipts == 9 and report.view >= 1


def test_slow_primary_holds_its_pre_prepares_just_under_the_ordering_timeout() -> None:
    """The tightest timer it must beat: the backups' ordering timer (node/ordering_monitor.py)."""
    pre_prepare = signed_pre_prepare()
    prepare = signed_vote(Prepare, 0, b"\x09" * 32)
    slow = traitor("slow_primary")
    hold_ms = int(0.9 * NETWORK.protocol.ordering_timeout_ms)
    assert slow.send([Send(None, pre_prepare), Send(2, prepare)], 100) == [Send(2, prepare)]
    assert slow.send([], 100 + hold_ms - 1) == []
    released = slow.send([], 100 + hold_ms)
    assert released == [Send(None, pre_prepare)] and validly_signed(released[0].message)
    backup_pre_prepare = context(1).sign(PrePrepare(1, 1, rebatch_view(pre_prepare.batch, 1), 1))
    assert traitor("slow_primary", replica_id=2).send([Send(None, backup_pre_prepare)], 0) == [Send(None, backup_pre_prepare)]


def rebatch_view(batch: Batch, view: int) -> Batch:
    return Batch(view, NETWORK.primary(view), batch.timestamp_ms, batch.transactions)


def backup_core() -> ReplicaCore:
    return ReplicaCore(NETWORK, 1, KEYS[1], AccountsApplication(NETWORK.genesis_balances))


def claimed_signer_verifies(message: object) -> bool:
    if type(message) not in SIGNED_KINDS:
        return False
    return validly_signed(message)


def test_malformed_sender_signatures_do_not_verify_and_an_honest_core_rejects_them() -> None:
    sender = traitor("malformed_sender", replica_id=0, rate=1.0, burst=16, kinds=("signature",))
    pre_prepare = signed_pre_prepare()
    commit = signed_vote(Commit, 0, pre_prepare.batch.digest)
    sent = sender.send([Send(None, pre_prepare), Send(None, commit)], 0)
    malformed = [send.message for send in sent[2:]]
    assert len(malformed) == 16
    assert not any(claimed_signer_verifies(message) for message in malformed)
    core = backup_core()
    for message in malformed:
        core.receive_message(0, message)
    effects = core.take_effects()
    assert not [send for send in effects.send if isinstance(send.message, Prepare | Commit)]
    assert sum(count for reason, count in core.counters.items() if "signature" in reason or "not from the primary" in reason) >= 1


def test_malformed_sender_sends_kinds_replicas_never_exchange() -> None:
    sender = traitor("malformed_sender", replica_id=0, rate=1.0, burst=16, kinds=("type",))
    malformed = [send.message for send in sender.send([], 0)]
    assert len(malformed) == 16
    core = backup_core()
    for message in malformed:
        assert type(message) in MESSAGE_TYPES.values()  # each encodes: a real process sends them as they are
        core.receive_message(0, message)
    assert core.counters["unexpected message type"] == 16
    assert not core.take_effects().send


def test_malformed_sender_raw_frames_only_where_the_host_sends_bytes_and_none_decodes() -> None:
    simulated = traitor("malformed_sender", replica_id=0, rate=1.0, burst=16, kinds=("raw",))
    assert simulated.send([], 0) == []
    spec = TraitorSpec(0, (BehaviourSpec("malformed_sender", 0, (("rate", 1.0), ("burst", 16), ("kinds", ("raw",)))),))
    real = make_traitor(spec, NETWORK, KEYS[0], DOMAINS, SEED)
    real.context.raw_frames = True
    frames = []
    for moment in range(20):
        frames.extend(real.send([Send(None, signed_vote(Commit, 0, b"\x0a" * 32))], moment)[1:])
    assert len(frames) == 20 * 16
    for send in frames:
        assert isinstance(send.message, RawFrame) and send.to in (1, 2, 3)
        assert len(send.message.payload) <= RAW_FRAME_SIZE_MAX
        with pytest.raises(CodecError):
            decode_message(send.message.payload)


def drawn_specs(count: int) -> list[BehaviourSpec]:
    specs = []
    for seed in range(count):
        for replica_count in (4, 7):
            for traitor_spec in Scenario.from_seed(seed, replica_count, adversarial=True).traitors:
                specs.extend(traitor_spec.behaviours)
    return specs


def test_every_spec_the_simulator_draws_reads_back_from_its_text() -> None:
    specs = drawn_specs(200)
    assert {spec.name for spec in specs} == set(BEHAVIOURS)
    for spec in specs:
        assert parse_behaviour_spec(format_behaviour_spec(spec)) == spec


def test_behaviour_specs_as_text() -> None:
    assert parse_behaviour_spec("withhold:peers=1+2,kinds=Commit@5000") == BehaviourSpec("withhold", 5000, (("peers", (1, 2)), ("kinds", ("Commit",))))
    assert parse_behaviour_spec("withhold:peers=3") == BehaviourSpec("withhold", 0, (("peers", (3,)),))
    assert parse_behaviour_spec("forged_view_change:hoard=false,mode=stale") == BehaviourSpec("forged_view_change", 0, (("hoard", False), ("mode", "stale")))
    assert parse_behaviour_spec("off_by_one:delta=-1,rate=1") == BehaviourSpec("off_by_one", 0, (("delta", -1), ("rate", 1.0)))
    assert format_behaviour_spec(BehaviourSpec("equivocating_primary")) == "equivocating_primary"
    assert format_behaviour_spec(BehaviourSpec("delay", 20, (("rate", 0.5),))) == "delay:rate=0.5@20"


@pytest.mark.parametrize(
    "text, message",
    [
        ("polite", "unknown behaviour 'polite'; known: censoring_primary"),
        ("withhold:peer=1", "withhold has no parameter 'peer'; its parameters: peers, kinds"),
        ("withhold:peers=one", "peers: expected a whole number, got 'one'"),
        ("withhold:kinds=commit", "kinds: 'commit' is not one of PrePrepare"),
        ("off_by_one:target=height", "target: 'height' is not one of view, sequence"),
        ("forged_view_change:hoard=yes", "hoard: expected true or false"),
        ("delay:rate=2", "a rate is from 0 to 1"),
        ("delay:rate", "expected key=value"),
        ("delay:rate=0.1,rate=0.2", "given twice"),
        ("delay@soon", "whole milliseconds"),
        ("delay@-5", "must not be negative"),
        ("censoring_primary:account=xyz", "64 hex digits"),
        ("malformed_sender:burst=100", "burst: expected 1 to 16"),
    ],
)
def test_behaviour_spec_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(TraitorSpecError) as caught:
        parse_behaviour_spec(text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_ledger_node_run_refuses_a_bad_traitor_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    for spec in ("polite", "twins"):
        with pytest.raises(SystemExit) as exited:
            main(["run", "replica-0.toml", "--traitor", spec])
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("ledger-node: argument --traitor: ") and error.count("\n") == 1


def test_checkpoints_are_among_the_messages_a_malformed_sender_corrupts() -> None:
    checkpoint = context(2).sign(Checkpoint(4, b"\x01" * 32, b"\x02" * 32, 2))
    sender = traitor("malformed_sender", replica_id=2, rate=1.0, burst=8, kinds=("signature",))
    malformed = [send.message for send in sender.send([Send(None, checkpoint)], 0)[1:]]
    assert any(isinstance(message, Checkpoint) for message in malformed)
    assert not any(claimed_signer_verifies(message) for message in malformed)
