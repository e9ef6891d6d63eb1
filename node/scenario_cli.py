"""`ledger-scenario`: list, explain and run the attack scenarios in configs/scenarios/, with a verdict.

By default a scenario runs against real `ledger-node run` processes on 127.0.0.1 (node/scenario_real.py);
`--hosts` runs each of them in a network namespace of its own (as root), and `--sim` runs the
scenario in the deterministic simulator (node/scenario_sim.py). Exit status of `run`: 0
when every verdict matches what its file expects, 1 when one does not, 2 for a usage error, an
invalid file, or a scenario this build (or this mode) cannot run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from client.completion import add_completion_command, completion_script
from node.cli import OneLineParser, _at_least
from node.host_network import hosts_mode_refusal
from node.scenario_real import RealRunError, real_mode_refusal, run_real_processes
from node.scenario_sim import run_in_simulator
from node.scenarios import (
    REPLICA_COUNTS,
    ScenarioError,
    ScenarioFile,
    Setup,
    load_scenario,
    scenario_names,
    scenario_path,
)
from node.traitors import BEHAVIOURS
from node.verdict import RunRecord, Verdict, judge, render

PROGRAM = "ledger-scenario"
Backend = Callable[[ScenarioFile, Setup, int, Callable[[str], None]], RunRecord]
# The ways to run a scenario, behind the same verdict code.
BACKENDS: dict[str, Backend] = {
    "sim": run_in_simulator,
    "real": run_real_processes,
    "hosts": functools.partial(run_real_processes, hosts=True),
}
MODES = ("real", "hosts", "sim")

EXAMPLES = """\
examples:
  ledger-scenario list                                   every scenario, what it shows, its expected verdict
  ledger-scenario show equivocating-primary              the file, explained
  ledger-scenario run equivocating-primary               run it against real replica processes, print the verdict
  ledger-scenario run equivocating-primary --sim         simulate it (the seed replays it exactly)
  ledger-scenario run partition-with-traitor --hosts     each replica a host of its own (network namespaces; root)
  ledger-scenario run fork-f-plus-one --replicas 7 --seed 3 --sim --json
  ledger-scenario run --all --replicas 4                 every scenario real processes can run, as a table
  ledger-scenario run --all --sim                        every scenario at every size, simulated
