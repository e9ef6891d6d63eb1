"""Builders for the ledger tests: deterministic keys, signed transactions and certified chains."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ledger.application import AccountsApplication
from ledger.blocks import (
    Block,
    BlockHeader,
    CommitCertificate,
    commit_domain,
    commit_signed_bytes,
    results_root,
)
from ledger.config import Address, NetworkConfig, ProtocolSettings, ReplicaInfo
from ledger.crypto import NetworkIdentity, SigningKey, signing_domain, write_key_file
from ledger.merkle import merkle_root
from ledger.messages import CheckpointCertificate, checkpoint_signed_bytes
from ledger.restore import restore_application
from ledger.storage import BlockStore
from ledger.transactions import Put, Transaction, TransactionResult, Transfer, sign_transaction


def deterministic_key(label: str) -> SigningKey:
    """A signing key derived from a label, so every run signs the same bytes."""
    return SigningKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


@dataclass(frozen=True)
class LedgerNetwork:
    """A made-up network: its id, its replicas' keys and one funded client."""


    network_id: str
    replica_signing_keys: tuple[SigningKey, ...]
    client_key: SigningKey
    client_balance: int = 1_000_000
    balances: dict[bytes, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "balances", {self.client_key.public_key: self.client_balance})

    @property
    def config(self) -> NetworkConfig:
        """The same network as the product describes it: f, quorum and genesis come from there."""
        replicas = tuple(
            ReplicaInfo(index, key.public_key, Address("127.0.0.1", 1 + 2 * index), Address("127.0.0.1", 2 + 2 * index))
            for index, key in enumerate(self.replica_signing_keys)
        )
        return NetworkConfig(self.network_id, replicas, ProtocolSettings(), self.balances)

    @property
    def replica_keys(self) -> tuple[bytes, ...]:
        return self.config.replica_keys

    @property
    def replica_count(self) -> int:
        return self.config.replica_count

    @property
    def faults_tolerated(self) -> int:
        return self.config.faults_tolerated

    @property
    def quorum(self) -> int:
        return self.config.quorum

    @property
    def genesis(self) -> bytes:
        return self.config.genesis_hash

    @property
    def identity(self) -> NetworkIdentity:
        return self.config.identity


def make_network(network_id: str = "test-net", replica_count: int = 4) -> LedgerNetwork:
    replica_keys = tuple(deterministic_key(f"{network_id}/replica-{index}") for index in range(replica_count))
    return LedgerNetwork(network_id, replica_keys, deterministic_key(f"{network_id}/client"))


def make_transactions(network: LedgerNetwork, first_nonce: int, count: int) -> list[Transaction]:
    """Alternating puts and transfers from the network's client, with consecutive nonces."""
    recipient = deterministic_key(f"{network.network_id}/recipient").public_key
    transactions = []
    for nonce in range(first_nonce, first_nonce + count):
        if nonce % 2:
            operation: Put | Transfer = Transfer(recipient, 1 + nonce % 7)
        else:
            operation = Put(f"key-{nonce % 5}", f"value-{nonce}")
        transactions.append(sign_transaction(network.identity, network.client_key, nonce, operation))
    return transactions


def sign_certificate(
    network: LedgerNetwork,
    header: BlockHeader,
    signers: Sequence[int] | None = None,
    view: int | None = None,
    identity: NetworkIdentity | None = None,
) -> CommitCertificate:
    """COMMIT signatures over the header's batch by `signers` (default: the first quorum)."""
    certificate_view = header.view if view is None else view
    domain = commit_domain(network.identity if identity is None else identity)
    chosen = range(network.quorum) if signers is None else signers
    signatures = tuple(
        (
            replica_id,
            network.replica_signing_keys[replica_id].sign(
                domain, commit_signed_bytes(certificate_view, header.height, header.batch_digest(), replica_id)
            ),
        )
        for replica_id in chosen
    )
    return CommitCertificate(certificate_view, signatures)


def sign_checkpoint_certificate(
    network: LedgerNetwork, sequence: int, state_digest: bytes, block_hash: bytes, signers: Sequence[int] | None = None
) -> CheckpointCertificate:
    """CHECKPOINTs over (sequence, state digest, block hash) by `signers` (default: the first
    quorum): what 2f+1 replicas that reached that checkpoint would have made stable."""
    domain = signing_domain(network.identity, "checkpoint")
    chosen = sorted(range(network.quorum) if signers is None else signers)
    signatures = tuple(
        (
            replica_id,
            network.replica_signing_keys[replica_id].sign(
                domain, checkpoint_signed_bytes(sequence, state_digest, block_hash, replica_id)
            ),
        )
        for replica_id in chosen
    )
    return CheckpointCertificate(sequence, state_digest, block_hash, signatures)


