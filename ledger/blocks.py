"""Blocks, commit certificates, the genesis, and pure checks of a chain segment."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ledger.crypto import SIGNATURE_SIZE, NetworkIdentity, signing_domain, verify_signature
from ledger.encoding import (
    CodecError,
    array_head,
    decode,
    digest,
    encode,
    expect_bytes,
    expect_int,
    expect_list,
)
from ledger.merkle import merkle_proof, merkle_root, verify_merkle_proof
from ledger.transactions import OK_RESULT_ENCODED, Transaction, TransactionResult

HASH_SIZE = 32
REPLICAS_MAX = 64
BLOCK_TRANSACTIONS_MAX = 10_000

SignatureCheck = Callable[[bytes, bytes, bytes, bytes], bool]


class ChainError(ValueError):
    """A block or chain segment fails verification; the message says which block and why."""


_OK_RESULT_DIGEST = digest(OK_RESULT_ENCODED)


def results_root(results: Sequence[TransactionResult]) -> bytes:
    """The header commits to every result, so a block hash that f+1 replicas vouch for vouches
    for the results too (the commit certificate covers only the batch)."""
    ok_digest = _OK_RESULT_DIGEST
    return merkle_root([ok_digest if encoded is OK_RESULT_ENCODED else digest(encoded) for encoded in map(TransactionResult.encoded, results)])


def batch_digest(view: int, proposer: int, timestamp_ms: int, transactions_root: bytes) -> bytes:
    """What PRE-PREPAREs, PREPAREs and COMMITs agree on for one sequence number.

    It names the view and primary that first proposed the batch, so a batch re-proposed in a later
    view keeps its digest and every honest replica builds the same block header from it.
    """
    return digest(encode(["batch", view, proposer, timestamp_ms, transactions_root]))


def commit_signed_bytes(view: int, sequence: int, batch: bytes, replica_id: int) -> bytes:
    return encode([view, sequence, batch, replica_id])


@dataclass(frozen=True)
class BlockHeader:
    height: int
    view: int
    proposer: int
    parent_hash: bytes
    transactions_root: bytes
    results_root: bytes
    state_digest: bytes
    timestamp_ms: int
    block_hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_hash", digest(encode(self.to_plain())))

    def to_plain(self) -> list[Any]:
        return [
            self.height,
            self.view,
            self.proposer,
            self.parent_hash,
            self.transactions_root,
            self.results_root,
            self.state_digest,
            self.timestamp_ms,
        ]

    @classmethod
    def from_plain(cls, plain: Any) -> BlockHeader:
        items = expect_list(plain, "header", length=8)
        return cls(
            height=expect_int(items[0], "header height"),
            view=expect_int(items[1], "header view"),
            proposer=expect_int(items[2], "header proposer", 0, REPLICAS_MAX - 1),
            parent_hash=expect_bytes(items[3], "header parent hash", HASH_SIZE),
            transactions_root=expect_bytes(items[4], "header transactions root", HASH_SIZE),
            results_root=expect_bytes(items[5], "header results root", HASH_SIZE),
            state_digest=expect_bytes(items[6], "header state digest", HASH_SIZE),
            timestamp_ms=expect_int(items[7], "header timestamp"),
        )

    def batch_digest(self) -> bytes:
        return batch_digest(self.view, self.proposer, self.timestamp_ms, self.transactions_root)


@dataclass(frozen=True, slots=True)
class CommitCertificate:
    """The quorum of signed COMMITs that decided a block's batch, all cast in `view`."""

    view: int
    signatures: tuple[tuple[int, bytes], ...]

    def to_plain(self) -> list[Any]:
        return [self.view, [[replica_id, signature] for replica_id, signature in self.signatures]]

    @classmethod
    def from_plain(cls, plain: Any) -> CommitCertificate:
        items = expect_list(plain, "certificate", length=2)
        signatures = []
        for entry in expect_list(items[1], "certificate signatures", length_max=REPLICAS_MAX):
            replica_id, signature = expect_list(entry, "certificate signature", length=2)
            signatures.append(
                (
                    expect_int(replica_id, "certificate replica", 0, REPLICAS_MAX - 1),
                    expect_bytes(signature, "certificate signature", SIGNATURE_SIZE),
                )
            )
        return cls(expect_int(items[0], "certificate view"), tuple(signatures))


