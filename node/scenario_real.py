"""The real-process backend of `ledger-scenario run`: a scenario file against n `ledger-node run` processes.

A temporary network directory (fast protocol settings, free ports on 127.0.0.1) gets one process
per replica, each in its own process group; traitors run with `--traitor SPEC`. The timeline
kills (SIGKILL), stops (SIGSTOP) and restarts (a new process, or SIGCONT) them while library
clients submit the workload. Afterwards every honest replica's chain is downloaded, verified
from genesis (client.verify_chain re-executes it) and handed to the verdict code
(node/verdict.py) with the receipts the clients accepted. Every wait is bounded; every process
is stopped and the directory removed whatever happens, Ctrl-C included.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from client.library import Client, ClientError, open_client
from client.quorum import Receipt
from ledger.blocks import Block, ChainError
from ledger.config import (
    ConfigError,
    NetworkConfig,
    ProtocolSettings,
    protocol_problem,
    template_for,
    write_network,
)
from ledger.crypto import NetworkIdentity, SigningKey
from ledger.transactions import Put, sign_transaction
from node import ports
from node.ports import HOST, PORT_RANGE, PORTS_PER_REPLICA
from node.scenarios import ScenarioFile, Setup
from node.traitors import format_behaviour_spec
from node.verdict import BrokenInvariant, RunRecord, TraitorReport

Progress = Callable[[str], None]

# Real time is dear: a file's time limit is honoured up to this many milliseconds.
REAL_TIME_LIMIT_MS_MAX = 60_000
STARTUP_DEADLINE_S = 30.0
SETTLE_DEADLINE_S = 15.0  # for the honest replicas (a restarted one too) to reach one tip
COLLECT_DEADLINE_S = 60.0  # to download and verify every honest chain
STOP_DEADLINE_S = 10.0  # after SIGTERM, before SIGKILL
SUBMIT_RETRY_PAUSE_S = 0.1
STATUS_POLL_S = 0.2
LOG_TAIL_LINES = 8
LOG_READ_BYTES_MAX = 64 * 1024 * 1024
# Short timeouts so a silent primary is replaced within about a second (as the integration tests do).
FAST_PROTOCOL = ProtocolSettings(
    batch_size_max=200,
    batch_wait_ms=5,
    window_size=32,
    request_timeout_ms=600,
    view_change_timeout_ms=1000,
    checkpoint_interval=16,
    status_interval_ms=200,
)
# What an unmodified replica process cannot be made to do (yet): the simulator can.
UNSUPPORTED_EVENTS = ("partition", "heal")
UNSUPPORTED_BEHAVIOURS = ("twins",)
NODE_COMMAND = (sys.executable, "-m", "node.cli")


class RealRunError(Exception):
    """The network could not be run (a replica did not start, a deadline passed); one line, plus log tails."""


def real_mode_refusal(scenario: ScenarioFile, setup: Setup) -> str | None:
    """Why real processes cannot run this setup, or None when they can."""
    for event in setup.timeline:
        if event.event in UNSUPPORTED_EVENTS:
            return f"event {event.event} (at {event.at_ms} ms) cannot be done with unmodified replica processes yet"
    last_event_ms = max((event.at_ms for event in setup.timeline), default=0)
    if last_event_ms > REAL_TIME_LIMIT_MS_MAX:
        return f"its timeline runs to {last_event_ms} ms, past the {REAL_TIME_LIMIT_MS_MAX} ms real processes are given"
    if setup.collusion_side:
        return "collusion_side (a coalition's second signed history) cannot be done with unmodified replica processes yet"
    for traitor in setup.traitors:
        for behaviour in traitor.behaviours:
            if behaviour.name in UNSUPPORTED_BEHAVIOURS:
                return f"behaviour {behaviour.name} (replica {traitor.replica_id}) needs a second instance of the replica: not with real processes yet"
    return None


def pick_base_port(replica_count: int, generator: random.Random) -> int:
    base = ports.pick_base_port(replica_count, generator)
    if base is None:
        raise RealRunError(f"no {PORTS_PER_REPLICA * replica_count} consecutive free ports found in {PORT_RANGE[0]}-{PORT_RANGE[1]} on {HOST}")
    return base


def write_fast_network(directory: Path, replica_count: int, network_id: str) -> None:
    template = template_for(replica_count, network_id, HOST, pick_base_port(replica_count, random.Random()))
    problem = protocol_problem(replica_count, FAST_PROTOCOL)
    if problem is not None:
        raise RealRunError(f"fast protocol settings do not fit {replica_count} replicas: {problem}")
    write_network(dataclasses.replace(template, protocol=FAST_PROTOCOL), directory)
    (directory / "logs").mkdir()


@dataclass(eq=False)
class ReplicaProcesses:
    """One `ledger-node run` per replica, each in its own process group, logging to logs/replica-N.log."""

    directory: Path
    replica_count: int
    arguments: dict[int, list[str]]  # more `ledger-node run` arguments per replica (the traitors')
    processes: dict[int, trio.Process] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)

    def log_path(self, replica_id: int) -> Path:
        return self.directory / "logs" / f"replica-{replica_id}.log"

    async def start(self, replica_id: int) -> None:
        with self.log_path(replica_id).open("ab") as log:
            self.processes[replica_id] = await trio.lowlevel.open_process(
                [*NODE_COMMAND, "run", str(self.directory / f"replica-{replica_id}.toml"), *self.arguments.get(replica_id, [])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, replica_id: int, signal_number: signal.Signals) -> None:
        process = self.processes[replica_id]
        if process.returncode is None:
            try:
                os.killpg(process.pid, signal_number)
            except ProcessLookupError:
                pass

    async def kill(self, replica_id: int) -> None:
        self.signal(replica_id, signal.SIGKILL)
        await self.processes[replica_id].wait()

    def stop(self, replica_id: int) -> None:
        self.signal(replica_id, signal.SIGSTOP)
        self.stopped.add(replica_id)

    async def restart(self, replica_id: int) -> None:
        if replica_id in self.stopped:
            self.signal(replica_id, signal.SIGCONT)
            self.stopped.discard(replica_id)
        elif self.processes[replica_id].returncode is not None:
            await self.start(replica_id)

    def exited(self) -> dict[int, int]:
        return {replica_id: process.returncode for replica_id, process in self.processes.items() if process.returncode is not None}

    async def stop_all(self) -> None:
        """SIGCONT and SIGTERM to every group; SIGKILL what is still there after STOP_DEADLINE_S."""
        with trio.CancelScope(shield=True):
            for replica_id in self.processes:
                self.signal(replica_id, signal.SIGCONT)
                self.signal(replica_id, signal.SIGTERM)
            with trio.move_on_after(STOP_DEADLINE_S):
                for process in self.processes.values():
                    await process.wait()
            for replica_id, process in self.processes.items():
                self.signal(replica_id, signal.SIGKILL)
                await process.wait()

    def log_text(self, replica_id: int) -> str:
        try:
            with self.log_path(replica_id).open("rb") as log:
                return log.read(LOG_READ_BYTES_MAX).decode(errors="replace")
        except OSError:
            return ""

    def log_tails(self) -> str:
        parts = []
        for replica_id in range(self.replica_count):
            tail = self.log_text(replica_id).splitlines()[-LOG_TAIL_LINES:]
            parts.append(f"--- replica {replica_id} ({self.log_path(replica_id).name})\n" + ("\n".join(tail) or "(empty log)"))
        return "\n".join(parts)


def logged_rejections(text: str) -> dict[str, int]:
    """Why a replica refused messages, from its log lines `... rejected: REASON: detail`.

    The runtime logs at most 20 such lines a second (node/runtime.py), so these are lower bounds."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        position = line.find(" rejected: ")
        if position < 0:
            continue
        reason = line[position + len(" rejected: "):].split(": ", 1)[0].strip()
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


