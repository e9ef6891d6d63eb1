"""`make scale`, with real processes: a restart to "answering status" and a new replica's join to "caught up", against history."""

# Usage: python tests/scale_processes.py [--cpu-lock PATH] [TRANSACTIONS ...]   (default: 10000 100000)
# For each size: one store is built as scale_restart.py builds it (certified, really executed
# blocks; every put writes a new key, so the state grows with the history), and the stable
# checkpoint of its tip (2f+1 signed CHECKPOINTs) is written into it, as a replica that stopped
# right after that checkpoint became stable keeps it. A 4-replica network's config files are
# written with the keys and genesis the chain was built with; replicas 0-2 each get their own copy
# of the store; replica 0 is started alone (`ledger-node run`) and stopped, then replicas 0-2
# are started at once (one process each), each timed from its process start to its first status
# answer. Then replica 3 starts with an empty
# data directory and is timed from its process start until its status height reaches the others'
# (it joins by state sync: its log must say "state sync: installed the snapshot"). Where the time
# went comes from the logs' timestamps. Timings are printed, never asserted. With --cpu-lock the
# measured part of each size (from starting the processes to stopping them) holds an exclusive
# flock on that file, so runs sharing the machine's cores do not overlap (`flock PATH` takes the same lock).

from __future__ import annotations

import argparse
import calendar
import fcntl
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio
from chain_helpers import sign_checkpoint_certificate
from scale_restart import NETWORK, TRANSACTIONS_PER_BLOCK, build, join

from client.ports import HOST, pick_base_port
from ledger.config import Address, NetworkConfig, ProtocolSettings, ReplicaInfo, network_toml
from ledger.crypto import write_key_file
from ledger.encoding import CodecError
from ledger.framing import FramedStream, FrameError
from ledger.messages import StatusQuery, StatusReply, decode_message, encode_message
from ledger.storage import BlockStore

NODE_COMMAND = (sys.executable, "-m", "node.cli")
REPLICA_COUNT = 4
JOINER = 3
SERVERS = (0, 1, 2)
POLL_INTERVAL_S = 0.02  # between status probes: the resolution of every time measured here
PROBE_TIMEOUT_S = 2.0
RESTART_DEADLINE_S = 600.0
JOIN_DEADLINE_S = 1800.0
STOP_DEADLINE_S = 30.0
CHECKPOINT_INTERVAL_MAX = ProtocolSettings().checkpoint_interval
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z ")


@contextmanager
def cpu_lock(path: Path | None) -> Iterator[None]:
    """An exclusive flock(2) on `path` (the one `flock PATH command` takes) while the block runs."""
    if path is None:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def checkpoint_interval_for(blocks: int) -> int:
    """The largest power of two up to the default interval that divides `blocks`: the tip must be
    a checkpoint, since a replica serves the snapshot of a stable checkpoint it holds the state of."""
    interval = CHECKPOINT_INTERVAL_MAX
    while blocks % interval:
        interval //= 2
    return interval


def build_replica_store(path: Path, transactions: int) -> tuple[int, int]:
    """scale_restart's chain, plus the stable checkpoint certificate of its tip: (height, interval)."""
    build(path, transactions)
    store = BlockStore.open(path, NETWORK.genesis, verify=False)
    tip = store.block(store.height)
    assert tip is not None
    certificate = sign_checkpoint_certificate(NETWORK, tip.height, tip.header.state_digest, tip.block_hash)
    store.save_messages([("stable-checkpoint", 0, tip.height, encode_message(certificate))])
    store.close()
    return tip.height, checkpoint_interval_for(tip.height)


def write_configs(directory: Path, protocol: ProtocolSettings) -> tuple[NetworkConfig, Address]:
    """A 4-replica network's config and key files with the chain's keys and genesis, on free loopback
    ports; the joiner serves metrics (its counters say how its fetch went) on the address returned."""
    base_port = pick_base_port(REPLICA_COUNT, random.Random())
    if base_port is None:
        raise RuntimeError("no free loopback ports for 4 replicas")
    replicas = tuple(
        ReplicaInfo(index, key.public_key, Address(HOST, base_port + 2 * index), Address(HOST, base_port + 2 * index + 1))
        for index, key in enumerate(NETWORK.replica_signing_keys)
    )
    network = NetworkConfig(NETWORK.network_id, replicas, protocol, NETWORK.balances)
    assert network.genesis_hash == NETWORK.genesis  # addresses and settings are not part of the genesis
    shared = network_toml(network)
    # The port pick_base_port left free for it, after every peer and client port.
    metrics = Address(HOST, base_port + 2 * REPLICA_COUNT + JOINER)
    for index, key in enumerate(NETWORK.replica_signing_keys):
        write_key_file(directory / f"replica-{index}.key", key)
        metrics_table = f'[metrics]\nhost = "{metrics.host}"\nport = {metrics.port}\n\n' if index == JOINER else ""
        (directory / f"replica-{index}.toml").write_text(
            f'[replica]\nid = {index}\nkey_file = "replica-{index}.key"\ndata_dir = "data/replica-{index}"\n\n'
            + metrics_table
            + shared
        )
    return network, metrics


