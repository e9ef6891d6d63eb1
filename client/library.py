"""The client library: submit transactions and read state, trusting only f + 1 (or a quorum of) signed replies.

    async with open_client("net/client.toml") as client:
        receipt = await client.transfer(recipient, 10)

`SyncClient` wraps the same for scripts that do not use Trio.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from client.quorum import BatchSignatures, QueryQuorum, Receipt, ReplyQuorum
from ledger.application import AccountsApplication
from ledger.blocks import (
    Block,
    ChainError,
    verify_block_contents,
    verify_certificate,
    verify_chain_segment,
    verify_execution,
)
from ledger.config import ClientConfig, load_client_config
from ledger.crypto import PublicKeyCache, SigningKey, read_key_file, signing_domain
from ledger.encoding import CodecError, array_head, decode, encode
from ledger.evidence import Evidence
from ledger.framing import FramedStream, FrameError, FrameQueue
from ledger.messages import (
    BLOCKS_PER_RESPONSE_MAX,
    KEY_PREFIX_MATCHES_MAX,
    PRUNED,
    QUERY_NONCE_SIZE,
    SUBSCRIBE_ACCOUNTS_MAX,
    TRANSACTION_PREFIX_MATCHES_MAX,
    BatchReply,
    Blocks,
    CheckpointCertificate,
    ErrorReply,
    FetchBlocks,
    Query,
    QueryReply,
    Reply,
    Request,
    StatusQuery,
    StatusReply,
    Subscribe,
    checkpoint_certificate_signers_problem,
    decode_message_items,
    encode_message,
    message_from_items,
    pruned_from_height,
    reply_transaction_id,
)
from ledger.receipts import (
    ReceiptError,
    TransactionReceipt,
    build_receipt,
    not_outcome_problem,
    verify_receipt,
)
from ledger.transactions import (
    KEY_LENGTH_MAX,
    VALUE_LENGTH_MAX,
    Operation,
    Put,
    Transaction,
    Transfer,
    operation_from_plain,
    sign_transaction,
)

CONNECT_BACKOFF_S = (0.05, 1.0)
QUERY_RETRY_S = (0.05, 1.0)  # first and longest pause before asking again when no answer reached a quorum
TRANSIENT_REFUSAL = "replica busy"
ZERO_ACCOUNT = bytes(32)
QUERY_DEADLINE_S = 15.0
EVIDENCE_PER_ANSWER_MAX = 1024  # entries read from one replica's evidence answer (it sends at most 256)
SUBMIT_DEADLINE_S = 30.0
REFUSAL_SHOWN_LENGTH_MAX = 200
SEND_QUEUE_MAX = 1024
# A REPLY frame is an array of the tag and six fields, the batch reply first, then the transaction
# id (a byte string of 32) and four more (client/library.py ReplicaLink.receive_frame reads them so).
REPLY_FRAME_HEAD = array_head(7) + encode(Reply.TAG)
REPLY_TAIL_HEAD = array_head(5)
TRANSACTION_ID_HEAD = encode(bytes(32))[:2]
TRANSACTION_ID_SIZE = 32
# verify: how long a replica whose chain is shorter than the vouched height may take to catch up.
CHAIN_CATCH_UP_S = 5.0
CHAIN_CATCH_UP_POLL_S = 0.2
HEIGHT_BEYOND_ANY = 2**62  # a block height no ledger reaches (heights are SQLite's 64-bit integers)
T = TypeVar("T")


def check_operation(operation: Operation) -> None:
    """Refuse, before anything is sent, what every replica would refuse to decode (an empty or
    over-long key, an over-long value) and a transfer to the all-zero account, which no one can
    spend from: those funds would be lost for good."""
    try:
        operation_from_plain(operation.to_plain())
    except CodecError as error:
        raise InvalidRequest(str(error)) from None
    if isinstance(operation, Transfer) and operation.recipient == ZERO_ACCOUNT:
        raise InvalidRequest("transfer to the all-zero account: nobody holds its key, so the funds would be lost")


class ClientError(Exception):
    """Base of the errors a client call can raise."""


class NetworkUnavailable(ClientError):
    """Not enough replicas answered in time."""


class InvalidRequest(ClientError):
    """The client can tell by itself that the network would refuse this (or that it burns funds)."""


class NoSuchBlock(ClientError):
    """f + 1 replicas (one of them honest) say the ledger does not reach that height."""


class HistoryPruned(ClientError):
    """Replicas refused a read because the blocks it needs are below the ones they keep
    (retain_blocks, or a start from a snapshot). `kept_from_height`: the first block kept, as the
    refusal names it (unverified: a hint), or None."""

    def __init__(self, message: str, kept_from_height: int | None = None) -> None:
        super().__init__(message)
        self.kept_from_height = kept_from_height


class TransactionRejected(ClientError):
    """f + 1 replicas refused the transaction before ordering it (e.g. a used nonce)."""


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    replica_id: int
    reachable: bool
    view: int = 0
    primary: int = 0
    height: int = 0
    last_block_hash: bytes = b""
    stable_checkpoint: int = 0
    view_changing: bool = False
    # (replica id, connections) this replica sees from more than one process holding that key.
    duplicate_identities: tuple[tuple[int, int], ...] = ()
    evidence_count: int = 0
    version: str = ""
    uptime_s: int = 0
    connected_peers: int = 0  # peers it has an outgoing and an incoming connection with
    store_size_bytes: int = 0
    base_height: int = 0  # the first block it keeps when it does not keep all (pruned); 0: all


@dataclass(frozen=True, slots=True)
class EvidenceReport:
    """One piece of evidence as this client checked it: which replicas reported it, and whether
    each of its two signatures verifies against the offending replica's public key."""

    evidence: Evidence
    reported_by: tuple[int, ...]
    signatures_valid: tuple[bool, bool]

    @property
    def proven(self) -> bool:
        return all(self.signatures_valid) and self.evidence.first_digest != self.evidence.second_digest

