"""`ledger-node up DIR`: run every replica of a network directory as child processes on this machine."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from ledger.config import Address, ConfigError, ReplicaConfig, load_replica_config
from ledger.storage import DataDirectoryLock
from node.http import http_get

STOP_GRACE_S = 10.0
READY_DEADLINE_S = 30.0
HEALTH_POLL_INTERVAL_S = 0.2
HEALTH_REQUEST_TIMEOUT_S = 5.0
HEALTH_REASON_LENGTH_MAX = 200


def find_replica_configs(directory: Path, only: list[int] | None) -> list[ReplicaConfig]:
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory (create one with `ledger-node init`)")
    paths = sorted(directory.glob("replica-*.toml"), key=lambda path: int(path.stem.split("-")[1]) if path.stem.split("-")[1].isdigit() else -1)
    if not paths:
        raise ConfigError(f"{directory}: no replica-<i>.toml files (create them with `ledger-node init`)")
    configs = [load_replica_config(path) for path in paths]
    if only is not None:
        unknown = set(only) - {config.replica_id for config in configs}
        if unknown:
            raise ConfigError(f"--only: no replica {sorted(unknown)[0]} in {directory}")
        configs = [config for config in configs if config.replica_id in only]
    return configs


async def _wait_ready(config: ReplicaConfig, process: trio.Process) -> bool:
    """Whether the process we started is the replica listening: its data directory's lock names
    it as holder and listening, and it still runs. A port answering proves nothing: another
    process (another `up`, anything) may hold it, and then our replica fails to start."""
    with trio.move_on_after(READY_DEADLINE_S):
        while process.returncode is None:
            if DataDirectoryLock.ready_holder(config.data_dir) == process.pid:
                return True
            await trio.sleep(0.05)
    return False


async def _wait_healthy(address: Address, process: trio.Process) -> tuple[bool, str]:
    """Whether the replica's /health said ok within READY_DEADLINE_S, and what it said last.
    Asked only once _wait_ready proved the replica is ours: it listened on this port before
    marking itself ready, so nothing else can be answering there."""
    said = "no answer"
    with trio.move_on_after(READY_DEADLINE_S):
        while process.returncode is None:
            try:
                with trio.fail_after(HEALTH_REQUEST_TIMEOUT_S):
                    status, body = await http_get(address, "/health")
                health = json.loads(body)
                if status == 200:
                    return True, _printable(f"{health['peers']} peers connected, height {health['height']}, view {health['view']}")
                said = str(health.get("reason", f"HTTP {status}"))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, trio.BrokenResourceError, trio.TooSlowError) as error:
                said = f"no answer ({error})"
            await trio.sleep(HEALTH_POLL_INTERVAL_S)
    return False, _printable(said)


def _printable(text: str) -> str:
    """At most HEALTH_REASON_LENGTH_MAX printable characters: nothing to move the terminal's cursor."""
    return "".join(character if character.isprintable() else "?" for character in text)[:HEALTH_REASON_LENGTH_MAX]


