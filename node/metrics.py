"""A replica's Prometheus metrics (its own CollectorRegistry, no global state) and /health, served over HTTP."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.registry import Collector

from ledger.blocks import Block
from ledger.config import Address
from ledger.messages import PrePrepare
from node.http import HttpRequest, HttpResponse, HttpServer
from node.log_format import LogRateLimit
from node.transport import ListenError, listen

if TYPE_CHECKING:
    from node.core import ReplicaCore
    from node.effects import Send
    from node.runtime import ReplicaRuntime

# Upper bounds of the histograms' buckets.
COMMIT_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 400, 1000, 2000, 5000, 10_000)
# Sequences whose first PRE-PREPARE time is kept until they commit: the log window is at most a
# few hundred sequences, so this many leaves room while a traitor cannot make the table grow.
PRE_PREPARES_TRACKED_MAX = 4096
# A scrape renders in about 1.6 ms of the event loop: a rendering is reused for this long, so a
# client scraping in a loop costs the replica a few renderings a second, not one per request.
SCRAPE_CACHE_S = 0.25
SCRAPE_CACHE_FORMATS_MAX = 4  # Accept may name versions at will: only the latest few are kept

log = logging.getLogger("node.metrics")


@dataclass(frozen=True, slots=True)
class ReplicaSnapshot:
    """What a scrape or a health probe reads of a replica's state, at that moment."""

    replica_id: int
    serving: bool
    height: int
    view: int
    view_active: bool
    peers_connected: int
    peers_needed: int  # a quorum, counting this replica: quorum - 1 others
    peers_total: int
    rejections: dict[str, int]
    request_queue_depth: int
    event_queue_depth: int
    client_connections: int
    evidence_stored: int
    clients_timed_out: int
    fetches_skipped: int
    base_height: int = 0  # the first block kept when not all are (pruned, or from a snapshot); 0: all
    retransmits_unanswered: int = 0  # retransmitted requests over their address's ledger-answer budget
    late_votes: int = 0  # votes after their slot's quorum, not checked (node/core.py _late_vote)


def runtime_snapshot(runtime: ReplicaRuntime) -> ReplicaSnapshot:
    network = runtime.network
    transport = runtime.transport
    return ReplicaSnapshot(
        replica_id=runtime.config.replica_id,
        serving=runtime.metrics.serving,
        height=runtime.core.height,
        view=runtime.core.view,
        view_active=runtime.core.view_active,
        # Connected both ways, as the status reply counts them.
        peers_connected=len(transport.connected_out & transport.connected_in),
        peers_needed=network.quorum - 1,
        peers_total=network.replica_count - 1,
        rejections=dict(runtime.core.counters),
        request_queue_depth=len(runtime.core.pending),
        event_queue_depth=runtime.events_send.statistics().current_buffer_used,
        client_connections=len(runtime.clients),
        evidence_stored=runtime.evidence_count,
        clients_timed_out=runtime.clients_timed_out,
        fetches_skipped=runtime.fetches_skipped,
        retransmits_unanswered=runtime.retransmits_unanswered,
        base_height=runtime.store.base_height,
        late_votes=runtime.core.late_votes,
    )


