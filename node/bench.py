"""`ledger-bench`: throughput and latency of a local network of real replicas, against the CPU floor.

It runs `ledger-node init` and one `ledger-node run` per replica as child processes (as an operator
would), signs every transaction before anything is timed, drives the network with `--in-flight N`
outstanding requests (one per account, so nonces never wait on each other) through the client
library, warms up, then measures `--duration S` seconds: a transaction counts when f + 1 replicas
sent matching signed replies, and its latency runs from submit to that moment.

The floor. Before the load, the primitives are timed on this machine: Ed25519 verify (V) and sign
(S), the codec encoding (E) and decoding (D) of a list of B transactions (B = batch_size_max), and
SHA-256 of that encoded list, about a block (H). Every committed transaction costs, in CPU seconds
summed over every process on the machine, at least

    replica = V + (E + D) / B + (2 * 2f * V + 2 * S + H) / B + R
    client  = (f + 1) * V / B      with one signed reply per batch; (f + 1) * V with one per transaction
    C       = n * replica + client
    floor   = cores / C            (cores = os.cpu_count(); n replicas and the load generator share them)

Each replica verifies each client signature once (V), reads and writes the batch once ((E + D) / B),
and per batch verifies the 2f other replicas' votes of each phase (the pre-prepare or PREPAREs,
then the COMMITs: 2 * 2f * V), signs its own two votes (2 * S) and hashes the block (H). R is the
signed reply: S with one per transaction (the floor_per_transaction figure), S / B with one per
batch (the floor figure, the higher one, which the ratio is taken against). The client verifies
f + 1 reply signatures: per block with one reply per batch (one signature covers every transaction
of the block, and a client remembers the ones it checked), per transaction otherwise. Signing the transactions themselves (S each) is left out:
they are signed before the timed part. Checkpoints, status messages and disk writes are left out
too, so the floor is an upper bound no implementation on this machine can pass.

On a machine other work shares, the achieved tx/s depends on how much CPU that work leaves. The CPU
ratio does not: C over the CPU seconds the replicas and the load generator (read from /proc and
getrusage) actually spent per committed transaction (cpu_ratio_to_floor).

Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from client import ports
from client.library import Client, ClientError, open_client
from ledger.crypto import NetworkIdentity, PublicKeyCache, SigningKey
from ledger.encoding import decode, encode
from ledger.transactions import Put, Transaction, sign_transaction, transaction_domain
from node.scenario_real import real_mode_refusal
from node.scenarios import ScenarioError, load_scenario, scenario_names, scenario_path
from node.stage_trace import sampled
from node.traitors import format_behaviour_spec

TEMPLATE = """\
[network]
id = "bench-{replicas}"
replicas = {replicas}
host = "127.0.0.1"
base_port = {base_port}

[protocol]
batch_size_max = {batch_size_max}
batch_wait_ms = {batch_wait_ms}
window_size = 64
checkpoint_interval = 128
client_connections_per_address_max = 64
"""

NODE_COMMAND = (sys.executable, "-m", "node.cli")
SWEEP_IN_FLIGHT = (1, 4, 16, 64, 256, 1024)
# A replica follows at most 256 accounts per client connection (node/runtime.py): each load
# client stays below that, so every account's replies reach it.
ACCOUNTS_PER_CLIENT_MAX = 200
# Pre-signed transactions are held in memory (about 700 bytes each with their objects, measured
# with tracemalloc): at most about 200 MB.
PRESIGNED_MAX = 300_000
# No transaction commits faster than this after its submit, so one account needs no more.
LATENCY_LOWER_BOUND_S = 0.0005
# The fastest of many short rounds: on a shared machine a round is slowed by whatever else runs,
# never sped up, so the minimum is the closest to the primitive's own cost.
PRIMITIVE_ROUNDS = 10
PRIMITIVE_ROUND_S = 0.05
SUBMIT_DEADLINE_S = 30.0
DURATION_S = 15.0
READY_DEADLINE_S = 60.0
STOP_DEADLINE_S = 20.0
PROGRESS_INTERVAL_S = 1.0
LONG_DURATION_S = 300.0
LONG_SAMPLE_INTERVAL_S = 10.0
# A long run pre-signs only its first seconds and signs the rest on the fly: 300,000 pre-signed
# transactions (about 5 minutes at 1,000 tx/s) would hold ~200 MB in the load generator.
LONG_PRESIGNED_S = 20.0
# Flat: over the second half of a long run no replica's resident memory grew by more than this
# fraction of what it was at half time (allocator noise, SQLite's page cache settling).
MEMORY_FLAT_FRACTION = 0.05


class BenchError(Exception):
    """The benchmark cannot run (a replica did not start, no free ports); the message says why."""


# ---- the floor ----


@dataclass(frozen=True)
class Primitives:
    """Seconds per operation on this machine, each the fastest of a few timed rounds."""

    verify_s: float
    sign_s: float
    encode_batch_s: float
    decode_batch_s: float
    hash_block_s: float
    batch_size: int
    batch_bytes: int


def _time_per_call(function: Callable[[], object]) -> float:
    """The fewest seconds one call of `function` took, over PRIMITIVE_ROUNDS rounds."""
    rounds = []
    for _ in range(PRIMITIVE_ROUNDS):
        calls = 0
        started = time.perf_counter()
        while True:
            function()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= PRIMITIVE_ROUND_S:
                break
        rounds.append(elapsed / calls)
    return min(rounds)


def bench_transactions(network: NetworkIdentity, key: SigningKey, count: int, first_nonce: int = 0) -> list[Transaction]:
    """Signed puts like the load's (the key names the account, the value its nonce)."""
    label = key.public_key.hex()[:16]
    return [sign_transaction(network, key, nonce, Put(f"bench-{label}", str(nonce))) for nonce in range(first_nonce, first_nonce + count)]


