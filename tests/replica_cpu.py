"""Not a test: a deterministic in-process measurement of a replica's CPU per committed transaction.

Four ReplicaCores in one process, driven round by round as node/runtime.py drives one: each
round a replica decodes what reached it (every message travels ENCODED, as on the wire), checks
the round's request signatures together, feeds the core, ticks it, and carries out its effects the
way the runtime does (persist records and blocks in one write_round on a real BlockStore in a
temporary directory, then encode and send, then encode a reply per subscriber). A closed-loop
client keeps `--in-flight` accounts busy, one transaction each, with pre-signed Puts as
`ledger-bench` sends; a transaction is done at f + 1 replies.

Each replica's CPU is its thread time over its rounds (disk waits excluded). Ed25519 verifies and
signs are counted; one verify in VERIFY_SAMPLE_EVERY is timed during the run, signs apart before
and after it (calibrate): their count times that cost is taken off, so the non-verify work per
transaction is visible.

    .venv/bin/python tests/replica_cpu.py --transactions 20000
    .venv/bin/python tests/replica_cpu.py --transactions 20000 --profile 25
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.config import Address, NetworkConfig, ProtocolSettings, ReplicaInfo
from ledger.crypto import PublicKeyCache, SigningKey
from ledger.messages import Request, decode_message, encode_message

try:  # the harness also measures code from before replies were encoded this way (PYTHONPATH=...)
    from ledger.messages import ReplyEncoder
except ImportError:
    ReplyEncoder = None  # type: ignore[assignment,misc]
from ledger.restore import restore_application
from ledger.storage import BlockStore
from ledger.transactions import Put, Transaction, sign_transaction, transaction_domain
from node.core import LOG_KINDS, ReplicaCore
from node.effects import Effects
from node.runtime import EVENTS_PER_ROUND_MAX, round_requests
from node.signature_threads import PARALLEL_CHECKS_MIN

REPLICA_COUNT = 4
VERIFY_SAMPLE_EVERY = 8
ROUND_MS = 1  # logical time per round of every replica


@dataclass
class Costs:
    """One replica's measured thread time, in seconds, and its Ed25519 operations."""

    total_s: float = 0.0
    # Where total_s went, by phase of the round (the crypto is inside core_s, mostly).
    decode_s: float = 0.0
    core_s: float = 0.0
    persist_s: float = 0.0  # encoding the records, and write_round
    write_s: float = 0.0  # write_round alone
    send_s: float = 0.0
    reply_s: float = 0.0
    client_verifies: int = 0
    sampled_verify_s: float = 0.0
    sampled_verifies: int = 0
    replica_verifies: int = 0
    signs: int = 0


