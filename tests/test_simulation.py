"""The seeded simulator: many seeds must keep agreement, the hash chain and exactly-once, and finish."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import pytest

from ledger.application import AccountsApplication
from ledger.messages import NewView, PreparedCertificate, PrePrepareHeader, Query, ViewChange
from ledger.transactions import Put, TransactionResult, sign_transaction
from node import simulator as simulator_module
from node.cli import main
from node.core import ReplicaCore
from node.simulator import (
    SMALL_MEMO_ENTRIES,
    Scenario,
    Simulation,
    SimulationFailure,
    memoizing_verifier,
    run_simulation,
    simulated_network,
)
from node.traitors import BehaviourSpec, TraitorContext, TraitorSpec

# CI runs this many seeds per replica count; `make sim SEEDS=N` runs a longer sweep.
SEEDS = int(os.environ.get("SIMULATION_SEEDS", "200"))


@pytest.mark.parametrize("replica_count", [4, 7])
@pytest.mark.parametrize("block", range(4))
def test_seeds_keep_safety_and_liveness(replica_count: int, block: int) -> None:
    """Each parameter runs a quarter of the seeds, so a failure names a small range."""
    share = SEEDS // 4
    for seed in range(block * share, (block + 1) * share):
        report = run_simulation(Scenario.from_seed(seed, replica_count))
        assert report.receipts == 3 * 8


def test_a_seed_replays_exactly() -> None:
    first = run_simulation(Scenario.from_seed(17, 4, loss_rate=0.1, duplicate_rate=0.1))
    second = run_simulation(Scenario.from_seed(17, 4, loss_rate=0.1, duplicate_rate=0.1))
    assert first == second
    assert first.messages_dropped > 0


def test_heavy_loss_still_finishes_after_the_network_heals() -> None:
    report = run_simulation(Scenario.from_seed(3, 4, loss_rate=0.3, duplicate_rate=0.2, faults_until_ms=5_000))
    assert report.receipts == 3 * 8


class CommitsAtFPlusOne(ReplicaCore):
    """A deliberately broken quorum rule: f + 1 votes instead of 2f + 1."""

    def __init__(self, *arguments: object, **keywords: object) -> None:
        super().__init__(*arguments, **keywords)  # type: ignore[arg-type]
        self.quorum = self.network.faults_tolerated + 1


@pytest.mark.parametrize("replica_count", [4, 7])
def test_a_broken_quorum_rule_is_caught(replica_count: int) -> None:
    """With an equivocating primary, f + 1 quorums let honest replicas commit different batches."""
    caught = 0
    for seed in range(5):
        scenario = Scenario.from_seed(
            seed,
            replica_count,
            equivocating_primary=True,
            require_liveness=False,
            core_factory=CommitsAtFPlusOne,
            time_limit_ms=3_000,
        )
        with pytest.raises(SimulationFailure, match=f"seed {seed}") as failure:
            run_simulation(scenario)
        assert "agreement" in str(failure.value) or "certificate" in str(failure.value)
        caught += 1
    assert caught == 5


@pytest.mark.parametrize("replica_count", [4, 7])
def test_the_correct_quorum_rule_replaces_an_equivocating_primary_and_finishes(replica_count: int) -> None:
    """Safety holds; the primary's two batches per slot stall view 0, the backups change view,
    and the new primary finishes every transaction."""
    for seed in range(5):
        report = run_simulation(Scenario.from_seed(seed, replica_count, equivocating_primary=True))
        assert report.view >= 1
        assert report.receipts == 3 * 8


class WithoutStateTransfer(ReplicaCore):
    """No block fetching: committed batches must survive view changes through the protocol alone."""

    def _fetch_blocks(self) -> None:
        return


class ForgetsPreparedCertificates(WithoutStateTransfer):
    """A deliberately broken view-change rule: VIEW-CHANGE messages carry no prepared certificates,
    so a new primary can hand a sequence number that some replica already committed to a new batch."""

    def _start_view_change(self, new_view: int) -> None:
        self.prepared.clear()
        super()._start_view_change(new_view)


def primary_crash_scenarios(replica_count: int, core_factory: type[ReplicaCore]) -> list[Scenario]:
    return [
        Scenario.from_seed(
            seed,
            replica_count,
            core_factory=core_factory,
            loss_rate=0.2,
            crashes=((0, 200 + seed * 13, 2_500),),
            stalls=(),
            partitions=(),
            require_liveness=False,
            time_limit_ms=6_000,
        )
        for seed in range(20)
    ]


@pytest.mark.parametrize("replica_count", [4, 7])
def test_a_broken_view_change_rule_is_caught(replica_count: int) -> None:
    caught = []
    for scenario in primary_crash_scenarios(replica_count, ForgetsPreparedCertificates):
        try:
            run_simulation(scenario)
        except SimulationFailure as failure:
            assert f"seed {scenario.seed}" in str(failure)
            assert "agreement" in str(failure) or "exactly-once" in str(failure)
            caught.append(scenario.seed)
    assert caught, "no seed exposed the broken view-change rule"


@pytest.mark.parametrize("replica_count", [4, 7])
def test_view_changes_alone_keep_committed_batches(replica_count: int) -> None:
    """The same scenarios with the correct rule: safe even without state transfer to paper over
    gaps, and the backups replace the crashed primary and confirm every transaction (the restarted
    primary alone may stay behind without block fetching, so full liveness is not required; when
    its turn as primary comes round again, one more view change is needed, so give it the time)."""
    for scenario in primary_crash_scenarios(replica_count, WithoutStateTransfer):
        report = run_simulation(dataclasses.replace(scenario, time_limit_ms=30_000))
        assert report.view >= 1
        assert report.receipts == 3 * 8


# ---- the adversarial mode: traitor replicas (node/traitors.py), torn crashes, round partitions ----

# 700 and 350, not 800 and 400 as before the rolling kills: a quarter of the seeds now run them,
# each such seed costs about 1.7 times another, and CI's time stays what it was.
ADVERSARIAL_SEEDS = {
    4: int(os.environ.get("SIMULATION_ADVERSARIAL_SEEDS_4", "700")),
    7: int(os.environ.get("SIMULATION_ADVERSARIAL_SEEDS_7", "350")),
}


@pytest.mark.parametrize("replica_count", [4, 7])
@pytest.mark.parametrize("block", range(4))
def test_adversarial_seeds_keep_every_invariant_and_finish(replica_count: int, block: int) -> None:
    share = ADVERSARIAL_SEEDS[replica_count] // 4
    failures = []
    for seed in range(block * share, (block + 1) * share):
        scenario = Scenario.from_seed(seed, replica_count, adversarial=True)
        try:
            report = run_simulation(scenario)
        except SimulationFailure as failure:
            failures.append(str(failure))
        else:
            assert report.receipts == 3 * 8
    assert not failures, "\n".join(failures)


def test_an_adversarial_seed_replays_exactly() -> None:
    first = run_simulation(Scenario.from_seed(21, 4, adversarial=True))
    second = run_simulation(Scenario.from_seed(21, 4, adversarial=True))
    assert first == second


def test_nearly_every_seed_has_a_faulty_replica() -> None:
    for adversarial in (False, True):
        scenarios = [Scenario.from_seed(seed, 4, adversarial=adversarial) for seed in range(200)]
        faulty = [s for s in scenarios if s.crashes or s.torn_crashes or s.stalls or s.partitions or s.traitors or s.late_joins]
        assert len(faulty) >= 180
    scenarios = [Scenario.from_seed(seed, 7, adversarial=True) for seed in range(200)]
    assert all(len(s.crashes + s.torn_crashes + s.stalls + s.partitions + s.traitors) <= 2 for s in scenarios)
    assert sum(1 for s in scenarios if s.traitors) >= 100


def test_fault_windows_follow_an_overridden_horizon() -> None:
    """Regression: the horizon was read before the overrides, so fault windows always ended by 3,000 ms."""
    ends = []
    for seed in range(40):
        scenario = Scenario.from_seed(seed, 4, faults_until_ms=20_000)
        for _, _, end in scenario.crashes + scenario.stalls + scenario.partitions:
            assert end <= 20_000
            ends.append(end)
    assert max(ends) > 3_000


def test_a_failure_names_its_seed_and_the_command_that_replays_it() -> None:
    with pytest.raises(SimulationFailure) as failure:
        run_simulation(Scenario.from_seed(0, 4, adversarial=True, core_factory=CommitsAtFPlusOne, equivocating_primary=True))
    text = str(failure.value)
    assert text.startswith("seed 0 (n=4)")
    assert "replay: ledger-node simulate --seed 0 --replicas 4 --adversarial" in text
    assert "traitor replica 0: equivocating_primary" in text


def test_a_torn_crash_lands_after_the_durable_write_and_before_the_sends() -> None:
    simulation = Simulation(Scenario.from_seed(1, 4, faults=False))
    primary = simulation.replicas[0]
    client = simulation.clients[0].key
    primary.core.receive_request(sign_transaction(simulation.network.identity, client, 0, Put("k", "v")))
    primary.core.tick(100)  # the batch wait is over: the primary signs and sends a pre-prepare
    primary.crash_after_write = True
    simulation.apply(0, primary)
    assert primary.crashed
    assert any(kind == "pre-prepare" for kind, _, _ in primary.records)
    assert not any(kind == "deliver" for _, _, kind, _ in simulation.queue)


@pytest.mark.parametrize("replica_count", [4, 7])
def test_torn_crashes_of_the_primary_recover(replica_count: int) -> None:
    for seed in range(5):
        # Each crash lands while the load still runs (it is done within about 200 ms of logical
        # time now that an idle primary does not wait batch_wait_ms for company).
        scenario = Scenario.from_seed(
            seed, replica_count, crashes=(), stalls=(), partitions=(), torn_crashes=((0, 50 + 25 * seed, 1_500),)
        )
        simulation = Simulation(scenario)
        report = simulation.run()
        assert report.crashes == 1 and report.receipts == 3 * 8


def test_what_an_honest_replica_sends_is_checked_not_only_what_it_persists() -> None:
    """A NEW-VIEW's pre-prepare headers are signed but never persisted as pre-prepare records."""
    simulation = Simulation(Scenario.from_seed(1, 4, faults=False))
    context = TraitorContext(simulation.network, 1, simulation.replica_keys[1], simulation.domains, random.Random(0))
    first = context.sign(PrePrepareHeader(1, 3, b"\x01" * 32, 1))
    second = context.sign(PrePrepareHeader(1, 3, b"\x02" * 32, 1))
    simulation.check_sent(1, NewView(1, (), (first,), 1))
    with pytest.raises(SimulationFailure, match="equivocation: replica 1 signed two pre-prepares"):
        simulation.check_sent(1, NewView(1, (), (second,), 1))
    unproven = context.sign(ViewChange(2, None, (PreparedCertificate(first, ()),), 1))
    with pytest.raises(SimulationFailure, match="view-change: a VIEW-CHANGE sent by replica 1 does not verify"):
        simulation.check_sent(1, unproven)