def build_block(
    network: LedgerNetwork,
    parent_hash: bytes,
    height: int,
    transactions: Sequence[Transaction],
    view: int = 0,
    timestamp_ms: int | None = None,
) -> Block:
    results = tuple(TransactionResult(True) for _ in transactions)
    header = BlockHeader(
        height=height,
        view=view,
        proposer=view % network.replica_count,
        parent_hash=parent_hash,
        transactions_root=merkle_root([transaction.transaction_id for transaction in transactions]),
        results_root=results_root(results),
        state_digest=hashlib.sha256(b"state %d" % height).digest(),
        timestamp_ms=1_700_000_000_000 + height if timestamp_ms is None else timestamp_ms,
    )
    return Block(header, tuple(transactions), results, sign_certificate(network, header))


def build_chain(
    network: LedgerNetwork,
    count: int,
    transactions_per_block: int = 3,
    parent_hash: bytes | None = None,
    parent_height: int = 0,
) -> list[Block]:
    """`count` certified blocks extending (parent_height, parent_hash), genesis by default."""
    blocks: list[Block] = []
    parent = network.genesis if parent_hash is None else parent_hash
    for height in range(parent_height + 1, parent_height + count + 1):
        first_nonce = (height - 1) * transactions_per_block
        transactions = make_transactions(network, first_nonce, transactions_per_block)
        block = build_block(network, parent, height, transactions, view=height % 3)
        blocks.append(block)
        parent = block.block_hash
    return blocks


def build_executed_chain(network: LedgerNetwork, count: int, transactions_per_block: int = 3) -> list[Block]:
    """`count` certified blocks whose results and state digests are those of really executing
    them from the network's genesis balances: a chain a client's full verification accepts."""
    return extend_executed_chain(network, AccountsApplication(network.balances), network.genesis, 0, count, transactions_per_block)


def extend_executed_chain(
    network: LedgerNetwork,
    application: AccountsApplication,
    parent_hash: bytes,
    parent_height: int,
    count: int,
    transactions_per_block: int = 3,
    distinct_keys: bool = False,
) -> list[Block]:
    """`count` certified blocks after (parent_height, parent_hash), executed on `application`
    (which ends at the last one's state). With `distinct_keys` every put writes a new key, so
    the state grows with the history (the worst case for a restart that reads the state)."""
    blocks: list[Block] = []
    parent = parent_hash
    for height in range(parent_height + 1, parent_height + count + 1):
        first_nonce = application.account(network.client_key.public_key).nonce
        transactions = make_transactions(network, first_nonce, transactions_per_block)
        if distinct_keys:
            transactions = [
                sign_transaction(network.identity, network.client_key, transaction.nonce, Put(f"key-{transaction.nonce}", "v"))
                if isinstance(transaction.operation, Put)
                else transaction
                for transaction in transactions
            ]
        results = tuple(application.execute_block(transactions))
        header = BlockHeader(
            height=height,
            view=0,
            proposer=0,
            parent_hash=parent,
            transactions_root=merkle_root([transaction.transaction_id for transaction in transactions]),
            results_root=results_root(results),
            state_digest=application.state_digest(),
            timestamp_ms=1_700_000_000_000 + height,
        )
        blocks.append(Block(header, tuple(transactions), results, sign_certificate(network, header)))
        parent = header.block_hash
    return blocks


def write_network_config(network: LedgerNetwork, directory: Path, replica_id: int = 0) -> Path:
    """A replica config (and its key file) for this made-up network, as `ledger-node init` writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    write_key_file(directory / f"replica-{replica_id}.key", network.replica_signing_keys[replica_id])
    lines = [
        "[replica]",
        f"id = {replica_id}",
        f'key_file = "replica-{replica_id}.key"',
        f'data_dir = "data/replica-{replica_id}"',
        "",
        "[network]",
        f'id = "{network.network_id}"',
        "",
    ]
    for index, key in enumerate(network.replica_signing_keys):
        lines += [
            "[[replicas]]",
            f"id = {index}",
            f'public_key = "{key.public_key.hex()}"',
            f'address = "127.0.0.1:{17000 + 2 * index}"',
            f'client_address = "127.0.0.1:{17001 + 2 * index}"',
            "",
        ]
    for account, balance in network.balances.items():
        lines += ["[[genesis.accounts]]", f'public_key = "{account.hex()}"', f"balance = {balance}", ""]
    path = directory / f"replica-{replica_id}.toml"
    path.write_text("\n".join(lines))
    return path


def open_replica_store(
    path: Path, network: LedgerNetwork, retain_blocks: int | None = None
) -> tuple[BlockStore, AccountsApplication, int]:
    """As a replica starts (node/runtime.py): open, restore, and say how many blocks it re-executed."""
    store = BlockStore.open(path, network.genesis, retain_blocks=retain_blocks)
    try:
        restored = restore_application(store, network.config)
    except BaseException:
        store.close()
        raise
    return store, restored.application, restored.blocks_replayed