class _StateCollector(Collector):
    """The metrics read from the replica's state at scrape time (the core keeps them already)."""

    def __init__(self, snapshot: Callable[[], ReplicaSnapshot]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        """The families without reading the replica (the registry asks when this is registered)."""
        return self._families(ReplicaSnapshot(0, False, 0, 0, False, 0, 0, 0, {}, 0, 0, 0, 0, 0, 0))

    def collect(self) -> Iterable[Metric]:
        return self._families(self.snapshot())

    def _families(self, state: ReplicaSnapshot) -> Iterable[Metric]:
        yield GaugeMetricFamily("ledger_height", "Height of the last block in this replica's chain.", state.height)
        yield GaugeMetricFamily(
            "ledger_base_height", "The first block this replica keeps (0: it keeps every block from 1).", state.base_height
        )
        yield GaugeMetricFamily("ledger_view", "The view this replica is in.", state.view)
        yield GaugeMetricFamily("ledger_view_active", "1 in normal operation, 0 during a view change.", int(state.view_active))
        yield GaugeMetricFamily("ledger_peers_connected", "Peers connected both ways.", state.peers_connected)
        yield GaugeMetricFamily("ledger_peers", "Peers this replica has (n - 1).", state.peers_total)
        rejections = CounterMetricFamily(
            "ledger_rejections", "Messages and requests the core refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(state.rejections.items()):
            rejections.add_metric([reason], count)
        yield rejections
        yield GaugeMetricFamily(
            "ledger_request_queue_depth", "Client requests waiting to be proposed or executed.", state.request_queue_depth
        )
        yield GaugeMetricFamily(
            "ledger_event_queue_depth", "Peer messages and requests waiting for the event loop.", state.event_queue_depth
        )
        yield GaugeMetricFamily("ledger_client_connections", "Open client connections.", state.client_connections)
        yield GaugeMetricFamily("ledger_evidence_stored", "Pieces of equivocation evidence stored.", state.evidence_stored)
        yield CounterMetricFamily(
            "ledger_clients_timed_out", "Client connections closed for sending no frame in time.", state.clients_timed_out
        )
        yield CounterMetricFamily(
            "ledger_fetches_skipped", "Block fetches from peers not answered: their queue was full.", state.fetches_skipped
        )
        yield CounterMetricFamily(
            "ledger_retransmits_unanswered",
            "Retransmitted requests for old transactions dropped: over their address's budget of answers read from the ledger.",
            state.retransmits_unanswered,
        )
        yield CounterMetricFamily(
            "ledger_late_votes",
            "PREPAREs and COMMITs that matched a slot already past its quorum: not checked, kept for evidence only.",
            state.late_votes,
        )


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    body: dict[str, Any]


def health_of(state: ReplicaSnapshot) -> Health:
    """Healthy when serving and connected to enough peers to make a quorum with them."""
    body: dict[str, Any] = {"status": "ok", "height": state.height, "view": state.view, "peers": state.peers_connected}
    if state.base_height:
        body["base_height"] = state.base_height  # a pruned replica: blocks below it are not served
    reason = None
    if not state.serving:
        reason = "not serving yet"
    elif state.peers_connected < state.peers_needed:
        reason = (
            f"connected to {state.peers_connected} of {state.peers_total} peers, "
            f"{state.peers_needed} needed for a quorum"
        )
    if reason is not None:
        body["status"] = "unavailable"
        body["reason"] = reason
    return Health(reason is None, body)


@dataclass(eq=False)
class ReplicaMetrics:
    """The registry of one replica, the counters and histograms the runtime feeds, and the HTTP answers.
    Latency is measured here, by the runtime's clock: the core has none."""

    snapshot: Callable[[], ReplicaSnapshot]
    clock: Callable[[], float] = time.monotonic
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    serving: bool = False
    pre_prepare_seen_s: dict[int, float] = field(default_factory=dict)
    last_view: int | None = None
    swept_at_height: int = -1
    failures: int = 0
    failure_log: LogRateLimit = field(default_factory=lambda: LogRateLimit(log, 1))
    rendered: dict[str, tuple[float, bytes]] = field(default_factory=dict)  # content type -> (when, body)

    def __post_init__(self) -> None:
        registry = self.registry
        self.blocks_committed = Counter(
            "ledger_blocks_committed", "Blocks this process added to its chain (executed or fetched).", registry=registry
        )
        self.transactions_committed = Counter(
            "ledger_transactions_committed", "Transactions in the blocks this process added to its chain.", registry=registry
        )
        self.view_changes = Counter("ledger_view_changes", "Times this replica moved to a higher view.", registry=registry)
        self.client_errors = Counter(
            "ledger_client_internal_errors", "Client messages whose handling failed inside the replica.", registry=registry
        )
        self.batch_size = Histogram(
            "ledger_batch_size_transactions", "Transactions per committed block.", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.commit_latency = Histogram(
            "ledger_commit_latency_seconds",
            "From the first PRE-PREPARE this replica sent or accepted for a sequence to that block's commit here.",
            buckets=COMMIT_LATENCY_BUCKETS_S,
            registry=registry,
        )
        registry.register(_StateCollector(self.snapshot))

    # ---- fed by the runtime ----

    def pre_prepare_seen(self, sequence: int, height: int) -> None:
        if sequence <= height or sequence in self.pre_prepare_seen_s:
            return
        if len(self.pre_prepare_seen_s) >= PRE_PREPARES_TRACKED_MAX:
            # Sweep what the chain has passed (e.g. blocks that came by state transfer), at most
            # once a height: a full table of live entries costs nothing more per message.
            if height != self.swept_at_height:
                self.swept_at_height = height
                self.pre_prepare_seen_s = {known: moment for known, moment in self.pre_prepare_seen_s.items() if known > height}
            if len(self.pre_prepare_seen_s) >= PRE_PREPARES_TRACKED_MAX:
                return
        self.pre_prepare_seen_s[sequence] = self.clock()

    def pre_prepare_received(self, message: Any, core: ReplicaCore) -> None:
        """After the core took a peer's message: a PRE-PREPARE it accepted starts its sequence's clock."""
        if type(message) is PrePrepare:
            slot = core.slots.get(message.sequence)
            if slot is not None and slot.pre_prepare is not None:
                self.pre_prepare_seen(message.sequence, core.height)

    def round_done(self, sends: Iterable[Send], blocks: list[Block], view: int, height: int) -> None:
        """After a round's effects were carried out: its own PRE-PREPAREs, its commits, the view.
        Called from the event loop: a failure here is logged and counted, never let through to stop it."""
        try:
            self._round_done(sends, blocks, view, height)
        except Exception as error:  # noqa: BLE001 - metrics must never stop consensus
            self.failures += 1
            if self.failure_log.allowed():
                log.error("internal error updating metrics (%d so far): %r", self.failures, error, exc_info=error)

    def _round_done(self, sends: Iterable[Send], blocks: list[Block], view: int, height: int) -> None:
        for send in sends:
            if type(send.message) is PrePrepare:
                self.pre_prepare_seen(send.message.sequence, height)
        if blocks:
            moment = self.clock()
            for block in blocks:
                count = len(block.transactions)
                self.blocks_committed.inc()
                self.transactions_committed.inc(count)
                self.batch_size.observe(count)
                started = self.pre_prepare_seen_s.pop(block.header.height, None)
                if started is not None:
                    self.commit_latency.observe(max(0.0, moment - started))
        if self.last_view is not None and view > self.last_view:
            self.view_changes.inc()
        self.last_view = view

    # ---- HTTP ----

    def metrics_response(self, request: HttpRequest) -> HttpResponse:
        encoder: Callable[[Any], bytes]
        try:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        except (TypeError, ValueError):
            # prometheus_client raises on some malformed versions in Accept: answer the classic format.
            encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
        moment = self.clock()
        cached = self.rendered.get(content_type)
        if cached is not None and 0 <= moment - cached[0] < SCRAPE_CACHE_S:
            return HttpResponse(200, cached[1], content_type)
        body = encoder(self.registry)
        self.rendered.pop(content_type, None)
        if len(self.rendered) >= SCRAPE_CACHE_FORMATS_MAX:
            del self.rendered[next(iter(self.rendered))]  # the oldest rendering
        self.rendered[content_type] = (moment, body)
        return HttpResponse(200, body, content_type)

    def health_response(self, request: HttpRequest) -> HttpResponse:
        health = health_of(self.snapshot())
        body = (json.dumps(health.body, sort_keys=True) + "\n").encode()
        return HttpResponse(200 if health.healthy else 503, body, "application/json")

    def server(self) -> HttpServer:
        return HttpServer({"/metrics": self.metrics_response, "/health": self.health_response})


async def serve_metrics(
    metrics: ReplicaMetrics, address: Address, task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on `address` and serve /metrics and /health until cancelled."""
    server = metrics.server()
    try:
        listeners = await listen(address)
    except ListenError as error:
        raise ListenError(f"metrics: {error}") from None
    task_status.started(server)
    await trio.serve_listeners(server.serve, listeners)