def test_a_receipt_that_contradicts_the_honest_chain_is_caught() -> None:
    simulation = Simulation(Scenario.from_seed(2, 4, faults=False))
    simulation.run()
    receipt = simulation.clients[0].receipts[0]
    simulation.check_receipt(receipt)
    with pytest.raises(SimulationFailure, match="does not match the honest chain"):
        simulation.check_receipt(dataclasses.replace(receipt, result=TransactionResult(False, "bad nonce 9, expected 0")))


def test_a_lying_block_server_is_never_believed() -> None:
    """Replica 1 is down for a while and must fetch blocks; replica 0 (the first it asks) lies
    about one block in every answer."""
    for seed, mode in enumerate(["results", "transactions", "certificate", "link", "any"]):
        liar = TraitorSpec(0, (BehaviourSpec("lying_block_server", 0, (("mode", mode),)),))
        scenario = Scenario.from_seed(seed, 4, adversarial=True, excluded=("racing_nonces",), traitors=(liar,), crashes=((1, 100, 2_500),), torn_crashes=(), stalls=(), partitions=())
        simulation = Simulation(scenario)
        simulation.run()
        assert simulation.traitor_wrappers[0].blocks_served > 0


@pytest.mark.parametrize("replica_count, side", [(4, (2, 3)), (7, (1, 2, 3))])
def test_twins_of_the_primary_stay_safe_and_are_replaced(replica_count: int, side: tuple[int, ...]) -> None:
    """Two honest instances of replica 0's key, one per side: each proposes its own batches for
    the same slots, which is equivocation by the key's owner; safety must hold and all finish."""
    for seed in range(3):
        twins = TraitorSpec(0, (BehaviourSpec("twins", 0, (("side", side),)),))
        scenario = Scenario.from_seed(seed, replica_count, adversarial=True, excluded=("racing_nonces",), traitors=(twins,), crashes=(), torn_crashes=(), stalls=(), partitions=())
        simulation = Simulation(scenario)
        report = simulation.run()
        assert report.receipts == 3 * 8
        assert simulation.twins[0].chain  # the second instance took part


