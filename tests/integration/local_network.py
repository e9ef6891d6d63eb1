"""A network run by `ledger-node up` as a real child process, and helpers to drive and inspect it."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from client import ports
from client.library import Client, ReplicaStatus
from client.ports import PORT_RANGE, PORTS_PER_REPLICA
from ledger.blocks import Block
from ledger.config import NetworkConfig, load_client_config, template_for, write_network
from ledger.crypto import SigningKey, read_key_file
from ledger.storage import BlockStore

NODE_COMMAND = (sys.executable, "-m", "node.cli")
CLIENT_COMMAND = (sys.executable, "-m", "client.cli")

START_ATTEMPTS_MAX = 4
START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 20.0
COMMAND_DEADLINE_S = 90.0
AGREEMENT_DEADLINE_S = 30.0
STATUS_POLL_INTERVAL_S = 0.05

# Lines `ledger-node up` prints about its replicas (see node/launcher.py).
READY_LINE = re.compile(r"^replica (\d+)\s+pid (\d+)\s")
FAILED_LINE = re.compile(r"^replica (\d+) (exited with code -?\d+|is not answering)")
SIGNALS_HANDLED_LINE = "Ctrl-C stops every replica"


class NetworkStartError(RuntimeError):
    """`ledger-node up` did not bring every replica up; the message carries its output and logs."""


# ---- ports ----


def pick_base_port(replica_count: int, generator: random.Random) -> int:
    base = ports.pick_base_port(replica_count, generator)
    if base is None:
        raise RuntimeError(f"no {PORTS_PER_REPLICA * replica_count} consecutive free ports found in {PORT_RANGE}")
    return base


# ---- commands ----


@dataclass(frozen=True)
class CommandResult:
    arguments: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.arguments)}\nexit code {self.exit_code}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )

    def json(self) -> Any:
        return json.loads(self.stdout)


async def run_command(arguments: Sequence[str], deadline_s: float = COMMAND_DEADLINE_S, cwd: Path | None = None) -> CommandResult:
    """Run a command to completion (killed if the deadline passes) and capture what it printed."""
    with trio.fail_after(deadline_s):
        completed = await trio.run_process(
            list(arguments), capture_stdout=True, capture_stderr=True, check=False, cwd=cwd
        )
    return CommandResult(tuple(arguments), completed.returncode, completed.stdout.decode(), completed.stderr.decode())


# ---- a network directory without processes ----


@dataclass(frozen=True)
class GeneratedNetwork:
    """A network directory written in-process (as `ledger-node init` does), never started."""

    directory: Path
    network: NetworkConfig
    replica_keys: tuple[SigningKey, ...]


def generate_network(directory: Path, replica_count: int) -> GeneratedNetwork:
    write_network(template_for(replica_count), directory)
    network = load_client_config(directory / "client.toml").network
    keys = tuple(read_key_file(directory / f"replica-{replica_id}.key") for replica_id in range(replica_count))
    return GeneratedNetwork(directory, network, keys)


# ---- the launcher process ----


@dataclass(eq=False)
class LauncherRun:
    """One `ledger-node up` process and what it has printed so far."""

    process: trio.Process
    replica_count: int
    lines: list[str] = field(default_factory=list)
    replica_pids: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # Processes of the launcher's group still running after it exited: pid -> command line.
    leaked_processes: dict[int, str] = field(default_factory=dict)
    # Set once the launcher handles SIGINT/SIGTERM itself (it prints this after installing its handler).
    handles_signals: trio.Event = field(default_factory=trio.Event)
    settled: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def read_output(self) -> None:
        """Collect the launcher's lines until it closes its stdout (it exited)."""
        assert self.process.stdout is not None
        pending = b""
        try:
            while True:
                data = await self.process.stdout.receive_some(65536)
                if not data:
                    break
                pending += data
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    self._take_line(raw.decode(errors="replace"))
            if pending:
                self._take_line(pending.decode(errors="replace"))
        finally:
            self.finished.set()
            self.settled.set()

    def _take_line(self, line: str) -> None:
        self.lines.append(line)
        ready = READY_LINE.match(line)
        if ready is not None:
            self.replica_pids[int(ready[1])] = int(ready[2])
        elif FAILED_LINE.match(line) is not None:
            self.failures.append(line)
        elif line.startswith(SIGNALS_HANDLED_LINE):
            self.handles_signals.set()
        if self.failures or len(self.replica_pids) == self.replica_count:
            self.settled.set()