@dataclass(frozen=True, slots=True)
class SignedAnswer:
    """An answer to `query` and the replies, each signed over the query's digest, that gave it."""

    query: Query
    answer: QueryReply
    replies: tuple[QueryReply, ...]


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The keys starting with `prefix` and their values, in key order, as a quorum signed them at
    `height`; `truncated`: more keys match than one answer holds (see KEY_PREFIX_MATCHES_MAX)."""

    prefix: str
    entries: tuple[tuple[str, str], ...]
    truncated: bool
    height: int


@dataclass(frozen=True, slots=True)
class ChainReport:
    replica_id: int
    height: int
    last_block_hash: bytes
    transactions: int
    # Where the audit started: 0 from genesis (every block re-executed), else the height of the
    # stable checkpoint whose certificate `checkpoint_signers` signed (checked here).
    from_height: int = 0
    checkpoint_signers: tuple[int, ...] = ()


@dataclass(eq=False, slots=True)
class Submission:
    """One transaction in flight: its reply quorum, refusals heard, and the outcome once known.

    Concurrent submits of the same transaction share one Submission and so one outcome.
    """

    transaction: Transaction
    quorum: ReplyQuorum
    refusals: dict[int, str] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Receipt | ClientError | None = None
    # The last REPLY decoded for it under a remembered batch reply: (its bytes after the batch
    # reply, that batch reply's leaf count, the reply). Honest replicas send the same bytes there
    # (the leaf and its path), so the next replica's reply is built without decoding them again.
    last_reply: tuple[bytes, int, Reply] | None = None

    def finish(self, outcome: Receipt | ClientError) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.done.set()


class ReplicaLink:
    """A connection to one replica's client port, re-dialled in the background whenever it drops."""

    def __init__(self, client: Client, replica_id: int) -> None:
        self.client = client
        self.replica_id = replica_id
        self.address = client.network.replicas[replica_id].client_address
        self.queue = FrameQueue(SEND_QUEUE_MAX, 2 * client.network.protocol.frame_size_max)
        # The last batch reply this replica sent, validated, and its encoding in that frame: a
        # replica sends one REPLY per transaction of a block, all under the same batch reply.
        self.batch: BatchReply | None = None
        self.batch_encoding = b""
        # The encoding of the batch reply of the last REPLY nobody waited for, not validated: a
        # replica that answers after f + 1 others sends a whole block of such replies, and each
        # is then dropped on its transaction id alone, not after a decode. Only ever a filter:
        # a reply someone waits for under these bytes is decoded and checked in full.
        self.late_batch_encoding = b""

    def send(self, message: Any) -> None:
        self.send_encoded(encode_message(message))

    def send_encoded(self, data: bytes) -> None:
        self.queue.put(data)  # if full, the caller's retry covers it

    async def run(self) -> None:
        backoff = CONNECT_BACKOFF_S[0]
        while True:
            try:
                stream = await trio.open_tcp_stream(self.address.host, self.address.port)
            except OSError:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, CONNECT_BACKOFF_S[1])
                continue
            backoff = CONNECT_BACKOFF_S[0]
            framed = FramedStream(stream, self.client.network.protocol.frame_size_max)
            try:
                async with stream, trio.open_nursery() as nursery:
                    accounts = self.client.accounts
                    for start in range(0, len(accounts), SUBSCRIBE_ACCOUNTS_MAX):
                        await framed.send(encode_message(Subscribe(tuple(accounts[start : start + SUBSCRIBE_ACCOUNTS_MAX]))))
                    nursery.start_soon(self.queue.pump, framed)
                    await self._read(framed)
                    nursery.cancel_scope.cancel()
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
                pass  # reconnect below
            await trio.sleep(backoff)


    async def _read(self, framed: FramedStream) -> None:
        while True:
            data = await framed.receive()
            if data is None:
                return
            self.receive_frame(data)

    def receive_frame(self, data: bytes) -> None:
        """Decode one frame from this replica and hand it on.

        Most replies arrive after their transaction was accepted (n - f - 1 of every n): dropped
        before they are validated and checked, which is most of their cost. A REPLY whose bytes
        after its head are exactly the encoding of the batch reply this replica sent last (the
        CBOR is canonical: equal bytes, equal values) reuses that batch reply, validated when it
        first came, and only its transaction id is read before the drop; the rest of it is then
        decoded and validated as any REPLY is. A replica that answers after f + 1 others sends
        a block of replies nobody waits for: the first is decoded, its batch reply's bytes kept
        unvalidated as a filter, and the rest under the same bytes are dropped on their id.
        Anything else takes the general path."""
        client = self.client
        start = len(REPLY_FRAME_HEAD)
        late = self.late_batch_encoding
        if late and data.startswith(REPLY_FRAME_HEAD) and data.startswith(late, start):
            tail = start + len(late)
            id_start = tail + len(TRANSACTION_ID_HEAD)
            if data.startswith(TRANSACTION_ID_HEAD, tail) and client.awaited_submission(data[id_start : id_start + TRANSACTION_ID_SIZE]) is None:
                client.replies_not_awaited += 1
                return
            # Awaited (or not as an honest replica encodes): the paths below decide, as for any frame.
        if self.batch is not None and data.startswith(REPLY_FRAME_HEAD) and data.startswith(self.batch_encoding, start):
            batch = self.batch
            tail = start + len(self.batch_encoding)
            if not data.startswith(TRANSACTION_ID_HEAD, tail):
                # An honest replica encodes canonically: a 32-byte id has exactly this head.
                client.ignored_messages += 1
                return
            id_start = tail + len(TRANSACTION_ID_HEAD)
            submission = client.awaited_submission(data[id_start : id_start + TRANSACTION_ID_SIZE])
            if submission is None:
                client.replies_not_awaited += 1
                return
            rest = data[tail:]
            last = submission.last_reply
            # The same bytes under a batch reply of the same leaf count: the same fields, and the
            # same validation outcome (it depends on the batch reply through its leaf count only).
            if last is not None and last[0] == rest and last[1] == batch.leaf_count:
                known = last[2]
                message: Any = Reply(batch, known.transaction_id, known.result, known.index, known.position, known.path)
            else:
                try:
                    message = Reply.from_batch_and_fields(batch, decode(REPLY_TAIL_HEAD + rest))
                except CodecError:
                    client.ignored_messages += 1
                    return
                submission.last_reply = (rest, batch.leaf_count, message)
            client._dispatch(self.replica_id, message)
            return
        try:
            items = decode_message_items(data)
            transaction_id = reply_transaction_id(items)
            if transaction_id is None:
                message = message_from_items(items)
            else:
                # Dropped before its batch reply's signature is checked. Its bytes become the
                # link's late filter only if they are shaped like a batch reply (a few hundred
                # bytes, checked before they are encoded again): found by an adversarial review,
                # a traitor's megabyte map in that slot cost a canonical re-encode (a sort of its
                # keys, 4x the decode) per frame and stayed pinned on the link. So a flood of
                # replies nobody waits for still costs a decode and a shape check, no more.
                if not client.awaits_reply(transaction_id):
                    client.replies_not_awaited += 1
                    if data.startswith(REPLY_FRAME_HEAD):
                        try:
                            late = encode(BatchReply.from_plain(items[1]).fields())
                        except CodecError:
                            return  # no batch reply: counted above, nothing remembered
                        if data.startswith(late, start):
                            self.late_batch_encoding = late
                    return
                batch = BatchReply.from_plain(items[1])
                encoding = encode(items[1])
                if data.startswith(REPLY_FRAME_HEAD) and data.startswith(encoding, start):
                    self.batch, self.batch_encoding = batch, encoding
                message = Reply.from_batch_and_fields(batch, items[2:])
        except CodecError:
            client.ignored_messages += 1
            return
        client._dispatch(self.replica_id, message)


