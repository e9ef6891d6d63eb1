"""Deterministic simulation: n replica cores, seeded network faults and traitors, invariants at every step.

Everything random comes from the seed, and time is a logical clock, so a failing seed replays
exactly: `ledger-node simulate --seed S --replicas N [--adversarial]` (or `make sim SEED=S`).
In the adversarial mode up to f replicas are traitors (node/traitors.py: honest cores wrapped in
behaviours that rewrite, withhold, delay or add to what they send) or crash, stall and are cut off,
and ByzzFuzz-style random partitions come and go; the invariants are checked over honest replicas.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from client.quorum import QueryQuorum, Receipt, ReplyQuorum
from ledger.application import AccountsApplication, StateChanges, is_final, is_outcome
from ledger.blocks import Block, ChainError, verify_certificate, verify_execution
from ledger.config import Address, NetworkConfig, ProtocolSettings, ReplicaInfo
from ledger.crypto import VERIFIED_SIGNATURES_MAX, PublicKeyCache, SigningKey, signing_domain
from ledger.messages import (
    BATCH_REPLY_DOMAIN,
    QUERY_NONCE_SIZE,
    Blocks,
    Checkpoint,
    CheckpointCertificate,
    Commit,
    FetchBlocks,
    FetchSnapshot,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    PrePrepareHeader,
    Query,
    QueryReply,
    Reply,
    ViewChange,
)
from ledger.transactions import Put, Transaction, Transfer, sign_transaction, transaction_domain
from node.collusion import Coalition
from node.core import LOG_KINDS, ReplicaCore
from node.effects import Installed, Persist, Prune, Send
from node.queries import answer_query
from node.traitors import BEHAVIOURS, BehaviourSpec, Traitor, TraitorSpec, make_traitor

CoreFactory = Callable[..., ReplicaCore]
# The share of seeds with a crash whose first crashed replica is instead a new one joining late.
LATE_JOIN_RATE = 0.3
# The share of seeds (drawn from a source of their own) that also get rolling kills: the primary
# or a backup is killed and restarted from its disk, again and again (the crash test's rounds of
# SIGKILL), while PRE-PREPAREs to backups go missing, and checkpoints may be far apart. Replicas
# then catch sequences up by fetched blocks (never holding their batches) and become primary of a
# view whose NEW-VIEW re-proposes them: hole 1 of the crash test, which seeds never reached (a
# checkpoint every 4 blocks put those sequences below the NEW-VIEW, no kill came after the heal).
ROTATION_RATE = 0.25
ROTATION_FAULTS_UNTIL_MS = 8_000
# At any time (faults or not), an honest primary of an active view with requests waiting, room in its
# window and nothing of its view left to execute proposes within this long (it waits batch_wait_ms
# at most, and for nothing else). One that does not waits for something nobody sends: the next
# view change hides that (its primary proposes), so without this check a seed never fails on it.
PRIMARY_IDLE_MAX_MS = 1_000
SignatureCheck = Callable[[bytes, bytes, bytes, bytes], bool]

# Verification is a pure function of (key, domain, bytes, signature): one bounded memo serves all
# simulated replicas and clients, so a signature n replicas check costs one Ed25519 verification.
SIGNATURE_MEMO_MAX = 200_000
# An honest replica checking one signature more often than this is being made to redo work by
# someone (PBFT bounds the work per message; a flood of re-signed messages must not multiply it).
# Honest runs stay under 10 (measured: 5 for n=4, 8 for n=7).
SIGNATURE_CHECKS_PER_SIGNATURE_MAX = 32
# How far an honest block's timestamp may stray from the simulated clock (every simulated replica
# reads the same clock, so honest primaries stay far inside this).
TIMESTAMP_SKEW_MS = 5_000
CHECKED_MESSAGES_MAX = 10_000
# Messages a traitor's core made that are remembered, to tell what went out unchanged from what
# the traitor rewrote or made up (a delayed message released later still counts as unchanged).
CORE_MESSAGES_REMEMBERED_MAX = 10_000

# The behaviour vocabulary the adversarial mode draws from, and which of them act as primary.
PRIMARY_BEHAVIOURS = ("equivocating_primary", "nonce_reorder", "extreme_timestamps")
ANY_REPLICA_BEHAVIOURS = (
    "off_by_one",
    "other_digest",
    "conflicting_votes",
    "replay",
    "withhold",
    "deaf",
    "delay",
    "forged_view_change",
    "view_change_flood",
    "lying_block_server",
)
# Behaviours added later, drawn from a random source of their own and added to the traitors drawn
# above, so that every seed keeps the rest of its scenario (seeds named in tests and scenario files
# still replay what they were chosen for; `--exclude` these to get exactly the scenario of before).
ADDED_PRIMARY_BEHAVIOURS = ("censoring_primary", "slow_primary")
ADDED_ANY_REPLICA_BEHAVIOURS = ("wrong_replies", "malformed_sender")
ADDED_BEHAVIOUR_RATE = 0.4
# The same, for the VIEW-CHANGE flood of old windows; and how often an adversarial run gives the
# honest cores a small memo of verified signatures, so that evidence checked again shows.
OLD_WINDOW_FLOOD_RATE = 0.2
WITHDRAWN_VIEW_CHANGE_RATE = 0.2
SMALL_MEMO_RATE = 0.3
# 32: at 64 the old re-checking bug never showed within a run; at 16 honest peers came too close to
# the bound (25 checks of one signature against 32).
SMALL_MEMO_ENTRIES = 32
MESSAGE_KINDS = ("PrePrepare", "Prepare", "Commit", "Checkpoint", "ViewChange", "NewView", "BatchContent", "Status", "Blocks")


class SimulationFailure(AssertionError):
    """An invariant broke, or the network did not finish; the message starts with the seed and
    ends with the command that replays it. `invariant` names what broke ("agreement", "liveness",
    ...); for agreement, `conflict` holds the two blocks and the replicas that committed them."""

    def __init__(self, text: str, invariant: str = "", conflict: Conflict | None = None) -> None:
        super().__init__(text)
        self.invariant = invariant
        self.conflict = conflict


@dataclass(frozen=True)
class Conflict:
    """Two honest replicas committed different blocks at one height (the agreement invariant)."""

    height: int
    first: Block
    first_replicas: tuple[int, ...]
    second: Block
    second_replica: int


@dataclass
class TraitorActivity:
    """What one traitor did, measured at its boundary (distinct message objects per round)."""

    core_messages: int = 0  # what its honest core asked to send
    sent_unchanged: int = 0  # what went out as its core made it (now or earlier)
    sent_forged: int = 0  # what went out that its core never made: rewritten, made up, replayed
    received_ignored: int = 0  # messages and requests it kept from its core
    remembered: dict[int, Any] = field(default_factory=dict, repr=False)


@dataclass
class Scenario:
    """The knobs of one run. `from_seed` draws the network's misbehaviour from the seed."""

    seed: int
    replica_count: int = 4
    clients: int = 3
    transactions_per_client: int = 8
    loss_rate: float = 0.0
    duplicate_rate: float = 0.0
    delay_ms_min: int = 1
    delay_ms_max: int = 10
    tick_ms: int = 5
    client_timeout_ms: int = 400
    faults_until_ms: int = 3_000
    time_limit_ms: int = 120_000
    equivocating_primary: bool = False
    require_liveness: bool = True
    core_factory: CoreFactory = ReplicaCore
    adversarial: bool = False
    # Faulty replicas: (replica, from_ms, until_ms). All end by faults_until_ms, when the network heals.
    crashes: tuple[tuple[int, int, int], ...] = ()
    # Crashes that land inside a round: after its durable write, before its sends and replies.
    torn_crashes: tuple[tuple[int, int, int], ...] = ()
    stalls: tuple[tuple[int, int, int], ...] = ()
    partitions: tuple[tuple[int, int, int], ...] = ()
    # Slow links: (replica, from_ms, until_ms, delay_ms): every message into or out of the replica
    # meanwhile takes delay_ms longer (the real runner's link proxy does the same).
    slow_links: tuple[tuple[int, int, int, int], ...] = ()
    # Traitor replicas stay traitors to the end (at most f of them, with the faulty ones above).
    traitors: tuple[TraitorSpec, ...] = ()
    # ByzzFuzz: in each round of this length, with this probability, the replicas split in two.
    partition_round_ms: int = 0
    partition_rate: float = 0.0
    # Transactions a client keeps in flight at once (more than one lets nonces race).
    pipeline_depth: int = 1
    # Behaviours left out of the draw (and "racing_nonces": clients keep one transaction in flight),
    # to sweep past known holes until they are fixed; the replay command names them.
    excluded: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    # Beyond the bound (node/collusion.py): the traitors collude and show these honest replicas a
    # second signed history of every slot. Empty: no coalition.
    collusion_side: tuple[int, ...] = ()
    # New replicas: (replica, join_ms): down from the start with an empty disk, then started
    # at join_ms; one far enough behind joins by state sync (node/state_join.py).
    late_joins: tuple[tuple[int, int], ...] = ()
    # The simulated network's [protocol] state_sync_distance, if not the default of 4 blocks.
    state_sync_distance: int | None = None
    # Rolling kills, one after the other (the real crash test's rounds of SIGKILL and restart):
    # (blocks, down_ms, offset): once the honest chain grew by `blocks` since the last restart (or
    # the start), the replica `offset` places after the primary then (of the highest view a live
    # honest replica is in; offset 0: the primary, a view change) crashes, and restarts from its
    # disk down_ms later (by faults_until_ms). One kill at a time: the next waits for the restart;
    # the seed's other faults (crashes, stalls, late joins) may overlap one, as they end by `horizon`.
    primary_kills: tuple[tuple[int, int, int], ...] = ()
    # While faults are on, each PRE-PREPARE sent to a backup is lost with this probability (on top
    # of loss_rate): the backup cannot vote, and catches the sequence up by a fetched block.
    pre_prepare_loss_rate: float = 0.0
    # The simulated network's [protocol] checkpoint_interval, if not the default of 4 blocks: a
    # long one keeps a whole run above the stable checkpoint, so every NEW-VIEW re-proposes it all.
    checkpoint_interval: int | None = None
    # Entries in each honest core's memo of verified replica signatures, if not the core's default:
    # a small one makes a peer that gets evidence checked again and again show within a short run
    # (SIGNATURE_CHECKS_PER_SIGNATURE_MAX), as it would after hours with the default.
    signature_memo_entries: int | None = None

    @classmethod
    def from_seed(
        cls,
        seed: int,
        replica_count: int = 4,
        faults: bool = True,
        adversarial: bool = False,
        excluded: tuple[str, ...] = (),
        **overrides: Any,
    ) -> Scenario:
        """Draw the network's behaviour from the seed: loss, delay, duplication, and (on nearly
        every seed) 1..f faulty replicas, the primary half the time, that crash and restart,
        stall, are cut off or, in the adversarial mode, turn traitor."""
        draw = random.Random(f"scenario/{seed}")
        values: dict[str, Any] = dict(
            seed=seed,
            replica_count=replica_count,
            adversarial=adversarial,
            loss_rate=draw.choice([0.0, 0.01, 0.05, 0.1]),
            duplicate_rate=draw.choice([0.0, 0.02, 0.1]),
            delay_ms_min=draw.randint(0, 3),
            delay_ms_max=draw.choice([5, 20, 60]),
        )
        # The horizon is the one this run will use: an override moves the fault windows with it.
        horizon = overrides.get("faults_until_ms", cls.faults_until_ms)
        if faults:
            faults_tolerated = (replica_count - 1) // 3
            faulty_count = 0 if draw.random() < 0.05 else draw.randint(1, faults_tolerated)
            faulty = draw.sample(list(range(1, replica_count)), faulty_count)
            if faulty and draw.random() < 0.5:
                faulty[0] = 0  # the primary of view 0
            crashes, torn, stalls, partitions, traitors = [], [], [], [], []
            kinds = ["crash", "torn-crash", "stall", "partition"]
            for replica in faulty:
                start = draw.randint(0, horizon // 2)
                end = draw.randint(start + 1, horizon)
                kind = draw.choice(kinds + ["traitor"] * 6) if adversarial else draw.choice(["crash", "crash", "stall", "partition"])
                if kind == "traitor":
                    traitors.append(_draw_traitor(draw, replica, replica_count, horizon))
                else:
                    {"crash": crashes, "torn-crash": torn, "stall": stalls, "partition": partitions}[kind].append((replica, start, end))
            clients = overrides.get("clients", cls.clients)
            traitors = [_add_behaviour(spec, seed, replica_count, horizon, clients) for spec in traitors]
            # From a source of its own, so the draws above stay what they were: a crashed replica
            # is instead a new one that starts late (the same fault budget, a longer window).
            late_joins = []
            join_draw = random.Random(f"scenario-join/{seed}/{replica_count}")
            if crashes and "crashes" not in overrides and join_draw.random() < LATE_JOIN_RATE:
                replica, _start, end = crashes.pop(0)
                late_joins.append((replica, max(end, join_draw.randint(horizon // 4, horizon))))
                if traitors and join_draw.random() < 0.5:
                    # A traitor that lies to joining replicas about the snapshot (node/traitors.py).
                    mode = join_draw.choice(["any", "entry", "omit", "proof", "checkpoint", "silent"])
                    first = traitors[0]
                    liar = BehaviourSpec("lying_snapshot_server", 0, (("mode", mode),))
                    traitors[0] = TraitorSpec(first.replica_id, (*first.behaviours, liar))
            values.update(
                crashes=tuple(crashes),
                torn_crashes=tuple(torn),
                stalls=tuple(stalls),
                partitions=tuple(partitions),
                traitors=tuple(traitors),
                late_joins=tuple(late_joins),
            )
        # From a source of its own, so the draws above stay what they were.
        rotation_draw = random.Random(f"scenario-rotation/{seed}/{replica_count}")
        rotation_fields = (
            "primary_kills", "pre_prepare_loss_rate", "checkpoint_interval", "crashes", "torn_crashes", "stalls", "partitions", "late_joins",
        )
        if faults and not any(name in overrides for name in rotation_fields) and rotation_draw.random() < ROTATION_RATE:
            # On top of the faults drawn above (theirs end by `horizon`, the kills go on after).
            values.update(_draw_rotation(rotation_draw, replica_count))
        if adversarial:
            # From a source of its own, so the draws above stay what they were.
            memo_draw = random.Random(f"scenario-memo/{seed}/{replica_count}")
            if "traitors" in values:
                values["traitors"] = tuple(
                    _add_on_top(
                        memo_draw, spec, horizon, "old_window_flood", OLD_WINDOW_FLOOD_RATE,
                        lambda: (("burst", memo_draw.choice([1, 3])), ("rate", memo_draw.choice([0.2, 1.0]))),
                    )
                    for spec in values["traitors"]
                )
            if memo_draw.random() < SMALL_MEMO_RATE:
                values["signature_memo_entries"] = SMALL_MEMO_ENTRIES
            # From a source of its own too: a VIEW-CHANGE withdrawn by a bad one for the next view.
            withdraw_draw = random.Random(f"scenario-withdraw/{seed}/{replica_count}")
            if "traitors" in values:
                values["traitors"] = tuple(
                    _add_on_top(
                        withdraw_draw, spec, horizon, "withdrawn_view_change", WITHDRAWN_VIEW_CHANGE_RATE,
                        lambda: (("rate", withdraw_draw.choice([0.5, 1.0])),),
                    )
                    for spec in values["traitors"]
                )
        if adversarial:
            values.update(
                partition_round_ms=draw.choice([100, 250, 500]),
                partition_rate=draw.choice([0.0, 0.1, 0.3]),
                pipeline_depth=draw.choice([1, 2, 3]),
            )
        if excluded:
            unknown = set(excluded) - set(BEHAVIOURS) - {"racing_nonces"}
            if unknown:
                raise ValueError(f"cannot exclude unknown behaviours {sorted(unknown)}")
            values["excluded"] = tuple(sorted(excluded))
            values["traitors"] = tuple(
                TraitorSpec(spec.replica_id, tuple(b for b in spec.behaviours if b.name not in excluded))
                for spec in values.get("traitors", ())
            )
            if "racing_nonces" in excluded:
                values["pipeline_depth"] = 1
        values.update(overrides)
        values["overrides"] = tuple(sorted(overrides))
        return cls(**values)

    @property
    def replay_command(self) -> str:
        command = f"ledger-node simulate --seed {self.seed} --replicas {self.replica_count}"
        if self.adversarial:
            command += " --adversarial"
        if self.excluded:
            command += f" --exclude {','.join(self.excluded)}"
        if self.overrides:
            command += f"  (plus the test's overrides: {', '.join(self.overrides)})"
        return command


def _draw_rotation(draw: random.Random, replica_count: int) -> dict[str, Any]:
    """Kill the primary (so the view passes through the replicas) or a backup, again and again,
    while backups miss PRE-PREPAREs, with checkpoints far apart or at the default."""
    # Half of them the primary, down long enough for the others to change view (a request timer of
    # 500 ms, then the votes); a backup killed misses what commits meanwhile, and fetches it.
    kills = tuple(
        (draw.randint(1, 3), draw.randint(600, 1_000), 0 if draw.random() < 0.5 else draw.randrange(1, replica_count))
        for _ in range(draw.randint(replica_count, 2 * replica_count + 2))
    )
    return dict(
        # Time for every kill: each is a view change of a second or so, then a few blocks.
        faults_until_ms=ROTATION_FAULTS_UNTIL_MS,
        primary_kills=kills,
        pre_prepare_loss_rate=draw.choice([0.3, 0.5, 0.7]),
        checkpoint_interval=draw.choice([4, 16, 32]),
    )


def _draw_traitor(draw: random.Random, replica: int, replica_count: int, horizon: int) -> TraitorSpec:
    """One to three behaviours (or twins, alone), each with its parameters and start time."""
    peers = [peer for peer in range(replica_count) if peer != replica]

    def start() -> int:
        return 0 if draw.random() < 0.5 else draw.randint(0, horizon)

    if draw.random() < 0.06:
        side = tuple(sorted(draw.sample(peers, draw.randint(1, len(peers) - 1))))
        return TraitorSpec(replica, (BehaviourSpec("twins", 0, (("side", side),)),))
    behaviours = []
    for _ in range(draw.choice([1, 1, 2, 3])):
        if replica == 0 and draw.random() < 0.5:
            name = draw.choice(PRIMARY_BEHAVIOURS)
        else:
            name = draw.choice(ANY_REPLICA_BEHAVIOURS + PRIMARY_BEHAVIOURS)
        parameters: tuple[tuple[str, Any], ...] = ()
        if name == "off_by_one":
            parameters = (("target", draw.choice(["view", "sequence"])), ("delta", draw.choice([-1, 1])), ("rate", draw.choice([0.2, 0.5, 1.0])))
        elif name in ("other_digest", "conflicting_votes"):
            parameters = (("rate", draw.choice([0.2, 0.5, 1.0])),)
        elif name == "replay":
            parameters = (("rate", draw.choice([0.1, 0.3])), ("source", draw.choice(["sent", "received", "both"])))
        elif name == "withhold":
            chosen = tuple(sorted(draw.sample(peers, draw.randint(0, len(peers)))))
            kinds = () if draw.random() < 0.4 else (draw.choice(MESSAGE_KINDS),)
            parameters = (("peers", chosen), ("kinds", kinds))
        elif name == "deaf":
            parameters = (("rate", draw.choice([0.3, 1.0])), ("kinds", () if draw.random() < 0.3 else (draw.choice(MESSAGE_KINDS),)))
        elif name == "delay":
            parameters = (("rate", draw.choice([0.2, 0.5])), ("delay_ms", draw.choice([100, 400, 1_500])))
        elif name == "forged_view_change":
            parameters = (("mode", draw.choice(["collected", "collected", "stale", "fabricated"])), ("hoard", draw.random() < 0.7))
        elif name == "view_change_flood":
            parameters = (("burst", draw.choice([1, 3])), ("rate", draw.choice([0.2, 1.0])))
        elif name == "nonce_reorder":
            parameters = (("repeats", draw.choice([1, 2, 3])),)
        elif name == "extreme_timestamps":
            parameters = (("choice", draw.choice(["any", "zero", "maximum", "past", "future"])),)
        elif name == "lying_block_server":
            parameters = (("mode", draw.choice(["any", "results", "transactions", "certificate", "link"])),)
        behaviours.append(BehaviourSpec(name, start(), parameters))
    return TraitorSpec(replica, tuple(behaviours))


def _add_on_top(
    draw: random.Random, spec: TraitorSpec, horizon: int, name: str, rate: float, parameters: Callable[[], tuple[tuple[str, Any], ...]]
) -> TraitorSpec:
    """Maybe behaviour `name` (node/traitors.py), with `parameters()` drawn, on top of a drawn traitor."""
    if any(behaviour.name == "twins" for behaviour in spec.behaviours) or draw.random() >= rate:
        return spec
    drawn = parameters()
    start_ms = 0 if draw.random() < 0.5 else draw.randint(0, horizon)
    return TraitorSpec(spec.replica_id, (*spec.behaviours, BehaviourSpec(name, start_ms, drawn)))


def _add_behaviour(spec: TraitorSpec, seed: int, replica_count: int, horizon: int, clients: int) -> TraitorSpec:
    """Maybe one of the later behaviours on top of a drawn traitor, from a random source of its own."""
    draw = random.Random(f"scenario-added/{seed}/{replica_count}/{spec.replica_id}")
    if any(behaviour.name == "twins" for behaviour in spec.behaviours) or draw.random() >= ADDED_BEHAVIOUR_RATE:
        return spec
    if spec.replica_id == 0 and draw.random() < 0.5:
        name = draw.choice(ADDED_PRIMARY_BEHAVIOURS)
    else:
        name = draw.choice(ADDED_ANY_REPLICA_BEHAVIOURS + ADDED_PRIMARY_BEHAVIOURS)
    parameters: tuple[tuple[str, Any], ...] = ()
    if name == "wrong_replies":
        parameters = (("mode", draw.choice(["any", "result", "height", "index", "block", "path"])), ("rate", draw.choice([0.5, 1.0])))
    elif name == "censoring_primary":
        account = "any_one" if draw.random() < 0.7 else _key(seed, "client", draw.randrange(clients)).public_key.hex()
        parameters = (("account", account),)
    elif name == "slow_primary":
        parameters = (("fraction", draw.choice([0.5, 0.9, 1.5])),)
    elif name == "malformed_sender":
        kinds = () if draw.random() < 0.5 else (draw.choice(["signature", "type"]),)
        parameters = (("rate", draw.choice([0.1, 0.3, 1.0])), ("burst", draw.choice([1, 3])), ("kinds", kinds))
    start_ms = 0 if draw.random() < 0.5 else draw.randint(0, horizon)
    return TraitorSpec(spec.replica_id, (*spec.behaviours, BehaviourSpec(name, start_ms, parameters)))


@dataclass
class SimulatedReplica:
    """One replica: its core (replaced on restart) and its disk (records, chain and durable
    application state) that survive."""

    core: ReplicaCore
    # Index height - 1; None below the block a state sync installed (its store starts there).
    chain: list[Block | None] = field(default_factory=list)
    records: dict[tuple[str, int, int], Any] = field(default_factory=dict)
    transaction_ids: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    # The application state as the store keeps it (ledger/storage.py state tables), written in the
    # same durable write as the blocks that changed it; None until the first write, as in a new store.
    state_height: int | None = None
    state_accounts: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    state_values: dict[str, str] = field(default_factory=dict)
    crashed: bool = False
    crash_after_write: bool = False
    paused_until_ms: int = 0
    isolated: bool = False
    last_timestamp_ms: int = 0

    def persist(self, record: Persist) -> None:
        self.records[(record.kind, record.view, record.sequence)] = record.message

    def prune(self, prune: Prune) -> None:
        """The same rule as the SQLite store (ledger/storage.py prune_messages)."""
        for key in list(self.records):
            kind, view, sequence = key
            if (
                (kind in LOG_KINDS and sequence <= prune.through_sequence)
                or (kind == "stable-checkpoint" and sequence < prune.through_sequence)
                or (kind in ("view-change", "new-view") and view < prune.view)
            ):
                del self.records[key]

    def write_state(self, changes: StateChanges, height: int) -> None:
        for account, balance, nonce in changes.accounts:
            self.state_accounts[account] = (balance, nonce)
        for key, value in changes.values:
            self.state_values[key] = value
        self.state_height = height

    def install(self, installed: Installed) -> None:
        """The store of a replica that joined by state sync: the snapshot's block and state."""
        block = installed.block
        self.chain = [None] * (block.height - 1) + [block]
        self.transaction_ids = {
            transaction.transaction_id: (block.height, index)
            for index, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True))
            if is_final(result)
        }
        self.state_accounts = {account: (balance, nonce) for account, balance, nonce in installed.state.accounts}
        self.state_values = dict(installed.state.values)
        self.state_height = block.height

    @property
    def base_height(self) -> int:
        """The first height the store holds (1 unless a state sync installed a snapshot)."""
        return next((index + 1 for index, block in enumerate(self.chain) if block is not None), len(self.chain) + 1)

    def restored_records(self) -> list[tuple[str, Any]]:
        return [(key[0], self.records[key]) for key in sorted(self.records, key=lambda key: (key[2], key[1], key[0]))]


@dataclass
class InFlight:
    transaction: Transaction
    quorum: ReplyQuorum
    sent_at_ms: int


@dataclass
class SimulatedClient:
    key: SigningKey
    next_nonce: int = 0
    submitted: int = 0
    accepted_ok: int = 0
    resynchronise: bool = False
    in_flight: dict[bytes, InFlight] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)


@dataclass
class SimulationReport:
    seed: int
    replica_count: int
    steps: int
    time_ms: int
    height: int
    receipts: int
    messages_sent: int
    messages_dropped: int
    view: int
    crashes: int
    failed_receipts: int = 0


def _key(seed: int, role: str, index: int) -> SigningKey:
    return SigningKey.from_private_bytes(hashlib.sha256(f"{seed}/{role}/{index}".encode()).digest())


def simulated_network(seed: int, replica_count: int, client_keys: list[SigningKey]) -> tuple[NetworkConfig, list[SigningKey]]:
    keys = [_key(seed, "replica", index) for index in range(replica_count)]
    replicas = tuple(
        ReplicaInfo(index, key.public_key, Address("sim", 2 * index + 1), Address("sim", 2 * index + 2))
        for index, key in enumerate(keys)
    )
    protocol = ProtocolSettings(
        batch_size_max=8,
        batch_wait_ms=5,
        window_size=8,
        checkpoint_interval=4,
        status_interval_ms=100,
        view_change_timeout_ms=500,
        request_timeout_ms=400,
        ordering_timeout_ms=400,
        clock_skew_max_ms=5_000,
        # A late joiner more than one checkpoint behind joins by state sync.
        state_sync_distance=4,
    )
    balances = {key.public_key: 1_000 for key in client_keys}
    return NetworkConfig(f"sim-{seed}", replicas, protocol, balances), keys


def memoizing_verifier(size_max: int = SIGNATURE_MEMO_MAX) -> SignatureCheck:
    """A signature check that remembers its answers (bounded LRU); the answer is a pure function
    of its arguments, so sharing it changes nothing but the cost."""
    return functools.lru_cache(maxsize=size_max)(PublicKeyCache().verify)


class Simulation:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.random = random.Random(scenario.seed)
        self.clients = [SimulatedClient(_key(scenario.seed, "client", index)) for index in range(scenario.clients)]
        self.network, self.replica_keys = simulated_network(
            scenario.seed, scenario.replica_count, [client.key for client in self.clients]
        )
        if scenario.state_sync_distance is not None:
            protocol = dataclasses.replace(self.network.protocol, state_sync_distance=scenario.state_sync_distance)
            self.network = dataclasses.replace(self.network, protocol=protocol)
        if scenario.checkpoint_interval is not None:
            protocol = dataclasses.replace(self.network.protocol, checkpoint_interval=scenario.checkpoint_interval)
            self.network = dataclasses.replace(self.network, protocol=protocol)
        # Its own source: a seed without PRE-PREPARE loss draws exactly what it did before.
        self.pre_prepare_loss = random.Random(f"pre-prepare-loss/{scenario.seed}")
        # Per replica: when it last sent a PRE-PREPARE of its own, or its view or activity changed.
        self.primary_busy_ms = [0] * scenario.replica_count
        self.primary_view_seen: list[tuple[int, bool]] = [(0, True)] * scenario.replica_count
        self.kills_left = list(scenario.primary_kills)
        self.kill_armed_height: int | None = 0 if self.kills_left else None  # kill once the chain passes this + blocks
        self.verify = memoizing_verifier()
        self.signature_checks: list[dict[bytes, int]] = [{} for _ in range(scenario.replica_count)]
        # Per honest replica: when it last answered each peer's VIEW-CHANGE with a NEW-VIEW.
        self.new_view_answers_ms: list[dict[int, int]] = [{} for _ in range(scenario.replica_count)]
        self.domains = {
            kind: signing_domain(self.network.identity, kind)
            for kind in ("pre-prepare", "prepare", "commit", "checkpoint", "view-change", BATCH_REPLY_DOMAIN)
        }
        self.transaction_domain = transaction_domain(self.network.identity)
        specs = list(scenario.traitors)
        if scenario.equivocating_primary and all(spec.replica_id != 0 for spec in specs):
            specs.append(TraitorSpec(0, (BehaviourSpec("equivocating_primary"),)))
        self.traitor_specs = tuple(specs)
        self.genesis_state_digest = AccountsApplication(self.network.genesis_balances).state_digest()
        self.replicas = [SimulatedReplica(self._new_core(index, None)) for index in range(scenario.replica_count)]
        self.traitor_wrappers: dict[int, Traitor] = {
            spec.replica_id: make_traitor(spec, self.network, self.replica_keys[spec.replica_id], self.domains, scenario.seed)
            for spec in self.traitor_specs
        }
        self.traitors = set(self.traitor_wrappers)
        self.traitor_activity = {index: TraitorActivity() for index in self.traitor_wrappers}
        self.coalition: Coalition | None = None
        if scenario.collusion_side:
            if set(scenario.collusion_side) & self.traitors:
                raise ValueError("the collusion side holds honest replicas, not traitors")
            keys = {index: self.replica_keys[index] for index in sorted(self.traitors)}
            self.coalition = Coalition(self.network, keys, self.domains, scenario.collusion_side, scenario.seed)
        # Twins: a second honest instance of a traitor's key, serving the peers on its side.
        self.twins: dict[int, SimulatedReplica] = {}
        self.twin_sides: dict[int, set[int]] = {}
        for index, traitor in self.traitor_wrappers.items():
            side = traitor.twin_side
            if side is not None:
                self.twins[index] = SimulatedReplica(self._new_core(index, None))
                self.twin_sides[index] = set(side)
        self.queue: list[tuple[int, int, str, Any]] = []
        self.counter = 0
        self.now_ms = 0
        self.steps = 0
        self.committed: dict[int, Block] = {}  # the first honest block at each height
        self.key_writes: dict[str, list[tuple[int, str]]] = {}  # key -> (height, value), honest chain
        self.query_domain = signing_domain(self.network.identity, "query-reply")
        self.signed_digests: dict[tuple[int, str, int, int], bytes] = {}
        self.checked_messages: dict[int, Any] = {}
        self.receipts_by_height: dict[int, list[Receipt]] = {}
        self.failed_receipts: dict[bytes, Receipt] = {}
        self.messages_sent = 0
        self.messages_dropped = 0
        self.crash_count = 0
        self.partition_round = -1
        self.partition_side: set[int] | None = None
        self.last_receipt_ms = 0  # when a client last accepted a receipt

    def _new_core(self, index: int, replica: SimulatedReplica | None) -> ReplicaCore:
        """A fresh core; after a crash, rebuilt from the replica's disk as the runtime does
        (ledger/restore.py): the durable state, checked against the block it describes, then
        the blocks after it re-executed, which must be none (state and blocks are one write)."""
        chain = replica.chain if replica is not None else []
        application = AccountsApplication(self.network.genesis_balances)
        if replica is not None and replica.state_height is not None:
            application = AccountsApplication.from_entries(
                [(account, *entry) for account, entry in replica.state_accounts.items()], replica.state_values.items()
            )
            height = replica.state_height
            tip = chain[height - 1] if height else None
            expected = tip.header.state_digest if tip is not None else self.genesis_state_digest
            if application.state_digest() != expected:
                raise self.fail(f"durable state: replica {index}'s stored state is not the state of its block {height}")
            if height != len(chain):
                raise self.fail(
                    f"durable state: replica {index}'s stored state is at height {height} but its chain at {len(chain)}: "
                    "a crash between the block write and the state write would re-execute or lose blocks"
                )
        else:
            # Nothing written yet: the first write carries every entry, the genesis ones included.
            for block in chain:
                assert block is not None  # a synced store always has its state written
                verify_execution(application, block)
        tip_block = chain[-1] if chain else None
        return self.scenario.core_factory(
            self.network,
            index,
            self.replica_keys[index],
            application,
            len(chain),
            tip_block.block_hash if tip_block is not None else None,
            replica.restored_records() if replica is not None else None,
            check_signature=self._counting_verifier(index),
            last_timestamp_ms=max((block.header.timestamp_ms for block in chain if block is not None), default=0),
            # As the runtime decides from its store: an empty one, or one that starts from a snapshot.
            state_sync_allowed=not chain or chain[0] is None,
            signature_memo_entries=self.scenario.signature_memo_entries or VERIFIED_SIGNATURES_MAX,
        )

    def _counting_verifier(self, index: int) -> SignatureCheck:
        counts = self.signature_checks[index]

        def check(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
            count = counts.get(signature, 0) + 1
            counts[signature] = count
            if count > SIGNATURE_CHECKS_PER_SIGNATURE_MAX and index not in self.traitors:
                kind = domain.split(b"\x00")[-2].decode()
                raise self.fail(
                    f"amplification: honest replica {index} checked one {kind} signature {count} times; "
                    "a peer makes it redo verification work"
                )
            return self.verify(public_key, domain, message, signature)

        return check

    def fail(self, text: str, conflict: Conflict | None = None) -> SimulationFailure:
        scenario = self.scenario
        lines = [f"seed {scenario.seed} (n={scenario.replica_count}) at t={self.now_ms}ms step {self.steps}: {text}"]
        for spec in self.traitor_specs:
            lines.append(f"  traitor {spec.describe()}")
        lines.append(f"  replay: {scenario.replay_command}")
        return SimulationFailure("\n".join(lines), text.split(":", 1)[0], conflict)

    # ---- the event queue ----

    def schedule(self, delay_ms: int, kind: str, payload: Any) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (self.now_ms + delay_ms, self.counter, kind, payload))

    def faulty_period(self) -> bool:
        return self.now_ms < self.scenario.faults_until_ms

    def partitioned(self, sender: int, receiver: int) -> bool:
        """ByzzFuzz round partitions: while faults are on, each round may split the replicas."""
        scenario = self.scenario
        if not scenario.partition_rate or not self.faulty_period():
            return False
        round_number = self.now_ms // scenario.partition_round_ms
        if round_number != self.partition_round:
            self.partition_round = round_number
            draw = random.Random(f"partition/{scenario.seed}/{round_number}")
            self.partition_side = None
            if draw.random() < scenario.partition_rate:
                replicas = list(range(scenario.replica_count))
                self.partition_side = set(draw.sample(replicas, draw.randint(1, scenario.replica_count - 1)))
        side = self.partition_side
        return side is not None and ((sender in side) != (receiver in side))

    def transmit(self, kind: str, payload: Any) -> None:
        """Deliver after a seeded delay; while faults are on, maybe drop or duplicate it."""
        self.messages_sent += 1
        copies = 1
        if self.faulty_period():
            if (
                self.scenario.pre_prepare_loss_rate
                and kind == "deliver"
                and isinstance(payload[2], PrePrepare)
                and self.pre_prepare_loss.random() < self.scenario.pre_prepare_loss_rate
            ):
                self.messages_dropped += 1
                return
            if self.random.random() < self.scenario.loss_rate:
                self.messages_dropped += 1
                return
            if kind == "deliver" and self.partitioned(payload[0], payload[1]):
                self.messages_dropped += 1
                return
            if self.random.random() < self.scenario.duplicate_rate:
                copies = 2
        slow_ms = self.slow_ms(payload[0], payload[1]) if kind == "deliver" else 0
        for _ in range(copies):
            self.schedule(self.random.randint(self.scenario.delay_ms_min, self.scenario.delay_ms_max) + slow_ms, kind, payload)

    def slow_ms(self, sender: int, receiver: int) -> int:
        """The extra delay of a slow link between the two now (the larger, if both are slow)."""
        return max(
            (delay_ms for replica, start, end, delay_ms in self.scenario.slow_links if replica in (sender, receiver) and start <= self.now_ms < end),
            default=0,
        )

    # ---- running ----

    def run(self) -> SimulationReport:
        for index in range(self.scenario.replica_count):
            self.schedule(index, "tick", index)
        self.schedule(0, "client-tick", None)
        for replica, start, end in self.scenario.crashes:
            self.schedule(start, "crash", replica)
            self.schedule(end, "restart", replica)
        for replica, join_ms in self.scenario.late_joins:
            self.crash(replica)  # down before its first tick: it never signed anything
            self.schedule(join_ms, "restart", replica)
        for replica, start, end in self.scenario.torn_crashes:
            self.schedule(start, "torn-crash", replica)
            self.schedule(end, "restart", replica)
        for replica, start, end in self.scenario.stalls:
            self.schedule(start, "stall", (replica, end))
        for replica, start, end in self.scenario.partitions:
            self.schedule(start, "isolate", replica)
            self.schedule(end, "reconnect", replica)
        while self.queue:
            time_ms, _, kind, payload = heapq.heappop(self.queue)
            self.now_ms = time_ms
            if self.now_ms > self.scenario.time_limit_ms:
                break
            self.steps += 1
            self.step(kind, payload)
            if self.kill_armed_height is not None:
                self.maybe_kill_primary()
            if self.finished():
                break
        if self.scenario.require_liveness and not self.finished():
            raise self.fail(f"liveness: {self.progress()}")
        return SimulationReport(
            self.scenario.seed,
            self.scenario.replica_count,
            self.steps,
            self.now_ms,
            max(len(replica.chain) for replica in self.replicas),
            self.confirmed(),
            self.messages_sent,
            self.messages_dropped,
            max(replica.core.view for replica in self.replicas),
            self.crash_count,
            len(self.failed_receipts),
        )

    def confirmed(self) -> int:
        return sum(len(client.receipts) for client in self.clients)

    def progress(self) -> str:
        wanted = self.scenario.clients * self.scenario.transactions_per_client
        heights = [len(replica.chain) for replica in self.replicas]
        views = [replica.core.view for replica in self.replicas]
        return f"{self.confirmed()}/{wanted} transactions confirmed, replica heights {heights}, views {views}"

    def finished(self) -> bool:
        wanted = self.scenario.transactions_per_client
        if any(len(client.receipts) < wanted for client in self.clients):
            return False
        if self.faulty_period():
            return False
        heights = {len(self.replicas[index].chain) for index in self.honest()}
        return len(heights) == 1

    def honest(self) -> list[int]:
        return [index for index in range(self.scenario.replica_count) if index not in self.traitors]

    def reachable(self, index: int) -> bool:
        replica = self.replicas[index]
        return not replica.crashed and not replica.isolated

    def instance_for(self, receiver: int, sender: int) -> SimulatedReplica:
        """The instance of `receiver` that `sender` talks to (a twin serves its own side)."""
        twin = self.twins.get(receiver)
        if twin is not None and sender in self.twin_sides[receiver]:
            return twin
        return self.replicas[receiver]

    def step(self, kind: str, payload: Any) -> None:
        if kind == "tick":
            index = payload
            replica = self.replicas[index]
            if not replica.crashed and self.now_ms >= replica.paused_until_ms:
                replica.core.tick(self.now_ms)
                self.apply(index, replica)
                if index not in self.traitors:
                    self.check_primary_progress(index, replica)
            twin = self.twins.get(index)
            if twin is not None:
                twin.core.tick(self.now_ms)
                self.apply(index, twin)
            self.schedule(self.scenario.tick_ms, "tick", index)
        elif kind == "deliver":
            sender, receiver, message = payload
            replica = self.instance_for(receiver, sender)
            if not self.reachable(receiver) or not self.reachable(sender):
                self.messages_dropped += 1
                return
            if self.now_ms < replica.paused_until_ms:
                self.schedule(replica.paused_until_ms - self.now_ms, kind, payload)
                return
            traitor = self.traitor_wrappers.get(receiver)
            if isinstance(message, FetchBlocks):
                self.serve_fetch(receiver, replica, sender, message)
                return
            if isinstance(message, FetchSnapshot):
                self.serve_snapshot(receiver, replica, sender, message)
                return
            if traitor is not None and not traitor.receive(sender, message, self.now_ms):
                self.traitor_activity[receiver].received_ignored += 1
                return
            replica.core.tick(self.now_ms)
            replica.core.receive_message(sender, message)
            self.apply(receiver, replica)
        elif kind == "request":
            receiver, transaction = payload
            replica = self.replicas[receiver]
            if not self.reachable(receiver):
                return
            if self.now_ms < replica.paused_until_ms:
                self.schedule(replica.paused_until_ms - self.now_ms, kind, payload)
                return
            location = replica.transaction_ids.get(transaction.transaction_id)
            if location is not None:
                # As the runtime does from its store: a request already executed gets its reply again.
                height, position = location
                reply = replica.core.signed_reply(replica.chain[height - 1], position)
                traitor = self.traitor_wrappers.get(receiver)
                if traitor is not None and reply is not None:
                    reply = traitor.reply(reply, self.now_ms)
                if reply is not None:
                    self.transmit("reply", reply)
                return
            traitor = self.traitor_wrappers.get(receiver)
            if traitor is not None and not traitor.receive_request(transaction, self.now_ms):
                self.traitor_activity[receiver].received_ignored += 1
                return
            replica.core.tick(self.now_ms)
            replica.core.receive_request(transaction)
            self.apply(receiver, replica)
        elif kind == "reply":
            self.on_reply(payload)
        elif kind == "client-tick":
            self.client_tick()
            self.schedule(self.scenario.tick_ms * 4, "client-tick", None)
        elif kind == "crash":
            # Whatever the core held in memory is lost; its disk (records and chain) survives.
            self.crash(payload)
        elif kind == "killed-restart":
            self.step("restart", payload)
            self.kill_armed_height = len(self.committed) if self.kills_left else None
        elif kind == "torn-crash":
            # Lands inside the replica's next round that writes to disk: after the write, before the sends.
            self.replicas[payload].crash_after_write = True
        elif kind == "restart":
            replica = self.replicas[payload]
            replica.crash_after_write = False
            if replica.crashed:
                replica.core = self._new_core(payload, replica)
                self.new_view_answers_ms[payload].clear()  # a new process knows nothing it answered
                replica.crashed = False
        elif kind == "stall":
            replica_index, until_ms = payload
            self.replicas[replica_index].paused_until_ms = until_ms
        elif kind == "isolate":
            self.replicas[payload].isolated = True
        elif kind == "reconnect":
            self.replicas[payload].isolated = False

    def maybe_kill_primary(self) -> None:
        """The next primary kill, once the chain grew enough since the last restart."""
        assert self.kill_armed_height is not None
        blocks, down_ms, offset = self.kills_left[0]
        if len(self.committed) < self.kill_armed_height + blocks or not self.faulty_period():
            return
        primary = self.current_primary()
        if primary is None:
            return
        victim = (primary + offset) % self.scenario.replica_count
        if self.replicas[victim].crashed:
            return
        self.kills_left.pop(0)
        self.kill_armed_height = None  # re-armed by the restart
        self.crash(victim)
        self.schedule(min(down_ms, self.scenario.faults_until_ms - self.now_ms), "killed-restart", victim)

    def current_primary(self) -> int | None:
        """The primary of the highest view a live honest replica is in (None if it is down)."""
        live = [index for index in self.honest() if not self.replicas[index].crashed]
        if not live:
            return None
        primary = self.network.primary(max(self.replicas[index].core.view for index in live))
        return None if self.replicas[primary].crashed else primary

    def crash(self, index: int) -> None:
        self.replicas[index].crashed = True
        self.replicas[index].crash_after_write = False
        self.crash_count += 1

    def serve_fetch(self, server: int, instance: SimulatedReplica, requester: int, request: FetchBlocks) -> None:
        """The block server (the runtime answers FetchBlocks from its store, not the core)."""
        chain = instance.chain
        stored = chain[request.from_height - 1 : request.from_height - 1 + request.count]
        # Nothing from below a synced store's base: an answer starts at the height asked or is empty.
        blocks = tuple(block for block in stored if block is not None) if all(block is not None for block in stored) else ()
        checkpoint = instance.core.stable_checkpoint
        traitor = self.traitor_wrappers.get(server)
        if traitor is not None:
            blocks = traitor.serve_blocks(requester, blocks, self.now_ms)
        elif checkpoint is not None:
            self.check_checkpoint_certificate(server, checkpoint, "served with blocks")
        if blocks:
            self.transmit("deliver", (server, requester, Blocks(blocks, checkpoint)))

    def serve_snapshot(self, server: int, instance: SimulatedReplica, requester: int, request: FetchSnapshot) -> None:
        """The snapshot server (the runtime answers FetchSnapshot from the core's kept snapshots)."""
        answer = instance.core.snapshots.answer(request, instance.core.stable_checkpoint)
        traitor = self.traitor_wrappers.get(server)
        if traitor is not None:
            answer = traitor.serve_snapshot(requester, answer, self.now_ms)
        elif answer is not None:
            self.check_checkpoint_certificate(server, answer.checkpoint, "served with a snapshot chunk")
        if answer is not None:
            self.transmit("deliver", (server, requester, answer))

    # ---- carrying out effects, and the invariants ----

    def check_new_view_answers(self, index: int, sends: list[Send]) -> None:
        """Amplification by replay: a NEW-VIEW answers a VIEW-CHANGE asking for its view at most
        once per peer per status interval, so a replayed VIEW-CHANGE (free to check: the memo knows
        it) cannot make an honest primary send its whole NEW-VIEW again and again."""
        answered = self.new_view_answers_ms[index]
        interval_ms = self.network.protocol.status_interval_ms
        for send in sends:
            if send.to is None or not isinstance(send.message, NewView):
                continue
            last_ms = answered.get(send.to)
            if last_ms is not None and self.now_ms - last_ms < interval_ms:
                raise self.fail(
                    f"amplification: honest replica {index} answered replica {send.to} with NEW-VIEW twice "
                    f"within {self.now_ms - last_ms} ms (status interval {interval_ms} ms); a replayed VIEW-CHANGE pulls it"
                )
            answered[send.to] = self.now_ms

    def apply(self, index: int, replica: SimulatedReplica) -> None:
        """The runtime's order (node/runtime.py _carry_out): persist records, blocks and prune in
        one durable write; then sends; then replies. A torn crash lands between the write and the sends."""
        effects = replica.core.take_effects()
        traitor = self.traitor_wrappers.get(index)
        sends = effects.send
        if traitor is not None:
            sends = traitor.send(sends, self.now_ms)
            if self.coalition is not None:
                sends = self.coalition.outgoing(index, sends, self.now_ms)
            self.count_activity(self.traitor_activity[index], effects.send, sends)
        honest = index not in self.traitors
        if honest:
            self.check_new_view_answers(index, effects.send)
        durable = bool(effects.persist or effects.blocks or effects.prune is not None or effects.installed is not None)
        if effects.installed is not None:
            if replica.chain and replica.chain[0] is not None:
                # The SQLite store refuses this (ledger/storage.py may_install_snapshot): the replica would stop.
                raise self.fail(f"state sync: replica {index} installed a snapshot over its blocks from genesis (an archive)")
            if honest:
                self.check_installed(index, effects.installed)
            replica.install(effects.installed)
        for record in effects.persist:
            if honest:
                self.check_persisted(index, record)
            replica.persist(record)
        for block in effects.blocks:
            self.check_block(index, replica, block)
        if effects.state is not None:
            replica.write_state(effects.state, effects.blocks[-1].height)
        if effects.prune is not None:
            replica.prune(effects.prune)
        if durable and replica.crash_after_write:
            self.crash(index)
            return
        twin_side = self.twin_sides.get(index)
        for send in sends:
            if honest:
                self.check_sent(index, send.message)
                if isinstance(send.message, PrePrepare) and send.message.replica_id == index:
                    self.primary_busy_ms[index] = self.now_ms
            targets = [send.to] if send.to is not None else [r for r in range(self.scenario.replica_count) if r != index]
            for target in targets:
                if twin_side is not None and (target in twin_side) != (replica is self.twins[index]):
                    continue  # each twin talks only to its own side
                self.transmit("deliver", (index, target, send.message))
        if honest:
            self.check_replies(index, effects.blocks, [client_reply.reply for client_reply in effects.replies])
        for client_reply in effects.replies:
            reply = client_reply.reply if traitor is None else traitor.reply(client_reply.reply, self.now_ms)
            if reply is not None:
                self.transmit("reply", reply)

    @staticmethod
    def count_activity(activity: TraitorActivity, made: list[Any], sent: list[Any]) -> None:
        remembered = activity.remembered
        made_now = {id(send.message): send.message for send in made}
        activity.core_messages += len(made_now)
        if len(remembered) + len(made_now) > CORE_MESSAGES_REMEMBERED_MAX:
            remembered.clear()
        remembered.update(made_now)  # holding them keeps their ids from being reused
        went_out = {id(send.message) for send in sent}
        unchanged = sum(1 for identity in went_out if identity in remembered)
        activity.sent_unchanged += unchanged
        activity.sent_forged += len(went_out) - unchanged

    def check_primary_progress(self, index: int, replica: SimulatedReplica) -> None:
        """Liveness, per view, from the start (faults included: it judges the primary's own state,
        and nothing the network does keeps an honest primary with room from proposing): an honest
        primary proposes what waits, unless it still has batches of its view to execute (those it
        may be fetching) or no room."""
        core = replica.core
        seen = (core.view, core.view_active)
        if seen != self.primary_view_seen[index]:
            self.primary_view_seen[index] = seen
            self.primary_busy_ms[index] = self.now_ms
        if not self.scenario.require_liveness or replica.crashed:
            return  # crashed: a torn crash can land inside the round just applied
        if not core.view_active or not core.is_primary or core.joining is not None:
            return
        idle = (
            bool(core.pending)
            and core.height >= core.low
            and core._batches_in_flight() == 0
            and core.next_sequence <= min(core.high, core.height + self.network.protocol.window_size)
        )
        if not idle:
            self.primary_busy_ms[index] = self.now_ms
            return
        since = self.primary_busy_ms[index]
        if self.now_ms - since > PRIMARY_IDLE_MAX_MS:
            raise self.fail(
                f"liveness: honest primary {index} of view {core.view} proposed nothing for {self.now_ms - since} ms "
                f"with {len(core.pending)} requests waiting, height {core.height}, nothing of its view to "
                f"execute and room in its window"
            )

    def check_signed(self, index: int, kind: str, view: int, sequence: int, digest: bytes) -> None:
        """No honest replica signs two different pre-prepares, prepares or commits for one slot,
        not even across crashes (the record of what it signed outlives its memory here)."""
        key = (index, kind, view, sequence)
        previous = self.signed_digests.setdefault(key, digest)
        if previous != digest:
            raise self.fail(f"equivocation: replica {index} signed two {kind}s for view {view} sequence {sequence}")

    def check_persisted(self, index: int, record: Persist) -> None:
        message = record.message
        if record.kind == "pre-prepare":
            self.check_signed(index, "pre-prepare", record.view, record.sequence, message.header.digest)
        elif record.kind in ("prepare", "commit"):
            self.check_signed(index, record.kind, record.view, record.sequence, message.digest)
        elif record.kind == "new-view" and message.replica_id == index:
            self.check_sent(index, message)
        elif record.kind == "view-change":
            self.check_sent(index, message)
        elif record.kind == "stable-checkpoint":
            self.check_checkpoint_certificate(index, message, "made stable")

    def _first_check(self, message: Any) -> bool:
        """True the first time a message object is checked (replicas re-send the same objects)."""
        if id(message) in self.checked_messages:
            return False
        if len(self.checked_messages) >= CHECKED_MESSAGES_MAX:
            self.checked_messages.clear()
        self.checked_messages[id(message)] = message  # holding it keeps its id from being reused
        return True

    def check_sent(self, index: int, message: Any) -> None:
        """What an honest replica sends, not only what it persists, must keep the signing rules
        and verify against the replicas' public keys."""
        if isinstance(message, PrePrepare):
            self.check_signed(index, "pre-prepare", message.view, message.sequence, message.batch.digest)
        elif isinstance(message, Prepare | Commit):
            self.check_signed(index, message.TAG, message.view, message.sequence, message.digest)
        elif isinstance(message, NewView):
            if message.replica_id == index and self._first_check(message):
                for header in message.pre_prepares:
                    if header.replica_id == index:
                        self.check_signed(index, "pre-prepare", header.view, header.sequence, header.digest)
                for view_change in message.view_changes:
                    self.check_view_change(index, view_change, f"inside replica {index}'s NEW-VIEW")
        elif isinstance(message, ViewChange):
            if self._first_check(message):
                self.check_view_change(index, message, f"sent by replica {index}")

    def _signed_by(self, kind: str, replica_id: int, signed_bytes: bytes, signature: bytes) -> bool:
        if replica_id >= self.scenario.replica_count:
            return False
        return self.verify(self.replica_keys[replica_id].public_key, self.domains[kind], signed_bytes, signature)

    def check_checkpoint_certificate(self, index: int, certificate: CheckpointCertificate, where: str) -> None:
        if not self._first_check(certificate):
            return
        signers = set()
        for replica_id, signature in certificate.signatures:
            unsigned = Checkpoint(certificate.sequence, certificate.state_digest, certificate.block_hash, replica_id)
            if self._signed_by("checkpoint", replica_id, unsigned.signed_bytes(), signature):
                signers.add(replica_id)
        if len(signers) < self.network.quorum:
            raise self.fail(
                f"checkpoint certificate: replica {index} {where} a certificate for sequence {certificate.sequence} "
                f"with {len(signers)} valid signatures"
            )

    def check_view_change(self, index: int, view_change: ViewChange, where: str) -> None:
        problem = self.view_change_problem(view_change)
        if problem is not None:
            raise self.fail(f"view-change: a VIEW-CHANGE {where} does not verify: {problem}")

    def view_change_problem(self, view_change: ViewChange) -> str | None:
        """Checked from the public keys alone, independently of the core's own checks."""
        if not self._signed_by("view-change", view_change.replica_id, view_change.signed_bytes(), view_change.signature):
            return f"bad signature by replica {view_change.replica_id}"
        if view_change.checkpoint is not None:
            certificate = view_change.checkpoint
            signers = {
                replica_id
                for replica_id, signature in certificate.signatures
                if self._signed_by(
                    "checkpoint",
                    replica_id,
                    Checkpoint(certificate.sequence, certificate.state_digest, certificate.block_hash, replica_id).signed_bytes(),
                    signature,
                )
            }
            if len(signers) < self.network.quorum:
                return f"checkpoint certificate for {certificate.sequence} has {len(signers)} valid signatures"
        for certificate in view_change.prepared:
            problem = self.prepared_certificate_problem(certificate, view_change.new_view)
            if problem is not None:
                return problem
        return None

    def prepared_certificate_problem(self, certificate: PreparedCertificate, new_view: int) -> str | None:
        header: PrePrepareHeader = certificate.pre_prepare
        primary = self.network.primary(header.view)
        if header.view >= new_view:
            return f"prepared certificate from view {header.view} in a VIEW-CHANGE for view {new_view}"
        if header.replica_id != primary or not self._signed_by("pre-prepare", primary, header.signed_bytes(), header.signature):
            return f"prepared certificate for sequence {header.sequence}: pre-prepare not signed by primary {primary}"
        signers = {
            replica_id
            for replica_id, signature in certificate.prepares
            if replica_id != primary
            and self._signed_by("prepare", replica_id, Prepare(header.view, header.sequence, header.digest, replica_id).signed_bytes(), signature)
        }
        if len(signers) < self.network.quorum - 1:
            return f"prepared certificate for sequence {header.sequence} has {len(signers)} valid prepares"
        return None

    def check_installed(self, index: int, installed: Installed) -> None:
        """A snapshot installed by state sync is the honest chain's block at its height and the
        state that block's execution left (what every honest replica holds there)."""
        block = installed.block
        agreed = self.committed.get(block.height)
        if agreed is None or agreed.block_hash != block.block_hash:
            raise self.fail(f"state sync: replica {index} installed a block {block.height} the honest replicas did not commit")
        application = AccountsApplication.from_entries(installed.state.accounts, installed.state.values)
        if application.state_digest() != block.header.state_digest:
            raise self.fail(f"state sync: replica {index} installed a state that is not the state of block {block.height}")

    def check_block(self, index: int, replica: SimulatedReplica, block: Block) -> None:
        honest = index not in self.traitors
        tip = replica.chain[-1] if replica.chain else None
        expected_parent = tip.block_hash if tip is not None else self.network.genesis_hash
        if honest and block.height != len(replica.chain) + 1:
            raise self.fail(f"hash chain: replica {index} committed block {block.height} after {len(replica.chain)}")
        if honest and block.header.parent_hash != expected_parent:
            raise self.fail(f"hash chain: replica {index} block {block.height} does not link to its parent")
        if honest:
            if block.height not in self.committed:
                self.record_writes(block)
            agreed = self.committed.setdefault(block.height, block)
            if agreed.block_hash != block.block_hash:
                holders = tuple(
                    other
                    for other in self.honest()
                    if _block_hash_at(self.replicas[other].chain, block.height) == agreed.block_hash
                )
                raise self.fail(
                    f"agreement: replicas committed different blocks at height {block.height}",
                    Conflict(block.height, agreed, holders, block, index),
                )
            try:
                verify_certificate(
                    block.header, block.certificate, self.network.identity, self.network.replica_keys, self.network.quorum, self.verify
                )
            except ChainError as error:
                raise self.fail(f"certificate: replica {index}: {error}") from None
            self.check_timestamp(index, replica, block)
            if agreed is block:
                for receipt in self.receipts_by_height.get(block.height, ()):
                    self.check_receipt(receipt)
        for position, (transaction, result) in enumerate(zip(block.transactions, block.results, strict=True)):
            transaction_id = transaction.transaction_id
            if honest:
                if not self.verify(transaction.sender, self.transaction_domain, transaction.signed_bytes(), transaction.signature):
                    raise self.fail(f"validity: replica {index} block {block.height} holds a transaction its client never signed")
                failed = self.failed_receipts.get(transaction_id)
                if failed is not None and result.ok:
                    raise self.fail(
                        f"exactly-once: a failed receipt came true: transaction {transaction_id.hex()[:12]} failed at "
                        f"height {failed.height} ({failed.result.reason}, signed by replicas {list(failed.replicas)}) "
                        f"and replica {index} executed it at height {block.height}"
                    )
            earlier = replica.transaction_ids.get(transaction_id)
            if honest and earlier is not None and result.ok:
                raise self.fail(f"exactly-once: replica {index} executed a transaction twice (blocks {earlier[0]} and {block.height})")
            if earlier is None and is_final(result):
                replica.transaction_ids[transaction_id] = (block.height, position)
        replica.chain.append(block)

    def check_timestamp(self, index: int, replica: SimulatedReplica, block: Block) -> None:
        """An honest chain's time is roughly the time: never ahead of the clock, never far behind
        the block before (null blocks carry timestamp 0 by design and are left out)."""
        if not block.transactions:
            return
        timestamp_ms = block.header.timestamp_ms
        if not replica.last_timestamp_ms - TIMESTAMP_SKEW_MS <= timestamp_ms <= self.now_ms + TIMESTAMP_SKEW_MS:
            raise self.fail(
                f"timestamp: replica {index} block {block.height} is stamped {timestamp_ms}ms at time {self.now_ms}ms "
                f"(previous block {replica.last_timestamp_ms}ms)"
            )
        replica.last_timestamp_ms = max(replica.last_timestamp_ms, timestamp_ms)

    def check_replies(self, index: int, blocks: list[Block], replies: list[Reply]) -> None:
        """An honest replica's replies for the blocks it just executed: one signed batch reply per
        block, whose leaves are exactly the block's outcomes (never a deferred or replayed entry),
        each reply's path leading to the signed root."""
        by_height: dict[int, list[Reply]] = {}
        for reply in replies:
            by_height.setdefault(reply.height, []).append(reply)
        for block in blocks:
            outcomes = [position for position, result in enumerate(block.results) if is_outcome(result)]
            made = by_height.pop(block.height, [])
            batches = {reply.batch for reply in made}
            if (
                [reply.index for reply in made] != outcomes
                or len(batches) > 1
                or any(
                    reply.batch.leaf_count != len(outcomes)
                    or reply.block_hash != block.block_hash
                    or reply.transaction_id != block.transactions[reply.index].transaction_id
                    or reply.result != block.results[reply.index]
                    or not reply.path_leads_to_root()
                    for reply in made
                )
            ):
                raise self.fail(f"replies: honest replica {index}'s replies for block {block.height} do not match its outcomes")
        if by_height:
            raise self.fail(f"replies: honest replica {index} replied for heights {sorted(by_height)} it did not execute now")

    def check_receipt(self, receipt: Receipt) -> None:
        """A receipt f + 1 replicas signed must be what the honest chain holds at its place."""
        block = self.committed.get(receipt.height)
        if block is None:
            return  # checked when the first honest replica commits that height
        if (
            block.block_hash != receipt.block_hash
            or receipt.index >= len(block.transactions)
            or block.transactions[receipt.index].transaction_id != receipt.transaction_id
            or block.results[receipt.index] != receipt.result
        ):
            raise self.fail(
                f"exactly-once: a receipt signed by replicas {list(receipt.replicas)} for height {receipt.height} "
                f"index {receipt.index} does not match the honest chain"
            )

    # ---- the clients ----

    def client_tick(self) -> None:
        accounts = [client.key.public_key for client in self.clients]
        for client in self.clients:
            if client.resynchronise and not client.in_flight:
                # After a 'bad nonce' receipt: the account's nonce is the number of transactions that executed.
                client.next_nonce, client.resynchronise = client.accepted_ok, False
            while (
                not client.resynchronise
                and len(client.in_flight) < self.scenario.pipeline_depth
                and client.submitted < self.scenario.transactions_per_client
            ):
                operation: Any
                if self.random.random() < 0.5:
                    recipient = self.random.choice(accounts)
                    operation = Transfer(recipient, self.random.randint(1, 10))
                else:
                    operation = Put(f"key-{self.random.randint(0, 5)}", f"value-{self.random.randint(0, 1000)}")
                transaction = sign_transaction(self.network.identity, client.key, client.next_nonce, operation)
                client.next_nonce += 1
                client.submitted += 1
                quorum = ReplyQuorum(self.network, transaction.transaction_id, self.verify)
                client.in_flight[transaction.transaction_id] = InFlight(transaction, quorum, self.now_ms)
                # As the client library does: to every replica, so backups watch the primary's pace.
                for replica in range(self.scenario.replica_count):
                    self.transmit("request", (replica, transaction))
            for waiting in client.in_flight.values():
                if self.now_ms - waiting.sent_at_ms >= self.scenario.client_timeout_ms:
                    # PBFT: a client that waited too long sends its request to every replica.
                    waiting.sent_at_ms = self.now_ms
                    for replica in range(self.scenario.replica_count):
                        self.transmit("request", (replica, waiting.transaction))

    def on_reply(self, reply: Reply) -> None:
        for client in self.clients:
            waiting = client.in_flight.get(reply.transaction_id)
            if waiting is None:
                continue
            receipt = waiting.quorum.add(reply)
            if receipt is None:
                continue
            del client.in_flight[reply.transaction_id]
            client.receipts.append(receipt)
            self.last_receipt_ms = self.now_ms
            if receipt.result.ok:
                client.accepted_ok += 1
            else:
                # Pipelined nonces may be ordered out of turn, but such a transaction is deferred,
                # never failed: no replica signs a result for it until it executes.
                raise self.fail(f"validity: a well-formed transaction failed: {receipt.result.reason}")
            self.receipts_by_height.setdefault(receipt.height, []).append(receipt)
            self.check_receipt(receipt)
            self.check_client_reads(client, receipt, waiting.transaction)

    def check_client_reads(self, client: SimulatedClient, receipt: Receipt, transaction: Transaction) -> None:
        """Read-your-writes, through the real read path: right after a client accepts the receipt
        of its put, it reads the key from state at or above the receipt's height (node/queries.py
        answers, client/quorum.py QueryQuorum decides). The slowest replicas answer first, and every
        traitor answers with the value from before the write, claiming the receipt's height: the
        attack that a read needing 2f + 1 answers, with no floor, used to lose to. An accepted
        answer must be the key's value at some honest height at or above the receipt's."""
        operation = transaction.operation
        if not isinstance(operation, Put) or not receipt.result.ok:
            return
        nonce = hashlib.sha256(receipt.transaction_id).digest()[:QUERY_NONCE_SIZE]
        query = Query(len(client.receipts), "get", operation.key, receipt.height, nonce)
        answers = []
        for index, replica in enumerate(self.replicas):
            if not self.reachable(index):
                continue
            if index in self.traitors:
                stale = self.key_value_at(operation.key, receipt.height - 1)
                unsigned = QueryReply(query.query_id, query.digest, index, receipt.height, stale, "")
            else:
                core = replica.core
                unsigned = answer_query(query, index, core.application, core.height, SimulatedLedger(replica.chain))
            signature = self.replica_keys[index].sign(self.query_domain, unsigned.signed_bytes())
            answers.append(dataclasses.replace(unsigned, signature=signature))
        quorum = QueryQuorum(self.network, query, check=self.verify)
        for reply in sorted(answers, key=lambda answer: (answer.height, answer.replica_id)):
            if quorum.add(reply) is not None:
                break
        if quorum.answer is None:
            return  # too few replicas at the floor yet: a real client asks again a little later
        value = quorum.answer.result
        if value not in self.key_values_since(operation.key, receipt.height):
            raise self.fail(
                f"read-your-writes: after its put of {operation.key!r} was confirmed at height {receipt.height}, "
                f"a client read {value!r} (vouched at height {quorum.vouched_height})"
            )

    def record_writes(self, block: Block) -> None:
        """The honest chain's history of each key, to judge reads against."""
        for transaction, result in zip(block.transactions, block.results, strict=True):
            if result.ok and isinstance(transaction.operation, Put):
                self.key_writes.setdefault(transaction.operation.key, []).append((block.height, transaction.operation.value))

    def key_value_at(self, key: str, height: int) -> str | None:
        value = None
        for written_at, written in self.key_writes.get(key, ()):
            if written_at > height:
                break
            value = written
        return value

    def key_values_since(self, key: str, height: int) -> set[str | None]:
        """Every value the key held at some honest height at or above `height`."""
        values = {self.key_value_at(key, height)}
        values.update(written for written_at, written in self.key_writes.get(key, ()) if written_at > height)
        return values


def _block_hash_at(chain: list[Block | None], height: int) -> bytes | None:
    block = chain[height - 1] if 1 <= height <= len(chain) else None
    return None if block is None else block.block_hash


@dataclass
class SimulatedLedger:
    """A simulated replica's chain, as node/queries.py reads the block store."""

    chain: list[Block | None]

    @property
    def height(self) -> int:
        return len(self.chain)

    def _blocks(self) -> list[Block]:
        return [block for block in self.chain if block is not None]

    def locate_transaction(self, transaction_id: bytes) -> tuple[int, int] | None:
        for block in self._blocks():
            for index, transaction in enumerate(block.transactions):
                if transaction.transaction_id == transaction_id:
                    return block.height, index
        return None

    def block_hash(self, height: int) -> bytes | None:
        return _block_hash_at(self.chain, height)

    def transactions_with_prefix(self, prefix: str, limit: int) -> list[tuple[bytes, int, int]]:
        first_seen: dict[bytes, tuple[int, int]] = {}
        for block in self._blocks():
            for index, transaction in enumerate(block.transactions):
                if transaction.transaction_id.hex().startswith(prefix):
                    first_seen.setdefault(transaction.transaction_id, (block.height, index))
        return [(transaction_id, *first_seen[transaction_id]) for transaction_id in sorted(first_seen)][:limit]


def run_simulation(scenario: Scenario) -> SimulationReport:
    return Simulation(scenario).run()


def run_seed(
    seed: int, replica_count: int, adversarial: bool, excluded: tuple[str, ...] = ()
) -> tuple[int, int, str | None, SimulationReport | None]:
    """One seed, for a sweep (possibly in a worker process): (seed, n, failure text, report)."""
    try:
        report = run_simulation(Scenario.from_seed(seed, replica_count, adversarial=adversarial, excluded=excluded))
    except SimulationFailure as failure:
        return seed, replica_count, str(failure), None
    return seed, replica_count, None, report

