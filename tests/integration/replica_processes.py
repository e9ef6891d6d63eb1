"""Replicas started one by one with `ledger-node run` (as on separate hosts), so tests can kill,
stop, continue and restart any of them; plus a load generator that remembers every acknowledgement."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from client.library import Client, ClientError, open_client
from client.quorum import Receipt
from ledger.config import NetworkConfig, load_client_config
from ledger.crypto import SigningKey
from ledger.transactions import Put, sign_transaction

from .local_network import NODE_COMMAND, pick_base_port, run_command

STOP_DEADLINE_S = 20.0

# Short timeouts so failures are detected in about a second; small checkpoint interval so a few
# dozen blocks cross several checkpoints.
FAST_TEMPLATE = """\
[network]
id = "faults-{replica_count}"
replicas = {replica_count}
host = "127.0.0.1"
base_port = {base_port}

[protocol]
batch_size_max = 200
batch_wait_ms = 5
window_size = 32
request_timeout_ms = 600
view_change_timeout_ms = 1000
checkpoint_interval = 16
status_interval_ms = 200
"""


@dataclass(eq=False)
class ReplicaProcesses:
    """One `ledger-node run` process per replica, each in its own process group."""

    directory: Path
    replica_count: int
    extra_protocol: str = ""  # more [protocol] lines for the template
    # More `ledger-node run` arguments for some replicas, e.g. {0: ["--traitor", "equivocating_primary"]}.
    extra_arguments: dict[int, list[str]] = field(default_factory=dict)
    processes: dict[int, trio.Process] = field(default_factory=dict)

    @property
    def client_config_path(self) -> Path:
        return self.directory / "client.toml"

    @property
    def network(self) -> NetworkConfig:
        return load_client_config(self.client_config_path).network

    def log_path(self, replica_id: int) -> Path:
        return self.directory / "logs" / f"replica-{replica_id}.log"

    def diagnostics(self) -> str:
        parts = []
        for replica_id in range(self.replica_count):
            try:
                tail = "\n".join(self.log_path(replica_id).read_text(errors="replace").splitlines()[-12:])
            except OSError:
                tail = "(no log)"
            parts.append(f"--- replica {replica_id}\n{tail}")
        return "\n".join(parts)

    async def initialise(self) -> None:
        template = self.directory.parent / f"faults-{self.replica_count}.toml"
        base_port = pick_base_port(self.replica_count, random.Random())
        template.write_text(FAST_TEMPLATE.format(replica_count=self.replica_count, base_port=base_port) + self.extra_protocol)
        result = await run_command([*NODE_COMMAND, "init", str(template), "--out", str(self.directory), "--force"])
        assert result.exit_code == 0, result.describe()
        (self.directory / "logs").mkdir(exist_ok=True)

    async def start(self, replica_id: int) -> None:
        assert replica_id not in self.processes or self.processes[replica_id].returncode is not None
        with self.log_path(replica_id).open("ab") as log:
            self.processes[replica_id] = await trio.lowlevel.open_process(
                [*NODE_COMMAND, "run", str(self.directory / f"replica-{replica_id}.toml"), *self.extra_arguments.get(replica_id, [])],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def start_all(self) -> None:
        for replica_id in range(self.replica_count):
            await self.start(replica_id)

    def signal(self, replica_id: int, signal_number: signal.Signals) -> None:
        self.processes[replica_id].send_signal(signal_number)

    async def kill(self, replica_id: int) -> None:
        """SIGKILL: no shutdown code runs, whatever was in memory is gone."""
        process = self.processes[replica_id]
        process.send_signal(signal.SIGKILL)
        await process.wait()

    def pid(self, replica_id: int) -> int:
        return self.processes[replica_id].pid

    def alive(self, replica_id: int) -> bool:
        process = self.processes.get(replica_id)
        return process is not None and process.returncode is None

    async def stop_all(self) -> None:
        """SIGCONT (in case a test stopped one) and SIGTERM everyone; SIGKILL what lingers."""
        with trio.CancelScope(shield=True):
            for process in self.processes.values():
                if process.returncode is None:
                    for signal_number in (signal.SIGCONT, signal.SIGTERM):
                        try:
                            os.killpg(process.pid, signal_number)
                        except ProcessLookupError:
                            pass
            with trio.move_on_after(STOP_DEADLINE_S):
                for process in self.processes.values():
                    await process.wait()
            for process in self.processes.values():
                if process.returncode is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    await process.wait()


@asynccontextmanager
async def replica_processes(
    directory: Path, replica_count: int, extra_protocol: str = "", extra_arguments: dict[int, list[str]] | None = None
) -> AsyncIterator[ReplicaProcesses]:
    replicas = ReplicaProcesses(directory, replica_count, extra_protocol, dict(extra_arguments or {}))
    await replicas.initialise()
    try:
        await replicas.start_all()
        yield replicas
    finally:
        await replicas.stop_all()


def resident_memory_bytes(pid: int, entry: str = "VmRSS") -> int:
    """Resident memory now (VmRSS), or at its peak since the process started (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{entry}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {entry} for pid {pid}")


@dataclass(eq=False)
class Load:
    """Concurrent writers, each its own account (puts need no funds), recording every receipt."""

    client: Client
    writers: int
    receipts: list[Receipt] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    progressed: trio.Event = field(default_factory=trio.Event)
    target: int = 0

    async def run(self, total: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Submit `total` transactions spread over the writers; acknowledged ones land in receipts."""
        network = self.client.network.identity
        keys = [SigningKey.generate() for _ in range(self.writers)]
        share = total // self.writers
        task_status.started()

        async def writer(key: SigningKey, index: int) -> None:
            for nonce in range(share):
                transaction = sign_transaction(network, key, nonce, Put(f"w{index}", f"value {nonce}"))
                while True:
                    try:
                        receipt = await self.client.submit(transaction, deadline_s=60)
                        break
                    except ClientError as error:  # retried: the same signed transaction, so never executed twice
                        self.failures.append(str(error))
                assert receipt.result.ok, receipt.result.reason
                self.receipts.append(receipt)
                if len(self.receipts) >= self.target:
                    self.progressed.set()

        async with trio.open_nursery() as nursery:
            for index, key in enumerate(keys):
                nursery.start_soon(writer, key, index)

    async def wait_for(self, count: int) -> None:
        """Until at least `count` transactions were acknowledged in total."""
        while len(self.receipts) < count:
            self.target = count
            self.progressed = trio.Event()
            await self.progressed.wait()


@asynccontextmanager
async def connected_client(replicas: ReplicaProcesses) -> AsyncIterator[Client]:
    async with open_client(replicas.client_config_path) as client:
        await client.wait_until_ready(replicas.network.quorum, deadline_s=30)
        yield client