@dataclass(frozen=True)
class Block:
    header: BlockHeader
    transactions: tuple[Transaction, ...]
    results: tuple[TransactionResult, ...]
    certificate: CommitCertificate | None

    @property
    def height(self) -> int:
        return self.header.height

    @property
    def block_hash(self) -> bytes:
        return self.header.block_hash

    def to_plain(self) -> list[Any]:
        return [
            self.header.to_plain(),
            [transaction.to_plain() for transaction in self.transactions],
            [result.to_plain() for result in self.results],
            None if self.certificate is None else self.certificate.to_plain(),
        ]

    def encode(self) -> bytes:
        """encode(to_plain()), assembled from the transactions' encodings as they already are."""
        return b"".join(
            [
                array_head(4),
                encode(self.header.to_plain()),
                array_head(len(self.transactions)),
                *[transaction.encoded for transaction in self.transactions],
                array_head(len(self.results)),
                *[result.encoded() for result in self.results],
                encode(None if self.certificate is None else self.certificate.to_plain()),
            ]
        )

    @classmethod
    def from_plain(cls, plain: Any) -> Block:
        items = expect_list(plain, "block", length=4)
        transactions = tuple(
            Transaction.from_plain(item)
            for item in expect_list(items[1], "block transactions", length_max=BLOCK_TRANSACTIONS_MAX)
        )
        results = tuple(
            TransactionResult.from_plain(item)
            for item in expect_list(items[2], "block results", length_max=BLOCK_TRANSACTIONS_MAX)
        )
        certificate = None if items[3] is None else CommitCertificate.from_plain(items[3])
        return cls(BlockHeader.from_plain(items[0]), transactions, results, certificate)

    @classmethod
    def decode(cls, data: bytes) -> Block:
        return cls.from_plain(decode(data))

    def transaction_ids(self) -> list[bytes]:
        return [transaction.transaction_id for transaction in self.transactions]

    def computed_transactions_root(self) -> bytes:
        """The transactions root of this block's own contents (what verify_block_contents compares
        with its header), computed once: the contents are immutable."""
        root = self.__dict__.get("_computed_transactions_root")
        if root is None:
            root = merkle_root(self.transaction_ids())
            object.__setattr__(self, "_computed_transactions_root", root)
        return root

    def computed_results_root(self) -> bytes:
        """The results root of this block's own contents, computed once (see computed_transactions_root)."""
        root = self.__dict__.get("_computed_results_root")
        if root is None:
            root = results_root(self.results)
            object.__setattr__(self, "_computed_results_root", root)
        return root


def executed_block(
    header: BlockHeader,
    transactions: tuple[Transaction, ...],
    results: tuple[TransactionResult, ...],
    certificate: CommitCertificate | None,
    transactions_root: bytes,
    results_root: bytes,
) -> Block:
    """A block made of contents whose roots the caller has just computed from these very
    transactions and results (a replica executing a batch: the batch's root, and the root of the
    results it got): they are kept as the block's computed roots, so checking the block before it
    is stored does not hash its contents again. Only for roots computed from these contents."""
    block = Block(header, transactions, results, certificate)
    object.__setattr__(block, "_computed_transactions_root", transactions_root)
    object.__setattr__(block, "_computed_results_root", results_root)
    return block


def genesis_hash(network_id: str, replica_keys: Sequence[bytes], balances: dict[bytes, int]) -> bytes:
    """The parent hash of block 1: it pins the network id, the replicas and the initial balances."""
    accounts = [[account, balance] for account, balance in sorted(balances.items())]
    return digest(encode(["genesis", network_id, list(replica_keys), accounts]))


def commit_domain(network: NetworkIdentity) -> bytes:
    return signing_domain(network, "commit")


def verify_certificate(
    header: BlockHeader,
    certificate: CommitCertificate | None,
    network: NetworkIdentity,
    replica_keys: Sequence[bytes],
    quorum: int,
    check: SignatureCheck = verify_signature,
) -> None:
    """Raise ChainError unless a quorum of distinct replicas signed COMMIT for this block's batch."""
    if certificate is None:
        raise ChainError(f"block {header.height}: no commit certificate")
    if certificate.view < header.view:
        raise ChainError(f"block {header.height}: certificate view precedes the proposal view")
    domain = commit_domain(network)
    batch = header.batch_digest()
    signers: set[int] = set()
    for replica_id, signature in certificate.signatures:
        if replica_id >= len(replica_keys) or replica_id in signers:
            continue
        message = commit_signed_bytes(certificate.view, header.height, batch, replica_id)
        if check(replica_keys[replica_id], domain, message, signature):
            signers.add(replica_id)
    if len(signers) < quorum:
        raise ChainError(
            f"block {header.height}: {len(signers)} valid commit signatures, {quorum} needed"
        )


