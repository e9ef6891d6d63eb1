"""Transaction receipts that anyone holding the network's public keys can check offline.

A receipt file is one canonical CBOR map (ledger/encoding.py), named by "format" and "version",
holding exactly the objects the replicas signed, in the encoding their signatures cover:

- the transaction and its result, with Merkle paths from each to the block header's
  transactions root and results root;
- the block header and its commit certificate: 2f+1 replicas signed COMMIT for the batch, which
  fixes the transactions root at that height;
- f+1 replicas' signed answers to a "block-hash" query naming this header's hash. The commit
  certificate covers only the batch (view, proposer, timestamp, transactions root), not the
  results root, state digest or parent hash: without these answers a receipt could claim any
  result for a committed transaction. With them, one honest replica vouches for the whole header;
- the network id and genesis hash, so a receipt is never read against the wrong network.

A receipt proves only an entry where the transaction executed (ledger.application.is_outcome):
honest blocks also hold "deferred:" and "replayed:" entries, whose "failed" is not the
transaction's outcome (it executed, or may still execute, elsewhere), so none is accepted.

Checking needs nothing but the network configuration (ids and public keys); it never contacts
the network. Every check failure raises ReceiptError with one line saying what failed.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.application import is_deferred, is_outcome
from ledger.blocks import (
    BLOCK_TRANSACTIONS_MAX,
    HASH_SIZE,
    REPLICAS_MAX,
    Block,
    BlockHeader,
    ChainError,
    CommitCertificate,
    SignatureCheck,
    commit_domain,
    commit_signed_bytes,
    verify_certificate,
)
from ledger.config import NetworkConfig
from ledger.crypto import SIGNATURE_SIZE, signing_domain, verify_signature
from ledger.encoding import (
    CodecError,
    decode,
    digest,
    encode,
    expect_bytes,
    expect_int,
    expect_list,
    expect_text,
)
from ledger.merkle import merkle_proof, verify_merkle_proof
from ledger.messages import QUERY_NONCE_SIZE, Query, QueryReply
from ledger.sizes import (
    HASH_ENCODED_SIZE,
    INTEGER_SIZE_MAX,
    REPLICA_ID_SIZE,
    SIGNATURE_ENCODED_SIZE,
    bytes_size,
    head_size,
    result_size_max,
    signature_list_size,
    text_size,
    transaction_size_max,
)
from ledger.transactions import Transaction, TransactionResult, transaction_domain

RECEIPT_FORMAT = "pbft-ledger/transaction-receipt"
RECEIPT_VERSION = 1
NETWORK_ID_LENGTH_MAX = 64
# A Merkle path has one hash per level; a block holds at most BLOCK_TRANSACTIONS_MAX (10,000 < 2**14)
# transactions, so 14 levels at most; 32 leaves room without letting a file grow without bound.
MERKLE_PATH_LENGTH_MAX = 32
BLOCK_HASH_QUERY = "block-hash"

FIELDS = (
    "format",
    "version",
    "network_id",
    "genesis_hash",
    "transaction",
    "result",
    "index",
    "leaf_count",
    "transaction_path",
    "result_path",
    "header",
    "certificate",
    "block_hash_query",
    "block_hash_signatures",
)


class ReceiptError(ValueError):
    """A receipt is malformed or does not prove what it claims; the message says what failed."""


@dataclass(frozen=True, slots=True)
class BlockHashSignature:
    """One replica's signed QUERY-REPLY saying the block at the header's height has this hash."""

    replica_id: int
    height: int  # the replica's own ledger height when it answered, part of what it signed
    signature: bytes


@dataclass(frozen=True)
class TransactionReceipt:
    network_id: str
    genesis_hash: bytes
    transaction: Transaction
    result: TransactionResult
    index: int
    leaf_count: int
    transaction_path: tuple[bytes, ...]
    result_path: tuple[bytes, ...]
    header: BlockHeader
    certificate: CommitCertificate
    # The block-hash query the signatures answer: (query id, min height, nonce); its kind is
    # "block-hash" and its argument the header's height, so neither can be swapped for another.
    query_id: int
    query_min_height: int
    query_nonce: bytes
    block_hash_signatures: tuple[BlockHashSignature, ...]

    @property
    def height(self) -> int:
        return self.header.height

    def query(self) -> Query:
        return Query(self.query_id, BLOCK_HASH_QUERY, self.header.height, self.query_min_height, self.query_nonce)

    def reply(self, signed: BlockHashSignature) -> QueryReply:
        """The QUERY-REPLY whose signed bytes this entry's signature covers."""
        return QueryReply(self.query_id, self.query().digest, signed.replica_id, signed.height, self.header.block_hash, "", signed.signature)

    def to_plain(self) -> dict[str, Any]:
        return {
            "format": RECEIPT_FORMAT,
            "version": RECEIPT_VERSION,
            "network_id": self.network_id,
            "genesis_hash": self.genesis_hash,
            "transaction": self.transaction.to_plain(),
            "result": self.result.to_plain(),
            "index": self.index,
            "leaf_count": self.leaf_count,
            "transaction_path": list(self.transaction_path),
            "result_path": list(self.result_path),
            "header": self.header.to_plain(),
            "certificate": self.certificate.to_plain(),
            "block_hash_query": [self.query_id, self.query_min_height, self.query_nonce],
            "block_hash_signatures": [[item.replica_id, item.height, item.signature] for item in self.block_hash_signatures],
        }

    def encode(self) -> bytes:
        return encode(self.to_plain())

    @classmethod
    def from_plain(cls, plain: Any) -> TransactionReceipt:
        if not isinstance(plain, dict):
            raise CodecError("receipt: expected a CBOR map")
        if plain.get("format") != RECEIPT_FORMAT:
            raise CodecError(f"not a transaction receipt (format {str(plain.get('format'))[:64]!r}, expected {RECEIPT_FORMAT!r})")
        version = plain.get("version")
        if version != RECEIPT_VERSION:
            shown = version if isinstance(version, int) and not isinstance(version, bool) else repr(version)[:20]
            raise CodecError(f"receipt version {shown} is not supported (this build reads version {RECEIPT_VERSION})")
        # Names shown as repr, few and short: the message stays one line whatever the file holds.
        unknown = sorted(repr(key)[:32] for key in plain if key not in FIELDS)
        missing = [name for name in FIELDS if name not in plain]
        if unknown or missing:
            more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
            raise CodecError(f"receipt fields: missing {', '.join(missing) or 'none'}; unknown {', '.join(unknown[:4]) or 'none'}{more}")
        network_id = expect_text(plain["network_id"], "receipt network id", NETWORK_ID_LENGTH_MAX)
        leaf_count = expect_int(plain["leaf_count"], "receipt leaf count", 1, BLOCK_TRANSACTIONS_MAX)
        query = expect_list(plain["block_hash_query"], "receipt block-hash query", length=3)
        signatures = []
        for entry in expect_list(plain["block_hash_signatures"], "receipt block-hash signatures", length_max=REPLICAS_MAX):
            replica_id, height, signature = expect_list(entry, "receipt block-hash signature", length=3)
            signatures.append(
                BlockHashSignature(
                    expect_int(replica_id, "block-hash signature replica", 0, REPLICAS_MAX - 1),
                    expect_int(height, "block-hash signature height"),
                    expect_bytes(signature, "block-hash signature", SIGNATURE_SIZE),
                )
            )
        return cls(
            network_id=network_id,
            genesis_hash=expect_bytes(plain["genesis_hash"], "receipt genesis hash", HASH_SIZE),
            transaction=Transaction.from_plain(plain["transaction"]),
            result=TransactionResult.from_plain(plain["result"]),
            index=expect_int(plain["index"], "receipt index", 0, leaf_count - 1),
            leaf_count=leaf_count,
            transaction_path=_path(plain["transaction_path"], "receipt transaction path"),
            result_path=_path(plain["result_path"], "receipt result path"),
            header=BlockHeader.from_plain(plain["header"]),
            certificate=CommitCertificate.from_plain(plain["certificate"]),
            query_id=expect_int(query[0], "receipt block-hash query id"),
            query_min_height=expect_int(query[1], "receipt block-hash query min height"),
            query_nonce=expect_bytes(query[2], "receipt block-hash query nonce", QUERY_NONCE_SIZE),
            block_hash_signatures=tuple(signatures),
        )

    @classmethod
    def decode(cls, data: bytes) -> TransactionReceipt:
        """Parse a receipt file's bytes; ReceiptError for anything that is not a well-formed receipt."""
        if len(data) > receipt_size_max():
            raise ReceiptError(f"{len(data)} bytes, larger than any valid receipt ({receipt_size_max()} bytes at most)")
        try:
            receipt = cls.from_plain(decode(data))
        except CodecError as error:
            raise ReceiptError(f"not a valid receipt: {error}") from None
        if receipt.encode() != data:
            # One receipt, one encoding: the file is exactly the canonical bytes of what it holds.
            raise ReceiptError("not a valid receipt: not in canonical CBOR (the bytes were changed)")
        return receipt


