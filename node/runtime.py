"""The Trio shell around one replica core: IO only (network, disk, clock), never protocol decisions."""

from __future__ import annotations

import cProfile
import dataclasses
import functools
import logging
import os
import random
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ledger.blocks import Block
from ledger.config import (
    ConfigError,
    NetworkConfig,
    ProtocolSettings,
    ReplicaConfig,
    load_replica_config,
)
from ledger.crypto import KeyFileError, SigningKey, read_key_file, signing_domain
from ledger.encoding import CodecError
from ledger.evidence import Evidence
from ledger.framing import ByteBudget, FramedStream, FrameError, FrameQueue
from ledger.messages import (
    BLOCKS_PER_RESPONSE_MAX,
    STATUS_VERSION_LENGTH_MAX,
    ErrorReply,
    FetchBlocks,
    FetchSnapshot,
    PrePrepare,
    Query,
    QueryReply,
    Reply,
    ReplyEncoder,
    Request,
    StatusQuery,
    StatusReply,
    Subscribe,
    decode_message,
    encode_blocks_message,
    encode_message,
    pruned_reason,
)
from ledger.restore import restore_application
from ledger.sizes import CLIENT_FRAME_SIZE_MAX, blocks_response_budget, blocks_size_max
from ledger.storage import (
    BlockStore,
    DataDirectoryLock,
    DirectoryInUse,
    StoreError,
    evidence_per_replica_max,
)
from ledger.transactions import KnownTransactions, Transaction, transaction_domain
from ledger.version import package_version
from node.admission import ClientAdmission, address_key
from node.core import LOG_KINDS, ReplicaCore
from node.effects import ClientReply, Effects
from node.log_format import LogRateLimit
from node.metrics import ReplicaMetrics, runtime_snapshot, serve_metrics
from node.queries import answer_query
from node.recent_replies import LedgerAnswerBudget, LedgerAnswerBudgets, RecentReplies
from node.signature_threads import PARALLEL_CHECKS_MIN, SignatureThreads
from node.snapshot_serving import ServingBudget
from node.stage_trace import StageTrace
from node.traitors import (
    SIGNED_KINDS,
    BehaviourSpec,
    RawFrame,
    Traitor,
    TraitorContext,
    make_behaviour,
)
from node.transport import ListenError, PeerTransport, listen

EVENT_QUEUE_MAX = 10_000
WAITING_REQUESTS_MAX = 10_000
EVENTS_PER_ROUND_MAX = 512
QUIET_TICK_MS = 100
CLIENT_QUEUE_FRAMES_MAX = 4096
# What may wait to be written to one client, block responses aside: replies are a few hundred
# bytes, so this is about a thousand of them. A client that does not read loses replies; it retries.
CLIENT_QUEUE_BYTES_MAX = 128 * 1024
# What one read from a client may take: with a frame limit of CLIENT_FRAME_SIZE_MAX, a connection
# buffers at most a partial frame, one chunk and the frames cut from it.
CLIENT_RECEIVE_CHUNK_SIZE = 16 * 1024
# Block responses to clients (up to frame_size_max each) share one budget of this many responses
# across all client connections, and one connection has at most one waiting.
CLIENT_BLOCK_RESPONSES_MAX = 2
# A client that does not take a write's bytes within this long is dropped: it cannot hold the
# shared block budget (or its own) by not reading.
CLIENT_WRITE_TIMEOUT_S = 30.0
# Accounts one connection follows; each costs about 350 bytes of tables (measured with tracemalloc).
SUBSCRIPTIONS_PER_CONNECTION_MAX = 256
SUBSCRIPTION_BYTES_ESTIMATE = 400
CONNECTION_OVERHEAD_BYTES_ESTIMATE = 16 * 1024  # socket, task, cancel scope, queue objects
PROGRESS_LOG_INTERVAL_S = 5.0
# A round this small (few events handled, little to write) writes on the event-loop thread: its
# fsync takes a fraction of a millisecond, less than handing the write to a worker thread and back
# costs on a busy machine (one transaction at a time: p50 about 16 -> 9 ms, CPU per transaction
# x0.8). Under load the rounds are bigger and keep the worker thread, so the connections are served
# while a write waits on the disk and the next round gathers more (bigger batches).
INLINE_WRITE_EVENTS_MAX = 4
INLINE_WRITE_TRANSACTIONS_MAX = 16
INLINE_WRITE_RECORD_BYTES_MAX = 8 * 1024
REJECTIONS_LOGGED_PER_SECOND = 20
CLIENT_ERRORS_LOGGED_PER_SECOND = 5

log = logging.getLogger("node.replica")


