"""The simulator backend of `ledger-scenario run --sim`: a scenario file as a seeded simulation.

The same seed replays the run exactly. The first invariant that breaks stops the run and is
reported (with the simulator's state at that moment) instead of raised; the verdict code
(node/verdict.py) judges the record the same way for every backend.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from node.scenarios import ScenarioFile, Setup
from node.simulator import Scenario, Simulation, SimulationFailure
from node.verdict import BrokenInvariant, RunRecord, TraitorReport

Progress = Callable[[str], None]


def simulator_scenario(scenario: ScenarioFile, setup: Setup, seed: int) -> Scenario:
    network, workload = scenario.network, scenario.workload
    return Scenario(
        seed=seed,
        replica_count=setup.replica_count,
        clients=workload.clients,
        transactions_per_client=workload.transactions_per_client,
        pipeline_depth=workload.in_flight,
        loss_rate=network.loss_rate,
        duplicate_rate=network.duplicate_rate,
        delay_ms_min=network.delay_ms_min,
        delay_ms_max=network.delay_ms_max,
        faults_until_ms=network.faults_until_ms,
        time_limit_ms=network.time_limit_ms,
        adversarial=True,
        traitors=setup.traitors,
        crashes=setup.intervals("kill", ("restart",)),
        stalls=setup.intervals("stop", ("restart",)),
        partitions=setup.intervals("partition", ("heal",)),
        slow_links=setup.slow_links(),
        collusion_side=setup.collusion_side,
        late_joins=setup.late_joins(),
    )


def fault_free(scenario: Scenario) -> Scenario:
    """The same workload, seed and delays, with no traitors, faults or losses."""
    return dataclasses.replace(
        scenario,
        traitors=(),
        crashes=(),
        stalls=(),
        partitions=(),
        slow_links=(),
        collusion_side=(),
        late_joins=(),
        loss_rate=0.0,
        duplicate_rate=0.0,
        faults_until_ms=0,
    )


def _failure_text(failure: SimulationFailure) -> str:
    """The failure's first line without the seed prefix (the verdict names the seed and the replay)."""
    first = str(failure).splitlines()[0]
    text = first.split(": ", 1)[1] if ": " in first else first
    prefix = f"{failure.invariant}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def record_simulation(name: str, simulation: Simulation, failure: SimulationFailure | None, elapsed_s: float) -> RunRecord:
    honest = simulation.honest()
    chains = {index: list(simulation.replicas[index].chain) for index in honest}
    conflict = failure.conflict if failure is not None else None
    if conflict is not None:
        # The block that broke agreement never reached its replica's chain: show it there.
        chain = chains.get(conflict.second_replica)
        if chain is not None and len(chain) == conflict.height - 1:
            chain.append(conflict.second)
    rejections: dict[str, int] = {}
    for index in honest:
        for reason, count in simulation.replicas[index].core.counters.items():
            rejections[reason] = rejections.get(reason, 0) + count
    traitors = []
    for spec in simulation.traitor_specs:
        activity = simulation.traitor_activity[spec.replica_id]
        behaviours = " + ".join(behaviour.describe() for behaviour in spec.behaviours) or "no behaviour of its own"
        if simulation.coalition is not None:
            side = simulation.scenario.collusion_side
            behaviours += f"; colludes, showing {'replica' if len(side) == 1 else 'replicas'} {', '.join(map(str, side))} a second history"
        counts = {
            "core_messages": activity.core_messages,
            "sent_unchanged": activity.sent_unchanged,
            "sent_forged": activity.sent_forged,
            "received_ignored": activity.received_ignored,
            "blocks_served": simulation.traitor_wrappers[spec.replica_id].blocks_served,
        }
        traitors.append(TraitorReport(spec.replica_id, behaviours, counts))
    network = simulation.network
    return RunRecord(
        scenario=name,
        backend="simulator",
        replica_count=simulation.scenario.replica_count,
        seed=simulation.scenario.seed,
        network_id=network.network_id,
        replica_keys=tuple(network.replica_keys),
        genesis_hash=network.genesis_hash,
        submitted=sum(client.submitted for client in simulation.clients),
        receipts=[receipt for client in simulation.clients for receipt in client.receipts],
        views={index: simulation.replicas[index].core.view for index in honest},
        chains=chains,
        traitors=tuple(traitors),
        rejections=rejections,
        broken=None if failure is None else BrokenInvariant(failure.invariant, _failure_text(failure)),
        elapsed_s=elapsed_s,
        simulated_ms=simulation.now_ms,
        confirmed_by_ms=simulation.last_receipt_ms,
        collusion_side=simulation.scenario.collusion_side,
    )


def run_in_simulator(scenario: ScenarioFile, setup: Setup, seed: int, progress: Progress) -> RunRecord:
    simulated = simulator_scenario(scenario, setup, seed)
    progress(f"simulating the attack: {len(setup.traitors)} traitor(s), {len(setup.timeline)} fault event(s), "
             f"{scenario.workload.clients * scenario.workload.transactions_per_client} transactions")
    started = time.perf_counter()
    simulation = Simulation(simulated)
    failure = None
    try:
        simulation.run()
    except SimulationFailure as caught:
        failure = caught
    elapsed_s = time.perf_counter() - started
    record = record_simulation(scenario.name, simulation, failure, elapsed_s)
    progress("simulating the same workload without traitors or faults, for comparison")
    baseline = Simulation(fault_free(simulated))
    try:
        baseline.run()
        record.fault_free_confirmed_by_ms = baseline.last_receipt_ms
    except SimulationFailure:
        record.fault_free_confirmed_by_ms = None
    return record