@dataclass(eq=False)
class Workload:
    """Every client's transactions (puts from fresh accounts: they need no funds), `in_flight` at a time,
    spread over the timeline so that faults hit transactions in flight."""

    network: NetworkIdentity
    deadline: float  # trio time by which every transaction must be confirmed
    total: int
    started: float
    spread_s: float  # a submitter's transactions go out evenly over this long (the timeline's span)
    submitted: int = 0
    receipts: list[Receipt] = field(default_factory=list)
    failed_receipts: list[str] = field(default_factory=list)
    unconfirmed: int = 0
    last_receipt: float | None = None

    async def submitter(self, client: Client, client_index: int, submitter_index: int, count: int) -> None:
        key = SigningKey.generate()
        for nonce in range(count):
            # Real replicas are fast: without spreading, the workload could end before the first fault.
            await trio.sleep_until(self.started + self.spread_s * nonce / count)
            transaction = sign_transaction(self.network, key, nonce, Put(f"c{client_index}-s{submitter_index}", f"value {nonce}"))
            self.submitted += 1
            receipt = None
            while receipt is None and trio.current_time() < self.deadline:
                try:
                    # The same signed transaction each time: it executes at most once.
                    receipt = await client.submit(transaction, deadline_s=max(self.deadline - trio.current_time(), 0.0))
                except ClientError:
                    await trio.sleep(SUBMIT_RETRY_PAUSE_S)
            if receipt is None:
                self.unconfirmed += count - nonce
                return
            self.receipts.append(receipt)
            self.last_receipt = trio.current_time()
            if not receipt.result.ok:
                self.failed_receipts.append(f"transaction {receipt.transaction_id.hex()[:12]} got a failed receipt: {receipt.result.reason}")

    async def run_client(self, config_path: Path, client_index: int, transactions: int, in_flight: int) -> None:
        async with open_client(config_path) as client:
            shares = [transactions // in_flight + (1 if index < transactions % in_flight else 0) for index in range(in_flight)]
            async with trio.open_nursery() as nursery:
                for index, share in enumerate(shares):
                    if share:
                        nursery.start_soon(self.submitter, client, client_index, index, share)


async def _run_timeline(replicas: ReplicaProcesses, setup: Setup, started: float, progress: Progress) -> None:
    for event in sorted(setup.timeline, key=lambda event: event.at_ms):
        await trio.sleep_until(started + event.at_ms / 1000)
        for replica_id in event.replicas:
            if event.event == "kill":
                await replicas.kill(replica_id)
            elif event.event == "stop":
                replicas.stop(replica_id)
            elif event.event == "restart":
                await replicas.restart(replica_id)
        progress(f"at {event.at_ms} ms: {event.event} replicas {', '.join(map(str, event.replicas))}")


async def _settle(client: Client, honest: list[int], minimum_height: int, progress: Progress) -> None:
    """Until the honest replicas report one tip at least `minimum_height` high (bounded)."""
    with trio.move_on_after(SETTLE_DEADLINE_S):
        while True:
            statuses = [status for status in await client.status(wait_s=1.0) if status.replica_id in honest]
            tips = {(status.height, status.last_block_hash) for status in statuses}
            if all(status.reachable for status in statuses) and len(tips) == 1 and statuses[0].height >= minimum_height:
                return
            await trio.sleep(STATUS_POLL_S)
    progress(f"the honest replicas did not reach one tip within {SETTLE_DEADLINE_S:g} s: comparing the chains as they are")


async def _fetch_chain(client: Client, replica_id: int) -> list[Block]:
    chain: list[Block] = []
    while True:
        blocks = await client.fetch_blocks(replica_id, len(chain) + 1)
        if not blocks:
            return chain
        for block in blocks:
            if block.height != len(chain) + 1:
                raise ChainError(f"replica {replica_id} served block {block.height} where {len(chain) + 1} was asked")
            chain.append(block)


@dataclass
class Collected:
    views: dict[int, int] = field(default_factory=dict)
    chains: dict[int, list[Block]] = field(default_factory=dict)
    broken: BrokenInvariant | None = None


async def _collect(client: Client, honest: list[int], minimum_height: int, progress: Progress) -> Collected:
    collected = Collected()
    await _settle(client, honest, minimum_height, progress)
    for status in await client.status(wait_s=1.0):
        if status.replica_id in honest and status.reachable:
            collected.views[status.replica_id] = status.view
    for replica_id in honest:
        try:
            report = await client.verify_chain(replica_id)
            collected.chains[replica_id] = await _fetch_chain(client, replica_id)
        except ChainError as error:
            if collected.broken is None:
                collected.broken = BrokenInvariant("validity", f"honest replica {replica_id}'s chain does not verify: {error}")
            continue
        except ClientError as error:
            progress(f"replica {replica_id} did not serve its chain ({error}): left out of the comparison")
            continue
        progress(f"replica {replica_id}: chain verified from genesis, height {report.height}, {report.transactions} transactions")
    return collected


async def _run(
    directory: Path, scenario: ScenarioFile, setup: Setup, seed: int, progress: Progress
) -> tuple[Workload, Collected, float, ReplicaProcesses, NetworkConfig]:
    replica_count = setup.replica_count
    network_id = f"scenario-{replica_count}"
    write_fast_network(directory, replica_count, network_id)
    arguments: dict[int, list[str]] = {}
    for traitor in setup.traitors:
        arguments[traitor.replica_id] = [
            *(part for behaviour in traitor.behaviours for part in ("--traitor", format_behaviour_spec(behaviour))),
            "--traitor-seed",
            str(seed),
        ]
    replicas = ReplicaProcesses(directory, replica_count, arguments)
    traitor_ids = {traitor.replica_id for traitor in setup.traitors}
    honest = [replica_id for replica_id in range(replica_count) if replica_id not in traitor_ids]
    workload_spec = scenario.workload
    time_limit_s = min(scenario.network.time_limit_ms, REAL_TIME_LIMIT_MS_MAX) / 1000
    config_path = directory / "client.toml"
    try:
        progress(f"starting {replica_count} `ledger-node run` processes in {directory} ({len(setup.traitors)} traitor(s))")
        for replica_id in range(replica_count):
            await replicas.start(replica_id)
        async with open_client(config_path) as client:
            network = client.network
            try:
                with trio.fail_after(STARTUP_DEADLINE_S):
                    while sum(status.reachable for status in await client.status(wait_s=0.5)) < replica_count:
                        if replicas.exited():
                            raise RealRunError(f"replica processes exited while starting: {replicas.exited()}")
                        await trio.sleep(0.05)
            except trio.TooSlowError:
                raise RealRunError(f"not every replica answered within {STARTUP_DEADLINE_S:g} s") from None
            started = trio.current_time()
            total = workload_spec.clients * workload_spec.transactions_per_client
            spread_s = max((event.at_ms for event in setup.timeline), default=0) / 1000
            workload = Workload(network.identity, started + time_limit_s, total, started, spread_s)
            progress(
                f"every replica answers; running the timeline ({len(setup.timeline)} event(s)) and {total} transactions "
                f"({workload_spec.clients} clients, {workload_spec.in_flight} in flight each), deadline {time_limit_s:g} s"
            )
            try:
                with trio.fail_after(time_limit_s + STARTUP_DEADLINE_S):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_run_timeline, replicas, setup, started, progress)
                        for client_index in range(workload_spec.clients):
                            nursery.start_soon(
                                workload.run_client, config_path, client_index, workload_spec.transactions_per_client, workload_spec.in_flight
                            )
            except trio.TooSlowError:
                raise RealRunError(f"the workload and timeline did not end within {time_limit_s + STARTUP_DEADLINE_S:g} s") from None
            progress(f"{len(workload.receipts)} of {workload.submitted} transactions confirmed; collecting the honest replicas' chains")
            minimum_height = max((receipt.height for receipt in workload.receipts), default=0)
            try:
                with trio.fail_after(COLLECT_DEADLINE_S):
                    collected = await _collect(client, honest, minimum_height, progress)
            except trio.TooSlowError:
                raise RealRunError(f"the honest chains were not collected within {COLLECT_DEADLINE_S:g} s") from None
    finally:
        progress("stopping every replica process (SIGTERM, then SIGKILL after a bound)")
        await replicas.stop_all()
    return workload, collected, started, replicas, network