def fetch_counters(metrics: Address) -> dict[str, int]:
    """The replica's core counters whose reason names the snapshot or the state sync, from its /metrics."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=PROBE_TIMEOUT_S) as response:
        text = response.read().decode()
    counters = {}
    for match in re.finditer(r'^ledger_rejections_total\{reason="([^"]*)"\} ([0-9.e+]+)$', text, re.MULTILINE):
        if "snapshot" in match.group(1) or "state sync" in match.group(1):
            counters[match.group(1)] = int(float(match.group(2)))
    return counters


def log_time_s(line: str) -> float | None:
    """The epoch seconds of a replica's text log line (ISO UTC with milliseconds), or None."""
    match = LOG_TIME.match(line)
    if match is None:
        return None
    return calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")) + int(match.group(2)) / 1000


def first_line(log_path: Path, marker: str) -> tuple[float, str] | None:
    """The time and text of the first log line containing `marker`."""
    for line in log_path.read_text(errors="replace").splitlines():
        if marker in line:
            moment = log_time_s(line)
            if moment is not None:
                return moment, line
    return None


async def probe_status(address: Address, frame_size_max: int) -> StatusReply | None:
    """One status query on a fresh connection; None if the replica does not answer (yet)."""
    try:
        with trio.fail_after(PROBE_TIMEOUT_S):
            stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                framed = FramedStream(stream, frame_size_max)
                await framed.send(encode_message(StatusQuery(1)))
                while True:
                    data = await framed.receive()
                    if data is None:
                        return None
                    message = decode_message(data)
                    if isinstance(message, StatusReply):
                        return message
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, FrameError, CodecError):
        return None