def test_the_memoizing_verifier_answers_as_the_plain_one() -> None:
    verify = memoizing_verifier(4)
    key = simulated_network(1, 4, [])[1][0]
    domain, message = b"domain", b"message"
    signature = key.sign(domain, message)
    for _ in range(3):
        assert verify(key.public_key, domain, message, signature) is True
        assert verify(key.public_key, domain, message + b"!", signature) is False


def test_simulate_command_replays_an_adversarial_seed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--seed", "21", "--replicas", "4", "--adversarial"]) == 0
    assert "1/1 runs, 0 failed" in capsys.readouterr().out


# ---- known holes in node/core.py (fixed in another branch): one replaying seed each ----

NONCE_REORDER_SEED = 123  # n=4: replica 0 nonce_reorder only
HONEST_NONCE_SEED = 253  # n=4: no traitor; replica 0 crashes, clients pipeline 3 transactions
FLOOD_SEED = 282  # n=4: replica 0 view_change_flood (and forged_view_change) fails before its nonce_reorder starts


def test_hole_2_a_failed_receipt_never_comes_true_under_a_nonce_reordering_primary() -> None:
    scenario = Scenario.from_seed(NONCE_REORDER_SEED, 4, adversarial=True)
    assert any(b.name == "nonce_reorder" for spec in scenario.traitors for b in spec.behaviours)
    run_simulation(scenario)


