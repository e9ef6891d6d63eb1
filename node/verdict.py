"""The verdict of one scenario run: what happened, judged against what the scenario file expects.

A backend (the simulator, node/scenario_sim.py; real processes, node/scenario_real.py) reports a `RunRecord`:
counts, the honest replicas' chains, the receipts the clients accepted, what the traitors did
and the first invariant that broke, if any. From that alone this module compares the honest
chains block by block, checks every receipt against them, names the culprits of a fork (the
replicas whose signatures are on both blocks of one height) and decides safety and liveness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from client.quorum import Receipt
from ledger.blocks import Block, commit_domain, commit_signed_bytes
from ledger.crypto import NetworkIdentity, verify_signature
from node.scenarios import Expectation

# Broken invariants that are about progress, not about what was committed or signed.
LIVENESS_INVARIANTS = ("liveness",)
CONTRADICTIONS_SHOWN_MAX = 5


@dataclass(frozen=True)
class TraitorReport:
    replica_id: int
    behaviours: str
    activity: dict[str, int]


@dataclass(frozen=True)
class BrokenInvariant:
    invariant: str
    text: str


@dataclass
class RunRecord:
    """What a backend saw, whatever ran the replicas."""

    scenario: str
    backend: str
    replica_count: int
    seed: int
    network_id: str
    replica_keys: tuple[bytes, ...]
    genesis_hash: bytes
    submitted: int
    receipts: list[Receipt]
    views: dict[int, int]  # honest replica -> its final view
    chains: dict[int, list[Block | None]]  # honest replica -> its chain (None below a state-synced store's base)
    traitors: tuple[TraitorReport, ...]
    rejections: dict[str, int]  # why the honest replicas refused messages, summed
    broken: BrokenInvariant | None
    elapsed_s: float
    simulated_ms: int | None = None  # when the run ended (a simulator run lasts at least as long as its faults)
    confirmed_by_ms: int | None = None  # when the clients accepted their last receipt
    fault_free_confirmed_by_ms: int | None = None  # the same, for the same workload without traitors or faults
    collusion_side: tuple[int, ...] = ()

    @property
    def faults_tolerated(self) -> int:
        return (self.replica_count - 1) // 3

    @property
    def quorum(self) -> int:
        return 2 * self.faults_tolerated + 1


@dataclass(frozen=True)
class ForkedBlock:
    block_hash: str
    replicas: tuple[int, ...]
    signers: tuple[int, ...]  # whose COMMIT signatures in its certificate verify


@dataclass(frozen=True)
class Fork:
    height: int
    blocks: tuple[ForkedBlock, ...]
    culprits: tuple[int, ...]  # replicas whose signatures are on every one of the blocks


@dataclass
class Verdict:
    scenario: str
    backend: str
    replica_count: int
    faults_tolerated: int
    seed: int
    submitted: int
    confirmed: int
    refused: int
    view_changes: int
    views: dict[int, int]
    traitors: list[TraitorReport]
    heights: dict[int, int]
    agreed_height: int
    forks: list[Fork]
    receipts_checked: int
    contradicted_receipts: list[str]
    broken: BrokenInvariant | None
    evidence_seen: dict[str, int]
    safety: str
    liveness: str | None
    expected: Expectation
    missing_evidence: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    simulated_ms: int | None = None
    confirmed_by_ms: int | None = None
    fault_free_confirmed_by_ms: int | None = None

    @property
    def matches(self) -> bool:
        if self.safety != self.expected.safety:
            return False
        if self.expected.liveness is not None and self.liveness != self.expected.liveness:
            return False
        return not self.missing_evidence

    @property
    def throughput_ratio(self) -> float | None:
        """Throughput under attack as a fraction of the fault-free run of the same workload (the
        Aardvark measure): the fault-free run's time to its last receipt over the attack's, when
        both confirmed every transaction."""
        if self.confirmed != self.submitted or self.confirmed_by_ms is None or self.fault_free_confirmed_by_ms is None:
            return None
        return self.fault_free_confirmed_by_ms / max(self.confirmed_by_ms, 1)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["matches"] = self.matches
        data["throughput_ratio"] = self.throughput_ratio
        return data


def certificate_signers(block: Block, network: NetworkIdentity, replica_keys: tuple[bytes, ...]) -> tuple[int, ...]:
    """The replicas whose COMMIT signatures in the block's certificate verify."""
    certificate = block.certificate
    if certificate is None:
        return ()
    domain = commit_domain(network)
    batch = block.header.batch_digest()
    signers = set()
    for replica_id, signature in certificate.signatures:
        if replica_id < len(replica_keys):
            message = commit_signed_bytes(certificate.view, block.height, batch, replica_id)
            if verify_signature(replica_keys[replica_id], domain, message, signature):
                signers.add(replica_id)
    return tuple(sorted(signers))