def _path(value: Any, name: str) -> tuple[bytes, ...]:
    return tuple(expect_bytes(item, name, HASH_SIZE) for item in expect_list(value, name, length_max=MERKLE_PATH_LENGTH_MAX))


def result_leaf(result: TransactionResult) -> bytes:
    """A result's leaf in the results root (as ledger.blocks.results_root hashes it)."""
    return digest(encode(result.to_plain()))


def not_outcome_problem(result: TransactionResult, height: int, index: int) -> str | None:
    """Why the entry at (height, index) cannot be a receipt's subject, or None if it can."""
    if is_outcome(result):
        return None
    kind = "deferred: it may still execute later" if is_deferred(result) else "replayed: its nonce was used before"
    return (
        f"the entry at block {height} index {index} ({result.describe()[:120]!r}) is not the transaction's outcome "
        f"({kind}); a receipt must come from the block where it executed (ledger-client tx ID --save finds it)"
    )


def build_receipt(
    network: NetworkConfig,
    block: Block,
    index: int,
    query: Query,
    replies: Sequence[QueryReply],
) -> TransactionReceipt:
    """A receipt for transaction `index` of `block` (whose certificate the caller verified), from
    the signed replies that answered a block-hash `query` for it."""
    if block.certificate is None:
        raise ReceiptError(f"block {block.height} has no commit certificate")
    problem = not_outcome_problem(block.results[index], block.height, index)
    if problem is not None:
        raise ReceiptError(problem)
    if query.kind != BLOCK_HASH_QUERY or query.argument != block.height:
        raise ReceiptError(f"the signed answers are to a {query.kind!r} query, not one for block {block.height}'s hash")
    transaction_ids = block.transaction_ids()
    receipt = TransactionReceipt(
        network_id=network.network_id,
        genesis_hash=network.genesis_hash,
        transaction=block.transactions[index],
        result=block.results[index],
        index=index,
        leaf_count=len(transaction_ids),
        transaction_path=tuple(merkle_proof(transaction_ids, index)),
        result_path=tuple(merkle_proof([result_leaf(result) for result in block.results], index)),
        header=block.header,
        certificate=block.certificate,
        query_id=query.query_id,
        query_min_height=query.min_height,
        query_nonce=query.nonce,
        block_hash_signatures=tuple(
            sorted(
                (BlockHashSignature(reply.replica_id, reply.height, reply.signature) for reply in replies),
                key=lambda item: item.replica_id,
            )
        ),
    )
    return receipt