"""


class ScenarioCommandError(Exception):
    """A one-line error for the user (exit 2)."""


def _find(name: str) -> ScenarioFile:
    """A scenario by name, or a path to any scenario file."""
    path = Path(name) if name.endswith(".toml") or "/" in name else scenario_path(name)
    if not path.exists() and path == scenario_path(name):
        known = ", ".join(scenario_names()) or "none"
        raise ScenarioCommandError(f"no scenario named {name!r} (known: {known})")
    return load_scenario(path)


def command_list() -> int:
    scenarios = [load_scenario(scenario_path(name)) for name in scenario_names()]
    width = max((len(scenario.name) for scenario in scenarios), default=10)
    for scenario in scenarios:
        sizes = "/".join(str(count) for count in scenario.replica_counts)
        expected = scenario.expected_text()
        if scenario.missing_behaviours:
            expected += f" (skipped here: needs {', '.join(scenario.missing_behaviours)})"
        print(f"{scenario.name:<{width}}  n={sizes:<4} {modes_text(scenario):<20} {scenario.shows}  [expects {expected}]")
    return 0


def supported_modes(scenario: ScenarioFile) -> tuple[str, ...]:
    """The modes (real, hosts, sim) that run this scenario at every size it is written for."""
    if scenario.missing_behaviours:
        return ()
    real = all(real_mode_refusal(scenario, setup) is None for setup in scenario.setups.values())
    return ("real", "hosts", "sim") if real else ("sim",)


def modes_text(scenario: ScenarioFile) -> str:
    return "modes " + ("/".join(supported_modes(scenario)) or "none")


def _behaviour_summary(name: str) -> str:
    behaviour = BEHAVIOURS.get(name)
    if behaviour is None or not behaviour.__doc__:
        return "(not in this build)"
    return " ".join(behaviour.__doc__.split())


def explain(scenario: ScenarioFile) -> str:
    workload, network = scenario.workload, scenario.network
    lines = [
        f"{scenario.name}: {scenario.description}",
        f"  shows: {scenario.shows}",
        f"  runs in: {', '.join(supported_modes(scenario)) or 'no mode of this build'} (real: processes on 127.0.0.1; hosts: one network namespace each; sim: the simulator)",
        f"  expects: {scenario.expected_text()}" + (f"; evidence seen: {', '.join(scenario.expect.evidence)}" if scenario.expect.evidence else ""),
        f"  workload: {workload.clients} clients, {workload.transactions_per_client} transactions each, "
        f"{workload.in_flight} in flight per client",
        f"  network: delay {network.delay_ms_min}-{network.delay_ms_max} ms per message (real processes: per chunk, at the link proxy); "
        f"loss {network.loss_rate}, duplication {network.duplicate_rate} (simulator only: TCP neither loses nor duplicates); "
        f"faults until {network.faults_until_ms} ms, given up after {network.time_limit_ms} ms; seed {scenario.seed}",
    ]
    if scenario.missing_behaviours:
        lines.append(f"  needs behaviours this build lacks: {', '.join(scenario.missing_behaviours)} (skipped)")
    for count in scenario.replica_counts:
        setup = scenario.setups[count]
        lines.append(f"  with {count} replicas (tolerates f={setup.faults_tolerated}), {len(setup.traitors)} traitor(s):")
        for traitor in setup.traitors:
            if not traitor.behaviours:
                lines.append(f"    replica {traitor.replica_id}: a traitor with no behaviour of its own")
            for behaviour in traitor.behaviours:
                lines.append(f"    replica {traitor.replica_id}: {behaviour.describe()}: {_behaviour_summary(behaviour.name)}")
        if setup.collusion_side:
            lines.append(
                f"    the traitors collude (simulator only): replicas {', '.join(map(str, setup.collusion_side))} are shown a second, "
                "validly signed history of every slot (node/collusion.py)"
            )
        for event in setup.timeline:
            by = f" by {event.delay_ms} ms" if event.event == "slow" else ""
            lines.append(f"    at {event.at_ms} ms: {event.event} replicas {', '.join(map(str, event.replicas))}{by}")
    return "\n".join(lines)


def command_show(name: str) -> int:
    scenario = _find(name)
    print(f"# {scenario.path}")
    print(scenario.path.read_text().rstrip())
    print()
    print(explain(scenario))
    return 0


def _progress(text: str) -> None:
    print(f"{PROGRAM}: {text}", file=sys.stderr, flush=True)


def run_one(scenario: ScenarioFile, replica_count: int, seed: int | None, backend: str, baseline: bool = True) -> Verdict:
    setup = scenario.setup(replica_count)
    chosen_seed = scenario.seed if seed is None else seed
    _progress(f"{scenario.name}: n={replica_count}, seed {chosen_seed}, {backend} backend")
    if backend == "sim" or baseline:
        record = BACKENDS[backend](scenario, setup, chosen_seed, _progress)
    else:
        record = run_real_processes(scenario, setup, chosen_seed, _progress, hosts=backend == "hosts", baseline=False)
    _progress(f"{scenario.name}: judging the run against the expectation ({scenario.expected_text()})")
    return judge(record, scenario.expect)


def replay_command(scenario: ScenarioFile, verdict: Verdict, backend: str) -> str:
    name = scenario.name if scenario.path == scenario_path(scenario.name) else str(scenario.path)
    command = f"{PROGRAM} run {name} --replicas {verdict.replica_count} --seed {verdict.seed}"
    if backend == "sim":
        return f"{command} --sim"
    if backend == "hosts":
        command += " --hosts"
    return f"{command}   (real processes: the seed drives the traitors' choices; timings differ from run to run)"


def refusal(scenario: ScenarioFile, replica_count: int, backend: str) -> str | None:
    """Why this scenario cannot run at this size in this mode, or None."""
    if scenario.missing_behaviours:
        return f"needs {', '.join(scenario.missing_behaviours)}"
    if backend in ("real", "hosts"):
        return real_mode_refusal(scenario, scenario.setup(replica_count))
    return None


def _backend(arguments: argparse.Namespace) -> str:
    if arguments.sim and arguments.hosts:
        raise ScenarioCommandError("--sim and --hosts exclude each other: the simulator has no hosts")
    if arguments.hosts:
        reason = hosts_mode_refusal()
        if reason is not None:
            raise ScenarioCommandError(reason)
        return "hosts"
    return "sim" if arguments.sim else "real"


def command_run(arguments: argparse.Namespace) -> int:
    if arguments.all == (arguments.name is not None):
        raise ScenarioCommandError("give a scenario NAME or --all")
    backend = _backend(arguments)
    if arguments.all:
        return _run_all(arguments)
    scenario = _find(arguments.name)
    if scenario.missing_behaviours:
        raise ScenarioCommandError(
            f"scenario {scenario.name} needs behaviours this build lacks: {', '.join(scenario.missing_behaviours)} (skipped)"
        )
    replica_count = arguments.replicas if arguments.replicas is not None else scenario.replica_counts[0]
    scenario.setup(replica_count)  # refuses a size the file is not written for
    reason = refusal(scenario, replica_count, backend)
    if reason is not None:
        raise ScenarioCommandError(f"scenario {scenario.name} (n={replica_count}): {reason}; `--sim` runs it")
    verdict = run_one(scenario, replica_count, arguments.seed, backend, not arguments.no_baseline)
    if arguments.json:
        print(json.dumps(verdict.to_json(), indent=2, default=_json_default))
    else:
        print(render(verdict, replay_command(scenario, verdict, backend)))
    return 0 if verdict.matches else 1


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def _run_all(arguments: argparse.Namespace) -> int:
    rows = []
    mismatched = 0
    backend = _backend(arguments)
    for name in scenario_names():
        scenario = load_scenario(scenario_path(name))
        counts = scenario.replica_counts if arguments.replicas is None else (arguments.replicas,)
        for count in counts:
            if count not in scenario.setups:
                continue
            reason = refusal(scenario, count, backend)
            if reason is not None:
                rows.append((name, count, scenario.expected_text(), f"skipped: {reason}", "-", ""))
                continue
            try:
                verdict = run_one(scenario, count, arguments.seed, backend, not arguments.no_baseline)
            except RealRunError as error:
                mismatched += 1
                print(f"{PROGRAM}: {name} n={count}: could not run the replica processes: {error}", file=sys.stderr)
                rows.append((name, count, scenario.expected_text(), "could not run (see above)", "NO", ""))
                continue
            seen = f"safety {verdict.safety}" + (f", liveness {verdict.liveness}" if verdict.liveness is not None else "")
            mark = "yes" if verdict.matches else "NO"
            if not verdict.matches:
                mismatched += 1
                print(render(verdict, replay_command(scenario, verdict, backend)), file=sys.stderr)
            timing = "no receipt" if verdict.confirmed_by_ms is None else f"last receipt {verdict.confirmed_by_ms} ms"
            if verdict.fault_free_confirmed_by_ms is not None:
                timing += f" (fault-free {verdict.fault_free_confirmed_by_ms} ms)"
            rows.append((name, count, scenario.expected_text(), seen, mark, f"{timing}, {verdict.elapsed_s:.2f} s"))
    if arguments.json:
        keys = ("scenario", "replicas", "expected", "seen", "matches", "time")
        print(json.dumps([dict(zip(keys, row, strict=True)) for row in rows], indent=2))
    else:
        header = ("scenario", "n", "expected", "seen", "match", "time")
        widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        ran = sum(1 for row in rows if row[4] != "-")
        print(f"{ran} runs, {ran - mismatched} as expected, {mismatched} not, {len(rows) - ran} skipped")
    return 1 if mismatched else 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROGRAM, description="Byzantine attack scenarios with verdicts.", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND", help="one of the commands below; `ledger-scenario COMMAND --help` explains its arguments")
    commands.add_parser("list", help="every scenario: name, what it shows, expected verdict")
    show = commands.add_parser("show", help="a scenario file, explained")
    show.add_argument("name", help="a scenario name (see list) or a path to a .toml file")
    run = commands.add_parser("run", help="run a scenario (or --all) and print its verdict")
    run.add_argument("name", nargs="?", help="a scenario name (see list) or a path to a .toml file")
    run.add_argument("--all", action="store_true", help="every scenario, at every size it is written for")
    run.add_argument("--replicas", type=int, choices=REPLICA_COUNTS, help="network size (default: the file's first)")
    run.add_argument("--seed", type=_at_least(0), help="replay with this seed (default: the file's)")
    run.add_argument("--json", action="store_true", help="the verdict as JSON on stdout")
    run.add_argument(
        "--no-baseline",
        action="store_true",
        help="real processes: skip the second, fault-free run of the same workload that the throughput line compares against (halves the time)",
    )
    run.add_argument("--sim", action="store_true", help="run in the deterministic simulator (the seed replays it exactly); default: real replica processes")
    run.add_argument("--hosts", action="store_true", help="real processes, each in a network namespace of its own on a bridge this run makes and removes (root only)")
    add_completion_command(commands, PROGRAM)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "completion":
            names = scenario_names()
            print(completion_script(arguments.shell, parser, PROGRAM, {"run": names, "show": names}), end="")
            return 0
        if arguments.command == "list":
            return command_list()
        if arguments.command == "show":
            return command_show(arguments.name)
        return command_run(arguments)
    except (ScenarioError, ScenarioCommandError) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    except RealRunError as error:
        print(f"{PROGRAM}: could not run the replica processes: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted: every replica process was stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ledger-scenario list | head`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
