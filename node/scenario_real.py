"""The real-process backend of `ledger-scenario run`: a scenario file against n `ledger-node run` processes.

A temporary network directory (fast protocol settings, free ports on 127.0.0.1) gets one process
per replica, each in its own process group; traitors run with `--traitor SPEC`, and a twin is a
second honest process with its replica's key. Every replica-to-replica link goes through the
runner's link proxy (node/link_proxy.py): each process's config file names, as its peers'
addresses, the proxy listeners of its own links, which forward to the peer (or, for a twinned
peer, to the twin serving this side) after the file's network delay. The timeline kills (SIGKILL),
stops (SIGSTOP) and restarts (a new process, or SIGCONT) them, and partitions and heals them at
the proxy, while library clients (which reach the replicas directly) submit the workload. With
`--hosts` each process runs in a network namespace of its own (node/host_network.py) and a
partition takes its link down instead. Afterwards every honest replica's chain is downloaded, verified
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

from client import ports
from client.library import Client, ClientError, open_client
from client.ports import HOST, PORT_RANGE, PORTS_PER_REPLICA
from client.quorum import Receipt
from ledger.blocks import Block, ChainError
from ledger.config import (
    Address,
    ConfigError,
    NetworkConfig,
    ProtocolSettings,
    load_client_config,
    load_replica_config,
    network_toml,
    protocol_problem,
    template_for,
    write_network,
)
from ledger.crypto import NetworkIdentity, SigningKey
from ledger.transactions import Put, sign_transaction
from node.host_network import HostNetwork, HostNetworkError, hosts_mode_refusal
from node.link_proxy import LinkProxy
from node.scenarios import ScenarioFile, Setup
from node.scenarios import Workload as WorkloadSpec
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
    ordering_timeout_ms=300,
    checkpoint_interval=16,
    status_interval_ms=200,
    # A replica joining (a `join` event) more than one checkpoint behind fetches a snapshot.
    state_sync_distance=16,
)
NODE_COMMAND = (sys.executable, "-m", "node.cli")
# In --hosts mode every replica process has an address of its own, so all use the same ports.
HOSTS_PEER_PORT = 7100


class RealRunError(Exception):
    """The network could not be run (a replica did not start, a deadline passed); one line, plus log tails."""


def real_mode_refusal(scenario: ScenarioFile, setup: Setup) -> str | None:
    """Why real processes cannot run this setup, or None when they can."""
    last_event_ms = max((event.at_ms for event in setup.timeline), default=0)
    if last_event_ms > REAL_TIME_LIMIT_MS_MAX:
        return f"its timeline runs to {last_event_ms} ms, past the {REAL_TIME_LIMIT_MS_MAX} ms real processes are given"
    if setup.collusion_side:
        # node/collusion.py signs each slot twice with every colluder's key in one place; separate
        # processes would need a coordinator of their own, a second traitor runtime beside the real one.
        return "collusion_side (a coalition signing a second history with all its keys at once) runs only in the simulator"
    for traitor in setup.traitors:
        names = [behaviour.name for behaviour in traitor.behaviours]
        if "twins" in names and len(names) > 1:
            return f"replica {traitor.replica_id}: twins with other behaviours (the twins are two honest processes) runs only in the simulator"
    return None


def pick_base_port(replica_count: int, generator: random.Random) -> int:
    base = ports.pick_base_port(replica_count, generator)
    if base is None:
        raise RealRunError(f"no {PORTS_PER_REPLICA * replica_count} consecutive free ports found in {PORT_RANGE[0]}-{PORT_RANGE[1]} on {HOST}")
    return base


def write_fast_network(directory: Path, replica_count: int, network_id: str) -> NetworkConfig:
    """Keys and config files for the network; their addresses are placeholders, rewritten per process
    by write_process_configs once the ports are picked and the proxy listens."""
    template = template_for(replica_count, network_id, HOST)
    problem = protocol_problem(replica_count, FAST_PROTOCOL)
    if problem is not None:
        raise RealRunError(f"fast protocol settings do not fit {replica_count} replicas: {problem}")
    write_network(dataclasses.replace(template, protocol=FAST_PROTOCOL), directory)
    (directory / "logs").mkdir()
    return load_client_config(directory / "client.toml").network


@dataclass(frozen=True)
class Instance:
    """One replica process: a replica's key run once, or its twin (a second process with the same key)."""

    replica_id: int
    twin: bool = False

    @property
    def name(self) -> str:
        return f"replica-{self.replica_id}" + ("-twin" if self.twin else "")