@dataclass(eq=False)
class Replicas:
    """`ledger-node run` processes of one network directory, each in its own process group."""

    directory: Path
    network: NetworkConfig
    processes: dict[int, trio.Process] = field(default_factory=dict)
    started_s: dict[int, float] = field(default_factory=dict)
    logs: dict[int, Path] = field(default_factory=dict)  # each replica's log of its latest start

    def log_path(self, replica_id: int) -> Path:
        return self.logs[replica_id]

    def log_tail(self, replica_id: int, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path(replica_id).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def start(self, replica_id: int, run: str = "") -> None:
        """Start the replica's process; its log is logs/replica-<id><run>.log."""
        self.logs[replica_id] = self.directory / "logs" / f"replica-{replica_id}{run}.log"
        with self.log_path(replica_id).open("ab") as log:
            self.started_s[replica_id] = time.time()
            self.processes[replica_id] = await trio.lowlevel.open_process(
                [*NODE_COMMAND, "run", str(self.directory / f"replica-{replica_id}.toml")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self, replica_id: int) -> None:
        process = self.processes[replica_id]
        if process.returncode is not None:
            raise RuntimeError(f"replica {replica_id} exited with {process.returncode}:\n{self.log_tail(replica_id)}")

    async def status(self, replica_id: int) -> StatusReply | None:
        self.check_alive(replica_id)
        return await probe_status(self.network.replicas[replica_id].client_address, self.network.protocol.frame_size_max)

    async def first_answer_s(self, replica_id: int) -> float:
        """Seconds from the process start to its first status answer."""
        with trio.fail_after(RESTART_DEADLINE_S):
            while await self.status(replica_id) is None:
                await trio.sleep(POLL_INTERVAL_S)
        return time.time() - self.started_s[replica_id]

    async def reached_s(self, replica_id: int, height: int) -> float:
        """Seconds from the process start until its status reports `height` or more."""
        with trio.fail_after(JOIN_DEADLINE_S):
            while True:
                reply = await self.status(replica_id)
                if reply is not None and reply.height >= height:
                    return time.time() - self.started_s[replica_id]
                await trio.sleep(POLL_INTERVAL_S)

    async def stop(self, replica_id: int) -> None:
        """SIGTERM, and wait until it exited."""
        process = self.processes[replica_id]
        os.killpg(process.pid, signal.SIGTERM)
        with trio.fail_after(STOP_DEADLINE_S):
            await process.wait()

    async def stop_all(self) -> None:
        """SIGTERM every process group; SIGKILL what lingers."""
        with trio.CancelScope(shield=True):
            for process in self.processes.values():
                if process.returncode is None:
                    try:
                        os.killpg(process.pid, signal.SIGTERM)
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


@dataclass
class Result:
    transactions: int
    height: int
    checkpoint_interval: int
    state_entries: int = 0
    restart_alone_s: float = 0.0
    restart_s: dict[int, float] = field(default_factory=dict)
    join_s: float = 0.0
    join_in_process_s: float = 0.0
    snapshot_bytes: int = 0
    chunks: int = 0
    notes: list[str] = field(default_factory=list)


def described(total_s: float, phases: list[tuple[str, float]]) -> str:
    """`total = a + b + ...; most: the largest`."""
    largest = max(phases, key=lambda phase: phase[1])[0]
    return f"{total_s:.2f} s = " + " + ".join(f"{name} {seconds:.2f} s" for name, seconds in phases) + f"; most: {largest}"


def restart_phases(replicas: Replicas, replica_id: int, answered_s: float) -> str:
    """Interpreter and imports, store open (the replica's own figure), the rest until it answered."""
    ready = first_line(replicas.log_path(replica_id), "store opened at height")
    if ready is None:
        return f"replica {replica_id}: no 'store opened' line"
    ready_s, line = ready
    opened = re.search(r" in (\d+) ms", line)
    open_s = int(opened.group(1)) / 1000 if opened else 0.0
    started = replicas.started_s[replica_id]
    phases = [
        ("start-up and imports", ready_s - open_s - started),
        ("store open and state load", open_s),
        ("listening to first answer", answered_s - (ready_s - started)),
    ]
    return f"replica {replica_id}: " + described(answered_s, phases)


def join_phases(replicas: Replicas, joined_s: float) -> str:
    """Where the joiner's time went, from its log and its status answers: start-up, finding the
    certified checkpoint, fetching and checking the snapshot and its block (until its status shows
    the height: the core took the snapshot), storing it (the store write runs on a worker thread
    while the replica answers status, until its log says it stored the snapshot)."""
    log_path = replicas.log_path(JOINER)
    started = replicas.started_s[JOINER]
    moments = {}
    for marker in ("ready: peers on", "blocks behind the stable checkpoint", "state sync: stored the snapshot"):
        found = first_line(log_path, marker)
        assert found is not None  # wait_for_log saw them all
        moments[marker] = found[0] - started
    ready_s, found_s, stored_s = moments.values()
    taken_s = min(joined_s, stored_s)  # the status answer comes at most one poll after the core took it
    phases = [
        ("start-up, imports, store open", ready_s),
        ("finding the stable checkpoint", found_s - ready_s),
        ("fetching and checking the snapshot", taken_s - found_s),
        ("storing it", stored_s - taken_s),
    ]
    return f"join: status caught up at {joined_s:.2f} s, snapshot stored at " + described(stored_s, phases)


async def wait_for_log(replicas: Replicas, replica_id: int, markers: tuple[str, ...]) -> None:
    """Until the replica's log holds every marker (log lines follow the round they describe)."""
    with trio.fail_after(JOIN_DEADLINE_S):
        while not all(first_line(replicas.log_path(replica_id), marker) for marker in markers):
            replicas.check_alive(replica_id)
            await trio.sleep(POLL_INTERVAL_S)


async def run_processes(directory: Path, network: NetworkConfig, metrics: Address, height: int, result: Result) -> None:
    replicas = Replicas(directory, network)
    try:
        # One replica alone first (the others wait), so the figure has no neighbour on the cores.
        await replicas.start(SERVERS[0], "-alone")
        result.restart_alone_s = await replicas.first_answer_s(SERVERS[0])
        result.notes.append("alone, " + restart_phases(replicas, SERVERS[0], result.restart_alone_s))
        await replicas.stop(SERVERS[0])
        async with trio.open_nursery() as nursery:
            for replica_id in SERVERS:
                await replicas.start(replica_id)

            async def restart(replica_id: int) -> None:
                result.restart_s[replica_id] = await replicas.first_answer_s(replica_id)

            for replica_id in SERVERS:
                nursery.start_soon(restart, replica_id)
        for replica_id in SERVERS:
            result.notes.append(restart_phases(replicas, replica_id, result.restart_s[replica_id]))
        opened = first_line(replicas.log_path(SERVERS[0]), "store opened at height")
        entries = re.search(r"(\d+) entries", opened[1]) if opened else None
        result.state_entries = int(entries.group(1)) if entries else 0
        heights = [reply.height for reply in [await replicas.status(replica_id) for replica_id in SERVERS] if reply]
        assert heights and max(heights) == height, f"the restarted replicas report {heights}, the store holds {height}"

        await replicas.start(JOINER)
        result.join_s = await replicas.reached_s(JOINER, height)
        # A join by blocks would not log these: the join measured must be by state sync.
        await wait_for_log(replicas, JOINER, ("state sync: stored the snapshot", "state sync: installed the snapshot"))
        result.notes.append(join_phases(replicas, result.join_s))
        counters = await trio.to_thread.run_sync(fetch_counters, metrics)
        result.notes.append("joiner's counters: " + ", ".join(f"{reason} {count}" for reason, count in sorted(counters.items())))
    finally:
        await replicas.stop_all()


def measure(transactions: int, lock_path: Path | None, keep: Path | None, settings: dict[str, int]) -> Result:
    with tempfile.TemporaryDirectory(dir=keep) as temporary:
        directory = Path(temporary)
        built = directory / "built" / "ledger.sqlite3"
        built.parent.mkdir()
        started = time.perf_counter()
        height, interval = build_replica_store(built, transactions)
        build_s = time.perf_counter() - started
        result = Result(transactions, height, interval)
        # What the joiner fetches, counted in one process (the chunks a keeper serves, one after the
        # other; the real fetch splits the buckets into lanes, so it takes a few more, smaller ones),
        # and what serving, checking, assembling and installing them costs without the network.
        started = time.perf_counter()
        result.chunks, result.snapshot_bytes = join(built, directory / "built" / "joined.sqlite3")
        result.join_in_process_s = time.perf_counter() - started
        # The default distance unless the chain is too short for it: the join must be by state sync.
        state_sync_distance = ProtocolSettings().state_sync_distance
        if height <= state_sync_distance:
            state_sync_distance = max(1, height // 2)
        protocol = replace(ProtocolSettings(checkpoint_interval=interval, state_sync_distance=state_sync_distance), **settings)
        network, metrics = write_configs(directory, protocol)
        (directory / "logs").mkdir()
        for replica_id in SERVERS:
            data = directory / "data" / f"replica-{replica_id}"
            data.mkdir(parents=True)
            for file in built.parent.glob("ledger.sqlite3*"):
                shutil.copyfile(file, data / file.name)
        (directory / "data" / f"replica-{JOINER}").mkdir(parents=True)
        result.notes.append(
            f"built {height} blocks in {build_s:.0f} s; store {built.stat().st_size / 1e6:.0f} MB; "
            f"checkpoint_interval {protocol.checkpoint_interval}, state_sync_distance {protocol.state_sync_distance}"
            + "".join(f", {name} {value}" for name, value in sorted(settings.items()) if name != "state_sync_distance")
            + f"; the snapshot is {result.chunks} chunks when one keeper serves it in order"
        )
        with cpu_lock(lock_path):
            trio.run(run_processes, directory, network, metrics, height, result)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sizes", nargs="*", type=int, help="transactions of history (default: 10000 100000)")
    parser.add_argument("--cpu-lock", type=Path, help="hold an exclusive flock on this file while measuring")
    parser.add_argument(
        "--protocol",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a [protocol] setting for every replica, e.g. status_interval_ms=1500 (repeatable)",
    )
    parser.add_argument("--keep-in", type=Path, help="make the working directories here (default: the system's temporary directory)")
    arguments = parser.parse_args()
    sizes = arguments.sizes or [10_000, 100_000]
    settings = {}
    for setting in arguments.protocol:
        name, _, value = setting.partition("=")
        if name not in ProtocolSettings.__dataclass_fields__ or name == "checkpoint_interval" or not value.isdigit():
            # The checkpoint interval is chosen to make the tip a checkpoint (checkpoint_interval_for).
            parser.error(f"--protocol {setting}: expected NAME=INTEGER with a [protocol] setting's name other than checkpoint_interval")
        settings[name] = int(value)
    print(
        f"real processes, {REPLICA_COUNT} replicas, {TRANSACTIONS_PER_BLOCK} transactions a block; "
        f"restart: replicas {', '.join(map(str, SERVERS))} started at once, each from its process start to its first status answer; "
        f"join: replica {JOINER}, empty store, from its process start until its status height is the others'",
        flush=True,
    )
    print(
        f"{'transactions':>12} {'blocks':>7} {'state entries':>13} {'restart s alone':>15} {'restart s (3 at once)':>22} "
        f"{'join s':>7} {'snapshot MB':>11} {'join s in one process':>21}",
        flush=True,
    )
    for transactions in sizes:
        result = measure(transactions, arguments.cpu_lock, arguments.keep_in, settings)
        restarts = " ".join(f"{result.restart_s[replica_id]:.2f}" for replica_id in SERVERS)
        print(
            f"{result.transactions:>12} {result.height:>7} {result.state_entries:>13} {result.restart_alone_s:>15.2f} {restarts:>22} "
            f"{result.join_s:>7.2f} {result.snapshot_bytes / 1e6:>11.2f} {result.join_in_process_s:>21.2f}",
            flush=True,
        )
        for note in result.notes:
            print(f"    {note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