def _process_command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_group_members(group_id: int) -> list[int]:
    """Live (not zombie) processes whose process group is `group_id`, found through /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (command) state ppid pgrp ...": the command may hold spaces, so split after its ")".
        state, _, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == group_id and state != "Z":
            members.append(int(entry.name))
    return members


class LocalNetwork:
    """A network directory made by `ledger-node init`, run by `ledger-node up` (one run at a time)."""

    def __init__(self, directory: Path, replica_count: int, nursery: trio.Nursery) -> None:
        self.directory = directory
        self.replica_count = replica_count
        self.nursery = nursery
        self.base_port: int | None = None
        self.run: LauncherRun | None = None
        self.runs: list[LauncherRun] = []

    # ---- paths and configuration ----

    @property
    def client_config_path(self) -> Path:
        return self.directory / "client.toml"

    @property
    def network(self) -> NetworkConfig:
        return load_client_config(self.client_config_path).network

    def replica_config_path(self, replica_id: int) -> Path:
        return self.directory / f"replica-{replica_id}.toml"

    def replica_key_path(self, replica_id: int) -> Path:
        return self.directory / f"replica-{replica_id}.key"

    def store_path(self, replica_id: int) -> Path:
        return self.directory / "data" / f"replica-{replica_id}" / "ledger.sqlite3"

    def log_path(self, replica_id: int) -> Path:
        return self.directory / "logs" / f"replica-{replica_id}.log"

    def log_text(self, replica_id: int) -> str:
        try:
            return self.log_path(replica_id).read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        """The launcher's output and the end of every replica log, for failure messages."""
        parts = [f"--- ledger-node up output\n{self.runs[-1].output if self.runs else '(not started)'}"]
        for replica_id in range(self.replica_count):
            tail = "\n".join(self.log_text(replica_id).splitlines()[-15:])
            parts.append(f"--- {self.log_path(replica_id)} (last lines)\n{tail}")
        return "\n".join(parts)

    # ---- lifecycle ----

    async def initialise(self, base_port: int) -> None:
        result = await run_command(
            [
                *NODE_COMMAND,
                "init",
                "--replicas",
                str(self.replica_count),
                "--out",
                str(self.directory),
                "--base-port",
                str(base_port),
                "--force",
            ]
        )
        if result.exit_code != 0:
            raise RuntimeError(f"ledger-node init failed\n{result.describe()}")
        self.base_port = base_port

    async def create_and_start(self) -> None:
        """Init on free ports and start; if a port was taken in between, try other ports."""
        generator = random.Random()
        for attempt in range(1, START_ATTEMPTS_MAX + 1):
            await self.initialise(pick_base_port(self.replica_count, generator))
            try:
                await self.start()
                return
            except NetworkStartError:
                collided = any("cannot listen" in self.log_text(replica_id) for replica_id in range(self.replica_count))
                await self.stop()
                if not collided or attempt == START_ATTEMPTS_MAX:
                    raise

    async def launch(self) -> LauncherRun:
        """Start `ledger-node up DIR` and collect its output; wait for nothing."""
        if self.run is not None:
            raise RuntimeError("the network is already running")
        process = await trio.lowlevel.open_process(
            [*NODE_COMMAND, "up", str(self.directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own process group (its replicas inherit it): whatever outlives the launcher
            # can be found, reported and killed without touching any other process.
            start_new_session=True,
        )
        run = LauncherRun(process, self.replica_count)
        self.run = run
        self.runs.append(run)
        self.nursery.start_soon(run.read_output)
        return run

    async def start(self) -> LauncherRun:
        """Run `ledger-node up DIR`; return once it reports every replica listening."""
        run = await self.launch()
        with trio.fail_after(START_DEADLINE_S):
            await run.settled.wait()
        if run.failures or len(run.replica_pids) < self.replica_count:
            raise NetworkStartError(f"`ledger-node up` did not start every replica\n{self.diagnostics()}")
        return run

    async def stop(self) -> int | None:
        """SIGTERM the launcher and wait for it; kill it and its replicas after a bounded wait.

        Returns the launcher's exit code (None if it was not running). Runs shielded, so it
        completes even while the test is being cancelled.
        """
        run = self.run
        if run is None:
            return None
        self.run = None
        process = run.process
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_DEADLINE_S):
                    await process.wait()
            if process.returncode is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await process.wait()
            with trio.move_on_after(5):
                await run.finished.wait()
            run.leaked_processes = self._kill_leftovers(process.pid)
        return process.returncode

    @staticmethod
    def _kill_leftovers(group_id: int) -> dict[int, str]:
        """Kill the launcher's group members that outlived it (orphaned replicas); say which they were."""
        leftovers = {pid: _process_command_line(pid) for pid in process_group_members(group_id)}
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leftovers

    def replica_alive(self, replica_id: int) -> bool:
        """Whether the current run's replica process is still running."""
        assert self.run is not None
        pid = self.run.replica_pids[replica_id]
        return str(self.replica_config_path(replica_id)) in _process_command_line(pid)

    # ---- the stores on disk (only while the network is stopped) ----

    def open_store(self, replica_id: int) -> BlockStore:
        """Open a replica's store; BlockStore.open verifies every block link and hash."""
        return BlockStore.open(self.store_path(replica_id), self.network.genesis_hash)

    def stored_block_hashes(self, replica_id: int) -> list[bytes]:
        store = self.open_store(replica_id)
        try:
            return [block.block_hash for block in store.iterate_blocks()]
        finally:
            store.close()


# ---- the client side ----


async def run_client_cli(network: LocalNetwork, *arguments: str, deadline_s: float = COMMAND_DEADLINE_S) -> CommandResult:
    return await run_command(
        [*CLIENT_COMMAND, "-c", str(network.client_config_path), *arguments], deadline_s, cwd=network.directory
    )


async def wait_for_agreement(client: Client, minimum_height: int = 0, deadline_s: float = AGREEMENT_DEADLINE_S) -> ReplicaStatus:
    """Poll status until every replica reports the same height (at least `minimum_height`) and last block."""
    statuses: list[ReplicaStatus] = []
    try:
        with trio.fail_after(deadline_s):
            while True:
                statuses = await client.status(wait_s=1.0)
                tips = {(status.height, status.last_block_hash) for status in statuses}
                if all(status.reachable for status in statuses) and len(tips) == 1 and statuses[0].height >= minimum_height:
                    return statuses[0]
                await trio.sleep(STATUS_POLL_INTERVAL_S)
    except trio.TooSlowError:
        raise AssertionError(f"replicas did not agree on a tip at height >= {minimum_height}: {statuses}") from None


async def fetch_chain(client: Client, replica_id: int) -> list[Block]:
    """Every block one replica serves, from height 1, checked to be contiguous."""
    blocks: list[Block] = []
    while True:
        batch = await client.fetch_blocks(replica_id, len(blocks) + 1)
        if not batch:
            return blocks
        heights = [block.height for block in batch]
        expected = list(range(len(blocks) + 1, len(blocks) + 1 + len(batch)))
        assert heights == expected, f"replica {replica_id} served heights {heights}, expected {expected}"
        blocks.extend(batch)