@dataclass(frozen=True)
class LinkPlan:
    """Which process each ordered link reaches. A twinned replica's twin serves the peers on its
    side and its first process the rest, each talking only to its own peers (as the simulator does)."""

    replica_count: int
    twin_sides: dict[int, tuple[int, ...]]

    @classmethod
    def for_setup(cls, setup: Setup) -> LinkPlan:
        sides = {}
        for traitor in setup.traitors:
            for behaviour in traitor.behaviours:
                if behaviour.name == "twins":
                    sides[traitor.replica_id] = tuple(dict(behaviour.parameters).get("side", ()))
        return cls(setup.replica_count, sides)

    @property
    def instances(self) -> list[Instance]:
        return [Instance(replica_id) for replica_id in range(self.replica_count)] + [Instance(replica_id, True) for replica_id in sorted(self.twin_sides)]

    def serves(self, instance: Instance, peer: int) -> bool:
        side = self.twin_sides.get(instance.replica_id)
        return side is None or (peer in side) == instance.twin

    def instance_for(self, receiver: int, sender: int) -> Instance:
        side = self.twin_sides.get(receiver)
        return Instance(receiver, side is not None and sender in side)

    def target(self, instance: Instance, peer: int) -> Instance | None:
        """The process `instance` reaches when it dials `peer`, or None (the twin on the other side talks to it)."""
        return self.instance_for(peer, instance.replica_id) if self.serves(instance, peer) else None

    @staticmethod
    def link_name(instance: Instance, peer: int) -> str:
        return f"{instance.name}->{peer}"

    def links_of(self, replica_id: int) -> list[str]:
        """Every link into or out of any process of `replica_id` (what a partition of it cuts)."""
        names = []
        for instance in self.instances:
            for peer in range(self.replica_count):
                if peer != instance.replica_id and (instance.replica_id == replica_id or peer == replica_id):
                    names.append(self.link_name(instance, peer))
        return names


def write_process_configs(
    directory: Path, network: NetworkConfig, plan: LinkPlan, addresses: dict[str, tuple[Address, Address]], proxy: LinkProxy
) -> None:
    """One config file per process: its own addresses, and its peers at its links' proxy listeners;
    and client.toml with every replica's real client address. Each file is read back (validated)."""
    originals = {instance.replica_id: addresses[instance.name] for instance in plan.instances if not instance.twin}
    for instance in plan.instances:
        replicas = []
        for replica in network.replicas:
            if replica.replica_id == instance.replica_id:
                peer_address, client_address = addresses[instance.name]
            else:
                link = proxy.link(plan.link_name(instance, replica.replica_id))
                peer_address, client_address = Address(proxy.host, link.listen_port), originals[replica.replica_id][1]
            replicas.append(dataclasses.replace(replica, address=peer_address, client_address=client_address))
        text = (
            f"# {instance.name} of a scenario run: its peers are reached through the runner's link proxy\n"
            f'[replica]\nid = {instance.replica_id}\nkey_file = "replica-{instance.replica_id}.key"\ndata_dir = "data/{instance.name}"\n\n'
            + network_toml(dataclasses.replace(network, replicas=tuple(replicas)))
        )
        (directory / f"{instance.name}.toml").write_text(text)
    clients = tuple(dataclasses.replace(replica, address=originals[replica.replica_id][0], client_address=originals[replica.replica_id][1]) for replica in network.replicas)
    (directory / "client.toml").write_text('[client]\nkey_file = "client.key"\n\n' + network_toml(dataclasses.replace(network, replicas=clients)))
    load_client_config(directory / "client.toml")
    for instance in plan.instances:
        if load_replica_config(directory / f"{instance.name}.toml").network.genesis_hash != network.genesis_hash:
            raise RealRunError(f"{instance.name}.toml describes another network than client.toml")