def run_real_processes(scenario: ScenarioFile, setup: Setup, seed: int, progress: Progress) -> RunRecord:
    """Run the scenario against real replica processes; the directory it makes is removed afterwards."""
    refusal = real_mode_refusal(scenario, setup)
    if refusal is not None:
        raise RealRunError(f"scenario {scenario.name}: {refusal}; `--sim` runs it")
    parent = Path(tempfile.mkdtemp(prefix="ledger-scenario-"))
    directory = parent / "net"
    begun = time.perf_counter()
    try:
        try:
            workload, collected, started, replicas, network = trio.run(_run, directory, scenario, setup, seed, progress)
        except (RealRunError, ConfigError, OSError) as error:
            tails = ReplicaProcesses(directory, setup.replica_count, {}).log_tails() if (directory / "logs").is_dir() else ""
            raise RealRunError(f"{error}" + (f"\n{tails}" if tails else "")) from None
        except BaseExceptionGroup as group:
            # Ctrl-C lands in whichever task was running: one KeyboardInterrupt for the caller.
            if group.subgroup(KeyboardInterrupt) is not None:
                raise KeyboardInterrupt from None
            raise
        traitor_ids = {traitor.replica_id for traitor in setup.traitors}
        rejections: dict[str, int] = {}
        for replica_id in range(setup.replica_count):
            if replica_id not in traitor_ids:
                for reason, count in logged_rejections(replicas.log_text(replica_id)).items():
                    rejections[reason] = rejections.get(reason, 0) + count
        traitors = []
        for traitor in setup.traitors:
            behaviours = " + ".join(behaviour.describe() for behaviour in traitor.behaviours) or "no behaviour of its own"
            if "is a TRAITOR" not in replicas.log_text(traitor.replica_id) and traitor.behaviours:
                behaviours += " (but its log never announced it)"
            traitors.append(TraitorReport(traitor.replica_id, behaviours, {}))
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    broken = collected.broken
    if broken is None and workload.failed_receipts:
        broken = BrokenInvariant("validity", workload.failed_receipts[0])
    if broken is None and workload.unconfirmed:
        broken = BrokenInvariant(
            "liveness", f"{workload.unconfirmed} of {workload.total} transactions not confirmed within {workload.deadline - started:g} s"
        )
    return RunRecord(
        scenario=scenario.name,
        backend="real processes",
        replica_count=setup.replica_count,
        seed=seed,
        network_id=network.network_id,
        replica_keys=tuple(network.replica_keys),
        genesis_hash=network.genesis_hash,
        submitted=workload.submitted,
        receipts=workload.receipts,
        views=collected.views,
        chains=collected.chains,
        traitors=tuple(traitors),
        rejections=rejections,
        broken=broken,
        elapsed_s=time.perf_counter() - begun,
        confirmed_by_ms=None if workload.last_receipt is None else round((workload.last_receipt - started) * 1000),
    )
