"""The seeded simulator: many seeds must keep agreement, the hash chain and exactly-once, and finish."""

from __future__ import annotations

import os

import pytest

from node.core import ReplicaCore
from node.simulator import Scenario, SimulationFailure, run_simulation

# CI runs this many seeds per replica count; `make sim SEEDS=N` runs a longer sweep.
SEEDS = int(os.environ.get("SIMULATION_SEEDS", "500"))


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
def test_the_correct_quorum_rule_is_safe_under_an_equivocating_primary(replica_count: int) -> None:
    """Safety holds; without view changes nothing commits, which is PBFT's cue to replace the primary."""
    for seed in range(5):
        scenario = Scenario.from_seed(seed, replica_count, equivocating_primary=True, require_liveness=False, time_limit_ms=3_000)
        run_simulation(scenario)


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
    """The same scenarios with the correct rule: safe even without state transfer to paper over gaps."""
    for scenario in primary_crash_scenarios(replica_count, WithoutStateTransfer):
        run_simulation(scenario)