def test_hole_2_a_failed_receipt_never_comes_true_in_an_honest_network() -> None:
    # primary_kills=(): the schedule this seed was named for, from before the rolling kills.
    scenario = Scenario.from_seed(HONEST_NONCE_SEED, 4, adversarial=True, primary_kills=())
    assert not scenario.traitors and scenario.pipeline_depth > 1
    run_simulation(scenario)


def test_hole_4_block_timestamps_stay_near_the_time() -> None:
    traitor = TraitorSpec(0, (BehaviourSpec("extreme_timestamps", 0, (("choice", "maximum"),)),))
    run_simulation(Scenario.from_seed(1, 4, adversarial=True, excluded=("racing_nonces",), traitors=(traitor,), crashes=(), torn_crashes=(), stalls=(), partitions=()))


def test_hole_6_a_view_change_flood_does_not_multiply_verification_work() -> None:
    scenario = Scenario.from_seed(FLOOD_SEED, 4, adversarial=True)
    assert any(b.name == "view_change_flood" for spec in scenario.traitors for b in spec.behaviours)
    run_simulation(scenario)


@pytest.mark.parametrize("seed, replica_count", [(346, 4), (146, 7)])
def test_hole_13_an_old_window_flood_does_not_multiply_verification_work(
    seed: int, replica_count: int
) -> None:
    """A traitor's VIEW-CHANGEs for ever later views, each with another window of genuine old
    certificates, against a 32-entry memo: these seeds failed the amplification invariant (33 and
    more checks of one signature) while VIEW-CHANGE certificates were checked on arrival."""
    scenario = Scenario.from_seed(seed, replica_count, adversarial=True)
    assert any(b.name == "old_window_flood" for spec in scenario.traitors for b in spec.behaviours)
    assert scenario.signature_memo_entries == SMALL_MEMO_ENTRIES
    run_simulation(scenario)


@pytest.mark.parametrize("seed, replica_count, behaviour", [(88, 4, "replay"), (199, 7, "twins")])
def test_hole_14_a_replayed_view_change_does_not_pull_new_view_after_new_view(
    seed: int, replica_count: int, behaviour: str
) -> None:
    """Seeds that failed the NEW-VIEW answer invariant (an honest primary answering one peer's
    VIEW-CHANGE twice within a status interval) while every copy of a VIEW-CHANGE for the active
    view was answered: a traitor replaying VIEW-CHANGEs (88), a twin's second copy (199)."""
    scenario = Scenario.from_seed(seed, replica_count, adversarial=True)
    assert any(b.name == behaviour for spec in scenario.traitors for b in spec.behaviours)
    run_simulation(scenario)


def test_hole_1_a_forged_null_batch_certificate_does_not_stall_later_views() -> None:
    """Replica 2 builds a prepared certificate for view 1's null batch from its own PREPARE and
    replica 0's (replica 3 is cut off, replica 0 stalled before), keeps its vote, the batch and its
    blocks to itself, and as primary of view 2 re-proposes that digest: the honest replicas stall."""
    forger = TraitorSpec(2, (BehaviourSpec("forged_view_change", 0, (("mode", "collected"), ("hoard", True))),))
    scenario = Scenario.from_seed(
        56,
        4,
        adversarial=True,
        excluded=("racing_nonces",),
        traitors=(forger,),
        crashes=(),
        torn_crashes=(),
        stalls=((0, 623, 946),),
        partitions=((3, 1_170, 2_541),),
        loss_rate=0.25,
        partition_rate=0.0,
        time_limit_ms=30_000,
    )
    run_simulation(scenario)