@dataclass(frozen=True, slots=True)
class ReceiptCheck:
    """What a successful check established."""

    receipt: TransactionReceipt
    certificate_signers: tuple[int, ...]
    block_hash_signers: tuple[int, ...]


def verify_receipt(receipt: TransactionReceipt, network: NetworkConfig, check: SignatureCheck = verify_signature) -> ReceiptCheck:
    """Check a receipt against the network's configuration alone; ReceiptError says what failed.

    transaction hash -> Merkle path -> header -> commit certificate (2f+1 distinct replicas,
    valid signatures over this header's batch), and result -> Merkle path -> the same header,
    whose hash f+1 distinct replicas signed (so one honest replica vouches for it)."""
    if receipt.network_id != network.network_id:
        raise ReceiptError(f"the receipt is for network {receipt.network_id!r}, this config is for network {network.network_id!r}")
    if receipt.genesis_hash != network.genesis_hash:
        raise ReceiptError(
            f"the receipt's genesis hash differs from network {network.network_id!r}'s "
            "(another network with the same id: other replica keys or genesis balances)"
        )
    # A deferred or replayed entry sits in honest, fully signed blocks: every signature below
    # would verify, yet its "failed" is not what happened to the transaction.
    problem = not_outcome_problem(receipt.result, receipt.header.height, receipt.index)
    if problem is not None:
        raise ReceiptError(problem)
    header = receipt.header
    if header.height == 1 and header.parent_hash != network.genesis_hash:
        raise ReceiptError(f"block 1's parent hash is not the genesis hash of network {network.network_id!r}")
    transaction = receipt.transaction
    transaction_id = transaction.transaction_id
    if not check(transaction.sender, transaction_domain(network.identity), transaction.signed_bytes(), transaction.signature):
        raise ReceiptError(f"transaction {transaction_id.hex()}: its sender's signature does not verify")
    header = receipt.header
    if not verify_merkle_proof(transaction_id, receipt.index, receipt.leaf_count, list(receipt.transaction_path), header.transactions_root):
        raise ReceiptError(
            f"transaction {transaction_id.hex()}: the Merkle path does not lead from it (index {receipt.index} "
            f"of {receipt.leaf_count}) to block {header.height}'s transactions root"
        )
    if not verify_merkle_proof(result_leaf(receipt.result), receipt.index, receipt.leaf_count, list(receipt.result_path), header.results_root):
        raise ReceiptError(f"result {receipt.result.describe()!r}: the Merkle path does not lead to block {header.height}'s results root")
    try:
        verify_certificate(header, receipt.certificate, network.identity, network.replica_keys, network.quorum, check)
    except ChainError as error:
        raise ReceiptError(f"commit certificate: {error}") from None
    certificate_signers = _valid_commit_signers(receipt, network, check)
    domain_reply = signing_domain(network.identity, "query-reply")
    block_hash_signers: list[int] = []
    for signed in receipt.block_hash_signatures:
        if signed.replica_id >= network.replica_count or signed.replica_id in block_hash_signers:
            continue
        reply = receipt.reply(signed)
        if check(network.replica_keys[signed.replica_id], domain_reply, reply.signed_bytes(), reply.signature):
            block_hash_signers.append(signed.replica_id)
    if len(block_hash_signers) < network.reply_quorum:
        raise ReceiptError(
            f"block {header.height}'s hash {header.block_hash.hex()[:16]} (which covers the result): "
            f"{len(block_hash_signers)} valid replica signatures, f+1 = {network.reply_quorum} needed"
        )
    return ReceiptCheck(receipt, certificate_signers, tuple(sorted(block_hash_signers)))