@dataclass(eq=False)
class ReplicaProcesses:
    """One `ledger-node run` per process, each in its own process group, logging to logs/NAME.log."""

    directory: Path
    names: list[str]  # every process: replica-N, and replica-N-twin for a twin
    arguments: dict[str, list[str]]  # more `ledger-node run` arguments per process (the traitors')
    prefixes: dict[str, list[str]] = field(default_factory=dict)  # what runs the command (`ip netns exec NS`)
    processes: dict[str, trio.Process] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)

    def log_path(self, name: str) -> Path:
        return self.directory / "logs" / f"{name}.log"

    async def start(self, name: str) -> None:
        with self.log_path(name).open("ab") as log:
            self.processes[name] = await trio.lowlevel.open_process(
                [*self.prefixes.get(name, []), *NODE_COMMAND, "run", str(self.directory / f"{name}.toml"), *self.arguments.get(name, [])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, name: str, signal_number: signal.Signals) -> None:
        process = self.processes[name]
        if process.returncode is None:
            try:
                os.killpg(process.pid, signal_number)
            except ProcessLookupError:
                pass

    async def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        await self.processes[name].wait()

    def stop(self, name: str) -> None:
        self.signal(name, signal.SIGSTOP)
        self.stopped.add(name)

    async def restart(self, name: str) -> None:
        if name in self.stopped:
            self.signal(name, signal.SIGCONT)
            self.stopped.discard(name)
        elif self.processes[name].returncode is not None:
            await self.start(name)

    def exited(self) -> dict[str, int]:
        return {name: process.returncode for name, process in self.processes.items() if process.returncode is not None}

    async def stop_all(self) -> None:
        """SIGCONT and SIGTERM to every group; SIGKILL what is still there after STOP_DEADLINE_S."""
        with trio.CancelScope(shield=True):
            for name in self.processes:
                self.signal(name, signal.SIGCONT)
                self.signal(name, signal.SIGTERM)
            with trio.move_on_after(STOP_DEADLINE_S):
                for process in self.processes.values():
                    await process.wait()
            for name, process in self.processes.items():
                self.signal(name, signal.SIGKILL)
                await process.wait()

    def log_text(self, name: str) -> str:
        try:
            with self.log_path(name).open("rb") as log:
                return log.read(LOG_READ_BYTES_MAX).decode(errors="replace")
        except OSError:
            return ""

    def log_tails(self) -> str:
        parts = []
        for name in self.names:
            tail = self.log_text(name).splitlines()[-LOG_TAIL_LINES:]
            parts.append(f"--- {name} ({self.log_path(name).name})\n" + ("\n".join(tail) or "(empty log)"))
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


@dataclass(eq=False)
class Faults:
    """What the timeline acts on: the processes, and the links (at the proxy, or in --hosts mode the hosts' links)."""

    replicas: ReplicaProcesses
    plan: LinkPlan
    proxy: LinkProxy
    hosts: HostNetwork | None
    host_index: dict[str, int]  # process name -> its host (namespace) number, in --hosts mode
    delay_ms: int = 0  # every link's own delay (the file's network.delay_ms_min), and its jitter
    jitter_ms: int = 0
    slowed: dict[int, int] = field(default_factory=dict)  # replica -> the delay its slow event adds
    partitioned: set[int] = field(default_factory=set)

    def set_slow(self, replica_id: int, delay_ms: int | None) -> str:
        """Add `delay_ms` to every link into or out of the replica (None: back to the links' own delay).
        A link between two slow replicas takes the larger delay, as in the simulator."""
        if delay_ms is None:
            self.slowed.pop(replica_id, None)
        else:
            self.slowed[replica_id] = delay_ms
        for instance in self.plan.instances:
            for peer in range(self.plan.replica_count):
                if peer != instance.replica_id and replica_id in (instance.replica_id, peer):
                    extra_ms = max(self.slowed.get(instance.replica_id, 0), self.slowed.get(peer, 0))
                    self.proxy.set_delay([self.plan.link_name(instance, peer)], self.delay_ms + extra_ms, self.jitter_ms)
        links = len(self.plan.links_of(replica_id))
        if delay_ms is None:
            return f"replica {replica_id}'s {links} links back to {self.delay_ms}+{self.jitter_ms} ms"
        return f"replica {replica_id}'s {links} links now {self.delay_ms + delay_ms}+{self.jitter_ms} ms at the proxy"

    async def set_partitioned(self, replica_id: int, partitioned: bool) -> str:
        """Cut the replica off (or heal it); what was seen of the cut, for the progress line."""
        if self.hosts is not None:
            states = []
            for instance in self.plan.instances:
                if instance.replica_id == replica_id:
                    index = self.host_index[instance.name]
                    states.append(f"{self.hosts.bridge_end(index)} was {self.hosts.link_state(index)}")
                    await self.hosts.set_connected(index, not partitioned)
            return ", ".join(states)
        links = [self.proxy.link(name) for name in self.plan.links_of(replica_id)]
        if partitioned:
            open_connections = sum(len(link.connections) for link in links)
            self.proxy.block(link.name for link in links)
            return f"its {len(links)} links blocked at the proxy, {open_connections} open connections cut"
        self.proxy.unblock(link.name for link in links)
        return f"while cut off, the proxy refused {sum(link.refused for link in links)} connections on its {len(links)} links so far"


async def _run_timeline(faults: Faults, setup: Setup, started: float, progress: Progress) -> None:
    replicas = faults.replicas
    for event in sorted(setup.timeline, key=lambda event: event.at_ms):
        await trio.sleep_until(started + event.at_ms / 1000)
        seen = []
        for replica_id in event.replicas:
            # A kill, stop or restart hits the replica's first process; its twin (if any) runs on.
            name = Instance(replica_id).name
            if event.event == "kill":
                await replicas.kill(name)
            elif event.event == "stop":
                replicas.stop(name)
            elif event.event == "restart":
                await replicas.restart(name)
            elif event.event == "join":
                await replicas.start(name)  # never started: its data directory is empty
            elif event.event == "slow":
                seen.append(faults.set_slow(replica_id, event.delay_ms))
            elif event.event == "partition":
                faults.partitioned.add(replica_id)
                seen.append(await faults.set_partitioned(replica_id, True))
            elif event.event == "heal":
                # A heal ends whatever the replica suffered: its partition, its slowness, or both.
                if replica_id in faults.slowed:
                    seen.append(faults.set_slow(replica_id, None))
                if replica_id in faults.partitioned:
                    faults.partitioned.discard(replica_id)
                    seen.append(await faults.set_partitioned(replica_id, False))
        detail = f" ({'; '.join(seen)})" if seen else ""
        by = f" by {event.delay_ms} ms" if event.event == "slow" else ""
        progress(f"at {event.at_ms} ms: {event.event} replicas {', '.join(map(str, event.replicas))}{by}{detail}")


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


async def _fetch_chain(client: Client, replica_id: int, base_height: int = 0) -> list[Block | None]:
    """The replica's stored chain; for a store that starts from a snapshot (state sync, or
    pruned) the heights below its base are None."""
    chain: list[Block | None] = [None] * max(0, base_height - 1)
    while True:
        blocks = await client.fetch_blocks(replica_id, len(chain) + 1)
        if not blocks:
            return chain
        if not chain and blocks[0].height > 1:
            chain = [None] * (blocks[0].height - 1)
        for block in blocks:
            if block.height != len(chain) + 1:
                raise ChainError(f"replica {replica_id} served block {block.height} where {len(chain) + 1} was asked")
            chain.append(block)


@dataclass
class Collected:
    views: dict[int, int] = field(default_factory=dict)
    chains: dict[int, list[Block | None]] = field(default_factory=dict)
    broken: BrokenInvariant | None = None


async def _collect(client: Client, honest: list[int], minimum_height: int, progress: Progress) -> Collected:
    collected = Collected()
    await _settle(client, honest, minimum_height, progress)
    bases: dict[int, int] = {}
    for status in await client.status(wait_s=1.0):
        if status.replica_id in honest and status.reachable:
            collected.views[status.replica_id] = status.view
            bases[status.replica_id] = status.base_height
    for replica_id in honest:
        try:
            chain = await _fetch_chain(client, replica_id, bases.get(replica_id, 0))
            base = next((block.height for block in chain if block is not None), 1)
            if base > 1:
                collected.chains[replica_id] = chain
                progress(
                    f"replica {replica_id}: its store starts from a snapshot at height {base} (state sync); "
                    f"its blocks from there, height {len(chain)}, are compared with the others'"
                )
                continue
            report = await client.verify_chain(replica_id)
            collected.chains[replica_id] = chain
        except ChainError as error:
            if collected.broken is None:
                collected.broken = BrokenInvariant("validity", f"honest replica {replica_id}'s chain does not verify: {error}")
            continue
        except ClientError as error:
            progress(f"replica {replica_id} did not serve its chain ({error}): left out of the comparison")
            continue
        progress(f"replica {replica_id}: chain verified from genesis, height {report.height}, {report.transactions} transactions")
    return collected


def process_addresses(plan: LinkPlan, hosts: HostNetwork | None) -> tuple[dict[str, tuple[Address, Address]], dict[str, int]]:
    """Each process's (peer, client) address, and in --hosts mode its host number."""
    instances = plan.instances
    if hosts is not None:
        index = {instance.name: position for position, instance in enumerate(instances)}
        return {
            instance.name: (Address(hosts.address(index[instance.name]), HOSTS_PEER_PORT), Address(hosts.address(index[instance.name]), HOSTS_PEER_PORT + 1))
            for instance in instances
        }, index
    base = pick_base_port(len(instances), random.Random())
    return {
        instance.name: (Address(HOST, base + 2 * position), Address(HOST, base + 2 * position + 1)) for position, instance in enumerate(instances)
    }, {}


async def _run(
    directory: Path,
    scenario: ScenarioFile,
    setup: Setup,
    seed: int,
    progress: Progress,
    hosts: HostNetwork | None = None,
    spread_s: float | None = None,
) -> tuple[Workload, Collected, float, ReplicaProcesses, NetworkConfig]:
    replica_count = setup.replica_count
    network_id = f"scenario-{replica_count}"
    generated = write_fast_network(directory, replica_count, network_id)
    plan = LinkPlan.for_setup(setup)
    addresses, host_index = process_addresses(plan, hosts)
    proxy = LinkProxy(HOST if hosts is None else hosts.bridge_address, seed)
    delay_ms, jitter_ms = scenario.network.delay_ms_min, scenario.network.delay_ms_max - scenario.network.delay_ms_min
    for instance in plan.instances:
        for peer in range(replica_count):
            if peer != instance.replica_id:
                target = plan.target(instance, peer)
                # In --hosts mode only the dialing process's own address may use its link.
                source_host = None if hosts is None else addresses[instance.name][0].host
                proxy.add_link(
                    plan.link_name(instance, peer), None if target is None else addresses[target.name][0], delay_ms, jitter_ms, source_host
                )
    arguments: dict[str, list[str]] = {}
    for traitor in setup.traitors:
        behaviours = [behaviour for behaviour in traitor.behaviours if behaviour.name != "twins"]
        if behaviours:
            arguments[Instance(traitor.replica_id).name] = [
                *(part for behaviour in behaviours for part in ("--traitor", format_behaviour_spec(behaviour))),
                "--traitor-seed",
                str(seed),
            ]
    prefixes = {} if hosts is None else {name: hosts.command_prefix(index) for name, index in host_index.items()}
    replicas = ReplicaProcesses(directory, [instance.name for instance in plan.instances], arguments, prefixes)
    traitor_ids = {traitor.replica_id for traitor in setup.traitors}
    honest = [replica_id for replica_id in range(replica_count) if replica_id not in traitor_ids]
    workload_spec = scenario.workload
    time_limit_s = min(scenario.network.time_limit_ms, REAL_TIME_LIMIT_MS_MAX) / 1000
    config_path = directory / "client.toml"
    async with trio.open_nursery() as proxy_nursery:
        await proxy_nursery.start(proxy.run)
        write_process_configs(directory, generated, plan, addresses, proxy)
        faults = Faults(replicas, plan, proxy, hosts, host_index, delay_ms, jitter_ms)
        try:
            workload, collected, started, network = await _run_processes(
                replicas, faults, setup, config_path, network_id, honest, workload_spec, time_limit_s, progress,
                timeline_span_s(setup) if spread_s is None else spread_s,
            )
        finally:
            proxy_nursery.cancel_scope.cancel()
    return workload, collected, started, replicas, network


async def _run_processes(
    replicas: ReplicaProcesses,
    faults: Faults,
    setup: Setup,
    config_path: Path,
    network_id: str,
    honest: list[int],
    workload_spec: WorkloadSpec,
    time_limit_s: float,
    progress: Progress,
    spread_s: float,
) -> tuple[Workload, Collected, float, NetworkConfig]:
    replica_count = setup.replica_count
    try:
        twins = len(replicas.names) - replica_count
        progress(
            f"starting {len(replicas.names)} `ledger-node run` processes in {replicas.directory} ({len(setup.traitors)} traitor(s)"
            + (f", {twins} of them twinned" if twins else "")
            + (f"; one network namespace each, on bridge {faults.hosts.bridge}" if faults.hosts is not None else "")
            + "); every peer link through the link proxy"
        )
        joining = {Instance(replica_id).name for replica_id, _ in setup.late_joins()}
        for name in replicas.names:
            if name not in joining:
                await replicas.start(name)
        async with open_client(config_path) as client:
            network = client.network
            try:
                with trio.fail_after(STARTUP_DEADLINE_S):
                    while sum(status.reachable for status in await client.status(wait_s=0.5)) < replica_count - len(joining):
                        if replicas.exited():
                            raise RealRunError(f"replica processes exited while starting: {replicas.exited()}")
                        await trio.sleep(0.05)
            except trio.TooSlowError:
                raise RealRunError(f"not every replica answered within {STARTUP_DEADLINE_S:g} s") from None
            started = trio.current_time()
            total = workload_spec.clients * workload_spec.transactions_per_client
            workload = Workload(network.identity, started + time_limit_s, total, started, spread_s)
            progress(
                f"every replica answers; running the timeline ({len(setup.timeline)} event(s)) and {total} transactions "
                f"({workload_spec.clients} clients, {workload_spec.in_flight} in flight each), deadline {time_limit_s:g} s"
            )
            try:
                with trio.fail_after(time_limit_s + STARTUP_DEADLINE_S):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_run_timeline, faults, setup, started, progress)
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
    return workload, collected, started, network