class Client:
    """Talks to every replica of one network. Create it with `open_client`."""

    def __init__(self, config: ClientConfig, key: SigningKey | None) -> None:
        self.config = config
        self.network = config.network
        self.key = key
        self.accounts: list[bytes] = [key.public_key] if key is not None else []
        self.followed = set(self.accounts)  # the same accounts, for the check on every submit
        self.signatures = PublicKeyCache()
        # One signed batch reply covers every transaction of a block: a client with many of them
        # in flight checks each replica's signature on it once (bounded; successes only).
        self.batch_signatures = BatchSignatures(self.network, self.signatures.verify)
        self.links = [ReplicaLink(self, replica.replica_id) for replica in self.network.replicas]
        self.query_ids = itertools.count(1)
        self.view = 0
        self.next_nonce: int | None = None
        # Every read is answered from state at least this high: the height of every receipt this
        # client accepted and the vouched height of every answer it accepted (see QueryQuorum.add).
        # So it reads its own confirmed writes, and never reads older state than it already saw.
        self.read_floor = 0
        self.ignored_messages = 0
        # Replies for no transaction in flight (most: after acceptance), and frames cut short
        # inside the transaction id under a link's remembered batch reply bytes.
        self.replies_not_awaited = 0
        self._submissions: dict[bytes, Submission] = {}
        # The last refusal each replica sent that named no transaction (at most one per replica).
        self.unattributed_refusals: dict[int, str] = {}
        self._queries: dict[int, Callable[[int, Any], None]] = {}
        self._blocks: dict[int, trio.MemorySendChannel[Blocks | ErrorReply]] = {}
        self.timeout_s = self.network.protocol.request_timeout_ms / 1000

    @property
    def primary(self) -> int:
        return self.network.primary(self.view)

    # ---- incoming ----

    def awaits_reply(self, transaction_id: bytes) -> bool:
        """Whether a REPLY for this transaction could still change anything: it is in flight, undecided."""
        return self.awaited_submission(transaction_id) is not None

    def awaited_submission(self, transaction_id: bytes) -> Submission | None:
        """The submission a REPLY for this transaction could still change: in flight, undecided."""
        submission = self._submissions.get(transaction_id)
        return submission if submission is not None and submission.outcome is None else None

    def _dispatch(self, replica_id: int, message: Any) -> None:
        if isinstance(message, Reply):
            submission = self._submissions.get(message.transaction_id)
            if submission is None:
                return
            if message.replica_id != replica_id:
                self.ignored_messages += 1
                return
            if submission.outcome is not None:
                # Decided: a late reply changes nothing (not even the view or the read floor).
                self.replies_not_awaited += 1
                return
            receipt = submission.quorum.add(message)
            if receipt is not None:
                self.view = max(self.view, receipt.view)
                # f + 1 signed it, so some honest replica is at this height: a floor all can reach.
                self.raise_read_floor(receipt.height)
                submission.finish(receipt)
        elif isinstance(message, ErrorReply) and not message.transaction_id and message.reason.startswith(PRUNED):
            # A refused block fetch: the blocks asked for are pruned there.
            self._deliver_blocks_answer(replica_id, message)
        elif isinstance(message, ErrorReply):
            submission = self._submissions.get(message.transaction_id)
            if submission is None and not message.transaction_id:
                # A refusal of a message the replica could not even read: shown if a request times out.
                self.unattributed_refusals[replica_id] = message.reason[:REFUSAL_SHOWN_LENGTH_MAX]
            if submission is not None:
                if message.reason.startswith(TRANSIENT_REFUSAL):
                    return  # e.g. a full queue: the request may still execute, so keep waiting
                submission.refusals[replica_id] = message.reason
                # Only f + 1 refusals can be trusted: at least one comes from an honest replica.
                if len(submission.refusals) >= self.network.reply_quorum:
                    submission.finish(TransactionRejected(message.reason))
                elif replica_id == self.primary:
                    self._broadcast(Request(submission.transaction))
        elif isinstance(message, QueryReply | StatusReply):
            handler = self._queries.get(message.query_id)
            if handler is not None:
                handler(replica_id, message)
        elif isinstance(message, Blocks):
            self._deliver_blocks_answer(replica_id, message)

    def _deliver_blocks_answer(self, replica_id: int, message: Blocks | ErrorReply) -> None:
        """To the block fetch waiting on this replica, if any (one answer at a time: more are dropped)."""
        channel = self._blocks.get(replica_id)
        if channel is not None:
            try:
                channel.send_nowait(message)
            except trio.WouldBlock:
                pass

    def _broadcast(self, message: Any) -> None:
        data = encode_message(message)  # once, whatever the number of replicas
        for link in self.links:
            link.send_encoded(data)

    # ---- transactions ----

    async def submit(self, transaction: Transaction, deadline_s: float = 30.0) -> Receipt:
        """Send a signed transaction; return once f + 1 replicas sent matching signed replies.

        The request goes to every replica at once (as in Aardvark): the backups then know what
        the primary was given, and replace it if it leaves the request unordered
        (node/ordering_monitor.py). If no receipt arrives within the request timeout it goes to
        every replica again.
        """
        if not deadline_s >= 0:  # also refuses NaN, before anything is sent
            raise ValueError(f"deadline_s must be a number of seconds, at least 0, got {deadline_s!r}")
        transaction_id = transaction.transaction_id
        shared = self._submissions.get(transaction_id)
        if shared is not None:
            # The same transaction is already on its way: wait for the same outcome.
            with trio.move_on_after(deadline_s):
                await shared.done.wait()
            return self._outcome(shared, deadline_s)
        if transaction.sender not in self.followed:
            # Replicas send REPLYs to the connections that follow the sender's account.
            self.accounts.append(transaction.sender)
            self.followed.add(transaction.sender)
            self._broadcast(Subscribe((transaction.sender,)))
        submission = Submission(transaction, self.reply_quorum(transaction_id))
        self._submissions[transaction_id] = submission
        try:
            deadline = trio.current_time() + deadline_s
            self._broadcast(Request(transaction))
            # One cancel scope per wait (the first usually the only one): nested deadline and
            # timeout scopes cost the load generator a few percent of its CPU.
            while True:
                now = trio.current_time()
                with trio.move_on_at(min(deadline, now + self.timeout_s)):
                    await submission.done.wait()
                if submission.done.is_set() or trio.current_time() >= deadline:
                    break
                self._broadcast(Request(transaction))
            return self._outcome(submission, deadline_s)
        finally:
            if submission.outcome is None:
                submission.finish(self._timed_out(submission, deadline_s))
            del self._submissions[transaction_id]

    def reply_quorum(self, transaction_id: bytes) -> ReplyQuorum:
        """The quorum a submission's replies go to: each reply's replica id is the connection it
        came on (see _dispatch), and batch reply signatures are checked once for all quorums."""
        return ReplyQuorum(self.network, transaction_id, replica_ids_authenticated=True, batch_signatures=self.batch_signatures)

    def _timed_out(self, submission: Submission, deadline_s: float) -> NetworkUnavailable:
        replied = sorted(submission.quorum.replied)
        refusals = "".join(f"; replica {replica} refused: {reason}" for replica, reason in sorted(submission.refusals.items()))
        refusals += "".join(f"; replica {replica} said: {reason}" for replica, reason in sorted(self.unattributed_refusals.items()))
        return NetworkUnavailable(
            f"no {self.network.reply_quorum} matching replies within {deadline_s:g}s "
            f"(replies from replicas {replied or 'none'}{refusals})"
        )

    def _outcome(self, submission: Submission, deadline_s: float) -> Receipt:
        outcome = submission.outcome
        if outcome is None:
            raise self._timed_out(submission, deadline_s)
        if isinstance(outcome, ClientError):
            raise outcome
        return outcome

    def _require_key(self) -> SigningKey:
        if self.key is None:
            raise ClientError("this client has no key: give --key FILE or a client.key next to the config")
        return self.key

    async def sign(self, operation: Operation, deadline_s: float = QUERY_DEADLINE_S) -> Transaction:
        check_operation(operation)
        key = self._require_key()
        if self.next_nonce is None:
            self.next_nonce = (await self.account(key.public_key, deadline_s))[1]
        transaction = sign_transaction(self.network.identity, key, self.next_nonce, operation)
        self.next_nonce += 1
        return transaction

    async def execute(self, operation: Operation, deadline_s: float = SUBMIT_DEADLINE_S) -> Receipt:
        """Sign (looking up the nonce if needed) and submit, all within `deadline_s`."""
        start = trio.current_time()
        transaction = await self.sign(operation, deadline_s)
        try:
            receipt = await self.submit(transaction, max(deadline_s - (trio.current_time() - start), 0.0))
        except ClientError:
            self.next_nonce = None  # unknown whether it executed: ask the network next time
            raise
        return receipt

    async def transfer(self, recipient: bytes, amount: int) -> Receipt:
        return await self.execute(Transfer(recipient, amount))

    async def put(self, key: str, value: str) -> Receipt:
        return await self.execute(Put(key, value))

    # ---- reads ----

    def raise_read_floor(self, height: int) -> None:
        """From now on, read only from state at least `height` high (e.g. a height a receipt showed)."""
        self.read_floor = max(self.read_floor, height)

    async def query(
        self,
        kind: str,
        argument: Any,
        deadline_s: float = 15.0,
        needed: int | None = None,
        counts: Callable[[QueryReply], bool] | None = None,
    ) -> QueryReply:
        """Ask every replica; return the answer `needed` of them (default: a quorum) signed
        identically from state at or above this client's read floor, counting only answers
        `counts` accepts. Replicas below the floor say so and are asked again shortly."""
        return (await self.query_signed(kind, argument, deadline_s, needed, counts)).answer

    async def query_signed(
        self,
        kind: str,
        argument: Any,
        deadline_s: float = 15.0,
        needed: int | None = None,
        counts: Callable[[QueryReply], bool] | None = None,
    ) -> SignedAnswer:
        """As `query`, with the query asked and the signed replies that agree on the answer, so
        the answer can be shown to someone else (e.g. in a receipt)."""
        needed = needed if needed is not None else self.network.quorum
        pause_s = QUERY_RETRY_S[0]
        behind: dict[int, int] = {}
        with trio.move_on_after(deadline_s):
            while True:
                # A fresh nonce per attempt: an answer to any other query, even one with this id
                # (ids restart with every client), is signed over another digest and never counts.
                query = Query(next(self.query_ids), kind, argument, self.read_floor, secrets.token_bytes(QUERY_NONCE_SIZE))
                quorum = QueryQuorum(self.network, query, needed, self.signatures.verify, counts)
                send_channel, receive_channel = trio.open_memory_channel[QueryReply | None](1)

                def handle(replica_id: int, message: Any, quorum: QueryQuorum = quorum, channel: Any = send_channel) -> None:
                    if not isinstance(message, QueryReply) or message.replica_id != replica_id:
                        return
                    answer = quorum.add(message)
                    if answer is not None or quorum.exhausted:
                        try:
                            channel.send_nowait(answer)
                        except trio.WouldBlock:
                            pass  # the first outcome is the one that counts

                self._queries[query.query_id] = handle
                try:
                    self._broadcast(query)
                    with trio.move_on_after(self.timeout_s):
                        answer = await receive_channel.receive()
                        if answer is not None:
                            self.raise_read_floor(quorum.vouched_height)
                            if answer.error.startswith(PRUNED):
                                raise HistoryPruned(f"{needed} replicas cannot answer from the blocks they keep: {answer.error}", pruned_from_height(answer.error))
                            if answer.error:
                                raise ClientError(answer.error)
                            return SignedAnswer(query, answer, quorum.answer_group)
                    behind = quorum.behind
                finally:
                    del self._queries[query.query_id]
                # Replicas disagreed (at different heights) or were below the floor: ask again soon.
                await trio.sleep(pause_s)
                pause_s = min(pause_s * 2, QUERY_RETRY_S[1])
        floor = f" at height {self.read_floor} or above" if self.read_floor else ""
        lagging = f" (replicas {sorted(behind)} were below it)" if floor and behind else ""
        raise NetworkUnavailable(f"no {needed} matching answers to {kind!r}{floor} within {deadline_s:g}s{lagging}")

    async def account(self, account: bytes | None = None, deadline_s: float = QUERY_DEADLINE_S) -> tuple[int, int]:
        """(balance, next nonce) of an account (default: this client's)."""
        reply = await self.query("account", account if account is not None else self._require_key().public_key, deadline_s)
        balance, nonce = reply.result
        return balance, nonce

    async def get(self, key: str) -> str | None:
        return (await self.query("get", key)).result

    async def locate(self, transaction_id: bytes) -> tuple[int, int] | None:
        """(height, index) of the transaction's outcome, None if a quorum say it is in no block;
        HistoryPruned if a quorum keep too few blocks to tell."""
        try:
            result = (await self.query("transaction", transaction_id)).result
        except HistoryPruned as error:
            raise HistoryPruned(f"transaction {transaction_id.hex()}: {error}", error.kept_from_height) from None
        return None if result is None else (result[0], result[1])

    async def transactions_with_prefix(self, prefix: str, deadline_s: float = QUERY_DEADLINE_S) -> list[tuple[bytes, int, int]]:
        """(transaction id, height, index) of the transactions whose id's hex starts with `prefix`
        (8 to 64 hex digits), as a quorum of replicas sign it; at most TRANSACTION_PREFIX_MATCHES_MAX
        + 1 of them, so more than the maximum means "more than that many"."""
        prefix = prefix.lower()
        reply = await self.query("transaction-prefix", prefix, deadline_s)
        matches = []
        if not isinstance(reply.result, list) or len(reply.result) > TRANSACTION_PREFIX_MATCHES_MAX + 1:
            raise ClientError("malformed answer to a transaction-prefix query")
        for item in reply.result:
            # A quorum signed it, so an honest replica did; checked anyway, so no answer can crash us.
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not isinstance(item[0], bytes)
                or not item[0].hex().startswith(prefix)
                or len(item[0]) != 32
                or not all(isinstance(number, int) and not isinstance(number, bool) for number in item[1:])
                or item[1] < 1
                or item[2] < 0
            ):
                raise ClientError("malformed answer to a transaction-prefix query")
            matches.append((item[0], item[1], item[2]))
        return matches

    async def values_with_prefix(self, prefix: str, deadline_s: float = QUERY_DEADLINE_S) -> KeyRange:
        """The keys starting with `prefix` (at most KEY_LENGTH_MAX characters; empty: all keys)
        and their values, as a quorum of replicas sign them from state at or above the read floor,
        exactly as `get` reads one key."""
        if not isinstance(prefix, str) or len(prefix) > KEY_LENGTH_MAX:
            raise InvalidRequest(f"key prefix: expected text of at most {KEY_LENGTH_MAX} characters")
        reply = await self.query("key-prefix", prefix, deadline_s)
        return KeyRange(prefix, *parse_key_range(prefix, reply.result), reply.height)

    async def status(self, wait_s: float = 2.0) -> list[ReplicaStatus]:
        """Each replica's own report of its progress (unverified: for operators, not for trust)."""
        query_id = next(self.query_ids)
        answers: dict[int, StatusReply] = {}
        everyone = trio.Event()

        def handle(replica_id: int, message: Any) -> None:
            if isinstance(message, StatusReply) and message.replica_id == replica_id:
                answers[replica_id] = message
                if len(answers) == self.network.replica_count:
                    everyone.set()

        self._queries[query_id] = handle
        try:
            self._broadcast(StatusQuery(query_id))
            with trio.move_on_after(wait_s):
                await everyone.wait()
        finally:
            del self._queries[query_id]
        statuses = []
        for replica in self.network.replicas:
            answer = answers.get(replica.replica_id)
            if answer is None:
                statuses.append(ReplicaStatus(replica.replica_id, False))
            else:
                statuses.append(
                    ReplicaStatus(
                        replica.replica_id,
                        True,
                        answer.view,
                        answer.primary,
                        answer.height,
                        answer.last_block_hash,
                        answer.stable_checkpoint,
                        answer.view_changing,
                        answer.duplicate_identities,
                        answer.evidence_count,
                        answer.version,
                        answer.uptime_s,
                        answer.connected_peers,
                        answer.store_size_bytes,
                        answer.base_height,
                    )
                )
        return statuses

    async def evidence(self, replica_id: int | None = None, wait_s: float = 2.0) -> tuple[list[EvidenceReport], list[int]]:
        """The evidence of equivocation every replica keeps (against `replica_id`, or any), merged,
        each piece checked here against the public keys; and the replicas that answered.

        Each replica reports what it saw itself, so answers differ and are not counted as a
        quorum: only signed QUERY-REPLYs to this very query are read, and a piece of evidence is
        believed for its own signatures, never for who reported it."""
        query = Query(next(self.query_ids), "evidence", -1 if replica_id is None else replica_id, 0, secrets.token_bytes(QUERY_NONCE_SIZE))
        domain = signing_domain(self.network.identity, "query-reply")
        answers: dict[int, QueryReply] = {}
        everyone = trio.Event()

        def handle(sender: int, message: Any) -> None:
            if not isinstance(message, QueryReply) or message.replica_id != sender or sender in answers:
                return
            if message.query_id != query.query_id or message.query_digest != query.digest or message.error:
                return
            if not self.signatures.verify(self.network.replica_keys[sender], domain, message.signed_bytes(), message.signature):
                return
            answers[sender] = message
            if len(answers) == self.network.replica_count:
                everyone.set()

        self._queries[query.query_id] = handle
        try:
            self._broadcast(query)
            with trio.move_on_after(wait_s):
                await everyone.wait()
        finally:
            del self._queries[query.query_id]
        found: dict[tuple[int, str, int, int], tuple[Evidence, set[int]]] = {}
        for sender, answer in sorted(answers.items()):
            entries = answer.result if isinstance(answer.result, list) else []
            for plain in entries[:EVIDENCE_PER_ANSWER_MAX]:
                try:
                    evidence = Evidence.from_plain(plain)
                except CodecError:
                    continue  # a malformed entry proves nothing; the rest still count
                if replica_id is not None and evidence.replica_id != replica_id:
                    continue
                _, reporters = found.setdefault(evidence.key, (evidence, set()))
                reporters.add(sender)
        reports = [
            EvidenceReport(evidence, tuple(sorted(reporters)), evidence.signatures_valid(self.network, self.signatures.verify))
            for evidence, reporters in found.values()
        ]
        reports.sort(key=lambda report: report.evidence.key)
        return reports, sorted(answers)

    async def wait_until_ready(self, replicas: int | None = None, deadline_s: float = 30.0) -> None:
        """Wait until `replicas` (default: all) answer a status request."""
        wanted = replicas if replicas is not None else self.network.replica_count
        with trio.move_on_after(deadline_s):
            while sum(status.reachable for status in await self.status(wait_s=0.5)) < wanted:
                await trio.sleep(0.05)
            return
        raise NetworkUnavailable(f"fewer than {wanted} replicas answered within {deadline_s:g}s")

    # ---- blocks and chain verification ----

    async def fetch_blocks(self, replica_id: int, from_height: int, count: int = BLOCKS_PER_RESPONSE_MAX) -> list[Block]:
        """Blocks as one replica serves them: unverified until their certificates are checked.
        HistoryPruned if the replica no longer keeps block `from_height`."""
        return list((await self.fetch_blocks_message(replica_id, from_height, count)).blocks)

    async def fetch_blocks_message(self, replica_id: int, from_height: int, count: int = BLOCKS_PER_RESPONSE_MAX) -> Blocks:
        """As fetch_blocks, the whole answer: its blocks and the replica's stable checkpoint certificate (both unverified)."""
        send_channel, receive_channel = trio.open_memory_channel[Blocks | ErrorReply](1)
        self._blocks[replica_id] = send_channel
        try:
            self.links[replica_id].send(FetchBlocks(from_height, min(count, BLOCKS_PER_RESPONSE_MAX)))
            with trio.move_on_after(self.timeout_s * 2):
                answer = await receive_channel.receive()
                if isinstance(answer, ErrorReply):
                    reason = answer.reason[:REFUSAL_SHOWN_LENGTH_MAX]
                    raise HistoryPruned(f"replica {replica_id} refused block {from_height}: {reason}", pruned_from_height(reason))
                return answer
            raise NetworkUnavailable(f"replica {replica_id} did not answer a block request")
        finally:
            del self._blocks[replica_id]

    def verify_block(self, block: Block) -> None:
        verify_certificate(
            block.header,
            block.certificate,
            self.network.identity,
            self.network.replica_keys,
            self.network.quorum,
            self.signatures.verify,
        )

    async def confirmed_block_hash(self, height: int, deadline_s: float = 15.0) -> bytes:
        """The hash of block `height` as f + 1 replicas sign it (so at least one honest replica
        does). Replicas that lack the block yet are not counted."""
        reply = await self.query(
            "block-hash",
            height,
            deadline_s,
            needed=self.network.reply_quorum,
            counts=lambda reply: isinstance(reply.result, bytes),
        )
        return reply.result

    async def block_hash_or_height(self, height: int, deadline_s: float = QUERY_DEADLINE_S) -> tuple[bytes | None, int]:
        """(hash of block `height`, None if there is none yet; a height f + 1 replicas vouch for).

        f + 1 signed answers agree, so at least one honest replica gave this one; None means an
        honest replica at the returned height has no such block (rather than waiting for it)."""
        reply = await self.query("block-hash", height, deadline_s, needed=self.network.reply_quorum)
        result = reply.result if isinstance(reply.result, bytes) else None
        return result, reply.height

    async def latest_height(self, deadline_s: float = QUERY_DEADLINE_S) -> int:
        """A height f + 1 replicas report their ledger at, so at least one honest replica has it.
        Asked as the hash of a block no ledger reaches: every replica, pruned or not, answers
        "none" with its height, so the answers match (block 1 may be pruned)."""
        return (await self.block_hash_or_height(HEIGHT_BEYOND_ANY, deadline_s))[1]

    async def block(self, height: int, deadline_s: float = QUERY_DEADLINE_S) -> Block:
        """Block `height`: its commit certificate verifies against the replicas' keys, and its hash
        (which covers its results and state digest) is the one f + 1 replicas sign. NoSuchBlock
        if f + 1 replicas say the ledger does not reach that height (yet)."""
        try:
            expected_hash, ledger_height = await self.block_hash_or_height(height, deadline_s)
        except HistoryPruned as error:
            raise HistoryPruned(f"block {height}: {error}", error.kept_from_height) from None
        if expected_hash is None:
            raise NoSuchBlock(f"no block {height} (height {ledger_height})")
        problems = []
        pruned: list[HistoryPruned] = []
        for replica_id in [self.primary, *[r for r in range(self.network.replica_count) if r != self.primary]]:
            try:
                blocks = await self.fetch_blocks(replica_id, height, 1)
            except HistoryPruned as error:
                pruned.append(error)
                problems.append(str(error))
                continue
            except NetworkUnavailable as error:
                problems.append(str(error))
                continue
            if blocks and blocks[0].height == height:
                try:
                    self.verify_block(blocks[0])
                    verify_block_contents(blocks[0])
                except ChainError as error:
                    problems.append(f"replica {replica_id}: {error}")
                    continue
                if blocks[0].block_hash != expected_hash:
                    problems.append(f"replica {replica_id}: serves a block whose hash f+1 replicas do not vouch for")
                    continue
                return blocks[0]
        if pruned and len(pruned) == len(problems):
            raise HistoryPruned(f"block {height} is pruned on every replica that answered ({'; '.join(problems)})", pruned[0].kept_from_height)
        raise ClientError(f"no replica served a verifiable block {height}" + (f" ({'; '.join(problems)})" if problems else ""))

    async def transaction_receipt(self, block: Block, index: int, deadline_s: float = QUERY_DEADLINE_S) -> TransactionReceipt:
        """A receipt for transaction `index` of `block` that anyone can check offline with the
        network's public keys: the block's certificate, and f + 1 replicas' signed answers naming
        its hash (which covers the result). Checked here before it is returned. ClientError if
        the entry is not the transaction's outcome (deferred or replayed): see `locate`."""
        if not 0 <= index < len(block.results):
            raise ClientError(f"block {block.height} has no transaction at index {index}")
        problem = not_outcome_problem(block.results[index], block.height, index)
        if problem is not None:
            raise ClientError(f"no receipt: {problem}")
        signed = await self.query_signed(
            "block-hash",
            block.height,
            deadline_s,
            needed=self.network.reply_quorum,
            counts=lambda reply: isinstance(reply.result, bytes),
        )
        if signed.answer.result != block.block_hash:
            raise ClientError(f"block {block.height}: f+1 replicas vouch for another hash than the block's")
        receipt = build_receipt(self.network, block, index, signed.query, signed.replies)
        try:
            verify_receipt(receipt, self.network, self.signatures.verify)
        except ReceiptError as error:
            raise ChainError(f"the receipt built for block {block.height} does not verify: {error}") from None
        return receipt

    async def verify_chain(self, replica_id: int, progress: Callable[[int], None] | None = None) -> ChainReport:
        """Download one replica's whole chain and check it, trusting that replica for nothing.

        Every link, every transactions root, every commit certificate (against the configured
        public keys), and every state digest and result, by re-executing all blocks from genesis;
        and the chain must reach a height f + 1 replicas vouch for before the download starts, so
        a replica cannot pass by serving only the start of its chain. Raises ChainError naming
        the first bad block, HistoryPruned if the replica does not keep the blocks from 1.
        """
        vouched_height = await self.latest_height()
        application = AccountsApplication(self.network.genesis_balances)
        height, last_hash, transactions = await self._verify_blocks_after(
            replica_id, self.network.genesis_hash, 0, vouched_height, application, progress
        )
        return ChainReport(replica_id, height, last_hash, transactions)

    async def verify_chain_from_checkpoint(self, replica_id: int, progress: Callable[[int], None] | None = None) -> ChainReport:
        """Check one replica's chain from its newest stable checkpoint on, trusting it for nothing.

        The start is trusted because of its CheckpointCertificate, verified here: 2f + 1 distinct
        replicas' CHECKPOINT signatures over (height, state digest, block hash), so at least f + 1
        honest replicas executed the chain to that block and that state. The block served at that
        height must have exactly that hash (which covers its parent link and state digest) and a
        commit certificate that verifies. Every later block is then checked as `verify_chain` does
        (parent links, transactions roots, commit certificates, up to a height f + 1 replicas
        vouch for), except that results and state digests are not re-executed: that needs the
        state at the checkpoint, which is not downloaded. Works on a pruned replica (it never
        deletes its stable checkpoint's block). Raises ChainError, or ClientError if the replica
        has no stable checkpoint yet."""
        vouched_height = await self.latest_height()
        answer = await self.fetch_blocks_message(replica_id, max(1, vouched_height), 1)
        checkpoint = answer.checkpoint
        if checkpoint is None:
            raise ClientError(f"replica {replica_id} has no stable checkpoint yet: use a full verify from genesis")
        problem = self.checkpoint_problem(checkpoint)
        if problem is not None:
            raise ChainError(f"the stable checkpoint at {checkpoint.sequence} it serves does not verify: {problem}")
        blocks = await self.fetch_blocks(replica_id, checkpoint.sequence, 1)
        if not blocks or blocks[0].height != checkpoint.sequence:
            raise ChainError(f"it does not serve block {checkpoint.sequence}, the block of its own stable checkpoint")
        start = blocks[0]
        if start.block_hash != checkpoint.block_hash or start.header.state_digest != checkpoint.state_digest:
            raise ChainError(f"block {start.height}: not the block its checkpoint certificate signs (hash or state digest differs)")
        self.verify_block(start)
        verify_block_contents(start)
        height, last_hash, transactions = await self._verify_blocks_after(
            replica_id, start.block_hash, start.height, vouched_height, None, progress
        )
        signers = tuple(sorted(replica for replica, _ in checkpoint.signatures))
        return ChainReport(replica_id, height, last_hash, transactions, start.height, signers)

    def checkpoint_problem(self, checkpoint: CheckpointCertificate) -> str | None:
        """Why `checkpoint` is not 2f + 1 valid CHECKPOINT signatures of distinct replicas, or None."""
        domain = signing_domain(self.network.identity, "checkpoint")
        return checkpoint_certificate_signers_problem(
            checkpoint, self.network.replica_keys, self.network.quorum, domain, self.signatures.verify
        )

    async def _verify_blocks_after(
        self,
        replica_id: int,
        parent_hash: bytes,
        height: int,
        vouched_height: int,
        application: AccountsApplication | None,
        progress: Callable[[int], None] | None,
    ) -> tuple[int, bytes, int]:
        """Fetch and check the replica's blocks after (height, parent_hash) up to at least
        `vouched_height`: links, roots, certificates, and with `application` (the state at
        `height`) every result and state digest. (last height, last hash, transactions)."""
        transactions = 0
        short_since: float | None = None
        while True:
            blocks = await self.fetch_blocks(replica_id, height + 1)
            if not blocks:
                if height >= vouched_height:
                    break
                # An honest replica may be a few blocks behind the others: give it time to catch up.
                now = trio.current_time()
                short_since = now if short_since is None else short_since
                if now - short_since > CHAIN_CATCH_UP_S:
                    raise ChainError(
                        f"chain ends at block {height}, but f+1 replicas vouch for height {vouched_height} "
                        f"(truncated, or the replica is more than {CHAIN_CATCH_UP_S:g}s behind)"
                    )
                await trio.sleep(CHAIN_CATCH_UP_POLL_S)
                continue
            verify_chain_segment(blocks, parent_hash, height)
            for block in blocks:
                self.verify_block(block)
                if application is not None:
                    verify_execution(application, block)
                transactions += len(block.transactions)
            parent_hash, height = blocks[-1].block_hash, blocks[-1].height
            if progress is not None:
                progress(height)
        return height, parent_hash, transactions


