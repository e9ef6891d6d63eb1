"""`ledger-node`: create a network, run one replica, run a whole local network, simulate, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from client.completion import add_completion_command, completion_script
from ledger.config import ConfigError, find_template, load_template, template_for, write_network
from ledger.crypto import KeyFileError
from ledger.version import package_version
from node.log_format import LOG_FORMATS, configure_logging

EXAMPLES = """\
examples:
  ledger-node init configs/local-4.toml --out net        write keys and configs for 4 replicas
  ledger-node init --replicas 7 --out net7               the same from a generated template
  ledger-node up net                                     run every replica of net on this machine
  ledger-node run net/replica-2.toml                     run one replica (one per host)
  ledger-node check net/replica-2.toml                   audit a stopped replica's store from genesis
  ledger-node simulate --seeds 500                       seeded simulation sweep
  ledger-node simulate --adversarial --seeds 20000 --jobs 2   the same with traitor replicas
  ledger-node demo                                       the whole tour in one command
"""


def _number_list(minimum: int, example: str) -> Callable[[str], list[int]]:
    """An argparse type for comma-separated whole numbers, each at least `minimum`."""

    def parse(text: str) -> list[int]:
        try:
            numbers = [int(item) for item in text.split(",") if item]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like {example}, got {text!r}") from None
        if not numbers or any(number < minimum for number in numbers):
            raise argparse.ArgumentTypeError(f"expected numbers like {example}, each at least {minimum}, got {text!r}")
        return numbers

    return parse


LOG_LEVELS = ("debug", "info", "warning", "error")
DEMO_BASE_PORT_MAX = 65535 - 12  # 4 replicas, a peer, a client and a metrics port each


def add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options taken before or after the command; after it they default to SUPPRESS, so one
    given before it is not overwritten by the default."""
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS if suppress else "info",
        help="log verbosity, any case (default: info)",
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS if suppress else "text",
        help="log lines as text (time logger LEVEL message) or json (one object a line: time, level, logger, message); "
        "times are ISO 8601 UTC with milliseconds (default: text)",
    )


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr (exit 2), like every other error of this program."""

    def error(self, message: str) -> NoReturn:
        program = self.prog.split()[0]
        self.exit(2, f"{program}: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for one whole number, at least `minimum`."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def _traitor_spec(text: str) -> object:
    from node.traitors import TraitorSpecError, parse_behaviour_spec

    try:
        spec = parse_behaviour_spec(text)
    except TraitorSpecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if spec.name == "twins":
        raise argparse.ArgumentTypeError(
            "traitor behaviour twins is a second honest process with this replica's key: `ledger-scenario run twins` starts both"
        )
    return spec


def _replica_traitor(text: str) -> tuple[int, str]:
    """`REPLICA=SPEC` for `up --traitor`: the replica id and its behaviour, checked here so a typo
    is refused before any replica starts."""
    replica_text, equals, spec_text = text.partition("=")
    if not equals or not replica_text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected REPLICA=SPEC, e.g. 0=equivocating_primary, got {text!r}")
    from node.traitors import format_behaviour_spec

    spec = _traitor_spec(spec_text)
    return int(replica_text), format_behaviour_spec(spec)  # type: ignore[arg-type]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ledger-node",
        description="Run replicas of a PBFT ledger: n = 3f+1 replicas survive f traitors.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ledger-node {package_version()}")
    add_global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands below; `ledger-node COMMAND --help` explains its arguments")

    init = commands.add_parser("init", help="write keys and configs for a new network", description="Write DIR/replica-<i>.toml and .key for every replica, plus DIR/client.toml and client.key.")
    init.add_argument("template", nargs="?", type=Path, help="network template, e.g. configs/local-4.toml")
    init.add_argument("--replicas", type=int, help="generate a template for this many replicas (at least 4) instead of reading TEMPLATE")
    init.add_argument("--out", type=Path, required=True, help="directory to create (required; an existing one is refused unless --force)")
    init.add_argument("--force", action="store_true", help="replace DIR if it exists")
    init.add_argument("--host", help="host of every replica (default: the template's; 127.0.0.1 with --replicas)")
    init.add_argument("--base-port", type=_port, help="first port: replica i of n uses base+2i, base+2i+1 and, for metrics, base+2n+i (default: the template's; 7100 with --replicas)")

    run = commands.add_parser("run", help="run one replica", description="Run one replica until Ctrl-C or SIGTERM.")
    run.add_argument("config", type=Path, help="the replica's config, e.g. net/replica-0.toml")
    run.add_argument(
        "--traitor",
        metavar="SPEC",
        action="append",
        type=_traitor_spec,
        default=[],
        help="make this replica a traitor, for attack tests: name[:key=value,...][@start_ms], e.g. "
        "equivocating_primary or withhold:peers=1+2,kinds=Commit@5000; repeat to combine",
    )
    run.add_argument("--traitor-seed", type=int, default=0, help="seed of the traitor's random choices (default: 0)")
    run.add_argument(
        "--profile",
        metavar="FILE",
        type=Path,
        help="profile the replica's event loop thread with cProfile and write pstats to FILE when it stops "
        "(read with: python -m pstats FILE)",
    )
    run.add_argument(
        "--trace-stages",
        action="store_true",
        help="log, on the node.stages logger, when each stage happened for about one transaction in 256 (request, "
        "pre-prepare, prepared, committed, written, replied; CLOCK_MONOTONIC seconds); for ledger-bench --trace-stages",
    )

    up = commands.add_parser("up", help="run every replica of a network directory on this machine", description="Start each DIR/replica-<i>.toml as a child process; Ctrl-C or SIGTERM stops them all.")
    up.add_argument("directory", type=Path, help="directory written by `ledger-node init`")
    up.add_argument("--only", type=_number_list(0, "0,2"), help="comma-separated replica ids to start, e.g. 0,2 (default: all)")
    up.add_argument(
        "--traitor",
        metavar="REPLICA=SPEC",
        action="append",
        type=_replica_traitor,
        default=[],
        help="start that replica as a traitor (passed on as `run --traitor SPEC`), e.g. 0=equivocating_primary; repeat to combine",
    )

    check = commands.add_parser(
        "check",
        help="audit a stopped replica's store from genesis",
        description="Re-execute every stored block from genesis and check every link, certificate, result, state digest, "
        "the transaction index and the durable state; print progress and one verdict line. A store that keeps blocks only "
        "from a base (pruned with [storage] retain_blocks, or started from a snapshot) is checked from its base, and the "
        "verdict says so: its durable state against its block's digest, later blocks re-executed. Exit 0 if the store is sound, "
        "1 if it is damaged, missing or in use, 2 for a bad config.",
    )
    check.add_argument("target", type=Path, help="a replica's config (net/replica-2.toml), or a network directory (every replica in it)")
    check.add_argument("--replica", type=_at_least(0), help="with a network directory: only this replica")

    simulate = commands.add_parser("simulate", help="run the deterministic simulator", description="Run seeded simulations with message loss, delay, duplication and reordering; every failure prints its seed.")
    simulate.add_argument("--seeds", type=_at_least(1), default=100, help="number of seeds to run, starting at --first (default: 100)")
    simulate.add_argument("--first", type=int, default=0, help="first seed (default: 0)")
    simulate.add_argument("--seed", type=int, help="replay exactly this one seed (default: --seeds seeds from --first)")
    simulate.add_argument("--replicas", type=_number_list(4, "4,7"), default=[4, 7], help="replica counts, e.g. 4,7 (default)")
    simulate.add_argument("--adversarial", action="store_true", help="up to f traitor replicas (node/traitors.py), torn crashes, round partitions, racing nonces")
    simulate.add_argument("--exclude", type=lambda text: tuple(item for item in text.split(",") if item), default=(), help="comma-separated traitor behaviours to leave out (and racing_nonces), e.g. to sweep past a known hole")
    simulate.add_argument("--jobs", type=int, default=1, help="worker processes (default: 1); replays are exact whatever the number")
    simulate.add_argument("--progress-every", type=int, default=500, help="print a progress line every this many runs (default: 500)")

    demo = commands.add_parser("demo", help="init, start a 4-replica network, submit transactions, verify, stop", description="The main job in one command.")
    demo.add_argument("--dir", type=Path, default=Path("demo-net"), help="working directory (default: demo-net, replaced)")
    demo.add_argument("--base-port", type=_port, default=7100, help="first port (default: 7100; the demo uses 12)")
    add_completion_command(commands, "ledger-node")
    for command in commands.choices.values():
        add_global_options(command, suppress=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "completion":
        print(completion_script(arguments.shell, parser, "ledger-node"), end="")
        return 0
    configure_logging(arguments.log_level, arguments.log_format)
    try:
        if arguments.command == "init":
            return command_init(arguments)
        if arguments.command == "simulate":
            return command_simulate(arguments)
        if arguments.command == "run":
            from node.runtime import run_replica_main

            return run_replica_main(
                arguments.config, tuple(arguments.traitor), arguments.traitor_seed, arguments.profile, arguments.trace_stages
            )
        if arguments.command == "check":
            from node.store_check import run_check_main

            return run_check_main(arguments.target, arguments.replica)
        if arguments.command == "up":
            from node.launcher import run_network_main

            traitors: dict[int, list[str]] = {}
            for replica_id, spec in arguments.traitor:
                traitors.setdefault(replica_id, []).append(spec)
            return run_network_main(arguments.directory, arguments.only, arguments.log_level, arguments.log_format, traitors)
        if arguments.command == "demo":
            from node.demo import run_demo

            if arguments.base_port > DEMO_BASE_PORT_MAX:
                raise ConfigError(f"--base-port: {arguments.base_port} leaves no room for the demo's 12 ports (at most {DEMO_BASE_PORT_MAX})")
            return run_demo(arguments.dir, arguments.base_port)
    except (ConfigError, KeyFileError) as error:
        print(f"ledger-node: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {arguments.command}")
    return 2


def command_init(arguments: argparse.Namespace) -> int:
    if (arguments.template is None) == (arguments.replicas is None):
        raise ConfigError("init: give either a TEMPLATE file or --replicas N")
    if arguments.template is not None:
        path = find_template(arguments.template)
        if path != arguments.template:
            print(f"{arguments.template} is not here: using the packaged template {path}")
        template = load_template(path, arguments.host, arguments.base_port)
    else:
        host = arguments.host if arguments.host is not None else "127.0.0.1"
        template = template_for(arguments.replicas, None, host, arguments.base_port if arguments.base_port is not None else 7100)
    written = write_network(template, arguments.out, arguments.force)
    count = len(template.addresses)
    faults = (count - 1) // 3
    print(f"wrote network {template.network_id!r}: {count} replicas, tolerates f={faults}, {len(written)} files in {arguments.out}")
    print(f"start it with:  ledger-node up {arguments.out}")
    print(f"then try:       ledger-client -c {arguments.out / 'client.toml'} status")
    return 0


def command_simulate(arguments: argparse.Namespace) -> int:
    import time

    from node.simulator import run_seed

    if arguments.jobs < 1 or arguments.progress_every < 1:
        raise ConfigError("simulate: --jobs and --progress-every must be at least 1")
    seeds = [arguments.seed] if arguments.seed is not None else list(range(arguments.first, arguments.first + arguments.seeds))
    from node.traitors import BEHAVIOURS

    unknown = set(arguments.exclude) - set(BEHAVIOURS) - {"racing_nonces"}
    if unknown:
        raise ConfigError(f"simulate: unknown behaviours to exclude: {', '.join(sorted(unknown))}; known: {', '.join(sorted(BEHAVIOURS))}, racing_nonces")
    runs = [(seed, replica_count, arguments.adversarial, arguments.exclude) for replica_count in arguments.replicas for seed in seeds]
    mode = "adversarial" if arguments.adversarial else "classic"
    print(f"simulating {len(runs)} runs ({mode}, replicas {','.join(map(str, arguments.replicas))}, {arguments.jobs} jobs)", flush=True)
    started = time.monotonic()
    failures = 0
    if arguments.jobs == 1:
        results = (run_seed(*run) for run in runs)
        pool = None
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(arguments.jobs)
        results = pool.imap(_run_seed_tuple, runs, chunksize=4)
    try:
        for done, (_seed, _replica_count, failure, report) in enumerate(results, start=1):
            if failure is not None:
                failures += 1
                print(f"FAIL {failure}", flush=True)
            elif arguments.seed is not None:
                print(report)
            if done % arguments.progress_every == 0 or done == len(runs):
                elapsed = time.monotonic() - started
                print(f"{done}/{len(runs)} runs, {failures} failed, {elapsed:.0f}s, {done / max(elapsed, 1e-9):.1f} runs/s", flush=True)
    finally:
        if pool is not None:
            pool.terminate()
    return 1 if failures else 0


def _run_seed_tuple(run: tuple[int, int, bool, tuple[str, ...]]) -> tuple[int, int, str | None, object]:
    from node.simulator import run_seed

    return run_seed(*run)


if __name__ == "__main__":
    sys.exit(main())
