"""Every message on the wire, replica-to-replica and client-to-replica, with its validating decoder.

A message is encoded as a CBOR array: its tag, then its fields. Signed messages sign the canonical
encoding of their fields (signature excluded) under a domain naming the network and message type.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ledger.blocks import (
    BLOCK_TRANSACTIONS_MAX,
    HASH_SIZE,
    REPLICAS_MAX,
    Block,
    batch_digest,
    commit_signed_bytes,
)
from ledger.crypto import PUBLIC_KEY_SIZE, SIGNATURE_SIZE
from ledger.encoding import (
    CodecError,
    array_head,
    decode,
    encode,
    encode_hash,
    encode_items,
    encode_unsigned,
    expect_bool,
    expect_bytes,
    expect_int,
    expect_list,
    expect_text,
)
from ledger.merkle import merkle_paths, merkle_proof, merkle_root, verify_merkle_proof
from ledger.snapshots import StateChunk
from ledger.state_tree import BUCKET_COUNT
from ledger.transactions import KnownTransactions, Transaction, TransactionResult

BLOCKS_PER_RESPONSE_MAX = 64
SUBSCRIBE_ACCOUNTS_MAX = 1024
QUERY_KIND_LENGTH_MAX = 32
QUERY_NONCE_SIZE = 16
QUERY_BEHIND = "behind:"  # how a QUERY-REPLY's error starts when the replica is below the query's min_height
# How a refusal starts (a QUERY-REPLY's error, a client's ErrorReply) when what was asked for is in
# blocks this replica pruned (retain_blocks): "pruned: this replica keeps blocks from height H".
PRUNED = "pruned:"
# A 'transaction-prefix' query: the prefix is 8 to 64 lowercase hex digits (8: few enough
# transactions share one that a prefix is useful), and a replica lists at most this many matches.
TRANSACTION_PREFIX_LENGTH_MIN = 8
TRANSACTION_PREFIX_MATCHES_MAX = 8
# A 'key-prefix' query (get --prefix): the prefix is text of at most KEY_LENGTH_MAX characters
# (empty: every key), and the answer [[[key, value], ...], truncated] lists, in key order, at most
# KEY_PREFIX_MATCHES_MAX entries whose keys and values take at most KEY_PREFIX_ANSWER_BYTES_MAX
# bytes of UTF-8 together, so that the answer fits the smallest frame a network may configure
# (64 KiB); `truncated` says that more keys match.
KEY_PREFIX_MATCHES_MAX = 1000
KEY_PREFIX_ANSWER_BYTES_MAX = 48 * 1024
PREPARED_CERTIFICATES_MAX = 4096
HELLO_SETTINGS_MAX = 64  # protocol settings a HELLO may list
# A replica's version in its STATUS-REPLY: printable ASCII only, so a hostile replica cannot put
# terminal escapes or line breaks into an operator's status table.
STATUS_VERSION_LENGTH_MAX = 64


def _replica(value: Any, name: str) -> int:
    return expect_int(value, name, 0, REPLICAS_MAX - 1)


def _hash(value: Any, name: str) -> bytes:
    return expect_bytes(value, name, HASH_SIZE)


def _signature(value: Any, name: str) -> bytes:
    return expect_bytes(value, name, SIGNATURE_SIZE)


@dataclass(frozen=True)
class Batch:
    """An ordered batch of requests as first proposed by `proposer` in `view` (the block's body)."""

    view: int
    proposer: int
    timestamp_ms: int
    transactions: tuple[Transaction, ...]
    transactions_root: bytes = field(init=False, repr=False, compare=False)
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        root = merkle_root([transaction.transaction_id for transaction in self.transactions])
        object.__setattr__(self, "transactions_root", root)
        object.__setattr__(self, "digest", batch_digest(self.view, self.proposer, self.timestamp_ms, root))

    def to_plain(self) -> list[Any]:
        return [self.view, self.proposer, self.timestamp_ms, [t.to_plain() for t in self.transactions]]

    @property
    def encoded(self) -> bytes:
        """encode(to_plain()), assembled from the transactions' encodings as they already are:
        a batch goes into a PRE-PREPARE, a prepared record and a block, and is encoded once."""
        return b"".join(
            [
                array_head(4),
                encode_items([self.view, self.proposer, self.timestamp_ms]),
                array_head(len(self.transactions)),
                *[transaction.encoded for transaction in self.transactions],
            ]
        )

    @classmethod
    def from_plain(cls, plain: Any, known: KnownTransactions | None = None) -> Batch:
        items = expect_list(plain, "batch", length=4)
        transactions = tuple(
            Transaction.from_plain(item, known)
            for item in expect_list(items[3], "batch transactions", length_max=BLOCK_TRANSACTIONS_MAX)
        )
        return cls(
            expect_int(items[0], "batch view"),
            _replica(items[1], "batch proposer"),
            expect_int(items[2], "batch timestamp"),
            transactions,
        )


# ---- PBFT protocol messages (replica to replica), all signed ----


@dataclass(frozen=True)
class PrePrepare:
    TAG: ClassVar[str] = "pre-prepare"
    view: int
    sequence: int
    batch: Batch
    replica_id: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return encode([self.view, self.sequence, self.batch.digest, self.replica_id])

    def fields(self) -> list[Any]:
        return [self.view, self.sequence, self.batch.to_plain(), self.replica_id, self.signature]

    @property
    def header(self) -> PrePrepareHeader:
        """The signed part: the batch enters only through its digest."""
        return PrePrepareHeader(self.view, self.sequence, self.batch.digest, self.replica_id, self.signature)

    @classmethod
    def from_fields(cls, items: list[Any], known: KnownTransactions | None = None) -> PrePrepare:
        expect_list(items, "pre-prepare", length=5)
        return cls(
            expect_int(items[0], "view"),
            expect_int(items[1], "sequence", 1),
            Batch.from_plain(items[2], known),
            _replica(items[3], "replica"),
            _signature(items[4], "signature"),
        )


@dataclass(frozen=True, slots=True)
class Vote:
    """A replica's signed vote for the batch digest at (view, sequence): PREPARE or COMMIT.

    Both sign the same layout under different domains, so one can never pass for the other; a
    stored block's COMMITs verify exactly as they did on the wire.
    """

    TAG: ClassVar[str] = ""
    view: int
    sequence: int
    digest: bytes
    replica_id: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return commit_signed_bytes(self.view, self.sequence, self.digest, self.replica_id)

    def fields(self) -> list[Any]:
        return [self.view, self.sequence, self.digest, self.replica_id, self.signature]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Any:
        expect_list(items, cls.TAG, length=5)
        return cls(
            expect_int(items[0], "view"),
            expect_int(items[1], "sequence", 1),
            _hash(items[2], "digest"),
            _replica(items[3], "replica"),
            _signature(items[4], "signature"),
        )


@dataclass(frozen=True, slots=True)
class Prepare(Vote):
    TAG: ClassVar[str] = "prepare"


@dataclass(frozen=True, slots=True)
class Commit(Vote):
    TAG: ClassVar[str] = "commit"


@dataclass(frozen=True, slots=True)
class PrePrepareHeader:
    """A PRE-PREPARE without its batch. Same signature as the full message, a fraction of the size:
    view changes and NEW-VIEWs carry these, and replicas fetch batches they lack by digest."""

    view: int
    sequence: int
    digest: bytes
    replica_id: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return encode([self.view, self.sequence, self.digest, self.replica_id])

    def to_plain(self) -> list[Any]:
        return [self.view, self.sequence, self.digest, self.replica_id, self.signature]

    @classmethod
    def from_plain(cls, plain: Any) -> PrePrepareHeader:
        items = expect_list(plain, "pre-prepare header", length=5)
        return cls(
            expect_int(items[0], "view"),
            expect_int(items[1], "sequence", 1),
            _hash(items[2], "digest"),
            _replica(items[3], "replica"),
            _signature(items[4], "signature"),
        )


def _signature_list(plain: Any, name: str) -> tuple[tuple[int, bytes], ...]:
    entries = []
    for entry in expect_list(plain, name, length_max=REPLICAS_MAX):
        replica_id, signature = expect_list(entry, name, length=2)
        entries.append((_replica(replica_id, name), _signature(signature, name)))
    return tuple(entries)


@dataclass(frozen=True, slots=True)
class PreparedCertificate:
    """Proof that a batch was prepared: the primary's pre-prepare plus quorum - 1 backup PREPAREs."""

    pre_prepare: PrePrepareHeader
    prepares: tuple[tuple[int, bytes], ...]

    @property
    def view(self) -> int:
        return self.pre_prepare.view

    @property
    def sequence(self) -> int:
        return self.pre_prepare.sequence

    @property
    def digest(self) -> bytes:
        return self.pre_prepare.digest

    def to_plain(self) -> list[Any]:
        return [self.pre_prepare.to_plain(), [[replica_id, signature] for replica_id, signature in self.prepares]]

    @classmethod
    def from_plain(cls, plain: Any) -> PreparedCertificate:
        items = expect_list(plain, "prepared certificate", length=2)
        return cls(PrePrepareHeader.from_plain(items[0]), _signature_list(items[1], "prepares"))


@dataclass(frozen=True, slots=True)
class PreparedRecord:
    """What a replica keeps on disk for a prepared slot: the certificate, and the batch if known.

    The certificate alone is what a view change needs, so it is made durable before the COMMIT
    goes out even when the batch content has not arrived yet.
    """

    TAG: ClassVar[str] = "prepared-record"
    certificate: PreparedCertificate
    batch: Batch | None

    def fields(self) -> list[Any]:
        return [self.certificate.to_plain(), None if self.batch is None else self.batch.to_plain()]

    @classmethod
    def from_fields(cls, items: list[Any]) -> PreparedRecord:
        expect_list(items, cls.TAG, length=2)
        return cls(PreparedCertificate.from_plain(items[0]), None if items[1] is None else Batch.from_plain(items[1]))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A replica's signed statement of the state after executing `sequence`."""

    TAG: ClassVar[str] = "checkpoint"
    sequence: int
    state_digest: bytes
    block_hash: bytes
    replica_id: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return checkpoint_signed_bytes(self.sequence, self.state_digest, self.block_hash, self.replica_id)

    def fields(self) -> list[Any]:
        return [self.sequence, self.state_digest, self.block_hash, self.replica_id, self.signature]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Checkpoint:
        expect_list(items, cls.TAG, length=5)
        return cls(
            expect_int(items[0], "sequence", 1),
            _hash(items[1], "state digest"),
            _hash(items[2], "block hash"),
            _replica(items[3], "replica"),
            _signature(items[4], "signature"),
        )


def checkpoint_signed_bytes(sequence: int, state_digest: bytes, block_hash: bytes, replica_id: int) -> bytes:
    return encode([sequence, state_digest, block_hash, replica_id])


@dataclass(frozen=True, slots=True)
class CheckpointCertificate:
    """A quorum of matching CHECKPOINTs: the state at `sequence` is stable and certified."""

    TAG: ClassVar[str] = "checkpoint-certificate"
    sequence: int
    state_digest: bytes
    block_hash: bytes
    signatures: tuple[tuple[int, bytes], ...]

    def fields(self) -> list[Any]:
        return [self.sequence, self.state_digest, self.block_hash, [[r, s] for r, s in self.signatures]]

    @classmethod
    def from_fields(cls, items: list[Any]) -> CheckpointCertificate:
        expect_list(items, cls.TAG, length=4)
        return cls(
            expect_int(items[0], "sequence", 1),
            _hash(items[1], "state digest"),
            _hash(items[2], "block hash"),
            _signature_list(items[3], "checkpoint signatures"),
        )


def checkpoint_certificate_signers_problem(
    certificate: CheckpointCertificate,
    replica_keys: tuple[bytes, ...] | list[bytes],
    quorum: int,
    domain: bytes,
    verify: Callable[[bytes, bytes, bytes, bytes], bool],
) -> str | None:
    """Why `certificate` is not a quorum of distinct replicas' valid CHECKPOINT signatures
    (`domain`: the network's checkpoint signing domain), or None."""
    signers = set()
    for replica_id, signature in certificate.signatures:
        if replica_id in signers or replica_id >= len(replica_keys):
            return "checkpoint certificate repeats or invents a signer"
        message = Checkpoint(certificate.sequence, certificate.state_digest, certificate.block_hash, replica_id, signature)
        if not verify(replica_keys[replica_id], domain, message.signed_bytes(), signature):
            return f"checkpoint certificate: bad signature from replica {replica_id}"
        signers.add(replica_id)
    if len(signers) < quorum:
        return "checkpoint certificate without a quorum"
    return None


@dataclass(frozen=True, slots=True)
class ViewChange:
    """VIEW-CHANGE: 'I leave for `new_view`; here is my stable checkpoint and what I prepared above it.'"""

    TAG: ClassVar[str] = "view-change"
    new_view: int
    checkpoint: CheckpointCertificate | None
    prepared: tuple[PreparedCertificate, ...]
    replica_id: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return encode(self.fields()[:-1])

    def fields(self) -> list[Any]:
        return [
            self.new_view,
            None if self.checkpoint is None else self.checkpoint.fields(),
            [certificate.to_plain() for certificate in self.prepared],
            self.replica_id,
            self.signature,
        ]

    @property
    def checkpoint_sequence(self) -> int:
        return 0 if self.checkpoint is None else self.checkpoint.sequence

    @classmethod
    def from_fields(cls, items: list[Any]) -> ViewChange:
        expect_list(items, cls.TAG, length=5)
        checkpoint = None if items[1] is None else CheckpointCertificate.from_fields(expect_list(items[1], "checkpoint"))
        prepared = tuple(
            PreparedCertificate.from_plain(item) for item in expect_list(items[2], "prepared", length_max=PREPARED_CERTIFICATES_MAX)
        )
        return cls(expect_int(items[0], "new view", 1), checkpoint, prepared, _replica(items[3], "replica"), _signature(items[4], "signature"))


@dataclass(frozen=True, slots=True)
class NewView:
    """NEW-VIEW from the new primary: the view-changes it used and the pre-prepares they imply.

    It needs no signature of its own: each view-change and each pre-prepare inside is signed, and
    every backup recomputes the pre-prepares from the view-changes before accepting it.
    """

    TAG: ClassVar[str] = "new-view"
    view: int
    view_changes: tuple[ViewChange, ...]
    pre_prepares: tuple[PrePrepareHeader, ...]
    replica_id: int

    def fields(self) -> list[Any]:
        return [
            self.view,
            [view_change.fields() for view_change in self.view_changes],
            [header.to_plain() for header in self.pre_prepares],
            self.replica_id,
        ]

    @classmethod
    def from_fields(cls, items: list[Any]) -> NewView:
        expect_list(items, cls.TAG, length=4)
        view_changes = tuple(
            ViewChange.from_fields(expect_list(item, "view change")) for item in expect_list(items[1], "view changes", length_max=REPLICAS_MAX)
        )
        headers = tuple(
            PrePrepareHeader.from_plain(item) for item in expect_list(items[2], "pre-prepares", length_max=PREPARED_CERTIFICATES_MAX)
        )
        return cls(expect_int(items[0], "view", 1), view_changes, headers, _replica(items[3], "replica"))


@dataclass(frozen=True, slots=True)
class FetchBatch:
    """Ask peers for the batch with this digest (known from a NEW-VIEW, content not yet seen)."""

    TAG: ClassVar[str] = "fetch-batch"
    digest: bytes

    def fields(self) -> list[Any]:
        return [self.digest]

    @classmethod
    def from_fields(cls, items: list[Any]) -> FetchBatch:
        expect_list(items, cls.TAG, length=1)
        return cls(_hash(items[0], "digest"))


@dataclass(frozen=True, slots=True)
class BatchContent:
    TAG: ClassVar[str] = "batch"
    batch: Batch

    def fields(self) -> list[Any]:
        return [self.batch.to_plain()]

    @classmethod
    def from_fields(cls, items: list[Any]) -> BatchContent:
        expect_list(items, cls.TAG, length=1)
        return cls(Batch.from_plain(items[0]))


@dataclass(frozen=True, slots=True)
class Status:
    """A replica's progress, sent periodically so a peer that is behind knows to fetch blocks."""

    TAG: ClassVar[str] = "status"
    replica_id: int
    view: int
    height: int

    def fields(self) -> list[Any]:
        return [self.replica_id, self.view, self.height]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Status:
        expect_list(items, cls.TAG, length=3)
        return cls(_replica(items[0], "replica"), expect_int(items[1], "view"), expect_int(items[2], "height"))


@dataclass(frozen=True, slots=True)
class FetchBlocks:
    TAG: ClassVar[str] = "fetch-blocks"
    from_height: int
    count: int

    def fields(self) -> list[Any]:
        return [self.from_height, self.count]

    @classmethod
    def from_fields(cls, items: list[Any]) -> FetchBlocks:
        expect_list(items, cls.TAG, length=2)
        return cls(expect_int(items[0], "from height", 1), expect_int(items[1], "count", 1, BLOCKS_PER_RESPONSE_MAX))


@dataclass(frozen=True, slots=True)
class Blocks:
    """Blocks for a replica or client that asked, with the server's stable checkpoint certificate
    so a replica that caught up can move its low watermark too."""

    TAG: ClassVar[str] = "blocks"
    blocks: tuple[Block, ...]
    checkpoint: CheckpointCertificate | None = None

    def fields(self) -> list[Any]:
        return [[block.to_plain() for block in self.blocks], None if self.checkpoint is None else self.checkpoint.fields()]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Blocks:
        expect_list(items, cls.TAG, length=2)
        plain = expect_list(items[0], "blocks", length_max=BLOCKS_PER_RESPONSE_MAX)
        checkpoint = None if items[1] is None else CheckpointCertificate.from_fields(expect_list(items[1], "checkpoint"))
        return cls(tuple(Block.from_plain(item) for item in plain), checkpoint)


def pruned_reason(kept_from_height: int, detail: str = "") -> str:
    """The refusal of a read below the blocks a pruned replica keeps."""
    return f"{PRUNED} this replica keeps blocks from height {kept_from_height}" + (f"; {detail}" if detail else "")


def pruned_from_height(reason: str) -> int | None:
    """The height a "pruned:" refusal says the replica keeps blocks from; None if `reason` is not
    one or names no height (it comes from one unverified replica: a hint, never proof)."""
    if not reason.startswith(PRUNED):
        return None
    words = reason[len(PRUNED):].replace(";", " ").split()
    for index, word in enumerate(words[:-1]):
        if word == "height" and words[index + 1].isdigit() and len(words[index + 1]) <= 20:
            return int(words[index + 1])
    return None


def encode_blocks_message(encoded_blocks: list[bytes], checkpoint: CheckpointCertificate | None) -> bytes:
    """encode_message(Blocks(...)) for blocks already in their canonical encoding (as the store
    keeps them): a response is assembled from stored bytes, never decoded and encoded again."""
    return b"".join(
        [
            array_head(3),
            encode(Blocks.TAG),
            array_head(len(encoded_blocks)),
            *encoded_blocks,
            encode(None if checkpoint is None else checkpoint.fields()),
        ]
    )


@dataclass(frozen=True, slots=True)
class FetchSnapshot:
    """Ask a peer for the chunk of its state at stable checkpoint `sequence` (0: its newest one)
    that starts at `first_bucket`, from entry `first_entry` of it: not 0 only to go on with a
    bucket too large for one chunk, sent in parts (ledger/snapshots.py)."""

    TAG: ClassVar[str] = "fetch-snapshot"
    sequence: int
    first_bucket: int
    first_entry: int = 0

    def fields(self) -> list[Any]:
        # Two fields when from a bucket's start: one encoding for each request.
        return [self.sequence, self.first_bucket] + ([self.first_entry] if self.first_entry else [])

    @classmethod
    def from_fields(cls, items: list[Any]) -> FetchSnapshot:
        if not isinstance(items, list) or len(items) not in (2, 3):
            raise CodecError(f"{cls.TAG}: expected 2 or 3 fields")
        first_entry = expect_int(items[2], "first entry", 1) if len(items) == 3 else 0
        return cls(expect_int(items[0], "sequence"), expect_int(items[1], "first bucket", 0, BUCKET_COUNT - 1), first_entry)


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """A chunk of the state certified by `checkpoint` (its state digest is the root the chunk is
    checked against), or None when the sender keeps no snapshot of the checkpoint asked for:
    then `checkpoint` is the sender's newest stable one, for the asker to move to."""

    TAG: ClassVar[str] = "snapshot-chunk"
    checkpoint: CheckpointCertificate
    chunk: StateChunk | None

    def fields(self) -> list[Any]:
        return [self.checkpoint.fields(), None if self.chunk is None else self.chunk.to_plain()]

    @classmethod
    def from_fields(cls, items: list[Any]) -> SnapshotChunk:
        expect_list(items, cls.TAG, length=2)
        checkpoint = CheckpointCertificate.from_fields(expect_list(items[0], "snapshot checkpoint"))
        return cls(checkpoint, None if items[1] is None else StateChunk.from_plain(items[1]))


# ---- replica connection handshake ----


@dataclass(frozen=True, slots=True)
class Hello:
    """A replica's first message on a peer link. Besides who it is, it says what network it runs:
    the genesis hash (replica keys, balances) and its protocol settings, so replicas whose config
    files drifted apart refuse to talk, naming the difference, instead of misbehaving quietly."""

    TAG: ClassVar[str] = "hello"
    network_id: str
    replica_id: int
    challenge: bytes
    genesis_hash: bytes
    protocol: tuple[int, ...]  # the [protocol] settings' values, in PROTOCOL_SETTING_NAMES order

    def fields(self) -> list[Any]:
        return [self.network_id, self.replica_id, self.challenge, self.genesis_hash, list(self.protocol)]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Hello:
        expect_list(items, cls.TAG, length=5)
        protocol = expect_list(items[4], "protocol settings", length_max=HELLO_SETTINGS_MAX)
        return cls(
            expect_text(items[0], "network id", 128),
            _replica(items[1], "replica"),
            expect_bytes(items[2], "challenge", 32),
            expect_bytes(items[3], "genesis hash", 32),
            tuple(expect_int(value, "protocol setting", 0, 2**63 - 1) for value in protocol),
        )


@dataclass(frozen=True, slots=True)
class HelloProof:
    TAG: ClassVar[str] = "hello-proof"
    signature: bytes

    def fields(self) -> list[Any]:
        return [self.signature]

    @classmethod
    def from_fields(cls, items: list[Any]) -> HelloProof:
        expect_list(items, cls.TAG, length=1)
        return cls(_signature(items[0], "signature"))


def handshake_signed_bytes(role: str, dialer_challenge: bytes, acceptor_challenge: bytes, dialer_id: int, acceptor_id: int) -> bytes:
    """What each side of a replica handshake signs: its role and the whole transcript.

    Naming the role and both fresh challenges means a proof one side gives can never be replayed
    as the other side's proof, nor relayed into another connection (no signing oracle).
    """
    return encode(["handshake", role, dialer_challenge, acceptor_challenge, dialer_id, acceptor_id])


# ---- client messages ----


@dataclass(frozen=True, slots=True)
class Request:
    TAG: ClassVar[str] = "request"
    transaction: Transaction

    def fields(self) -> list[Any]:
        return [self.transaction.to_plain()]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Request:
        expect_list(items, cls.TAG, length=1)
        return cls(Transaction.from_plain(items[0]))


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Ask a replica to send this connection the REPLYs for transactions from these accounts."""

    TAG: ClassVar[str] = "subscribe"
    accounts: tuple[bytes, ...]

    def fields(self) -> list[Any]:
        return [list(self.accounts)]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Subscribe:
        expect_list(items, cls.TAG, length=1)
        accounts = expect_list(items[0], "accounts", length_max=SUBSCRIBE_ACCOUNTS_MAX)
        return cls(tuple(expect_bytes(item, "account", PUBLIC_KEY_SIZE) for item in accounts))


# The signing domain kind of a BatchReply (ledger.crypto.signing_domain): replaces the old per-
# transaction "reply", so no signature made under that layout can pass for a batch reply.
BATCH_REPLY_DOMAIN = "batch-reply"
# A REPLY's Merkle path: one hash per level of a tree of at most BLOCK_TRANSACTIONS_MAX leaves.
REPLY_PATH_LENGTH_MAX = (BLOCK_TRANSACTIONS_MAX - 1).bit_length()

# What a replica states about one transaction of a block: (transaction id, result, index in the block).
ReplyEntry = tuple[bytes, TransactionResult, int]


def reply_leaf(transaction_id: bytes, result: TransactionResult, index: int) -> bytes:
    """The leaf of a batch reply's tree: everything a receipt states that the signed part does not.
    encode([transaction_id, result.to_plain(), index]), assembled (a replica makes one per transaction)."""
    if type(transaction_id) is not bytes or type(index) is not int or not 0 <= index < 1 << 64:
        return encode([transaction_id, result.to_plain(), index])
    return b"".join([_THREE_ITEMS, encode_hash(transaction_id), result.encoded(), encode_unsigned(index)])


_THREE_ITEMS = array_head(3)


@dataclass(frozen=True, slots=True)
class BatchReply:
    """A replica's one signature over the replies for a whole executed block: the root of a Merkle
    tree whose leaves are (transaction id, result, index) of the block's outcomes, in block order.

    Not the header's results root: that one covers results only, without transaction ids or
    indexes, and its leaves include deferred and replayed entries, which must never be signed
    as a reply (see ledger/application.py). The leaf count is bound by the sized root too."""

    replica_id: int
    view: int
    height: int
    block_hash: bytes
    replies_root: bytes
    leaf_count: int
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return encode(self.fields()[:-1])

    def fields(self) -> list[Any]:
        return [self.replica_id, self.view, self.height, self.block_hash, self.replies_root, self.leaf_count, self.signature]

    @classmethod
    def from_plain(cls, plain: Any) -> BatchReply:
        items = expect_list(plain, "batch reply", length=7)
        return cls(
            _replica(items[0], "replica"),
            expect_int(items[1], "view"),
            expect_int(items[2], "height", 1),
            _hash(items[3], "block hash"),
            _hash(items[4], "replies root"),
            expect_int(items[5], "leaf count", 1, BLOCK_TRANSACTIONS_MAX),
            _signature(items[6], "signature"),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """Where and how a transaction executed: one leaf of a replica's signed batch reply, with its
    Merkle path (unsigned: the path binds the leaf to the signed root, so the signature of one
    transaction's reply can never pass for another's)."""

    TAG: ClassVar[str] = "reply"
    batch: BatchReply
    transaction_id: bytes
    result: TransactionResult
    index: int
    position: int  # the leaf's place among the batch reply's leaves
    path: tuple[bytes, ...]

    @property
    def replica_id(self) -> int:
        return self.batch.replica_id

    @property
    def view(self) -> int:
        return self.batch.view

    @property
    def height(self) -> int:
        return self.batch.height

    @property
    def block_hash(self) -> bytes:
        return self.batch.block_hash

    def leaf(self) -> bytes:
        return reply_leaf(self.transaction_id, self.result, self.index)

    def path_leads_to_root(self) -> bool:
        """Whether this leaf sits at `position` of the signed tree (a few hashes, no signature)."""
        return verify_merkle_proof(self.leaf(), self.position, self.batch.leaf_count, list(self.path), self.batch.replies_root)

    def matching_key(self) -> tuple[Any, ...]:
        """What f+1 replies must agree on (the replica id and view may differ)."""
        return (self.transaction_id, self.result, self.height, self.block_hash, self.index)

    def fields(self) -> list[Any]:
        return [self.batch.fields(), self.transaction_id, self.result.to_plain(), self.index, self.position, list(self.path)]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Reply:
        expect_list(items, cls.TAG, length=6)
        return cls.from_batch_and_fields(BatchReply.from_plain(items[0]), items[1:])

    @classmethod
    def from_batch_and_fields(cls, batch: BatchReply, items: list[Any]) -> Reply:
        """The reply whose fields after its batch reply are `items`, under an already validated
        `batch` (a client reuses the one it validated for the block's other replies)."""
        expect_list(items, cls.TAG, length=5)
        path = expect_list(items[4], "reply path", length_max=REPLY_PATH_LENGTH_MAX)
        return cls(
            batch,
            _hash(items[0], "transaction id"),
            TransactionResult.from_plain(items[1]),
            expect_int(items[2], "index", 0, BLOCK_TRANSACTIONS_MAX - 1),
            expect_int(items[3], "reply position", 0, batch.leaf_count - 1),
            tuple(_hash(item, "reply path") for item in path),
        )


_REPLY_HEAD = array_head(7) + encode(Reply.TAG)


def _encode_reply_rest(reply: Reply) -> bytes:
    """The fields of a REPLY after its batch reply, encoded: what differs between a block's replies."""
    transaction_id, index, position, path = reply.transaction_id, reply.index, reply.position, reply.path
    if (
        type(transaction_id) is not bytes
        or type(index) is not int
        or type(position) is not int
        or not 0 <= index < 1 << 64
        or not 0 <= position < 1 << 64
    ):
        return encode_items([transaction_id, reply.result.to_plain(), index, position, list(path)])
    return b"".join(
        [
            encode_hash(transaction_id),
            reply.result.encoded(),
            encode_unsigned(index),
            encode_unsigned(position),
            array_head(len(path)),
            *[encode_hash(node) for node in path],
        ]
    )


class ReplyEncoder:
    """encode_message for REPLYs, the batch reply they share encoded once: a replica sends one
    REPLY per transaction, all of a block's under one batch reply. Holds each batch reply it
    encoded (so an identity it is keyed by is never reused): one encoder per round of replies."""

    def __init__(self) -> None:
        self._batches: dict[int, tuple[BatchReply, bytes]] = {}

    def encode(self, reply: Reply) -> bytes:
        if type(reply) is not Reply:
            return encode_message(reply)
        known = self._batches.get(id(reply.batch))
        if known is None:
            known = self._batches[id(reply.batch)] = (reply.batch, encode(reply.batch.fields()))
        return b"".join([_REPLY_HEAD, known[1], _encode_reply_rest(reply)])


def encode_replies(replies: list[Reply]) -> list[bytes]:
    """encode_message of each reply (see ReplyEncoder)."""
    encoder = ReplyEncoder()
    return [encoder.encode(reply) for reply in replies]


def make_replies(
    replica_id: int, view: int, height: int, block_hash: bytes, entries: list[ReplyEntry], sign: Callable[[bytes], bytes]
) -> list[Reply]:
    """One REPLY per entry, all under one BatchReply signed by `sign` (given its signed bytes):
    one signature per block, however many transactions it holds. No entries: no replies."""
    if not entries:
        return []
    root, paths = merkle_paths([reply_leaf(*entry) for entry in entries])
    unsigned = BatchReply(replica_id, view, height, block_hash, root, len(entries))
    batch = replace(unsigned, signature=sign(unsigned.signed_bytes()))
    return [
        Reply(batch, transaction_id, result, index, position, tuple(path))
        for position, ((transaction_id, result, index), path) in enumerate(zip(entries, paths, strict=True))
    ]


def make_reply(
    replica_id: int, view: int, height: int, block_hash: bytes, entries: list[ReplyEntry], position: int, sign: Callable[[bytes], bytes]
) -> Reply:
    """make_replies(...)[position] alone: one path (linear hashing) rather than all of them,
    for answering one retransmitted request from a stored block."""
    leaves = [reply_leaf(*entry) for entry in entries]
    unsigned = BatchReply(replica_id, view, height, block_hash, merkle_root(leaves), len(entries))
    batch = replace(unsigned, signature=sign(unsigned.signed_bytes()))
    transaction_id, result, index = entries[position]
    return Reply(batch, transaction_id, result, index, position, tuple(merkle_proof(leaves, position)))


@dataclass(frozen=True, slots=True)
class Query:
    """A read. Kinds: the application's ('account', 'get', 'key-prefix') and the ledger's ('transaction', 'block-hash', ...).

    `min_height` is the client's read floor: a replica answers only from state at least that high
    (else it says it is behind), which gives the client read-your-writes and monotonic reads.
    `nonce` is fresh random bytes per query, so an answer can never be replayed to another query,
    even one with the same id: every signed answer covers the digest of the whole query.
    """

    TAG: ClassVar[str] = "query"
    query_id: int
    kind: str
    argument: Any
    min_height: int
    nonce: bytes
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(encode(["query", self.query_id, self.kind, self.argument, self.min_height, self.nonce])).digest()
        object.__setattr__(self, "digest", digest)

    def fields(self) -> list[Any]:
        return [self.query_id, self.kind, self.argument, self.min_height, self.nonce]

    @classmethod
    def from_fields(cls, items: list[Any]) -> Query:
        expect_list(items, cls.TAG, length=5)
        argument = items[2]
        if not isinstance(argument, bytes | str | int) or isinstance(argument, bool):
            raise CodecError("query argument: expected bytes, text or an integer")
        return cls(
            expect_int(items[0], "query id"),
            expect_text(items[1], "query kind", QUERY_KIND_LENGTH_MAX),
            argument,
            expect_int(items[3], "query min height"),
            expect_bytes(items[4], "query nonce", QUERY_NONCE_SIZE),
        )


@dataclass(frozen=True, slots=True)
class QueryReply:
    """A replica's signed answer to exactly one query: the signature covers the query's digest.

    An answer from state below the query's `min_height` is not given; instead `error` starts with
    QUERY_BEHIND and `height` is the replica's own (the client does not count it and asks again).
    """

    TAG: ClassVar[str] = "query-reply"
    query_id: int
    query_digest: bytes
    replica_id: int
    height: int
    result: Any
    error: str
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        return encode(self.fields()[:-1])

    def fields(self) -> list[Any]:
        return [self.query_id, self.query_digest, self.replica_id, self.height, self.result, self.error, self.signature]

    @property
    def behind(self) -> bool:
        return self.error.startswith(QUERY_BEHIND)

    @classmethod
    def from_fields(cls, items: list[Any]) -> QueryReply:
        expect_list(items, cls.TAG, length=7)
        return cls(
            expect_int(items[0], "query id"),
            _hash(items[1], "query digest"),
            _replica(items[2], "replica"),
            expect_int(items[3], "height"),
            items[4],
            expect_text(items[5], "error", 1024),
            _signature(items[6], "signature"),
        )


@dataclass(frozen=True, slots=True)
class StatusQuery:
    TAG: ClassVar[str] = "status-query"
    query_id: int

    def fields(self) -> list[Any]:
        return [self.query_id]

    @classmethod
    def from_fields(cls, items: list[Any]) -> StatusQuery:
        expect_list(items, cls.TAG, length=1)
        return cls(expect_int(items[0], "query id"))


@dataclass(frozen=True, slots=True)
class StatusReply:
    TAG: ClassVar[str] = "status-reply"
    query_id: int
    replica_id: int
    view: int
    primary: int
    height: int
    last_block_hash: bytes
    stable_checkpoint: int
    view_changing: bool
    # (replica id, connections): peers this replica has more than one authenticated connection
    # from right now, so two processes hold that replica's key. Sorted by replica id.
    duplicate_identities: tuple[tuple[int, int], ...] = ()
    evidence_count: int = 0  # pieces of evidence of other replicas' equivocation this replica keeps
    version: str = ""  # the replica's package version, at most STATUS_VERSION_LENGTH_MAX characters
    uptime_s: int = 0  # whole seconds since the replica process started
    connected_peers: int = 0  # peers with an outgoing and an incoming connection open right now
    store_size_bytes: int = 0  # the SQLite store on disk: the database file plus its write-ahead log
    # The first block the replica keeps when it does not keep them all (pruned with retain_blocks,
    # or started from a snapshot); 0 for an archive that keeps every block from 1.
    base_height: int = 0

    def fields(self) -> list[Any]:
        return [
            self.query_id,
            self.replica_id,
            self.view,
            self.primary,
            self.height,
            self.last_block_hash,
            self.stable_checkpoint,
            self.view_changing,
            [list(pair) for pair in self.duplicate_identities],
            self.evidence_count,
            self.version,
            self.uptime_s,
            self.connected_peers,
            self.store_size_bytes,
            self.base_height,
        ]

    @classmethod
    def from_fields(cls, items: list[Any]) -> StatusReply:
        expect_list(items, cls.TAG, length=15)
        duplicates = []
        for pair in expect_list(items[8], "duplicate identities", length_max=REPLICAS_MAX):
            expect_list(pair, "duplicate identity", length=2)
            duplicates.append((_replica(pair[0], "duplicate replica"), expect_int(pair[1], "connections", 2)))
        return cls(
            expect_int(items[0], "query id"),
            _replica(items[1], "replica"),
            expect_int(items[2], "view"),
            _replica(items[3], "primary"),
            expect_int(items[4], "height"),
            _hash(items[5], "last block hash"),
            expect_int(items[6], "stable checkpoint"),
            expect_bool(items[7], "view changing"),
            tuple(duplicates),
            expect_int(items[9], "evidence count"),
            _status_version(items[10]),
            expect_int(items[11], "uptime"),
            expect_int(items[12], "connected peers", maximum=REPLICAS_MAX - 1),
            expect_int(items[13], "store size"),
            expect_int(items[14], "base height"),
        )


def _status_version(value: Any) -> str:
    text = expect_text(value, "version", STATUS_VERSION_LENGTH_MAX)
    if not (text.isascii() and text.isprintable()):
        raise CodecError("version: expected printable ASCII")
    return text


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Sent to a client whose message was refused, so it can say why instead of waiting.

    Unsigned and so not proof of anything: a client trusts a refusal only from f + 1 replicas.
    """

    TAG: ClassVar[str] = "error"
    transaction_id: bytes
    reason: str

    def fields(self) -> list[Any]:
        return [self.transaction_id, self.reason]

    @classmethod
    def from_fields(cls, items: list[Any]) -> ErrorReply:
        expect_list(items, cls.TAG, length=2)
        return cls(expect_bytes(items[0], "transaction id", length_max=HASH_SIZE), expect_text(items[1], "reason", 1024))


# Read-only after import: the closed set of message types a decoder accepts.
MESSAGE_TYPES: dict[str, Any] = {
    message_type.TAG: message_type
    for message_type in (
        PrePrepare,
        Prepare,
        Commit,
        PreparedRecord,
        Checkpoint,
        CheckpointCertificate,
        ViewChange,
        NewView,
        FetchBatch,
        BatchContent,
        Status,
        FetchBlocks,
        Blocks,
        FetchSnapshot,
        SnapshotChunk,
        Hello,
        HelloProof,
        Request,
        Subscribe,
        Reply,
        Query,
        QueryReply,
        StatusQuery,
        StatusReply,
        ErrorReply,
    )
}


def _encode_pre_prepare(message: PrePrepare) -> bytes:
    return b"".join(
        [
            array_head(6),
            encode_items([message.TAG, message.view, message.sequence]),
            message.batch.encoded,
            encode_items([message.replica_id, message.signature]),
        ]
    )


def _encode_prepared_record(message: PreparedRecord) -> bytes:
    batch = encode(None) if message.batch is None else message.batch.encoded
    return b"".join([array_head(3), encode_items([message.TAG, message.certificate.to_plain()]), batch])


def _encode_batch_content(message: BatchContent) -> bytes:
    return b"".join([array_head(2), encode(message.TAG), message.batch.encoded])


def _encode_request(message: Request) -> bytes:
    return b"".join([array_head(2), encode(message.TAG), message.transaction.encoded])


# Messages that carry transactions, encoded from the encodings the transactions already have
# (the same bytes as the generic encoding: tests/test_messages_encoding.py). By exact type.
_ASSEMBLED_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    PrePrepare: _encode_pre_prepare,
    PreparedRecord: _encode_prepared_record,
    BatchContent: _encode_batch_content,
    Request: _encode_request,
}


def encode_message(message: Any) -> bytes:
    assembled = _ASSEMBLED_ENCODERS.get(type(message))
    if assembled is not None:
        return assembled(message)
    return encode([message.TAG, *message.fields()])


def decode_message(data: bytes, known: KnownTransactions | None = None) -> Any:
    """Decode and validate one message; anything malformed raises CodecError. A PRE-PREPARE's
    transactions decoded before (`known`) are reused (KnownTransactions)."""
    items = decode_message_items(data)
    if known is not None and items[0] == PrePrepare.TAG:
        return PrePrepare.from_fields(items[1:], known)
    return message_from_items(items)


def decode_message_items(data: bytes) -> list[Any]:
    """The first half of decode_message: the CBOR decode, plain values checked, not yet a message."""
    items = decode(data)
    if not isinstance(items, list) or not items:
        raise CodecError("message: expected a non-empty array")
    return items


def reply_transaction_id(items: list[Any]) -> bytes | None:
    """The transaction a REPLY in decode_message_items form names, before anything else of it is
    checked; None if the items are not a REPLY. Only for dropping replies nobody waits for: a
    reply that names a transaction in flight is still validated whole (message_from_items)."""
    if len(items) == 7 and items[0] == Reply.TAG and type(items[2]) is bytes:
        return items[2]
    return None


def message_from_items(items: list[Any]) -> Any:
    """The second half of decode_message: the message the items make, validated."""
    tag = items[0]
    message_type = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if message_type is None:
        raise CodecError(f"message: unknown tag {tag!r}")
    return message_type.from_fields(items[1:])