def _valid_commit_signers(receipt: TransactionReceipt, network: NetworkConfig, check: SignatureCheck) -> tuple[int, ...]:
    """The distinct replicas whose COMMIT signature in the certificate verifies (for the summary)."""
    domain = commit_domain(network.identity)
    batch = receipt.header.batch_digest()
    signers: set[int] = set()
    for replica_id, signature in receipt.certificate.signatures:
        if replica_id >= network.replica_count or replica_id in signers:
            continue
        message = commit_signed_bytes(receipt.certificate.view, receipt.header.height, batch, replica_id)
        if check(network.replica_keys[replica_id], domain, message, signature):
            signers.add(replica_id)
    return tuple(sorted(signers))


def receipt_size_max() -> int:
    """An upper bound of a receipt file's size: every field at its largest valid value (see
    ledger/sizes.py), certificates and block-hash signatures from REPLICAS_MAX replicas: 31,428 bytes."""
    keys = sum(text_size(len(name)) for name in FIELDS)
    header = head_size(8) + 3 * INTEGER_SIZE_MAX + REPLICA_ID_SIZE + 4 * HASH_ENCODED_SIZE
    certificate = head_size(2) + INTEGER_SIZE_MAX + signature_list_size(REPLICAS_MAX)
    path = head_size(MERKLE_PATH_LENGTH_MAX) + MERKLE_PATH_LENGTH_MAX * HASH_ENCODED_SIZE
    query = head_size(3) + 2 * INTEGER_SIZE_MAX + bytes_size(QUERY_NONCE_SIZE)
    signed_answer = head_size(3) + REPLICA_ID_SIZE + INTEGER_SIZE_MAX + SIGNATURE_ENCODED_SIZE
    values = (
        text_size(len(RECEIPT_FORMAT))
        + INTEGER_SIZE_MAX  # version
        + text_size(NETWORK_ID_LENGTH_MAX)
        + HASH_ENCODED_SIZE  # genesis hash
        + transaction_size_max()
        + result_size_max()
        + 2 * INTEGER_SIZE_MAX  # index, leaf count
        + 2 * path
        + header
        + certificate
        + query
        + head_size(REPLICAS_MAX)
        + REPLICAS_MAX * signed_answer
    )
    return head_size(len(FIELDS)) + keys + values



