"""The Trio shell around one replica core: IO only (network, disk, clock), never protocol decisions."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ledger.application import AccountsApplication
from ledger.blocks import Block, ChainError, verify_execution
from ledger.config import ConfigError, ReplicaConfig, load_replica_config
from ledger.crypto import KeyFileError, read_key_file, signing_domain
from ledger.encoding import CodecError
from ledger.framing import FramedStream, FrameError, FrameQueue
from ledger.messages import (
    BLOCKS_PER_RESPONSE_MAX,
    Blocks,
    ErrorReply,
    FetchBlocks,
    Query,
    QueryReply,
    Request,
    StatusQuery,
    StatusReply,
    Subscribe,
    decode_message,
    encode_message,
)
from ledger.storage import BlockStore, StoreError
from node.core import LOG_KINDS, Effects, ReplicaCore
from node.queries import answer_query
from node.transport import PeerTransport

EVENT_QUEUE_MAX = 10_000
WAITING_REQUESTS_MAX = 10_000
EVENTS_PER_ROUND_MAX = 512
CLIENT_QUEUE_FRAMES_MAX = 4096
SUBSCRIPTIONS_PER_CONNECTION_MAX = 4096
PROGRESS_LOG_INTERVAL_S = 5.0
REJECTIONS_LOGGED_PER_SECOND = 20

log = logging.getLogger("node.replica")


class StartupError(RuntimeError):
    """The replica cannot start: bad config, key, or store. The message says what to fix."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def replay_chain(store: BlockStore, application: AccountsApplication) -> int:
    """Re-execute every stored block, checking results and state digests match what was stored.
    Returns the latest block timestamp (new proposals must not go back before it)."""
    latest_timestamp_ms = 0
    for block in store.iterate_blocks():
        try:
            verify_execution(application, block)
        except ChainError as error:
            raise StoreError(f"{store.path}: {error}") from None
        latest_timestamp_ms = max(latest_timestamp_ms, block.header.timestamp_ms)
    return latest_timestamp_ms


@dataclass(eq=False)
class ClientConnection:
    """One client's connection: a bounded queue of frames to write, and the accounts it follows."""

    queue: FrameQueue
    accounts: set[bytes] = field(default_factory=set)
    dropped: int = 0

    def send(self, message: Any) -> None:
        if not self.queue.put(encode_message(message)):
            self.dropped += 1  # a client that does not read loses replies; it retries