def compare_chains(record: RunRecord) -> tuple[int, list[Fork]]:
    """The height up to which every honest chain that reaches it agrees, and every height where
    two honest replicas hold different blocks."""
    forks = []
    top = max((len(chain) for chain in record.chains.values()), default=0)
    agreed_height = 0
    for height in range(1, top + 1):
        holders: dict[bytes, list[int]] = {}
        blocks: dict[bytes, Block] = {}
        for replica, chain in sorted(record.chains.items()):
            block = chain[height - 1] if len(chain) >= height else None
            if block is not None:
                holders.setdefault(block.block_hash, []).append(replica)
                blocks[block.block_hash] = block
        if len(holders) > 1:
            forked = tuple(
                ForkedBlock(block_hash.hex(), tuple(holders[block_hash]), certificate_signers(blocks[block_hash], NetworkIdentity(record.network_id, record.genesis_hash), record.replica_keys))
                for block_hash in holders
            )
            culprits = set(forked[0].signers)
            for block in forked[1:]:
                culprits &= set(block.signers)
            forks.append(Fork(height, forked, tuple(sorted(culprits))))
        elif not forks:
            agreed_height = height
    return agreed_height, forks


def check_receipts(record: RunRecord) -> list[str]:
    """Every receipt a client accepted must be what each honest chain holds at its place."""
    contradictions = []
    for receipt in record.receipts:
        for replica, chain in sorted(record.chains.items()):
            block = chain[receipt.height - 1] if len(chain) >= receipt.height else None
            if block is None:
                continue
            if (
                block.block_hash != receipt.block_hash
                or receipt.index >= len(block.transactions)
                or block.transactions[receipt.index].transaction_id != receipt.transaction_id
                or block.results[receipt.index] != receipt.result
            ):
                contradictions.append(
                    f"transaction {receipt.transaction_id.hex()[:12]} at height {receipt.height} (signed by replicas "
                    f"{', '.join(map(str, receipt.replicas))}) is not what replica {replica} holds there"
                )
    return contradictions


def judge(record: RunRecord, expected: Expectation) -> Verdict:
    agreed_height, forks = compare_chains(record)
    contradictions = check_receipts(record)
    broken = record.broken
    safety_broken = bool(forks or contradictions) or (broken is not None and broken.invariant not in LIVENESS_INVARIANTS)
    safety = "breaks" if safety_broken else "holds"
    liveness: str | None = None if safety_broken else ("breaks" if broken is not None else "holds")
    evidence = {reason: count for reason, count in sorted(record.rejections.items()) if count}
    if forks:
        evidence["fork"] = len(forks)
    if broken is not None:
        evidence[broken.invariant] = evidence.get(broken.invariant, 0) + 1
    confirmed = sum(1 for receipt in record.receipts if receipt.result.ok)
    return Verdict(
        scenario=record.scenario,
        backend=record.backend,
        replica_count=record.replica_count,
        faults_tolerated=record.faults_tolerated,
        seed=record.seed,
        submitted=record.submitted,
        confirmed=confirmed,
        refused=len(record.receipts) - confirmed,
        view_changes=max(record.views.values(), default=0),
        views=dict(record.views),
        traitors=list(record.traitors),
        heights={replica: len(chain) for replica, chain in sorted(record.chains.items())},
        agreed_height=agreed_height,
        forks=forks,
        receipts_checked=len(record.receipts),
        contradicted_receipts=contradictions,
        broken=broken,
        evidence_seen=evidence,
        safety=safety,
        liveness=liveness,
        expected=expected,
        missing_evidence=[item for item in expected.evidence if item not in evidence],
        elapsed_s=record.elapsed_s,
        simulated_ms=record.simulated_ms,
        confirmed_by_ms=record.confirmed_by_ms,
        fault_free_confirmed_by_ms=record.fault_free_confirmed_by_ms,
    )


def _replicas(replicas: tuple[int, ...] | list[int]) -> str:
    return ", ".join(map(str, replicas)) if replicas else "none"