def shown_path(path: Path | str) -> str:
    """A file name as an error line shows it: as it is when printable, else escaped as repr does,
    so no name (a newline in it, undecodable bytes) can add a line or fail to print."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def read_receipt_file(path: Path) -> TransactionReceipt:
    """Read and parse a receipt file, reading at most one byte more than the largest valid receipt.

    OSError if it cannot be opened; ReceiptError, naming the file, if it is not a regular file,
    too large, or not a receipt."""
    # Non-blocking, so a FIFO named as the file cannot hang the check.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ReceiptError(f"{shown_path(path)}: not a regular file")
        data = file.read(receipt_size_max() + 1)
    if len(data) > receipt_size_max():
        raise ReceiptError(f"{shown_path(path)}: larger than any valid receipt ({receipt_size_max()} bytes at most)")
    try:
        return TransactionReceipt.decode(data)
    except ReceiptError as error:
        raise ReceiptError(f"{shown_path(path)}: {error}") from None


# Attempts at a fresh temporary name: 64 random bits each, so a second one is needed only if
# someone else creates files of that pattern in the directory.
TEMPORARY_NAME_ATTEMPTS = 16


def _create_temporary(directory: Path) -> tuple[int, Path]:
    """A new, empty file beside the receipt, opened for writing. Its name is short whatever the
    receipt's (a name of the longest valid length still works), and it is created with mode 0666
    minus the umask, as any file a program writes: a receipt is public, unlike mkstemp's 0600."""
    for _ in range(TEMPORARY_NAME_ATTEMPTS):
        temporary = directory / f".receipt-{secrets.token_hex(8)}.tmp"
        try:
            # O_EXCL: never an existing file, nor through a symbolic link planted under that name.
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), temporary
        except FileExistsError:
            continue
    # Not FileExistsError: that would read as "the receipt file exists".
    raise OSError(f"no free temporary name in {shown_path(directory)} after {TEMPORARY_NAME_ATTEMPTS} attempts")


def write_receipt_file(path: Path, receipt: TransactionReceipt, force: bool = False) -> None:
    """Write a receipt atomically: a temporary file beside it, flushed to disk, then linked (or,
    with `force`, renamed) into place, so a crash leaves the old file or the whole new one.

    FileExistsError if `path` exists and not `force`: linking, unlike a check before renaming,
    cannot overwrite a file that appears in the meantime."""
    data = receipt.encode()
    directory = path.parent if str(path.parent) else Path(".")
    descriptor, temporary = _create_temporary(directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if force:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise
            except OSError:
                # A file system without hard links: check, then rename (a narrow race, documented).
                if path.exists():
                    raise FileExistsError(path) from None
                os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
    directory_descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)