def run_real_processes(
    scenario: ScenarioFile,
    setup: Setup,
    seed: int,
    progress: Progress,
    hosts: bool = False,
    baseline: bool = True,
    spread_s: float | None = None,
) -> RunRecord:
    """Run the scenario against real replica processes (with `hosts`, each in a network namespace of
    its own); the directory, and the namespaces, veths and bridge it makes, are removed afterwards.
    With `baseline`, the same workload then runs again on a fresh network with no traitors and no
    fault timeline, so the verdict can set the attack's throughput against a fault-free run's."""
    refusal = real_mode_refusal(scenario, setup)
    if refusal is not None:
        raise RealRunError(f"scenario {scenario.name}: {refusal}; `--sim` runs it")
    if hosts and hosts_mode_refusal() is not None:
        raise RealRunError(str(hosts_mode_refusal()))
    plan = LinkPlan.for_setup(setup)
    names = [instance.name for instance in plan.instances]
    parent = Path(tempfile.mkdtemp(prefix="ledger-scenario-"))
    directory = parent / "net"
    begun = time.perf_counter()
    host_network = HostNetwork(len(names)) if hosts else None
    try:
        try:
            if host_network is not None:
                progress(f"making {len(names)} network namespaces ({host_network.namespace(0)}..) on bridge {host_network.bridge}")
                host_network.create()
            workload, collected, started, replicas, network = trio.run(_run, directory, scenario, setup, seed, progress, host_network, spread_s)
        except (RealRunError, ConfigError, OSError, HostNetworkError) as error:
            tails = ReplicaProcesses(directory, names, {}).log_tails() if (directory / "logs").is_dir() else ""
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
                for reason, count in logged_rejections(replicas.log_text(Instance(replica_id).name)).items():
                    rejections[reason] = rejections.get(reason, 0) + count
        traitors = []
        for traitor in setup.traitors:
            behaviours = " + ".join(behaviour.describe() for behaviour in traitor.behaviours) or "no behaviour of its own"
            side = plan.twin_sides.get(traitor.replica_id)
            if side is not None:
                behaviours += f": a second honest process with its key ({Instance(traitor.replica_id, True).name}) serves replicas {', '.join(map(str, side))}"
            elif "is a TRAITOR" not in replicas.log_text(Instance(traitor.replica_id).name) and traitor.behaviours:
                behaviours += " (but its log never announced it)"
            traitors.append(TraitorReport(traitor.replica_id, behaviours, {}))
    finally:
        shutil.rmtree(parent, ignore_errors=True)
        if host_network is not None:
            _remove_host_network(host_network, progress)
    broken = collected.broken
    if broken is None and workload.failed_receipts:
        broken = BrokenInvariant("validity", workload.failed_receipts[0])
    if broken is None and workload.unconfirmed:
        broken = BrokenInvariant(
            "liveness", f"{workload.unconfirmed} of {workload.total} transactions not confirmed within {workload.deadline - started:g} s"
        )
    fault_free_confirmed_by_ms = None
    if baseline:
        fault_free_confirmed_by_ms = _fault_free_confirmed_by_ms(scenario, setup, seed, progress, hosts)
    return RunRecord(
        scenario=scenario.name,
        backend="real processes, one network namespace each" if hosts else "real processes",
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
        fault_free_confirmed_by_ms=fault_free_confirmed_by_ms,
    )