class StartupError(RuntimeError):
    """The replica cannot start: bad config, key, or store. The message says what to fix."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def write_inline(events_handled: int, records: list[tuple[str, int, int, bytes]], blocks: list[Block]) -> bool:
    """Whether a round's disk write is small enough to run on the event-loop thread (see
    INLINE_WRITE_EVENTS_MAX): few events handled, few transactions in its blocks, few record bytes."""
    return (
        events_handled <= INLINE_WRITE_EVENTS_MAX
        and sum(len(block.transactions) for block in blocks) <= INLINE_WRITE_TRANSACTIONS_MAX
        and sum(len(record[3]) for record in records) <= INLINE_WRITE_RECORD_BYTES_MAX
    )


def status_version(version: str) -> str:
    """`version` as a STATUS-REPLY may carry it: printable ASCII, at most STATUS_VERSION_LENGTH_MAX characters."""
    printable = "".join(character if character.isascii() and character.isprintable() else "?" for character in version)
    return printable[:STATUS_VERSION_LENGTH_MAX]


def client_memory_bound_bytes(replica_count: int, protocol: ProtocolSettings) -> int:
    """What all client connections together can make a replica hold, at most (estimates of
    Python's object overheads included): per connection its receive buffers, its send budget and
    its subscriptions; then the block responses' shared budget, and one transient copy of the
    largest write (a write joins its frames before sending them)."""
    # A partial frame in the decoder, plus the whole frames cut from the last chunk and not yet served.
    receive = 2 * CLIENT_FRAME_SIZE_MAX + CLIENT_RECEIVE_CHUNK_SIZE
    per_connection = (
        receive
        + CLIENT_QUEUE_BYTES_MAX
        + SUBSCRIPTIONS_PER_CONNECTION_MAX * SUBSCRIPTION_BYTES_ESTIMATE
        + CONNECTION_OVERHEAD_BYTES_ESTIMATE
    )
    blocks_response = blocks_size_max(replica_count, protocol.batch_size_max, protocol.frame_size_max)
    return protocol.client_connections_max * per_connection + (CLIENT_BLOCK_RESPONSES_MAX + 1) * blocks_response


@dataclass(eq=False)
class ClientConnection:
    """One client's connection: a bounded queue of frames to write, and the accounts it follows."""

    queue: FrameQueue
    blocks_budget: ByteBudget  # its share of the block budget common to all clients
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    accounts: set[bytes] = field(default_factory=set)
    last_frame_s: float = field(default_factory=trio.current_time)
    closed: bool = False
    dropped: int = 0
    # Retransmitted requests it may have answered from the ledger (node/recent_replies.py):
    # the replica gives every connection from one address the same budget.
    ledger_answers: LedgerAnswerBudget = field(default_factory=lambda: LedgerAnswerBudget(trio.current_time()))

    def send(self, message: Any) -> None:
        self.send_encoded(encode_message(message))

    def send_encoded(self, payload: bytes, budget: ByteBudget | None = None) -> None:
        if self.closed:
            return  # gone; a waiting request may still name it
        if not self.queue.put(payload, budget):
            self.dropped += 1  # a client that does not read loses replies; it retries

    def close(self) -> None:
        """Stop serving it and free what it had queued, even while something still refers to it."""
        self.closed = True
        self.cancel_scope.cancel()
        self.queue.clear()


def make_runtime_traitor(
    network: NetworkConfig, replica_id: int, key: SigningKey, behaviours: tuple[BehaviourSpec, ...], seed: int
) -> Traitor:
    """The traitor wrapping a real replica: as in the simulator, but it may also send raw frames."""
    for behaviour in behaviours:
        if behaviour.name == "twins":
            raise StartupError("traitor behaviour twins is a second honest process with this replica's key: `ledger-scenario run twins` starts both")
    domains = {kind: signing_domain(network.identity, kind) for kind in sorted(set(SIGNED_KINDS.values()))}
    context = TraitorContext(network, replica_id, key, domains, random.Random(f"traitor/{seed}/{replica_id}"), raw_frames=True)
    try:
        return Traitor(context, [make_behaviour(behaviour) for behaviour in behaviours])
    except (TypeError, ValueError) as error:
        raise StartupError(f"traitor: {error}") from None


def round_requests(events: list[tuple[str, Any, Any]]) -> list[tuple[Transaction, int | None]]:
    """A round's client requests, each with the replica that relayed it (None: straight from a client)."""
    requests: list[tuple[Transaction, int | None]] = []
    for kind, origin, message in events:
        if kind == "request":
            requests.append((message, None))
        elif kind == "peer" and isinstance(message, Request):
            requests.append((message.transaction, origin))
    return requests


class ReplicaRuntime:
    def __init__(
        self, config: ReplicaConfig, traitor: tuple[BehaviourSpec, ...] = (), traitor_seed: int = 0, trace_stages: bool = False
    ) -> None:
        self.config = config
        # Per-stage latency of sampled transactions (node/stage_trace.py), only when asked for.
        self.stage_trace = StageTrace(config.replica_id) if trace_stages else None
        self.network = config.network
        try:
            self.key = read_key_file(config.key_path)
        except KeyFileError as error:
            raise StartupError(str(error)) from None
        if self.key.public_key != self.network.replicas[config.replica_id].public_key:
            raise StartupError(f"{config.key_path}: this key is not replica {config.replica_id}'s key in {config.path}")
        # A traitor (node/traitors.py) wraps the core's effects exactly as in the simulator; an
        # honest replica has none, and pays one `if` per round for the possibility.
        self.traitor: Traitor | None = None
        if traitor:
            self.traitor = make_runtime_traitor(self.network, config.replica_id, self.key, traitor, traitor_seed)
        self.traitor_seed = traitor_seed
        self.started_ms = now_ms()
        self.started_monotonic_s = time.monotonic()  # for uptime: never goes back with the wall clock
        self.version = status_version(package_version())
        # Before the store is touched: a second process for the same replica (a second `up` or
        # `run`) must not open its SQLite files, write its logs or answer on its ports.
        try:
            self.lock = DataDirectoryLock(config.data_dir)
        except DirectoryInUse:
            raise
        except StoreError as error:
            raise StartupError(str(error)) from None
        try:
            opening_s = time.monotonic()
            self.store = BlockStore.open(config.data_dir / "ledger.sqlite3", self.network.genesis_hash, retain_blocks=config.retain_blocks)
            state = restore_application(self.store, self.network)
            restored = [(record[0], decode_message(record[3])) for record in self.store.load_messages()]
        except (StoreError, CodecError) as error:
            self.lock.release()
            raise StartupError(
                f"{error} (the store is damaged: restore it from a backup or remove it to resync from peers; "
                f"`ledger-node check {config.path}` audits it from genesis)"
            ) from None
        # Logged once the replica is ready: a start that fails later (a port taken) stays one line.
        self.opened_summary = (
            f"store opened at height {self.store.height} in {int((time.monotonic() - opening_s) * 1000)} ms: durable state at height "
            f"{'none' if state.state_height is None else state.state_height}, {state.state_entries} entries; "
            f"{state.blocks_replayed} blocks re-executed; "
            + (f"keeps blocks from height {self.store.first_height}" if self.store.base_height else "keeps every block")
            + ("" if config.retain_blocks is None else f" (retain_blocks {config.retain_blocks})")
        )
        # Client signatures of a batch (and of a round's requests) are checked on every core.
        self.signature_threads = SignatureThreads(os.cpu_count() or 1)
        self.transaction_domain = transaction_domain(self.network.identity)
        self.core = ReplicaCore(
            self.network,
            config.replica_id,
            self.key,
            state.application,
            self.store.height,
            self.store.last_hash,
            restored,
            last_timestamp_ms=state.latest_timestamp_ms,
            check_signatures=self.signature_threads.check,
            # A store that holds no blocks, or already starts from a snapshot, may (re)start
            # from one; an archive (blocks from genesis) keeps replaying every block.
            state_sync_allowed=self.store.may_install_snapshot,
            store_prunes=config.retain_blocks is not None,
        )
        self.query_domain = signing_domain(self.network.identity, "query-reply")
        self.events_send, self.events_receive = trio.open_memory_channel[tuple[str, Any, Any]](EVENT_QUEUE_MAX)
        # Each client transaction is decoded from its REQUEST, then again from the PRE-PREPARE:
        # the second time reuses the first (ledger/transactions.py, KnownTransactions).
        self.known_transactions = KnownTransactions()
        self.transport = PeerTransport(
            self.network,
            config.replica_id,
            self.key,
            self._deliver_from_peer,
            functools.partial(decode_message, known=self.known_transactions),
        )
        protocol = self.network.protocol
        self.clients: ClientAdmission[ClientConnection] = ClientAdmission(
            protocol.client_connections_max,
            protocol.client_connections_per_address_max,
            lambda connection: connection.last_frame_s,
        )
        # The largest Blocks response (ledger/sizes.py): what must fit before one is read from disk.
        self.blocks_response_size_max = blocks_size_max(
            self.network.replica_count, protocol.batch_size_max, protocol.frame_size_max
        )
        self.client_blocks_budget = ByteBudget(CLIENT_BLOCK_RESPONSES_MAX * self.blocks_response_size_max)
        self.fetches_skipped = 0
        # Encoded REPLYs of recently executed transactions, for retransmitted requests.
        self.recent_replies = RecentReplies()
        self.ledger_answer_budgets = LedgerAnswerBudgets()
        self.retransmits_unanswered = 0  # over its address's LedgerAnswerBudget: dropped
        # What snapshot serving may cost, per peer and in all (node/snapshot_serving.py).
        self.serving_budget = ServingBudget()
        self.clients_timed_out = 0
        self.subscribers: dict[bytes, set[ClientConnection]] = {}
        # Which connection sent a request, so a refusal reaches it; oldest forgotten first.
        self.waiting_requests: OrderedDict[bytes, ClientConnection] = OrderedDict()
        self.last_progress_log = 0.0
        self.rejection_log_second = 0
        self.rejections_logged = 0
        self.rejections_suppressed = 0
        self.logged_height = self.store.height
        self.evidence_count = self.store.evidence_count()
        self.evidence_per_replica_max = evidence_per_replica_max(self.network.replica_count)
        self.metrics = ReplicaMetrics(lambda: runtime_snapshot(self))
        self.client_error_log = LogRateLimit(log, CLIENT_ERRORS_LOGGED_PER_SECOND)

    # ---- lifecycle ----

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        replica = self.network.replicas[self.config.replica_id]
        async with trio.open_nursery() as nursery:
            await nursery.start(self.transport.run)
            client_listeners = await listen(replica.client_address)
            nursery.start_soon(trio.serve_listeners, self._serve_client, client_listeners)
            nursery.start_soon(self._event_loop)
            metrics_address = self.config.metrics_address
            if metrics_address is not None:
                await nursery.start(serve_metrics, self.metrics, metrics_address)
            self.lock.mark_ready()
            self.metrics.serving = True
            if self.traitor is not None:
                log.warning(
                    "replica %d is a TRAITOR, for attack tests only: behaviours %s (traitor seed %d)",
                    self.config.replica_id,
                    self.traitor.describe(),
                    self.traitor_seed,
                )
            log.info("%s", self.opened_summary)
            log.info(
                "replica %d of %r ready: peers on %s, clients on %s, height %d, view %d, f=%d",
                self.config.replica_id,
                self.network.network_id,
                replica.address,
                replica.client_address,
                self.store.height,
                self.core.view,
                self.network.faults_tolerated,
            )
            if metrics_address is not None:
                log.info("metrics on http://%s/metrics, health on http://%s/health", metrics_address, metrics_address)
            log.info(
                "clients: at most %d connections, %d per address; they can make this replica hold at most about %d MiB",
                self.network.protocol.client_connections_max,
                self.network.protocol.client_connections_per_address_max,
                client_memory_bound_bytes(self.network.replica_count, self.network.protocol) // 2**20,
            )
            task_status.started()

    def close(self) -> None:
        self.signature_threads.close()
        self.store.close()
        self.lock.release()

    async def _deliver_from_peer(self, peer: int, message: Any) -> None:
        await self._queue_event(("peer", peer, message))

    async def _queue_event(self, event: tuple[str, Any, Any]) -> None:
        """Into the event queue without yielding while it has room: `send` yields to the
        scheduler on every message, one Trio round per request and vote (the readers still
        yield on every socket read, at most one chunk of frames apart). A full queue waits."""
        try:
            self.events_send.send_nowait(event)
        except trio.WouldBlock:
            await self.events_send.send(event)

    # ---- the event loop: feed the core, carry out its effects ----

    async def _event_loop(self) -> None:
        tick_s = max(self.network.protocol.batch_wait_ms, 2) / 1000
        # A quiet replica (nothing waiting, in flight, fetched or served) ticks at most every
        # QUIET_TICK_MS instead of every batch_wait_ms: an idle 4-replica network woke 200 times a
        # second per replica for nothing (about 7% of a core each on a slow host). Any message
        # wakes the loop at once, so a request is never held by this.
        quiet_tick_s = max(tick_s, min(QUIET_TICK_MS, self.network.protocol.status_interval_ms // 2) / 1000)
        while True:
            events = []
            # A traitor's held messages (node/traitors.py) are released on ticks: it keeps the fine one.
            quiet = self.traitor is None and self.core.quiet() and not self.serving_budget.waiting
            with trio.move_on_after(quiet_tick_s if quiet else tick_s):
                events.append(await self.events_receive.receive())
            if events:
                # Drain what else is queued so one disk write and one send round cover many events.
                for _ in range(EVENTS_PER_ROUND_MAX):
                    try:
                        events.append(self.events_receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                # The core's clock is the last tick's: bring it to now before the events are
                # judged by it (found by an adversarial review of the quiet tick: a pre-prepare
                # was refused against a clock 100 ms old, a request timer started 100 ms early).
                self.core.advance_clock(now_ms())
                self._check_request_signatures(events)
                for event in events:
                    self._handle(event)
            self._serve_waiting_snapshots()
            self.core.tick(now_ms())
            await self._carry_out(self.core.take_effects(), len(events))
            await trio.sleep(0)

    def _check_request_signatures(self, events: list[tuple[str, Any, Any]]) -> None:
        """Check the client signatures of this round's requests together, on every core, and tell
        the core which verified and which did not (so a forged request costs one check, not two);
        with too few to share, the core checks them itself. Each request costs at most one check."""
        # Only those the core would check: one refused as busy must stay free of any check.
        transactions = self.core.requests_worth_checking(round_requests(events))
        if len(transactions) < PARALLEL_CHECKS_MIN:
            return
        results = self.signature_threads.check(
            [(transaction.sender, self.transaction_domain, transaction.signed_bytes(), transaction.signature) for transaction in transactions]
        )
        verified = [transaction.transaction_id for transaction, valid in zip(transactions, results, strict=True) if valid]
        refused = [transaction.transaction_id for transaction, valid in zip(transactions, results, strict=True) if not valid]
        self.core.note_verified_signatures(verified, refused)

    def _handle(self, event: tuple[str, Any, Any]) -> None:
        kind, origin, message = event
        if kind == "peer":
            if isinstance(message, FetchBlocks):
                self._serve_fetch(origin, message)
            elif isinstance(message, FetchSnapshot):
                self._serve_snapshot(origin, message)
            elif self.traitor is None or self.traitor.receive(origin, message, self._traitor_now_ms()):
                if self.stage_trace is not None and isinstance(message, PrePrepare):
                    self.stage_trace.pre_prepare(message, time.monotonic())
                self.core.receive_message(origin, message)
                self.metrics.pre_prepare_received(message, self.core)
        elif kind == "request":
            if self.traitor is None or self.traitor.receive_request(message, self._traitor_now_ms()):
                self.core.receive_request(message)

    def _traitor_now_ms(self) -> int:
        """A traitor's clock: milliseconds since this replica started (behaviours' start times count from it)."""
        return now_ms() - self.started_ms

    def _serve_fetch(self, peer: int, request: FetchBlocks) -> None:
        # Read nothing from disk for a peer whose queue could not take the answer: it would be
        # dropped anyway, and a peer asking faster than it reads must not make us work for nothing.
        if not self.transport.has_room(peer, self.blocks_response_size_max):
            self.fetches_skipped += 1
            return
        encoded = self._encoded_blocks(request)
        if self.traitor is not None:
            encoded = self._traitor_blocks(peer, encoded)
        if encoded:
            self.transport.send_encoded(peer, encode_blocks_message(encoded, self.core.stable_checkpoint))

    def _serve_snapshot(self, peer: int, request: FetchSnapshot) -> None:
        """A chunk of a kept snapshot (node/snapshot_keeper.py), built only when the peer's
        queue can take it: one chunk of work per request the peer's reading keeps up with."""
        if not self.transport.has_room(peer, self.network.protocol.frame_size_max):
            self.fetches_skipped += 1
            return
        moment = time.monotonic()
        if not self.serving_budget.may_serve(peer, moment):
            self.serving_budget.wait(peer, request)  # served when the budget refills (_serve_waiting_snapshots)
            return
        answer = self.core.snapshots.answer(request, self.core.stable_checkpoint)
        self.serving_budget.charge(peer, 0 if answer is None or answer.chunk is None else len(answer.chunk.entries), moment)
        if answer is not None and self.traitor is not None:
            answer = self.traitor.serve_snapshot(peer, answer, self._traitor_now_ms())
        if answer is not None:
            self.transport.send(peer, answer)

    def _serve_waiting_snapshots(self) -> None:
        """Answer the FetchSnapshot requests that waited for the serving budget, as it allows."""
        while self.serving_budget.waiting:
            payable = self.serving_budget.next_payable(time.monotonic())
            if payable is None:
                return
            self._serve_snapshot(*payable)

    def _encoded_blocks(self, request: FetchBlocks) -> list[bytes]:
        """The blocks of a Blocks answer as stored: each read once and never decoded or re-encoded
        (encode_blocks_message assembles the message from them)."""
        return self.store.encoded_blocks(
            request.from_height,
            min(request.count, BLOCKS_PER_RESPONSE_MAX),
            blocks_response_budget(self.network.protocol.frame_size_max),
        )

    def _traitor_blocks(self, requester: int, encoded: list[bytes]) -> list[bytes]:
        """A traitor's answer to a block fetch (requester -1: a client): decoded only for it."""
        assert self.traitor is not None
        blocks = tuple(Block.decode(data) for data in encoded)
        return [block.encode() for block in self.traitor.serve_blocks(requester, blocks, self._traitor_now_ms())]

    def _betray(self, effects: Effects) -> Effects:
        """The core's sends and replies as the traitor rewrites them (called every round, so what
        it holds back goes out on time). Raw frames go straight to the transport: they are bytes,
        signed by no one, so the persist-before-send rule has nothing to protect in them."""
        assert self.traitor is not None
        moment = self._traitor_now_ms()
        sends = []
        for send in self.traitor.send(effects.send, moment):
            if isinstance(send.message, RawFrame):
                self.transport.send_encoded(send.to, send.message.payload)
            else:
                sends.append(send)
        replies = []
        for client_reply in effects.replies:
            reply = self.traitor.reply(client_reply.reply, moment)
            if reply is not None:
                replies.append(ClientReply(client_reply.account, reply))
        return dataclasses.replace(effects, send=sends, replies=replies)

    async def _carry_out(self, effects: Effects, events_handled: int = EVENTS_PER_ROUND_MAX) -> None:
        """Persist (records and blocks, one transaction), then send, then reply: the order that
        keeps restarts safe. The write runs on a worker thread, so its fsync does not stall the
        connections; events arriving meanwhile wait in the queue and make the next round bigger.
        A small round's write runs inline instead (write_inline)."""
        if self.traitor is not None:
            effects = self._betray(effects)
        if not effects:
            return
        if self.stage_trace is not None:
            self.stage_trace.round_started(effects.send, effects.blocks, time.monotonic())
        if effects.installed is not None:
            installed = effects.installed
            # Before this round's blocks, which follow the snapshot's.
            await trio.to_thread.run_sync(
                self.store.install_snapshot, installed.block, installed.state, installed.checkpoint.state_digest
            )
            log.info("state sync: stored the snapshot at height %d", installed.block.height)
        # What was encoded to be persisted is sent as it is: a pre-prepare (a whole batch) or a
        # vote is encoded once, not once for the disk and again for the peers. Keyed by identity:
        # the core persists and sends the very same signed object, alive until this round ends.
        encoded: dict[int, bytes] = {}
        if effects.persist or effects.blocks or effects.prune is not None:
            self.store.snapshot_floor = min(self.core.snapshots.kept_sequences(), default=None)
            records = []
            for record in effects.persist:
                payload = encode_message(record.message)
                encoded[id(record.message)] = payload
                records.append((record.kind, record.view, record.sequence, payload))
            prune = None if effects.prune is None else (effects.prune.through_sequence, effects.prune.view, LOG_KINDS)
            if write_inline(events_handled, records, effects.blocks):
                self.store.write_round(records, effects.blocks, prune, effects.state)
            else:
                await trio.to_thread.run_sync(self.store.write_round, records, effects.blocks, prune, effects.state)
            if self.stage_trace is not None:
                self.stage_trace.written(effects.blocks)
            if effects.blocks:
                self._log_progress()
        if effects.evidence:
            await self._keep_evidence(effects.evidence)
        for send in effects.send:
            payload = encoded.get(id(send.message))
            if payload is None:
                self.transport.send(send.to, send.message)
            else:
                self.transport.send_encoded(send.to, payload)
        replies = ReplyEncoder()
        for client_reply in effects.replies:
            followers = self.subscribers.get(client_reply.account)
            if followers:
                payload = replies.encode(client_reply.reply)
                for connection in followers:
                    connection.send_encoded(payload)
                # Written before it is sent: a retransmission may be answered with it from now on.
                self.recent_replies.remember(client_reply.reply.transaction_id, payload)
            else:
                # No connection follows the account now (its client may be reconnecting): kept
                # unencoded, so its retransmission is still answered without the ledger budget.
                self.recent_replies.remember_reply(client_reply.reply.transaction_id, client_reply.reply)
            self.waiting_requests.pop(client_reply.reply.transaction_id, None)
            if self.stage_trace is not None:
                self.stage_trace.replied(client_reply.reply.transaction_id)
        for transaction_id, reason in effects.request_errors:
            connection = self.waiting_requests.pop(transaction_id, None)
            if connection is not None:
                connection.send(ErrorReply(transaction_id, reason))
        for line in effects.events:
            if not line.startswith("rejected"):
                log.info("%s", line)
            elif self._rejection_log_allowed():
                log.warning("%s", line)
        self.metrics.round_done(effects.send, effects.blocks, self.core.view, self.core.height)

    async def _keep_evidence(self, entries: list[Evidence]) -> None:
        """Store evidence (bounded; a repeat is dropped) and warn once per new piece."""
        new = await trio.to_thread.run_sync(self.store.add_evidence, entries, self.evidence_per_replica_max)
        self.evidence_count = self.store.evidence_count()
        for evidence in new:
            log.warning(
                "EVIDENCE: replica %d signed two %s messages for view %d sequence %d (digests %s and %s); "
                "kept, see `ledger-client evidence`",
                evidence.replica_id,
                evidence.kind,
                evidence.view,
                evidence.sequence,
                evidence.first_digest.hex()[:16],
                evidence.second_digest.hex()[:16],
            )

    def _rejection_log_allowed(self) -> bool:
        """At most REJECTIONS_LOGGED_PER_SECOND lines a second: a noisy peer cannot flood the log.
        The core still counts every rejection by reason."""
        second = int(time.monotonic())
        if second != self.rejection_log_second:
            if self.rejections_suppressed:
                log.warning("%d more rejected messages not logged in the last second", self.rejections_suppressed)
            self.rejection_log_second, self.rejections_logged, self.rejections_suppressed = second, 0, 0
        if self.rejections_logged < REJECTIONS_LOGGED_PER_SECOND:
            self.rejections_logged += 1
            return True
        self.rejections_suppressed += 1
        return False

    def _log_progress(self) -> None:
        moment = time.monotonic()
        if moment - self.last_progress_log >= PROGRESS_LOG_INTERVAL_S:
            log.info(
                "committed height %d (+%d), view %d, last block %s",
                self.store.height,
                self.store.height - self.logged_height,
                self.core.view,
                self.store.last_hash.hex()[:16],
            )
            self.last_progress_log = moment
            self.logged_height = self.store.height

    # ---- clients ----

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        try:
            address = address_key(str(stream.socket.getpeername()[0]))
        except OSError:
            await stream.aclose()
            return  # already gone
        connection = ClientConnection(
            FrameQueue(CLIENT_QUEUE_FRAMES_MAX, CLIENT_QUEUE_BYTES_MAX),
            ByteBudget(self.blocks_response_size_max, parent=self.client_blocks_budget),
            ledger_answers=self.ledger_answer_budgets.for_address(address, trio.current_time()),
        )
        admitted, evicted = self.clients.admit(connection, address)
        if evicted is not None:
            evicted.close()
        if not admitted:
            if self._rejection_log_allowed():
                log.warning(
                    "refused a client connection from %s: %d open from there, %d in all",
                    address,
                    self.clients.count(address),
                    len(self.clients),
                )
            await stream.aclose()
            return
        # Frames from a client are requests and queries of a few KiB (ledger/sizes.py): a small
        # limit keeps what one connection can make us buffer small.
        framed = FramedStream(stream, CLIENT_FRAME_SIZE_MAX, receive_chunk_size=CLIENT_RECEIVE_CHUNK_SIZE)
        try:
            with connection.cancel_scope:
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(connection.queue.pump, framed, 256, CLIENT_WRITE_TIMEOUT_S)
                    await self._read_client(framed, connection)
                    nursery.cancel_scope.cancel()
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client went away, or stopped reading
        except* FrameError as group:
            log.warning("dropped a client: %s", group.exceptions[0])
        except* Exception as group:
            # A bug in serving one client must not take the replica down with it.
            log.error("internal error serving a client", exc_info=group)
        finally:
            connection.close()
            self.clients.remove(connection)
            for account in connection.accounts:
                followers = self.subscribers.get(account)
                if followers is not None:
                    followers.discard(connection)
                    if not followers:
                        del self.subscribers[account]

    def _subscribe(self, connection: ClientConnection, account: bytes) -> None:
        if account in connection.accounts or len(connection.accounts) >= SUBSCRIPTIONS_PER_CONNECTION_MAX:
            return
        connection.accounts.add(account)
        self.subscribers.setdefault(account, set()).add(connection)

    async def _read_client(self, framed: FramedStream, connection: ClientConnection) -> None:
        """Serve frames until the client closes, or sends no complete frame for too long: within
        the first-frame timeout of connecting, then within the idle timeout of its last frame."""
        protocol = self.network.protocol
        timeout_s = protocol.client_first_frame_timeout_ms / 1000
        while True:
            if connection.closed:
                return  # evicted or closed: what it had sent and we had not read yet is dropped
            if framed.has_frame:
                # A frame already read needs no wait, so no timeout scope: a scope per frame was
                # a few percent of a replica's CPU under load.
                data = await framed.receive()
            else:
                with trio.move_on_after(timeout_s) as waiting:
                    data = await framed.receive()
                if waiting.cancelled_caught:
                    self.clients_timed_out += 1
                    return
            if data is None:
                return
            connection.last_frame_s = trio.current_time()
            timeout_s = protocol.client_idle_timeout_ms / 1000
            try:
                message = decode_message(data)
            except CodecError as error:
                connection.send(ErrorReply(b"", f"malformed message: {error}"))
                continue
            try:
                await self._answer_client_message(connection, message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise
            except Exception as error:  # noqa: BLE001 - one request's failure must not end the connection or the replica
                self.metrics.client_errors.inc()
                if self.client_error_log.allowed():
                    log.error("internal error answering a client's %s: %r", message.TAG, error, exc_info=error)
                connection.send(ErrorReply(b"", f"internal error answering {message.TAG}"))

    async def _answer_client_message(self, connection: ClientConnection, message: Any) -> None:
        if isinstance(message, Request):
            await self._client_request(connection, message)
        elif isinstance(message, Subscribe):
            for account in message.accounts:
                self._subscribe(connection, account)
        elif isinstance(message, Query):
            connection.send(self._answer_query(message))
        elif isinstance(message, StatusQuery):
            connection.send(self._status(message.query_id))
        elif isinstance(message, FetchBlocks) and self._pruned_below(message.from_height):
            connection.send(ErrorReply(b"", pruned_reason(self.store.first_height)))
        elif isinstance(message, FetchBlocks):
            # One response may wait per connection, and a few across all clients: a client
            # that asks again before the last answer was written (it may read the answer
            # before our write has returned) or while others hold the shared budget waits,
            # reading nothing more meanwhile; nothing is read from disk until there is room.
            with trio.move_on_after(CLIENT_WRITE_TIMEOUT_S):
                await connection.blocks_budget.wait_for_room(self.blocks_response_size_max)
            if connection.blocks_budget.free() >= self.blocks_response_size_max:
                encoded = self._encoded_blocks(message)
                if self.traitor is not None:
                    encoded = self._traitor_blocks(-1, encoded)
                payload = encode_blocks_message(encoded, self.core.stable_checkpoint)
                connection.send_encoded(payload, connection.blocks_budget)
            else:
                connection.dropped += 1
        else:
            connection.send(ErrorReply(b"", f"unexpected message {message.TAG!r} from a client"))

    async def _client_request(self, connection: ClientConnection, request: Request) -> None:
        transaction = request.transaction
        self._subscribe(connection, transaction.sender)
        # Only a transaction whose nonce is used can be in the ledger (the store is never ahead
        # of the core's state, and nonces only grow): a fresh one costs no query of the store.
        used = self.core.application.check(transaction) is not None
        if used:
            # Exactly-once: a retransmitted request is answered, never re-executed: with the REPLY
            # sent when its block was written, if it is recent (no read, decode or signature) ...
            payload = self.recent_replies.get(transaction.transaction_id)
            if payload is not None:
                connection.send_encoded(payload)
                return
        location = self.store.locate_transaction(transaction.transaction_id) if used else None
        if location is not None:
            # ... or from the ledger, within the budget of the connection's address: each answer reads and decodes
            # a whole block and signs its batch reply again.
            if not connection.ledger_answers.take(trio.current_time()):
                self.retransmits_unanswered += 1
                return
            height, index = location
            block = self.store.block(height)
            if block is not None:
                reply: Reply | None = self.core.signed_reply(block, index)
                if self.traitor is not None and reply is not None:
                    reply = self.traitor.reply(reply, self._traitor_now_ms())
                if reply is not None:
                    connection.send(reply)
                return
        self.waiting_requests[transaction.transaction_id] = connection
        self.known_transactions.add(transaction)
        if self.stage_trace is not None:
            self.stage_trace.request(transaction.transaction_id)
        if len(self.waiting_requests) > WAITING_REQUESTS_MAX:
            self.waiting_requests.popitem(last=False)
        await self._queue_event(("request", None, transaction))

    def _pruned_below(self, height: int) -> bool:
        """Whether block `height` is below the ones this store keeps (a client is told so; a peer
        fetching is served what is kept, from the base on)."""
        return self.store.base_height > 0 and height < self.store.first_height

    def _answer_query(self, query: Query) -> QueryReply:
        unsigned = answer_query(
            query,
            self.config.replica_id,
            self.core.application,
            self.core.height,
            self.store,
            self._evidence,
            self.store.first_height if self.store.base_height else 1,
        )
        return dataclasses.replace(unsigned, signature=self.key.sign(self.query_domain, unsigned.signed_bytes()))

    def _status(self, query_id: int) -> StatusReply:
        # The tip on disk, not the core's: while a round's blocks are being written (on a worker
        # thread) the core is ahead, and a client told height h must be able to fetch block h
        # (a fault test saw status 50 and then only 13 blocks served, 36 ms after a catch-up).
        # Read as one pair: the write thread may move it between two reads.
        height, last_hash = self.store.tip
        return StatusReply(
            query_id,
            self.config.replica_id,
            self.core.view,
            self.core.primary,
            height,
            last_hash,
            self.core.low,
            not self.core.view_active,
            tuple(sorted(self.transport.duplicate_identities().items())),
            self.evidence_count,
            self.version,
            int(time.monotonic() - self.started_monotonic_s),
            len(self.transport.connected_out & self.transport.connected_in),
            self.store.size_bytes(),
            self.store.base_height,
        )

    def _evidence(self, replica_id: int | None, limit: int) -> list[Evidence]:
        return self.store.evidence(replica_id, limit)


async def serve_replica(
    config: ReplicaConfig, traitor: tuple[BehaviourSpec, ...] = (), traitor_seed: int = 0, trace_stages: bool = False
) -> None:
    """Run one replica until SIGINT or SIGTERM, then shut down cleanly; with `traitor`, as a
    traitor replica running those behaviours (for attack tests)."""
    runtime = ReplicaRuntime(config, traitor, traitor_seed, trace_stages)
    started = False
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(runtime.run)
                started = True
                async for signal_number in signals:
                    log.info("replica %d stopping on %s", config.replica_id, signal.Signals(signal_number).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        height = runtime.store.height
        runtime.close()
        if started:  # a replica that never started fails with one line on stderr, nothing more
            log.info("replica %d stopped at height %d", config.replica_id, height)


def first_leaf(error: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def run_replica_main(
    config_path: Path,
    traitor: tuple[BehaviourSpec, ...] = (),
    traitor_seed: int = 0,
    profile_path: Path | None = None,
    trace_stages: bool = False,
) -> int:
    """Run one replica (with `profile_path`, under cProfile, writing pstats there when it stops)."""
    profiler = cProfile.Profile() if profile_path is not None else None
    try:
        config = load_replica_config(config_path)
        if profiler is not None:
            profiler.enable()
        try:
            if trace_stages:
                logging.getLogger("node.stages").setLevel(logging.INFO)
            trio.run(serve_replica, config, traitor, traitor_seed, trace_stages)
        finally:
            if profiler is not None:
                profiler.disable()
                try:
                    profiler.dump_stats(profile_path)
                except OSError as error:
                    print(f"ledger-node: cannot write the profile to {profile_path}: {error.strerror or error}", file=sys.stderr)
    except BaseException as group:  # noqa: BLE001 - unwrapped to one clear line below
        error = first_leaf(group)
        if isinstance(error, DirectoryInUse):
            print(f"ledger-node: replica data directory {error}", file=sys.stderr)
            return 1
        if isinstance(error, ConfigError | StartupError | ListenError):
            print(f"ledger-node: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):
            print(f"ledger-node: cannot listen: {error}", file=sys.stderr)
            return 2
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise
    return 0