class ReplicaRuntime:
    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.network = config.network
        try:
            self.key = read_key_file(config.key_path)
        except KeyFileError as error:
            raise StartupError(str(error)) from None
        if self.key.public_key != self.network.replicas[config.replica_id].public_key:
            raise StartupError(f"{config.key_path}: this key is not replica {config.replica_id}'s key in {config.path}")
        try:
            self.store = BlockStore.open(config.data_dir / "ledger.sqlite3", self.network.genesis_hash)
            application = AccountsApplication(self.network.genesis_balances)
            last_timestamp_ms = replay_chain(self.store, application)
            restored = [(record[0], decode_message(record[3])) for record in self.store.load_messages()]
        except (StoreError, CodecError) as error:
            raise StartupError(f"{error} (the store is damaged: restore it from a backup or remove it to resync from peers)") from None
        self.core = ReplicaCore(
            self.network,
            config.replica_id,
            self.key,
            application,
            self.store.height,
            self.store.last_hash,
            restored,
            last_timestamp_ms=last_timestamp_ms,
        )
        self.query_domain = signing_domain(self.network.network_id, "query-reply")
        self.events_send, self.events_receive = trio.open_memory_channel[tuple[str, Any, Any]](EVENT_QUEUE_MAX)
        self.transport = PeerTransport(self.network, config.replica_id, self.key, self._deliver_from_peer)
        self.clients: set[ClientConnection] = set()
        self.subscribers: dict[bytes, set[ClientConnection]] = {}
        # Which connection sent a request, so a refusal reaches it; oldest forgotten first.
        self.waiting_requests: OrderedDict[bytes, ClientConnection] = OrderedDict()
        self.last_progress_log = 0.0
        self.rejection_log_second = 0
        self.rejections_logged = 0
        self.rejections_suppressed = 0
        self.logged_height = self.store.height

    # ---- lifecycle ----

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        replica = self.network.replicas[self.config.replica_id]
        async with trio.open_nursery() as nursery:
            await nursery.start(self.transport.run)
            client_listeners = await trio.open_tcp_listeners(replica.client_address.port, host=replica.client_address.host)
            nursery.start_soon(trio.serve_listeners, self._serve_client, client_listeners)
            nursery.start_soon(self._event_loop)
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
            task_status.started()

    def close(self) -> None:
        self.store.close()

    async def _deliver_from_peer(self, peer: int, message: Any) -> None:
        await self.events_send.send(("peer", peer, message))

    # ---- the event loop: feed the core, carry out its effects ----

    async def _event_loop(self) -> None:
        tick_s = max(self.network.protocol.batch_wait_ms, 2) / 1000
        while True:
            with trio.move_on_after(tick_s):
                event = await self.events_receive.receive()
                self._handle(event)
                # Drain what else is queued so one disk write and one send round cover many events.
                for _ in range(EVENTS_PER_ROUND_MAX):
                    try:
                        event = self.events_receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._handle(event)
            self.core.tick(now_ms())
            await self._carry_out(self.core.take_effects())
            await trio.sleep(0)

    def _handle(self, event: tuple[str, Any, Any]) -> None:
        kind, origin, message = event
        if kind == "peer":
            if isinstance(message, FetchBlocks):
                self._serve_fetch(origin, message)
            else:
                self.core.receive_message(origin, message)
        elif kind == "request":
            self.core.receive_request(message)

    def _serve_fetch(self, peer: int, request: FetchBlocks) -> None:
        blocks = self._blocks_for_response(request)
        if blocks:
            self.transport.send(peer, Blocks(tuple(blocks), self.core.stable_checkpoint))

    def _blocks_for_response(self, request: FetchBlocks) -> list[Block]:
        budget = self.network.protocol.frame_size_max // 2
        blocks: list[Block] = []
        for block in self.store.blocks(request.from_height, min(request.count, BLOCKS_PER_RESPONSE_MAX)):
            budget -= len(block.encode())
            if blocks and budget < 0:
                break
            blocks.append(block)
        return blocks

    async def _carry_out(self, effects: Effects) -> None:
        """Persist (records and blocks, one transaction), then send, then reply: the order that
        keeps restarts safe. The write runs on a worker thread, so its fsync does not stall the
        connections; events arriving meanwhile wait in the queue and make the next round bigger."""
        if not effects:
            return
        if effects.persist or effects.blocks or effects.prune is not None:
            records = [
                (record.kind, record.view, record.sequence, encode_message(record.message)) for record in effects.persist
            ]
            prune = None if effects.prune is None else (effects.prune.through_sequence, effects.prune.view, LOG_KINDS)
            await trio.to_thread.run_sync(self.store.write_round, records, effects.blocks, prune)
            if effects.blocks:
                self._log_progress()
        for send in effects.send:
            self.transport.send(send.to, send.message)
        for client_reply in effects.replies:
            for connection in self.subscribers.get(client_reply.account, ()):
                connection.send(client_reply.reply)
            self.waiting_requests.pop(client_reply.reply.transaction_id, None)
        for transaction_id, reason in effects.request_errors:
            connection = self.waiting_requests.pop(transaction_id, None)
            if connection is not None:
                connection.send(ErrorReply(transaction_id, reason))
        for line in effects.events:
            if not line.startswith("rejected"):
                log.info("%s", line)
            elif self._rejection_log_allowed():
                log.warning("%s", line)

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
        if len(self.clients) >= self.network.protocol.client_connections_max:
            log.warning("refused a client connection: %d already open", len(self.clients))
            await stream.aclose()
            return
        frame_size_max = self.network.protocol.frame_size_max
        connection = ClientConnection(FrameQueue(CLIENT_QUEUE_FRAMES_MAX, 2 * frame_size_max))
        self.clients.add(connection)
        framed = FramedStream(stream, self.network.protocol.frame_size_max)
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(connection.queue.pump, framed)
                await self._read_client(framed, connection)
                nursery.cancel_scope.cancel()
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except* FrameError as group:
            log.warning("dropped a client: %s", group.exceptions[0])
        except* Exception as group:
            # A bug in serving one client must not take the replica down with it.
            log.error("internal error serving a client", exc_info=group)
        finally:
            self.clients.discard(connection)
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
        while True:
            data = await framed.receive()
            if data is None:
                return
            try:
                message = decode_message(data)
            except CodecError as error:
                connection.send(ErrorReply(b"", f"malformed message: {error}"))
                continue
            if isinstance(message, Request):
                await self._client_request(connection, message)
            elif isinstance(message, Subscribe):
                for account in message.accounts:
                    self._subscribe(connection, account)
            elif isinstance(message, Query):
                connection.send(self._answer_query(message))
            elif isinstance(message, StatusQuery):
                connection.send(self._status(message.query_id))
            elif isinstance(message, FetchBlocks):
                # One response's worth may wait at a time: a client that asks and never reads
                # gets nothing more, instead of filling our memory.
                if connection.queue.queued_bytes < self.network.protocol.frame_size_max // 2:
                    connection.send(Blocks(tuple(self._blocks_for_response(message)), self.core.stable_checkpoint))
                else:
                    connection.dropped += 1
            else:
                connection.send(ErrorReply(b"", f"unexpected message {message.TAG!r} from a client"))

    async def _client_request(self, connection: ClientConnection, request: Request) -> None:
        transaction = request.transaction
        self._subscribe(connection, transaction.sender)
        location = self.store.locate_transaction(transaction.transaction_id)
        if location is not None:
            # Exactly-once: a retransmitted request is answered from the ledger, never re-executed.
            height, index = location
            block = self.store.block(height)
            if block is not None:
                connection.send(self.core.signed_reply(block, index))
                return
        self.waiting_requests[transaction.transaction_id] = connection
        if len(self.waiting_requests) > WAITING_REQUESTS_MAX:
            self.waiting_requests.popitem(last=False)
        await self.events_send.send(("request", None, transaction))

    def _answer_query(self, query: Query) -> QueryReply:
        unsigned = answer_query(query, self.config.replica_id, self.core.application, self.core.height, self.store)
        return dataclasses.replace(unsigned, signature=self.key.sign(self.query_domain, unsigned.signed_bytes()))

    def _status(self, query_id: int) -> StatusReply:
        return StatusReply(
            query_id,
            self.config.replica_id,
            self.core.view,
            self.core.primary,
            self.core.height,
            self.core.last_block_hash,
            self.core.low,
            not self.core.view_active,
        )


async def serve_replica(config: ReplicaConfig) -> None:
    """Run one replica until SIGINT or SIGTERM, then shut down cleanly."""
    runtime = ReplicaRuntime(config)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(runtime.run)
                async for signal_number in signals:
                    log.info("replica %d stopping on %s", config.replica_id, signal.Signals(signal_number).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        runtime.close()
        log.info("replica %d stopped at height %d", config.replica_id, runtime.store.height)


def first_leaf(error: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def run_replica_main(config_path: Path) -> int:
    try:
        config = load_replica_config(config_path)
        trio.run(serve_replica, config)
    except BaseException as group:  # noqa: BLE001 - unwrapped to one clear line below
        error = first_leaf(group)
        if isinstance(error, ConfigError | StartupError):
            print(f"ledger-node: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):
            print(f"ledger-node: cannot listen: {error}", file=sys.stderr)
            return 2
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise
    return 0