def time_primitives(batch_size: int) -> Primitives:
    network = NetworkIdentity("bench", bytes(32))  # any network: only the cost of each primitive matters
    key = SigningKey.generate()
    transactions = bench_transactions(network, key, batch_size)
    transaction = transactions[0]
    domain = transaction_domain(network)
    signed = transaction.signed_bytes()
    keys = PublicKeyCache()
    assert keys.verify(transaction.sender, domain, signed, transaction.signature)
    plain = [item.to_plain() for item in transactions]
    encoded = encode(plain)
    return Primitives(
        verify_s=_time_per_call(lambda: keys.verify(transaction.sender, domain, signed, transaction.signature)),
        sign_s=_time_per_call(lambda: key.sign(domain, signed)),
        encode_batch_s=_time_per_call(lambda: encode(plain)),
        decode_batch_s=_time_per_call(lambda: decode(encoded)),
        hash_block_s=_time_per_call(lambda: hashlib.sha256(encoded).digest()),
        batch_size=batch_size,
        batch_bytes=len(encoded),
    )


@dataclass(frozen=True)
class Floor:
    transactions_per_second: float  # one signed reply per batch
    per_transaction_reply_transactions_per_second: float  # one signed reply per transaction
    replica_cpu_s_per_transaction: float  # with one reply per batch
    client_cpu_s_per_transaction: float  # with one reply per batch
    cores: int


def compute_floor(primitives: Primitives, replica_count: int, cores: int) -> Floor:
    """The formula of the module docstring."""
    faults = (replica_count - 1) // 3
    batch = primitives.batch_size
    verify, sign = primitives.verify_s, primitives.sign_s
    shared = verify + (primitives.encode_batch_s + primitives.decode_batch_s) / batch
    shared += (2 * 2 * faults * verify + 2 * sign + primitives.hash_block_s) / batch
    # One signed batch reply covers a block: a client checks f + 1 of them per block, not per transaction.
    client_batch_reply = (faults + 1) * verify / batch
    client_transaction_reply = (faults + 1) * verify
    replica_batch_reply = shared + sign / batch
    replica_transaction_reply = shared + sign
    return Floor(
        transactions_per_second=cores / (replica_count * replica_batch_reply + client_batch_reply),
        per_transaction_reply_transactions_per_second=cores / (replica_count * replica_transaction_reply + client_transaction_reply),
        replica_cpu_s_per_transaction=replica_batch_reply,
        client_cpu_s_per_transaction=client_batch_reply,
        cores=cores,
    )


