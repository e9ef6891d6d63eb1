"""`ledger-scenario run NAME` against real replica processes (the default mode), through the real CLI."""

from __future__ import annotations

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
    result = ledger_scenario("run", name, "--replicas", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"scenario {name}: n=4 (tolerates f=1), seed 1, real processes" in result.stdout
    assert "MATCHES the expectation" in result.stdout
    assert "every honest chain verifies from genesis" in result.stdout
    # The replay line is a real-mode command: no --sim.
    replay = next(line for line in result.stdout.splitlines() if line.strip().startswith("replay"))
    assert f"ledger-scenario run {name} --replicas 4 --seed 1" in replay and "--sim" not in replay
    assert "stopping every replica process" in result.stderr
    if name == "primary-killed":  # the timeline ran against the processes
        assert "at 150 ms: kill replicas 0" in result.stderr and "at 2000 ms: restart replicas 0" in result.stderr