class CountingVerifier:
    """PublicKeyCache.verify, counting client and replica signature checks. Not timed one by one
    (reading a thread clock costs over a microsecond here): the checks' cost is their count times
    a verify timed apart (calibrate)."""

    def __init__(self, costs: Costs, client_domain: bytes) -> None:
        self.costs = costs
        self.client_domain = client_domain
        self.keys = PublicKeyCache()

    def verify(self, public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
        costs = self.costs
        if domain == self.client_domain:
            costs.client_verifies += 1
        else:
            costs.replica_verifies += 1
        if (costs.client_verifies + costs.replica_verifies) % VERIFY_SAMPLE_EVERY:
            return self.keys.verify(public_key, domain, message, signature)
        # One check in VERIFY_SAMPLE_EVERY is timed: what a verify costs during the run, on a
        # host whose speed drifts (a calibration before and after can miss by 30%).
        start = time.thread_time()
        valid = self.keys.verify(public_key, domain, message, signature)
        costs.sampled_verify_s += time.thread_time() - start
        costs.sampled_verifies += 1
        return valid

    def check(self, items: Sequence[tuple[bytes, bytes, bytes, bytes]]) -> list[bool]:
        return [self.verify(*item) for item in items]


@dataclass(frozen=True)
class CountingKey:
    """A SigningKey counting its signatures."""

    key: SigningKey
    costs: Costs

    @property
    def public_key(self) -> bytes:
        return self.key.public_key

    def sign(self, domain: bytes, message: bytes) -> bytes:
        self.costs.signs += 1
        return self.key.sign(domain, message)


def calibrate(transaction: Transaction, domain: bytes, key: SigningKey, count: int = 2000) -> tuple[float, float]:
    """Thread seconds of one Ed25519 verify (of a client signature, as the cores check them) and one sign."""
    keys = PublicKeyCache()
    message = transaction.signed_bytes()
    start = time.thread_time()
    for _ in range(count):
        keys.verify(transaction.sender, domain, message, transaction.signature)
    verify_s = (time.thread_time() - start) / count
    start = time.thread_time()
    for _ in range(count):
        key.sign(domain, message)
    return verify_s, (time.thread_time() - start) / count


@dataclass
class HarnessReplica:
    replica_id: int
    core: ReplicaCore
    store: BlockStore
    verifier: CountingVerifier
    costs: Costs
    inbox: list[tuple[str, int | None, bytes]] = field(default_factory=list)
    blocks: int = 0
    transactions: int = 0


def make_network(client_keys: list[SigningKey], batch_size_max: int) -> tuple[NetworkConfig, list[SigningKey]]:
    """A 4-replica network with the settings ledger-bench uses (window 64, checkpoint interval 128)."""
    keys = [SigningKey.from_private_bytes(hashlib.sha256(f"replica-cpu replica {index}".encode()).digest()) for index in range(REPLICA_COUNT)]
    replicas = tuple(
        ReplicaInfo(index, key.public_key, Address("127.0.0.1", 7000 + 2 * index), Address("127.0.0.1", 7001 + 2 * index))
        for index, key in enumerate(keys)
    )
    protocol = ProtocolSettings(batch_size_max=batch_size_max, batch_wait_ms=5, window_size=64, checkpoint_interval=128)
    balances = {key.public_key: 1_000_000 for key in client_keys}
    return NetworkConfig("replica-cpu", replicas, protocol, balances), keys


def check_request_signatures(replica: HarnessReplica, events: list[tuple[str, Any, Any]]) -> None:
    """ReplicaRuntime._check_request_signatures: the round's requests checked together."""
    transactions = replica.core.requests_worth_checking(round_requests(events))
    if len(transactions) < PARALLEL_CHECKS_MIN:
        return
    domain = replica.verifier.client_domain
    results = replica.verifier.check(
        [(transaction.sender, domain, transaction.signed_bytes(), transaction.signature) for transaction in transactions]
    )
    verified = [transaction.transaction_id for transaction, valid in zip(transactions, results, strict=True) if valid]
    refused = [transaction.transaction_id for transaction, valid in zip(transactions, results, strict=True) if not valid]
    replica.core.note_verified_signatures(verified, refused)


class Harness:
    def __init__(self, transactions_total: int, in_flight: int, batch_size_max: int, directory: Path) -> None:
        self.client_keys = [
            SigningKey.from_private_bytes(hashlib.sha256(f"replica-cpu client {index}".encode()).digest()) for index in range(in_flight)
        ]
        self.network, replica_keys = make_network(self.client_keys, batch_size_max)
        client_domain = transaction_domain(self.network.identity)
        self.replicas: list[HarnessReplica] = []
        for index in range(REPLICA_COUNT):
            costs = Costs()
            verifier = CountingVerifier(costs, client_domain)
            store = BlockStore.open(directory / f"replica-{index}" / "ledger.sqlite3", self.network.genesis_hash)
            restored = restore_application(store, self.network)  # as the runtime opens a new store: the genesis state written
            core = ReplicaCore(
                self.network,
                index,
                CountingKey(replica_keys[index], costs),  # type: ignore[arg-type]
                restored.application,
                check_signature=verifier.verify,
                check_signatures=verifier.check,
            )
            self.replicas.append(HarnessReplica(index, core, store, verifier, costs))
        # Signed and encoded before anything is timed, as ledger-bench signs before its timed part.
        per_account = -(-transactions_total // in_flight)
        self.requests: list[list[tuple[bytes, bytes]]] = []
        for index, key in enumerate(self.client_keys):
            queue = []
            for nonce in range(per_account):
                transaction = sign_transaction(self.network.identity, key, nonce, Put(f"bench-{index}", str(nonce)))
                queue.append((transaction.transaction_id, encode_message(Request(transaction))))
            queue.reverse()
            self.requests.append(queue)
        self.account_of = {key.public_key: index for index, key in enumerate(self.client_keys)}
        self.reply_counts: dict[bytes, int] = {}
        self.submitted = 0
        self.confirmed = 0
        self.now_ms = 0

    def submit_next(self, account: int) -> None:
        queue = self.requests[account]
        if queue:
            _, payload = queue.pop()
            primary = self.replicas[self.replicas[0].core.primary]
            primary.inbox.append(("client", None, payload))
            self.submitted += 1

    def round(self, replica: HarnessReplica) -> list[tuple[bytes, bytes]]:
        """One runtime round of this replica: what it replied (account, transaction id)."""
        start = time.thread_time()
        pending, replica.inbox = replica.inbox[:EVENTS_PER_ROUND_MAX], replica.inbox[EVENTS_PER_ROUND_MAX:]
        events: list[tuple[str, Any, Any]] = []
        for kind, origin, payload in pending:
            message = decode_message(payload)
            if kind == "client":
                assert isinstance(message, Request)
                transaction = message.transaction
                # ReplicaRuntime._client_request: a used nonce would mean a look-up in the store.
                if replica.core.application.check(transaction) is not None:
                    replica.store.locate_transaction(transaction.transaction_id)
                events.append(("request", None, transaction))
            else:
                events.append(("peer", origin, message))
        decoded = time.thread_time()
        replica.costs.decode_s += decoded - start
        if events:
            check_request_signatures(replica, events)
            for kind, origin, message in events:
                if kind == "peer":
                    replica.core.receive_message(origin, message)
                else:
                    replica.core.receive_request(message)
        replica.core.tick(self.now_ms)
        effects = replica.core.take_effects()
        replica.costs.core_s += time.thread_time() - decoded
        replied = self.carry_out(replica, effects)
        replica.costs.total_s += time.thread_time() - start
        return replied

    def carry_out(self, replica: HarnessReplica, effects: Effects) -> list[tuple[bytes, bytes]]:
        """ReplicaRuntime._carry_out for an honest replica: persist, send, reply."""
        costs = replica.costs
        started = time.thread_time()
        encoded: dict[int, bytes] = {}
        if effects.persist or effects.blocks or effects.prune is not None:
            records = []
            for record in effects.persist:
                payload = encode_message(record.message)
                encoded[id(record.message)] = payload
                records.append((record.kind, record.view, record.sequence, payload))
            prune = None if effects.prune is None else (effects.prune.through_sequence, effects.prune.view, LOG_KINDS)
            writing = time.thread_time()
            replica.store.write_round(records, effects.blocks, prune, effects.state)
            costs.write_s += time.thread_time() - writing
        persisted = time.thread_time()
        costs.persist_s += persisted - started
        for send in effects.send:
            payload = encoded.get(id(send.message))
            if payload is None:
                payload = encode_message(send.message)
            targets = [send.to] if send.to is not None else [other for other in range(REPLICA_COUNT) if other != replica.replica_id]
            for target in targets:
                self.replicas[target].inbox.append(("peer", replica.replica_id, payload))
        replica.blocks += len(effects.blocks)
        replica.transactions += sum(len(block.transactions) for block in effects.blocks)
        sent = time.thread_time()
        costs.send_s += sent - persisted
        replied = []
        replies = ReplyEncoder() if ReplyEncoder is not None else None
        for client_reply in effects.replies:
            # One subscriber per account: one encoding each, as ReplicaRuntime._carry_out does.
            if replies is not None:
                replies.encode(client_reply.reply)
            else:
                encode_message(client_reply.reply)
            replied.append((client_reply.account, client_reply.reply.transaction_id))
        costs.reply_s += time.thread_time() - sent
        return replied

    def run(self, transactions_total: int) -> None:
        for account in range(len(self.client_keys)):
            self.submit_next(account)
        quorum = self.network.reply_quorum
        idle_rounds = 0
        while self.confirmed < transactions_total and idle_rounds < 10_000:
            self.now_ms += ROUND_MS
            progress = False
            for replica in self.replicas:
                had_work = bool(replica.inbox)
                for account_key, transaction_id in self.round(replica):
                    count = self.reply_counts.get(transaction_id, 0) + 1
                    self.reply_counts[transaction_id] = count
                    if count == quorum:
                        self.confirmed += 1
                        self.submit_next(self.account_of[account_key])
                progress = progress or had_work
            idle_rounds = 0 if progress else idle_rounds + 1

    def close(self) -> None:
        for replica in self.replicas:
            replica.store.close()


def report(harness: Harness, wall_s: float, verify_s: float, sign_s: float) -> str:
    """Per replica and committed transaction: CPU in all, the client-signature checks' share (count
    times verify_s), and what is left once every Ed25519 verify, then every sign too, is taken off."""
    lines = [
        f"{harness.confirmed} transactions confirmed (f + 1 replies) in {wall_s:.2f} s wall; logical time {harness.now_ms} ms; "
        f"Ed25519 verify {verify_s * 1e6:.1f} us, sign {sign_s * 1e6:.1f} us",
        "replica  blocks  mean batch  total us/tx  client verifies/tx  client-verify us/tx  replica verifies/tx  signs/tx  "
        "non-verify us/tx  non-crypto us/tx",
    ]
    rows = []
    for replica in harness.replicas:
        costs = replica.costs
        per = 1 / max(1, replica.transactions)
        total = costs.total_s * per * 1e6
        client_verify = costs.client_verifies * per * verify_s * 1e6
        non_verify = total - (costs.client_verifies + costs.replica_verifies) * per * verify_s * 1e6
        non_crypto = non_verify - costs.signs * per * sign_s * 1e6
        rows.append((total, client_verify, non_verify, non_crypto))
        lines.append(
            f"{replica.replica_id:>7}  {replica.blocks:>6}  {replica.transactions / max(1, replica.blocks):>10.1f}  {total:>11.1f}  "
            f"{costs.client_verifies * per:>18.2f}  {client_verify:>19.1f}  {costs.replica_verifies * per:>19.3f}  {costs.signs * per:>8.3f}  "
            f"{non_verify:>16.1f}  {non_crypto:>16.1f}"
        )
    lines.append("phase us/tx (backups' mean): " + ", ".join(
        f"{name} {sum(getattr(replica.costs, name + '_s') / max(1, replica.transactions) for replica in harness.replicas[1:]) / (len(harness.replicas) - 1) * 1e6:.1f}"
        for name in ("decode", "core", "persist", "write", "send", "reply")
    ) + " (core holds the Ed25519 work; write is within persist)")
    for name, chosen in (("replicas", rows), ("backups", rows[1:])):
        means = [sum(column) / len(chosen) for column in zip(*chosen, strict=True)]
        lines.append(
            f"mean over {name + ':':<9} total {means[0]:.1f} us/tx, client verify {means[1]:.1f}, non-verify {means[2]:.1f}, "
            f"non-crypto {means[3]:.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=64, help="accounts kept busy, one transaction each (64: batches of 64, as ledger-bench sees)")
    parser.add_argument("--batch-size-max", type=int, default=400)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="run under cProfile and print the top N by own time")
    parser.add_argument("--sort", default="tottime", help="the pstats sort key for --profile (tottime, cumtime)")
    parser.add_argument("--callers", default="", help="with --profile: also print the callers of functions matching this")
    parser.add_argument("--dump", type=Path, help="with --profile: write the pstats here")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="replica-cpu-") as directory:
        harness = Harness(arguments.transactions, arguments.in_flight, arguments.batch_size_max, Path(directory))
        sample = Transaction.decode(decode_message(harness.requests[0][-1][1]).transaction.encoded)
        domain = transaction_domain(harness.network.identity)
        verify_before_s, sign_before_s = calibrate(sample, domain, harness.client_keys[0])
        # Thread time, not wall time: a commit's fsync wait is no CPU.
        profiler = cProfile.Profile(time.thread_time) if arguments.profile else None
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            harness.run(arguments.transactions)
        finally:
            if profiler is not None:
                profiler.disable()
            harness.close()
        wall_s = time.perf_counter() - started
        verify_after_s, sign_after_s = calibrate(sample, domain, harness.client_keys[0])
        sampled = sum(replica.costs.sampled_verifies for replica in harness.replicas)
        verify_s = sum(replica.costs.sampled_verify_s for replica in harness.replicas) / max(1, sampled)
        print(f"Ed25519 verify timed apart: {verify_before_s * 1e6:.1f} us before the run, {verify_after_s * 1e6:.1f} after; "
              f"{verify_s * 1e6:.1f} us in the run ({sampled} checks timed): what is taken off")
        print(report(harness, wall_s, verify_s, (sign_before_s + sign_after_s) / 2))
        if harness.confirmed < arguments.transactions:
            print(f"stalled: only {harness.confirmed} of {arguments.transactions} confirmed", file=sys.stderr)
            return 1
        if profiler is not None:
            print("(under cProfile: the times above are inflated by it)")
            stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs().sort_stats(arguments.sort)
            stats.print_stats(arguments.profile)
            if arguments.callers:
                stats.print_callers(arguments.callers)
            if arguments.dump is not None:
                stats.dump_stats(arguments.dump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