async def run_network(
    directory: Path, only: list[int] | None, log_level: str, log_format: str = "text", traitors: dict[int, list[str]] | None = None
) -> int:
    configs = find_replica_configs(directory, only)
    network = configs[0].network
    traitors = traitors or {}
    started_ids = {config.replica_id for config in configs}
    for replica_id in sorted(traitors):
        if replica_id not in started_ids:
            raise ConfigError(f"--traitor: replica {replica_id} is not among the replicas started ({', '.join(map(str, sorted(started_ids)))})")
    # Checked before any log is opened: a replica that is already running (another `up` or
    # `run`) keeps its store, its log and its ports; each replica also locks its own directory.
    for config in configs:
        holder = DataDirectoryLock.holder_if_locked(config.data_dir)
        if holder is not None:
            print(
                f"ledger-node: replica {config.replica_id} is already running ({holder} holds {config.data_dir}); "
                "stop it first, or start the others with --only",
                file=sys.stderr,
                flush=True,
            )
            return 1
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    print(
        f"starting {len(configs)} of {network.replica_count} replicas of {network.network_id!r} "
        f"(tolerates f={network.faults_tolerated}); logs in {logs}/",
        flush=True,
    )
    if len(configs) < network.quorum:
        verb = "is" if len(configs) == 1 else "are"
        print(
            f"warning: {len(configs)} of {network.replica_count} replicas {verb} fewer than a quorum ({network.quorum}): "
            "nothing commits until replicas elsewhere make up the rest",
            flush=True,
        )
    for replica_id, specs in sorted(traitors.items()):
        print(f"replica {replica_id} runs as a TRAITOR: {' + '.join(specs)}", flush=True)
    if len(traitors) > network.faults_tolerated:
        print(
            f"warning: {len(traitors)} traitors are more than this network tolerates (f={network.faults_tolerated}): "
            "safety and liveness are no longer guaranteed",
            flush=True,
        )
    processes: dict[int, trio.Process] = {}
    stopping = trio.Event()
    all_exited = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # Spawn every replica before handling any signal: a Ctrl-C that arrives meanwhile waits in
        # the receiver, so no replica can be started after the others were told to stop.
        for config in configs:
            log_path = logs / f"replica-{config.replica_id}.log"
            traitor_arguments = [argument for spec in traitors.get(config.replica_id, []) for argument in ("--traitor", spec)]
            with log_path.open("ab") as log_file:
                processes[config.replica_id] = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "node.cli", "--log-level", log_level, "--log-format", log_format, "run", str(config.path), *traitor_arguments],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
        print(f"Ctrl-C stops every replica; submit with: ledger-client -c {directory / 'client.toml'} status", flush=True)
        async with trio.open_nursery() as nursery:

            async def supervise(config: ReplicaConfig, process: trio.Process) -> None:
                nursery.start_soon(report_ready, config, process)
                code = await process.wait()
                if not stopping.is_set():
                    log_path = logs / f"replica-{config.replica_id}.log"
                    print(f"replica {config.replica_id} exited with code {code}; see {log_path}", flush=True)
                    if all(other.returncode is not None for other in processes.values()):
                        print("every replica has exited; stopping", flush=True)
                        all_exited.set()

            async def report_ready(config: ReplicaConfig, process: trio.Process) -> None:
                replica = network.replicas[config.replica_id]
                if await _wait_ready(config, process):
                    metrics = "" if config.metrics_address is None else f"  metrics {config.metrics_address}"
                    print(
                        f"replica {config.replica_id}  pid {process.pid:<7}  peers {replica.address}  "
                        f"clients {replica.client_address}{metrics}  log {logs / f'replica-{config.replica_id}.log'}",
                        flush=True,
                    )
                    if config.metrics_address is not None:
                        healthy, said = await _wait_healthy(config.metrics_address, process)
                        if healthy:
                            print(f"replica {config.replica_id} healthy: {said}", flush=True)
                        elif process.returncode is None:
                            print(f"replica {config.replica_id} not healthy after {READY_DEADLINE_S:g}s: {said}", flush=True)
                elif process.returncode is None:
                    print(f"replica {config.replica_id} is not answering after {READY_DEADLINE_S:g}s", flush=True)

            for config in configs:
                nursery.start_soon(supervise, config, processes[config.replica_id])

            async def wait_for_signal() -> None:
                async for signal_number in signals:
                    print(f"\n{signal.Signals(signal_number).name}: stopping all replicas", flush=True)
                    return

            async with trio.open_nursery() as waiters:
                # Whichever comes first: Ctrl-C/SIGTERM, or every replica gone by itself.
                async def first(wait: Any) -> None:
                    await wait()
                    waiters.cancel_scope.cancel()

                waiters.start_soon(first, wait_for_signal)
                waiters.start_soon(first, all_exited.wait)
            stopping.set()
            nursery.cancel_scope.cancel()
        await _stop_all(processes)
    if all_exited.is_set():
        return 1
    print("all replicas stopped", flush=True)
    return 0


async def _stop_all(processes: dict[int, trio.Process]) -> None:
    """SIGTERM every replica, wait for them, and SIGKILL any that outlast the grace period."""
    with trio.CancelScope(shield=True):
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE_S):
            for process in processes.values():
                await process.wait()
        for replica_id, process in processes.items():
            if process.returncode is None:
                print(f"replica {replica_id} did not stop in {STOP_GRACE_S:g}s; killing it", flush=True)
                process.kill()
                await process.wait()


def run_network_main(
    directory: Path, only: list[int] | None, log_level: str, log_format: str = "text", traitors: dict[int, list[str]] | None = None
) -> int:
    return trio.run(run_network, directory, only, log_level, log_format, traitors)
