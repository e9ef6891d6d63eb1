"""Which attack scenarios `ledger-bench --scenario` measures, and the traitor arguments it starts
replicas with (node/bench.py). No process is started here."""

from __future__ import annotations

import pytest

from node.bench import SILENT_PRIMARY, AttackRefused, attack_names, bench_attack, chosen_attacks
from node.scenarios import scenario_names


@pytest.mark.parametrize("replica_count", [4, 7])
def test_every_scenario_is_either_measured_or_skipped_with_a_reason(replica_count: int) -> None:
    attacks, skipped = chosen_attacks("all", replica_count)
    measured = {attack.name for attack in attacks}
    assert measured | set(skipped) == set(attack_names()) and not measured & set(skipped)
    assert {"equivocating-primary", "slow-primary", SILENT_PRIMARY, "wrong-replies"} <= measured
    assert all(reason for reason in skipped.values())
    faults = (replica_count - 1) // 3
    for attack in attacks:
        assert 1 <= len(attack.traitor_arguments) <= faults, attack


def test_more_than_f_traitors_are_refused_and_pointed_at_ledger_scenario() -> None:
    with pytest.raises(AttackRefused, match=r"more than f = 1: `ledger-scenario run silent-f-plus-one --replicas 4`"):
        bench_attack("silent-f-plus-one", 4)


@pytest.mark.parametrize("name", ["twins", "fork-f", "primary-killed", "lying-snapshot-server"])
def test_attacks_the_bench_cannot_stage_are_refused(name: str) -> None:
    assert name in scenario_names()
    with pytest.raises(AttackRefused):
        bench_attack(name, 4)


def test_a_scenario_traitor_runs_with_its_behaviours_and_the_scenario_seed() -> None:
    attack = bench_attack("equivocating-primary", 7)
    assert attack.traitor_arguments == (
        (0, ("--traitor", "equivocating_primary", "--traitor-seed", "1")),
        (1, ("--traitor", "equivocating_primary", "--traitor-seed", "1")),
    )
    assert bench_attack(SILENT_PRIMARY, 4).traitor_arguments == ((0, ("--traitor", "withhold")),)