def timeline_span_s(setup: Setup) -> float:
    """How long the fault timeline lasts: the workload is spread over it so faults hit transactions in flight."""
    return max((event.at_ms for event in setup.timeline), default=0) / 1000


def _fault_free_confirmed_by_ms(scenario: ScenarioFile, setup: Setup, seed: int, progress: Progress, hosts: bool) -> int | None:
    """When the same workload's last receipt comes on a fresh network without traitors or faults
    (the same delays on the links), or None if that run did not confirm everything."""
    progress("running the same workload without traitors or faults, for comparison")

    def quiet(text: str) -> None:
        del text  # the fault-free run's phases would only repeat the attack run's

    try:
        # Paced like the attack run (over its timeline's span), so only the attack differs.
        record = run_real_processes(
            scenario, Setup(setup.replica_count, (), ()), seed, quiet, hosts=hosts, baseline=False, spread_s=timeline_span_s(setup)
        )
    except RealRunError as error:
        progress(f"the fault-free run failed, so there is no comparison: {str(error).splitlines()[0]}")
        return None
    if record.broken is not None or record.confirmed_by_ms is None:
        progress("the fault-free run did not confirm every transaction, so there is no comparison")
        return None
    progress(f"fault-free: the last receipt came {record.confirmed_by_ms} ms after the workload started")
    return record.confirmed_by_ms


def _remove_host_network(host_network: HostNetwork, progress: Progress) -> None:
    """Remove the namespaces, veths and bridge; a second Ctrl-C meanwhile must not leave them behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        problems = host_network.remove()
    finally:
        signal.signal(signal.SIGINT, previous)
    for problem in problems:
        progress(f"could not remove what the run made: {problem}")
    if not problems:
        progress(f"removed the network namespaces and bridge {host_network.bridge}")
