"""`ledger-scenario run NAME` against real replica processes (the default mode), through the real CLI."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

COMMAND_DEADLINE_S = 180


def ledger_scenario(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.scenario_cli", *arguments], capture_output=True, text=True, timeout=COMMAND_DEADLINE_S, check=False
    )


@pytest.mark.parametrize("name", ["equivocating-primary", "primary-killed"])
def test_a_scenario_run_against_real_processes_matches_its_expectation(name: str) -> None:
    # One of them also runs the fault-free comparison; the other skips it (CI time).
    baseline = () if name == "equivocating-primary" else ("--no-baseline",)
    result = ledger_scenario("run", name, "--replicas", "4", *baseline)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"scenario {name}: n=4 (tolerates f=1), seed 1, real processes" in result.stdout
    assert "MATCHES the expectation" in result.stdout
    assert "every honest chain verifies from genesis" in result.stdout
    # The replay line is a real-mode command: no --sim.
    replay = next(line for line in result.stdout.splitlines() if line.strip().startswith("replay"))
    assert f"ledger-scenario run {name} --replicas 4 --seed 1" in replay and "--sim" not in replay
    assert "stopping every replica process" in result.stderr
    if baseline:
        assert "throughput" not in result.stdout and "without traitors or faults" not in result.stderr
    else:  # the same workload ran again on a fresh network without the traitor
        assert "running the same workload without traitors or faults, for comparison" in result.stderr
        throughput = next(line for line in result.stdout.splitlines() if line.strip().startswith("throughput"))
        assert "of the fault-free run's (8 transactions confirmed by" in throughput, throughput
    if name == "primary-killed":  # the timeline ran against the processes
        assert "at 150 ms: kill replicas 0" in result.stderr and "at 2000 ms: restart replicas 0" in result.stderr



def test_a_partition_and_heal_run_through_the_link_proxy() -> None:
    result = ledger_scenario("run", "partition-with-traitor", "--replicas", "4", "--no-baseline")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCHES the expectation" in result.stdout
    assert "every peer link through the link proxy" in result.stderr
    # The partition really cut replica 3's six links (three out, three in), and the heal let them back.
    assert "at 100 ms: partition replicas 3 (its 6 links blocked at the proxy" in result.stderr
    heal = next(line for line in result.stderr.splitlines() if "at 1400 ms: heal replicas 3" in line)
    assert "the proxy refused" in heal and "refused 0 connections" not in heal
    # The cut-off replica caught up: every honest chain has the same height (whatever batching made it).
    heights = re.search(r"\(heights 0: (\d+), 2: (\d+), 3: (\d+)\)", result.stdout)
    assert heights is not None and len(set(heights.groups())) == 1, result.stdout


def test_twins_run_as_two_processes_with_one_key() -> None:
    result = ledger_scenario("run", "twins", "--replicas", "4", "--no-baseline")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCHES the expectation" in result.stdout
    assert "starting 5 `ledger-node run` processes" in result.stderr and "1 of them twinned" in result.stderr
    assert "a second honest process with its key (replica-0-twin) serves replicas 2, 3" in result.stdout
    # Both twins ordered requests on their own sides: the honest replicas saw key 0 vote two ways.
    assert "for another digest" in result.stdout


def test_a_slow_link_is_slowed_at_the_proxy_and_healed() -> None:
    result = ledger_scenario("run", "slow-link", "--replicas", "4", "--no-baseline")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCHES the expectation" in result.stdout
    assert "at 100 ms: slow replicas 2 by 300 ms (replica 2's 6 links now 301+9 ms at the proxy)" in result.stderr
    assert "at 1500 ms: heal replicas 2 (replica 2's 6 links back to 1+9 ms)" in result.stderr


def test_a_traitor_serving_a_corrupted_snapshot_to_a_joining_process_is_routed_around() -> None:
    # Replica 3 starts late with an empty store, far behind: it joins by state sync while replica
    # 0 (asked first) serves it chunks with an entry changed.
    result = ledger_scenario("run", "lying-snapshot-server", "--replicas", "4", "--no-baseline")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCHES the expectation" in result.stdout
    assert "at 800 ms: join replicas 3" in result.stderr
    assert "replica 3: its store starts from a snapshot at height" in result.stderr
    evidence = next(line for line in result.stdout.splitlines() if line.strip().startswith("evidence"))
    assert "snapshot chunk does not verify" in evidence
    heights = re.search(r"\(heights 1: (\d+), 2: (\d+), 3: (\d+)\)", result.stdout)
    assert heights is not None and len(set(heights.groups())) == 1, result.stdout