def verify_block_contents(block: Block) -> None:
    """Raise ChainError unless the block's transactions and results match its header."""
    header = block.header
    # Cheapest first: a bad block costs no more hashing than it did before the roots were cached.
    if block.computed_transactions_root() != header.transactions_root:
        raise ChainError(f"block {header.height}: transactions do not match the transactions root")
    if len(block.results) != len(block.transactions):
        raise ChainError(f"block {header.height}: {len(block.results)} results for {len(block.transactions)} transactions")
    if block.computed_results_root() != header.results_root:
        raise ChainError(f"block {header.height}: results do not match the results root")
    if len(set(block.transaction_ids())) != len(block.transactions):
        raise ChainError(f"block {header.height}: a transaction appears twice")


class Executes(Protocol):
    """What re-executing a block needs from an application (see ledger/application.py)."""

    def execute_block(self, transactions: list[Transaction]) -> list[TransactionResult]: ...

    def state_digest(self) -> bytes: ...


def verify_execution(application: Executes, block: Block) -> None:
    """Execute the block's transactions and raise ChainError unless the results and the state
    digest are the ones the block records: how a replica replays its own store and how a client
    checks a chain it trusts for nothing."""
    results = application.execute_block(list(block.transactions))
    if tuple(results) != block.results:
        raise ChainError(f"block {block.height}: stored results differ from re-execution")
    if application.state_digest() != block.header.state_digest:
        raise ChainError(f"block {block.height}: state digest differs from re-execution")


def verify_chain_segment(blocks: Sequence[Block], parent_hash: bytes, parent_height: int) -> None:
    """Raise ChainError unless blocks extend (parent_height, parent_hash) link by link.

    Checks heights, parent hashes and transaction roots; certificates are checked separately
    because they need the replicas' public keys.
    """
    expected_parent = parent_hash
    expected_height = parent_height + 1
    for block in blocks:
        header = block.header
        if header.height != expected_height:
            raise ChainError(f"expected block {expected_height}, found block {header.height}")
        if header.parent_hash != expected_parent:
            raise ChainError(f"block {header.height}: parent hash does not match block {header.height - 1}")
        verify_block_contents(block)
        expected_parent = header.block_hash
        expected_height += 1


@dataclass(frozen=True, slots=True)
class TransactionProof:
    """A receipt anyone can check offline: the transaction is at `index` of a certified block."""

    transaction: Transaction
    index: int
    leaf_count: int
    path: tuple[bytes, ...]
    header: BlockHeader
    certificate: CommitCertificate

    def verify(self, network: NetworkIdentity, replica_keys: Sequence[bytes], quorum: int) -> None:
        if not verify_merkle_proof(
            self.transaction.transaction_id, self.index, self.leaf_count, list(self.path), self.header.transactions_root
        ):
            raise ChainError("transaction proof: Merkle path does not lead to the transactions root")
        verify_certificate(self.header, self.certificate, network, replica_keys, quorum)

    def to_plain(self) -> list[Any]:
        return [
            self.transaction.to_plain(),
            self.index,
            self.leaf_count,
            list(self.path),
            self.header.to_plain(),
            self.certificate.to_plain(),
        ]

    @classmethod
    def from_plain(cls, plain: Any) -> TransactionProof:
        items = expect_list(plain, "transaction proof", length=6)
        leaf_count = expect_int(items[2], "proof leaf count", 1, BLOCK_TRANSACTIONS_MAX)
        path = tuple(expect_bytes(item, "proof path", HASH_SIZE) for item in expect_list(items[3], "proof path", length_max=64))
        return cls(
            Transaction.from_plain(items[0]),
            expect_int(items[1], "proof index", 0, leaf_count - 1),
            leaf_count,
            path,
            BlockHeader.from_plain(items[4]),
            CommitCertificate.from_plain(items[5]),
        )


def prove_transaction(block: Block, index: int) -> TransactionProof:
    if block.certificate is None:
        raise CodecError("a block without a certificate cannot prove anything")
    ids = block.transaction_ids()
    return TransactionProof(
        block.transactions[index], index, len(ids), tuple(merkle_proof(ids, index)), block.header, block.certificate
    )