class FloorlessQuery(Query):
    """Hole 3 as it was: reads asked with no floor, so any 2f + 1 matching answers count."""

    def __init__(self, query_id: int, kind: str, argument: Any, min_height: int, nonce: bytes) -> None:
        super().__init__(query_id, kind, argument, 0, nonce)


def test_reads_keep_the_clients_own_writes_and_a_read_without_a_floor_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """After every confirmed put the simulated client reads the key back through the real read path,
    slowest replicas first, with every traitor answering the value from before the write. With the
    read floor the read always sees the write; without it (as before hole 3 was closed) some seeds
    read a value the write had replaced. Which seeds depends on the schedule (4 and 5 once; 3, 6,
    7, 14, 18 and 19 of these 20 since clients send each request to every replica), so the test
    asks for several of a range rather than for named ones."""
    seeds = range(20)
    for seed in seeds:
        run_simulation(Scenario.from_seed(seed, 4, adversarial=True))
    monkeypatch.setattr("node.simulator.Query", FloorlessQuery)
    caught = []
    for seed in seeds:
        try:
            run_simulation(Scenario.from_seed(seed, 4, adversarial=True))
        except SimulationFailure as failure:
            assert "read-your-writes" in str(failure), failure
            caught.append(seed)
    assert len(caught) >= 3, f"without the read floor only seeds {caught} read a replaced value"


def test_a_restart_rebuilds_the_core_from_the_durable_state_not_the_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """Crashes between a round's write and its sends, and plain ones: every restart reads the
    state written with the blocks and re-executes nothing (the runtime's ledger/restore.py)."""
    executed_on_start: list[int] = []
    original = simulator_module.verify_execution
    monkeypatch.setattr(simulator_module, "verify_execution", lambda application, block: (executed_on_start.append(block.height), original(application, block)))
    scenario = Scenario.from_seed(
        3, 4, crashes=((2, 300, 900),), stalls=(), partitions=(), torn_crashes=((1, 100, 700), (3, 1_000, 1_800))
    )
    simulation = Simulation(scenario)
    report = simulation.run()
    assert report.crashes == 3 and report.receipts == 3 * 8
    assert executed_on_start == []
    for replica in simulation.replicas:
        assert replica.state_height == len(replica.chain) > 0
        stored = AccountsApplication.from_entries(
            [(account, *entry) for account, entry in replica.state_accounts.items()], replica.state_values.items()
        )
        assert stored.state_digest() == replica.chain[-1].header.state_digest == replica.core.application.state_digest()


def test_a_state_write_missing_from_a_round_fails_the_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model checks what the store guarantees: a state that lags its blocks is a failure."""
    original = simulator_module.SimulatedReplica.write_state

    def first_write_only(self: simulator_module.SimulatedReplica, changes: Any, height: int) -> None:
        if self.state_height is None:
            original(self, changes, height)

    monkeypatch.setattr(simulator_module.SimulatedReplica, "write_state", first_write_only)
    scenario = Scenario.from_seed(3, 4, crashes=((2, 600, 1_200),), stalls=(), partitions=(), torn_crashes=())
    with pytest.raises(SimulationFailure, match="durable state: replica 2's stored state is at height"):
        Simulation(scenario).run()


def old_ready_to_propose(self: ReplicaCore) -> bool:
    """The rule before hole 1 of the crash test was closed: every pre-prepared slot of the view,
    executed or not, must hold its batch before the primary proposes."""
    return all(slot.batch is not None for slot in self.slots.values() if slot.pre_prepare is not None)


def test_rolling_kills_find_a_primary_waiting_for_batches_of_blocks_it_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation (Scenario.primary_kills, pre_prepare_loss_rate, checkpoint_interval) makes
    replicas catch sequences up by fetched blocks and then become primary of a view whose NEW-VIEW
    re-proposes them; the per-view liveness check (PRIMARY_IDLE_MAX_MS) fails a primary that then
    waits for batches nobody sends. Seeds of before never failed on it (the next view's primary held
    every batch), so the test asks for several of a range rather than for named ones."""
    seeds = [seed for seed in range(60, 80) if Scenario.from_seed(seed, 4).primary_kills]
    assert len(seeds) >= 4
    for seed in seeds:
        run_simulation(Scenario.from_seed(seed, 4))
    monkeypatch.setattr(ReplicaCore, "_ready_to_propose", old_ready_to_propose)
    caught = []
    for seed in seeds:
        try:
            run_simulation(Scenario.from_seed(seed, 4))
        except SimulationFailure as failure:
            assert "liveness: honest primary" in str(failure), failure
            caught.append(seed)
    assert len(caught) >= 2, f"with the old rule only seeds {caught} of {seeds} failed"