def parse_key_range(prefix: str, result: Any) -> tuple[tuple[tuple[str, str], ...], bool]:
    """(entries, truncated) from a 'key-prefix' answer. A quorum signed it, so an honest replica
    did; checked anyway (shape, bounds, prefix, strict key order), so no answer can crash us."""
    malformed = ClientError("malformed answer to a key-prefix query")
    if not isinstance(result, list) or len(result) != 2 or not isinstance(result[0], list) or not isinstance(result[1], bool):
        raise malformed
    items, truncated = result
    if len(items) > KEY_PREFIX_MATCHES_MAX:
        raise malformed
    entries: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, list) or len(item) != 2 or not all(isinstance(text, str) for text in item):
            raise malformed
        key, value = item
        if not key.startswith(prefix) or not 0 < len(key) <= KEY_LENGTH_MAX or len(value) > VALUE_LENGTH_MAX:
            raise malformed
        if entries and key <= entries[-1][0]:
            raise malformed
        entries.append((key, value))
    return tuple(entries), truncated


@asynccontextmanager
async def open_client(config_path: Path | str, key_path: Path | str | None = None) -> AsyncIterator[Client]:
    """Connect to every replica of the network in `config_path` (a client.toml).

    The key is `key_path`, else the config's key_file; a missing key allows reads only.
    """
    config = load_client_config(Path(config_path))
    path = Path(key_path) if key_path is not None else config.key_path
    key = read_key_file(path) if key_path is not None or path.exists() else None
    client = Client(config, key)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        for link in client.links:
            nursery.start_soon(link.run)
        try:
            yield client
        except Exception as error:
            # Re-raised below, outside the nursery, so callers see the error itself rather
            # than an ExceptionGroup wrapping it.
            failure = error
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


