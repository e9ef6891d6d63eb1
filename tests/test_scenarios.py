"""Attack scenarios (configs/scenarios/): each gives the verdict its file expects, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node.scenario_cli import main
from node.scenario_real import real_mode_refusal
from node.scenarios import (
    SCENARIO_DIRECTORY,
    ScenarioError,
    load_scenario,
    parse_scenario,
    scenario_names,
    scenario_path,
)
from node.simulator import Scenario, Simulation, SimulationFailure
from node.traitors import BEHAVIOURS, TraitorSpec

SHIPPED = [(name, count) for name in scenario_names() for count in load_scenario(scenario_path(name)).replica_counts]


def ledger_scenario(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.scenario_cli", *arguments], capture_output=True, text=True, timeout=120, check=False
    )


def verdict_json(capsys: pytest.CaptureFixture[str], *arguments: str) -> tuple[int, dict]:
    status = main(["run", *arguments, "--sim", "--json"])
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name, replica_count", SHIPPED)
def test_every_shipped_scenario_gives_the_verdict_its_file_expects(
    name: str, replica_count: int, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = load_scenario(scenario_path(name))
    if scenario.missing_behaviours:
        pytest.skip(f"{name} needs behaviours this build lacks: {', '.join(scenario.missing_behaviours)}")
    status, verdict = verdict_json(capsys, name, "--replicas", str(replica_count))
    assert verdict["matches"], verdict
    assert status == 0
    assert verdict["safety"] == scenario.expect.safety


def test_every_behaviour_has_a_scenario_at_both_sizes_that_holds() -> None:
    covered: dict[str, set[int]] = {}
    for name in scenario_names():
        scenario = load_scenario(scenario_path(name))
        if scenario.expect.safety != "holds" or scenario.expect.liveness != "holds":
            continue
        for count, setup in scenario.setups.items():
            if len(setup.traitors) == setup.faults_tolerated:
                for traitor in setup.traitors:
                    for behaviour in traitor.behaviours:
                        covered.setdefault(behaviour.name, set()).add(count)
    for behaviour in BEHAVIOURS:
        assert covered.get(behaviour) == {4, 7}, behaviour


@pytest.mark.parametrize("replica_count, culprits", [(4, [0, 1]), (7, [0, 1, 2])])
def test_f_plus_one_colluding_traitors_fork_and_the_verdict_names_them(
    replica_count: int, culprits: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    status, verdict = verdict_json(capsys, "fork-f-plus-one", "--replicas", str(replica_count))
    assert status == 0 and verdict["safety"] == "breaks" and verdict["matches"]
    assert verdict["broken"]["invariant"] == "agreement"
    [fork] = verdict["forks"]
    assert fork["height"] >= 1
    first, second = fork["blocks"]
    assert first["block_hash"] != second["block_hash"]
    quorum = 2 * ((replica_count - 1) // 3) + 1
    assert len(first["signers"]) >= quorum and len(second["signers"]) >= quorum
    assert fork["culprits"] == culprits
    assert len(fork["culprits"]) >= (replica_count - 1) // 3 + 1
    assert set(first["replicas"]).isdisjoint(culprits) and set(second["replicas"]).isdisjoint(culprits)


def test_the_fork_verdict_table_shows_height_hashes_signers_and_culprits() -> None:
    result = ledger_scenario("run", "fork-f-plus-one", "--sim")
    assert result.returncode == 0, result.stderr
    assert "FORK          height 1: honest replicas hold different blocks" in result.stdout
    assert result.stdout.count("certificate signed by 0, 1, ") == 2
    assert "culprits      replicas 0, 1 signed both" in result.stdout
    assert "MATCHES the expectation" in result.stdout
    assert "simulating the attack" in result.stderr  # a progress line per phase


def test_expecting_safety_to_hold_against_f_plus_one_traitors_exits_1(tmp_path: Path) -> None:
    text = scenario_path("fork-f-plus-one").read_text()
    assert 'safety = "breaks"' in text
    edited = tmp_path / "fork-expected-to-hold.toml"
    edited.write_text(text.replace('safety = "breaks"\nevidence = ["fork", "agreement"]', 'safety = "holds"\nliveness = "holds"'))
    result = ledger_scenario("run", str(edited), "--sim")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DOES NOT MATCH the expectation" in result.stdout


def test_the_same_collusion_with_f_traitors_keeps_safety_and_liveness(capsys: pytest.CaptureFixture[str]) -> None:
    for replica_count in (4, 7):
        status, verdict = verdict_json(capsys, "fork-f", "--replicas", str(replica_count))
        assert status == 0 and verdict["safety"] == "holds" and verdict["liveness"] == "holds"
        assert not verdict["forks"] and verdict["confirmed"] == verdict["submitted"]


def test_a_scenario_run_replays_exactly_from_its_seed(capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for _ in range(2):
        _, verdict = verdict_json(capsys, "equivocating-primary", "--seed", "5")
        verdict.pop("elapsed_s")
        runs.append(verdict)
    assert runs[0] == runs[1] and runs[0]["seed"] == 5


def test_the_verdict_counts_what_a_traitor_did(capsys: pytest.CaptureFixture[str]) -> None:
    _, deaf = verdict_json(capsys, "deaf")
    assert deaf["traitors"][0]["activity"]["received_ignored"] > 0
    _, rewriting = verdict_json(capsys, "other-digest")
    activity = rewriting["traitors"][0]["activity"]
    assert activity["sent_forged"] > 0 and activity["core_messages"] > 0


def test_the_simulator_names_the_broken_invariant_and_keeps_the_conflicting_blocks() -> None:
    scenario = Scenario(seed=2, traitors=(TraitorSpec(0, ()), TraitorSpec(1, ())), collusion_side=(3,), faults_until_ms=500)
    simulation = Simulation(scenario)
    with pytest.raises(SimulationFailure) as failure:
        simulation.run()
    assert failure.value.invariant == "agreement"
    conflict = failure.value.conflict
    assert conflict is not None and conflict.first.block_hash != conflict.second.block_hash
    assert conflict.first.height == conflict.second.height == conflict.height
    assert conflict.second_replica not in conflict.first_replicas
    with pytest.raises(ValueError, match="honest replicas"):
        Simulation(Scenario(seed=2, traitors=(TraitorSpec(0, ()),), collusion_side=(0,)))


# ---- the command line ----


def test_list_names_every_scenario_what_it_shows_and_its_expected_verdict() -> None:
    result = ledger_scenario("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(scenario_names())
    for name, line in zip(scenario_names(), lines, strict=True):
        scenario = load_scenario(scenario_path(name))
        assert line.startswith(name) and scenario.shows in line and f"expects {scenario.expected_text()}" in line
    assert any("fork-f-plus-one" in line and "expects safety breaks" in line for line in lines)


def test_show_prints_the_file_and_explains_it() -> None:
    result = ledger_scenario("show", "equivocating-primary")
    assert result.returncode == 0, result.stderr
    assert scenario_path("equivocating-primary").read_text().strip() in result.stdout
    assert "with 7 replicas (tolerates f=2), 2 traitor(s):" in result.stdout
    assert "replica 0: equivocating_primary()@0ms: As primary, sends every pre-prepare in two versions" in result.stdout


def test_real_mode_refuses_collusion_in_one_line_with_exit_2() -> None:
    result = ledger_scenario("run", "fork-f-plus-one", "--replicas", "4")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ledger-scenario: scenario fork-f-plus-one (n=4): collusion_side (a coalition signing a second history with all "
        "its keys at once) runs only in the simulator; `--sim` runs it"
    )
    assert result.stdout == ""


def test_real_mode_refuses_exactly_what_unmodified_processes_cannot_do() -> None:
    def refusal(name: str, replica_count: int) -> str | None:
        scenario = load_scenario(scenario_path(name))
        return real_mode_refusal(scenario, scenario.setup(replica_count))

    assert "collusion_side" in (refusal("fork-f-plus-one", 4) or "")
    assert "collusion_side" in (refusal("fork-f", 7) or "")
    # Partitions and heals go through the link proxy, twins are a second process: real mode runs them.
    for name in ("equivocating-primary", "primary-killed", "lying-block-server", "silent-f-plus-one", "partition-with-traitor", "twins"):
        assert refusal(name, 4) is None and refusal(name, 7) is None


def test_list_shows_the_modes_each_scenario_runs_in() -> None:
    result = ledger_scenario("list")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "modes real/hosts/sim" in lines["partition-with-traitor"]
    assert "modes real/hosts/sim" in lines["twins"]
    assert "modes sim " in lines["fork-f-plus-one"] and "modes sim " in lines["fork-f"]


def test_hosts_and_sim_together_are_refused_in_one_line() -> None:
    result = ledger_scenario("run", "withhold", "--hosts", "--sim")
    assert result.returncode == 2 and result.stderr.strip() == "ledger-scenario: --sim and --hosts exclude each other: the simulator has no hosts"


def test_an_unknown_scenario_or_size_is_one_line_with_exit_2() -> None:
    result = ledger_scenario("run", "no-such-attack", "--sim")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "no scenario named 'no-such-attack'" in result.stderr
    result = ledger_scenario("run", "withhold", "--replicas", "5", "--sim")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def test_run_all_prints_a_summary_table(tmp_path: Path) -> None:
    result = ledger_scenario("run", "--all", "--replicas", "4", "--sim")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].split() == ["scenario", "n", "expected", "seen", "match", "time"]
    assert "0 not" in result.stdout.splitlines()[-1]


# ---- the file format, refused strictly ----

VALID = {
    "description": "d",
    "shows": "s",
    "expect": {"safety": "holds", "liveness": "holds"},
    "replicas": {"4": {"traitors": [{"replica": 1, "behaviours": [{"name": "withhold", "peers": [2]}]}]}},
}


def parse(changes: dict, path: str = "attack.toml") -> object:
    document = json.loads(json.dumps(VALID))
    for dotted, value in changes.items():
        table = document
        keys = dotted.split("/")
        for key in keys[:-1]:
            table = table[int(key)] if isinstance(table, list) else table[key]
        last: int | str = int(keys[-1]) if isinstance(table, list) else keys[-1]
        if value is None:
            del table[last]
        elif isinstance(table, list) and last == len(table):
            table.append(value)
        else:
            table[last] = value
    return parse_scenario(Path(path), document)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": "red"}, "attack.toml: colour: unknown key"),
        ({"expect/colour": 1}, "attack.toml: expect.colour: unknown key"),
        ({"expect": None}, "attack.toml: expect.safety: missing"),
        ({"expect/safety": "mostly"}, "expect.safety: expected one of holds, breaks"),
        ({"expect/safety": "breaks"}, "expect.liveness: not judged when safety breaks"),
        ({"workload": {"clients": 0}}, "workload.clients: must be between 1 and 16"),
        ({"workload": {"in_flight": True}}, "workload.in_flight: expected int"),
        ({"network": {"loss_rate": 2}}, "network.loss_rate: must be between 0 and 1"),
        ({"replicas/5": {}}, "replicas.5: unknown key"),
        ({"replicas/4/traitors/0/behaviours/0/name": "polite"}, "replicas.4.traitors[0].behaviours[0].name: unknown behaviour 'polite'"),
        ({"replicas/4/traitors/0/behaviours/0/loudness": 3}, "replicas.4.traitors[0].behaviours[0].loudness: unknown key"),
        ({"replicas/4/traitors/0/behaviours/0/peers": [9]}, "behaviours[0].peers: expected replica numbers 0..3"),
        ({"replicas/4/traitors/0/behaviours/0/peers": [1]}, "behaviours[0].peers: replica 1 cannot list itself"),
        ({"replicas/4/traitors/0/behaviours/0/kinds": ["Gossip"]}, "behaviours[0].kinds: unknown message kind 'Gossip'"),
        ({"replicas/4/traitors/0/behaviours/0": {"name": "replay", "source": "dreams"}}, "behaviours[0].source: expected one of sent, received, both"),
        ({"replicas/4/traitors/0/behaviours/0": {"name": "delay", "rate": 1.5}}, "behaviours[0].rate: must be between 0 and 1"),
        ({"replicas/4/traitors/0/replica": 4}, "replicas.4.traitors[0].replica: must be between 0 and 3"),
        ({"replicas/4/traitors/1": {"replica": 1}}, "traitors[1].replica: replica 1 is already a traitor"),
        ({"replicas/4/collusion_side": [1]}, "replicas.4.collusion_side: lists the honest replicas shown the second history; [1] are traitors"),
        ({"replicas/4/timeline": [{"at_ms": 10, "event": "kill", "replicas": [2]}]}, "replica 2 is killed and never restarted"),
        ({"replicas/4/timeline": [{"at_ms": 10, "event": "explode", "replicas": [2]}]}, "timeline[0].event: expected one of kill, stop, restart, partition, slow, heal"),
        ({"replicas/4/timeline": [{"at_ms": 9000, "event": "kill", "replicas": [2]}]}, "timeline[0].at_ms: 9000 is after the network heals at 3000"),
        ({"replicas/4/timeline": [{"at_ms": 10, "event": "restart", "replicas": [2]}]}, "replica 2 is neither killed nor stopped"),
        ({"replicas/4/timeline": [{"at_ms": 10, "event": "heal", "replicas": [2]}]}, "replica 2 is neither cut off nor slow"),
        ({"replicas/4/timeline": [{"at_ms": 10, "event": "slow", "replicas": [2]}]}, "timeline[0].delay_ms: missing"),
        ({"replicas/4/timeline": [{"at_ms": 10, "event": "slow", "replicas": [2], "delay_ms": 0}]}, "timeline[0].delay_ms: must be between 1 and 10000"),
        ({"replicas/4/timeline": [{"at_ms": 10, "event": "kill", "replicas": [2], "delay_ms": 5}]}, "timeline[0].delay_ms: only a slow event has a delay"),
        ({"replicas/4/timeline": [{"at_ms": 10, "event": "slow", "replicas": [2], "delay_ms": 50}]}, "replica 2 is slow and never healed"),
        ({"replicas": None}, "attack.toml: replicas: missing"),
    ],
)
def test_a_bad_scenario_file_is_refused_in_one_line_naming_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ScenarioError) as error:
        parse(changes)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_valid_file_parses_and_its_timeline_becomes_intervals() -> None:
    timeline = [
        {"at_ms": 100, "event": "kill", "replicas": [2]},
        {"at_ms": 200, "event": "partition", "replicas": [3]},
        {"at_ms": 900, "event": "restart", "replicas": [2]},
        {"at_ms": 1000, "event": "heal"},
    ]
    scenario = parse({"replicas/4/timeline": timeline})
    setup = scenario.setup(4)  # type: ignore[attr-defined]
    assert setup.intervals("kill", ("restart",)) == ((2, 100, 900),)
    assert setup.intervals("partition", ("heal",)) == ((3, 200, 1000),)
    assert setup.traitors[0].behaviours[0].parameters == (("peers", (2,)),)


def test_a_slow_event_lasts_until_the_heal_that_ends_it() -> None:
    timeline = [
        {"at_ms": 100, "event": "slow", "replicas": [2], "delay_ms": 300},
        {"at_ms": 200, "event": "partition", "replicas": [3]},
        {"at_ms": 400, "event": "slow", "replicas": [3], "delay_ms": 50},
        {"at_ms": 1000, "event": "heal"},  # ends both: replica 2's slowness, replica 3's partition and slowness
    ]
    setup = parse({"replicas/4/timeline": timeline}).setup(4)  # type: ignore[attr-defined]
    assert setup.slow_links() == ((2, 100, 1000, 300), (3, 400, 1000, 50))
    assert setup.intervals("partition", ("heal",)) == ((3, 200, 1000),)


def test_the_simulator_adds_a_slow_links_delay_to_messages_into_and_out_of_it() -> None:
    simulation = Simulation(Scenario(seed=1, slow_links=((2, 100, 1000, 300), (3, 0, 1000, 50))))
    simulation.now_ms = 500
    assert simulation.slow_ms(2, 0) == 300 and simulation.slow_ms(0, 2) == 300
    assert simulation.slow_ms(2, 3) == 300  # both slow: the larger
    assert simulation.slow_ms(0, 1) == 0
    simulation.now_ms = 1000
    assert simulation.slow_ms(2, 0) == 0  # healed


def test_a_behaviour_this_build_lacks_is_refused_unless_the_file_says_it_needs_it() -> None:
    missing = {"replicas/4/traitors/0/behaviours/0": {"name": "teleport", "distance": 3}}
    with pytest.raises(ScenarioError, match="unknown behaviour 'teleport'"):
        parse(missing)
    scenario = parse({**missing, "needs": ["teleport"]})
    assert scenario.missing_behaviours == ("teleport",)  # type: ignore[attr-defined]


def test_a_bad_file_through_the_cli_is_one_line_naming_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(scenario_path("withhold").read_text().replace("[workload]", "[workload]\ncleints = 3"))
    result = ledger_scenario("show", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"ledger-scenario: {path}: workload.cleints: unknown key (known here: clients, transactions_per_client, in_flight)"]
    broken = tmp_path / "broken.toml"
    broken.write_text("description = ")
    result = ledger_scenario("run", str(broken), "--sim")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and str(broken) in result.stderr


def test_an_oversized_or_undecodable_file_is_refused(tmp_path: Path) -> None:
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * 300_000)
    with pytest.raises(ScenarioError, match="larger than 262144 bytes"):
        load_scenario(huge)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe description")
    with pytest.raises(ScenarioError, match="binary.toml"):
        load_scenario(binary)


def test_list_into_a_closed_pipe_stops_quietly() -> None:
    result = subprocess.run(
        f"{sys.executable} -m node.scenario_cli list | head -1", shell=True, capture_output=True, text=True, timeout=60, check=False
    )
    assert "Traceback" not in result.stderr and len(result.stdout.splitlines()) == 1


def test_every_shipped_file_sits_in_the_scenario_directory() -> None:
    assert SCENARIO_DIRECTORY.is_dir() and len(scenario_names()) >= len(BEHAVIOURS)


def test_hosts_mode_without_root_is_one_line_with_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import node.host_network

    monkeypatch.setattr(node.host_network.os, "geteuid", lambda: 1000)
    assert main(["run", "partition-with-traitor", "--hosts"]) == 2
    error = capsys.readouterr().err
    assert error.strip() == "ledger-scenario: --hosts makes network namespaces, veth pairs and a bridge: run it as root (or leave out --hosts)"
    monkeypatch.setattr(node.host_network.shutil, "which", lambda name: None)
    assert main(["run", "partition-with-traitor", "--hosts"]) == 2
    assert "needs the `ip` command" in capsys.readouterr().err