def render(verdict: Verdict, replay: str) -> str:
    """The verdict table, one fact per line."""
    f = verdict.faults_tolerated
    lines = [f"scenario {verdict.scenario}: n={verdict.replica_count} (tolerates f={f}), seed {verdict.seed}, {verdict.backend}"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<14}{text}")

    row("transactions", f"{verdict.submitted} submitted, {verdict.confirmed} confirmed, {verdict.refused} refused (final receipts that failed)")
    views = sorted(set(verdict.views.values()))
    row("view changes", f"{verdict.view_changes} (final views of the honest replicas: {_replicas(views)})")
    if not verdict.traitors:
        row("traitors", "none")
    for traitor in verdict.traitors:
        activity = traitor.activity
        if not activity:
            # A real process: what it sent is not counted; the honest replicas' refusals show below.
            row("traitor", f"replica {traitor.replica_id}: {traitor.behaviours}; a separate process, its messages not counted")
            continue
        row(
            "traitor",
            f"replica {traitor.replica_id}: {traitor.behaviours}; its core made {activity.get('core_messages', 0)} messages, "
            f"{activity.get('sent_unchanged', 0)} went out unchanged, {activity.get('sent_forged', 0)} rewritten or made up, "
            f"{activity.get('received_ignored', 0)} received and ignored, {activity.get('blocks_served', 0)} blocks served",
        )
    heights = ", ".join(f"{replica}: {height}" for replica, height in verdict.heights.items())
    if not verdict.forks:
        row("chains", f"the honest chains agree block by block up to height {verdict.agreed_height} (heights {heights})")
    for fork in verdict.forks:
        row("FORK", f"height {fork.height}: honest replicas hold different blocks")
        for block in fork.blocks:
            row("", f"block {block.block_hash[:16]} on replicas {_replicas(block.replicas)}, certificate signed by {_replicas(block.signers)}")
        enough = "at least f+1: any two quorums of 2f+1 share f+1 replicas" if len(fork.culprits) >= f + 1 else "fewer than f+1"
        row("culprits", f"replicas {_replicas(fork.culprits)} signed both ({len(fork.culprits)}, {enough}; an honest replica signs one block per height)")
    if verdict.broken is None and verdict.simulated_ms is None:
        row("invariants", "checked at the end: every honest chain verifies from genesis (links, certificates, re-execution), every transaction confirmed in time")
    elif verdict.broken is None:
        row("invariants", "agreement, hash chain, validity, exactly-once, no equivocation by an honest replica: all held at every step")
    else:
        row("invariants", f"{verdict.broken.invariant} broke: {verdict.broken.text}")
    if verdict.contradicted_receipts:
        row("receipts", f"{len(verdict.contradicted_receipts)} of the checks of {verdict.receipts_checked} accepted receipts contradict an honest chain:")
        for text in verdict.contradicted_receipts[:CONTRADICTIONS_SHOWN_MAX]:
            row("", text)
    else:
        row("receipts", f"every one of the {verdict.receipts_checked} receipts the clients accepted matches the honest chains")
    evidence = ", ".join(f"{reason} x{count}" for reason, count in verdict.evidence_seen.items()) or "nothing refused"
    row("evidence", evidence)
    if verdict.missing_evidence:
        row("", f"expected but not seen: {', '.join(verdict.missing_evidence)}")
    timing = f"{verdict.elapsed_s:.2f} s"
    if verdict.simulated_ms is not None:
        timing += f" of computing; simulated: the run ended at {verdict.simulated_ms} ms"
        if verdict.confirmed_by_ms is not None:
            timing += f", the last receipt came at {verdict.confirmed_by_ms} ms"
        if verdict.fault_free_confirmed_by_ms is not None:
            timing += f"; without traitors or faults the same workload is confirmed by {verdict.fault_free_confirmed_by_ms} ms"
    elif verdict.confirmed_by_ms is not None:
        timing += f" in all; real time: the last receipt came {verdict.confirmed_by_ms} ms after the workload started"
        if verdict.fault_free_confirmed_by_ms is not None:
            timing += f"; without traitors or faults, {verdict.fault_free_confirmed_by_ms} ms"
    row("time", timing)
    ratio = verdict.throughput_ratio
    if ratio is not None:
        row(
            "throughput",
            f"{ratio:.2f} of the fault-free run's ({verdict.submitted} transactions confirmed by {verdict.confirmed_by_ms} ms "
            f"under attack, by {verdict.fault_free_confirmed_by_ms} ms without it)",
        )
    liveness = verdict.liveness if verdict.liveness is not None else "not judged (safety broke)"
    outcome = "MATCHES the expectation" if verdict.matches else "DOES NOT MATCH the expectation"
    row("verdict", f"safety {verdict.safety}, liveness {liveness}; expected {_expected_text(verdict.expected)}: {outcome}")
    row("replay", replay)
    return "\n".join(lines)


def _expected_text(expected: Expectation) -> str:
    text = f"safety {expected.safety}"
    if expected.liveness is not None:
        text += f", liveness {expected.liveness}"
    if expected.evidence:
        text += f", evidence {', '.join(expected.evidence)}"
    return text