class SyncClient:
    """The same client for code without Trio: each call blocks until its answer.

        with SyncClient("net/client.toml") as client:
            print(client.transfer(recipient, 5))
    """

    def __init__(self, config_path: Path | str, key_path: Path | str | None = None) -> None:
        self._config_path = config_path
        self._key_path = key_path
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._client: Client | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="ledger-client", daemon=True)

    def __enter__(self) -> SyncClient:
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()

    def _thread_main(self) -> None:
        async def main() -> None:
            try:
                async with open_client(self._config_path, self._key_path) as client:
                    self._client = client
                    self._token = trio.lowlevel.current_trio_token()
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as error:  # handed to the calling thread
                self._failure = error
                self._ready.set()

        trio.run(main)

    def _call(self, function: Callable[..., Any], *arguments: Any) -> Any:
        assert self._token is not None
        return trio.from_thread.run(function, *arguments, trio_token=self._token)

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    def transfer(self, recipient: bytes, amount: int) -> Receipt:
        return self._call(self.client.transfer, recipient, amount)

    def put(self, key: str, value: str) -> Receipt:
        return self._call(self.client.put, key, value)

    def submit(self, transaction: Transaction) -> Receipt:
        return self._call(self.client.submit, transaction)

    def get(self, key: str) -> str | None:
        return self._call(self.client.get, key)

    def account(self, account: bytes | None = None) -> tuple[int, int]:
        return self._call(self.client.account, account)

    def status(self) -> list[ReplicaStatus]:
        return self._call(self.client.status)