# ---- processes: CPU and memory from /proc ----


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process `pid` used so far (all its threads), 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_bytes(pid: int, field_name: str) -> int:
    """A /proc/PID/status memory field (VmHWM: peak resident set, VmRSS: now) in bytes, 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- the network under test ----


def pick_base_port(replica_count: int) -> int:
    """A base port whose 3n ports (peers, clients, metrics) are free now (client/ports.py)."""
    base = ports.pick_base_port(replica_count, random.Random())
    if base is None:
        raise BenchError(f"no {ports.PORTS_PER_REPLICA * replica_count} consecutive free ports found in {ports.PORT_RANGE}")
    return base


@dataclass
class BenchNetwork:
    """n replica processes started with `ledger-node init` and `ledger-node run`."""

    directory: Path
    replica_count: int
    batch_size_max: int
    batch_wait_ms: int
    traitor_arguments: dict[int, tuple[str, ...]] = field(default_factory=dict)  # replica id -> `--traitor ...`
    profile_directory: Path | None = None
    trace_stages: bool = False
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def client_config(self) -> Path:
        return self.directory / "net" / "client.toml"

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        template = self.directory / "bench.toml"
        template.write_text(
            TEMPLATE.format(
                replicas=self.replica_count,
                base_port=pick_base_port(self.replica_count),
                batch_size_max=self.batch_size_max,
                batch_wait_ms=self.batch_wait_ms,
            )
        )
        network = self.directory / "net"
        initialised = subprocess.run(
            [*NODE_COMMAND, "init", str(template), "--out", str(network)], capture_output=True, text=True, check=False
        )
        if initialised.returncode != 0:
            raise BenchError(f"ledger-node init failed: {initialised.stderr.strip()}")
        for index in range(self.replica_count):
            command = [*NODE_COMMAND, "--log-level", "warning", "run", str(network / f"replica-{index}.toml")]
            command += self.traitor_arguments.get(index, ())
            if self.profile_directory is not None:
                command += ["--profile", str(self.profile_directory / f"replica-{index}.pstats")]
            if self.trace_stages:
                command += ["--trace-stages"]
            log_file = (self.directory / f"replica-{index}.log").open("wb")
            with log_file:
                self.processes.append(
                    subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
                )

    def check_running(self) -> None:
        for index, process in enumerate(self.processes):
            if process.poll() is not None:
                tail = (self.directory / f"replica-{index}.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise BenchError(f"replica {index} exited with {process.returncode}: {' | '.join(tail)}")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def running_network(
    replica_count: int,
    batch_size_max: int,
    batch_wait_ms: int,
    attack: Attack | None = None,
    profile_directory: Path | None = None,
    trace_stages: bool = False,
) -> Iterator[BenchNetwork]:
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as temporary:
        traitors = {} if attack is None else dict(attack.traitor_arguments)
        network = BenchNetwork(Path(temporary), replica_count, batch_size_max, batch_wait_ms, traitors, profile_directory, trace_stages)
        try:
            network.start()
            yield network
        finally:
            network.stop()


# ---- the load ----


class Progress:
    """One status line on stderr, rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.terminal = sys.stderr.isatty()
        self.last_line_s = 0.0

    def show(self, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        if self.terminal:
            sys.stderr.write("\r\x1b[K" + text + ("\n" if final else ""))
        elif final or time.monotonic() - self.last_line_s >= 5 * PROGRESS_INTERVAL_S:
            sys.stderr.write(text + "\n")
            self.last_line_s = time.monotonic()
        sys.stderr.flush()


def presigned_count(floor: Floor, in_flight: int, seconds: float) -> int:
    """Enough transactions that no account runs out at the floor's rate (or at one commit per
    LATENCY_LOWER_BOUND_S per account), and never more than PRESIGNED_MAX."""
    by_floor = floor.transactions_per_second * seconds * 1.2
    by_latency = in_flight * seconds / LATENCY_LOWER_BOUND_S
    return max(in_flight * 4, min(PRESIGNED_MAX, math.ceil(min(by_floor, by_latency))))


@dataclass
class Account:
    """One load account: its key and the transactions signed for it before the timed part."""

    key: SigningKey
    presigned: list[Transaction]


def presign(network: NetworkIdentity, in_flight: int, total: int, progress: Progress) -> list[Account]:
    per_account = math.ceil(total / in_flight)
    accounts = []
    for index in range(in_flight):
        key = SigningKey.generate()
        accounts.append(Account(key, bench_transactions(network, key, per_account)))
        progress.show(f"bench: signing {per_account * in_flight} transactions before the timed part: {100 * (index + 1) // in_flight}%")
    return accounts


def account_transactions(network: NetworkIdentity, account: Account, on_the_fly: Callable[[], None]) -> Iterator[Transaction]:
    """The account's pre-signed transactions, then, for as long as the run lasts, more signed one
    at a time (`on_the_fly` is told of each): a long run never runs out, and holds in memory only
    what was pre-signed."""
    yield from account.presigned
    nonce = len(account.presigned)
    while True:
        on_the_fly()
        yield bench_transactions(network, account.key, 1, first_nonce=nonce)[0]
        nonce += 1


def memory_verdict(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether each replica's resident memory stayed flat over the second half of a long run: the
    first half is where bounded caches fill (verified signatures, waiting requests, the message log
    up to its watermarks, SQLite's page cache); after that, growth means something is unbounded."""
    last = samples[-1]
    half_s = last["at_s"] / 2
    middle = min(samples, key=lambda sample: abs(sample["at_s"] - half_s))
    growth = [after - before for before, after in zip(middle["rss_bytes"], last["rss_bytes"], strict=True)]
    flat = all(change <= MEMORY_FLAT_FRACTION * max(before, 1) for before, change in zip(middle["rss_bytes"], growth, strict=True))
    return {"second_half_from_s": middle["at_s"], "rss_second_half_growth_bytes": growth, "memory_flat": flat}


def stage_breakdown(network: BenchNetwork, traced: dict[bytes, tuple[float, float]]) -> dict[str, float]:
    """Median milliseconds between the stages of the sampled transactions, from the replicas'
    `--trace-stages` lines and the load generator's submit and accept moments (one monotonic
    clock on one host). Replica 0 is the primary (view 0); the middle stages are over all replicas."""
    seen: dict[bytes, dict[int, dict[str, float]]] = {}
    for index in range(network.replica_count):
        for line in (network.directory / f"replica-{index}.log").read_text(errors="replace").splitlines():
            position = line.find("stages replica=")
            if position < 0:
                continue
            words = dict(word.split("=", 1) for word in line[position:].split()[1:] if "=" in word)
            transaction_id = bytes.fromhex(words.pop("transaction"))
            replica = int(words.pop("replica"))
            if transaction_id in traced:
                seen.setdefault(transaction_id, {})[replica] = {stage: float(value) for stage, value in words.items()}
    gaps: dict[str, list[float]] = {}

    def add(name: str, later: float | None, earlier: float | None) -> None:
        if later is not None and earlier is not None:
            gaps.setdefault(name, []).append(1000 * (later - earlier))

    quorum = (network.replica_count - 1) // 3 + 1
    for transaction_id, replicas in seen.items():
        submitted_s, accepted_s = traced[transaction_id]
        primary = replicas.get(0, {})
        add("1 client submit -> request at primary", primary.get("request"), submitted_s)
        add("2 request -> pre-prepare sent (primary)", primary.get("pre_prepare"), primary.get("request"))
        for replica, stamps in replicas.items():
            role = "primary" if replica == 0 else "backup"
            add(f"3 pre-prepare -> prepared ({role})", stamps.get("prepared"), stamps.get("pre_prepare"))
            add(f"4 prepared -> committed, executed ({role})", stamps.get("committed"), stamps.get("prepared"))
            add(f"5 committed -> written ({role})", stamps.get("written"), stamps.get("committed"))
            add(f"6 written -> reply queued ({role})", stamps.get("replied"), stamps.get("written"))
        replied = sorted(stamps["replied"] for stamps in replicas.values() if "replied" in stamps)
        if len(replied) >= quorum:
            add("7 f+1-th reply queued -> client accepted", accepted_s, replied[quorum - 1])
        add("  client submit -> accepted", accepted_s, submitted_s)
    breakdown = {name: percentile(sorted(values), 0.5) for name, values in sorted(gaps.items())}
    breakdown["sampled transactions"] = float(len(seen))
    return breakdown


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def _height(client: Client) -> int:
    """The highest height a replica reports (status: unverified, good enough to count blocks)."""
    statuses = await client.status(wait_s=2.0)
    return max((status.height for status in statuses if status.reachable), default=0)


async def measure(
    network: BenchNetwork,
    floor: Floor,
    in_flight: int,
    warmup_s: float,
    duration_s: float,
    progress: Progress,
    label: str,
    memory_sample_interval_s: float | None = None,
) -> dict[str, Any]:
    """Drive the running network with `in_flight` outstanding requests; the measured window's figures."""
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_client(network.client_config))
        await first.wait_until_ready(deadline_s=READY_DEADLINE_S)
        replica_count = first.network.replica_count
        presigned_s = warmup_s + duration_s if memory_sample_interval_s is None else warmup_s + min(duration_s, LONG_PRESIGNED_S)
        accounts = presign(first.network.identity, in_flight, presigned_count(floor, in_flight, presigned_s), progress)
        clients = [first]
        for _ in range(math.ceil(in_flight / ACCOUNTS_PER_CLIENT_MAX) - 1):
            clients.append(await stack.enter_async_context(open_client(network.client_config)))
        latencies: list[float] = []
        # Sampled transactions (node/stage_trace.py): CLOCK_MONOTONIC at submit and at acceptance.
        traced: dict[bytes, tuple[float, float]] = {}
        state = {"measuring": False, "confirmed": 0, "retries": 0, "signed_on_the_fly": 0, "finished": False}
        # When the first transaction was signed on the fly (perf_counter): from then on the load
        # generator's CPU includes signing, which the floor leaves out.
        first_on_the_fly_s: list[float] = []

        def signed_on_the_fly() -> None:
            if state["measuring"]:
                state["signed_on_the_fly"] += 1
            if not first_on_the_fly_s:
                first_on_the_fly_s.append(time.perf_counter())

        async def account_writer(index: int) -> None:
            client = clients[index // ACCOUNTS_PER_CLIENT_MAX]
            for transaction in account_transactions(first.network.identity, accounts[index], signed_on_the_fly):
                if state["finished"]:
                    return
                while True:
                    started = time.perf_counter()
                    submitted_s = time.monotonic()
                    try:
                        await client.submit(transaction, deadline_s=SUBMIT_DEADLINE_S)
                        break
                    except ClientError:
                        state["retries"] += 1  # the same transaction again: it executes at most once
                if state["measuring"]:
                    state["confirmed"] += 1
                    latencies.append(time.perf_counter() - started)
                    if network.trace_stages and sampled(transaction.transaction_id):
                        traced[transaction.transaction_id] = (submitted_s, time.monotonic())

        memory_samples: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            for index in range(in_flight):
                nursery.start_soon(account_writer, index)
            warmup_end = time.monotonic() + warmup_s
            while time.monotonic() < warmup_end:
                network.check_running()
                progress.show(f"bench: {label}: warming up, {warmup_end - time.monotonic():.0f} s left")
                await trio.sleep(min(PROGRESS_INTERVAL_S, max(warmup_end - time.monotonic(), 0)))
            state["measuring"] = True
            began = time.perf_counter()
            cpu_before = [cpu_seconds(pid) for pid in network.pids]
            own_cpu_before = own_cpu_seconds()
            height_before = await _height(first)
            next_sample_s = 0.0
            while (elapsed := time.perf_counter() - began) < duration_s:
                network.check_running()
                if memory_sample_interval_s is not None and elapsed >= next_sample_s:
                    memory_samples.append({"at_s": round(elapsed, 1), "rss_bytes": [memory_bytes(pid, "VmRSS") for pid in network.pids]})
                    next_sample_s += memory_sample_interval_s
                progress.show(
                    f"bench: {label}: {elapsed:.0f}/{duration_s:g} s, {state['confirmed']} confirmed, "
                    f"{state['confirmed'] / max(elapsed, 1e-9):.0f} tx/s, {state['retries']} retries"
                )
                await trio.sleep(min(PROGRESS_INTERVAL_S, max(duration_s - elapsed, 0)))
            state["measuring"] = False
            elapsed = time.perf_counter() - began
            confirmed = state["confirmed"]
            cpu_after = [cpu_seconds(pid) for pid in network.pids]
            own_cpu = own_cpu_seconds() - own_cpu_before
            if memory_sample_interval_s is not None:
                memory_samples.append({"at_s": round(elapsed, 1), "rss_bytes": [memory_bytes(pid, "VmRSS") for pid in network.pids]})
            height_after = await _height(first)
            state["finished"] = True
            nursery.cancel_scope.cancel()
    progress.show(f"bench: {label}: done, {confirmed / elapsed:.0f} tx/s", final=True)
    latencies.sort()
    blocks = max(height_after - height_before, 0)
    transactions_per_second = confirmed / elapsed
    replica_cpu = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    # CPU per transaction does not depend on how much of the machine other work leaves us.
    cpu_per_transaction_s = (sum(replica_cpu) + own_cpu) / confirmed if confirmed else float("nan")
    floor_cpu_per_transaction_s = floor.cores / floor.transactions_per_second
    result: dict[str, Any] = {
        "replicas": replica_count,
        "in_flight": in_flight,
        "duration_s": round(elapsed, 3),
        "confirmed": confirmed,
        "transactions_per_second": transactions_per_second,
        "latency_p50_ms": 1000 * percentile(latencies, 0.50),
        "latency_p95_ms": 1000 * percentile(latencies, 0.95),
        "latency_p99_ms": 1000 * percentile(latencies, 0.99),
        "blocks_per_second": blocks / elapsed,
        "mean_batch_size": confirmed / blocks if blocks else 0.0,
        "replica_cpu_s": replica_cpu,
        "load_generator_cpu_s": own_cpu,
        "cpu_us_per_transaction": 1e6 * cpu_per_transaction_s,
        "replica_cpu_us_per_transaction": 1e6 * sum(replica_cpu) / len(replica_cpu) / confirmed if confirmed else float("nan"),
        "load_generator_cpu_us_per_transaction": 1e6 * own_cpu / confirmed if confirmed else float("nan"),
        "floor_cpu_us_per_transaction": 1e6 * floor_cpu_per_transaction_s,
        "cpu_ratio_to_floor": floor_cpu_per_transaction_s / cpu_per_transaction_s if confirmed else 0.0,
        "replica_peak_rss_bytes": [memory_bytes(pid, "VmHWM") for pid in network.pids],
        "client_retries": state["retries"],
        # Signed inside the measured window, once the pre-signed supply of an account ran out (a
        # long run by design): the load generator's CPU then includes signing.
        "transactions_signed_on_the_fly": state["signed_on_the_fly"],
        # Seconds into the measured window (negative: during the warm-up); None: none was.
        "first_signed_on_the_fly_at_s": round(first_on_the_fly_s[0] - began, 1) if first_on_the_fly_s else None,
        "floor_transactions_per_second": floor.transactions_per_second,
        "floor_per_transaction_reply_transactions_per_second": floor.per_transaction_reply_transactions_per_second,
        "ratio_to_floor": transactions_per_second / floor.transactions_per_second,
        "ratio_to_floor_per_transaction_reply": transactions_per_second / floor.per_transaction_reply_transactions_per_second,
    }
    if network.trace_stages:
        result["stages_ms"] = stage_breakdown(network, traced)
    if memory_sample_interval_s is not None:
        result["memory_samples"] = memory_samples
        first_sample, last_sample = memory_samples[0]["rss_bytes"], memory_samples[-1]["rss_bytes"]
        result["rss_growth_bytes"] = [last - first for first, last in zip(first_sample, last_sample, strict=True)]
        result.update(memory_verdict(memory_samples))
    return result


# ---- the command line ----


def _replica_counts(text: str) -> list[int]:
    try:
        counts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected replica counts like 4 or 4,7, got {text!r}") from None
    if not counts or any(count < 4 for count in counts):
        raise argparse.ArgumentTypeError(f"every replica count must be at least 4, got {text!r}")
    return counts


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


# ---- attacks: f traitor replicas while the load runs ----

# Not a scenario file: the primary sends nothing to any peer, so the backups' timers expire and
# they replace it (the withhold scenario's traitor is a backup withholding from some peers).
SILENT_PRIMARY = "silent-primary"
ALL_ATTACKS = "all"


@dataclass(frozen=True)
class Attack:
    """Traitor replicas the bench starts for one measurement: each one's `ledger-node run` arguments."""

    name: str
    traitor_arguments: tuple[tuple[int, tuple[str, ...]], ...]  # (replica id, its --traitor ... arguments)

    def describe(self) -> str:
        return "; ".join(f"replica {replica_id}: {' '.join(arguments)}" for replica_id, arguments in self.traitor_arguments)


class AttackRefused(BenchError):
    """A scenario the bench cannot measure at this size; the message says why and what runs it instead."""


def attack_names() -> list[str]:
    return sorted([SILENT_PRIMARY, *scenario_names()])


def bench_attack(name: str, replica_count: int) -> Attack:
    """The traitors of scenario `name` (configs/scenarios/NAME.toml) at `replica_count`, or
    AttackRefused: the bench measures throughput while at most f traitors attack, on plain
    loopback, so a scenario whose point is more than that (f + 1 traitors, a timeline of crashes,
    partitions or joins, lossy links, twins, a colluding coalition) is left to `ledger-scenario run`."""
    if name == SILENT_PRIMARY:
        return Attack(name, ((0, ("--traitor", "withhold")),))
    try:
        scenario = load_scenario(scenario_path(name))
    except (OSError, ScenarioError) as error:
        raise BenchError(f"scenario {name}: {error}") from None
    setup = scenario.setups.get(replica_count)
    if setup is None:
        raise AttackRefused(f"{name} is written for n = {', '.join(map(str, sorted(scenario.setups)))}, not {replica_count}")
    faults = (replica_count - 1) // 3
    runner = f"`ledger-scenario run {name} --replicas {replica_count}`"
    refusal = real_mode_refusal(scenario, setup)
    if refusal is not None:
        raise AttackRefused(f"{name}: {refusal}")
    if not setup.traitors:
        raise AttackRefused(f"{name} has no traitor (its faults are crashes and the network): {runner}")
    if len(setup.traitors) > faults:
        raise AttackRefused(f"{name} has {len(setup.traitors)} traitors, more than f = {faults}: {runner} shows what breaks")
    if setup.timeline:
        events = ", ".join(sorted({event.event for event in setup.timeline}))
        raise AttackRefused(f"{name} needs its timeline ({events}), which the bench does not replay: {runner}")
    if scenario.network.loss_rate or scenario.network.duplicate_rate:
        raise AttackRefused(f"{name} needs lossy links, which the bench does not make: {runner}")
    traitors = []
    for traitor in setup.traitors:
        names = [behaviour.name for behaviour in traitor.behaviours]
        if not names or "twins" in names:
            raise AttackRefused(f"{name}: replica {traitor.replica_id} is a twin or a colluder, which the bench does not start: {runner}")
        arguments = [part for behaviour in traitor.behaviours for part in ("--traitor", format_behaviour_spec(behaviour))]
        traitors.append((traitor.replica_id, (*arguments, "--traitor-seed", str(scenario.seed))))
    return Attack(name, tuple(traitors))


def chosen_attacks(name: str, replica_count: int) -> tuple[list[Attack], dict[str, str]]:
    """The attacks `--scenario name` asks for at this size, and (for `all`) those left out with why."""
    if name != ALL_ATTACKS:
        return [bench_attack(name, replica_count)], {}
    attacks, skipped = [], {}
    for each in attack_names():
        try:
            attacks.append(bench_attack(each, replica_count))
        except AttackRefused as refusal:
            skipped[each] = str(refusal)
    return attacks, skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ledger-bench",
        description="Throughput and latency of a local network of real replicas, as a ratio to the floor this machine's CPUs allow.",
    )
    parser.add_argument("--replicas", type=_replica_counts, default=[4], help="replica count, or several: 4,7 (default: 4)")
    parser.add_argument("--in-flight", type=_positive(int), default=256, help="outstanding requests, one account each (default: 256)")
    parser.add_argument("--duration", type=_positive(float), help="measured seconds (default: 15; 300 with --long)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default: 3)")
    parser.add_argument("--batch-size-max", type=_positive(int), default=400, help="protocol.batch_size_max (default: 400)")
    parser.add_argument("--batch-wait-ms", type=int, default=5, help="protocol.batch_wait_ms (default: 5)")
    parser.add_argument("--sweep", action="store_true", help=f"raise --in-flight step by step ({', '.join(map(str, SWEEP_IN_FLIGHT))}) and print the curve")
    parser.add_argument(
        "--scenario",
        metavar="NAME",
        help=f"measure again while a scenario's f traitors attack (configs/scenarios/NAME.toml, or {SILENT_PRIMARY}; "
        f"`{ALL_ATTACKS}`: every one the bench can run): throughput as a fraction of the fault-free run",
    )
    parser.add_argument("--long", action="store_true", help=f"a long run (default {LONG_DURATION_S:g} s) with each replica's memory sampled every {LONG_SAMPLE_INTERVAL_S:g} s")
    parser.add_argument("--profile", metavar="DIR", type=Path, help="run each fault-free replica under cProfile: DIR/replica-I.pstats (python -m pstats)")
    parser.add_argument(
        "--trace-stages",
        action="store_true",
        help="replicas log the stages of about one transaction in 256 (ledger-node run --trace-stages): print the median of each",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return parser


def _row(result: dict[str, Any]) -> str:
    return (
        f"{result['replicas']:>2} {result['in_flight']:>9} {result['transactions_per_second']:>8.0f} "
        f"{result['latency_p50_ms']:>8.1f} {result['latency_p95_ms']:>8.1f} {result['latency_p99_ms']:>8.1f} "
        f"{result['blocks_per_second']:>8.1f} {result['mean_batch_size']:>7.1f} "
        f"{result['floor_transactions_per_second']:>7.0f} {result['ratio_to_floor']:>6.3f} "
        f"{result['floor_per_transaction_reply_transactions_per_second']:>7.0f} {result['ratio_to_floor_per_transaction_reply']:>6.3f} "
        f"{result['cpu_us_per_transaction']:>10.0f} {result['cpu_ratio_to_floor']:>6.3f}"
    )


TABLE_HEADER = (
    " n in_flight     tx/s  p50(ms)  p95(ms)  p99(ms) blocks/s   batch   floor  ratio floor/tx ratio cpu/tx(us)  cpu-r\n"
    "-- --------- -------- -------- -------- -------- -------- ------- ------- ------ ------- ------ ---------- ------"
)


def describe(results: list[dict[str, Any]], primitives: Primitives, extra: dict[str, Any]) -> str:
    lines = [
        f"machine: {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; "
        f"ed25519 verify {1e6 * primitives.verify_s:.1f} us, sign {1e6 * primitives.sign_s:.1f} us, "
        f"codec on {primitives.batch_size} transactions ({primitives.batch_bytes} bytes): encode {1e6 * primitives.encode_batch_s:.0f} us, "
        f"decode {1e6 * primitives.decode_batch_s:.0f} us, sha-256 {1e6 * primitives.hash_block_s:.1f} us",
        "floor: one signed reply per batch (ratio is to it); floor/tx: one per transaction; client signing is outside the timed part",
        "cpu/tx: CPU microseconds per committed transaction, every replica and the load generator together; cpu-r: the floor's "
        "CPU per transaction over that (the ratio that holds on a busy machine)",
        TABLE_HEADER,
    ]
    lines += [_row(result) for result in results]
    for result in results:
        cpu = ", ".join(f"{seconds:.1f}" for seconds in result["replica_cpu_s"])
        rss = ", ".join(f"{size / 2**20:.0f}" for size in result["replica_peak_rss_bytes"])
        lines.append(
            f"n={result['replicas']} in_flight={result['in_flight']}: CPU seconds per replica [{cpu}], load generator "
            f"{result['load_generator_cpu_s']:.1f}; peak RSS MiB per replica [{rss}]; retries {result['client_retries']}"
            + (
                f"; {result['transactions_signed_on_the_fly']} transactions signed on the fly from "
                f"{result['first_signed_on_the_fly_at_s']} s (the load generator's CPU includes that signing)"
                if result["transactions_signed_on_the_fly"]
                else ""
            )
        )
        if "stages_ms" in result:
            lines.append("  median ms per stage of the sampled transactions (ledger-node run --trace-stages):")
            for name, value in result["stages_ms"].items():
                lines.append(f"    {name:<48} {value:8.2f}")
        if "memory_samples" in result:
            for sample in result["memory_samples"]:
                lines.append(f"  at {sample['at_s']:>6.1f} s RSS MiB: " + ", ".join(f"{size / 2**20:.1f}" for size in sample["rss_bytes"]))
            lines.append("  growth MiB: " + ", ".join(f"{size / 2**20:+.1f}" for size in result["rss_growth_bytes"]))
            lines.append(
                f"  second half (from {result['second_half_from_s']:g} s) growth MiB: "
                + ", ".join(f"{size / 2**20:+.1f}" for size in result["rss_second_half_growth_bytes"])
                + f"; memory {'flat' if result['memory_flat'] else 'NOT flat'} (each under {100 * MEMORY_FLAT_FRACTION:g}% of its half-time size)"
            )
    attacks = [extra["scenario"]] if "scenario" in extra else extra.get("scenarios", [])
    if attacks:
        lines.append(
            "under attack (Aardvark's measure: throughput while f traitors attack, over the mean of a fault-free run before "
            "and after the attacks):"
        )
    for entry in attacks:
        if "skipped" in entry:
            lines.append(f"  n={entry['replicas']} {entry['name']:<22} skipped: {entry['skipped']}")
            continue
        lines.append(
            f"  n={entry['replicas']} {entry['name']:<22} {entry['transactions_per_second']:>7.0f} tx/s, "
            f"{entry['fraction_of_fault_free']:.3f} of the fault-free {entry['fault_free_transactions_per_second']:.0f} "
            f"({' and '.join(f'{rate:.0f}' for rate in entry['fault_free_runs_transactions_per_second'])}), "
            f"p50 {entry['latency_p50_ms']:.1f} ms, p99 {entry['latency_p99_ms']:.1f} ms, retries {entry['client_retries']} ({entry['traitors']})"
        )
    if "worst_fraction_of_fault_free" in extra:
        lines.append(f"  worst: {extra['worst_fraction_of_fault_free']:.3f} of fault-free")
    return "\n".join(lines)


async def run_benchmark(arguments: argparse.Namespace, progress: Progress) -> tuple[list[dict[str, Any]], Primitives, dict[str, Any]]:
    progress.show("bench: timing the primitives")
    primitives = time_primitives(arguments.batch_size_max)
    cores = os.cpu_count() or 1
    results: list[dict[str, Any]] = []
    attack_results: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    memory_interval = LONG_SAMPLE_INTERVAL_S if arguments.long else None
    levels = list(SWEEP_IN_FLIGHT) if arguments.sweep else [arguments.in_flight]
    for replica_count in arguments.replicas:
        floor = compute_floor(primitives, replica_count, cores)
        profile_directory = None
        if arguments.profile is not None:
            profile_directory = arguments.profile.resolve() / f"n{replica_count}"
            profile_directory.mkdir(parents=True, exist_ok=True)
        with running_network(
            replica_count, arguments.batch_size_max, arguments.batch_wait_ms, None, profile_directory, arguments.trace_stages
        ) as network:
            for in_flight in levels:
                label = f"n={replica_count} in_flight={in_flight}"
                results.append(
                    await measure(network, floor, in_flight, arguments.warmup, arguments.duration, progress, label, memory_interval)
                )
        if arguments.scenario is not None:
            attacks, skipped = chosen_attacks(arguments.scenario, replica_count)
            attacked_runs = []
            for attack in attacks:
                with running_network(replica_count, arguments.batch_size_max, arguments.batch_wait_ms, attack) as network:
                    label = f"n={replica_count} {attack.name}"
                    attacked_runs.append(await measure(network, floor, levels[-1], arguments.warmup, arguments.duration, progress, label))
            # The fault-free run again, after the attacks: on a shared machine the CPU left to us
            # drifts over minutes, so each attack is compared with the mean of a run before and after.
            with running_network(replica_count, arguments.batch_size_max, arguments.batch_wait_ms) as network:
                after = await measure(network, floor, levels[-1], arguments.warmup, arguments.duration, progress, f"n={replica_count} fault-free again")
            fault_free_runs_s = [results[-1]["transactions_per_second"], after["transactions_per_second"]]
            fault_free_s = sum(fault_free_runs_s) / 2
            for attack, attacked in zip(attacks, attacked_runs, strict=True):
                attack_results.append(
                    {
                        "name": attack.name,
                        "traitors": attack.describe(),
                        "replicas": replica_count,
                        "transactions_per_second": attacked["transactions_per_second"],
                        "fault_free_transactions_per_second": fault_free_s,
                        "fault_free_runs_transactions_per_second": fault_free_runs_s,
                        "fraction_of_fault_free": attacked["transactions_per_second"] / fault_free_s if fault_free_s else 0.0,
                        "latency_p50_ms": attacked["latency_p50_ms"],
                        "latency_p99_ms": attacked["latency_p99_ms"],
                        "client_retries": attacked["client_retries"],
                        "run": attacked,
                    }
                )
            for name, reason in skipped.items():
                attack_results.append({"name": name, "replicas": replica_count, "skipped": reason})
    measured = [entry for entry in attack_results if "skipped" not in entry]
    if len(measured) == 1 and len(attack_results) == 1:
        extra["scenario"] = measured[0]
    elif attack_results:
        extra["scenarios"] = attack_results
        if measured:
            extra["worst_fraction_of_fault_free"] = min(entry["fraction_of_fault_free"] for entry in measured)
    return results, primitives, extra


def _finite(value: Any) -> Any:
    """The same value with NaN (a latency nothing was measured for) as null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.duration is None:
        arguments.duration = LONG_DURATION_S if arguments.long else DURATION_S
    if arguments.scenario is not None and arguments.scenario != ALL_ATTACKS:
        # Before anything starts: a typo or a scenario the bench cannot measure is a one-line error.
        if arguments.scenario not in attack_names():
            print(f"ledger-bench: unknown scenario {arguments.scenario!r}; known: {', '.join(attack_names())}, or {ALL_ATTACKS}", file=sys.stderr)
            return 2
        for replica_count in arguments.replicas:
            try:
                bench_attack(arguments.scenario, replica_count)
            except BenchError as error:
                print(f"ledger-bench: {error}", file=sys.stderr)
                return 2
    progress = Progress(arguments.quiet)
    try:
        results, primitives, extra = trio.run(run_benchmark, arguments, progress)
    except BenchError as error:
        print(f"ledger-bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if arguments.json:
        summary: dict[str, Any] = dict(results[0]) if len(results) == 1 else {"runs": results}
        summary.update(
            {
                "cores": os.cpu_count(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "primitives_us": {name.removesuffix("_s"): 1e6 * value for name, value in asdict(primitives).items() if name.endswith("_s")},
                "primitives_batch_size": primitives.batch_size,
                **extra,
            }
        )
        if len(results) > 1:
            summary["runs"] = results
        print(json.dumps(_finite(summary), indent=2, allow_nan=False))
    else:
        print(describe(results, primitives, extra), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
